"""diffusers' adapter and attention-processor API, on our U-Net (and the attention-processor part on our VAE).

diffusers keeps most of this API in mixins, which `UNetAdapterMixin` inherits unchanged: `PeftAdapterMixin`
(`add_adapter`, `load_lora_adapter`, `set_adapters`, `disable_adapters`, `fuse_lora` / `unfuse_lora`, ...),
`UNet2DConditionLoadersMixin` (Custom Diffusion attention processors) and `AttentionMixin` (`attn_processors`,
`set_attn_processor`, `fuse_qkv_projections`; the VAE takes it through `AttentionProcessorsMixin`). The rest lives in
`UNet2DConditionModel` itself, or looks the U-Net up by class name or by diffusers' `Attention` type, and is restated
here: `set_default_attn_processor`, `set_attention_slice`, `enable_freeu` / `disable_freeu`, and the block-wise
weights of `set_adapters`.

LoRA (Hu et al. 2021, arXiv:2106.09685, Sec. 4.1) trains a low-rank update of a frozen weight W ∈ R^{d×k}:

    W' = W + (α / r) · B · A,    B ∈ R^{d×r}, A ∈ R^{r×k}, r ≪ min(d, k)

peft implements it by wrapping each target `nn.Linear` (`to_q`, `to_k`, `to_v`, `to_out.0` of every attention layer),
which works on our U-Net because its module names are diffusers'. A forward pass with
`cross_attention_kwargs={"scale": s}` uses W + s · (α / r) · B · A. `fuse_lora` writes that sum into W, and
`unfuse_lora` restores W bit for bit: peft's unmerge subtracts the product again, which floating point does not undo
exactly, so `keep_unfused_weights` copies W first and `restore_unfused_weights` puts the copy back.
"""

import math
from typing import Any

import torch
from diffusers.loaders import PeftAdapterMixin, UNet2DConditionLoadersMixin
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales_for_one_adapter
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_processor import CROSS_ATTENTION_PROCESSORS, AttnProcessor

from .layers import ScratchAttnProcessor


def keep_unfused_weights(model: torch.nn.Module) -> None:
    """Copy the base weight (and bias) of every LoRA-wrapped layer of `model` that holds no merged adapter yet, for
    `restore_unfused_weights`. The copies cost the memory of the adapted layers' weights while a LoRA is fused."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged and not hasattr(module, "unfused_weights"):
            base = module.get_base_layer()
            module.unfused_weights = {name: tensor.detach().clone() for name, tensor in base.named_parameters()}


def restore_unfused_weights(model: torch.nn.Module) -> None:
    """Put back the weights `keep_unfused_weights` copied, in every layer whose adapters are all unmerged again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged and hasattr(module, "unfused_weights"):
            with torch.no_grad():
                for name, tensor in module.get_base_layer().named_parameters():
                    tensor.copy_(module.unfused_weights[name])
            del module.unfused_weights


class AttentionProcessorsMixin(AttentionMixin):
    """diffusers' `AttentionMixin` (`attn_processors`, `set_attn_processor`, `fuse_qkv_projections`) and the
    `set_default_attn_processor` that diffusers' U-Net and autoencoder each define."""

    def set_default_attn_processor(self) -> None:
        """Put diffusers' plain `AttnProcessor` (softmax(QKᵀ · scale) V written out, without SDPA) in every attention
        layer, as diffusers' `set_default_attn_processor` does; `set_attn_processor(ScratchAttnProcessor())` restores
        this model's default."""
        unusual = sorted(
            {
                type(processor).__name__
                for processor in self.attn_processors.values()
                if not isinstance(processor, ScratchAttnProcessor) and type(processor) not in CROSS_ATTENTION_PROCESSORS
            }
        )
        if unusual:
            raise ValueError(
                f"set_default_attn_processor replaces plain attention processors only, but this model uses {unusual}; "
                "install the processors you want with set_attn_processor instead."
            )
        self.set_attn_processor(AttnProcessor())


