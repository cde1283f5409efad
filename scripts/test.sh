#!/usr/bin/env bash
# The test command: set up, then run every test (unit and integration, real Envoy and Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -p no:cacheprovider "$@"
