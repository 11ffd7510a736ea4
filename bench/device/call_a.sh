# call A (nvidia-h200, alone on the machine): GPU tests, packing (#16), QLoRA beside Unsloth and the stock recipe (#14)
source bench/device/prelude.sh
timeout 200 python3 -m pytest -q --tb=short -m gpu tests/test_gpu.py tests/test_inference_gpu.py \
  -k "varlen or host_memory or greedy or static or generate_and_nf4" -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -5 $OUT/gpu_tests.txt | cut -c1-300
timeout 130 python3 bench/packing.py --steps 30 > $OUT/packing.txt 2>&1; tail -7 $OUT/packing.txt
echo "elapsed $SECONDS s"
timeout $((590-SECONDS)) python3 bench/qlora.py --steps 20 --only dsrun_host_embedding,unsloth,stock \
  --anchors-site /tmp/anchors > $OUT/qlora.txt 2>&1
grep "^dsrun\|^unsloth\|^stock\|^fastest\|^| " $OUT/qlora.txt | cut -c1-300
