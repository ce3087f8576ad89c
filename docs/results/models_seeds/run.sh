#!/usr/bin/env bash
# "The models" re-run: 3 seeds, validation-selected checkpoints, pooled intervals.
set -euo pipefail
O=${1:-runs/models_seeds}; mkdir -p $O
T="--num-threads 2 --no-progress --no-plot --no-tensorboard"
(uptime; git rev-parse HEAD; lscpu | grep "Model name") > $O/start.txt
for ds in mnist fashion_mnist; do
  root=/work/shared/data; [ $ds = fashion_mnist ] && root=/usr/share/datasets
  for s in 0 1 2; do
    [ -f $O/$ds-capsnet-$s/evaluation.json ] || capsnet train --recipe quickstart --dataset $ds --data-root $root --seed $s $T --output-dir $O/$ds-capsnet-$s
    [ -f $O/$ds-cnn-$s/evaluation.json ] || capsnet train --model hinton_cnn --dataset $ds --data-root $root --epochs 2 --seed $s $T --output-dir $O/$ds-cnn-$s
  done
  capsnet experiment seeds $O/$ds-capsnet-{0,1,2} --baseline $O/$ds-cnn-{0,1,2} --no-progress --output-dir $O/seeds-$ds-capsnet
  uptime >> $O/start.txt
done
# (a third block, the small matrix capsnet for 1 epoch x 3 seeds, was stopped unrun)
echo done >> $O/start.txt
