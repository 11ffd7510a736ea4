# call 27c (nvidia-h100-x1, alone): R1-Distill-Qwen-7B shape, bf16 — `dsrun serve` under 32 concurrent streaming
# clients and a burst of 256 (bench/serve_load.py), then `dsrun generate` on the console. Issue #27.
# (call_27b.sh is the task=bench_infer half; each process compiles its decode step once, ~2.5 min for a 7B.)
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
M="model=r1_distill_qwen_7b hardware=auto hardware.devices=1 precision=bf16 monitor=none"
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at serve
python3 -m dsrun serve $M serve.port=8123 serve.max_batch=32 serve.max_queue=64 serve.max_prompt_tokens=640 \
  serve.max_tokens=256 > $OUT/serve.txt 2>&1 &
SERVER=$!
for i in $(seq 240); do grep -q "serving" $OUT/serve.txt && break; kill -0 $SERVER 2>/dev/null || break; sleep 1; done
at ready; grep -E "compil|serving|rror" $OUT/serve.txt | cut -c1-200
timeout -k 5 90 python3 bench/serve_load.py --url http://127.0.0.1:8123 --requests 64 --concurrency 32 \
  --prompt-tokens 512 --max-tokens 256 --json $OUT/load32_bf16.json 2>&1 | tail -4 | cut -c1-400
timeout -k 5 60 python3 bench/serve_load.py --url http://127.0.0.1:8123 --requests 256 --concurrency 256 \
  --prompt-tokens 512 --max-tokens 16 --json $OUT/burst256_bf16.json 2>&1 | tail -4 | cut -c1-400
kill -TERM $SERVER; wait $SERVER; at "serve exit $?"; grep -c Traceback $OUT/serve.txt
at generate
timeout -k 5 200 python3 -m dsrun generate $M "hi" generate.max_new_tokens=256 generate.show_thinking=show \
  > $OUT/generate_out.txt 2> $OUT/generate.txt; echo "generate exit $?"; grep -E "compil|tokens/s|rror" $OUT/generate.txt | cut -c1-300
wc -c $OUT/generate_out.txt
at end
