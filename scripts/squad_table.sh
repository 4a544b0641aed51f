#!/usr/bin/env bash
# The SQuAD table in README.md: fine-tune a QA head on all-MiniLM-L6-v2 (if not done yet), then FP,
# RTN and QDrop at W8A8, W4A8, W4A4 on the held-out articles.
# Usage: bash scripts/squad_table.sh [ITERS] [OUT]   (each run writes OUT/<name>/results.json)
set -euo pipefail
ITERS=${1:-200}
OUT=${2:-outputs/squad}
PY=${PY:-.venv/bin/python}
EXTRA=${EXTRA:-}  # flags added to every run, e.g. EXTRA="--round_lr 1e-3" (the default before session 4)
M=${MODEL:-outputs/minilm-squad}
[ -f "$M/model.safetensors" ] || $PY scripts/finetune_qa.py --output_dir "$M"
COMMON="--model_name_or_path $M --train_file $M/train.jsonl --validation_file $M/validation.jsonl
  --channel_wise --act_quant --order together --wwq --waq --awq --aaq --num_samples 256 --batch_size 16 --overwrite_output_dir $EXTRA"
for wa in "4 8" "4 4" "8 8"; do
  set -- $wa
  W=$1; A=$2
  $PY run_squad.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w $ITERS --prob 0.5 --input_prob 0.5 --output_dir $OUT/w${W}a${A}-qdrop
  $PY run_squad.py $COMMON --n_bits_w $W --n_bits_a $A --iters_w 0 --skip_fp_eval --output_dir $OUT/w${W}a${A}-rtn
done
$PY scripts/summarize.py "$OUT"
