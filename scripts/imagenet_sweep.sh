#!/usr/bin/env bash
# The reference implementation's config.sh: one runnable run.sh per architecture x bit setting, with the reference implementation's per-arch
# rounding-loss weights (BRECQ's hyper-parameters), written under OUT/w<W>a<A>/<arch>/run.sh.
# Usage: bash scripts/imagenet_sweep.sh DATA_PATH [WEIGHTS_DIR] [OUT]
#   DATA_PATH: ImageNet with train/ and val/; WEIGHTS_DIR: <arch>.pth checkpoints (omit for the
#   built-in default or random weights); then run e.g.  bash OUT/w2a4/resnet18/run.sh
set -euo pipefail
DATA=${1:?usage: imagenet_sweep.sh DATA_PATH [WEIGHTS_DIR] [OUT]}
WEIGHTS=${2:-}
OUT=${3:-outputs/sweep}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
arch=(resnet18 resnet50 mobilenetv2 regnetx_600m regnetx_3200m mnasnet)
weight=(0.01 0.01 0.1 0.01 0.01 0.2)
w_bit=(3 2 2 4)
a_bit=(3 4 2 4)
for i in "${!arch[@]}"; do
  for j in "${!w_bit[@]}"; do
    dir=$OUT/w${w_bit[j]}a${a_bit[j]}/${arch[i]}
    mkdir -p "$dir"
    weights_flag=""
    if [ -n "$WEIGHTS" ]; then weights_flag="--weights $WEIGHTS/${arch[i]}.pth"; fi
    cat > "$dir/run.sh" <<RUN
#!/usr/bin/env bash
cd "$ROOT"
python run_imagenet.py --data_path $DATA $weights_flag \\
  --arch ${arch[i]} --n_bits_w ${w_bit[j]} --channel_wise --n_bits_a ${a_bit[j]} --act_quant --order together --wwq --waq --awq --aaq \\
  --weight ${weight[i]} --input_prob 0.5 --prob 0.5 --output_dir $dir/result "\$@"
RUN
    chmod +x "$dir/run.sh"
    echo "$dir/run.sh"
  done
done
