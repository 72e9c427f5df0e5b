"""CLIP: a text transformer and a vision transformer trained contrastively on image–caption pairs.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", arXiv:2103.00020.
Stable Diffusion conditions its U-Net on the text tower alone: `last_hidden_state` (or, for clip skip and SD 2, a
penultimate entry of `hidden_states`) is the cross-attention context.

The reference is transformers' `modeling_clip.py` (transformers 5). Every parameter carries the same name as in
`CLIPTextModel` and `CLIPModel`, so weights move between the two implementations by `save_pretrained` /
`from_pretrained` with strict keys; `ScratchCLIPVisionModelWithProjection` is the image encoder of IP-Adapter, with the
keys of `CLIPVisionModelWithProjection`. Like transformers 5, the text model saves its weights without the `text_model.`
prefix and loads checkpoints with or without it (the official SD v1.5 `text_encoder` carries the prefix).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .layers import RespectUmaskOnSaveMixin, get_activation

# The towers' `hidden_act`: quick_gelu in CLIP ViT-L/14 (SD 1.x), gelu in OpenCLIP ViT-H/14 (SD 2.x).
HiddenAct = Literal["quick_gelu", "gelu"]


# transformers' CLIP configs hold the same fields under these model types.
_TRANSFORMERS_MODEL_TYPES = {
    "clip_text_model": "scratch_clip_text_model",
    "clip_vision_model": "scratch_clip_vision_model",
    "clip": "scratch_clip",
}


def _adopt_transformers_model_types(config_dict: dict) -> dict:
    """Rename transformers' CLIP model types to ours (recursing into sub-configs), so that loading an official
    `config.json` does not log a model-type mismatch."""
    adopted = {
        key: _adopt_transformers_model_types(value) if isinstance(value, dict) else value
        for key, value in config_dict.items()
    }
    if adopted.get("model_type") in _TRANSFORMERS_MODEL_TYPES:
        adopted["model_type"] = _TRANSFORMERS_MODEL_TYPES[adopted["model_type"]]
    return adopted


class _LoadsTransformersCLIPConfigs:
    """Config mixin: `from_pretrained` also reads transformers' CLIP configs, whose fields are ours."""

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return _adopt_transformers_model_types(config_dict), kwargs


class _TowerConfigChecks:
    """Config mixin: architecture checks shared by the text and vision towers."""

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}."
            )
        supported = get_args(HiddenAct)
        if self.hidden_act not in supported:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(supported)}.")


class ScratchCLIPTextConfig(_LoadsTransformersCLIPConfigs, _TowerConfigChecks, PreTrainedConfig):
    """Configuration of the CLIP text transformer; the fields and defaults are those of transformers'
    `CLIPTextConfig`. SD v1.x uses hidden_size=768, intermediate_size=3072, num_attention_heads=12 (CLIP ViT-L/14);
    SD 2.x uses hidden_size=1024, intermediate_size=4096, 23 layers, 16 heads and hidden_act="gelu" (OpenCLIP ViT-H)."""

    model_type = "scratch_clip_text_model"
    base_config_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: HiddenAct = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: int | float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407


class ScratchCLIPVisionConfig(_LoadsTransformersCLIPConfigs, _TowerConfigChecks, PreTrainedConfig):
    """Configuration of the CLIP vision transformer (ViT); fields and defaults of transformers' `CLIPVisionConfig`."""

    model_type = "scratch_clip_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: HiddenAct = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: int | float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0


class ScratchCLIPConfig(_LoadsTransformersCLIPConfigs, PreTrainedConfig):
    """Configuration of the two-tower CLIP model: a text and a vision config, the shared embedding width
    `projection_dim` and the initial temperature `logit_scale_init_value` = log(1 / 0.07)."""

    model_type = "scratch_clip"
    sub_configs_defaults = {"text_config": ScratchCLIPTextConfig, "vision_config": ScratchCLIPVisionConfig}

    text_config: dict | ScratchCLIPTextConfig | None = None
    vision_config: dict | ScratchCLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0


TowerConfig = ScratchCLIPTextConfig | ScratchCLIPVisionConfig


class CLIPAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (softmax(q kᵀ / √d_head) v). With
    `output_attentions` the product is spelled out, since SDPA does not return the softmax weights."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, width = hidden_states.shape
        heads_shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (B, nh, T, hs)
        key = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (B, nh, T, hs)
        value = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = query @ key.transpose(-2, -1) * self.head_dim**-0.5  # (B, nh, T, T)
            if is_causal:
                attention_mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=scores.device).tril()
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            attended = F.dropout(weights, dropout, self.training) @ value
        else:
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal
            )
        attended = attended.transpose(1, 2).reshape(batch_size, seq_len, width)  # (B, T, C)
        return self.out_proj(attended), weights


