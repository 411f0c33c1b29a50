#!/bin/bash
# The hybrid model work on the device machine (H200/H100 image: torch 2.11, triton 3.6, no
# fastapi), in one call of the `run` tool, from the source tree:
#   bash scripts/gpu_flagship.sh STEP...
# STEP: tests | growth | fused | profile:MODEL:DEPTH | bench:MODEL:LENGTHS[:extra bench args, comma-separated]
#   growth: tests/test_cache_growth_gpu.py (4M tokens of the 30B shape, the cache grown every 1K
#   decode tokens, peak memory flat; ~4 min)
#   fused: the GPU tests of the fused decode kernels (tests/test_model_ops.py)
# Exits non-zero when a step failed (a test, the bench, or a bench row with an error).
# e.g. bash scripts/gpu_flagship.sh tests profile:random:superlinear-exp-30b:64K \
#        bench:random:superlinear-exp-30b:64K,1M
# Carry `.whl`: fla-core 0.6.0 (the Mamba-2 Triton kernels) and transformers 5.24.0 wheels.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
rm -rf /tmp/pp && mkdir -p /tmp/pp/superlinear
for f in core/*; do ln -s "$PWD/$f" /tmp/pp/superlinear/; done
ln -s "$PWD/plugins" /tmp/pp/superlinear/plugins
ln -s "$PWD/cli" /tmp/pp/superlinear/cli
export PYTHONPATH=/tmp/pp:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'fla', fla.__version__)"
status=0  # non-zero when any step failed
for step in "$@"; do
  echo "=== $step ($(date -u +%H:%M:%S))"
  case $step in
    tests)
      timeout 400 python3 -m pytest -q -m gpu tests/test_model_hybrid_gpu.py -p no:cacheprovider \
        --durations=8 -x 2>&1 | tee -a "$OUT/gpu_tests.log" || status=1 ;;
    fused)
      timeout 400 python3 -m pytest -q -s -m gpu tests/test_model_ops.py -p no:cacheprovider 2>&1 \
        | tee -a "$OUT/gpu_tests.log" || status=1 ;;
    growth)
      SPL_GPU_GROWTH_TOKENS=${SPL_GPU_GROWTH_TOKENS:-4194304} timeout 560 python3 -m pytest -q -s -m gpu \
        tests/test_cache_growth_gpu.py -p no:cacheprovider 2>&1 \
        | tee -a "$OUT/growth.log" || status=1 ;;
    profile:*)
      rest=${step#profile:}; depth=${rest##*:}; model=${rest%:*}
      timeout 400 python3 scripts/gpu_profile_model.py "$model" "$depth" 2>&1 | tee -a "$OUT/profile.log" ;;
    bench:*)
      rest=${step#bench:}; IFS=':' read -r -a parts <<< "$rest"
      model="${parts[0]}:${parts[1]}"; lengths=${parts[2]}; extra=(${parts[3]//,/ })
      name=$(echo "$model" | tr ':' '_')
      timeout 560 python3 -m superlinear.cli.main bench generate --model "$model" --lengths "$lengths" \
        --attention superlinear --decode-tokens 64 "${extra[@]}" --json > "$OUT/bench_${name}_${lengths//,/_}.json" \
        2> >(tee -a "$OUT/bench.err" >&2) || status=1
      python3 -c "import json,sys; from superlinear.plugins.bench.generate import markdown;
result = json.load(open(sys.argv[1])); print(markdown(result))
sys.exit(any('error' in row for row in result['rows']))" "$OUT/bench_${name}_${lengths//,/_}.json" \
        || status=1 ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S)), status $status"
exit $status
