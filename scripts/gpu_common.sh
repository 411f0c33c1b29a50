# Sourced by scripts/gpu_*.sh. A device call is precious, so one failed step does not stop the
# next (the bench still runs when a test fails); the script exits 1 at the end when any step
# failed, and at once when its setup fails. bash >= 4.4.
#   step NAME COMMAND [ARGS...]   run COMMAND (a shell function for pipelines; pipefail is on)
#   finish                        name the failed steps and exit 1, or exit 0
#   die MESSAGE                   a setup failure: exit 1 now
#   require_gpu                   die unless torch sees a CUDA GPU (GPU tests would only skip)
#   unknown_step NAME             a step the script does not know: fails that step
#   use_source_tree               install the carried .whl wheels to /tmp/site and map the source
#                                 tree to the superlinear package on PYTHONPATH (no install)
#   prepare_run                   require_gpu, $OUT (default /tmp/out), use_source_tree, show_provenance
#   gpu_test_files ORDER          the test files holding GPU tests, one a line, in ORDER: normal
#                                 (sorted), reverse, shuffle:SEED (the 30B sanity test is left out:
#                                 it has its own call, scripts/gpu_flagship.sh sanity30b)
set -uo pipefail
SPL_FAILED_STEPS=()

die() {
  echo "=== setup failed: $*" >&2
  exit 1
}

step() {
  local name=$1 rc=0
  shift
  echo "=== $name ($(date -u +%H:%M:%S))"
  "$@" || rc=$?
  if ((rc != 0)); then
    echo "=== FAILED: $name (exit $rc)" >&2
    SPL_FAILED_STEPS+=("$name (exit $rc)")
  fi
  return 0
}

finish() {
  if ((${#SPL_FAILED_STEPS[@]} > 0)); then
    echo "=== ${#SPL_FAILED_STEPS[@]} step(s) failed: $(IFS=';'; echo "${SPL_FAILED_STEPS[*]}")" >&2
    exit 1
  fi
  echo "=== all steps passed ($(date -u +%H:%M:%S))"
  exit 0
}

unknown_step() {
  echo "unknown step: $1" >&2
  return 2
}

require_gpu() {
  python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "no CUDA GPU visible to torch (the GPU tests would only be skipped)"
}

# The commit the bench JSONs record: a copied tree has no .git, so the caller passes it.
show_provenance() {
  echo "commit: ${SPL_GIT_COMMIT:-unknown (set SPL_GIT_COMMIT)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
}

use_source_tree() {
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || die "cannot install the carried wheels (.whl/)"
  rm -rf /tmp/pp && mkdir -p /tmp/pp/superlinear
  for f in core/*; do ln -s "$PWD/$f" /tmp/pp/superlinear/; done
  ln -s "$PWD/plugins" /tmp/pp/superlinear/plugins
  ln -s "$PWD/cli" /tmp/pp/superlinear/cli
  export PYTHONPATH=/tmp/pp:/tmp/site
}

prepare_run() {
  require_gpu
  OUT=${OUT:-/tmp/out}
  mkdir -p "$OUT"
  use_source_tree
  show_provenance
}

gpu_test_files() {
  local files
  files=$(grep -l "mark.gpu" tests/test_*.py | grep -v test_model_30b_gpu.py | LC_ALL=C sort)
  case $1 in
    normal) echo "$files" ;;
    reverse) echo "$files" | tac ;;
    shuffle:*) echo "$files" | python3 -c "import random, sys; f = sys.stdin.read().split()
random.Random(int(sys.argv[1])).shuffle(f); print('\n'.join(f))" "${1#shuffle:}" ;;
    *) echo "unknown order: $1" >&2; return 2 ;;
  esac
}
