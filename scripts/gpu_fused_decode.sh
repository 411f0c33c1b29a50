#!/bin/bash
# The fused decode kernels (issue 19: SPL_FUSED_MOE_DECODE, SPL_FUSED_MAMBA_STEP) on the device
# machine, in one call of the `run` tool: their GPU tests, then the 30B decode bench with the
# default path and with the fused ops, side by side (JSON in $OUT and $OUT/fused).
#   SPL_GIT_COMMIT=<sha> bash scripts/gpu_fused_decode.sh [LENGTHS]   (default 64K: ~5 min; 64K,1M: ~9 min)
# Carry `.whl` as for scripts/gpu_flagship.sh. Exits non-zero when a test or a bench row failed.
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
require_gpu
OUT=${OUT:-/tmp/out}
lengths=${1:-64K}

fused_bench() {
  mkdir -p "$OUT/fused"
  SPL_FUSED_MOE_DECODE=1 SPL_FUSED_MAMBA_STEP=1 OUT=$OUT/fused \
    bash scripts/gpu_flagship.sh "bench:random:superlinear-exp-30b:$lengths"
}

step "tests and default bench" bash scripts/gpu_flagship.sh fused "bench:random:superlinear-exp-30b:$lengths"
step "fused bench" fused_bench
finish
