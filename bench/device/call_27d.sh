# call 27d (nvidia-h100-x1, alone): the GPU tests of the engine (tiny shapes), then task=bench_infer on the
# R1-Distill-Qwen-7B shape in nf4 — the engine at batch 1 beside plain transformers `generate` in nf4. Issue #27.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at gpu-tests
python3 -c 'import pytest' 2>/dev/null || echo "no pytest in the image"
timeout -k 5 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_inference_gpu.py 2>&1 | tail -15 | cut -c1-300
at bench-nf4
timeout -k 5 250 python3 -m dsrun task=bench_infer model=r1_distill_qwen_7b hardware=auto hardware.devices=1 \
  precision=bf16 quant=nf4 monitor=none 'bench_infer.batches=[1]' bench_infer.concurrent=32 \
  bench_infer.static_anchor=false bench_infer.json_path=$OUT/bench_nf4.json 2>&1 | tee $OUT/bench_nf4.txt \
  | grep -E "loaded|compil|dsrun: \{|rror" | cut -c1-300
at end
