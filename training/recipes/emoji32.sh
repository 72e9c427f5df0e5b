#!/usr/bin/env bash
# CPU recipe for the shipped default model: data -> VAE -> CLIP -> U-Net -> emoji-bench -> packed pipeline folder.
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
LATENT_CHANNELS=${LATENT_CHANNELS:-8}
CLIP_STEPS=${CLIP_STEPS:-300}
UNET_STEPS=${UNET_STEPS:-7200}
# One process with two threads: the U-Net stage's trainer ran at 89.7 samples/s on one thread, 141.4 on two, and
# 134.9 as two DDP processes of one thread each; train_unet.py's --adam_fused and --channels_last were no faster in
# it (BENCHMARKS.md), so the stage runs without them.
THREADS=${THREADS:-2}
PACK_TO=${PACK_TO:-hf_scratch/pretrained/emoji32}
TEXT_FROM=${TEXT_FROM-hf_scratch/pretrained/emoji32}
JUDGE=${JUDGE:-$([ -n "$TEXT_FROM" ] && echo "${PACK_TO}-judge" || echo "$RUN/clip")}
NUM_PROMPTS=${NUM_PROMPTS:-128}
LAUNCH=${LAUNCH:-"accelerate launch --num_processes 1 --cpu --num_cpu_threads_per_process $THREADS --mixed_precision no --dynamo_backend no"}
COMMON="--train_data_dir $DATA --resolution $RES --report_to tensorboard --resume_from_checkpoint latest --checkpoints_total_limit 2 --seed $SEED"

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
# Wall time of each stage run, appended to $RUN/timings.tsv (the model card sums them as the training compute).
MACHINE="$THREADS thread(s) per process, $(grep -c ^processor /proc/cpuinfo)-core $(uname -m) CPU"
timed() { local stage=$1; shift; local start=$SECONDS; "$@"; printf '%s\t%s\t%s\n' "$stage" $((SECONDS - start)) "$MACHINE" >> "$RUN/timings.tsv"; }
mkdir -p "$RUN"

if has_stage data && [ ! -f "$DATA/README.md" ]; then
  timed data hf-scratch data emoji --out "$DATA" --resolution "$RES"
fi

if has_stage vae; then
  # f=4 autoencoder: 32 px -> 8x8 latents of $LATENT_CHANNELS channels. 8 and 16 channels reconstructed within 0.2 dB
  # of each other at 1,200 steps (23.7 and 23.9 dB), so the U-Net gets the smaller latent; v1's 4 reached 22.9 dB.
  # L1 + a small KL; scaling_factor is set from the latents' std at the end.
  timed vae $LAUNCH training/train_vae.py $COMMON --output_dir "$RUN/vae" \
    --block_out_channels 32 64 64 --layers_per_block 1 --latent_channels "$LATENT_CHANNELS" \
    --train_batch_size 32 --learning_rate 2e-3 --lr_scheduler cosine --lr_warmup_steps 100 \
    --max_train_steps "$VAE_STEPS" --kl_weight 1e-6 --checkpointing_steps 300 --validation_steps 600
fi

if has_stage decoder; then
  # The decoder alone, sharpened on the L2 loss that PSNR measures (encoder, quant_conv and scaling_factor kept, so the
  # latents, and the U-Net trained on them, stay the same): 25.9 -> 28.2 dB on validation for the shipped model.
  timed decoder $LAUNCH training/train_vae.py $COMMON --output_dir "$RUN/vae-decoder" \
    --pretrained_vae "$RUN/vae" --train_decoder_only --reconstruction_loss l2 \
    --train_batch_size 32 --learning_rate 5e-4 --lr_scheduler cosine --lr_warmup_steps 100 \
    --max_train_steps "$DECODER_STEPS" --checkpointing_steps 500 --validation_steps 1000
fi

if has_stage clip && [ -z "$TEXT_FROM" ]; then
  # CLIP trained on `train` alone: its text tower conditions the U-Net, the whole model judges emoji-bench.
  timed clip $LAUNCH training/train_clip.py $COMMON --output_dir "$RUN/clip" \
    --vocab_size 4096 --max_length 32 --text_hidden_size 192 --text_layers 4 --text_heads 4 \
    --vision_hidden_size 192 --vision_layers 4 --vision_heads 4 --patch_size 4 --projection_dim 192 \
    --train_batch_size 128 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 \
    --max_train_steps "$CLIP_STEPS" --checkpointing_steps 100 --validation_steps 250
fi

if has_stage unet; then
  if [ -n "$TEXT_FROM" ]; then
    TEXT="--text_encoder_path $TEXT_FROM/text_encoder --tokenizer_path $TEXT_FROM/tokenizer"
  else
    TEXT="--text_encoder_path $RUN/clip/text_encoder --tokenizer_path $RUN/clip/tokenizer"
  fi
  # The objectives study's winner (docs/study.md, arm A5), trained for 12x the study's 600 steps (v3 had 6x).
  timed unet $LAUNCH training/train_unet.py $COMMON --output_dir "$RUN/unet" --vae_path "$RUN/vae-decoder" $TEXT \
    --cache_latents --block_out_channels 64 128 128 --layers_per_block 1 --cross_attention_levels 0 1 2 \
    --objective flow_matching --weighting_scheme logit_normal --logit_mean 0 --logit_std 1 --immiscible_noise \
    --train_batch_size 64 --learning_rate 5e-4 --lr_scheduler cosine --lr_warmup_steps 200 \
    --max_train_steps "$UNET_STEPS" --caption_dropout_prob 0.1 --use_ema --ema_decay 0.999 \
    --checkpointing_steps 300 --validation_steps 100000 --snapshot_steps $((UNET_STEPS / 3)) $((2 * UNET_STEPS / 3))
fi

if has_stage eval; then
  # The U-Net run's pipeline samples with its own flow-matching Euler scheduler.
  timed eval python training/evaluate.py --model "$RUN/unet" --clip "$JUDGE" --data "$DATA" --out "$RUN/eval" \
    --num_prompts "$NUM_PROMPTS" --num_prompts_samplers 32 --steps 20 --guidance 4.0
fi

if has_stage pack; then
  # COMPARE="LABEL=EVAL_DIR" adds another model's emoji-bench run to the model card's comparison table.
  python training/pack_model.py --pipeline "$RUN/unet" --judge "$JUDGE" --eval "$RUN/eval" --out "$PACK_TO" \
    --recipe "bash training/recipes/emoji32.sh" ${COMPARE:+--compare "$COMPARE"}
fi
