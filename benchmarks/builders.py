"""Pairs of models, ours and diffusers', holding the same weights.

The reference model is built first with a fixed seed; ours is built from the same config and loads the reference's
state dict with `strict=True`. For inference the two share the weight tensors (`assign=True`), so a pair costs the
memory of one model; for training each gets its own copy, since the optimiser updates them in place.
"""

from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .sizes import Size

Kind = Literal["unet", "vae", "text_encoder"]


def our_class(kind: Kind) -> type:
    """Our model class for `kind`; imported late, so `--help` works without the models."""
    if kind == "unet":
        from hf_scratch.models.unet import ScratchUNet2DConditionModel

        return ScratchUNet2DConditionModel
    if kind == "vae":
        from hf_scratch.models.vae import ScratchAutoencoderKL

        return ScratchAutoencoderKL
    from hf_scratch.models.clip import ScratchCLIPTextModel

    return ScratchCLIPTextModel


def build(kind: Kind, impl: Literal["ours", "diffusers"], config: dict[str, Any], seed: int = 0) -> nn.Module:
    """One randomly initialised model in eval mode, seeded."""
    torch.manual_seed(seed)
    if kind == "text_encoder":
        if impl == "ours":
            from hf_scratch.models.clip import ScratchCLIPTextConfig

            return our_class(kind)(ScratchCLIPTextConfig(**config)).eval()
        return CLIPTextModel(CLIPTextConfig(**config)).eval()
    reference = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[kind]
    return (our_class(kind) if impl == "ours" else reference)(**config).eval()


def build_pair(kind: Kind, config: dict[str, Any], share_weights: bool = True) -> tuple[nn.Module, nn.Module]:
    """`(ours, reference)` with identical weights, shared in memory when `share_weights`."""
    reference = build(kind, "diffusers", config)
    ours = build(kind, "ours", config)
    state_dict = reference.state_dict()
    if not share_weights:
        state_dict = {key: value.clone() for key, value in state_dict.items()}
    ours.load_state_dict(state_dict, strict=True, assign=share_weights)
    return ours, reference


def place(model: Any, device: str, dtype: torch.dtype) -> Any:
    """Moves a model or pipeline to `device`, casting only when `dtype` is not float32 (diffusers warns on a cast)."""
    model = model.to(device)
    return model if dtype == torch.float32 else model.to(dtype)


def byte_tokenizer(model_max_length: int) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte and no merges: offline, and fine for timing a text encoder."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    byte_chars = list(bytes_to_unicode().values())
    tokens = specials + byte_chars + [char + "</w>" for char in byte_chars]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_scheduler(impl: Literal["ours", "diffusers"], config: dict[str, Any]) -> Any:
    """DPM-Solver++ (2M), the scheduler of both pipelines; ours when it is importable."""
    if impl == "ours":
        from hf_scratch.schedulers.dpm_solver import ScratchDPMSolverMultistepScheduler

        return ScratchDPMSolverMultistepScheduler(**config)
    return DPMSolverMultistepScheduler(**config)


def build_pipeline(impl: Literal["ours", "diffusers"], components: dict[str, nn.Module], size: Size) -> Any:
    """A text-to-image pipeline around `components` (`unet`, `vae`, `text_encoder`), progress bar off."""
    tokenizer = byte_tokenizer(size.text_length)
    scheduler = build_scheduler(impl, size.scheduler)
    if impl == "ours":
        from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

        pipe = ScratchStableDiffusionPipeline(tokenizer=tokenizer, scheduler=scheduler, **components)
    else:
        pipe = StableDiffusionPipeline(
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **components,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shipped_pipelines() -> tuple[Any, Any]:
    """(the shipped `emoji32` pipeline, diffusers' `StableDiffusionPipeline` of diffusers' and transformers' classes
    holding the same weights), progress bars off. Both sample with a copy of the model's flow-matching Euler
    scheduler: diffusers' own `FlowMatchEulerDiscreteScheduler` lacks the `init_noise_sigma` that
    `StableDiffusionPipeline` reads, and ours steps as it does (tests/test_flow_match.py)."""
    import copy

    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
    from hf_scratch.pretrained import default_model_path

    ours = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
    unet = UNet2DConditionModel.from_config(ours.unet.config)
    vae = AutoencoderKL.from_config(ours.vae.config)
    text_config = {k: v for k, v in ours.text_encoder.config.to_dict().items() if k not in ("model_type", "dtype")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for theirs, mine in ((unet, ours.unet), (vae, ours.vae), (text_encoder, ours.text_encoder)):
        theirs.load_state_dict(mine.state_dict(), strict=True)
        theirs.eval()
    reference = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=ours.tokenizer, unet=unet,
        scheduler=copy.deepcopy(ours.scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    return ours, reference
