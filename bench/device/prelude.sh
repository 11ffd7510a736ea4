# The device machine's environment for bench/device/call_*.sh: dsrun's wheels in /tmp/site, transformers 5.25 (+ hub,
# tokenizers, safetensors) in /tmp/tf ahead of the image's 5.17, the anchors' wheels in /tmp/anchors. Sourced, not run.
SP=$(python3 -c 'import transformers,os;print(os.path.dirname(os.path.dirname(transformers.__file__)))')
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tf .whl-tf/*.whl || exit 1
if [ -d .whl-anchors ] && [ ! -d /tmp/anchors/unsloth ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/anchors .whl-anchors/*.whl || exit 1
  # Unsloth 2026.10.9 accepts transformers <= 5.17: give it the image's, ahead of /tmp/tf
  for p in transformers huggingface_hub tokenizers safetensors; do cp -r $SP/$p $SP/${p}-*.dist-info /tmp/anchors/ 2>/dev/null; done
fi
export PYTHONPATH=/tmp/tf:/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)'
