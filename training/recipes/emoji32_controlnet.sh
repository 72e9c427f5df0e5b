#!/usr/bin/env bash
# A ControlNet for the shipped emoji32 model whose condition is the emoji's colour layout (issue #26, item 5).
#
# ControlNet (Zhang et al. 2023, arXiv:2302.05543): a trainable copy of the U-Net's contracting path, fed the condition
# image, adds zero-initialised residuals to the frozen U-Net's skips. The condition here is the 8 x 8 colour layout of
# each 32 px emoji (`hf_scratch.conditions`: every 4 x 4 cell filled with its mean colour), which a person can also
# paint by hand (the demo's ControlNet tab).
#
#   1. train: `training/train_controlnet.py` from the shipped model's U-Net, on the emoji train split, the base model's
#      objective (flow matching), half the captions dropped (the paper's 50 %), batch 64, lr 1e-4, EMA 0.999, $STEPS
#      steps; one thread, about 70 samples/s here (so ~55 minutes for 3,600 steps).
#   2. eval: `training/evaluate_controlnet.py` draws each of $NUM_EVAL held-out (validation) emoji from its caption and
#      its own layout, and from its caption and another emoji's layout, and reports how often the image is closer to
#      the layout it was given (docs/controlnet.json, docs/controlnet_grid.png, docs/controlnet_loss.png).
#   3. pack: the EMA ControlNet in float16 into hf_scratch/pretrained/emoji32-controlnet (the demo's tab loads it).
#
#   bash training/recipes/emoji32_controlnet.sh
#   STAGES="eval" bash training/recipes/emoji32_controlnet.sh
#
# Training resumes from its latest checkpoint when re-run, and skips when finished.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
MAIN=${MAIN:-hf_scratch/pretrained/emoji32}
DATA=${DATA:-/tmp/emoji_eval/data}
RUN=${RUN:-runs/controlnet}
STAGES=${STAGES:-"train eval pack"}
STEPS=${STEPS:-3600}
NUM_EVAL=${NUM_EVAL:-256}
PACK_TO=${PACK_TO:-hf_scratch/pretrained/emoji32-controlnet}
SEED=${SEED:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

[ -f "$DATA/README.md" ] || "$(dirname "$PYTHON")/hf-scratch" data emoji --out "$DATA" --resolution 32

if has_stage train; then
  # Four held-out emoji drawn at each validation, from their captions and layouts.
  mapfile -t rows < <("$PYTHON" - "$DATA/validation" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metadata.jsonl")]
for row in rows[::150][:4]:
    print(f"{sys.argv[1]}/{row['file_name']}\t{row['text']}")
EOF
)
  images=(); prompts=()
  for row in "${rows[@]}"; do images+=("${row%%$'\t'*}"); prompts+=("${row#*$'\t'}"); done
  "$PYTHON" training/train_controlnet.py --pretrained_model_name_or_path "$MAIN" --train_data_dir "$DATA" \
    --resolution 32 --train_batch_size 64 --max_train_steps "$STEPS" --learning_rate 1e-4 --lr_warmup_steps 100 \
    --lr_scheduler constant_with_warmup --use_ema --ema_decay 0.999 --checkpointing_steps 200 \
    --checkpoints_total_limit 2 --resume_from_checkpoint latest --report_to none --seed "$SEED" \
    --validation_images "${images[@]}" --validation_prompts "${prompts[@]}" --validation_steps 600 \
    --num_validation_images 2 --output_dir "$RUN"
fi

if has_stage eval; then
  "$PYTHON" training/evaluate_controlnet.py --model "$MAIN" --controlnet "$RUN" --data "$DATA" \
    --num_prompts "$NUM_EVAL" --seed "$SEED" --out docs
fi

if has_stage pack; then
  "$PYTHON" - "$RUN" "$PACK_TO" docs/controlnet.json <<'EOF'
import json, sys, torch
from pathlib import Path
from hf_scratch import ScratchControlNetModel
run, pack_to, figures = sys.argv[1:]
ScratchControlNetModel.from_pretrained(run).to(torch.float16).save_pretrained(pack_to)
card = Path(run, "README.md").read_text().replace(f'"{run}"', "default_controlnet_path()")
card = card.replace("from hf_scratch.conditions", "from hf_scratch.pretrained import default_controlnet_path\nfrom hf_scratch.conditions")
if Path(figures).is_file():
    r = json.loads(Path(figures).read_text())
    n = r["settings"]["num_prompts"]
    line = lambda name: f"{100 * r[name]['rate']:.1f} % ± {100 * r[name]['standard_error']:.1f} %"
    card += (f"\n## Measured (training/evaluate_controlnet.py, {n} held-out emoji)\n"
             f"- drawn from its caption and its own layout, closer to that layout than to another emoji's: {line('own_layout')}"
             f" (the caption alone: {line('no_control')})\n"
             f"- drawn from its caption and another emoji's layout, closer to the layout given: {line('swapped_layout')}\n")
Path(pack_to, "README.md").write_text(card)
EOF
fi
