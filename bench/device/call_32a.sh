# call 32a (nvidia-h100-x1 or nvidia-h200): the 7B DPO QLoRA recipe for one RTX 3060 12 GB, run on the card under
# its emulation (hardware.emulate=true caps the process at the 3060's memory): 4 optimizer steps of 16 pairs of
# 1,024-token replies from the built-in pairs; the summary's peak memory and the log's rewards. Issue #32.
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at dpo-recipe
timeout -k 5 420 python3 -m dsrun +recipe=1x3060_dpo_qlora hardware.emulate=true train.max_steps=4 \
  train.log_every=1 data.num_samples=200 monitor=none hydra.run.dir=$OUT/run 2>&1 | tail -12 | cut -c1-400
at end
python3 -c "import json; s=json.load(open('$OUT/run/summary.json')); print({k: s.get(k) for k in ('status','steps','final_loss','peak_memory_gib','memory_cap_gib','tokens_per_s')})"
tail -1 $OUT/run/metrics.jsonl | cut -c1-600
rm -rf $OUT/run/model $OUT/run/checkpoints
