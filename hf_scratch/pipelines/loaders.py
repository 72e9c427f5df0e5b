"""diffusers' loaders on our pipelines: LoRA, textual inversion, FreeU and fused attention projections.

`ScratchLoadersMixin` inherits the mixins that diffusers' `StableDiffusionPipeline` inherits, unchanged where they
work on our components:

- `StableDiffusionLoraLoaderMixin`: `load_lora_weights` (diffusers' / peft's layout as `save_lora_weights` writes it,
  and kohya's / AUTOMATIC1111's `lora_unet_*`, `lora_te_*` layout), `unload_lora_weights`, `set_adapters`,
  `fuse_lora` / `unfuse_lora`, `save_lora_weights`.
- `TextualInversionLoaderMixin`: `load_textual_inversion` (diffusers' `.bin` / `.safetensors` and AUTOMATIC1111
  embeddings) and `maybe_convert_prompt`, which spells a multi-vector token `<t>` as `<t> <t>_1 ... <t>_{n-1}`.
- `StableDiffusionMixin`: `enable_freeu` / `disable_freeu`, `unfuse_qkv_projections`.
- `IPAdapterMixin`: `load_ip_adapter` (the official `ip-adapter_*.safetensors` / `.bin` layout, with its CLIP image
  encoder folder or `image_encoder_folder=None`), `set_ip_adapter_scale`, `unload_ip_adapter`. The pipelines'
  `ip_adapter_image` / `ip_adapter_image_embeds` become the U-Net's image tokens through `ip_adapter_embeddings`
  (IP-Adapter, Ye et al. 2023, arXiv:2308.06721: decoupled cross-attention on image tokens beside the text's).

The overrides below refuse a LoRA file that loads nothing, read kohya's text-encoder keys into our text encoder, make
`unfuse_lora` exact, name both widths when a textual-inversion embedding does not fit, refuse a textual-inversion token
that is empty or already a word of the vocabulary, and let `fuse_qkv_projections` fuse our VAE.

LoRA (Hu et al. 2021, arXiv:2106.09685, Sec. 4.1) makes each adapted weight W' = W + (α / r) · B · A; a call with
`cross_attention_kwargs={"scale": s}` uses W + s · (α / r) · B · A in the U-Net and the text encoder (`scales_lora`).
"""

import functools
import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models.embeddings import ImageProjection
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import scale_lora_layers, unscale_lora_layers

from hf_scratch.models.adapters import keep_unfused_weights, restore_unfused_weights

TEXT_MODEL_LEVEL = "text_model."
# Attribute of a text encoder: (first row after the tokenizer's vocabulary, the table's rows from there) before the
# first textual-inversion load, restored by `unload_textual_inversion`.
TABLE_TAIL = "_embedding_rows_before_textual_inversion"


def describe(source: Any) -> str:
    """A path as its repr, anything else (a state dict, a list) by its type and length, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return repr(str(source))
    return f"a {type(source).__name__} of {len(source)} entries" if hasattr(source, "__len__") else repr(source)


def scales_lora(call: Callable) -> Callable:
    """Decorate a pipeline's `__call__` so that `cross_attention_kwargs={"scale": s}` multiplies every LoRA update of
    the U-Net and the text encoder by s for that call. diffusers' `StableDiffusionPipeline` scales the text encoder's
    LoRA while it encodes the prompt and the U-Net's in each U-Net call; scaling both for the whole call is the same."""

    @functools.wraps(call)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        cross_attention_kwargs = kwargs.get("cross_attention_kwargs")
        if cross_attention_kwargs is None:
            return call(self, *args, **kwargs)
        if not isinstance(cross_attention_kwargs, dict) or set(cross_attention_kwargs) - {"scale"}:
            raise ValueError(
                "`cross_attention_kwargs` must be None or {'scale': s}, the LoRA scale, got "
                f"{cross_attention_kwargs!r}."
            )
        scale = cross_attention_kwargs.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"`cross_attention_kwargs['scale']` must be a finite number, got {scale!r}.")
        models = [model for model in (self.unet, self.text_encoder) if model is not None]
        for model in models:
            scale_lora_layers(model, scale)
        try:
            return call(self, *args, **kwargs)
        finally:
            for model in models:
                unscale_lora_layers(model, scale)

    return wrapper


