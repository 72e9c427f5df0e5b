"""Building blocks that the VAE and the U-Net share in the same form, and the activations of all three models.

The ResNet block, the SDPA attention, the 2x down/up sampling and the sinusoidal timestep embedding of Latent
Diffusion (Rombach et al. 2022, arXiv:2112.10752), which inherits them from DDPM (Ho et al. 2020, arXiv:2006.11239,
Appendix B) and the Transformer (Vaswani et al. 2017, arXiv:1706.03762). Module and parameter names equal those of
`diffusers.models.resnet.ResnetBlock2D`, `diffusers.models.attention_processor.Attention`,
`diffusers.models.downsampling.Downsample2D`, `diffusers.models.upsampling.Upsample2D` and
`diffusers.models.embeddings.TimestepEmbedding`, so diffusers' state dicts load with strict keys. The attention
follows diffusers' attention-processor protocol, so diffusers' processors (and peft's LoRA layers) run on it.
"""

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import SlicedAttnProcessor, XFormersAttnProcessor
from diffusers.utils import is_xformers_available
from torch import nn


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP uses: x · σ(1.702 x) (Hendrycks & Gimpel 2016,
    arXiv:1606.08415, Sec. 2)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * torch.sigmoid(1.702 * hidden_states)


# The activations that config keys name (diffusers' `act_fn`, transformers' `hidden_act`), as in diffusers' `ACT2CLS`
# and transformers' `ACT2FN`.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
}


def get_activation(act_fn: str) -> nn.Module:
    """The activation module named by a config's `act_fn` (or `hidden_act`)."""
    if act_fn.lower() not in ACTIVATIONS:
        raise ValueError(f"act_fn={act_fn!r} is not supported; allowed: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act_fn.lower()]()


class StrictFromPretrainedMixin:
    """`from_pretrained` that refuses a checkpoint whose keys do not fit the config, naming the offending keys.

    diffusers' `ModelMixin.from_pretrained` only warns about missing or unexpected keys and leaves the missing weights
    randomly initialised; a model built from such a checkpoint runs but is silently wrong.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        offenders = {
            kind: sorted(loading_info[kind]) for kind in ("missing_keys", "unexpected_keys") if loading_info[kind]
        }
        if offenders:
            listing = "; ".join(
                f"{len(keys)} {kind.replace('_', ' ')}: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for kind, keys in offenders.items()
            )
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path!s} does not fit {cls.__name__} built from its "
                f"config.json ({listing}). Check that config.json belongs to these weights."
            )
        return (model, loading_info) if output_loading_info else model


def process_umask() -> int:
    """This process's umask, read without changing it (from /proc when it can; else by setting and restoring it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class RespectUmaskOnSaveMixin:
    """`save_pretrained` whose files get the permissions the umask allows. safetensors' `save_file`, which both
    diffusers and transformers call, creates its files with mode 0600 whatever the umask, so another user (or a web
    server serving the folder) could not read a model saved with umask 022.

    `variant` is named in the signature because diffusers' pipeline `save_pretrained` passes it only to a component
    whose `save_pretrained` has a parameter of that name (`pipe.save_pretrained(folder, variant="fp16")`)."""

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, variant: str | None = None, **kwargs: Any
    ) -> Any:
        result = super().save_pretrained(save_directory, *args, variant=variant, **kwargs)
        mode = 0o666 & ~process_umask()
        for path in Path(save_directory).rglob("*.safetensors"):
            os.chmod(path, mode)
        return result


class CheckpointedBlock(nn.Module):
    """A block whose layers are recomputed in the backward pass when gradient checkpointing is on.

    `ModelMixin.enable_gradient_checkpointing` finds every module with a `gradient_checkpointing` attribute and sets it,
    together with `_gradient_checkpointing_func` (non-reentrant `torch.utils.checkpoint.checkpoint` by default).
    """

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func: Callable | None = None

    def run_layer(self, layer: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer, *args)
        return layer(*args)


