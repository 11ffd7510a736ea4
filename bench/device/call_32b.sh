# call 32b (nvidia-h100-x1 or nvidia-h200): first bench/gemv_probe.py (issue #27, 2 minutes at most); then GRPO on R1-Distill-Qwen-1.5B (random init, saved once) — dsrun's recipe
# `1x4060_grpo_lora` under the RTX 4060's 8 GiB cap for 20 steps, then TRL 1.16's GRPOTrainer (transformers
# generate) on the same folder, prompts, G, completion length and LoRA for 3 steps; rollout tokens/s and step time
# side by side (bench/grpo.py). Issue #32. Needs trl's wheel in .whl (pip download --no-deps trl==1.16.0).
source bench/device/prelude.sh
export DSRUN_LEDGER=/tmp/ledger.sqlite
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
python3 -c "import trl, datasets, pyarrow; print('trl', trl.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1
at gemv-probe  # issue 27: cuBLAS beside a Triton GEMV on the 7B's decode matmuls
timeout -k 5 170 python3 bench/gemv_probe.py 2>&1 | tail -34
at grpo
timeout -k 5 400 python3 bench/grpo.py --dsrun-steps 20 --trl-steps 3 2>&1 | tail -20 | cut -c1-1500
at end
