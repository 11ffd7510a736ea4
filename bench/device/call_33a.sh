# call 33a (nvidia-h100-x1, ~3 min): the engine's decode-step compile for the GRPO recipe's shape (R1-Distill-Qwen-1.5B
# dimensions with LoRA r16) at 6 layers, through inductor with CUDA graphs, traced once (as now) and with Python
# floats left symbolic (a second trace, as before 2026-12-08); the compiler's caches off, each case its own process.
source bench/device/prelude.sh
export TORCHINDUCTOR_FORCE_DISABLE_CACHES=1
for flag in "" --symbolic-floats; do
  timeout -k 5 100 python3 bench/compile_probe.py --backend inductor --layers 6 $flag 2>&1 | grep -A4 "layers,"
done
