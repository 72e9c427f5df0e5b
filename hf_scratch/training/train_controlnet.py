"""Train a ControlNet beside a frozen text-to-image pipeline: Zhang, Rao & Agrawala 2023, arXiv:2302.05543.

The pipeline folder's U-Net, VAE and text encoder stay frozen. A `ScratchControlNetModel` is copied from the U-Net's
contracting path (`from_unet`, Sec. 3.1: the trainable copy starts from the locked weights, its zero convolutions at
zero, so step 0 draws exactly the base model) or loaded from --controlnet_model_name_or_path. Each step is the base
model's own objective (read from its scheduler, as a LoRA run does) with the ControlNet's residuals added to the
U-Net's skips and bottleneck (Sec. 3.3's training objective, in the base objective's form rather than only ε):

    c = condition(x),  (r_skips, r_mid) = ControlNet(z_t, t, c_text, c),  loss = objective(U-Net(z_t, t, c_text; r))

The condition c is computed from each training image by `--condition` (`hf_scratch.conditions`: the colour layout),
on the same flipped pixels that are encoded. Captions are dropped with --caption_dropout_prob, 0.5 by default: the
paper replaces half the prompts by "" so that the ControlNet learns to read the condition itself (Sec. 3.3).

The run ends with the ControlNet in --output_dir (config.json and diffusion_pytorch_model.safetensors, as diffusers'
`train_controlnet.py` writes it) and a model card; `ScratchStableDiffusionControlNetPipeline` and diffusers'
`StableDiffusionControlNetPipeline` draw with it.
"""

import argparse
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image

from hf_scratch import conditions
from hf_scratch.models.controlnet import ScratchControlNetModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.pipelines.controlnet import ScratchStableDiffusionControlNetPipeline
from hf_scratch.training.arguments import build_parser, check_args, check_at_least
from hf_scratch.training.cards import describe_objective
from hf_scratch.training.data import EpochBatches, image_grid, load_image_text_dataset, save_validation_grid
from hf_scratch.training.lora import adopt_base_objective
from hf_scratch.training.streaming import load_image_text_stream
from hf_scratch.training.train_unet import (
    add_frozen_component_arguments,
    add_objective_arguments,
    build_objective,
    check_objective_args,
    drop_captions,
    encode_prompts,
    latents_of,
    load_frozen_components,
    merge_prediction_type,
    vae_scale_factor,
)
from hf_scratch.training.trainer import Trainer, create_accelerator, create_optimizer, step_optimizer, with_run_length

# The official condition encoder's widths (16-32-96-256, three halvings for SD's f = 8); a VAE with f = 2^n keeps the
# first n + 1 of them, so the condition image is the training image's size.
CONDITION_ENCODER_CHANNELS = (16, 32, 96, 256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    add_frozen_component_arguments(parser)
    control = parser.add_argument_group("ControlNet")
    control.add_argument(
        "--controlnet_model_name_or_path", help="start from this ControlNet folder (default: a copy of the U-Net)"
    )
    control.add_argument(
        "--condition", choices=conditions.CONDITIONS, default="colour_layout", help="the condition computed per image"
    )
    control.add_argument(
        "--condition_cells", type=int, default=conditions.DEFAULT_CELLS, help="colour_layout: k, the grid is k x k"
    )
    diffusion = add_objective_arguments(parser)
    diffusion.set_defaults(caption_dropout_prob=0.5)
    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_images", nargs="+", default=[], help="images whose conditions are drawn at each validation"
    )
    validation.add_argument(
        "--validation_prompts", nargs="+", default=[], help="one per --validation_images, or one for all"
    )
    validation.add_argument("--num_validation_images", type=int, default=4, help="per condition")
    validation.add_argument("--validation_inference_steps", type=int, default=16, help="sampler steps")
    validation.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance")
    args = parser.parse_args(argv)
    check_args(args)
    merge_prediction_type(args)
    if not args.pretrained_model_name_or_path:
        raise ValueError("a ControlNet trains beside a pipeline's U-Net: pass --pretrained_model_name_or_path")
    adopt_base_objective(args, "a ControlNet")
    check_objective_args(args)
    check_at_least(args, 1, "condition_cells", "num_validation_images", "validation_inference_steps")
    if args.resolution % args.condition_cells:
        raise ValueError(f"--condition_cells={args.condition_cells} must divide --resolution={args.resolution}")
    if args.validation_images and len(args.validation_prompts) not in (1, len(args.validation_images)):
        raise ValueError(
            f"--validation_prompts gives {len(args.validation_prompts)} prompts for {len(args.validation_images)} "
            "--validation_images; give one per image, or one for all"
        )
    if args.validation_prompts and not args.validation_images:
        raise ValueError("--validation_prompts draw with conditions: add --validation_images")
    return args


