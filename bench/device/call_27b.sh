# call 27b (nvidia-h100-x1, alone): task=bench_infer on the R1-Distill-Qwen-7B shape, bf16 — the engine's batch-1
# and 32-concurrent rows, then plain transformers `generate` at batch 1 (the anchor) in the same job. Issue #27.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
timeout -k 5 250 python3 -m dsrun task=bench_infer model=r1_distill_qwen_7b hardware=auto hardware.devices=1 \
  precision=bf16 monitor=none 'bench_infer.batches=[1]' bench_infer.concurrent=32 bench_infer.static_anchor=false \
  bench_infer.json_path=$OUT/bench_bf16.json 2>&1 | tee $OUT/bench_bf16.txt | grep -E "loaded|compil|dsrun: \{|rror" \
  | cut -c1-300
