"""The official Stable Diffusion v1.5 component configs, used when a single file comes without a config.

The values are those of the `unet/`, `vae/` and `text_encoder/` `config.json` files of
`stable-diffusion-v1-5/stable-diffusion-v1-5` (the text tower of `openai/clip-vit-large-patch14`). An LDM single file
does not record its architecture, so `load_single_file(path, config=None)` starts from these and reads the few text
encoder sizes that the weights themselves reveal (see `infer_text_encoder_config`).
"""

import copy
from collections.abc import Mapping
from typing import Any

import torch

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

SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

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

# CLIP ViT-L/14 and OpenCLIP ViT-H/14 both use 64-dimensional attention heads; the weights do not record the head count.
_CLIP_HEAD_DIM = 64


def default_configs() -> dict[str, dict[str, Any]]:
    """Returns fresh copies of the three official v1.5 configs, keyed `unet`, `vae`, `text_encoder`."""
    return {
        "unet": copy.deepcopy(SD15_UNET_CONFIG),
        "vae": copy.deepcopy(SD15_VAE_CONFIG),
        "text_encoder": copy.deepcopy(SD15_TEXT_ENCODER_CONFIG),
    }


def infer_text_encoder_config(text_encoder_weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Reads the CLIP text encoder's sizes from its weights (keys as in `transformers.CLIPTextModel`, no prefix).

    The sizes that shapes reveal (vocabulary, width, depth, MLP width, context length) override the v1.5 config; the
    head count follows from the width at CLIP's 64 channels per head.
    """
    config = copy.deepcopy(SD15_TEXT_ENCODER_CONFIG)
    token_embedding = text_encoder_weights.get("text_model.embeddings.token_embedding.weight")
    position_embedding = text_encoder_weights.get("text_model.embeddings.position_embedding.weight")
    first_mlp = text_encoder_weights.get("text_model.encoder.layers.0.mlp.fc1.weight")
    if token_embedding is None or position_embedding is None or first_mlp is None:
        return config  # too little to read; the load then names the missing keys
    vocab_size, hidden_size = token_embedding.shape
    layer_ids = {key.split(".")[3] for key in text_encoder_weights if key.startswith("text_model.encoder.layers.")}
    config.update(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_attention_heads=max(hidden_size // _CLIP_HEAD_DIM, 1),
        num_hidden_layers=len(layer_ids),
        intermediate_size=first_mlp.shape[0],
        max_position_embeddings=position_embedding.shape[0],
    )
    return config
