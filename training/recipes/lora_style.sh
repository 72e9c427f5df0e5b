#!/usr/bin/env bash
# LoRA recipe: teach the shipped model (emoji32) a style it has never seen, "sketch style", from a small local image
# folder, by training rank-8 adapters on its U-Net's attention (training/train_unet.py --lora_rank; Hu et al. 2021).
# About 5 minutes for the default 600 steps on a 2-core CPU (60 samples/s); a re-run resumes from its latest checkpoint.
#
#   bash training/recipes/lora_style.sh                    # builds $RUN/data, then trains $RUN/lora
#   STEPS=20 bash training/recipes/lora_style.sh           # a smoke test
#   DATA=my_images STYLE="watercolour style" bash training/recipes/lora_style.sh
#
# DATA may be any image folder of your own: DATA/train/*.png plus DATA/train/metadata.jsonl with one
# {"file_name": ..., "text": "<what it shows>, <STYLE>"} row per image (a few dozen images are enough for a style).
# Without DATA, the folder is made offline: 64 emoji of the twemoji package redrawn as black line sketches on white.
#
# The result, $RUN/lora/pytorch_lora_weights.safetensors, loads into our pipeline and into diffusers':
#   pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
#   pipe.load_lora_weights("runs/lora_style/lora")
#   pipe("red heart, sketch style", cross_attention_kwargs={"scale": 1.0}).images[0]
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=${RUN:-runs/lora_style}
BASE=${BASE:-hf_scratch/pretrained/emoji32}
DATA=${DATA:-$RUN/data}
STYLE=${STYLE:-sketch style}
RES=${RES:-32}
STEPS=${STEPS:-600}
RANK=${RANK:-8}
THREADS=${THREADS:-1}
LAUNCH=${LAUNCH:-"accelerate launch --num_processes 1 --cpu --num_cpu_threads_per_process $THREADS --mixed_precision no --dynamo_backend no"}
mkdir -p "$RUN"

if [ ! -f "$DATA/train/metadata.jsonl" ]; then
  hf-scratch data emoji --out "$RUN/emoji" --resolution "$RES" --limit 64
  python - "$RUN/emoji/train" "$DATA/train" "$STYLE" <<'EOF'
"""Redraw each twemoji image as a sketch: its edges, black on white, captioned "<CLDR name>, <style>"."""
import json
import sys
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

source, target, style = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
target.mkdir(parents=True, exist_ok=True)
rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()]
kept = []
for row in rows:
    if row["style"] != "twemoji":
        continue
    image = Image.open(source / row["file_name"]).convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("L")
    edges = ImageOps.invert(flat.filter(ImageFilter.FIND_EDGES)).point(lambda v: 255 if v > 200 else 0)
    edges.convert("RGB").save(target / row["file_name"])
    kept.append({"file_name": row["file_name"], "text": row["text"].rsplit(",", 1)[0] + f", {style}"})
(target / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
print(f"{len(kept)} sketches in {target}")
EOF
fi

$LAUNCH training/train_unet.py --pretrained_model_name_or_path "$BASE" --train_data_dir "$DATA" --resolution "$RES" \
  --output_dir "$RUN/lora" --lora_rank "$RANK" --lora_alpha "$RANK" --cache_latents \
  --train_batch_size 16 --learning_rate 1e-3 --lr_scheduler constant_with_warmup --lr_warmup_steps $((STEPS / 20)) \
  --max_train_steps "$STEPS" --caption_dropout_prob 0.1 --checkpointing_steps 100 --checkpoints_total_limit 2 \
  --resume_from_checkpoint latest --report_to tensorboard --validation_steps 200 --validation_inference_steps 20 \
  --validation_prompts "red heart, $STYLE" "grinning face, $STYLE" --num_validation_images 4
