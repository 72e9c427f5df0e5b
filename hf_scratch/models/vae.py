"""The KL-regularised autoencoder that maps images x to latents z and back.

Latent Diffusion (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.1 and Appendix G): the encoder E outputs the mean and
log-variance of a diagonal Gaussian posterior q(z|x) (Kingma & Welling 2014, arXiv:1312.6114), the decoder D maps a
latent back to pixels, and a slight KL penalty towards N(0, I) keeps the latent space regular. Config keys and parameter
names match `diffusers.AutoencoderKL` (`Encoder`, `Decoder`, `DownEncoderBlock2D`, `UpDecoderBlock2D`,
`UNetMidBlock2D`), and so does its tiled encode/decode, so weights and tiled outputs are interchangeable.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin  # diffusers looks these names up in this module when loading
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .adapters import AttentionProcessorsMixin
from .layers import (
    CheckpointedBlock,
    Downsample2D,
    ResnetBlock2D,
    RespectUmaskOnSaveMixin,
    SpatialSelfAttention,
    StrictFromPretrainedMixin,
    Upsample2D,
)

# Constants that LDM's autoencoder fixes rather than configures.
NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # clamp on log σ² (LDM `DiagonalGaussianDistribution`)
DOWNSAMPLE_PADDING = 0  # LDM pads right/bottom by one pixel instead


def downsampling_factor(block_out_channels: Sequence[int]) -> int:
    """Pixels per latent along a side, 2^(levels − 1): every encoder level but the last halves the resolution. Takes
    the config's `block_out_channels`, so that it serves a config read from disk as well as a model."""
    return 2 ** (len(block_out_channels) - 1)


class DiagonalGaussianDistribution:
    """The posterior q(z|x) = N(μ, diag σ²), built from the encoder's moments (B, 2·latent_channels, h, w)."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, latent_channels, h, w) each
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε, ε ~ N(0, I): the reparameterisation trick (Kingma & Welling Eq. 10)."""
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over latent dimensions; `other=None` means N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """-log q(sample) per sample, summed over `dims`."""
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )


@dataclass
class AutoencoderKLOutput(BaseOutput):
    """latent_dist: the posterior q(z|x); take `.sample(generator)` or `.mode()` for a latent."""

    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    """sample: the decoded image batch (B, out_channels, H, W), roughly in [-1, 1]."""

    sample: torch.Tensor


def _resnet(in_channels: int, out_channels: int, config: FrozenDict) -> ResnetBlock2D:
    """A ResNet block without time embedding, with the autoencoder's norm groups and activation."""
    return ResnetBlock2D(
        in_channels, out_channels, temb_channels=None, groups=config.norm_num_groups, eps=NORM_EPS, act_fn=config.act_fn
    )


class DownEncoderBlock2D(CheckpointedBlock):
    """One resolution of the encoder: ResNet blocks, then a stride-2 downsample (except at the last resolution)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, config: FrozenDict
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, config) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, DOWNSAMPLE_PADDING)]) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = self.run_layer(resnet, hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C, H/2, W/2)
        return hidden_states


class UpDecoderBlock2D(CheckpointedBlock):
    """One resolution of the decoder: ResNet blocks, then a 2x upsample (except at the last resolution)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool, config: FrozenDict
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, config) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = self.run_layer(resnet, hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)  # (B, C, 2H, 2W)
        return hidden_states


