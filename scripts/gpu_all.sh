#!/bin/bash
# Every @pytest.mark.gpu test in one call of the device machine (H100/H200 image: torch 2.11,
# triton 3.6, transformers 5.17, no fastapi/uvicorn). Carry `.whl` and `.gpu`, both made by
# scripts/gpu_wheels.sh (the wheels the image lacks; the default model's config and tokenizer,
# from which a random-weight copy of its architecture is built: the 98 MB default model package
# cannot travel to the device). Logs go to $OUT. Exits 1 when a test fails.
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
require_gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || die "cannot install the carried wheels (.whl/: scripts/gpu_wheels.sh)"
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/pipe.log 2>&1 \
  || { tail -5 /tmp/pipe.log; die "cannot install spl"; }
show_provenance
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
python3 scripts/random_default_model.py /tmp/smol-random --from .gpu || die "cannot build the random default model"
export SPL_TEST_TOKENIZER_DIR=$PWD/.gpu SPL_GPU_TEST_MODEL=/tmp/smol-random SPL_GPU_LONG_TOKENS=${SPL_GPU_LONG_TOKENS:-1000000}

# The files that hold GPU tests (the others need packages the device image lacks); the 30B
# sanity test has its own call (scripts/gpu_flagship.sh sanity30b).
all_gpu_tests() {
  timeout 540 python3 -m pytest -q -m gpu $(grep -l "mark.gpu" tests/test_*.py | grep -v test_model_30b_gpu.py) \
    -p no:cacheprovider --durations=15 -rs 2>&1 | tee "$OUT/gpu_tests.log"
}
step "gpu tests" all_gpu_tests
finish
