# call 32c (nvidia-h100-x1 or nvidia-h200): call 32b without its GEMV probe — GRPO on R1-Distill-Qwen-1.5B (random
# init, saved once): dsrun's recipe `1x4060_grpo_lora` under the RTX 4060's 8 GiB cap for 20 steps, then TRL 1.16's
# GRPOTrainer on the same folder, prompts, G, completion length and LoRA for 1 step (one generate call: TRL samples a whole optimizer step's 32 completions at once) (bench/grpo.py). Issue #32.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at grpo
# TRL's single step first (about 2 minutes): dsrun's 20 steps write metrics.jsonl into $OUT as they go, so a run cut
# short by the call's limit still gives its rollout tokens/s and step times
timeout -k 5 570 python3 bench/grpo.py --dsrun-steps 20 --trl-steps 1 --only trl,dsrun 2>&1 | tee $OUT/grpo.out \
  | grep -v '"error"' | tail -12
at end
for f in $OUT/dsrun.err $OUT/trl.err; do echo "--- $f"; grep -v "it/s\]\|Warning\|warn(" $f | tail -14 | cut -c1-300; done
