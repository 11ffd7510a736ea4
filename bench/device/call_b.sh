# call B (nvidia-h200, alone): the 7B inference benchmark (#18) beside the plain-transformers anchor
source bench/device/prelude.sh
timeout 400 python3 -m dsrun task=bench_infer model=r1_distill_qwen_7b hardware=auto hardware.devices=1 precision=bf16 \
  'bench_infer.quants=[none,nf4]' 'bench_infer.batches=[1,8]' bench_infer.json_path=$OUT/bench_infer.json \
  > $OUT/bench_infer.txt 2>&1
tail -20 $OUT/bench_infer.txt | cut -c1-300
timeout $((590-SECONDS)) python3 bench/anchors/infer_hf.py > $OUT/infer_hf.txt 2>&1; grep "^{" $OUT/infer_hf.txt
