#!/bin/bash
# Kernel checks and benchmark on the device machine (one call of the `run` tool):
#   SPL_GIT_COMMIT=<sha> bash scripts/gpu_kernels.sh [tests|bench|profile|sweep|tests+sweep|all] [bench args...]
# Runs from the source tree: core/ -> superlinear is mapped through a symlink tree in /tmp/pp.
# Every step runs; the exit status is 1 when any failed (scripts/gpu_common.sh).
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
require_gpu
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf /tmp/pp && mkdir -p /tmp/pp/superlinear
for f in core/*; do ln -s "$PWD/$f" /tmp/pp/superlinear/; done
ln -s "$PWD/plugins" /tmp/pp/superlinear/plugins
ln -s "$PWD/cli" /tmp/pp/superlinear/cli
export PYTHONPATH=/tmp/pp PYTHONUNBUFFERED=1
show_provenance
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || die "no triton"

kernel_tests() {
  timeout 300 python3 -m pytest -q -m gpu tests/test_kernels_triton.py -p no:cacheprovider \
    --durations=8 2>&1 | tee "$OUT/gpu_tests.log"
}

sweep() {
  timeout 400 python3 scripts/gpu_sweep.py 2>&1 | tee "$OUT/sweep.log"
}

profile() {  # CONFIG DEPTH SECONDS
  timeout "$3" python3 scripts/gpu_profile.py "$1" "$2" 2>&1 | tee -a "$OUT/profile.log"
}

bench() {
  timeout 420 python3 -m superlinear.cli.main bench attention --json --out "$OUT/bench_attention.md" "$@" \
    > "$OUT/bench_attention.json" 2> >(tee "$OUT/bench.log" >&2) && cat "$OUT/bench_attention.md"
}

case $what in
  tests|all|tests+sweep) step tests kernel_tests ;;
esac
case $what in
  sweep|tests+sweep) step sweep sweep ;;
esac
case $what in
  profile|all)
    step "profile 1 1M" profile 1 1M 120
    step "profile 1 64K" profile 1 64K 60
    step "profile 1 16K" profile 1 16K 60
    step "profile 2 1M" profile 2 1M 60 ;;
esac
case $what in
  bench|all) step bench bench "$@" ;;
esac
case $what in
  tests|bench|profile|sweep|tests+sweep|all) ;;
  *) step "$what" unknown_step "$what" ;;
esac
finish