class CLIPMLP(nn.Module):
    """The position-wise feed-forward network: fc2(act(fc1(x)))."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.config = config
        self.activation = get_activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.self_attn(
            self.layer_norm1(hidden_states), attention_mask, is_causal, output_attentions
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.layer_norm2(hidden_states)), weights


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` encoder layers. Returns the last state and, on request, the input followed by every
    layer's output, and every layer's attention weights."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states, weights = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, attention_mask, is_causal, output_attentions
                )
            else:
                hidden_states, weights = layer(hidden_states, attention_mask, is_causal, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden_states, all_attentions


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: ScratchCLIPTextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)  # (B, T, C)


class CLIPVisionEmbeddings(nn.Module):
    """ViT input: non-overlapping patches projected by a strided convolution, a learned class token prepended, plus
    learned position embeddings (Dosovitskiy et al. 2020, arXiv:2010.11929)."""

    def __init__(self, config: ScratchCLIPVisionConfig):
        super().__init__()
        self.config = config
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        shape = tuple(pixel_values.shape)
        size_fits = shape[2:] == expected[1:] or interpolate_pos_encoding
        if pixel_values.ndim != 4 or shape[1] != expected[0] or not size_fits:
            raise ValueError(
                f"pixel_values has shape {shape}; this model takes (batch, {', '.join(map(str, expected))}), or any "
                "height and width with interpolate_pos_encoding=True."
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, H/p, W/p)
        grid_size = patches.shape[2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C)
        class_token = self.class_embedding.expand(len(patches), 1, -1)  # (B, 1, C)
        embeddings = torch.cat([class_token, patches], dim=1)  # (B, N + 1, C)
        return embeddings + self.position_embeddings_for(*grid_size)

    def position_embeddings_for(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The position embeddings of a grid_height × grid_width patch grid: the trained square grid's, resized
        bicubically when the grid differs (transformers' `interpolate_pos_encoding`, after DINO, Caron et al. 2021,
        arXiv:2104.14294); the class token's stays as it is."""
        side = self.config.image_size // self.config.patch_size
        if (grid_height, grid_width) == (side, side):
            return self.position_embedding.weight  # (N + 1, C)
        class_position, patch_positions = self.position_embedding.weight[:1], self.position_embedding.weight[1:]
        grid = patch_positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, side, side)
        grid = F.interpolate(grid, size=(grid_height, grid_width), mode="bicubic", align_corners=False)
        return torch.cat([class_position, grid.flatten(2)[0].t()])  # (grid_height · grid_width + 1, C)


class CLIPVisionTransformer(nn.Module):
    """The ViT image tower; its pooled output is the LayerNormed class token."""

    def __init__(self, config: ScratchCLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> BaseModelOutputWithPooling:
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        last_hidden_state, hidden_states, attentions = self.encoder(
            hidden_states, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        pooled_output = self.post_layernorm(last_hidden_state[:, 0])  # (B, C)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
        )


def _unreadable_safetensors(folder: Path) -> list[str]:
    """The `.safetensors` files in `folder` whose header or extent is broken (e.g. an interrupted download)."""
    unreadable = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError:
            unreadable.append(str(path))
    return unreadable


class ScratchCLIPPreTrainedModel(RespectUmaskOnSaveMixin, PreTrainedModel):
    """CLIP's weight initialisation, gradient checkpointing, and loading errors that name the broken file."""

    supports_gradient_checkpointing = True
    # Checkpoints saved before transformers 4.31 carry the embeddings' `position_ids` buffer; ours computes it.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)position_ids$"]

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: transformers treats models defined outside it as remote code that may write parameters in place,
        and then skips `_init_weights` for every module that owns no parameter itself (attention, MLP, embeddings),
        which would leave CLIP's scheme unapplied. Ours initialises only through `transformers.initialization`,
        which leaves loaded parameters alone, as transformers' own models do."""
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            unreadable = _unreadable_safetensors(folder) if folder.is_dir() else []
            raise ValueError(
                f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}) could not read "
                f"{', '.join(unreadable) or 'its weights file'} ({error}); the file is probably truncated or corrupt, "
                "so save or download it again."
            ) from error

    def _init_weights(self, module: nn.Module) -> None:
        """CLIP's scheme: normal weights whose std shrinks with width and depth, zero biases, unit LayerNorms."""
        factor = self.config.initializer_factor
        if isinstance(module, CLIPTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=module.config.initializer_range * factor)
            init.normal_(module.position_embedding.weight, std=module.config.initializer_range * factor)
        elif isinstance(module, CLIPVisionEmbeddings):
            config = module.config
            init.normal_(module.class_embedding, std=config.hidden_size**-0.5 * factor)
            init.normal_(module.patch_embedding.weight, std=config.initializer_range * factor)
            init.normal_(module.position_embedding.weight, std=config.initializer_range * factor)
        elif isinstance(module, (CLIPAttention, CLIPMLP)):
            width, depth = module.config.hidden_size, module.config.num_hidden_layers
            residual_std = width**-0.5 * (2 * depth) ** -0.5 * factor
            if isinstance(module, CLIPAttention):
                for projection in (module.q_proj, module.k_proj, module.v_proj):
                    init.normal_(projection.weight, std=residual_std)
                init.normal_(module.out_proj.weight, std=width**-0.5 * factor)
            else:
                init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
                init.normal_(module.fc2.weight, std=residual_std)
        elif isinstance(module, ScratchCLIPModel):
            init.normal_(module.text_projection.weight, std=module.text_projection.in_features**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.visual_projection.in_features**-0.5 * factor)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        elif isinstance(module, ScratchCLIPVisionModelWithProjection):
            init.normal_(module.visual_projection.weight, std=module.visual_projection.in_features**-0.5 * factor)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and module.bias is not None:
            init.zeros_(module.bias)