def build_controlnet(
    args: argparse.Namespace, unet: ScratchUNet2DConditionModel, factor: int
) -> ScratchControlNetModel:
    """The ControlNet to train: loaded, or copied from the U-Net with a condition encoder that halves the condition
    image log2(f) times, to the latent size."""
    if args.controlnet_model_name_or_path:
        controlnet = ScratchControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
    else:
        halvings = int(math.log2(factor))
        if 2**halvings != factor or halvings >= len(CONDITION_ENCODER_CHANNELS):
            raise ValueError(f"the VAE's downsampling factor {factor} is not a power of two up to 8")
        channels = CONDITION_ENCODER_CHANNELS[: halvings + 1]
        controlnet = ScratchControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    return controlnet


@dataclass
class ControlNetStepParts:
    """What one ControlNet training step works on, besides the batch and the flags."""

    controlnet: torch.nn.Module  # prepared by accelerate, trained
    unet: ScratchUNet2DConditionModel  # frozen
    vae: Any  # frozen
    text_encoder: torch.nn.Module  # frozen
    tokenizer: Any
    objective: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    weight_dtype: torch.dtype  # of the frozen weights


def train_step(
    batch: dict[str, Any], parts: ControlNetStepParts, accelerator: Accelerator, args: argparse.Namespace
) -> dict[str, torch.Tensor]:
    """One micro-batch: latents and condition → caption dropout → text embeddings → noise → objective → ControlNet
    residuals → U-Net prediction → loss → backward (into the ControlNet only) → optimizer step."""
    device = accelerator.device
    with accelerator.accumulate(parts.controlnet):
        with torch.no_grad():
            latents = latents_of(batch, parts.vae, device, parts.weight_dtype)
            condition = conditions.colour_layout(batch["pixel_values"].to(device), args.condition_cells)
            captions = drop_captions(batch["caption"], args.caption_dropout_prob)
            encoder_hidden_states = encode_prompts(parts.tokenizer, parts.text_encoder, captions, device)
            noise = parts.objective.noise(latents)
            batch_target = parts.objective(latents, noise)

        skips, bottleneck = parts.controlnet(
            batch_target.model_input, batch_target.timesteps, encoder_hidden_states, controlnet_cond=condition,
            return_dict=False,
        )  # fmt: skip
        prediction = parts.unet(
            batch_target.model_input, batch_target.timesteps, encoder_hidden_states,
            down_block_additional_residuals=skips, mid_block_additional_residual=bottleneck,
        ).sample  # fmt: skip
        loss = parts.objective.loss(prediction, batch_target)
        accelerator.backward(loss)
        step_optimizer(accelerator, parts.controlnet, parts.optimizer, parts.lr_scheduler, args.max_grad_norm, loss)
    return {"loss": loss}


