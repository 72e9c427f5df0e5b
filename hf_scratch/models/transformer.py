"""The spatial transformer of Latent Diffusion: the U-Net's feature maps attend to themselves and to the text.

Rombach et al. 2022 (arXiv:2112.10752, Sec. 3.3 and Appendix E): the feature map's pixels become tokens, pass
through pre-norm Transformer layers (Vaswani et al. 2017, arXiv:1706.03762): self-attention, cross-attention to the
text encoder's tokens, and a feed-forward with a GELU-gated linear unit, GEGLU (Shazeer 2020, arXiv:2002.05202),
and return to the map through a residual. Module and parameter names equal diffusers' `Transformer2DModel` and
`BasicTransformerBlock`, so SD checkpoints load with strict keys. `AttentionExtras` carries what diffusers' U-Net
hands its attention processors beside the tokens (masks and processor arguments).
"""

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .layers import Attention, ScratchAttnProcessor

# Constants that diffusers and LDM fix rather than configure.
FEED_FORWARD_MULT = 4  # transformer MLP width = 4 x model width (Vaswani et al.)
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5
MASKED_OUT_BIAS = -10000.0  # the score bias diffusers gives a token its mask discards


@dataclass(frozen=True)
class AttentionExtras:
    """What the attention layers take besides the tokens, as diffusers' U-Net hands it to its attention processors.

    The masks are additive biases on the attention scores (0 to keep a token, `MASKED_OUT_BIAS` to drop it), shaped
    (B, 1, key tokens); `processor_kwargs` is the rest of `cross_attention_kwargs` (IP-Adapter's `ip_adapter_masks`,
    ...), each passed to the processors that name it. With none of them set the U-Net passes `None` instead, and every
    attention layer runs its plain `forward`.
    """

    attention_mask: torch.Tensor | None = None  # on self-attention (attn1)
    encoder_attention_mask: torch.Tensor | None = None  # on cross-attention to the text (attn2)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)

    def attend(
        self,
        attention: Attention,
        hidden_states: torch.Tensor,
        context: torch.Tensor | tuple | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`attention(hidden_states, context)` with `mask` and the processor arguments. `ScratchAttnProcessor` takes
        no mask, so a masked call goes through diffusers' `AttnProcessor2_0` (SDPA with the bias), as it would on
        diffusers' U-Net."""
        if mask is None and not self.processor_kwargs:
            return attention(hidden_states, context)
        processor = attention.processor
        if mask is not None and isinstance(processor, ScratchAttnProcessor):
            processor = AttnProcessor2_0()
        accepted = inspect.signature(processor.__call__).parameters
        kwargs = {name: value for name, value in self.processor_kwargs.items() if name in accepted}
        return processor(attention, hidden_states, context, attention_mask=mask, **kwargs)


NO_EXTRAS = AttentionExtras()


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A keep (1) / discard (0) mask (B, tokens) as the score bias diffusers' processors add, (B, 1, tokens)."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * MASKED_OUT_BIAS).unsqueeze(1)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, arXiv:2002.05202): one projection to 2x width, split, x · GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)  # (B, L, dim_out) each
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        inner_dim = dim * FEED_FORWARD_MULT
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the text, GEGLU feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        cross_attention_dim: int,
        only_cross_attention: bool,
        upcast_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self_attention_context_dim = cross_attention_dim if only_cross_attention else None
        self.attn1 = Attention(dim, num_heads, head_dim, self_attention_context_dim, False, upcast_attention, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn2 = Attention(dim, num_heads, head_dim, cross_attention_dim, False, upcast_attention, dropout)
        self.norm3 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.ff = FeedForward(dim, dropout)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, extras: AttentionExtras | None = None
    ) -> torch.Tensor:
        extras = NO_EXTRAS if extras is None else extras
        self_context = encoder_hidden_states if self.only_cross_attention else None
        attended = extras.attend(self.attn1, self.norm1(hidden_states), self_context, extras.attention_mask)
        hidden_states = hidden_states + attended
        attended = extras.attend(
            self.attn2, self.norm2(hidden_states), encoder_hidden_states, extras.encoder_attention_mask
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.ff(self.norm3(hidden_states))


class Transformer2DModel(nn.Module):
    """LDM's spatial transformer: group norm, project the pixels to tokens, transformer layers, project back, residual.

    `use_linear_projection` (SD 2) projects with linear layers on the tokens instead of 1x1 convolutions on the map.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int,
        groups: int,
        use_linear_projection: bool,
        only_cross_attention: bool,
        upcast_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, in_channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, num_heads, head_dim, cross_attention_dim, only_cross_attention, upcast_attention, dropout
            )
            for _ in range(num_layers)
        )

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, extras: AttentionExtras | None = None
    ) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        # One copy into token-major layout, so every op in the transformer sees contiguous (B, L, C) tokens.
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, H*W, C)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, extras)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        # Back to (B, C, H, W): a free view for a channels-last input, else one copy to keep the convolutions NCHW.
        hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        if not residual.is_contiguous(memory_format=torch.channels_last):
            hidden_states = hidden_states.contiguous()
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual
