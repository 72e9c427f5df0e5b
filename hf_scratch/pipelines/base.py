"""What every Stable Diffusion pipeline here shares: loading and saving, prompt encoding, the start latents of every
scheduler family, image encoding, the denoising loop with classifier-free guidance, and decoding.

`ScratchPipelineBase` is the latent diffusion sampler of Rombach et al. (arXiv:2112.10752): the prompt is encoded by
the CLIP text encoder, latents are denoised by the U-Net and a scheduler with classifier-free guidance (Ho & Salimans,
arXiv:2207.12598) as one batched U-Net call, and the VAE decodes x_0. Text-to-image, image-to-image, inpainting and
ControlNet pipelines subclass it and add only where their latents start and what else the U-Net reads.

What a scheduler does differently by family is decided here, from `hf_scratch.schedulers.scheduler_family` alone:
DDPM-family and EDM schedulers start from σ_init ε, scale the U-Net's input and noise an image by `add_noise`; flow
schedulers (x_σ = (1 − σ) x_0 + σ ε) start from ε, feed x_σ as it is and noise by `scale_noise`.
"""

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.guiders import BaseGuidance
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

# diffusers resolves a saved component's class (e.g. `["hf_scratch.models.unet", ...]` in model_index.json) only from
# modules already imported, so the pipeline brings our component modules with it.
import hf_scratch.models.clip  # noqa: F401  isort: skip
from hf_scratch.models.unet import ScratchUNet2DConditionModel  # isort: skip
from hf_scratch.models.vae import ScratchAutoencoderKL, downsampling_factor  # isort: skip
import hf_scratch.schedulers.ddim  # noqa: F401  isort: skip
import hf_scratch.schedulers.ddpm  # noqa: F401  isort: skip
import hf_scratch.schedulers.dpm_solver  # noqa: F401  isort: skip
import hf_scratch.schedulers.flow_match  # noqa: F401  isort: skip
from hf_scratch.schedulers import scheduler_family  # isort: skip
from hf_scratch.schedulers.schedule import original_sample_of_step  # isort: skip
from hf_scratch.pipelines.checks import PipelineChecks, StepCallback, checked_callback_tensor  # isort: skip
from hf_scratch.pipelines.loaders import ScratchLoadersMixin  # isort: skip
from hf_scratch.pipelines.guidance import classifier_free_guidance, start_guider_step  # isort: skip
from hf_scratch.sampling import read_json_object  # isort: skip

logger = logging.get_logger(__name__)

# `save_pretrained` writes `<REMOTE_CODE_MODULE>.py` so that `DiffusionPipeline.from_pretrained` can find our class.
REMOTE_CODE_MODULE = "pipeline"
Generator = torch.Generator | list[torch.Generator] | None
# A pipeline's extra U-Net arguments at one step: (step index, timestep, U-Net input, text embeddings) -> kwargs.
UNetExtras = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]


