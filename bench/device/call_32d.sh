# call 32d (nvidia-h100-x1 or nvidia-h200): call 32c with dsrun first — GRPO on R1-Distill-Qwen-1.5B (random init,
# saved once): dsrun's recipe `1x4060_grpo_lora` under the RTX 4060's 8 GiB cap for 20 steps (cut at 400 s: its
# metrics.jsonl in $OUT still gives the steps it made), then TRL 1.16's GRPOTrainer on the same folder, prompts, G,
# completion length and LoRA for 1 step (one generate call: TRL samples the optimizer step's 32 completions at once;
# about 150 s). Each case in its own bench/grpo.py process. Issue #32.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at dsrun
# recompiles and graph breaks of the decode step land in $OUT/dsrun.err: where its 341-s compile (2026-12-07) went
TORCH_LOGS=recompiles,graph_breaks timeout -k 5 400 python3 bench/grpo.py --dsrun-steps 20 --only dsrun 2>&1 | tee $OUT/grpo_dsrun.out | tail -3 | cut -c1-600
at trl
timeout -k 5 $((580-SECONDS)) python3 bench/grpo.py --trl-steps 1 --only trl 2>&1 | tee $OUT/grpo_trl.out | tail -3 \
  | cut -c1-600
at end
grep -h "compil\|stopped\|rror\|Recompiling\|Graph break" $OUT/dsrun.err | cut -c1-300 | tail -5
tail -3 $OUT/dsrun_grpo/metrics.jsonl 2>/dev/null | cut -c1-600
