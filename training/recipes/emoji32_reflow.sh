#!/usr/bin/env bash
# A few-step student of the shipped emoji32 model by reflow (issue #25, item 4).
#
# Reflow (Liu et al. 2022, "Flow Straight and Fast", arXiv:2209.03003, Sec. 2.3): the teacher's ODE maps each noise ε
# to an image latent z_0; a flow trained on these couplings (z_0, ε), on the straight line between them, has straighter
# paths than the teacher and is followed in a few Euler steps. The teacher samples with its default (sampling.json:
# 16 Euler steps, CFG w = 6 while σ > 1), so the student learns the guided endpoints and samples without guidance, at
# one U-Net evaluation per step (guidance distilled into the coupling, as InstaFlow does, arXiv:2309.06380).
#
#   1. pairs: `training/reflow.py`, one (ε, z_0) pair per training caption (10,946), in shards; ~20 min on one thread.
#   2. students, fine-tuned from the teacher's U-Net on the pairs (`train_unet.py --reflow_pairs`), the flow-matching
#      loss with t ~ U(0, 1) (the paper's), no caption dropout (no guidance to train for), batch 64, $STEPS steps:
#      - full: every weight, lr 1e-4 after 50 warm-up steps, EMA 0.999, into $RUN/full;
#      - lora: a rank-$RANK LoRA on every linear and convolution (`--lora_layers all`, as LCM-LoRA adapts the U-Net),
#        lr 5e-4, into $RUN/lora: a file small enough to ship beside the model (2.6 MB in fp16 at rank 16).
#      - full-2: a second leg of $STEPS steps for the full student, from full's (EMA) weights, the same flags (its
#        loss was still falling at the end of the first leg), into $RUN/full-2.
#      STUDENTS="full lora" (the default) trains both, one process of one thread each, side by side; full-2 needs full.
#   3. the sampling study judges them: `python training/sampling_study.py run --methods "reflow ..."`.
#
#   bash training/recipes/emoji32_reflow.sh
#   STUDENTS=lora STEPS=800 bash training/recipes/emoji32_reflow.sh
#   STUDENTS=full-2 bash training/recipes/emoji32_reflow.sh       # after full
#
# Every stage resumes when re-run: the pairs draw only missing shards, each training resumes from its latest
# checkpoint (or skips when finished).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
MAIN=${MAIN:-hf_scratch/pretrained/emoji32}
DATA=${DATA:-/tmp/emoji_eval/data}
RUN=${RUN:-runs/reflow}
STUDENTS=${STUDENTS:-"full lora"}
STEPS=${STEPS:-1600}
RANK=${RANK:-16}
SEED=${SEED:-0}
export OMP_NUM_THREADS=1

[ -f "$DATA/README.md" ] || "$(dirname "$PYTHON")/hf-scratch" data emoji --out "$DATA" --resolution 32
"$PYTHON" training/reflow.py --model "$MAIN" --data "$DATA" --out "$RUN/pairs" --seed "$SEED"

common=(
  --reflow_pairs "$RUN/pairs" --objective flow_matching
  --weighting_scheme uniform --caption_dropout_prob 0 --resolution 32 --train_batch_size 64
  --max_train_steps "$STEPS" --checkpointing_steps 100 --checkpoints_total_limit 2 --resume_from_checkpoint latest
  --report_to none --seed "$SEED"
)
declare -A flags=(
  [full]="--unet_from_pretrained --learning_rate 1e-4 --lr_warmup_steps 50 --lr_scheduler constant_with_warmup --use_ema --ema_decay 0.999"
  [lora]="--lora_rank $RANK --lora_layers all --learning_rate 5e-4 --lr_warmup_steps 50 --lr_scheduler constant_with_warmup"
)
flags[full-2]=${flags[full]}
declare -A start=([full]="$MAIN" [lora]="$MAIN" [full-2]="$RUN/full")  # whose U-Net each student starts from
pids=()
for student in $STUDENTS; do
  # shellcheck disable=SC2086
  "$PYTHON" training/train_unet.py "${common[@]}" --pretrained_model_name_or_path "${start[$student]}" \
    ${flags[$student]} --output_dir "$RUN/$student" \
    > "$RUN/$student.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done   # a failed student fails the recipe (its log says why)
