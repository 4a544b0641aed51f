#!/usr/bin/env bash
# QDrop against No-Drop on CIFAR-10 ResNet-20 (README and docs/cifar_resnet20_study.md), ITERS iterations per
# block, 1024 calibration images (--seed picks them, and the drop masks), all 10,000 test images.
#   seeds:    W2A4 and W2A2 over SEEDS and DROPS (--prob/--input_prob pairs): QDrop (0.5/0.5), No-Drop
#             (1/1), and QDrop with the block input kept quantized (0.5/1)
#   ablation: which drop costs at W2A2: activations inside the block (prob) or the block input (input_prob)
#   lr:       the activation steps' learning rate
#   EXTRA:    flags added to every run, e.g. EXTRA="--input_drop unquantized"
# Usage: [SEEDS="1 2 3"] [DROPS="0.5/0.5 1/1 0.5/1"] [PARTS="seeds ablation lr"] [EXTRA=...] bash scripts/cifar_drop_study.sh [ITERS] [OUT]
set -euo pipefail
ITERS=${1:-500}
OUT=${2:-outputs/s5}
SEEDS=${SEEDS:-1 2 3}
DROPS=${DROPS:-0.5/0.5 1/1 0.5/1}
PARTS=${PARTS:-seeds ablation lr}
D=${SHARED:-../shared/data}
PY=${PY:-.venv/bin/python}
COMMON="--arch resnet20 --weights $D/cifar10-resnet/resnet20-12fca82f.th --train_dir $D/cifar10/train-subset
  --validation_dir $D/cifar10/test --channel_wise --act_quant --order together --wwq --waq --awq --aaq
  --weight 0.01 --num_samples 1024 --overwrite_output_dir --skip_fp_eval --iters_w $ITERS ${EXTRA:-}"
if [[ " $PARTS " == *" seeds "* ]]; then
  for seed in $SEEDS; do
    for wa in "2 4" "2 2"; do
      set -- $wa
      for pp in $DROPS; do
        IFS=/ read -r p ip <<< "$pp"
        $PY run_imagenet.py $COMMON --n_bits_w $1 --n_bits_a $2 --lr 4e-5 --seed $seed --prob $p --input_prob $ip \
          --output_dir $OUT/seeds/lr4e-5-w$1a$2-p$p$( [[ $ip != "$p" ]] && echo "-ip$ip" )-s$seed
      done
    done
  done
  $PY scripts/summarize.py "$OUT/seeds"
fi
if [[ " $PARTS " == *" ablation "* ]]; then  # which drop: inside the block (prob) or the block's input (input_prob)
  for pp in "0.5 1" "1 0.5" "0.75 0.75"; do
    set -- $pp
    $PY run_imagenet.py $COMMON --n_bits_w 2 --n_bits_a 2 --prob $1 --input_prob $2 --output_dir $OUT/abl/p$1-ip$2
  done
  $PY scripts/summarize.py "$OUT/abl"
fi
if [[ " $PARTS " == *" lr "* ]]; then  # the activation steps' learning rate (LSQ; the method's 4e-5 is set for 20k iterations)
  for lr in 4e-4 2e-3 1e-2; do
    for p in 0.5 1; do
      $PY run_imagenet.py $COMMON --n_bits_w 2 --n_bits_a 2 --lr $lr --prob $p --input_prob $p --output_dir $OUT/actlr$lr-p$p
    done
  done
fi