def check_new_token(token: Any, tokenizer: Any) -> None:
    """Refuse a textual-inversion token that is empty or that the vocabulary already holds in any form: itself, lower
    case (CLIP lower-cases prompts) or as a word ending (`red</w>`). Added, it would take over that word, or the
    end-of-text token that an empty token maps to, in every prompt."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"`token` must be a non-empty string, got {token!r}; pass a name such as '<my-concept>'.")
    vocabulary = tokenizer.get_vocab()
    forms = [form for text in (token, token.lower()) for form in (text, f"{text}</w>")]
    taken = [form for form in forms if form in vocabulary] + [t for t in tokenizer.all_special_tokens if t == token]
    if taken:
        raise ValueError(
            f"`token` {token!r} is already in the tokenizer's vocabulary (as {taken[0]!r}); loading it would change "
            f"what {token!r} means in every prompt. Pass a token that is not a word, e.g. '<{token.strip('<>')}>'."
        )


class ScratchLoadersMixin(
    StableDiffusionMixin, TextualInversionLoaderMixin, StableDiffusionLoraLoaderMixin, IPAdapterMixin
):
    """The loaders of diffusers' `StableDiffusionPipeline`, for a pipeline with `unet`, `text_encoder`, `tokenizer`
    and `vae`, ours or diffusers' / transformers', and the optional `image_encoder` and `feature_extractor`."""

    def ip_adapter_embeddings(
        self,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        device: torch.device,
        num_images: int,
        do_classifier_free_guidance: bool,
    ) -> dict[str, list[torch.Tensor]] | None:
        """The U-Net's `added_cond_kwargs` for the loaded IP-Adapters, `{"image_embeds": [one tensor per adapter]}`,
        each `[uncond; cond]` on the batch axis under guidance (as diffusers' `prepare_ip_adapter_image_embeds`);
        None when neither input is given.

        `ip_adapter_image` is one image per adapter (a PIL image or array for `feature_extractor`, or a tensor of its
        pixel values), encoded by `image_encoder`: its projected `image_embeds`, or its penultimate hidden states for
        adapters whose projection is not a plain `ImageProjection` (IP-Adapter Plus); the unconditional embedding
        is zeros, or the encoding of a black image. `ip_adapter_image_embeds` gives one tensor per adapter instead,
        `[uncond; cond]` stacked on the first axis when guidance is on."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return None
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("Pass at most one of `ip_adapter_image` and `ip_adapter_image_embeds`, got both.")
        projection = getattr(self.unet, "encoder_hid_proj", None)
        layers = getattr(projection, "image_projection_layers", None)
        if layers is None:
            raise ValueError(
                "`ip_adapter_image` / `ip_adapter_image_embeds` need an IP-Adapter: load one first with "
                "pipe.load_ip_adapter(folder, subfolder=..., weight_name=...)."
            )
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list) or not all(
                isinstance(embeds, torch.Tensor) and embeds.ndim in (3, 4) for embeds in ip_adapter_image_embeds
            ):
                raise ValueError(
                    "`ip_adapter_image_embeds` must be a list of 3- or 4-dimensional tensors, one per IP-Adapter, got "
                    f"{type(ip_adapter_image_embeds).__name__}."
                )
            pairs = [
                embeds.chunk(2) if do_classifier_free_guidance else (None, embeds) for embeds in ip_adapter_image_embeds
            ]
        else:
            images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
            if len(images) != len(layers):
                raise ValueError(
                    f"`ip_adapter_image` gives {len(images)} images for {len(layers)} loaded IP-Adapters; pass one "
                    "each."
                )
            if self.image_encoder is None:
                raise ValueError(
                    "`ip_adapter_image` needs the IP-Adapter's image encoder, which was not loaded "
                    "(`image_encoder_folder=None`); load it with load_ip_adapter(..., image_encoder_folder=...), or "
                    "pass `ip_adapter_image_embeds`."
                )
            pairs = [
                self._encode_ip_adapter_image(image, device, not isinstance(layer, ImageProjection))
                for image, layer in zip(images, layers)
            ]
        embeddings = []
        for negative, positive in pairs:
            positive = torch.cat([positive] * num_images)
            if do_classifier_free_guidance:
                positive = torch.cat([torch.cat([negative] * num_images), positive])
            embeddings.append(positive.to(device))
        return {"image_embeds": embeddings}

    def _encode_ip_adapter_image(
        self, image: Any, device: torch.device, hidden_states: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) image embeddings of one image by `image_encoder`, each with a leading axis of 1."""
        dtype = next(self.image_encoder.parameters()).dtype
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=dtype)
        if hidden_states:
            encode = self.image_encoder
            cond = encode(image, output_hidden_states=True).hidden_states[-2]
            uncond = encode(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
        else:
            cond = self.image_encoder(image).image_embeds
            uncond = torch.zeros_like(cond)
        return uncond[None], cond[None]

    def _loaded_adapters(self) -> set[tuple[str, str]]:
        return {
            (name, adapter)
            for name in self._lora_loadable_modules
            for adapter in getattr(getattr(self, name, None), "peft_config", {})
        }

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a LoRA into the U-Net and the text encoder (`StableDiffusionLoraLoaderMixin.load_lora_weights`).

        `pretrained_model_name_or_path_or_dict` is a folder holding `pytorch_lora_weights.safetensors`, a folder and
        `weight_name=` (the file's name), or a state dict, in diffusers' / peft's layout or kohya's / AUTOMATIC1111's.
        Where diffusers would load nothing and only log a warning (a file for another architecture, say), this
        raises, naming the keys it found.
        """
        source = describe(pretrained_model_name_or_path_or_dict)
        before = self._loaded_adapters()
        try:
            super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name, hotswap, **kwargs)
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"`pretrained_model_name_or_path_or_dict` ({source}) could not be loaded as a LoRA for this pipeline: "
                f"{error} Pass a LoRA made for this architecture (Stable Diffusion 1.x / 2.x of the same width)."
            ) from error
        if not hotswap and self._loaded_adapters() == before:
            state_dict, _ = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
            keys = sorted(state_dict)
            raise ValueError(
                f"`pretrained_model_name_or_path_or_dict` ({source}) holds no LoRA weights for this pipeline's "
                f"{' or '.join(self._lora_loadable_modules)}: its {len(keys)} keys ({', '.join(keys[:3])}"
                f"{', ...' if len(keys) > 3 else ''}) name none of their modules. Pass a Stable Diffusion LoRA, whose "
                "keys start with 'unet.' / 'text_encoder.' (diffusers' save_lora_weights) or 'lora_unet_' / "
                "'lora_te_' (kohya, AUTOMATIC1111)."
            )

    @classmethod
    def load_lora_into_text_encoder(
        cls,
        state_dict: dict[str, torch.Tensor],
        network_alphas: dict[str, float] | None,
        text_encoder: torch.nn.Module,
        prefix: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """`StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder`, after dropping the `text_model.` level that
        kohya files and transformers-4 LoRAs put in their text-encoder keys. diffusers drops it only for a text
        encoder without a `text_model` attribute, and ours has one: itself, for diffusers' clip-skip code."""
        if getattr(text_encoder, "text_model", None) is text_encoder:
            head = f"{prefix or cls.text_encoder_name}."

            def flatten(key: str) -> str:
                return head + key[len(head) :].removeprefix(TEXT_MODEL_LEVEL) if key.startswith(head) else key

            state_dict = {flatten(key): value for key, value in state_dict.items()}
            if network_alphas:
                network_alphas = {flatten(key): value for key, value in network_alphas.items()}
        super().load_lora_into_text_encoder(state_dict, network_alphas, text_encoder, prefix, *args, **kwargs)

    def fuse_lora(
        self,
        components: list[str] = ["unet", "text_encoder"],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Merge the active LoRA adapters of `components` into their weights, W ← W + lora_scale · (α / r) · B · A
        (`StableDiffusionLoraLoaderMixin.fuse_lora`), keeping copies of W so that `unfuse_lora` restores them bit for
        bit."""
        for name in components:
            if getattr(self, name, None) is not None:
                keep_unfused_weights(getattr(self, name))
        super().fuse_lora(components, lora_scale, safe_fusing, adapter_names, **kwargs)

    def unfuse_lora(self, components: list[str] = ["unet", "text_encoder"], **kwargs: Any) -> None:
        """Unmerge the fused LoRA adapters of `components` and restore their weights exactly as before `fuse_lora`."""
        super().unfuse_lora(components, **kwargs)
        for name in components:
            if getattr(self, name, None) is not None:
                restore_unfused_weights(getattr(self, name))

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: str | list[str] | dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
        token: str | list[str] | None = None,
        tokenizer: Any | None = None,
        text_encoder: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Add textual-inversion tokens and their embedding vectors (`TextualInversionLoaderMixin`): diffusers'
        `{"<token>": vectors}` files (`.bin`, `.safetensors`) or AUTOMATIC1111's (`string_to_param`, `emb_params`;
        pass `token=`). A multi-vector embedding becomes the tokens `<t>`, `<t>_1`, ..., which `maybe_convert_prompt`
        writes in place of `<t>` in every prompt. An embedding of the wrong width raises, naming both widths, and a
        token that is empty or already a word, by `check_new_token`.

        diffusers sizes the token-embedding table to the tokenizer's length plus the new tokens, dropping the rows of
        a table larger than the tokenizer; they are kept here, and `unload_textual_inversion` puts them back."""
        text_encoder_model = text_encoder or self.text_encoder
        if not hasattr(text_encoder_model, TABLE_TAIL):
            first_free = len(tokenizer or self.tokenizer)
            tail = text_encoder_model.get_input_embeddings().weight.detach()[first_free:].clone()
            setattr(text_encoder_model, TABLE_TAIL, (first_free, tail))
        try:
            super().load_textual_inversion(pretrained_model_name_or_path, token, tokenizer, text_encoder, **kwargs)
        except ValueError as error:
            if "incorrect shape" not in str(error):
                raise
            width = (text_encoder or self.text_encoder).get_input_embeddings().weight.shape[-1]
            raise ValueError(
                f"`pretrained_model_name_or_path` ({describe(pretrained_model_name_or_path)}) holds embedding vectors "
                f"whose width is not {width}, the width of this text encoder's token embeddings; load an embedding "
                "trained for this model's text encoder (SD 1.x: 768, SD 2.x: 1024)."
            ) from error

    def unload_textual_inversion(
        self, tokens: str | list[str] | None = None, tokenizer: Any | None = None, text_encoder: Any | None = None
    ) -> None:
        """Remove textual-inversion tokens and their vectors (`TextualInversionLoaderMixin.unload_textual_inversion`);
        once none is left, the token-embedding table is again the one before the first load, row for row."""
        super().unload_textual_inversion(tokens, tokenizer, text_encoder)
        tokenizer, text_encoder = tokenizer or self.tokenizer, text_encoder or self.text_encoder
        first_free, tail = getattr(text_encoder, TABLE_TAIL, (None, None))
        if first_free is not None and len(tokenizer) == first_free:
            text_encoder.resize_token_embeddings(first_free + len(tail))
            with torch.no_grad():
                text_encoder.get_input_embeddings().weight[first_free:] = tail
            delattr(text_encoder, TABLE_TAIL)

    @staticmethod
    def _extend_tokens_and_embeddings(
        tokens: list[str], embeddings: list[torch.Tensor], tokenizer: Any
    ) -> tuple[list[str], list[torch.Tensor]]:
        """`TextualInversionLoaderMixin._extend_tokens_and_embeddings` (a multi-vector token `<t>` becomes `<t>`,
        `<t>_1`, ...), then `check_new_token` on every token, before anything is written."""
        tokens, embeddings = TextualInversionLoaderMixin._extend_tokens_and_embeddings(tokens, embeddings, tokenizer)
        for token in tokens:
            check_new_token(token, tokenizer)
        return tokens, embeddings

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Fuse the attention projections of the U-Net and / or the VAE into one matrix each (`to_qkv` for
        self-attention, `to_kv` for cross-attention). `StableDiffusionMixin`'s version accepts only diffusers'
        `AutoencoderKL` as the VAE; each model's own `fuse_qkv_projections` (ours or diffusers') does the work here, and
        `unfuse_qkv_projections` undoes it."""
        self.fusing_unet, self.fusing_vae = unet, vae
        if unet:
            self.unet.fuse_qkv_projections()
        if vae:
            self.vae.fuse_qkv_projections()
