#!/usr/bin/env bash
# FSDP on GPUs, the part a CPU cannot check (tests/test_fsdp.py checks the plugin, the refusal on CPU and torch's
# fully_shard on our U-Net): training/train_unet.py --fsdp on every visible GPU, under 10 minutes.
#
#   bash training/recipes/fsdp_gpu.sh              # needs 2 or more CUDA GPUs
#   NGPU=4 STEPS=200 bash training/recipes/fsdp_gpu.sh
#
# 1. A small synthetic dataset (coloured shapes, captioned) in $RUN/data, read with --streaming.
# 2. An uninterrupted --fsdp run of $STEPS steps ($RUN/fsdp): the rank reports must say FSDP.
# 3. The same run stopped at $STEPS/2, then resumed from its sharded checkpoint ($RUN/resumed): its losses must equal
#    the uninterrupted ones step for step, and its saved weights too.
# 4. The same run as DDP, without --fsdp ($RUN/ddp): the losses must agree within 2% (other reduction orders).
# 5. The saved pipeline loads with DiffusionPipeline and draws an image.
# It prints one line per check and writes $RUN/summary.json; it exits non-zero on a failed check.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=${RUN:-runs/fsdp_gpu}
BASE=${BASE:-hf_scratch/pretrained/emoji32}  # the frozen VAE, text encoder and tokenizer
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
STEPS=${STEPS:-60}
HALF=$((STEPS / 2))
if [ "$NGPU" -lt 2 ]; then
  echo "fsdp_gpu.sh needs 2 or more GPUs (found $NGPU): FSDP on one process shards nothing, and --fsdp refuses it" >&2
  exit 1
fi
rm -rf "$RUN" && mkdir -p "$RUN"

python - "$RUN/data" <<'EOF'
import json, sys
from pathlib import Path
from PIL import Image, ImageDraw
root = Path(sys.argv[1], "train")
root.mkdir(parents=True)
colours = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 200, 20)}
rows = []
for index in range(1024):
    colour, shape = list(colours)[index % 4], ("circle", "square")[(index // 4) % 2]
    image, offset = Image.new("RGB", (40, 40), "white"), 2 + index % 13
    box = (offset, offset, offset + 24, offset + 24)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=colours[colour])
    image.save(root / f"{index:04d}.png")
    rows.append({"file_name": f"{index:04d}.png", "text": f"a {colour} {shape}"})
(root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
EOF

LAUNCH=(accelerate launch --multi_gpu --num_processes "$NGPU" --num_machines 1 --mixed_precision bf16
        --dynamo_backend no training/train_unet.py)
FLAGS=(--data "$RUN/data" --streaming --validation_split none --pretrained_model_name_or_path "$BASE"
       --resolution 32 --block_out_channels 128 256 512 --layers_per_block 2 --attention_head_dim 8
       --train_batch_size 32 --learning_rate 1e-4 --lr_scheduler constant --checkpointing_steps "$HALF"
       --report_to none --seed 0)

"${LAUNCH[@]}" "${FLAGS[@]}" --fsdp --output_dir "$RUN/fsdp" --max_train_steps "$STEPS"
"${LAUNCH[@]}" "${FLAGS[@]}" --fsdp --output_dir "$RUN/resumed" --max_train_steps "$HALF"
"${LAUNCH[@]}" "${FLAGS[@]}" --fsdp --output_dir "$RUN/resumed" --max_train_steps "$STEPS" \
  --resume_from_checkpoint latest
"${LAUNCH[@]}" "${FLAGS[@]}" --output_dir "$RUN/ddp" --max_train_steps "$STEPS"

python - "$RUN" "$NGPU" <<'EOF'
import json, sys
from pathlib import Path
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

run, world = Path(sys.argv[1]), int(sys.argv[2])
def losses(name):
    rows = [json.loads(line) for line in (run / name / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}
checks = {}
reports = [json.loads(path.read_text()) for path in sorted((run / "fsdp" / "ranks").glob("rank-*.json"))]
checks["every rank ran FSDP"] = len(reports) == world and all(r["distributed_type"] == "FSDP" for r in reports)
checks["resumed losses equal"] = losses("resumed") == losses("fsdp")
weights = [load_file(run / name / "unet" / "diffusion_pytorch_model.safetensors") for name in ("fsdp", "resumed")]
checks["resumed weights equal"] = all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
fsdp, ddp = losses("fsdp"), losses("ddp")
worst = max(abs(fsdp[step] - ddp[step]) / abs(ddp[step]) for step in ddp)
checks["DDP losses within 2%"] = worst <= 0.02
pipe = DiffusionPipeline.from_pretrained(run / "fsdp", trust_remote_code=True).to("cuda")
image = pipe("a red circle", num_inference_steps=10, height=32, width=32).images[0]
image.save(run / "sample.png")
checks["the saved pipeline draws"] = image.size == (32, 32)
for name, passed in checks.items():
    print(f"{'PASS' if passed else 'FAIL'}  {name}")
summary = {"checks": checks, "gpus": world, "worst_relative_loss_gap_to_ddp": worst,
           "fsdp_samples_per_s": json.loads((run / "fsdp" / "train_log.jsonl").read_text().splitlines()[-1])["samples_per_s"]}
(run / "summary.json").write_text(json.dumps(summary, indent=2))
sys.exit(0 if all(checks.values()) else 1)
EOF
