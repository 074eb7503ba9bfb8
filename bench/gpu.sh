#!/usr/bin/env bash
# Everything a GPU session checks and times, in one call on the GPU host
# (about 8-9 minutes on an H100, start and install not counted):
#
#   here, once:   make wheelhouse            (wheelhouse/ is git-ignored; docs/gpu-hosts.md)
#   on the host:  bash bench/gpu.sh          (with wheelhouse/ copied beside it)
#
# 1. bench/kernels.py: the Triton kernels' correctness at real size, their time
#    and memory against the dense loss, the configurations the autotuner chose
#    (OUT/kernels.md; its first calls compile and time every shipped
#    configuration, the timings kept in Triton's cache for step.py);
# 2. bench/step.py: the whole training step, baseline and every lever, batch
#    2048, the loader (OUT/step.md, OUT/step.json; rewritten after each variant).
# Logs of both land in OUT too, so a run cut short still says how far it got.
set -uo pipefail
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ls wheelhouse/*.whl >/dev/null 2>&1 || { echo "no wheelhouse/: build it with 'make wheelhouse' and bring it along"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheelhouse/*.whl \
  && export PYTHONPATH=/tmp/site || { echo "installing wheelhouse/ failed"; exit 1; }
# This checkout's make-dist over the wheelhouse's (as built when `make wheelhouse` last ran), so
# the code timed is the code here; the folder kernels/ installs as make_dist_kernels (pyproject.toml).
rm -rf /tmp/site/make_dist /tmp/site/make_dist_kernels && cp -r make_dist /tmp/site/make_dist \
  && cp -r kernels /tmp/site/make_dist_kernels || { echo "copying this checkout into /tmp/site failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
echo "cores: $(nproc)" | tee -a "$out/gpu.txt"
timeout "${KERNELS_TIMEOUT:-180}" python3 bench/kernels.py --out "$out/kernels.md" 2>&1 | tee "$out/kernels.log"
timeout "${STEP_TIMEOUT:-360}" python3 bench/step.py --out "$out" 2>&1 | tee "$out/step.log"
