# call 27a (nvidia-h100-x1, alone): R1-Distill-Qwen-7B shape, bf16 — the engine beside plain `generate` in
# task=bench_infer, `dsrun serve` under 32 concurrent streaming clients and a burst of 256 (bench/serve_load.py),
# then `dsrun generate` on the console. Issue #27. Every step has its own limit and prints as it goes.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
M="model=r1_distill_qwen_7b hardware=auto hardware.devices=1 precision=bf16 monitor=none"
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at bench_infer
timeout -k 5 230 python3 -m dsrun task=bench_infer $M 'bench_infer.batches=[1]' bench_infer.concurrent=32 \
  bench_infer.static_anchor=false bench_infer.json_path=$OUT/bench_bf16.json 2>&1 | tee $OUT/bench_bf16.txt \
  | grep -E "loaded|compil|dsrun: \{|Error|rror:" | cut -c1-260
at serve
python3 -m dsrun serve $M serve.port=8123 serve.max_batch=32 serve.max_queue=64 serve.max_prompt_tokens=640 \
  serve.max_tokens=256 > $OUT/serve.txt 2>&1 &
SERVER=$!
for i in $(seq 150); do grep -q "serving" $OUT/serve.txt && break; kill -0 $SERVER 2>/dev/null || break; sleep 1; done
at ready; grep -E "compil|serving|rror" $OUT/serve.txt | cut -c1-200
timeout -k 5 90 python3 bench/serve_load.py --url http://127.0.0.1:8123 --requests 64 --concurrency 32 \
  --prompt-tokens 512 --max-tokens 256 --json $OUT/load32_bf16.json 2>&1 | tail -4 | cut -c1-400
timeout -k 5 60 python3 bench/serve_load.py --url http://127.0.0.1:8123 --requests 256 --concurrency 256 \
  --prompt-tokens 512 --max-tokens 16 --json $OUT/burst256_bf16.json 2>&1 | tail -4 | cut -c1-400
kill -TERM $SERVER; wait $SERVER; at "serve exit $?"; grep -c Traceback $OUT/serve.txt
at generate
timeout -k 5 100 python3 -m dsrun generate $M "hi" generate.max_new_tokens=256 generate.show_thinking=show \
  > /dev/null 2> $OUT/generate.txt; grep -E "compil|tokens/s|rror" $OUT/generate.txt | cut -c1-300
at end
