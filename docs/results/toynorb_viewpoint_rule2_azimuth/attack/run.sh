#!/bin/bash
# White-box attacks on the matched ToyNORB azimuth pair (docs/results/toynorb_viewpoint_rule2_azimuth), 3 seeds.
cd /work/wt
echo "start $(date -Is) load $(cat /proc/loadavg) commit $(git rev-parse --short HEAD) dirty $(git status --porcelain | wc -l)"
PYTHONPATH=/work/wt/src /work/main/.venv/bin/python -m capsnet experiment attack --matched /tmp/vp_az2/out/viewpoint_azimuth.json \
  --epsilons 0 0.01 0.02 --max-examples 200 --num-threads ${THREADS:-2} --no-progress --device cpu \
  --output-dir /work/runs_1208/atk/out
echo "end $(date -Is) rc $? load $(cat /proc/loadavg)"
