#!/usr/bin/env bash
# The seed's "More experiments" at W2A2 on CIFAR-10 ResNet-20: Case 1, Case 2, Case 3, No Drop (the
# seed's exact flag lines), and QDrop, with this repository's data/budget flags appended.
# Usage: bash scripts/cifar_cases.sh [ITERS] [OUT]
set -euo pipefail
ITERS=${1:-500}
OUT=${2:-outputs/r20-cases}
D=${SHARED:-../shared/data}
PY=${PY:-.venv/bin/python}
EXTRA=${EXTRA:-}  # flags added to every run, e.g. EXTRA="--round_lr 1e-3" (the default before session 4)
DATA="--weights $D/cifar10-resnet/resnet20-12fca82f.th --train_dir $D/cifar10/train-subset --validation_dir $D/cifar10/test
  --num_samples 1024 --iters_w $ITERS --skip_fp_eval --overwrite_output_dir $EXTRA"
SEED="--arch resnet20 --n_bits_w 2 --channel_wise --n_bits_a 2 --act_quant"
$PY run_imagenet.py $SEED --order after --wwq --awq --aaq --input_prob 1.0 --prob 1.0 $DATA --output_dir $OUT/case1
$PY run_imagenet.py $SEED --order before --wwq --waq --aaq --input_prob 1.0 --prob 1.0 $DATA --output_dir $OUT/case2
$PY run_imagenet.py $SEED --order after --wwq --waq --awq --aaq --input_prob 1.0 --prob 1.0 $DATA --output_dir $OUT/case3
$PY run_imagenet.py $SEED --order together --wwq --waq --awq --aaq --input_prob 1.0 --prob 1.0 $DATA --output_dir $OUT/nodrop
$PY run_imagenet.py $SEED --order together --wwq --waq --awq --aaq --weight 0.01 --input_prob 0.5 --prob 0.5 $DATA --output_dir $OUT/qdrop
$PY scripts/summarize.py "$OUT"
