"""The conditional U-Net that predicts the noise ε_θ(z_t, t, τ_θ(y)) in latent space.

Latent Diffusion (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.3 and Appendix E): a DDPM U-Net (Ho et al. 2020,
arXiv:2006.11239) whose attention layers are spatial transformers, cross-attending to the text encoder's token
embeddings. The layout, config keys and parameter names match `diffusers.UNet2DConditionModel` for SD 1.x / 2.x
(`CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`,
`Transformer2DModel`, `BasicTransformerBlock`), so a folder saved by either class loads into the other. This file
holds the blocks and the model; the spatial transformer is in `transformer.py`, the time, class and added-condition
embedding in `embeddings.py`, and the adapter and attention-processor API (LoRA through peft, `set_attn_processor`,
FreeU, ...) comes from `adapters.py`.

`forward` takes what diffusers' U-Net takes, so diffusers' pipelines and loaders drive it unchanged: ControlNet
residuals (Zhang et al. 2023, arXiv:2302.05543) added to the skips and the bottleneck, T2I-Adapter features (Mou et
al. 2023, arXiv:2302.08453) added inside the contracting path, IP-Adapter image tokens (Ye et al. 2023,
arXiv:2308.06721) beside the text through `encoder_hid_proj`, attention masks, class labels, LCM's `timestep_cond`
(Luo et al. 2023, arXiv:2310.04378) and SDXL's added conditions (Podell et al. 2023, arXiv:2307.01952, Sec. 2.2).
The contracting path and the time embedding are shared with the ControlNet (`controlnet.py`), which copies them.
"""

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin  # diffusers looks these names up in this module when loading
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.utils import BaseOutput, apply_lora_scale, logging
from diffusers.utils.torch_utils import apply_freeu
from torch import nn

from .adapters import UNetAdapterMixin
from .embeddings import TimeEmbeddingMixin, blocks_time_embed_dim
from .layers import (
    CheckpointedBlock,
    Downsample2D,
    ResnetBlock2D,
    RespectUmaskOnSaveMixin,
    StrictFromPretrainedMixin,
    Upsample2D,
    get_activation,
)
from .transformer import AttentionExtras, Transformer2DModel, mask_to_bias

logger = logging.get_logger(__name__)

# Config keys of diffusers' UNet2DConditionModel that SD 1.x / 2.x leave at these values; other values build
# architectures (Kandinsky and IF embeddings, GLIGEN, Fourier time, ...) this file does not implement.
FIXED_OPTIONS: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Config keys with more than one value built here, and the values allowed.
CHOICES: dict[str, tuple] = {
    "class_embed_type": (None, "timestep", "identity", "projection", "simple_projection"),
    "addition_embed_type": (None, "text_time"),
    "encoder_hid_dim_type": (None, "text_proj"),
}


@dataclass
class UNet2DConditionOutput(BaseOutput):
    """sample: the predicted noise ε (or v, or x_0, as the model was trained), shaped like the input latent."""

    sample: torch.Tensor


@dataclass(frozen=True)
class LevelConfig:
    """The config entries of one resolution level of the U-Net (level 0 the finest): each per-block key read at the
    level's index, or its single value when the config gives one for all levels."""

    channels: int  # block_out_channels
    num_layers: int  # layers_per_block: ResNets in the level's down block (its up block has one more)
    attention_heads: int  # attention_head_dim, which counts heads (see ScratchUNet2DConditionModel)
    transformer_layers: int  # transformer_layers_per_block: layers in each spatial transformer
    only_cross_attention: bool  # only_cross_attention: attn1 attends to the text as well


def _resnet(in_channels: int, out_channels: int, config: FrozenDict, output_scale_factor: float = 1.0) -> ResnetBlock2D:
    """A ResNet block that adds the time embedding, with the U-Net's norm, activation and dropout."""
    return ResnetBlock2D(
        in_channels,
        out_channels,
        temb_channels=blocks_time_embed_dim(config),
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        act_fn=config.act_fn,
        dropout=config.dropout,
        output_scale_factor=output_scale_factor,
    )


def _spatial_transformer(level: LevelConfig, only_cross_attention: bool, config: FrozenDict) -> Transformer2DModel:
    """A spatial transformer on the level's feature map, cross-attending to the text."""
    return Transformer2DModel(
        num_heads=level.attention_heads,
        head_dim=level.channels // level.attention_heads,
        in_channels=level.channels,
        num_layers=level.transformer_layers,
        cross_attention_dim=config.cross_attention_dim,
        groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=only_cross_attention,
        upcast_attention=config.upcast_attention,
        dropout=config.dropout,
    )


