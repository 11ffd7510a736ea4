# call 32e (nvidia-h100-x1 or nvidia-h200): call 32d after GRPO's rollouts became one pass per optimizer step (32
# completions at a time, as TRL's generation batch, instead of 4 passes of 8) and its warm-up only the 32-row shapes:
# dsrun's recipe `1x4060_grpo_lora` under the RTX 4060's 8 GiB cap for 20 steps, then TRL 1.16's GRPOTrainer for 1
# step on the same folder, prompts, G, completion length and LoRA, each in its own bench/grpo.py process. The
# compiler's cache goes to .inductor-cache (git-ignored; kept on a warm machine): call 32e run again right after
# finds it, as a user's second run does. Issue #32.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-cache
echo "inductor cache: $(du -sh .inductor-cache 2>/dev/null | cut -f1) at start"
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at dsrun
TORCH_LOGS=recompiles,graph_breaks timeout -k 5 ${DSRUN_LIMIT:-440} python3 bench/grpo.py --dsrun-steps 20 --only dsrun \
  2>&1 | tee $OUT/grpo_dsrun.out | tail -3 | cut -c1-900
at trl
timeout -k 5 $((585-SECONDS)) python3 bench/grpo.py --trl-steps 1 --only trl 2>&1 | tee $OUT/grpo_trl.out | tail -3 \
  | cut -c1-600
at end
grep -h "compil\|stopped\|rror\|Recompiling\|Graph break" $OUT/dsrun.err | cut -c1-300 | tail -8
tail -2 $OUT/dsrun_grpo/metrics.jsonl 2>/dev/null | cut -c1-700