@dataclass
class ScratchPipelineOutput(BaseOutput):
    """Generated images: a list of PIL images, an `(N, H, W, 3)` array in [0, 1], an `(N, 3, H, W)` tensor in [0, 1],
    or the final latents `(N, C, H / f, W / f)` for `output_type="latent"`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def conditional_half(added_cond_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The conditional half of `[uncond; cond]`-stacked extra U-Net inputs (IP-Adapter's image embeddings), for a
    step that a guider leaves unguided."""

    def half(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.chunk(2)[1]
        if isinstance(value, (list, tuple)):
            return type(value)(half(item) for item in value)
        return value

    return {name: half(value) for name, value in added_cond_kwargs.items()}


class ScratchPipelineBase(PipelineChecks, DiffusionPipeline, ScratchLoadersMixin):
    """Stable Diffusion's components and the steps every pipeline shares; subclasses write `__call__`.

    Components are any with the diffusers / transformers API: our `Scratch*` models, or diffusers'
    `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextModel`; and any diffusers-style scheduler.

    Loading:
      - `from_pretrained(folder)` loads a folder saved by these classes or by diffusers' `StableDiffusionPipeline`,
        each component with the class its folder records.
      - `from_official(folder)` loads a diffusers-layout folder into our own U-Net, VAE and text encoder classes.
      - `from_single_file(path, config=folder)` loads an LDM single-file checkpoint.
      - `save_pretrained(folder)` also writes `pipeline.py`, so `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` returns the saving class.

    Adapters (`ScratchLoadersMixin`, diffusers' own loaders): `load_lora_weights` / `fuse_lora` / `set_adapters` /
    `unload_lora_weights`, `load_textual_inversion`, `enable_freeu`, `fuse_qkv_projections`, and the attention
    processors of the U-Net (`pipe.unet.set_attn_processor`, `pipe.enable_attention_slicing()`).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "noise_pred", "pred_original_sample"]

    def __init__(
        self,
        vae: ScratchAutoencoderKL | AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: ScratchUNet2DConditionModel | UNet2DConditionModel,
        scheduler: SchedulerMixin,
        image_encoder: PreTrainedModel | None = None,
        feature_extractor: BaseImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        # IP-Adapter's CLIP image encoder and its preprocessing (`load_ip_adapter` sets them), optional.
        self.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.vae_scale_factor = downsampling_factor(self.vae.config.block_out_channels)
        # Pixel sizes must be a multiple of 8 (as in diffusers) and of the VAE's downsampling factor.
        self.size_multiple = math.lcm(8, self.vae_scale_factor)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # What the U-Net was trained as ("ddpm", "edm" or "flow"): the family of the scheduler it came with (of the
        # folder's own scheduler when loaded by `from_pretrained`). A scheduler of another family set later is named.
        self.model_family = scheduler_family(scheduler) if scheduler is not None else None
        self._family_warnings: set[str] = set()

    @property
    def components(self) -> dict[str, Any]:
        """The components to build another pipeline with, e.g. `StableDiffusionImg2ImgPipeline(**pipe.components)`:
        the same model and tokenizer objects (no copies), but a new scheduler of the same class and config.
        Schedulers carry per-run state, and diffusers' `StableDiffusionPipeline.__init__` rewrites its scheduler's
        config (`steps_offset` to 1, `clip_sample` off), which on a shared scheduler would change this pipeline's
        later images. The optional IP-Adapter components are left out while they are None, so that diffusers'
        pipelines, which take `feature_extractor` beside `safety_checker`, accept the dict as it is."""
        components = dict(super().components)
        for name in self._optional_components:
            if components.get(name) is None:
                components.pop(name, None)
        scheduler = components.get("scheduler")
        if scheduler is not None:
            components["scheduler"] = type(scheduler).from_config(scheduler.config)
        return components

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """Like `ConfigMixin.load_config`, but reads a `_class_name` of `["pipeline", "<Class>"]` (written by
        `save_pretrained` for `DiffusionPipeline`'s remote-code loading) as the plain class name, because loading
        through this class itself needs no remote code."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list) and config["_class_name"][0] == REMOTE_CODE_MODULE:
            config["_class_name"] = config["_class_name"][1]
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save as diffusers does, then add `pipeline.py` and point `model_index.json` at it, so that
        `DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)` returns this class."""
        super().save_pretrained(save_directory, **kwargs)
        cls = type(self)
        remote_code = (
            f'"""Loads hf-scratch\'s pipeline class (`pip install hf-scratch`)."""\n\n'
            f"from {cls.__module__} import {cls.__name__}\n\n"
            f'__all__ = ["{cls.__name__}"]\n'
        )
        (Path(save_directory) / f"{REMOTE_CODE_MODULE}.py").write_text(remote_code)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [REMOTE_CODE_MODULE, cls.__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "DiffusionPipeline":
        """`DiffusionPipeline.from_pretrained`, except that weights load as float32 unless `dtype` (or the older
        `torch_dtype`) says otherwise: the shipped model stores fp16 weights, which a CPU runs slowly or not at all."""
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
        folder = Path(pretrained_model_name_or_path)
        if (folder / "model_index.json").is_file():
            # diffusers quietly builds some components (a 2-token CLIPTokenizer, say) from a missing subfolder.
            index = cls.read_json(folder / "model_index.json")
            for name, value in index.items():
                if name.startswith("_") or not isinstance(value, list):
                    continue  # pipeline config values such as requires_safety_checker
                if len(value) != 2 or not all(isinstance(part, (str, type(None))) for part in value):
                    raise ValueError(
                        f"{str(folder / 'model_index.json')!r}: the entry {name!r} must be [library, class name], as "
                        f'diffusers writes it (e.g. ["diffusers", "DDIMScheduler"]), got {value!r}.'
                    )
            missing = [
                name for name, value in index.items()
                if not name.startswith("_") and isinstance(value, list) and value[0] is not None
                and name not in kwargs and not (folder / name).is_dir()
            ]  # fmt: skip
            if missing:
                raise ValueError(
                    f"{str(folder)!r} lists the components {missing} in model_index.json but has no such subfolder "
                    f"({', '.join(str(folder / name) for name in missing)}); copy the whole pipeline folder, or pass "
                    "the components as arguments."
                )
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        saved_scheduler = folder / "scheduler" / "scheduler_config.json"
        if isinstance(pipe, ScratchPipelineBase) and saved_scheduler.is_file():
            pipe.model_family = scheduler_family(cls.read_json(saved_scheduler))
        return pipe

    @staticmethod
    def read_json(path: str | os.PathLike) -> dict:
        """A JSON object from `path`; ValueError naming the file when it is not one (`read_json_object`)."""
        return read_json_object(Path(path))

    @classmethod
    def from_official(cls, folder: str | os.PathLike, **kwargs: Any) -> "ScratchPipelineBase":
        """Load a diffusers-layout folder (e.g. one saved by `StableDiffusionPipeline`) into our own component classes.

        The U-Net, VAE and text encoder are `ScratchUNet2DConditionModel`, `ScratchAutoencoderKL` and
        `ScratchCLIPTextModel` with the folder's configs and weights; the tokenizer and scheduler load as recorded.
        `kwargs` (e.g. `torch_dtype`, or a `scheduler` to use instead) go to `from_pretrained`.
        """
        from hf_scratch.models.clip import ScratchCLIPTextModel
        from hf_scratch.models.unet import ScratchUNet2DConditionModel
        from hf_scratch.models.vae import ScratchAutoencoderKL

        dtype = kwargs.get("torch_dtype")
        model_kwargs = {} if dtype is None else {"torch_dtype": dtype}
        kwargs.setdefault("unet", ScratchUNet2DConditionModel.from_pretrained(folder, subfolder="unet", **model_kwargs))
        kwargs.setdefault("vae", ScratchAutoencoderKL.from_pretrained(folder, subfolder="vae", **model_kwargs))
        kwargs.setdefault(
            "text_encoder", ScratchCLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **model_kwargs)
        )
        return cls.from_pretrained(folder, **kwargs)

    @classmethod
    def from_single_file(
        cls, path: str | os.PathLike, *, config: str | os.PathLike, **kwargs: Any
    ) -> "ScratchPipelineBase":
        """Load an LDM single-file checkpoint (`.ckpt` / `.safetensors`) into our component classes.

        `config` is a local diffusers-layout folder that supplies the model configs, the tokenizer and the scheduler
        (its model weights are not read). `kwargs` go to `from_pretrained`, e.g. `scheduler=...`.
        """
        from hf_scratch.formats.single_file import load_single_file

        components = load_single_file(path, config=config)
        return cls.from_pretrained(config, **components, **kwargs)

    # ------------------------------------------------------------------ building blocks

    def _encode_text(self, texts: list[str], device: torch.device, clip_skip: int | None) -> torch.Tensor:
        """Tokenise to the tokenizer's `model_max_length` (warning about dropped text) and run the text encoder. A
        multi-vector textual-inversion token is first spelled out as its vectors' tokens (`maybe_convert_prompt`)."""
        texts = self.maybe_convert_prompt(texts, self.tokenizer)
        max_length = self.tokenizer.model_max_length
        input_ids = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        untruncated_ids = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if untruncated_ids.shape[-1] > max_length:
            removed_ids = untruncated_ids[:, max_length - 1 : -1]
            removed_text = self.tokenizer.batch_decode(removed_ids, skip_special_tokens=True)
            logger.warning(
                f"The text encoder reads at most {max_length} tokens, so this part of the prompt was dropped: "
                f"{[text for text in removed_text if text]}"
            )
        if clip_skip is None:
            return self.text_encoder(input_ids.to(device))[0]
        # clip_skip = k takes the hidden state k layers before the last, through the final layer norm.
        hidden_states = self.text_encoder(input_ids.to(device), output_hidden_states=True).hidden_states
        return self.text_encoder.final_layer_norm(hidden_states[-(clip_skip + 1)])

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings `(N * num_images_per_prompt, tokens, dim)` for the prompts, and for the negative prompts
        (`""` when none is given) when guidance is on, else `None`. `clip_skip` applies to both."""
        if prompt_embeds is None:
            prompt_embeds = self._encode_text([prompt] if isinstance(prompt, str) else prompt, device, clip_skip)
        batch_size = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch_size
            negative_prompt_embeds = self._encode_text(negative_prompt, device, clip_skip)
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def guidance_embeddings(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        guidance_scale: float,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        clip_skip: int | None,
        guider: BaseGuidance | None = None,
    ) -> torch.Tensor:
        """The text embeddings the denoising loop reads: `[uncond; cond]` stacked on the batch axis when guidance
        reads the unconditional prediction (`stacks_uncond`), else the prompts' alone (`encode_prompt`)."""
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.stacks_uncond(guidance_scale, guider), negative_prompt,
            prompt_embeds, negative_prompt_embeds, clip_skip,
        )  # fmt: skip
        return prompt_embeds if negative_prompt_embeds is None else torch.cat([negative_prompt_embeds, prompt_embeds])

    @staticmethod
    def stacks_uncond(guidance_scale: float, guider: BaseGuidance | None) -> bool:
        """Whether guidance reads the unconditional prediction, so that the text embeddings are `[uncond; cond]`:
        classifier-free guidance with w > 1, or any guider but autoguidance (whose second prediction is its guide
        model's, on the conditional text)."""
        if guider is None:
            return guidance_scale > 1
        return getattr(guider, "guide", None) is None

    def prepare_extra_step_kwargs(self, generator: Generator, eta: float) -> dict[str, Any]:
        """`eta` and `generator` for `scheduler.step`, each only if the scheduler's `step` accepts it."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs = {"eta": eta, "generator": generator}
        return {name: value for name, value in extra_step_kwargs.items() if name in accepted}

    # ------------------------------------------------------------------ the scheduler's family

    @property
    def init_noise_sigma(self) -> float:
        """σ of the start latents x_T = σ ε: the scheduler's `init_noise_sigma` (1 for DDPM / DDIM, σ_max for
        Euler-type and EDM schedulers), and 1 for flow schedulers, which start from x_1 = ε."""
        return 1.0 if scheduler_family(self.scheduler) == "flow" else self.scheduler.init_noise_sigma

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The U-Net's input at `timestep`: `scheduler.scale_model_input` (x / √(σ² + 1) for σ-parameterised
        schedulers, x itself for DDPM / DDIM); a flow model reads x_σ as it is."""
        if scheduler_family(self.scheduler) == "flow":
            return sample
        return self.scheduler.scale_model_input(sample, timestep)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0 = latents) with the given noise: `add_noise` (√ᾱ_t x_0 + √(1 − ᾱ_t) ε, or x_0 + σ ε) for
        the DDPM and EDM families, the flow's x_σ = (1 − σ) x_0 + σ ε (`scale_noise`) for flow schedulers (diffusers'
        multistep solvers in flow mode compute it in `add_noise`)."""
        if scheduler_family(self.scheduler) == "flow" and hasattr(self.scheduler, "scale_noise"):
            return self.scheduler.scale_noise(latents, timestep, noise)
        return self.scheduler.add_noise(latents, noise, timestep)

    # ------------------------------------------------------------------ latents

    def prepare_latents(
        self,
        num_images: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Generator,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_T = σ_init ε (`init_noise_sigma`), with ε of the U-Net's input shape drawn here or given as unit-variance
        `latents`."""
        if latents is None:
            shape = self.latent_shape(num_images, height, width)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * self.init_noise_sigma

    def encode_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """scaling_factor · z with z a sample of the VAE posterior q(z | image), image i drawn from `generator[i]`
        when given a list (as diffusers draws them)."""
        if isinstance(generator, list):
            latents = [self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(len(image))]
            return self.vae.config.scaling_factor * torch.cat(latents)
        return self.vae.config.scaling_factor * self.vae.encode(image).latent_dist.sample(generator)

    def latent_shape(
        self, num_images: int, height: int, width: int, channels: int | None = None
    ) -> tuple[int, int, int, int]:
        """(N, C, H / f, W / f): the latents of `num_images` images of `height` x `width` pixels, with `channels`
        channels (default: the U-Net's input channels)."""
        f = self.vae_scale_factor
        channels = self.unet.config.in_channels if channels is None else channels
        return (num_images, channels, height // f, width // f)

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        extra_step_kwargs: dict[str, Any],
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance_rescale: float = 0.0,
        conditioning: torch.Tensor | None = None,
        step_end: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        unet_extras: UNetExtras | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        guider: BaseGuidance | None = None,
    ) -> torch.Tensor:
        """Run x_t -> ε̂ -> x_{t-1} over `timesteps`. With guidance, `prompt_embeds` is `[uncond; cond]` (see
        `stacks_uncond`), and the two predictions of a step are mixed by classifier-free guidance with
        `guidance_scale` and `guidance_rescale` (`classifier_free_guidance`), or by `guider` when one is given (a
        diffusers guider, or one of `hf_scratch.pipelines.guidance`; a step it leaves unguided costs one U-Net batch,
        and `ModelAutoGuidance` takes its second prediction from its guide U-Net on the conditional text).
        `conditioning` is stacked after the latents on the U-Net's channel axis (an inpainting U-Net's mask and
        masked image), and `step_end(step_index, latents)` returns the latents to go on with after each step
        (inpainting's blending). `unet_extras(step_index, timestep, model_input, prompt_embeds)` gives further U-Net
        arguments for a step (a ControlNet's residuals), from the scaled input before `conditioning` is stacked on;
        `added_cond_kwargs` goes to every U-Net call (IP-Adapter's image embeddings, `ip_adapter_embeddings`)."""
        stacked = self.stacks_uncond(guidance_scale, guider)
        guide_model = getattr(guider, "guide", None)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step_index, timestep in enumerate(timesteps):
                if guider is not None:
                    start_guider_step(guider, self.scheduler, step_index, len(timesteps), timestep)
                guided = guidance_scale > 1 if guider is None else guider.num_conditions > 1
                # Classifier-free guidance: one U-Net call on [x_t; x_t] with [uncond; cond] text; a step the guider
                # leaves unguided runs the conditional half alone.
                both_halves = stacked and guided
                cond_only = stacked and not guided
                embeds = prompt_embeds.chunk(2)[1] if cond_only else prompt_embeds
                model_input = torch.cat([latents] * 2) if both_halves else latents
                model_input = self.scale_model_input(model_input, timestep)
                extras = {} if unet_extras is None else unet_extras(step_index, timestep, model_input, embeds)
                if added_cond_kwargs is not None:
                    extras["added_cond_kwargs"] = (
                        conditional_half(added_cond_kwargs) if cond_only else added_cond_kwargs
                    )
                if conditioning is not None:
                    model_input = torch.cat([model_input, conditioning], dim=1)
                noise_pred = self.unet(
                    model_input, timestep, encoder_hidden_states=embeds, **extras, return_dict=False
                )[0]
                if both_halves:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    if guider is None:
                        noise_pred = classifier_free_guidance(
                            noise_pred_uncond, noise_pred_text, guidance_scale, guidance_rescale
                        )
                    else:
                        noise_pred = guider.forward(noise_pred_text, noise_pred_uncond).pred
                elif guided and guide_model is not None:
                    guide_pred = guide_model(model_input, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
                    noise_pred = guider.forward(noise_pred, guide_pred.to(noise_pred.dtype)).pred

                step_output = self.scheduler.step(noise_pred, timestep, latents, **extra_step_kwargs, return_dict=True)
                sample, latents = latents, step_output.prev_sample
                if step_end is not None:
                    latents = step_end(step_index, latents)

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "noise_pred": noise_pred}
                    if "pred_original_sample" in callback_on_step_end_tensor_inputs:
                        tensors["pred_original_sample"] = original_sample_of_step(
                            self.scheduler, step_output, noise_pred, timestep, sample
                        )
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
                    if callback_outputs is None:
                        callback_outputs = {}
                    if not isinstance(callback_outputs, dict):
                        raise TypeError(
                            "`callback_on_step_end` must return a dict of tensors (or None), got "
                            f"{type(callback_outputs).__name__} at step {step_index}."
                        )
                    latents = checked_callback_tensor(callback_outputs, "latents", latents, step_index)
                    prompt_embeds = checked_callback_tensor(
                        callback_outputs, "prompt_embeds", prompt_embeds, step_index
                    )

                if not torch.isfinite(latents).all():
                    raise ValueError(
                        f"The latents became NaN or infinite at denoising step {step_index} "
                        f"(timestep {int(timestep)}); check the model weights, the dtype (try float32) and the "
                        "scheduler settings."
                    )
                progress_bar.update()
        return latents

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool) -> "ScratchPipelineOutput | tuple":
        """Decode the final latents (`decode_latents`), release offloaded models, and wrap the images."""
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return ScratchPipelineOutput(images=images) if return_dict else (images,)

    def decode_latents(
        self, latents: torch.Tensor, output_type: str
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """VAE-decode x_0 latents (undoing the `scaling_factor`) into images of `output_type`."""
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if not torch.isfinite(image).all():
            raise ValueError(
                "The VAE decoder produced NaN or infinite values from finite latents; check the VAE weights and the "
                "dtype (float16 VAEs overflow: try float32)."
            )
        return self.image_processor.postprocess(image, output_type=output_type)

    def retrieve_timesteps(
        self, num_inference_steps: int, device: torch.device, timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, int]:  # fmt: skip
        """Set the scheduler's timesteps, `num_inference_steps` of them or the custom `timesteps` / `sigmas` (checked
        by `check_timesteps`, for schedulers whose `set_timesteps` takes them, as diffusers' `retrieve_timesteps`);
        return them and their count."""
        self.check_timesteps(num_inference_steps, timesteps, sigmas)
        for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
            if values is not None:
                values = values.tolist() if hasattr(values, "tolist") else list(values)
                self.scheduler.set_timesteps(device=device, **{name: values})
                return self.scheduler.timesteps, len(self.scheduler.timesteps)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps, num_inference_steps

    def _default_size(self) -> tuple[int, int]:
        """(height, width) from the U-Net's `sample_size` (an int or a pair) times the VAE's downsampling factor."""
        sample_size = self.unet.config.sample_size
        latent_height, latent_width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return latent_height * self.vae_scale_factor, latent_width * self.vae_scale_factor
