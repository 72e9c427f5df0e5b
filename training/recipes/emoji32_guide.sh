#!/usr/bin/env bash
# The autoguidance guide of the shipped emoji32 model (issue #25).
#
# Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv:2406.02507)
# replaces CFG's unconditional model with a smaller, shorter-trained version of the main model, conditioned the same
# way: v = v_guide + w (v_main - v_guide). Its best guide for EDM2 is "XS, T/16": a smaller network trained for 1/16
# of the main model's steps. This trains that guide for hf_scratch/pretrained/emoji32: its U-Net stage's flags
# (hf_scratch/training/recipe.py, stage_flags "unet" and schedule("unet")) with
#   - --block_out_channels 32 64 64 instead of 64 128 128 (1.90M parameters against the main U-Net's 7.16M, 27%;
#     --attention_head_dim 8, diffusers' name for 8 heads, still divides every level: heads of 4/8/8 channels; the 32
#     GroupNorm groups divide 32 and 64),
#   - 7200 / 16 = 450 steps, the schedule scaled the way `hf-scratch train` scales it: lr 5e-4, cosine, warm-up
#     round(450/36) = 12 steps, a checkpoint every 450 // 24 = 18 steps, the same batch of 64,
#   - the SAME frozen text encoder, tokenizer and VAE as the main model (its pipeline folder's), so the guide sees the
#     same latents and text embeddings and its velocity can be mixed with the main model's,
#   - no --snapshot_steps (the main run's intermediate pipelines are not needed here).
# The EMA keeps --ema_decay 0.999 on purpose: diffusers' EMAModel (no ema warm-up) decays by
# min(0.999, (1 + s) / (10 + s)) at step s, which stays under 0.999 until step ~8990, so in both the 7200-step main run
# and this 450-step run the EMA is the same run-length-relative average (weights ~ (t / s)^8, a power-function EMA of
# relative width ~0.09, as in EDM2); the cap never binds, and the saved (EMA) weights average the same share of the run.
#
# Measured (2-core x86_64 CPU shared with two other training jobs, one thread, OMP_NUM_THREADS=1): 383 s wall in all
# (6.4 min: ~23 s caching the 10946 training latents, 344 s for the 450 steps at 84 samples/s, the rest start-up and
# saving); a re-run of the finished run takes ~20 s. The main U-Net's stage took 82.9 min on two threads.
# Result: training loss 0.75 at the end. On identical (latent, noise, t, caption) draws of the training objective, no
# caption dropout: train split (1024 images) main 0.17 / guide 0.75, validation split (579) main 0.20 / guide 0.76. Its own samples (CFG 1-4) are blotchy, colourful clutter with the
# prompt's colours and only a faint shape, far worse than the main model (a bad version of it, as autoguidance
# wants); the main model autoguided by it (ModelAutoGuidance, w = 2) draws clean emoji.
#
#   bash training/recipes/emoji32_guide.sh                           # -> outputs/guide/unet
#   DATA=runs/emoji32/data bash training/recipes/emoji32_guide.sh    # the data of the main recipe's run
#
# Re-running resumes from the run's latest checkpoint (or skips the training when it finished). The data is an
# `hf-scratch data emoji --resolution 32` folder (train / validation / heldout_style with metadata.jsonl); it is built
# at $DATA when missing. The result, $UNET_OUT, is a plain U-Net folder:
#   ScratchUNet2DConditionModel.from_pretrained("outputs/guide/unet")
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
MAIN=${MAIN:-hf_scratch/pretrained/emoji32}   # the main model: its VAE, text encoder and tokenizer are reused
DATA=${DATA:-/tmp/emoji_eval/data}
RUN=${RUN:-outputs/guide/run}
UNET_OUT=${UNET_OUT:-outputs/guide/unet}
RES=${RES:-32}
SEED=${SEED:-0}
MAIN_STEPS=${MAIN_STEPS:-7200}
STEPS=${STEPS:-$((MAIN_STEPS / 16))}                                             # T/16: 450
WARMUP=${WARMUP:-$("$PYTHON" -c "print(max(1, round($STEPS / 36)))")}             # recipe.py SCHEDULES["unet"]: 12
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-$((STEPS / 24 > 0 ? STEPS / 24 : 1))}     # 18
THREADS=${THREADS:-1}
CHANNELS=${CHANNELS:-"32 64 64"}                                                 # the guide's --block_out_channels
NORM_GROUPS=${NORM_GROUPS:-32}                                                   # must divide every CHANNELS entry

if [ ! -f "$DATA/train/metadata.jsonl" ]; then
  "$(dirname "$PYTHON")/hf-scratch" data emoji --out "$DATA" --resolution "$RES"
fi

export OMP_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES=""
start=$SECONDS
"$PYTHON" training/train_unet.py \
  --dataset_name "$DATA" --resolution "$RES" --report_to none \
  --resume_from_checkpoint latest --checkpoints_total_limit 2 --seed "$SEED" \
  --output_dir "$RUN" --vae_path "$MAIN/vae" \
  --text_encoder_path "$MAIN/text_encoder" --tokenizer_path "$MAIN/tokenizer" \
  --cache_latents --latent_cache_dir "$(dirname "$RUN")/latent-cache" \
  --block_out_channels $CHANNELS --norm_num_groups "$NORM_GROUPS" --layers_per_block 1 \
  --cross_attention_levels 0 1 2 --objective flow_matching \
  --weighting_scheme logit_normal --logit_mean 0 --logit_std 1 --immiscible_noise \
  --caption_dropout_prob 0.1 --use_ema --ema_decay 0.999 \
  --max_train_steps "$STEPS" --train_batch_size 64 \
  --learning_rate 5e-4 --lr_scheduler cosine --lr_warmup_steps "$WARMUP" \
  --checkpointing_steps "$CHECKPOINT_EVERY" --validation_steps "$STEPS" \
  --mixed_precision no
echo "guide training: $((SECONDS - start)) s wall ($THREADS thread(s), $(grep -c ^processor /proc/cpuinfo)-core $(uname -m) CPU)"

# The run's folder is a whole pipeline (the main model's VAE and text encoder with the guide's U-Net); the guide
# itself is its unet/ folder (the EMA weights, fp32).
rm -rf "$UNET_OUT"
cp -r "$RUN/unet" "$UNET_OUT"
echo "guide U-Net: $UNET_OUT"