class ScratchCLIPTextModel(ScratchCLIPPreTrainedModel):
    """The CLIP text transformer with a causal mask: Stable Diffusion's text encoder.

    Parameters are named as in transformers' `CLIPTextModel`: `embeddings.token_embedding.weight`,
    `encoder.layers.{i}.self_attn.q_proj.weight`, ..., `final_layer_norm.weight`.
    """

    config_class = ScratchCLIPTextConfig
    # Checkpoints written by transformers 4 and the official SD `text_encoder` put every key under `text_model.`;
    # from_pretrained strips this prefix when our own keys lack it.
    base_model_prefix = "text_model"

    def __init__(self, config: ScratchCLIPTextConfig):
        super().__init__(config)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @property
    def text_model(self) -> "ScratchCLIPTextModel":
        """The model itself: diffusers' clip-skip path reads `text_encoder.text_model.final_layer_norm`."""
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.token_embedding = value

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, sequence); got shape {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per sequence, but the model has only "
                f"max_position_embeddings={self.config.max_position_embeddings} positions; truncate the prompt "
                "(tokenizer(..., truncation=True))."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"input_ids holds token ids from {int(input_ids.min())} to {int(input_ids.max())}, but the vocabulary "
                f"has vocab_size={self.config.vocab_size} entries (ids 0 to {self.config.vocab_size - 1}); was the "
                "tokenizer built for another text encoder?"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; it must match input_ids' shape "
                f"{tuple(input_ids.shape)}."
            )

    def _eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.eos_token_id == 2:
            # Configs written before transformers PR #24773 (SD v1.x/2.x text encoders among them) carry a wrong
            # eos_token_id of 2; in CLIP's vocabulary the end-of-text token has the highest id of each sequence.
            return input_ids.argmax(dim=-1)
        # The first end-of-text token (the pad token may equal it).
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode token ids of shape (batch, sequence).

        Returns `last_hidden_state` (after the final LayerNorm), `pooler_output` (the state at each sequence's
        end-of-text token) and, with `output_hidden_states`, the embeddings plus the output of every layer (before
        the final LayerNorm). `attention_mask` (1 = token, 0 = padding) is combined with the causal mask.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        self._check_inputs(input_ids, attention_mask)

        hidden_states = self.embeddings(input_ids)  # (B, T, C)
        mask = None
        if attention_mask is not None:
            seq_len = input_ids.shape[1]
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
            mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        last_hidden_state, hidden_states, _ = self.encoder(
            hidden_states, mask, is_causal=mask is None, output_hidden_states=output_hidden_states
        )
        last_hidden_state = self.final_layer_norm(last_hidden_state)
        batch_index = torch.arange(len(input_ids), device=input_ids.device)
        pooled_output = last_hidden_state[batch_index, self._eos_positions(input_ids)]  # (B, C)

        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled_output, hidden_states=hidden_states
        )
        return output if return_dict else output.to_tuple()


