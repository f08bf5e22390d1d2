#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the extrapolation report (lab models trained or
# reused, methods evaluated at 1x-16x, passkey, SmolLM2), written under runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m rope_ext.eval.demo --out "${1:-runs/demo}"
