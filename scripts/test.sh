#!/usr/bin/env bash
# The test command: set up, run every test (unit and integration: real Envoy, Redis, ZMQ,
# tokenizer), then the suite against real vLLM engines on the CPU (tests/realvllm), whose
# engine venv and tiny model are built outside the repo by tests/realvllm/setup.sh.
# KV_SKIP_REALVLLM=1 leaves the real-engine suite out (it says so).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
"$PY" -m pytest -p no:cacheprovider "$@"
if [ "${KV_SKIP_REALVLLM:-0}" = 1 ]; then
  echo "!!!! REAL-VLLM SUITE SKIPPED: KV_SKIP_REALVLLM=1 !!!!"
elif ! bash tests/realvllm/setup.sh; then
  echo "!!!! REAL-VLLM SUITE SKIPPED: the vLLM CPU engine could not be installed (see above) !!!!"
else
  "$PY" -m pytest -p no:cacheprovider -o addopts="" tests/realvllm "$@"
fi
