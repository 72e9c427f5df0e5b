"""The embedding that conditions every ResNet block of the U-Net and the ControlNet: time, class and added conditions.

The timestep's sinusoidal embedding (Vaswani et al. 2017, arXiv:1706.03762, Sec. 3.5, as DDPM uses it: Ho et al.
2020, arXiv:2006.11239, Appendix B; `Timesteps` and `TimestepEmbedding` in `layers.py`) through an MLP, plus, when
the config asks for them, the class labels and the added conditions that diffusers' `UNet2DConditionModel` takes:
LCM's guidance-scale condition (Luo et al. 2023, arXiv:2310.04378), class labels by `class_embed_type`, and SDXL's
pooled text and size conditions (Podell et al. 2023, arXiv:2307.01952, Sec. 2.2). Module names equal diffusers'
(`time_proj`, `time_embedding`, `class_embedding`, `add_time_proj`, `add_embedding`), so its checkpoints load with
strict keys.
"""

from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

from .layers import TimestepEmbedding, Timesteps

TIME_EMBED_MULT = 4  # time embedding width = 4 x block_out_channels[0] (DDPM)


def time_embed_dim(config: FrozenDict) -> int:
    """Width of the time embedding: 4 x the first level's channels (DDPM)."""
    return config.block_out_channels[0] * TIME_EMBED_MULT


def blocks_time_embed_dim(config: FrozenDict) -> int:
    """Width of the embedding the ResNet blocks take: twice the time embedding's when the class embedding is
    concatenated to it (`class_embeddings_concat`) rather than added."""
    return time_embed_dim(config) * (2 if config.get("class_embeddings_concat") else 1)


class ConditionedTimestepEmbedding(TimestepEmbedding):
    """`TimestepEmbedding` that first adds a projected condition to the sinusoidal embedding: LCM's embedding of the
    guidance scale (Luo et al. 2023, Sec. 4.2), built when the config sets `time_cond_proj_dim`."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str, cond_proj_dim: int | None) -> None:
        super().__init__(in_channels, time_embed_dim, act_fn)
        self.cond_proj = None if cond_proj_dim is None else nn.Linear(cond_proj_dim, in_channels, bias=False)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError(
                    "timestep_cond was given, but this model has time_cond_proj_dim=None; pass timestep_cond=None, "
                    "or use a model configured with time_cond_proj_dim (an LCM-distilled U-Net)"
                )
            sample = sample + self.cond_proj(condition)
        return super().forward(sample)


def _class_embedding(config: FrozenDict, embed_dim: int, act_fn: str) -> nn.Module | None:
    """The layer that embeds `class_labels` into the time embedding's space, by `class_embed_type`: a table of
    `num_class_embeds` rows (None), the sinusoid and an MLP ("timestep"), the labels themselves ("identity"), an MLP
    ("projection") or a linear map ("simple_projection") of `projection_class_embeddings_input_dim` features."""
    kind, input_dim = config.class_embed_type, config.projection_class_embeddings_input_dim
    if kind is None:
        return None if config.num_class_embeds is None else nn.Embedding(config.num_class_embeds, embed_dim)
    if kind == "timestep":
        return TimestepEmbedding(config.block_out_channels[0], embed_dim, act_fn)
    if kind == "identity":
        return nn.Identity()
    if input_dim is None:
        raise ValueError(f"class_embed_type={kind!r} needs projection_class_embeddings_input_dim; it is None")
    return TimestepEmbedding(input_dim, embed_dim) if kind == "projection" else nn.Linear(input_dim, embed_dim)


class TimeEmbeddingMixin:
    """The embedding every ResNet block adds: the timestep's sinusoid through an MLP (DDPM), plus the class-label
    embedding and SDXL's added conditions when the config asks for them. The U-Net and the ControlNet both use it,
    under diffusers' module names (`time_proj`, `time_embedding`, `class_embedding`, `add_time_proj`,
    `add_embedding`)."""

    def build_time_embedding(self, config: FrozenDict, class_act_fn: str) -> None:
        width, embed_dim = config.block_out_channels[0], time_embed_dim(config)
        self.time_proj = Timesteps(width, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = ConditionedTimestepEmbedding(
            width, embed_dim, config.act_fn, config.get("time_cond_proj_dim")
        )
        self.class_embedding = _class_embedding(config, embed_dim, class_act_fn)
        if config.addition_embed_type == "text_time":
            if config.addition_time_embed_dim is None or config.projection_class_embeddings_input_dim is None:
                raise ValueError(
                    "addition_embed_type='text_time' needs addition_time_embed_dim and "
                    "projection_class_embeddings_input_dim, the widths of SDXL's size embedding and of its input"
                )
            self.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, embed_dim)

    def embed_time(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        timestep_cond: torch.Tensor | None,
        class_labels: torch.Tensor | None,
        added_cond_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """emb(t) [+ or ⊕ emb(class)] [+ emb(SDXL text and sizes)], shaped (B, width of the blocks' embedding)."""
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
        temb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype), timestep_cond)  # (B, time_embed_dim)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    f"class_labels is None, but this model embeds class labels (class_embed_type="
                    f"{self.config.class_embed_type!r}, num_class_embeds={self.config.num_class_embeds!r}); pass them"
                )
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(sample.dtype)
            class_emb = self.class_embedding(class_labels).to(sample.dtype)  # (B, time_embed_dim)
            concat = self.config.get("class_embeddings_concat")
            temb = torch.cat([temb, class_emb], dim=-1) if concat else temb + class_emb
        if self.config.addition_embed_type == "text_time":
            missing = {"text_embeds", "time_ids"} - set(added_cond_kwargs or {})
            if missing:
                raise ValueError(
                    f"added_cond_kwargs lacks {sorted(missing)}: addition_embed_type='text_time' (SDXL) needs the "
                    "pooled text embedding `text_embeds` and the size conditions `time_ids`"
                )
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())  # (B * n_ids, add_time_dim)
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, n_ids * add_time_dim)
            temb = temb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(temb.dtype))
        return temb
