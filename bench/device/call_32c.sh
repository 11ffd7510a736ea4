# call 32c (nvidia-h100-x1 or nvidia-h200): call 32b without its GEMV probe — GRPO on R1-Distill-Qwen-1.5B (random
# init, saved once): dsrun's recipe `1x4060_grpo_lora` under the RTX 4060's 8 GiB cap for 20 steps, then TRL 1.16's
# GRPOTrainer on the same folder, prompts, G, completion length and LoRA for 1 step (4 generate calls) (bench/grpo.py). Issue #32.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at grpo
timeout -k 5 560 python3 bench/grpo.py --dsrun-steps 20 --trl-steps 1 2>&1 | grep -v '"error"' | tail -12
at end
for f in $OUT/dsrun.err $OUT/trl.err; do echo "--- $f"; grep -v "it/s\]\|Warning\|warn(" $f | tail -14 | cut -c1-300; done
