#!/usr/bin/env bash
# The GPU check on a lent GPU machine (no network): install the wheels carried in bench/wheels (diffusers, lpips,
# torchvision and what they need; bench/RESULTS.md has the download command), then run bench/gpu_check.py.
# The machine gets a copy of the working tree, not an install: the repository root goes on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G "bench/wheels/*.whl" > /dev/null; then
  # pip resolves from the carried wheels and what the machine has; a missing dependency fails here, by name
  python -m pip install --no-index --find-links bench/wheels --quiet diffusers lpips torchvision
  # 8-bit Adam (the SDXL part and the memory part) where its wheel was carried; without it they say AdamW / n/a
  python -m pip install --no-index --find-links bench/wheels --quiet bitsandbytes 2>/dev/null || echo "no bitsandbytes wheel in bench/wheels"
fi
python -c "import diffusers, lpips; print('diffusers', diffusers.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python bench/gpu_check.py --output_dir "${OUT:-outputs/gpu_check}" "$@"
