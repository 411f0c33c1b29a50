#!/bin/bash
# Kernel checks and benchmark on the device machine (one call of the `run` tool):
#   bash scripts/gpu_kernels.sh [tests|bench|profile|all] [bench args...]
# Runs from the source tree: core/ -> superlinear is mapped through a symlink tree in /tmp/pp.
set -o pipefail
cd "$(dirname "$0")/.."
what=${1:-all}; shift || true
[[ $what == tests+sweep ]] && { bash "$0" tests; what=sweep; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf /tmp/pp && mkdir -p /tmp/pp/superlinear
for f in core/*; do ln -s "$PWD/$f" /tmp/pp/superlinear/; done
ln -s "$PWD/plugins" /tmp/pp/superlinear/plugins
ln -s "$PWD/cli" /tmp/pp/superlinear/cli
export PYTHONPATH=/tmp/pp PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $what == tests || $what == all ]]; then
  timeout 300 python3 -m pytest -q -m gpu tests/test_kernels_triton.py -p no:cacheprovider \
    --durations=8 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [[ $what == sweep ]]; then
  timeout 400 python3 scripts/gpu_sweep.py 2>&1 | tee "$OUT/sweep.log"
fi
if [[ $what == profile || $what == all ]]; then
  timeout 120 python3 scripts/gpu_profile.py 1 1M 2>&1 | tee "$OUT/profile.log"
  timeout 60 python3 scripts/gpu_profile.py 1 64K 2>&1 | tee -a "$OUT/profile.log"
  timeout 60 python3 scripts/gpu_profile.py 1 16K 2>&1 | tee -a "$OUT/profile.log"
  timeout 60 python3 scripts/gpu_profile.py 2 1M 2>&1 | tee -a "$OUT/profile.log"
fi
if [[ $what == bench || $what == all ]]; then
  timeout 420 python3 -m superlinear.cli.main bench attention --out "$OUT/bench_attention.md" "$@" \
    2>&1 | tee "$OUT/bench.log"
fi
