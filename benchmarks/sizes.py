"""The two benchmark sizes: `full` (the Stable Diffusion v1.5 architecture) and `tiny` (every case in seconds).

A size fixes each model's config and each case's input shape. The `full` configs are the official SD 1.5 ones from
`hf_scratch.formats.configs`; the training case uses a small U-Net at both sizes, because a full-size training step is
not a useful figure on a CPU. Resolutions are named after the full-size image they stand for: at `tiny` size
`unet_512` still means "the larger U-Net case", on 16x16 latents.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from hf_scratch.formats.configs import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from hf_scratch.models.vae import downsampling_factor

SizeName = Literal["tiny", "full"]

# The SD 1.x scheduler config (`scheduler/scheduler_config.json` of stable-diffusion-v1-5).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

_TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 32,
}
_TINY_TEXT = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
# A 3-level latent-diffusion U-Net of about 13M parameters, the scale this project trains on a CPU.
_TRAIN_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 256],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 256,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


@dataclass(frozen=True)
class Size:
    """Model configs and case shapes for one benchmark size."""

    name: SizeName
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    train_unet: dict[str, Any]
    # Latent side length standing for a 256, 512 and 1024 px image.
    latent_sizes: dict[int, int]
    pipeline_steps: int
    generation_steps: int  # steps of the peak-RSS generation; peak memory is reached in the first step
    train_batch: int
    train_latent: int
    recipe_batch: int  # of the emoji32 training-step case (training/recipes/emoji32.sh's U-Net stage: 64)
    text_length: int = 77
    batch: int = 2  # classifier-free guidance doubles a batch of one prompt
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))

    def vae_scale(self) -> int:
        """Pixels per latent along a side: 2 ** (number of VAE blocks - 1)."""
        return downsampling_factor(self.vae["block_out_channels"])


def get_size(name: SizeName) -> Size:
    """Returns fresh configs for `name` ("tiny" or "full")."""
    if name == "full":
        return Size(
            name="full",
            unet=copy.deepcopy(SD15_UNET_CONFIG),
            vae=copy.deepcopy(SD15_VAE_CONFIG),
            text_encoder=copy.deepcopy(SD15_TEXT_ENCODER_CONFIG),
            train_unet=copy.deepcopy(_TRAIN_UNET),
            latent_sizes={256: 32, 512: 64, 1024: 128},
            pipeline_steps=20,
            generation_steps=2,
            train_batch=32,
            train_latent=16,
            recipe_batch=64,
        )
    if name == "tiny":
        return Size(
            name="tiny",
            unet=copy.deepcopy(_TINY_UNET),
            vae=copy.deepcopy(_TINY_VAE),
            text_encoder=copy.deepcopy(_TINY_TEXT),
            train_unet=copy.deepcopy(_TINY_UNET),
            latent_sizes={256: 8, 512: 16, 1024: 32},
            pipeline_steps=2,
            generation_steps=1,
            train_batch=4,
            train_latent=8,
            recipe_batch=4,
        )
    raise ValueError(f"size must be 'tiny' or 'full', got {name!r}")
