# call C (nvidia-h200-x2): scaling with the bf16 reduce-scatter case and a 2-rank profile (#21), then speed (#20)
source bench/device/prelude.sh
timeout 420 python3 bench/scaling.py --steps 20 --parts anchor,strategies \
  --cases single@1,fsdp@1,ddp@2,fsdp@2,fsdp_bf16_reduce@2,fsdp_no_reshard@2 --profile fsdp@2 2>&1 | tail -20
CUDA_VISIBLE_DEVICES=0 timeout $((590-SECONDS)) python3 bench/speed.py 2>&1 | tail -10
