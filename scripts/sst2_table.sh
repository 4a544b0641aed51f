#!/usr/bin/env bash
# The SST-2 table in README.md: FP, RTN, No-Drop and QDrop at W8A8, W4A8, W4A4, W2A4 on MiniLM-L6-SST2.
# Usage: bash scripts/sst2_table.sh [ITERS] [OUT]   (each run writes OUT/<name>/results.json)
set -euo pipefail
ITERS=${1:-200}
OUT=${2:-outputs/sst2}
D=${SHARED:-../shared/data}
PY=${PY:-.venv/bin/python}
EXTRA=${EXTRA:-}  # flags added to every run, e.g. EXTRA="--round_lr 1e-3" (the default before session 4)
COMMON="--model_name_or_path $D/models/minilm-l6-sst2 --train_file $D/glue/sst2/train.tsv
  --validation_file $D/glue/sst2/validation.tsv --channel_wise --act_quant --order together --wwq --waq --awq --aaq
  --num_samples 256 --batch_size 32 --overwrite_output_dir $EXTRA"
for wa in "4 8" "4 4" "2 4" "8 8"; do
  set -- $wa
  W=$1; A=$2
  $PY run_glue.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w $ITERS --prob 0.5 --input_prob 0.5 --output_dir $OUT/w${W}a${A}-qdrop
  $PY run_glue.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w 0 --output_dir $OUT/w${W}a${A}-rtn
  $PY run_glue.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w $ITERS --prob 1 --input_prob 1 --output_dir $OUT/w${W}a${A}-nodrop
done
$PY scripts/summarize.py "$OUT"
