"""LoRA for the U-Net trainer (Hu et al. 2021, arXiv:2106.09685): the flags a LoRA run accepts, the adapters peft
injects, and the adapter file in diffusers' layout.

Each adapted projection W (`to_q`, `to_k`, `to_v`, `to_out.0`, or every layer with `--lora_layers all`; the text
encoder's `q_proj`, `k_proj`, `v_proj`, `out_proj`) becomes W' = W + (α/r)·B·A, with A Gaussian and B zero at the
start, so training starts from the base model.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from hf_scratch.models.layers import process_umask
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers import scheduler_family

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' `load_lora_weights` looks for
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# --lora_layers all: every linear and convolution of the U-Net (the ResNets, the transformer blocks' projections and
# feed-forwards, the time embedding, the resamplers), as the few-step LoRAs of Luo et al. 2023 (LCM-LoRA,
# arXiv:2311.05556) adapt it.
UNET_LORA_LAYERS = {
    "attention": UNET_LORA_TARGETS,
    "all": UNET_LORA_TARGETS + [
        "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
        "conv", "conv_in", "conv_out", "linear_1", "linear_2",
    ],
}  # fmt: skip
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def base_objective(pipeline_folder: str) -> str | None:
    """The objective the pipeline folder's U-Net was trained with, read from its scheduler (None without one)."""
    config_file = Path(pipeline_folder, "scheduler", "scheduler_config.json")
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    family = scheduler_family(config)
    if family == "ddpm":
        return config.get("prediction_type", "epsilon")
    return {"flow": "flow_matching", "edm": "edm"}[family]


def check_lora_args(args: argparse.Namespace) -> None:
    """Refuse flags that a LoRA run cannot honour, naming them; adopt the base model's U-Net and objective."""
    if args.lora_rank < 1:
        raise ValueError(f"--lora_rank={args.lora_rank} must be at least 1 (4 to 64 are usual)")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha={args.lora_alpha} must be positive (it scales B·A by α/r; default r)")
    if not args.pretrained_model_name_or_path:
        raise ValueError("--lora_rank adapts a pipeline's U-Net: pass --pretrained_model_name_or_path (its folder)")
    for flag, reason in (
        ("unet_config", "it builds a new U-Net, while a LoRA adapts the pipeline folder's"),
        ("use_ema", "the EMA averages the whole U-Net, not the adapters"),
        ("rescale_betas_zero_snr", "the base model keeps the noise schedule it was trained with"),
    ):
        if getattr(args, flag):
            raise ValueError(f"--{flag} cannot be combined with --lora_rank: {reason}; drop --{flag}")
    adopt_base_objective(args, "a LoRA")
    args.unet_from_pretrained = True


def adopt_base_objective(args: argparse.Namespace, run: str) -> None:
    """A run that trains beside a frozen base U-Net (`run`: "a LoRA", "a ControlNet") keeps the objective it was
    trained with: set args.objective to it, refusing a different --objective by name."""
    base = base_objective(args.pretrained_model_name_or_path)
    if args.objective and base and args.objective != base:
        raise ValueError(
            f"--objective {args.objective} differs from the objective of the base model in "
            f"{args.pretrained_model_name_or_path} ({base}, from its scheduler); {run} must keep it: drop --objective"
        )
    args.objective = args.objective or base


def add_lora_adapters(args: argparse.Namespace, unet: ScratchUNet2DConditionModel, text_encoder: Any) -> None:
    """Freeze the U-Net (and text encoder) and give their attention projections trainable LoRA adapters.

    peft initialises A with Gaussian entries and B = 0, so W' = W at step 0. The U-Net takes diffusers' `add_adapter`;
    the text encoder takes peft's `inject_adapter_in_model`, what transformers' `add_adapter` calls (and which, unlike
    it, does not require peft >= 0.22)."""
    alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
    unet.requires_grad_(False)
    targets = UNET_LORA_LAYERS[args.lora_layers or "attention"]
    unet.add_adapter(
        LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    )
    if args.train_text_encoder_lora:
        config = LoraConfig(
            r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS
        )
        inject_adapter_in_model(config, text_encoder, adapter_name="default")
        text_encoder.train()


def save_lora_weights(folder: Path, unet: ScratchUNet2DConditionModel, text_encoder: Any | None) -> Path:
    """Write the adapters to `folder/pytorch_lora_weights.safetensors` as diffusers' training scripts do (keys
    `unet.…` and `text_encoder.…`, with each adapter's LoraConfig, α included, as metadata), atomically: to a temporary
    name first, then renamed, readable as the umask allows."""
    folder.mkdir(parents=True, exist_ok=True)
    layers, metadata = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}, {}
    metadata["unet_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()
    if text_encoder is not None:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        metadata["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    staging = f".{LORA_WEIGHTS}.partial"
    ScratchStableDiffusionPipeline.save_lora_weights(folder, weight_name=staging, **layers, **metadata)
    os.chmod(folder / staging, 0o666 & ~process_umask())
    os.replace(folder / staging, folder / LORA_WEIGHTS)
    return folder / LORA_WEIGHTS