class UNetMidBlock2D(CheckpointedBlock):
    """ResNet, single-head self-attention over all pixels (optional), ResNet."""

    def __init__(self, channels: int, config: FrozenDict) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(channels, channels, config) for _ in range(2))
        self.attentions = nn.ModuleList(
            [SpatialSelfAttention(channels, config.norm_num_groups, NORM_EPS)] if config.mid_block_add_attention else []
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.run_layer(self.resnets[0], hidden_states)
        for attention in self.attentions:
            hidden_states = self.run_layer(attention, hidden_states)
        return self.run_layer(self.resnets[1], hidden_states)


# The config's block types, and the classes that build them.
DOWN_BLOCKS: dict[str, type[DownEncoderBlock2D]] = {"DownEncoderBlock2D": DownEncoderBlock2D}
UP_BLOCKS: dict[str, type[UpDecoderBlock2D]] = {"UpDecoderBlock2D": UpDecoderBlock2D}


class Encoder(nn.Module):
    """E(x): image (B, in_channels, H, W) -> posterior moments (B, 2·latent_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, config: FrozenDict) -> None:
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DOWN_BLOCKS[block_type](
                in_channels=channels[max(i - 1, 0)],
                out_channels=channels[i],
                num_layers=config.layers_per_block,
                add_downsample=i < len(channels) - 1,
                config=config,
            )
            for i, block_type in enumerate(config.down_block_types)
        )
        self.mid_block = UNetMidBlock2D(channels[-1], config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()  # LDM's output nonlinearity is swish whatever act_fn says, as in diffusers
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            sample = down_block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 2·latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """D(z): latent (B, latent_channels, h, w) -> image (B, out_channels, h·f, w·f)."""

    def __init__(self, config: FrozenDict) -> None:
        super().__init__()
        reversed_channels = list(reversed(config.block_out_channels))
        self.conv_in = nn.Conv2d(config.latent_channels, reversed_channels[0], kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], config)
        self.up_blocks = nn.ModuleList(
            UP_BLOCKS[block_type](
                in_channels=reversed_channels[max(i - 1, 0)],
                out_channels=reversed_channels[i],
                num_layers=config.layers_per_block + 1,
                add_upsample=i < len(reversed_channels) - 1,
                config=config,
            )
            for i, block_type in enumerate(config.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, reversed_channels[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()  # as in the encoder
        self.conv_out = nn.Conv2d(reversed_channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(latent)
        sample = self.mid_block(sample)
        for up_block in self.up_blocks:
            sample = up_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, out_channels, h·f, w·f)


class ScratchAutoencoderKL(
    RespectUmaskOnSaveMixin, StrictFromPretrainedMixin, ModelMixin, AttentionProcessorsMixin, ConfigMixin
):
    """The SD autoencoder: x -> q(z|x) -> z -> D(z), with f = 2^(len(block_out_channels)-1) spatial compression.

    Diffusion runs on `z * scaling_factor` (LDM Sec. 4.3.2 and Appendix D.1: the factor gives the latents unit
    variance); decode `latents / scaling_factor`. Slicing runs a batch one image at a time, and tiling runs large
    images in overlapping tiles blended linearly (the diffusers algorithm), bounding memory. The mid-block attention's
    processors are set as in diffusers (`attn_processors`, `set_attn_processor`, `fuse_qkv_projections`, ...).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock2D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | tuple[int, int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        for name, types, blocks in (
            ("down_block_types", down_block_types, DOWN_BLOCKS),
            ("up_block_types", up_block_types, UP_BLOCKS),
        ):
            if len(types) != len(block_out_channels) or any(block_type not in blocks for block_type in types):
                raise ValueError(
                    f"{name}={types!r} must be {' or '.join(map(repr, blocks))} repeated once per block_out_channels "
                    f"({len(block_out_channels)} entries)"
                )
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_latent_min_size = int(self.tile_sample_min_size / downsampling_factor(block_out_channels))
        self.tile_overlap_factor = 0.25

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        """Encode and decode images larger than `tile_sample_min_size` in overlapping tiles."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """q(z|x) for images `x` (B, in_channels, H, W) scaled to [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (batch, {self.config.in_channels}, height, width)"
            )
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(image) for image in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """D(z) for latents `z` (B, latent_channels, h, w). `generator` is accepted for the diffusers pipelines, which
        pass one; the decoder is deterministic."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"z has shape {tuple(z.shape)}; expected (batch, {self.config.latent_channels}, height, width)"
            )
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(latent) for latent in z.split(1)])
        else:
            decoded = self._decode(z)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruct `sample` through the posterior's mode, or a draw from it when `sample_posterior`."""
        posterior = self.encode(sample).latent_dist
        latent = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latent, return_dict=return_dict)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._run_tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size)
        return self._encode_tile(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._run_tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode_tile(z)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _run_tiled(self, inputs: torch.Tensor, function, tile_size: int, output_tile_size: int) -> torch.Tensor:
        """Apply `function` to tiles of `tile_size` taken every (1 - overlap) tiles, blend each output tile linearly
        into its upper and left neighbours over the overlap, and stitch the tiles' non-overlapping parts."""
        stride = int(tile_size * (1 - self.tile_overlap_factor))
        blend_extent = int(output_tile_size * self.tile_overlap_factor)
        row_limit = output_tile_size - blend_extent
        rows = [
            [function(inputs[:, :, i : i + tile_size, j : j + tile_size]) for j in range(0, inputs.shape[3], stride)]
            for i in range(0, inputs.shape[2], stride)
        ]
        stitched_rows = []
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                # In place, as diffusers: the next row and column blend against the already-blended tile.
                if i > 0:
                    _blend_into(rows[i - 1][j], tile, blend_extent, dim=2)
                if j > 0:
                    _blend_into(row[j - 1], tile, blend_extent, dim=3)
            stitched_rows.append(torch.cat([tile[:, :, :row_limit, :row_limit] for tile in row], dim=3))
        return torch.cat(stitched_rows, dim=2)


def _blend_into(previous: torch.Tensor, tile: torch.Tensor, blend_extent: int, dim: int) -> None:
    """Cross-fade the first `blend_extent` rows (dim=2) or columns (dim=3) of `tile` from `previous`'s last ones."""
    extent = min(previous.shape[dim], tile.shape[dim], blend_extent)
    if extent == 0:
        return
    weight = torch.arange(extent, dtype=torch.float64, device=tile.device) / extent  # y / extent, as a Python float
    shape = [extent, 1] if dim == 2 else [extent]
    weight_tile, weight_previous = weight.to(tile.dtype).view(shape), (1 - weight).to(tile.dtype).view(shape)
    head = tile.narrow(dim, 0, extent)
    head.copy_(previous.narrow(dim, previous.shape[dim] - extent, extent) * weight_previous + head * weight_tile)