class DownBlock2D(CheckpointedBlock):
    """One resolution of the contracting path: ResNet blocks, then a stride-2 downsample. Every intermediate output is
    kept for the skip connections."""

    has_cross_attention = False  # whether a spatial transformer follows each ResNet block

    def __init__(self, in_channels: int, level: LevelConfig, add_downsample: bool, config: FrozenDict) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else level.channels, level.channels, config) for i in range(level.num_layers)
        )
        self.attentions = (
            nn.ModuleList(_spatial_transformer(level, level.only_cross_attention, config) for _ in self.resnets)
            if self.has_cross_attention
            else nn.ModuleList()
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(level.channels, config.downsample_padding)]) if add_downsample else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        extras: AttentionExtras | None = None,
        adapter_residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`adapter_residual`, a T2I-Adapter feature map, joins where diffusers adds it: after the last transformer
        of a cross-attention block (before the downsample), else after the block, to its output and last skip."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = self.run_layer(resnet, hidden_states, temb)
            if self.has_cross_attention:
                hidden_states = self.run_layer(self.attentions[i], hidden_states, encoder_hidden_states, extras)
                if adapter_residual is not None and i == len(self.resnets) - 1:
                    hidden_states = hidden_states + adapter_residual
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C, H/2, W/2)
            skips.append(hidden_states)
        if adapter_residual is not None and not self.has_cross_attention:
            hidden_states = skips[-1] = hidden_states + adapter_residual
        return hidden_states, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """`DownBlock2D` with a spatial transformer after each ResNet block."""

    has_cross_attention = True


class UNetMidBlock2DCrossAttn(CheckpointedBlock):
    """The bottleneck at the deepest level: ResNet, spatial transformer, ResNet."""

    def __init__(self, level: LevelConfig, config: FrozenDict) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(level.channels, level.channels, config, output_scale_factor=config.mid_block_scale_factor)
            for _ in range(2)
        )
        # As in diffusers, whatever only_cross_attention says, the bottleneck's self-attention attends to the image.
        self.attentions = nn.ModuleList([_spatial_transformer(level, False, config)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        extras: AttentionExtras | None = None,
    ) -> torch.Tensor:
        hidden_states = self.run_layer(self.resnets[0], hidden_states, temb)
        hidden_states = self.run_layer(self.attentions[0], hidden_states, encoder_hidden_states, extras)
        return self.run_layer(self.resnets[1], hidden_states, temb)


class UpBlock2D(CheckpointedBlock):
    """One resolution of the expanding path: each ResNet block takes the running features concatenated with one skip
    from the contracting path; then a 2x upsample.

    `in_channels` is the width of the last skip it takes (the finer level's downsampled map, or conv_in's output),
    `prev_output_channels` that of the features coming up from the level below.
    """

    has_cross_attention = False  # whether a spatial transformer follows each ResNet block

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        level: LevelConfig,
        add_upsample: bool,
        resolution_idx: int,
        config: FrozenDict,
    ) -> None:
        super().__init__()
        self.resolution_idx = resolution_idx  # 0 for the deepest; FreeU acts on resolutions 0 and 1
        self.freeu_scales: dict[str, float] | None = None  # set by `enable_freeu`
        # One ResNet per skip: the level's down-block ResNets, and the map they started from.
        num_layers = level.num_layers + 1
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else level.channels
            resnet_in_channels = prev_output_channels if i == 0 else level.channels
            resnets.append(_resnet(resnet_in_channels + skip_channels, level.channels, config))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = (
            nn.ModuleList(_spatial_transformer(level, level.only_cross_attention, config) for _ in self.resnets)
            if self.has_cross_attention
            else nn.ModuleList()
        )
        self.upsamplers = nn.ModuleList([Upsample2D(level.channels)]) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
        extras: AttentionExtras | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if self.freeu_scales is not None:
                hidden_states, skip = apply_freeu(self.resolution_idx, hidden_states, skip, **self.freeu_scales)
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = self.run_layer(resnet, hidden_states, temb)
            if self.has_cross_attention:
                hidden_states = self.run_layer(self.attentions[i], hidden_states, encoder_hidden_states, extras)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C, 2H, 2W) or the next skip's size
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """`UpBlock2D` with a spatial transformer after each ResNet block."""

    has_cross_attention = True


