# call 30a (nvidia-h100-x1): issue #30's table in one job: the 1.5B shape (plain eager and compiled anchors beside
# dsrun eager and compiled), then the DeepSeek-V2-Lite MoE shape at 4 layers (the plain anchor runs transformers'
# grouped_mm experts, as dsrun resolves them on a bf16 GPU) beside dsrun. About 8 minutes.
source bench/device/prelude.sh
T0=$(date +%s); at() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
at dense-1.5b
OUT=$OUT/dense timeout -k 5 330 python3 bench/speed.py --steps 5 --repeats 3 2>&1 | grep -v '^{' | tail -8
at moe-v2-lite
OUT=$OUT/moe timeout -k 5 $((585-SECONDS)) python3 bench/speed.py --model deepseek_v2_lite \
  --set model.fields.num_hidden_layers=4 --batch 2 --steps 5 --repeats 3 --cases plain,dsrun,dsrun_compile 2>&1 \
  | grep -v '^{' | tail -8
at end