def write_controlnet_card(args: argparse.Namespace, trainer: Trainer, dataset_size: int, scheduler: Any) -> None:
    """README.md beside the ControlNet: the base model, the condition, how to draw with it, the data and the run."""
    compute = trainer.compute_summary()
    cells = f"{args.condition_cells} x {args.condition_cells} cells"
    base = args.pretrained_model_name_or_path
    card = f"""---
library_name: diffusers
base_model: {args.pretrained_model_name_or_path}
tags: [text-to-image, controlnet, hf-scratch]
---

# ControlNet ({args.condition}, {cells}) for `{args.pretrained_model_name_or_path}`

A ControlNet (Zhang et al. 2023, arXiv:2302.05543) trained by `training/train_controlnet.py` of hf-scratch. Its
condition is the image's colour layout (`hf_scratch.conditions.colour_layout_image`).

```python
from PIL import Image
from hf_scratch import ScratchControlNetModel, ScratchStableDiffusionControlNetPipeline
from hf_scratch.conditions import colour_layout_image

controlnet = ScratchControlNetModel.from_pretrained("{args.output_dir}")
pipe = ScratchStableDiffusionControlNetPipeline.from_pretrained("{base}", controlnet=controlnet)
condition = colour_layout_image(Image.open("sketch.png"), {args.resolution}, cells={args.condition_cells})
image = pipe("a prompt", image=condition, guidance_scale={args.guidance_scale}).images[0]
```

## Data
- source: `{args.train_data_dir or args.dataset_name}`, split `{args.train_split}`, {dataset_size} images,
  resolution {args.resolution} px, captions dropped with probability {args.caption_dropout_prob}

## Training
- objective: {describe_objective(args, scheduler)}
- {compute["optimizer_steps"]} optimizer steps of {compute["samples_per_step"]} samples, learning rate
  {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)
- command: `{compute["command"]}`
- {compute["processes"]} process(es) on {compute["device"]}, {compute["samples_per_s"]} samples/s
"""
    Path(args.output_dir, "README.md").write_text(card)


def main(args: argparse.Namespace) -> None:
    accelerator = create_accelerator(args)
    set_seed(args.seed)
    vae, text_encoder, tokenizer = load_frozen_components(args)
    unet = ScratchUNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet")
    objective = build_objective(args)
    scheduler = objective.sampling_scheduler()
    controlnet = build_controlnet(args, unet, vae_scale_factor(vae))
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()

    if args.streaming:
        dataset = batches = load_image_text_stream(args, accelerator)
    else:
        dataset = load_image_text_dataset(args, args.train_split, accelerator, limit=args.max_train_samples)
        batches = EpochBatches(len(dataset), args.train_batch_size, accelerator, args.seed)
    args = with_run_length(args, batches.updates_per_epoch)
    optimizer, lr_scheduler = create_optimizer(args, list(controlnet.parameters()), accelerator)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    trainer = Trainer(accelerator, args, dataset, batches, controlnet, lr_scheduler, name="train_controlnet")
    trainer.resume()
    parts = ControlNetStepParts(
        controlnet, unet, vae, text_encoder, tokenizer, objective, optimizer, lr_scheduler, weight_dtype
    )

    def validate(step: int) -> None:
        layouts = [
            conditions.colour_layout_image(Image.open(path), args.resolution, args.condition_cells)
            for path in args.validation_images
        ]
        prompts = (
            args.validation_prompts * len(layouts) if len(args.validation_prompts) == 1 else args.validation_prompts
        )
        with trainer.ema_weights():
            pipe = ScratchStableDiffusionControlNetPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                controlnet=accelerator.unwrap_model(controlnet),
            )  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            images = pipe(
                prompts or [""] * len(layouts),
                image=layouts,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.guidance_scale,
                num_images_per_prompt=args.num_validation_images,
                generator=torch.Generator().manual_seed(args.seed),
            ).images
        # One row per condition: the layout, then its drawings.
        rows = [[layout] + images[i * args.num_validation_images : (i + 1) * args.num_validation_images]
                for i, layout in enumerate(layouts)]  # fmt: skip
        grid = image_grid([image for row in rows for image in row], columns=args.num_validation_images + 1)
        save_validation_grid(grid, step, args.output_dir, accelerator)

    def save() -> None:
        with trainer.ema_weights():
            accelerator.unwrap_model(controlnet).save_pretrained(args.output_dir)
        write_controlnet_card(args, trainer, len(dataset), scheduler)

    step = functools.partial(train_step, parts=parts, accelerator=accelerator, args=args)
    trainer.run(step, save, validate if args.validation_images else None)


if __name__ == "__main__":
    main(parse_args())
