"""Official Stable Diffusion configs and builders for diffusers' own models, the references our parity tests compare to.

The SD v1.5 configs are written out here as published in runwayml/stable-diffusion-v1-5 (unet/, vae/ and
text_encoder/ config.json), not imported from `hf_scratch.formats.configs`, so that the code is checked against them
rather than against itself; the SD2 U-Net config is copied from stabilityai/stable-diffusion-2-1's unet/config.json.
There is no network here, so the reference models get seeded random weights.
"""

import gc
from typing import Any

import torch
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel

SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# The VAE's scaling_factor is LDM's scale_factor.
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}
# CLIP ViT-L/14's text tower, with its legacy token ids (bos 0, eos 2).
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# text_encoder/config.json itself: the values above and what its writer recorded about itself.
SD15_TEXT_ENCODER_CONFIG_JSON: dict[str, Any] = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    **SD15_TEXT_ENCODER_CONFIG,
    "model_type": "clip_text_model",
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
}

SD15_UNET_PARAMETERS = 859_520_964

SD2_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD2_UNET_PARAMETERS = 865_910_724

SD15_VAE_PARAMETERS = 83_653_863

# Tiny configs with the same block layout, for fast tests.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": 2,
    "block_out_channels": [16, 32, 32],
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "norm_num_groups": 8,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_SD2_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 2, 1],
    "upcast_attention": True,
    "use_linear_projection": True,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}


def build_reference_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    """diffusers' U-Net at `config` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def build_reference_vae(config: dict[str, Any], seed: int = 0) -> AutoencoderKL:
    """diffusers' autoencoder at `config` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()


def scratch_twin(cls: type[ModelMixin], reference: ModelMixin) -> ModelMixin:
    """Our `cls` at the reference's config, sharing the reference's weight tensors (strict key match, no copy).

    Built on the meta device and then given the reference's tensors, so a full-size pair costs one model's memory.
    """
    with torch.device("meta"):
        model = cls.from_config(reference.config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||."""
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def free(*models: torch.nn.Module) -> None:
    """Drop the given models' weights now rather than at interpreter exit."""
    for model in models:
        model.to("meta")
    gc.collect()