@dataclass
class ScratchCLIPOutput(ModelOutput):
    """Result of `ScratchCLIPModel.forward`.

    loss: the symmetric contrastive loss, when `return_loss=True`.
    logits_per_image: (num_images, num_texts) scaled cosine similarities; `logits_per_text` is its transpose.
    text_embeds, image_embeds: the projected, L2-normalised embeddings.
    text_model_output, vision_model_output: the towers' outputs before projection.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, Figure 3): the i-th text matches the i-th image, and the
    cross-entropy is averaged over both directions."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


class ScratchCLIPModel(ScratchCLIPPreTrainedModel):
    """Text and vision towers, linear projections into a shared space, and a learned temperature.

    Parameters are named as in transformers' `CLIPModel` (`text_model.*`, `vision_model.*`, `text_projection`,
    `visual_projection`, `logit_scale`).
    """

    config_class = ScratchCLIPConfig
    base_model_prefix = "clip"

    def __init__(self, config: ScratchCLIPConfig):
        super().__init__(config)
        self.text_model = ScratchCLIPTextModel(config.text_config)
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The projected (not normalised) text embedding, shape (batch, projection_dim)."""
        return self.text_projection(self.text_model(input_ids, attention_mask, return_dict=True).pooler_output)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected (not normalised) image embedding, shape (batch, projection_dim)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ScratchCLIPOutput | tuple:
        """Score every text against every image: logits = exp(logit_scale) · cos(text_embed, image_embed)."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        text_output = self.text_model(input_ids, attention_mask, output_hidden_states, return_dict=True)
        vision_output = self.vision_model(pixel_values, output_hidden_states)

        text_embeds = self.text_projection(text_output.pooler_output)  # (B_text, D)
        image_embeds = self.visual_projection(vision_output.pooler_output)  # (B_image, D)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()  # (B_text, B_image)

        output = ScratchCLIPOutput(
            loss=contrastive_loss(logits_per_text) if return_loss else None,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_output,
            vision_model_output=vision_output,
        )
        return output if return_dict else output.to_tuple()


@dataclass
class ScratchCLIPVisionModelOutput(ModelOutput):
    """Result of `ScratchCLIPVisionModelWithProjection.forward`; the fields of transformers' `CLIPVisionModelOutput`.

    image_embeds: (batch, projection_dim), the projected class token (not normalised).
    last_hidden_state: (batch, patches + 1, hidden_size), the last layer's output.
    hidden_states: with `output_hidden_states`, the embeddings (after `pre_layrnorm`) followed by every layer's output.
    attentions: with `output_attentions`, every layer's attention weights, (batch, heads, patches + 1, patches + 1).
    """

    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ScratchCLIPVisionModelWithProjection(ScratchCLIPPreTrainedModel):
    """The vision tower and its linear projection into CLIP's joint embedding space, I_e = I_f · W_i (Radford et al.
    2021, Figure 3, before its L2 normalisation): the image encoder of IP-Adapter, which takes `image_embeds`, or
    `hidden_states[-2]` for IP-Adapter Plus.

    Parameters are named as in transformers' `CLIPVisionModelWithProjection` (`vision_model.*`, `visual_projection`)
    and the config is its `CLIPVisionConfig`, so each class loads the other's `save_pretrained` folder.
    """

    config_class = ScratchCLIPVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"

    def __init__(self, config: ScratchCLIPVisionConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Conv2d:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        *,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> ScratchCLIPVisionModelOutput | tuple:
        """Encode images of shape (batch, num_channels, image_size, image_size); other sizes with
        `interpolate_pos_encoding`, which resizes the position embeddings. The arguments are transformers'."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if return_dict is None:
            return_dict = self.config.return_dict
        vision_output = self.vision_model(
            pixel_values, output_hidden_states, output_attentions, interpolate_pos_encoding
        )
        output = ScratchCLIPVisionModelOutput(
            image_embeds=self.visual_projection(vision_output.pooler_output),  # (B, D)
            last_hidden_state=vision_output.last_hidden_state,
            hidden_states=vision_output.hidden_states,
            attentions=vision_output.attentions,
        )
        return output if return_dict else output.to_tuple()


AutoConfig.register(ScratchCLIPTextConfig.model_type, ScratchCLIPTextConfig, exist_ok=True)
AutoConfig.register(ScratchCLIPVisionConfig.model_type, ScratchCLIPVisionConfig, exist_ok=True)
AutoConfig.register(ScratchCLIPConfig.model_type, ScratchCLIPConfig, exist_ok=True)
AutoModel.register(ScratchCLIPTextConfig, ScratchCLIPTextModel, exist_ok=True)
AutoModel.register(ScratchCLIPConfig, ScratchCLIPModel, exist_ok=True)
