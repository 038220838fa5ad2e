#!/usr/bin/env bash
# One device call: environment, the test suite on the GPU, then the benchmark.
# Usage (device tool, repo root): bash benchmarks/gpu_session.sh [pytest|bench|all] [bench args...]
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
if [[ $what == pytest || $what == all ]]; then
  timeout 300 python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  python3 -m fusedmlp bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
fi
