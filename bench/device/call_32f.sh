# call 32f (nvidia-h100-x1 or nvidia-h200): GRPO on R1-Distill-Qwen-1.5B (random init, saved once) beside TRL in one
# 600-s call: `bench/grpo.py --alongside` starts TRL 1.16's GRPOTrainer (1 step, on CPU cores 0-1) while dsrun's
# recipe `1x4060_grpo_lora` (under the RTX 4060's 8 GiB cap, on the other cores) loads and compiles its decode step,
# CPU work that leaves the GPU idle; TRL must end before dsrun's first step (the output says when each did), then
# dsrun runs its 20 steps alone. Call 32e ran them one after the other, but dsrun's compile (245 s) and 20 steps
# (~10 s each) with TRL's step (115 s) do not fit one call that way. Issue #32.
# CALL_S: the seconds the call may run (600; less where the session's device time is short): dsrun is stopped 60 s
# before, with the steps it made reported.
source bench/device/prelude.sh
CALL_S=${CALL_S:-585}
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at start
TORCH_LOGS=recompiles,graph_breaks timeout -k 10 $((CALL_S - 25)) python3 bench/grpo.py --dsrun-steps 20 --trl-steps 1 --alongside \
  --dsrun-limit $((CALL_S - 60 - SECONDS)) 2>&1 | tee $OUT/grpo.out | grep -v "^\s*$" | tail -9 | cut -c1-1200
at end
grep -h "compil\|stopped\|rror\|Recompiling\|Graph break" $OUT/dsrun.err | cut -c1-300 | tail -8
tail -1 $OUT/dsrun_grpo/metrics.jsonl 2>/dev/null | cut -c1-700
