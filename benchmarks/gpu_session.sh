#!/usr/bin/env bash
# One device call, in stages, each bounded by its own timeout so that one slow stage cannot take
# the others' results with it; every stage writes under $OUT as it goes.
# Usage (device tool, repo root): bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#   gputests   the gpu-marked tests                       alltests   the whole suite on the GPU
#   compare    GPU time of the fused MLP, this tree vs .baseline/src (benchmarks/compare_trees.py)
#   overhead   host cost of each layer of a decode forward (benchmarks/overhead.py)
#   sweep      forward wall/host/GPU per variant over M = 1..8192 (llama3-8b, geglu-article, gpt2)
#   train      forward and forward+backward, peak memory (geglu-article, llama3-8b, the narrow MLP)
#   e2e        Hugging Face models end to end (fusedmlp bench --hf-config ...)
#   gluon      the Gluon Hopper kernels' check and timings
#   moetests   the experts, grouped-kernel, MoE-case and Gluon tests on the GPU
#   moe        fusedmlp bench --moe --train for each of MOE_PRESETS (default qwen3-30b-a3b)
#   moeprofile fusedmlp profile --moe MOE_PROFILE (default qwen3-30b-a3b)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    gputests) timeout 130 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 ;;
    alltests) timeout 280 python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -8 ;;
    compare) timeout 60 python3 benchmarks/compare_trees.py .baseline/src src --out "$OUT/compare.json" ;;
    overhead) timeout 90 python3 benchmarks/overhead.py --out "$OUT/overhead.json" ;;
    sweep)
      timeout 230 python3 -m fusedmlp bench --out "$OUT/fwd" --preset llama3-8b --preset geglu-article \
        --preset gpt2 --tokens 1,16,256,4096,8192 --variants eager,compile,fusedmlp,'compile(fusedmlp)' \
        2>&1 | grep -v "^\s*$" | tail -4 ;;
    train)
      timeout 200 python3 -m fusedmlp bench --out "$OUT/train" --train --preset geglu-article --preset llama3-8b \
        --preset narrow-mlp --variants floor,eager,compile,liger,fusedmlp,'compile(fusedmlp)' 2>&1 | tail -3 ;;
    e2e)
      # E2E_MODELS: which models (default all four), E2E_TIMEOUT: seconds
      models=${E2E_MODELS:-gpt2 bert-base qwen2-0.5b-like llama3-8b-2layers}
      timeout "${E2E_TIMEOUT:-370}" python3 -m fusedmlp bench --out "$OUT/e2e" --train \
        $(for m in $models; do echo --hf-config "$m"; done) 2>&1 | grep -E "^[a-z0-9.-]+ batch|wrote|Error" ;;
    gluon)
      (cd .scratch/gluon && timeout 60 python3 gpu_check.py --quick 2>&1 | tail -25 \
        && OUT=$OUT timeout 120 python3 gpu_check.py 2>&1 | tail -30) ;;
    moetests)
      n=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
      timeout 230 python3 -m pytest -q $n -p no:cacheprovider tests/test_grouped_kernels.py tests/test_experts.py \
        tests/test_moe_cases.py tests/test_gluon_gpu.py tests/test_gluon_dispatch.py 2>&1 | tee "$OUT/pytest-moe.log" | tail -6 ;;
    moe)  # each preset in its own process (fresh memory); MOE_PRESETS, default qwen3-30b-a3b
      for p in ${MOE_PRESETS:-qwen3-30b-a3b}; do
        timeout "${MOE_TIMEOUT:-200}" python3 -m fusedmlp bench --moe "$p" --train --out "$OUT/moe" 2>&1 \
          | grep -E "wrote|rror" ; done ;;
    moeprofile)
      timeout 120 python3 -m fusedmlp profile --moe "${MOE_PROFILE:-qwen3-30b-a3b}" --variants hf,fusedmlp \
        --out "$OUT/moe-profile" 2>&1 | tail -25 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "== done $(date +%T)"
