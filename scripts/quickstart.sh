#!/usr/bin/env bash
# The main job, locally: set up, then Envoy + kv-extproc + Redis + three simulated vLLM pods.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m extproc quickstart "$@"
