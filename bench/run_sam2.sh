#!/usr/bin/env bash
# SAM2Encoder against the real sam2 package, in its own virtualenv (sam2 needs a torchvision that imports
# beside torch; the CPU torch 2.13.0 of the main install has none). Builds the environment once
# (torch 2.14.1 + torchvision 0.29.1, a ~5.5 GB CUDA build that also runs on the CPU; sam2 1.1.0 without its
# CUDA extension; auvcore without CUDA kernels), then runs tests/test_sam2.py there: random-weight
# checkpoints made by the package itself, both outputs, a MedSAM2-style local config, `auvcore score`.
#   bash bench/run_sam2.sh [VENV]        (default VENV: ~/.cache/auvcore-sam2-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$HOME/.cache/auvcore-sam2-venv}
PY=${PYTHON:-python3.11}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
source "$VENV/bin/activate"
python -c "import torchvision" 2>/dev/null || pip install -q torch==2.14.1 torchvision==0.29.1
python -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 pip install -q --no-build-isolation "sam2==1.1.0"
# a copy of the source, so that this build never shares a build folder with the main install
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
AUVCORE_CUDA=OFF pip install -q "$SRC[sam2,data,app]" pytest hypothesis
python -c "import torch, torchvision, sam2; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'sam2 1.1.0')"
cd "$SRC" && rm -rf auvcore && pytest -q -p no:cacheprovider tests/test_sam2.py -rs
