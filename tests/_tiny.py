"""Tiny, offline Stable Diffusion components for fast tests.

`tiny_components(kind)` builds a U-Net, a VAE, a CLIP text encoder, a byte-level CLIP tokenizer and nothing else, at
sizes that run a denoising step in milliseconds on a CPU. `kind="diffusers"` uses diffusers' and transformers' own
classes; `kind="scratch"` uses ours with the same configuration, and loads the same weights, so both produce the same
numbers for the same seed. `CLIP_TEXT_CONFIG`, `CLIP_VISION_CONFIG` and `prompt_batch` are a tiny two-tower CLIP and
padded token batches for it; `write_square_images` is a tiny captioned image folder.
"""

import json
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
)
TEXT_CONFIG = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    layer_norm_eps=1e-5,
)
# The towers of a two-tower CLIP. The text tower is TEXT_CONFIG's with CLIP's token layout (BOS and EOS the last two
# ids of the vocabulary), a shorter context and a projection.
CLIP_TEXT_CONFIG = dict(
    TEXT_CONFIG,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=97,
    eos_token_id=98,
    projection_dim=24,
)
CLIP_VISION_CONFIG = dict(
    hidden_size=40,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
)


def tiny_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is one token, so lengths are predictable."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    byte_chars = list(bytes_to_unicode().values())
    tokens = specials + byte_chars + [c + "</w>" for c in byte_chars]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def prompt_batch(seq_len: int, content_lengths: list[int], bos: int, eos: int, pad: int) -> tuple:
    """Token ids `[bos, words..., eos, pad...]` and the matching attention mask (1 = token, 0 = padding)."""
    input_ids = torch.full((len(content_lengths), seq_len), pad)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(content_lengths):
        input_ids[row, 0] = bos
        input_ids[row, 1 : length + 1] = torch.randint(2, min(bos, eos), (length,))
        input_ids[row, length + 1] = eos
        attention_mask[row, : length + 2] = 1
    return input_ids, attention_mask


def tiny_components(kind: Literal["diffusers", "scratch"] = "diffusers", seed: int = 0) -> dict:
    """Randomly initialised tiny `unet`, `vae`, `text_encoder` and `tokenizer` (no scheduler)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    if kind == "scratch":
        from hf_scratch.models.clip import ScratchCLIPTextConfig, ScratchCLIPTextModel
        from hf_scratch.models.unet import ScratchUNet2DConditionModel
        from hf_scratch.models.vae import ScratchAutoencoderKL

        scratch_unet = ScratchUNet2DConditionModel(**UNET_CONFIG)
        scratch_unet.load_state_dict(unet.state_dict())
        scratch_vae = ScratchAutoencoderKL(**VAE_CONFIG)
        scratch_vae.load_state_dict(vae.state_dict())
        scratch_text_encoder = ScratchCLIPTextModel(ScratchCLIPTextConfig(**TEXT_CONFIG))
        scratch_text_encoder.load_state_dict(text_encoder.state_dict())
        unet, vae, text_encoder = scratch_unet, scratch_vae, scratch_text_encoder
    for model in (unet, vae, text_encoder):
        model.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tiny_tokenizer()}


def sd_ddim():
    """diffusers' `DDIMScheduler` as the SD 1.5 folder configures it (scaled-linear β, steps_offset 1, no clipping)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip


def twin_pipelines() -> tuple:
    """(diffusers' `StableDiffusionPipeline` on diffusers' tiny components, ours on ours), same weights and DDIM."""
    from diffusers import StableDiffusionPipeline

    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

    reference = StableDiffusionPipeline(
        **tiny_components("diffusers"), scheduler=sd_ddim(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ours = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=sd_ddim())
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
    return reference, ours


def write_square_images(root: Path) -> Path:
    """train/: eight 32-pixel squares in two colours, captioned "a <colour> square", with metadata.jsonl."""
    folder = root / "train"
    folder.mkdir(parents=True)
    rows = []
    for index in range(8):
        colour = ("red", "blue")[index % 2]
        image = Image.new("RGB", (32, 32), "white")
        offset = 2 + index
        image.paste({"red": (220, 30, 30), "blue": (40, 60, 220)}[colour], (offset, offset, offset + 16, offset + 16))
        image.save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": f"a {colour} square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root
