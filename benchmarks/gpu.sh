#!/bin/bash
# The GPU benchmark (issue 15): about 3-5 minutes on one GPU. Run from anywhere:
#   bash benchmarks/gpu.sh            # PYTHON=/path/to/python to choose the interpreter
# 1. the smoke cases on the GPU (capsnet vs the reference agree there, TF32 off);
# 2. the GPU cases vs the reference (benchmarks/cases.py:gpu_cases): time, GPU peak memory
#    -> benchmarks/results_gpu.json and the "GPU" block of benchmarks/RESULTS.md;
# 3. every model's training / inference images/s -> benchmarks/models_throughput_gpu.md.
# Targets (RESULTS.md, "GPU"): matrix capsnet small >= 5,000 and paper size >= 1,000
# training images/s at batch 64; CapsNet >= 3x the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
echo "== smoke on $DEVICE"
timeout 120 "$PY" benchmarks/run.py --smoke --device "$DEVICE"
echo "== GPU cases vs the reference ($SECONDS s so far)"
timeout 300 "$PY" benchmarks/run.py --device "$DEVICE" --budget 10 --timeout 150
echo "== every model's images/s ($SECONDS s so far)"
timeout 120 "$PY" benchmarks/models_throughput.py --device "$DEVICE" --steps 10 \
  | tee benchmarks/models_throughput_gpu.md
echo "gpu.sh: done in $SECONDS s; results in benchmarks/results_gpu.json, benchmarks/RESULTS.md (GPU block), benchmarks/models_throughput_gpu.md"