class AttentionSlicingMixin:
    """`set_attention_slice` for a model built of our `Attention` layers (the U-Net and the ControlNet)."""

    def set_attention_slice(self, slice_size: str | int | list[int] | None = "auto") -> None:
        """Sliced attention: each attention layer computes its scores `slice_size` (batch x head) rows at a time with
        diffusers' `SlicedAttnProcessor`, trading speed for a smaller peak of memory.

        "auto" halves each layer's heads, "max" takes one row at a time, an int applies to every layer, and a list
        gives one size per attention layer (in `attn_processors` order). None turns slicing off.
        """
        layers = [module for module in self.modules() if isinstance(module, AttentionModuleMixin)]
        if slice_size == "auto":
            sizes = [max(layer.sliceable_head_dim // 2, 1) for layer in layers]
        elif slice_size == "max":
            sizes = [1] * len(layers)
        elif isinstance(slice_size, list):
            if len(slice_size) != len(layers):
                raise ValueError(
                    f"slice_size is a list of {len(slice_size)} sizes, but the model has {len(layers)} attention "
                    "layers; pass one size per layer, a single int, 'auto' or 'max'."
                )
            sizes = slice_size
        elif slice_size is None or (isinstance(slice_size, int) and not isinstance(slice_size, bool)):
            sizes = [slice_size] * len(layers)
        else:
            raise ValueError(f"slice_size={slice_size!r} must be 'auto', 'max', an int, a list of ints or None.")
        for layer, size in zip(layers, sizes):
            layer.set_attention_slice(size)


class UNetAdapterMixin(AttentionProcessorsMixin, AttentionSlicingMixin, UNet2DConditionLoadersMixin, PeftAdapterMixin):
    """LoRA adapters, attention processors and FreeU for a U-Net laid out as diffusers' `UNet2DConditionModel`
    (`down_blocks`, `mid_block`, `up_blocks`, each block's `attentions`)."""

    # What `fuse_qkv_projections` found, for `unfuse_qkv_projections` to put back.
    original_attn_processors: dict[str, Any] | None = None

    def fuse_lora(
        self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None
    ) -> None:
        """Merge the active adapters into the weights, W ← W + lora_scale · (α / r) · B · A (`PeftAdapterMixin`),
        keeping a copy of W for `unfuse_lora`."""
        keep_unfused_weights(self)
        super().fuse_lora(lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        """Unmerge every fused adapter and restore the weights as they were before `fuse_lora`, bit for bit."""
        super().unfuse_lora()
        restore_unfused_weights(self)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2024, arXiv:2309.11497): in the two deepest up blocks (up_blocks[0] and [1]), multiply
        the first half of the backbone features' channels by b1 (b2) and the low frequencies of the skip features by
        s1 (s2), through diffusers' `apply_freeu`. The FreeU authors suggest b1=1.3, b2=1.4, s1=0.9, s2=0.2 for SD 1.x
        and b1=1.4, b2=1.6, s1=0.9, s2=0.2 for SD 2.x. Inference only: it changes activations in place."""
        scales = {"s1": s1, "s2": s2, "b1": b1, "b2": b2}
        for name, value in scales.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive number (FreeU scales a signal by it)")
        for block in self.up_blocks:
            block.freeu_scales = scales

    def disable_freeu(self) -> None:
        """Turn FreeU off."""
        for block in self.up_blocks:
            block.freeu_scales = None

    def fuse_qkv_projections(self) -> None:
        """Fuse each self-attention's query, key and value projections into one `to_qkv`, and each cross-attention's
        key and value projections into `to_kv` (`AttentionMixin`); `ScratchAttnProcessor` then runs one matrix
        product where it ran three (or two). The processors in use are remembered, so that `unfuse_qkv_projections`
        restores them even after a pipeline has installed diffusers' `FusedAttnProcessor2_0`."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(module, BaseTunerLayer) and not module.merged for module in self.modules()):
            raise ValueError(
                "fuse_qkv_projections would copy only the base weights and so bypass the loaded LoRA adapters; call "
                "fuse_lora() first (or unload_lora()), then fuse_qkv_projections()."
            )
        self.original_attn_processors = self.attn_processors
        super().fuse_qkv_projections()

    def unfuse_qkv_projections(self) -> None:
        """Drop the fused projections and restore the processors that `fuse_qkv_projections` found."""
        super().unfuse_qkv_projections()
        if self.original_attn_processors is not None:
            self.set_attn_processor(self.original_attn_processors)
            self.original_attn_processors = None

    def set_adapters(
        self, adapter_names: list[str] | str, weights: float | dict | list[float | dict | None] | None = None
    ) -> None:
        """`PeftAdapterMixin.set_adapters`, with block-wise weights such as `{"down": 0.5, "mid": 1.0, "up":
        {"block_0": [1.0, 0.5, 0.0]}}` spread over this U-Net's transformer blocks, as diffusers does for its own
        `UNet2DConditionModel` (which it recognises by class name)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = weights if isinstance(weights, list) else [weights] * len(names)
        blocks_with_transformer = {
            "down": [i for i, block in enumerate(self.down_blocks) if len(block.attentions)],
            "up": [i for i, block in enumerate(self.up_blocks) if len(block.attentions)],
        }
        layers_per_block = self.config.layers_per_block
        if not isinstance(layers_per_block, int):
            if any(isinstance(weight, dict) for weight in weights):
                raise ValueError(
                    f"block-wise adapter weights need one layers_per_block for all blocks, but this U-Net has "
                    f"layers_per_block={layers_per_block!r}; pass one number per adapter instead."
                )
            layers_per_block = 0  # read only for block-wise weights
        transformer_per_block = {"down": layers_per_block, "up": layers_per_block + 1}
        expanded = [
            _maybe_expand_lora_scales_for_one_adapter(
                1.0 if weight is None else weight, blocks_with_transformer, transformer_per_block, model=self
            )
            for weight in weights
        ]
        super().set_adapters(names, expanded)
