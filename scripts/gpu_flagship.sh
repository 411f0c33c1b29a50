#!/bin/bash
# The hybrid model work on the device machine (H200/H100 image: torch 2.11, triton 3.6, no
# fastapi), in one call of the `run` tool, from the source tree:
#   SPL_GIT_COMMIT=<sha> bash scripts/gpu_flagship.sh STEP...
# STEP: tests | sanity30b | moe | fused | growth | profile:MODEL:DEPTH | bench:MODEL:LENGTHS[:extra bench args, comma-separated]
#   growth: tests/test_cache_growth_gpu.py (4M tokens of the 30B shape, the cache grown every 1K
#   decode tokens, peak memory flat; ~4 min)
#   fused: the GPU tests of the fused decode kernels (tests/test_model_ops.py)
# e.g. bash scripts/gpu_flagship.sh tests profile:random:superlinear-exp-30b:64K \
#        bench:random:superlinear-exp-30b:64K,1M bench:random:superlinear-exp-30b:64K,1M:--dtype,fp16
# Carry `.whl`: fla-core 0.6.0 (the Mamba-2 Triton kernels) and transformers 5.24.0 wheels.
# Every step runs; the exit status is 1 when any failed (scripts/gpu_common.sh).
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
prepare_run
python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'fla', fla.__version__)" || die "a package is missing"

gpu_tests() {
  timeout 400 python3 -m pytest -q -m gpu tests/test_model_hybrid_gpu.py -p no:cacheprovider \
    --durations=8 -x 2>&1 | tee -a "$OUT/gpu_tests.log"
}

sanity_30b() {
  timeout 400 python3 -m pytest -q -m gpu tests/test_model_30b_gpu.py -p no:cacheprovider \
    --durations=4 2>&1 | tee -a "$OUT/gpu_tests_30b.log"
}

fused_ops() {
  timeout 400 python3 -m pytest -q -s -m gpu tests/test_model_ops.py -p no:cacheprovider 2>&1 \
    | tee -a "$OUT/gpu_tests.log"
}

growth() {
  SPL_GPU_GROWTH_TOKENS=${SPL_GPU_GROWTH_TOKENS:-4194304} timeout 560 python3 -m pytest -q -s -m gpu \
    tests/test_cache_growth_gpu.py -p no:cacheprovider 2>&1 | tee -a "$OUT/growth.log"
}

moe_decode() {
  timeout 120 python3 scripts/gpu_moe_decode.py 2>&1 | tee -a "$OUT/moe_decode.log"
}

profile() {  # MODEL DEPTH
  timeout 400 python3 scripts/gpu_profile_model.py "$1" "$2" 2>&1 | tee -a "$OUT/profile.log"
}

bench() {  # MODEL LENGTHS EXTRA (comma-separated)
  local model=$1 lengths=$2 extra=() suffix="" file
  if [[ -n $3 ]]; then
    IFS=',' read -r -a extra <<< "$3"
    suffix=_$(echo "$3" | sed 's/--//g' | tr ',' '_')
  fi
  file="$OUT/bench_${model//:/_}_${lengths//,/_}${suffix}.json"
  timeout 560 python3 -m superlinear.cli.main bench generate --model "$model" --lengths "$lengths" \
    --attention superlinear --decode-tokens 64 "${extra[@]}" --json > "$file" 2> >(tee -a "$OUT/bench.err" >&2)
  local rc=$?
  python3 -c "import json,sys; from superlinear.plugins.bench.generate import markdown;
print(markdown(json.load(open(sys.argv[1]))))" "$file" || rc=1
  return $rc
}

for step_spec in "$@"; do
  case $step_spec in
    tests) step tests gpu_tests ;;
    sanity30b) step sanity30b sanity_30b ;;
    moe) step moe moe_decode ;;
    fused) step fused fused_ops ;;
    growth) step growth growth ;;
    profile:*)
      rest=${step_spec#profile:}
      step "$step_spec" profile "${rest%:*}" "${rest##*:}" ;;
    bench:*)
      IFS=':' read -r -a parts <<< "${step_spec#bench:}"
      step "$step_spec" bench "${parts[0]}:${parts[1]}" "${parts[2]}" "${parts[3]:-}" ;;
    *) step "$step_spec" unknown_step "$step_spec" ;;
  esac
done
finish
