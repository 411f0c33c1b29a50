#!/bin/bash
# The fused decode kernels (issue 19: SPL_FUSED_MOE_DECODE, SPL_FUSED_MAMBA_STEP) on the device
# machine, in one call of the `run` tool: their GPU tests, then the 30B decode bench with the
# default path and with the fused ops, side by side (JSON in $OUT and $OUT/fused).
#   bash scripts/gpu_fused_decode.sh [LENGTHS]     (default 64K: ~5 min; 64K,1M: ~9 min)
# Carry `.whl` as for scripts/gpu_flagship.sh. Exits non-zero when a test or a bench row failed.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
lengths=${1:-64K}
status=0
bash scripts/gpu_flagship.sh fused "bench:random:superlinear-exp-30b:$lengths" || status=1
mkdir -p "$OUT/fused"
SPL_FUSED_MOE_DECODE=1 SPL_FUSED_MAMBA_STEP=1 OUT=$OUT/fused \
  bash scripts/gpu_flagship.sh "bench:random:superlinear-exp-30b:$lengths" || status=1
exit $status
