"""ControlNet: a trainable copy of the U-Net's contracting path that turns a condition image into residuals for the
frozen U-Net's skips and bottleneck.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv:2302.05543. Each
block F(·; Θ) of the locked model gains a trainable copy F(·; Θ_c) between two zero convolutions Z, 1x1 convolutions
whose weight and bias start at zero (Sec. 3.1, Eq. 2):

    y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)

so that at the start of training y_c = y and the locked model is unharmed. For Stable Diffusion (Sec. 3.2) the copy
is the encoder (the down blocks) and the middle block; its outputs, each through its own zero convolution, are added
to the U-Net's twelve skips and to its bottleneck (`ScratchUNet2DConditionModel.forward`'s
`down_block_additional_residuals` and `mid_block_additional_residual`). The condition image reaches the latent size
through a small encoder E(·) that ends in a zero convolution; its layers are the official code's (3x3 convolutions,
SiLU, channels 16-32-96-256 by default), which the published checkpoints use.

Config keys, module names and outputs are those of `diffusers.ControlNetModel`, so a folder saved by either class
loads into the other; `from_unet` copies a U-Net (ours or diffusers') into a new ControlNet, and `from_single_file`
reads the original code's single files through diffusers' own converter. Several ControlNets run together through
diffusers' `MultiControlNetModel`, which sums their residuals.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import ConfigMixin, ModelMixin  # diffusers looks these names up in this module when loading
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    create_unet_diffusers_config_from_ldm,
    fetch_original_config,
    load_single_file_checkpoint,
)
from diffusers.utils import BaseOutput, apply_lora_scale
from torch import nn

from .adapters import AttentionProcessorsMixin, AttentionSlicingMixin
from .embeddings import TimeEmbeddingMixin
from .layers import RespectUmaskOnSaveMixin, StrictFromPretrainedMixin
from .transformer import AttentionExtras, mask_to_bias
from .unet import DOWN_BLOCKS, build_contracting_path, build_levels

# Values of diffusers' ControlNetModel config keys that this file does not build (Kandinsky and IF embeddings, the
# attention-free bottleneck), and the values it does.
CHOICES: dict[str, tuple] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None, "timestep", "identity", "projection"),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default",),
    "controlnet_conditioning_channel_order": ("rgb", "bgr"),
}
# The U-Net config keys that `from_unet` copies, as diffusers' does.
UNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
)  # fmt: skip
# The published SD 1.5 ControlNets (lllyasviel/control_v11p_sd15_*): this class's defaults but for the text width.
SD15_CONTROLNET_CONFIG: dict[str, Any] = {"cross_attention_dim": 768}
# The original code's single files: keys under this prefix (ControlNet 1.0 files also hold the SD model beside them,
# 1.1 files and some others only the ControlNet, without it), and keys that only a ControlNet has.
ORIGINAL_PREFIX = "control_model."
ORIGINAL_CONTROLNET_KEYS = ("input_hint_block.0.weight", "zero_convs.0.0.weight", "middle_block_out.0.weight")
# The config keys that the original yaml decides, as in diffusers' `create_controlnet_diffusers_config_from_ldm`.
ORIGINAL_CONFIG_KEYS = (
    "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
    "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block",
)  # fmt: skip
FIRST_OFFENDERS = 5
# Guess mode scales the residuals from 0.1 at the finest skip up to 1 at the bottleneck, evenly in log scale.
GUESS_MODE_FIRST_SCALE_LOG10 = -1.0


@dataclass
class ControlNetOutput(BaseOutput):
    """The residuals for the U-Net: one per skip connection (conv_in's output, then each down-block layer's, finest
    first), and one for the bottleneck's output."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


