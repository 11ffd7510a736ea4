# call 27e (nvidia-h100-x1, alone): task=bench_infer on the R1-Distill-Qwen-7B shape in nf4 (the engine at batch 1
# and 32 concurrent beside plain transformers `generate` in nf4), then the DeepSeek-V2-Lite shape (MLA + MoE) in
# bf16. Issue #27.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
B="hardware=auto hardware.devices=1 precision=bf16 monitor=none bench_infer.static_anchor=false"
at bench-nf4
timeout -k 5 280 python3 -m dsrun task=bench_infer model=r1_distill_qwen_7b quant=nf4 $B 'bench_infer.batches=[1]' \
  bench_infer.concurrent=32 bench_infer.json_path=$OUT/bench_nf4.json 2>&1 | tee $OUT/bench_nf4.txt \
  | grep -E "loaded|compil|dsrun: \{|rror" | cut -c1-300
at bench-v2-lite
timeout -k 5 270 python3 -m dsrun task=bench_infer model=deepseek_v2_lite $B 'bench_infer.batches=[1]' \
  bench_infer.concurrent=32 bench_infer.json_path=$OUT/bench_v2lite.json 2>&1 | tee $OUT/bench_v2lite.txt \
  | grep -E "loaded|compil|dsrun: \{|rror" | cut -c1-300
at end
