#!/usr/bin/env bash
# QDrop against No-Drop on CIFAR-10 ResNet-20 (README, "QDrop against No-Drop"): W2A4 and W2A2 over
# seeds 1-3 (the table's seed 1005 is in scripts/cifar_table.sh), which of the two drops costs at
# W2A2, and the learning rate of the activation steps. ITERS iterations per block, 1024 calibration
# images (the seed picks them, and the drop masks), all 10,000 test images.
# Usage: bash scripts/cifar_drop_study.sh [ITERS] [OUT]
set -euo pipefail
ITERS=${1:-500}
OUT=${2:-outputs/s5}
D=${SHARED:-../shared/data}
PY=${PY:-.venv/bin/python}
COMMON="--arch resnet20 --weights $D/cifar10-resnet/resnet20-12fca82f.th --train_dir $D/cifar10/train-subset
  --validation_dir $D/cifar10/test --channel_wise --act_quant --order together --wwq --waq --awq --aaq
  --weight 0.01 --num_samples 1024 --overwrite_output_dir --skip_fp_eval --iters_w $ITERS"
for seed in 1 2 3; do
  for wa in "2 4" "2 2"; do
    set -- $wa
    for p in 0.5 1; do
      $PY run_imagenet.py $COMMON --n_bits_w $1 --n_bits_a $2 --lr 4e-5 --seed $seed --prob $p --input_prob $p \
        --output_dir $OUT/seeds/lr4e-5-w$1a$2-p$p-s$seed
    done
  done
done
# which drop: activations inside the block (prob) or the block's input (input_prob)
for pp in "0.5 1" "1 0.5" "0.75 0.75"; do
  set -- $pp
  $PY run_imagenet.py $COMMON --n_bits_w 2 --n_bits_a 2 --prob $1 --input_prob $2 --output_dir $OUT/abl/p$1-ip$2
done
# the activation steps' learning rate (LSQ; the method's 4e-5 is set for 20k iterations)
for lr in 4e-4 2e-3 1e-2; do
  for p in 0.5 1; do
    $PY run_imagenet.py $COMMON --n_bits_w 2 --n_bits_a 2 --lr $lr --prob $p --input_prob $p --output_dir $OUT/actlr$lr-p$p
  done
done
$PY scripts/summarize.py "$OUT/seeds"
$PY scripts/summarize.py "$OUT/abl"
