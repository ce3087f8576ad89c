#!/bin/bash
# 2-process (gloo, 1 thread each) vs 1 process (2 threads): same global batch, same steps.
cd "$(dirname "$0")/.." && . .venv/bin/activate
DATA=${CAPSNET_DATA:-../shared/data}
rm -rf /tmp/ddp; mkdir -p /tmp/ddp
for model in quickstart matrix; do
  if [ $model = quickstart ]; then args="--recipe quickstart --limit-train-batches 80"; else args="--model matrix_capsnet --model-kwarg preset=\"small\" --batch-size 32 --lr 3e-3 --limit-train-batches 200"; fi
  common="--data-root $DATA --epochs 1 --no-progress --log-every 20 --limit-eval-batches 2 --no-plot"
  echo "== $model 1 process, 2 threads"
  /usr/bin/time -f "%e s wall" capsnet train $args $common --num-threads 2 --output-dir /tmp/ddp/${model}_1 2>&1 | grep -E "img/s|wall"
  echo "== $model 2 processes x 1 thread (torchrun, gloo)"
  /usr/bin/time -f "%e s wall" torchrun --standalone --nproc-per-node 2 -m capsnet train $args $common --num-threads 1 --output-dir /tmp/ddp/${model}_2 2>&1 | grep -E "img/s|wall"
  for r in 1 2; do python - <<PY
import json, statistics
rows=[json.loads(l) for l in open("/tmp/ddp/${model}_$r/metrics.jsonl") if '"kind": "train"' in l]
ips=[r["images_per_s"] for r in rows[1:]]
print("${model}_$r", "train rows", len(rows), "median images/s after the first log interval:", statistics.median(ips) if ips else None)
PY
  done
done
