"""Model cards of the U-Net trainer's results: the README.md of a pipeline folder or of a LoRA file, saying how to
load it, the data, the objective, the run and its compute."""

import argparse
from pathlib import Path
from typing import Any

from hf_scratch.training.lora import LORA_WEIGHTS
from hf_scratch.training.trainer import Trainer


def describe_objective(args: argparse.Namespace, scheduler: Any) -> str:
    """One line of the model card naming the objective and its settings."""
    extras = f"immiscible noise {args.immiscible_noise}, loss {args.loss_type}" + (
        f" ({args.huber_schedule} schedule, c_0 {args.huber_c})" if args.loss_type == "huber" else ""
    )
    if args.objective == "edm":
        return (
            f"EDM (Karras et al. 2022), σ_data {args.sigma_data}, ln σ ~ N({args.edm_p_mean}, {args.edm_p_std}²), "
            f"{extras}"
        )
    if args.objective == "flow_matching":
        return f"flow matching (rectified flow), t ~ {args.weighting_scheme}, {extras}"
    return (
        f"{scheduler.config.prediction_type}, {scheduler.config.num_train_timesteps} timesteps, "
        f"β schedule {scheduler.config.beta_schedule}, zero terminal SNR {scheduler.config.rescale_betas_zero_snr}, "
        f"min-SNR γ {args.snr_gamma}, noise offset {args.noise_offset}, {extras}"
    )


def write_model_card(
    args: argparse.Namespace, trainer: Trainer, dataset_size: int, skipped: int, scheduler: Any
) -> None:
    """README.md of the pipeline folder: how to load it, the data, the objective, the run and its compute."""
    compute = trainer.compute_summary()
    source = args.train_data_dir or args.dataset_name or getattr(args, "reflow_pairs", None)
    origin = f"fine-tuned from `{args.pretrained_model_name_or_path}`" if args.unet_from_pretrained else "from scratch"
    card = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [text-to-image, latent-diffusion, hf-scratch]
---

# hf-scratch latent diffusion model

A U-Net trained {origin} by `training/train_unet.py` of hf-scratch, in the latent space of a frozen VAE and
conditioned on a frozen CLIP text encoder.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{args.output_dir}", trust_remote_code=True)
image = pipe("{(args.validation_prompts or ["a prompt"])[0]}", guidance_scale={args.guidance_scale}).images[0]
```

## Data
- source: `{source}`, split `{args.train_split}`, {dataset_size} images ({skipped} skipped because they do not decode)
- resolution {args.resolution} px, captions from column `{args.caption_column}`, dropped with probability
  {args.caption_dropout_prob} for classifier-free guidance

## Training
- objective: {describe_objective(args, scheduler)}
- sampler saved with the model: `{type(scheduler).__name__}`
- {compute["optimizer_steps"]} optimizer steps of {compute["samples_per_step"]} samples, learning rate
  {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps), EMA {args.use_ema}
- command: `{compute["command"]}`

## Compute
- {compute["processes"]} process(es) on {compute["device"]}
- {compute["samples_per_s"]} samples/s; {compute["wall_seconds_this_session"]} s of wall time in the last session

## Limitations
A small model trained briefly on a small dataset: expect rough images, and only for prompts like its captions.
"""
    (Path(args.output_dir) / "README.md").write_text(card)


def write_lora_model_card(
    args: argparse.Namespace, trainer: Trainer, dataset_size: int, skipped: int, scheduler: Any
) -> None:
    """README.md next to the LoRA file: the base model, the adapters, how to load them, the data and the run."""
    compute = trainer.compute_summary()
    alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
    adapted = "the U-Net's attention projections" + (" and the text encoder's" if args.train_text_encoder_lora else "")
    prompt = (args.validation_prompts or ["a prompt"])[0]
    card = f"""---
library_name: diffusers
base_model: {args.pretrained_model_name_or_path}
tags: [text-to-image, lora, hf-scratch]
---

# LoRA for `{args.pretrained_model_name_or_path}`

Low-rank adapters (Hu et al. 2021, arXiv:2106.09685) of rank r = {args.lora_rank} and α = {alpha} on {adapted}, trained
by `training/train_unet.py --lora_rank` of hf-scratch: each adapted weight becomes W' = W + (α/r)·B·A.

```python
from hf_scratch import ScratchStableDiffusionPipeline

pipe = ScratchStableDiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")
pipe.load_lora_weights("{args.output_dir}")
image = pipe("{prompt}", guidance_scale={args.guidance_scale}, cross_attention_kwargs={{"scale": 1.0}}).images[0]
```

diffusers' `StableDiffusionPipeline.load_lora_weights` reads the same `{LORA_WEIGHTS}`.

## Data
- source: `{args.train_data_dir or args.dataset_name}`, split `{args.train_split}`, {dataset_size} images
  ({skipped} skipped because they do not decode), resolution {args.resolution} px, captions from column
  `{args.caption_column}`

## Training
- objective: {describe_objective(args, scheduler)}
- {compute["optimizer_steps"]} optimizer steps of {compute["samples_per_step"]} samples, learning rate
  {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)
- command: `{compute["command"]}`
- {compute["processes"]} process(es) on {compute["device"]}, {compute["samples_per_s"]} samples/s
"""
    (Path(args.output_dir) / "README.md").write_text(card)
