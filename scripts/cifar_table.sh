#!/usr/bin/env bash
# The CIFAR-10 ResNet-20 table in README.md: RTN, No-Drop and QDrop at W4A4, W2A4, W2A2.
# 1024 calibration images from cifar10/train-subset, all 10,000 test images, ITERS iterations per block.
# Usage: bash scripts/cifar_table.sh [ITERS] [OUT]
set -euo pipefail
ITERS=${1:-500}
OUT=${2:-outputs/r20}
D=${SHARED:-../shared/data}
PY=${PY:-.venv/bin/python}
EXTRA=${EXTRA:-}  # flags added to every run, e.g. EXTRA="--round_lr 1e-3" (the default before session 4)
COMMON="--arch resnet20 --weights $D/cifar10-resnet/resnet20-12fca82f.th --train_dir $D/cifar10/train-subset
  --validation_dir $D/cifar10/test --channel_wise --act_quant --order together --wwq --waq --awq --aaq
  --weight 0.01 --num_samples 1024 --overwrite_output_dir $EXTRA"
for wa in "4 4" "2 4" "2 2"; do
  set -- $wa
  W=$1; A=$2
  $PY run_imagenet.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w 0 --output_dir $OUT/w${W}a${A}-rtn
  $PY run_imagenet.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w $ITERS --prob 1 --input_prob 1 --skip_fp_eval --output_dir $OUT/w${W}a${A}-nodrop
  $PY run_imagenet.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w $ITERS --prob 0.5 --input_prob 0.5 --skip_fp_eval --output_dir $OUT/w${W}a${A}-qdrop
done
$PY scripts/summarize.py "$OUT"
