#!/bin/bash
# Batched decode (Model.decode_batch, issue 25) on the device machine, in one call of the `run`
# tool, from the source tree:
#   SPL_GIT_COMMIT=<sha> bash scripts/gpu_batch.sh [BATCHES_1M] [BATCHES_32K]
# BATCHES_*: comma-separated session counts for `spl bench generate --batch` (default 1,8 at 1M
# and 1,64 at 32K, for an H200). The 30B shape holds 59 GiB of weights and ~6 GiB of KV per 1M
# tokens, so 8 x 1M needs ~107 GiB: on an H100 (78 GiB) pass 1,2 and 1,32.
# Steps (every one runs; the exit status is 1 when any failed, scripts/gpu_common.sh):
#   tests   the GPU exactness tests: the rows kernel (tests/test_kernels_decode_rows.py, all of it on
#           the GPU, bf16 at the 30B heads and a graph replay included) and the
#           bucket graphs against per-sequence graph decode in bf16 (tests/test_model_decode_batch_gpu.py)
#   bench1m B sessions at 1M (--probe: each session prefills its last chunk over a zeroed 1M
#           cache; the decode reads the same bytes as after a real prefill)
#   bench32k B sessions at 32K, fully prefilled
# Carry `.whl` (scripts/gpu_wheels.sh): fla-core and transformers.
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
prepare_run
BATCHES_1M=${1:-1,8}
BATCHES_32K=${2:-1,64}
MODEL=random:superlinear-exp-30b

gpu_tests() {
  timeout 500 python3 -m pytest -q tests/test_kernels_decode_rows.py tests/test_model_decode_batch_gpu.py \
    -p no:cacheprovider --durations=6 2>&1 | tee -a "$OUT/gpu_tests.log"
}

bench_batch() {  # LENGTH BATCHES EXTRA...
  local length=$1 batches=$2 file
  shift 2
  file="$OUT/bench_batch_${length}_${batches//,/_}.json"
  timeout 590 python3 -m superlinear.cli.main bench generate --model "$MODEL" --lengths "$length" \
    --attention superlinear --decode-tokens 32 --batch "$batches" "$@" --json > "$file" \
    2> >(tee -a "$OUT/bench.err" >&2)
  local rc=$?
  python3 -c "import json,sys; from superlinear.plugins.bench.generate import markdown;
print(markdown(json.load(open(sys.argv[1]))))" "$file" || rc=1
  return $rc
}

step tests gpu_tests
step bench1m bench_batch 1M "$BATCHES_1M" --probe
step bench32k bench_batch 32K "$BATCHES_32K"
finish