def zero_convolution(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Conv2d:
    """Z(·; Θ_z): a convolution whose weight and bias start at zero (Sec. 3.1), so its output is zero until trained."""
    convolution = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(convolution.weight)
    nn.init.zeros_(convolution.bias)
    return convolution


class ControlNetConditioningEmbedding(nn.Module):
    """E(·): the condition image (B, conditioning_channels, H·f, W·f) to a feature map of the latent's size with the
    U-Net's first width, (B, C0, H, W). Each level but the first halves the size (a stride-2 convolution), so f is
    2^(len(block_out_channels) − 1) and must equal the VAE's downsampling factor."""

    def __init__(
        self, conditioning_channels: int, block_out_channels: tuple[int, ...], embedding_channels: int
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for channels, next_channels in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(channels, channels, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(channels, next_channels, kernel_size=3, padding=1, stride=2))
        self.conv_out = zero_convolution(block_out_channels[-1], embedding_channels, kernel_size=3)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            embedding = F.silu(block(embedding))  # every second block: (B, C, H/2, W/2)
        return self.conv_out(embedding)


class ScratchControlNetModel(
    RespectUmaskOnSaveMixin,
    StrictFromPretrainedMixin,
    ModelMixin,
    AttentionProcessorsMixin,
    AttentionSlicingMixin,
    TimeEmbeddingMixin,
    ConfigMixin,
    PeftAdapterMixin,
):
    """The U-Net's conv_in, time embedding, down blocks and bottleneck, a condition encoder, and a zero convolution
    per output (Zhang et al. Fig. 3).

    Config keys and their defaults are those of `diffusers.ControlNetModel`; the keys in `CHOICES` take the values
    listed there. As in the U-Net, `attention_head_dim` counts heads (`num_attention_heads`, when set, wins).
    `global_pool_conditions` averages each residual over its pixels (the checkpoints that set it, such as shuffle,
    condition on global content only); `addition_embed_type_num_heads` is inert.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: Literal["UNetMidBlock2DCrossAttn"] = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: None = None,
        encoder_hid_dim_type: None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: Literal[None, "timestep", "identity", "projection"] = None,
        addition_embed_type: Literal[None, "text_time"] = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: Literal["default"] = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: Literal["rgb", "bgr"] = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ) -> None:
        super().__init__()
        for key, allowed in CHOICES.items():
            if self.config[key] not in allowed:
                raise ValueError(f"{key}={self.config[key]!r} is not supported by this ControlNet; allowed: {allowed}")
        if len(down_block_types) != len(block_out_channels) or any(t not in DOWN_BLOCKS for t in down_block_types):
            raise ValueError(
                f"down_block_types={down_block_types!r} must list {len(block_out_channels)} entries (one per "
                f"block_out_channels) from {tuple(DOWN_BLOCKS)}"
            )
        # The U-Net's blocks read the U-Net's config keys; diffusers' ControlNet has no dropout.
        block_config = FrozenDict({**self.config, "dropout": 0.0})
        levels = build_levels(block_config)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.build_time_embedding(block_config, class_act_fn="silu")  # diffusers' ControlNet fixes this one to SiLU
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            conditioning_channels, conditioning_embedding_out_channels, block_out_channels[0]
        )
        self.down_blocks, self.mid_block = build_contracting_path(levels, block_config)
        # One zero convolution per skip the U-Net keeps: conv_in's output, each down-block layer's, each downsample's.
        skip_channels = [block_out_channels[0]]
        for i, level in enumerate(levels):
            skip_channels += [level.channels] * (level.num_layers + (i < len(levels) - 1))
        self.controlnet_down_blocks = nn.ModuleList(zero_convolution(c, c) for c in skip_channels)
        self.controlnet_mid_block = zero_convolution(block_out_channels[-1], block_out_channels[-1])

    @classmethod
    def from_unet(
        cls,
        unet: ModelMixin,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> "ScratchControlNetModel":
        """A ControlNet with `unet`'s architecture (ours or diffusers' `UNet2DConditionModel`) whose copied parts
        start from the U-Net's weights (Sec. 3.1: the trainable copy is initialised from the locked model); the
        condition encoder and the zero convolutions start fresh. The same arguments as diffusers' `from_unet`."""
        config = {key: unet.config.get(key) for key in UNET_KEYS}
        controlnet = cls(
            **config,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block"):
                if getattr(controlnet, name, None) is not None:
                    getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: str | os.PathLike | Mapping[str, Any] | None = None,
        original_config: str | os.PathLike | Mapping[str, Any] | None = None,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> "ScratchControlNetModel":
        """A ControlNet from an original-layout single file (lllyasviel's ControlNet 1.0/1.1: `input_blocks`,
        `zero_convs`, `input_hint_block`, `middle_block_out`, `time_embed`, with or without `control_model.` before
        them), converted by diffusers' `convert_controlnet_checkpoint`, as `ControlNetModel.from_single_file` does.

        `path` is a local `.safetensors` file, or a torch file that loads with `weights_only=True` (no pickle code
        runs). The architecture comes from `config` (a local diffusers ControlNet folder, `subfolder` inside it, or a
        config dict), or from `original_config` (the original yaml, such as `cldm_v15.yaml`, as a path or a dict), or,
        with neither, is the published SD 1.5 ControlNets' (`SD15_CONTROLNET_CONFIG`). Every weight of the model must
        come from the file with its shape, or a ValueError names the offenders.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ControlNet single file {str(path)!r} does not exist.")
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        prefix = ORIGINAL_PREFIX if any(key.startswith(ORIGINAL_PREFIX) for key in checkpoint) else ""
        absent = [prefix + key for key in ORIGINAL_CONTROLNET_KEYS if prefix + key not in checkpoint]
        if absent:
            raise ValueError(
                f"{str(path)!r} is not an original-layout ControlNet checkpoint: it lacks {absent} (its first keys: "
                f"{sorted(checkpoint)[:FIRST_OFFENDERS]}). A diffusers ControlNet folder loads with `from_pretrained`."
            )
        model_config = _resolve_config(cls, config, original_config, subfolder, checkpoint)
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(model_config)

        state_dict = convert_controlnet_checkpoint(checkpoint, model.config)  # a missing original key gives None
        expected = model.state_dict()
        missing = [key for key in expected if state_dict.get(key) is None]
        unexpected = [key for key, tensor in state_dict.items() if key not in expected and tensor is not None]
        mismatched = [
            f"{key}: file {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}"
            for key, tensor in state_dict.items()
            if key in expected and tensor is not None and tensor.shape != expected[key].shape
        ]
        unread = sum(key.startswith(prefix) for key in checkpoint) - sum(t is not None for t in state_dict.values())
        if missing or unexpected or mismatched or unread:
            raise ValueError(
                f"{str(path)!r} does not fit the configured ControlNet: {len(missing)} missing keys "
                f"{missing[:FIRST_OFFENDERS]}; {len(unexpected)} unexpected keys {unexpected[:FIRST_OFFENDERS]}; "
                f"{len(mismatched)} shape mismatches {mismatched[:FIRST_OFFENDERS]}; {unread} keys of the file not "
                "read. Pass the `config` or `original_config` the file was made with."
            )
        dtype = torch_dtype or next(iter(expected.values())).dtype
        model.load_state_dict({key: state_dict[key].to(dtype) for key in expected}, strict=True, assign=True)
        return model.eval()

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple:
        """The residuals for the U-Net's skips and bottleneck, given its inputs (`sample`, `timestep`, text tokens and
        the same optional conditions) and the condition image `controlnet_cond` (B, conditioning_channels, H·f, W·f).

        Each residual is multiplied by `conditioning_scale`. `guess_mode` (for a ControlNet that sees the condition
        without the prompt) instead scales them from 0.1 × conditioning_scale at the finest skip up to
        conditioning_scale at the bottleneck, log-uniformly, so the coarse levels steer more than the fine ones.
        """
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[1] != self.config.conditioning_channels:
            raise ValueError(
                f"controlnet_cond has shape {tuple(controlnet_cond.shape)}; expected (batch, "
                f"{self.config.conditioning_channels}, height, width), the condition image"
            )
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        temb = self.embed_time(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)  # (B, temb width)
        extras = None
        if attention_mask is not None or cross_attention_kwargs:
            extras = AttentionExtras(mask_to_bias(attention_mask, sample.dtype), None, cross_attention_kwargs or {})

        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # x + Z(c): (B, C0, H, W)
        skips = [sample]
        for down_block in self.down_blocks:
            sample, block_skips = down_block(sample, temb, encoder_hidden_states, extras)
            skips.extend(block_skips)
        sample = self.mid_block(sample, temb, encoder_hidden_states, extras)

        down_residuals = [zero_conv(skip) for skip, zero_conv in zip(skips, self.controlnet_down_blocks)]
        residuals = [*down_residuals, self.controlnet_mid_block(sample)]
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(GUESS_MODE_FIRST_SCALE_LOG10, 0, len(residuals), device=sample.device)
            residuals = [residual * (scale * conditioning_scale) for residual, scale in zip(residuals, scales)]
        else:
            residuals = [residual * conditioning_scale for residual in residuals]
        if self.config.global_pool_conditions:
            residuals = [residual.mean(dim=(2, 3), keepdim=True) for residual in residuals]  # (B, C, 1, 1)

        if not return_dict:
            return residuals[:-1], residuals[-1]
        return ControlNetOutput(down_block_res_samples=tuple(residuals[:-1]), mid_block_res_sample=residuals[-1])


def _resolve_config(
    cls: type[ScratchControlNetModel],
    config: str | os.PathLike | Mapping[str, Any] | None,
    original_config: str | os.PathLike | Mapping[str, Any] | None,
    subfolder: str | None,
    checkpoint: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """`from_single_file`'s config: a folder's or a dict's, the original yaml's, or the SD 1.5 ControlNets'."""
    if config is not None and original_config is not None:
        raise ValueError("Pass `config` or `original_config`, not both.")
    if original_config is not None:
        return _config_from_original(original_config, checkpoint)
    if config is None:
        return dict(SD15_CONTROLNET_CONFIG)
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)) or not Path(config).is_dir():
        raise ValueError(f"`config` must be a local diffusers ControlNet folder or a config dict, got {config!r}.")
    return cls.load_config(config, subfolder=subfolder, local_files_only=True)


def _config_from_original(
    original_config: str | os.PathLike | Mapping[str, Any], checkpoint: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The config that the original yaml (such as `cldm_v15.yaml`) describes.

    This is diffusers' `create_controlnet_diffusers_config_from_ldm`, which in diffusers 0.42 fails on a missing
    argument: the U-Net's architecture through diffusers' U-Net config reader (the yaml's `unet_config` and
    `control_stage_config` describe the same contracting path), and the condition's channels.
    """
    if not isinstance(original_config, Mapping):
        original_config = fetch_original_config(str(original_config), local_files_only=True)
    try:
        unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
        hint_channels = original_config["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    except (KeyError, TypeError) as error:
        raise ValueError(
            "`original_config` must be the original ControlNet yaml, with model.params.unet_config, "
            f"control_stage_config and first_stage_config as in cldm_v15.yaml; it lacks {error}."
        ) from error
    return {"conditioning_channels": hint_channels, **{key: unet_config[key] for key in ORIGINAL_CONFIG_KEYS}}