# The config's block types, and the classes that build them.
DOWN_BLOCKS: dict[str, type[DownBlock2D]] = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
UP_BLOCKS: dict[str, type[UpBlock2D]] = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


def _per_block(name: str, value: Any, num_blocks: int) -> list:
    """Broadcast a per-resolution config value (an int/bool, or one entry per down block) to a list."""
    if not isinstance(value, (list, tuple)):
        return [value] * num_blocks
    if len(value) != num_blocks:
        raise ValueError(f"{name}={value!r} must have one entry per down block ({num_blocks}), or be a single value")
    return list(value)


def build_levels(config: FrozenDict) -> list[LevelConfig]:
    """The per-level config entries, each broadcast to one value per level (`_per_block`)."""
    if not isinstance(config.cross_attention_dim, int):
        raise ValueError(f"cross_attention_dim={config.cross_attention_dim!r} must be a single int")
    num_blocks = len(config.block_out_channels)
    heads = config.get("num_attention_heads") or config.attention_head_dim  # the ControlNet may set the former
    per_level = [
        _per_block(name, value, num_blocks)
        for name, value in (
            ("layers_per_block", config.layers_per_block),
            ("attention_head_dim", heads),
            ("transformer_layers_per_block", config.transformer_layers_per_block),
            ("only_cross_attention", config.only_cross_attention),
        )
    ]
    return [LevelConfig(channels, *values) for channels, *values in zip(config.block_out_channels, *per_level)]


def build_contracting_path(
    levels: list[LevelConfig], config: FrozenDict
) -> tuple[nn.ModuleList, UNetMidBlock2DCrossAttn]:
    """The down blocks of `config.down_block_types` (each but the last ending in a downsample) and the bottleneck."""
    down_blocks = nn.ModuleList(
        DOWN_BLOCKS[block_type](
            in_channels=levels[max(i - 1, 0)].channels,
            level=levels[i],
            add_downsample=i < len(levels) - 1,
            config=config,
        )
        for i, block_type in enumerate(config.down_block_types)
    )
    return down_blocks, UNetMidBlock2DCrossAttn(levels[-1], config)


