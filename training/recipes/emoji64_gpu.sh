#!/usr/bin/env bash
# GPU variant of emoji32.sh: the same stages and architecture at 64 px (16x16x4 latents), about 10x the steps.
# Not run in this repository's CI (no GPU there); the model it packs goes to $RUN/packed, not over the shipped one.
set -euo pipefail
cd "$(dirname "$0")/../.."
export RUN=${RUN:-runs/emoji64_gpu} RES=64
export VAE_STEPS=${VAE_STEPS:-20000} CLIP_STEPS=${CLIP_STEPS:-5000} UNET_STEPS=${UNET_STEPS:-60000}
export TRAIN_FLAGS=${TRAIN_FLAGS:-"--device cuda --mixed-precision bf16"}
export PACK_TO=${PACK_TO:-$RUN/packed}
exec bash training/recipes/emoji32.sh
