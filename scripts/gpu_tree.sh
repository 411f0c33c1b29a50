# Sourced by the device-machine scripts (gpu_flagship.sh, gpu_dist.sh), from the repository root:
# installs the carried `.whl` wheels (fla-core 0.6.0, transformers 5.24.0) into /tmp/site and
# maps the source tree to the `superlinear` package on PYTHONPATH (no editable install needed).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
rm -rf /tmp/pp && mkdir -p /tmp/pp/superlinear
for f in core/*; do ln -s "$PWD/$f" /tmp/pp/superlinear/; done
ln -s "$PWD/plugins" /tmp/pp/superlinear/plugins
ln -s "$PWD/cli" /tmp/pp/superlinear/cli
export PYTHONPATH=/tmp/pp:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
