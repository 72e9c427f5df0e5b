#!/usr/bin/env bash
# CPU recipe for the shipped default model: data -> `hf-scratch train` (VAE, decoder, CLIP, U-Net) -> emoji-bench ->
# packed pipeline folder.
# About 2.5 hours on a 2-core CPU at 1 thread per stage (the shipped model, see its model card); THREADS=2 (the
# default) is faster where nothing else runs beside it.
# Every training stage resumes from its latest checkpoint when re-run.
#
#   bash training/recipes/emoji32.sh                 # everything, under runs/emoji32
#   STAGES="unet eval pack" bash training/recipes/emoji32.sh
#   SEED=1 RUN=runs/emoji32-s1 STAGES="data vae unet eval" bash training/recipes/emoji32.sh   # a retrain
#
# The U-Net follows the objectives study (docs/study.md): flow matching with logit-normal t and immiscible noise,
# sampled by Euler. The text encoder is the emoji32 v1 one (the judge's text tower) when TEXT_FROM names a pipeline
# folder (the default: the shipped model), so emoji-bench's judge stays `emoji32-judge`; TEXT_FROM="" trains a new
# CLIP (the clip stage) whose text tower conditions the U-Net and which then judges.
#
# The GPU variant is training/recipes/emoji64_gpu.sh (same stages, 64 px, longer).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=${RUN:-runs/emoji32}
RES=${RES:-32}
DATA=${DATA:-$RUN/data}
STAGES=${STAGES:-"data vae decoder clip unet eval pack"}
SEED=${SEED:-0}
VAE_STEPS=${VAE_STEPS:-2400}
DECODER_STEPS=${DECODER_STEPS:-4000}
CLIP_STEPS=${CLIP_STEPS:-300}
UNET_STEPS=${UNET_STEPS:-7200}
# One process with two threads: the U-Net stage's trainer ran at 89.7 samples/s on one thread, 141.4 on two, and
# 134.9 as two DDP processes of one thread each; train_unet.py's --adam_fused and --channels_last were no faster in
# it (BENCHMARKS.md), so the stage runs without them.
THREADS=${THREADS:-2}
PACK_TO=${PACK_TO:-hf_scratch/pretrained/emoji32}
TEXT_FROM=${TEXT_FROM-hf_scratch/pretrained/emoji32}
JUDGE=${JUDGE:-$([ -n "$TEXT_FROM" ] && echo "${PACK_TO}-judge" || echo "$RUN/text")}
NUM_PROMPTS=${NUM_PROMPTS:-128}

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
# Wall time of each stage run, appended to $RUN/timings.tsv (the model card sums them as the training compute).
MACHINE="$THREADS thread(s) per process, $(grep -c ^processor /proc/cpuinfo)-core $(uname -m) CPU"
timed() { local stage=$1; shift; local start=$SECONDS; "$@"; printf '%s\t%s\t%s\n' "$stage" $((SECONDS - start)) "$MACHINE" >> "$RUN/timings.tsv"; }
mkdir -p "$RUN"

if has_stage data && [ ! -f "$DATA/README.md" ]; then
  timed data hf-scratch data emoji --out "$DATA" --resolution "$RES"
fi

# VAE -> decoder -> (CLIP, when TEXT_FROM="") -> U-Net, by `hf-scratch train` at the shipped model's steps; its stage
# folders are $RUN/vae, $RUN/vae-decoder, $RUN/text and $RUN/model, and it resumes each stage when re-run.
# The stages' settings are hf_scratch/training/recipe.py's (stage_flags): f=4 autoencoder (32 px -> 8x8 latents of 8
# channels, L1 + a small KL), its decoder sharpened on L2, and the objectives study's winner for the U-Net (docs/study.md,
# arm A5: flow matching, logit-normal t, immiscible noise) trained for 12x the study's 600 steps.
TRAIN_STAGES=""
for stage in vae decoder unet; do has_stage $stage && TRAIN_STAGES="$TRAIN_STAGES $stage"; done
if has_stage clip && [ -z "$TEXT_FROM" ]; then TRAIN_STAGES="$TRAIN_STAGES text"; fi
if [ -n "$TRAIN_STAGES" ]; then
  timed train hf-scratch train --data "$DATA" --output-dir "$RUN" --resolution "$RES" --seed "$SEED" \
    --threads "$THREADS" ${TEXT_FROM:+--text-encoder "$TEXT_FROM"} --stages $TRAIN_STAGES \
    --steps vae="$VAE_STEPS" decoder="$DECODER_STEPS" text="$CLIP_STEPS" unet="$UNET_STEPS" ${TRAIN_FLAGS:-}
fi

if has_stage eval; then
  # The U-Net run's pipeline samples with its own flow-matching Euler scheduler.
  timed eval python training/evaluate.py --model "$RUN/model" --clip "$JUDGE" --data "$DATA" --out "$RUN/eval" \
    --num_prompts "$NUM_PROMPTS" --num_prompts_samplers 32 --steps 20 --guidance 4.0
fi

if has_stage pack; then
  # COMPARE="LABEL=EVAL_DIR" adds another model's emoji-bench run to the model card's comparison table.
  python training/pack_model.py --pipeline "$RUN/model" --judge "$JUDGE" --eval "$RUN/eval" --out "$PACK_TO" \
    --recipe "bash training/recipes/emoji32.sh" ${COMPARE:+--compare "$COMPARE"}
fi
