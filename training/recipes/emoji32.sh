#!/usr/bin/env bash
# CPU recipe for the shipped default model: data -> VAE -> CLIP -> U-Net -> emoji-bench -> packed pipeline folder.
# About 80 minutes on a 2-core CPU (the shipped model: 1 thread per stage, see its model card).
# Every training stage resumes from its latest checkpoint when re-run.
#
#   bash training/recipes/emoji32.sh                 # everything, under runs/emoji32
#   STAGES="unet eval pack" bash training/recipes/emoji32.sh
#
# The GPU variant is training/recipes/emoji64_gpu.sh (same stages, 64 px, longer).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=${RUN:-runs/emoji32}
RES=${RES:-32}
DATA=${DATA:-$RUN/data}
STAGES=${STAGES:-"data vae clip unet eval pack"}
VAE_STEPS=${VAE_STEPS:-1800}
CLIP_STEPS=${CLIP_STEPS:-300}
UNET_STEPS=${UNET_STEPS:-3000}
THREADS=${THREADS:-2}
PACK_TO=${PACK_TO:-hf_scratch/pretrained/emoji32}
LAUNCH=${LAUNCH:-"accelerate launch --num_processes 1 --cpu --num_cpu_threads_per_process $THREADS --mixed_precision no --dynamo_backend no"}
COMMON="--train_data_dir $DATA --resolution $RES --report_to tensorboard --resume_from_checkpoint latest --checkpoints_total_limit 2"

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
# Wall time of each stage run, appended to $RUN/timings.tsv (the model card sums them as the training compute).
MACHINE="$THREADS thread(s) per process, $(grep -c ^processor /proc/cpuinfo)-core $(uname -m) CPU"
timed() { local stage=$1; shift; local start=$SECONDS; "$@"; printf '%s\t%s\t%s\n' "$stage" $((SECONDS - start)) "$MACHINE" >> "$RUN/timings.tsv"; }
mkdir -p "$RUN"

if has_stage data && [ ! -f "$DATA/README.md" ]; then
  timed data hf-scratch data emoji --out "$DATA" --resolution "$RES"
fi

if has_stage vae; then
  # f=4 autoencoder: 32 px -> 8x8x4 latents. L1 + a small KL; scaling_factor is set from the latents' std at the end.
  timed vae $LAUNCH training/train_vae.py $COMMON --output_dir "$RUN/vae" \
    --block_out_channels 32 64 64 --layers_per_block 1 --latent_channels 4 \
    --train_batch_size 32 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 100 \
    --max_train_steps "$VAE_STEPS" --kl_weight 1e-6 --checkpointing_steps 300 --validation_steps 600
fi

if has_stage clip; then
  # CLIP trained on `train` alone: its text tower conditions the U-Net, the whole model judges emoji-bench.
  timed clip $LAUNCH training/train_clip.py $COMMON --output_dir "$RUN/clip" \
    --vocab_size 4096 --max_length 32 --text_hidden_size 192 --text_layers 4 --text_heads 4 \
    --vision_hidden_size 192 --vision_layers 4 --vision_heads 4 --patch_size 4 --projection_dim 192 \
    --train_batch_size 128 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 \
    --max_train_steps "$CLIP_STEPS" --checkpointing_steps 100 --validation_steps 250
fi

if has_stage unet; then
  timed unet $LAUNCH training/train_unet.py $COMMON --output_dir "$RUN/unet" \
    --vae_path "$RUN/vae" --text_encoder_path "$RUN/clip/text_encoder" --tokenizer_path "$RUN/clip/tokenizer" \
    --cache_latents --block_out_channels 64 128 128 --layers_per_block 1 --cross_attention_levels 0 1 2 \
    --train_batch_size 64 --learning_rate 5e-4 --lr_scheduler cosine --lr_warmup_steps 200 \
    --max_train_steps "$UNET_STEPS" --snr_gamma 5 --caption_dropout_prob 0.1 --use_ema --ema_decay 0.999 \
    --checkpointing_steps 500 --validation_steps 2000 --validation_inference_steps 20 \
    --validation_prompts "red heart, twemoji style" "grinning face, openmoji style" "dog face, noto style"
fi

if has_stage eval; then
  # The U-Net run saves its DDPM training schedule; the shipped pipeline samples with DPM-Solver++ on the same βs.
  python -c 'import sys; from hf_scratch import ScratchStableDiffusionPipeline as P; from hf_scratch.schedulers import make_scheduler
pipe = P.from_pretrained(sys.argv[1]); pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
pipe.save_pretrained(sys.argv[2])' "$RUN/unet" "$RUN/pipeline"
  timed eval python training/evaluate.py --model "$RUN/pipeline" --clip "$RUN/clip" --data "$DATA" --out "$RUN/eval" \
    --num_prompts 64 --num_prompts_samplers 16 --steps 20 --guidance 4.0
fi

if has_stage pack; then
  python training/pack_model.py --pipeline "$RUN/pipeline" --judge "$RUN/clip" --eval "$RUN/eval" --out "$PACK_TO" \
    --recipe "bash training/recipes/emoji32.sh"
fi
