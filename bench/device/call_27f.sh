# call 27f (nvidia-h100-x1, alone): task=bench_infer on the R1-Distill-Qwen-7B shape in nf4 — the engine at batch 1
# now decodes one row alone (bitsandbytes' fused 4-bit GEMV) and 32 concurrent — beside plain transformers
# `generate` in nf4, then `dsrun generate` in nf4 on the console. Issue #27.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
B="hardware=auto hardware.devices=1 precision=bf16 monitor=none bench_infer.static_anchor=false"
at bench-nf4
timeout -k 5 330 python3 -m dsrun task=bench_infer model=r1_distill_qwen_7b quant=nf4 $B 'bench_infer.batches=[1]' \
  bench_infer.concurrent=32 bench_infer.json_path=$OUT/bench_nf4.json 2>&1 | tee $OUT/bench_nf4.txt \
  | grep -E "loaded|compil|dsrun: \{|rror" | cut -c1-400
at generate-nf4
timeout -k 5 200 python3 -m dsrun generate model=r1_distill_qwen_7b quant=nf4 hardware=auto precision=bf16 "hi" \
  generate.max_new_tokens=256 2>&1 | grep -E "tokens, first|rror|compiled" | cut -c1-300
at end