class ResnetBlock2D(nn.Module):
    """Pre-activation ResNet block with an optional additive time embedding (DDPM, Appendix B).

    h = conv2(act(norm2(conv1(act(norm1(x))) + W·act(t_emb)))), out = (shortcut(x) + h) / output_scale_factor
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        act_fn: str = "silu",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(act_fn)
        # A 1x1 projection lets the residual change its channel count.
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        if self.time_emb_proj is not None and temb is not None:
            hidden_states = hidden_states + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        hidden_states = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden_states))))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        output = shortcut + hidden_states
        # x / 1.0 == x exactly, so the usual factor of 1 skips a pass over the activations.
        return output if self.output_scale_factor == 1.0 else output / self.output_scale_factor


class ScratchAttnProcessor:
    """softmax(QKᵀ / √d) V (Vaswani et al. Eq. 1) through `F.scaled_dot_product_attention`: the default processor.

    An attention processor is what diffusers' `Attention` delegates its computation to, called as
    `processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None)`. Ours reads the same attributes of
    `attn` as diffusers' processors, so the two are interchangeable: `AttnProcessor`, `SlicedAttnProcessor`,
    `XFormersAttnProcessor`, `FusedAttnProcessor2_0`, ... run on our `Attention`, and this one on the attention layers
    of diffusers' SD U-Net and VAE (which have no spatial or query/key norms). It reads the fused `to_qkv` / `to_kv`
    projections once `fuse_projections` has made them, and with `upcast_attention` it runs the attention product of a
    half-precision model in float32, as LDM's SD 2 models require.

    A spatial input (B, C, H, W) is group-normed, attended over its H·W pixels and, with `residual_connection`, added
    back to itself (the VAE's mid-block attention, LDM `AttnBlock`).
    """

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(
                "ScratchAttnProcessor takes no attention_mask (Stable Diffusion attends to every token); set "
                "diffusers' AttnProcessor2_0 with set_attn_processor to use one."
            )
        residual = hidden_states
        spatial_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial_shape is not None:
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, H*W, C)
        elif attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = self.project_qkv(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, L, d)
        key = key.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, S, d)
        value = value.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, S, d)
        if attn.upcast_attention and query.dtype in (torch.float16, torch.bfloat16):
            query, key, value = query.float(), key.float(), value.float()
        attention = self.attend(query, key, value)  # (B, heads, L, d)
        attention = attention.transpose(1, 2).flatten(2).to(hidden_states.dtype)  # (B, L, heads*d)
        hidden_states = attn.to_out[1](attn.to_out[0](attention))
        if spatial_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(spatial_shape)  # (B, C, H, W)
        if attn.residual_connection:
            hidden_states = residual + hidden_states
        # x / 1.0 == x exactly, so the usual factor of 1 skips a pass over the activations.
        return hidden_states if attn.rescale_output_factor == 1.0 else hidden_states / attn.rescale_output_factor

    @staticmethod
    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ / √d) V for (B, heads, tokens, d) tensors; a fast path overrides this alone
        (`hf_scratch.fast.attention.BF16AttnProcessor`)."""
        return F.scaled_dot_product_attention(query, key, value)

    @staticmethod
    def project_qkv(
        attn: "Attention", hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q = x W_q, K = c W_k, V = c W_v with c the context (x itself for self-attention), through the fused
        `to_qkv` (self-attention) or `to_kv` (cross-attention) projection when `fuse_projections` has made one."""
        if encoder_hidden_states is None:
            if attn.fused_projections and hasattr(attn, "to_qkv"):
                return attn.to_qkv(hidden_states).chunk(3, dim=-1)
            return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.to_q(hidden_states)
        if attn.fused_projections and hasattr(attn, "to_kv"):
            return (query, *attn.to_kv(encoder_hidden_states).chunk(2, dim=-1))
        return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


class Attention(AttentionModuleMixin, nn.Module):
    """Multi-head (cross-)attention, softmax(QK^T / sqrt(d)) V (Vaswani et al. Eq. 1), computed by a processor.

    Keys and values come from `encoder_hidden_states` when given (cross-attention), otherwise from the queries' own
    tokens. The module holds the projections and hands the computation to `self.processor`, `ScratchAttnProcessor`
    unless `set_processor` (or a model's `set_attn_processor`) installs another. diffusers' `AttentionModuleMixin`
    supplies `set_processor`, `get_processor`, `fuse_projections` / `unfuse_projections` and the reshaping helpers that
    diffusers' own processors call; the attributes below are the rest of the interface those processors read.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
        residual_connection: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.inner_dim = inner_dim
        self.scale = dim_head**-0.5  # 1/√d, which diffusers' non-SDPA processors apply themselves
        self.upcast_attention = upcast_attention
        self.upcast_softmax = False
        self.use_bias = bias
        self.is_cross_attention = cross_attention_dim is not None
        self.residual_connection = residual_connection
        self.rescale_output_factor = 1.0
        self.sliceable_head_dim = heads  # `SlicedAttnProcessor` slices the (batch x heads) axis
        # Stages of diffusers' processor protocol that Stable Diffusion's attention does not have.
        self.group_norm = self.spatial_norm = self.norm_cross = self.norm_q = self.norm_k = None
        self.added_kv_proj_dim = None
        key_value_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(key_value_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(key_value_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(dropout)])
        self.set_processor(ScratchAttnProcessor())

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states)

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute the attention `slice_size` (batch x head) rows at a time with diffusers' `SlicedAttnProcessor`, so
        that at most slice_size x L x S attention scores exist at once; `None` restores `ScratchAttnProcessor`."""
        if slice_size is None:
            self.set_processor(ScratchAttnProcessor())
            return
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or not 1 <= slice_size <= self.heads:
            raise ValueError(f"slice_size={slice_size!r} must be an integer from 1 to this layer's {self.heads} heads")
        self.set_processor(SlicedAttnProcessor(slice_size))

    def set_use_memory_efficient_attention_xformers(
        self, use_memory_efficient_attention_xformers: bool, attention_op: Callable | None = None
    ) -> None:
        """Install diffusers' `XFormersAttnProcessor` (or, when turning it off, `ScratchAttnProcessor` again). Without
        xformers or CUDA this raises rather than leaving the attention as it was."""
        if not use_memory_efficient_attention_xformers:
            self.set_processor(ScratchAttnProcessor())
            return
        if not is_xformers_available():
            raise ModuleNotFoundError(
                "enable_xformers_memory_efficient_attention needs the xformers package (pip install xformers) and a "
                "CUDA GPU; without them the default ScratchAttnProcessor (PyTorch SDPA) is already memory-efficient.",
                name="xformers",
            )
        if not torch.cuda.is_available():
            raise ValueError("enable_xformers_memory_efficient_attention needs a CUDA GPU, and torch sees none.")
        self.set_processor(XFormersAttnProcessor(attention_op=attention_op))


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the pixels of a feature map, with a group norm in front and a residual around it
    (the VAE's mid-block attention, LDM `AttnBlock`); the processor receives the map itself, (B, C, H, W)."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__(query_dim=channels, heads=1, dim_head=channels, bias=True, residual_connection=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)


class Downsample2D(nn.Module):
    """Halve the spatial size with a stride-2 3x3 convolution.

    `padding=0` reproduces LDM's VAE, which pads only right and bottom by one pixel before the convolution.
    """

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(hidden_states)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Double the spatial size by nearest-neighbour interpolation (or reach `output_size`, the size of the skip it
    meets when the input was odd-sized on the way down), then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")  # (B, C, *output_size)
        return self.conv(hidden_states)


def get_timestep_embedding(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. Sec. 3.5), as `diffusers.models.embeddings`.

    freq_i = max_period^(-i / (half_dim - downscale_freq_shift)), emb = [sin(t·freq), cos(t·freq)] (or cos first).
    """
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half_dim, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half_dim - downscale_freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]  # (B, half_dim)
    if flip_sin_to_cos:
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*half_dim)
    else:
        embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2*half_dim)
    if embedding_dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))  # (B, embedding_dim)
    return embedding


class Timesteps(nn.Module):
    """Parameter-free module form of `get_timestep_embedding`."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding: linear_2(act(linear_1(emb)))."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))