class ScratchUNet2DConditionModel(
    RespectUmaskOnSaveMixin, StrictFromPretrainedMixin, ModelMixin, UNetAdapterMixin, TimeEmbeddingMixin, ConfigMixin
):
    """ε_θ(z_t, t, c): conv_in, contracting path, bottleneck, expanding path with skips, conv_out (LDM Appendix E).

    Config keys and their defaults are those of `diffusers.UNet2DConditionModel`. As there, `attention_head_dim` is
    the number of attention heads per resolution (a historical misnomer kept for checkpoint compatibility); each head
    has `channels // attention_head_dim` dimensions. The keys in `FIXED_OPTIONS` must keep their SD values, those in
    `CHOICES` take the values listed there, and `addition_embed_type_num_heads` is inert (it sizes embeddings that
    are not built here).

    LoRA and other peft adapters, attention processors and FreeU work as on diffusers' U-Net (`UNetAdapterMixin`), and
    so does IP-Adapter loading (`UNet2DConditionLoadersMixin._load_ip_adapter_weights` sets `encoder_hid_proj` and
    installs diffusers' IP-Adapter attention processors).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: Literal["UNetMidBlock2DCrossAttn"] = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        reverse_transformer_layers_per_block: None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: Literal[None, "text_proj"] = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: Literal[None, "timestep", "identity", "projection", "simple_projection"] = None,
        addition_embed_type: Literal[None, "text_time"] = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: Literal["default"] = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: Literal["positional"] = "positional",
        time_embedding_dim: None = None,
        time_embedding_act_fn: None = None,
        timestep_post_act: None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: Literal["default"] = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: None = None,
        cross_attention_norm: None = None,
        addition_embed_type_num_heads: int = 64,
    ) -> None:
        super().__init__()
        for key, supported in FIXED_OPTIONS.items():
            if self.config[key] != supported:
                raise ValueError(
                    f"{key}={self.config[key]!r} is not supported: this U-Net implements SD 1.x / 2.x, which use "
                    f"{key}={supported!r}"
                )
        for key, allowed in CHOICES.items():
            if self.config[key] not in allowed:
                raise ValueError(f"{key}={self.config[key]!r} is not supported; allowed: {allowed}")
        if encoder_hid_dim is not None and encoder_hid_dim_type is None:
            self.register_to_config(encoder_hid_dim_type="text_proj")  # as diffusers infers it
        if (encoder_hid_dim is None) != (self.config.encoder_hid_dim_type is None):
            raise ValueError(
                f"encoder_hid_dim={encoder_hid_dim!r} and encoder_hid_dim_type={encoder_hid_dim_type!r}: set both "
                "(a linear map of the text from encoder_hid_dim to cross_attention_dim) or neither"
            )
        num_blocks = len(block_out_channels)
        for name, types, blocks in (
            ("down", down_block_types, DOWN_BLOCKS),
            ("up", up_block_types, UP_BLOCKS),
        ):
            if len(types) != num_blocks or any(block_type not in blocks for block_type in types):
                raise ValueError(
                    f"{name}_block_types={types!r} must list {num_blocks} entries (one per block_out_channels) "
                    f"from {tuple(blocks)}"
                )
        levels = build_levels(self.config)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        self.build_time_embedding(self.config, class_act_fn=act_fn)
        # The text's projection to cross_attention_dim ("text_proj"); IP-Adapter loading puts its image projection here.
        self.encoder_hid_proj = None if encoder_hid_dim is None else nn.Linear(encoder_hid_dim, cross_attention_dim)
        self.down_blocks, mid_block = build_contracting_path(levels, self.config)
        # Registered before the bottleneck, as in diffusers, so that the attention layers enumerate in diffusers' order
        # (down, up, mid): IP-Adapter files number their layers in that order.
        self.up_blocks = nn.ModuleList()
        self.mid_block = mid_block
        for i, block_type in enumerate(up_block_types):
            level = num_blocks - 1 - i  # the down block whose skips this up block consumes
            self.up_blocks.append(
                UP_BLOCKS[block_type](
                    in_channels=block_out_channels[max(level - 1, 0)],
                    prev_output_channels=block_out_channels[min(level + 1, num_blocks - 1)],
                    level=levels[level],
                    add_upsample=level > 0,
                    resolution_idx=i,
                    config=self.config,
                )
            )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(
            block_out_channels[0], out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2
        )

    @property
    def downsampling_factor(self) -> int:
        """2^(levels − 1): how much the contracting path shrinks the latents."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict the noise in `sample` (B, in_channels, H, W) at `timestep` given text tokens (B, L, cross_dim).

        The other arguments are diffusers' (`UNet2DConditionModel.forward`), with its meaning:
        - `class_labels`, `timestep_cond`, `added_cond_kwargs` ("text_embeds" and "time_ids" for SDXL's added
          embedding, "image_embeds" for a loaded IP-Adapter) join the time embedding or the tokens (`embed_time`,
          `_tokens`);
        - `attention_mask` and `encoder_attention_mask`, (B, tokens) with 1 = keep, 0 = discard, mask self- and
          cross-attention scores; `cross_attention_kwargs={"scale": s}` scales every LoRA update by s for this call,
          and its other keys go to the attention processors that take them;
        - `down_block_additional_residuals` (one per skip) and `mid_block_additional_residual` are a ControlNet's,
          added to the skips and to the bottleneck's output; `down_intrablock_additional_residuals` are a
          T2I-Adapter's, one per level from the finest, added inside the contracting path (`DownBlock2D.forward`).
        """
        self._check_inputs(sample, encoder_hidden_states, cross_attention_kwargs)
        control_residuals, adapter_residuals = self._split_residuals(
            down_block_additional_residuals, mid_block_additional_residual, down_intrablock_additional_residuals
        )
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.embed_time(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)  # (B, temb width)
        encoder_hidden_states = self._tokens(encoder_hidden_states, added_cond_kwargs)
        extras = None
        if attention_mask is not None or encoder_attention_mask is not None or cross_attention_kwargs:
            masks = (mask_to_bias(mask, sample.dtype) for mask in (attention_mask, encoder_attention_mask))
            extras = AttentionExtras(*masks, processor_kwargs=cross_attention_kwargs or {})

        sample = self.conv_in(sample)  # (B, C0, H, W)
        skips = [sample]
        for down_block in self.down_blocks:
            adapter_residual = adapter_residuals.pop(0) if adapter_residuals else None
            sample, block_skips = down_block(sample, temb, encoder_hidden_states, extras, adapter_residual)
            skips.extend(block_skips)
        if control_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, control_residuals[0])]
        sample = self.mid_block(sample, temb, encoder_hidden_states, extras)
        if adapter_residuals and adapter_residuals[0].shape == sample.shape:  # an adapter with a map for the bottleneck
            sample = sample + adapter_residuals.pop(0)
        if control_residuals is not None:
            sample = sample + control_residuals[1]
        # A size that is not a multiple of 2^(levels − 1) shrinks by rounding up on the way down; the way up then
        # upsamples to each skip's size instead of doubling, as diffusers' U-Net does.
        odd_size = any(size % self.downsampling_factor for size in skips[0].shape[-2:])
        for up_block in self.up_blocks:
            remaining = len(skips) - len(up_block.resnets)  # the skips left for the blocks above this one
            upsample_size = skips[remaining - 1].shape[-2:] if odd_size and remaining > 0 else None
            # Its own list, not the shared one popped in place: a hook that copies the arguments (FSDP's) would
            # otherwise leave the popped skips in the list for the next block.
            skips, block_skips = skips[:remaining], skips[remaining:]
            sample = up_block(sample, block_skips, temb, encoder_hidden_states, upsample_size, extras)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, out_channels, H, W)

        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)

    def _tokens(
        self, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, Any] | None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The tokens cross-attention reads: the text, through `encoder_hid_proj` for "text_proj"; once diffusers has
        loaded an IP-Adapter (`encoder_hid_dim_type` "ip_image_proj"), the pair (text, [image tokens per adapter])
        that its attention processors take, the image tokens projected from `added_cond_kwargs["image_embeds"]`."""
        if self.encoder_hid_proj is None:
            return encoder_hidden_states
        if self.config.encoder_hid_dim_type == "text_proj":
            return self.encoder_hid_proj(encoder_hidden_states)  # (B, L, cross_attention_dim)
        if "image_embeds" not in (added_cond_kwargs or {}):
            raise ValueError(
                "added_cond_kwargs has no 'image_embeds', but an IP-Adapter is loaded (encoder_hid_dim_type="
                f"{self.config.encoder_hid_dim_type!r}); pass the image embeddings, or unload the IP-Adapter"
            )
        if getattr(self, "text_encoder_hid_proj", None) is not None:  # a "text_proj" the IP-Adapter loader moved
            encoder_hidden_states = self.text_encoder_hid_proj(encoder_hidden_states)
        return encoder_hidden_states, self.encoder_hid_proj(added_cond_kwargs["image_embeds"])

    def _split_residuals(
        self,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None,
        mid_block_additional_residual: torch.Tensor | None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None,
    ) -> tuple[tuple[list[torch.Tensor], torch.Tensor] | None, list[torch.Tensor]]:
        """((ControlNet's skip residuals, its bottleneck residual) or None, T2I-Adapter residuals to take in order).

        As in diffusers, skip residuals without a bottleneck residual are an older T2I-Adapter call and count as
        adapter residuals."""
        adapter = down_intrablock_additional_residuals
        if adapter is None and mid_block_additional_residual is None:
            adapter = down_block_additional_residuals
        if down_block_additional_residuals is None or mid_block_additional_residual is None:
            return None, list(adapter or [])
        skips = sum(len(block.resnets) + (block.downsamplers is not None) for block in self.down_blocks)
        if len(down_block_additional_residuals) != skips + 1:
            raise ValueError(
                f"down_block_additional_residuals has {len(down_block_additional_residuals)} tensors; this U-Net has "
                f"{skips + 1} skip connections (conv_in's output and each down-block layer's), one residual each"
            )
        return (list(down_block_additional_residuals), mid_block_additional_residual), list(adapter or [])

    def _check_inputs(
        self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, cross_attention_kwargs: dict | None
    ) -> None:
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}; expected (batch, {self.config.in_channels}, height, width)"
            )
        if min(sample.shape[-2:]) < 1:
            raise ValueError(f"sample has spatial size {tuple(sample.shape[-2:])}; height and width must be positive")
        text_dim = self.config.encoder_hid_dim or self.config.cross_attention_dim
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != text_dim:
            name = "encoder_hid_dim" if self.config.encoder_hid_dim else "cross_attention_dim"
            raise ValueError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected "
                f"(batch, sequence_length, {text_dim}) to match {name}"
            )
        if cross_attention_kwargs:
            taken = {
                name
                for processor in self.attn_processors.values()
                for name in inspect.signature(processor.__call__).parameters
            }
            if set(cross_attention_kwargs) - taken:
                raise ValueError(
                    f"cross_attention_kwargs={cross_attention_kwargs!r} has keys that no attention processor of this "
                    f"U-Net takes ({sorted(set(cross_attention_kwargs) - taken)}); pass {{'scale': s}}, the LoRA "
                    "scale, the arguments of the installed processors (such as IP-Adapter's ip_adapter_masks), or None"
                )
