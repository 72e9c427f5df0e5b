#!/usr/bin/env bash
# Runs the side-by-side benchmarks on one CUDA GPU in under 10 minutes: fp16, SDPA attention (the default of both
# ours and diffusers), first eager, then with hf_scratch.fast.compile_for_inference (torch.compile, frozen weights).
#
# Needs a Python environment with a CUDA build of torch, diffusers, transformers and this package installed
# (`pip install -e .`); set PY to its interpreter. Writes benchmarks/gpu/{eager,compile}.{md,json}.
#   PY=.venv/bin/python bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/$OUT/inductor-cache}
export HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__)'

COMMON=(--device cuda --dtype float16 --size full --warmup 2 --no-peers)

# 1. Every case, eager (about 2 minutes on an H100).
timeout 240 "$PY" -m benchmarks "${COMMON[@]}" --repeats 10 --no-fast \
  --out "$OUT/eager.md" --json "$OUT/eager.json"

# 2. The compiled variants of the cases it applies to (compiling dominates: about 4-6 minutes on 16 cores).
timeout 330 "$PY" -m benchmarks "${COMMON[@]}" --repeats 10 \
  --cases unet_512 vae_decode_512 pipeline_256 \
  --out "$OUT/compile.md" --json "$OUT/compile.json"

echo "wrote $OUT/eager.md and $OUT/compile.md"
