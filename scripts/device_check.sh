#!/usr/bin/env bash
# The GPU checks, in one run of at most about 8 minutes on one GPU: the CUDA tests, the iteration-cost
# benchmark on CUDA, and one EfficientNet-Lite0 W4A4 QDrop run. Prints the lines README's GPU rows take.
# Usage: bash scripts/device_check.sh [OUT]   (PY: the python with torch+CUDA; SHARED: the offline data)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/device-check}
PY=${PY:-python3}
SHARED=${SHARED:-../shared/data}
ITERS=${ITERS:-2000}
mkdir -p "$OUT"
status=0
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 2
echo "== CUDA tests"
timeout 120 "$PY" -m pytest -q tests/test_device.py 2>&1 | tail -3 || status=1
echo "== iteration cost on CUDA"
timeout 180 "$PY" benchmarks/iteration_cost.py --device cuda 2>&1 | tee "$OUT/iteration_cost.txt" | grep -v "^\s*$" || status=1
echo "== EfficientNet-Lite0 W4A4 QDrop, $ITERS iterations per block"
start=$(date +%s)
timeout 300 "$PY" run_imagenet.py --arch efficientnet_lite0 --validation_dir "$SHARED/imagenet-sample" \
  --num_calib_from_validation 256 --num_samples 256 --batch_size 32 --n_bits_w 4 --n_bits_a 4 --channel_wise \
  --act_quant --order together --wwq --waq --awq --aaq --weight 0.1 --prob 0.5 --input_prob 0.5 --iters_w "$ITERS" \
  --device cuda --output_dir "$OUT/lite0-w4a4" --overwrite_output_dir > "$OUT/lite0-w4a4.log" 2>&1 || status=1
"$PY" - "$OUT/lite0-w4a4/results.json" "$start" <<'PY' || status=1
import json, sys, time
r = json.load(open(sys.argv[1]))
print(f"| EfficientNet-Lite0 W4A4 QDrop, {r['config']['iters_w']} it/block, GPU | float {r['fp']['top1']:.2f} | "
      f"quantized {r['quant']['top1']:.2f} | quantize {r['time_s']['quantize']:.0f} s | "
      f"whole command {time.time() - int(sys.argv[2]):.0f} s |")
PY
exit $status
