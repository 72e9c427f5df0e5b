"""Text-to-image latent diffusion: Stable Diffusion's sampling loop (Rombach et al., arXiv:2112.10752).

The prompt is encoded by the CLIP text encoder, Gaussian latents x_T are denoised by the U-Net and a scheduler, with
classifier-free guidance (Ho & Salimans, arXiv:2207.12598) as one batched U-Net call, and the VAE decodes x_0. Given
the same components, scheduler and seed, the images equal those of diffusers' `StableDiffusionPipeline`.

There is no safety checker: the pipeline returns exactly what the decoder produces.
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
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
from hf_scratch.schedulers.schedule import check_custom_schedule, original_sample_of_step  # isort: skip
from hf_scratch.pipelines.loaders import ScratchLoadersMixin, scales_lora  # isort: skip

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Rescaled classifier-free guidance (Lin et al. 2024, arXiv:2305.08891, Sec. 3.4, Eq. 15–16): the guided
    prediction x_cfg is scaled to the standard deviation of the text-conditioned one,
    x_rescaled = x_cfg · σ_pos / σ_cfg, then mixed back, φ x_rescaled + (1 − φ) x_cfg, with φ = `guidance_rescale`
    (each σ over a sample's elements)."""
    dims = list(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    return guidance_rescale * (noise_cfg * (std_text / std_cfg)) + (1 - guidance_rescale) * noise_cfg


# Classifier-free guidance weights in use stay below about 30; from here on ε̂_uncond + w (ε̂_cond − ε̂_uncond) overflows.
MAX_GUIDANCE_SCALE = 1000.0
# `save_pretrained` writes `<REMOTE_CODE_MODULE>.py` so that `DiffusionPipeline.from_pretrained` can find our class.
REMOTE_CODE_MODULE = "pipeline"

StepCallback = Callable[[DiffusionPipeline, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def check_integer(name: str, value: Any, minimum: int) -> int:
    """`value` as an int: Python and numpy integers are accepted, booleans and everything else refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_real(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a finite float (ints and numpy numbers accepted, booleans refused) in [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number, got {value!r} of type {type(value).__name__}.")
    too_small = minimum is not None and value < minimum
    too_large = maximum is not None and value > maximum
    if not math.isfinite(value) or too_small or too_large:
        allowed = "a finite number" + (f" >= {minimum}" if minimum is not None else "")
        allowed += f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return float(value)


def check_tensor(name: str, value: Any, ndim: int) -> None:
    """A finite floating-point torch tensor of `ndim` dimensions (numpy arrays and lists are refused by name)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, got {type(value).__name__}; convert it with torch.as_tensor."
        )
    if value.ndim != ndim or not value.is_floating_point():
        raise ValueError(f"`{name}` must be a {ndim}-dimensional floating-point tensor, got {value.dtype} of shape "
                         f"{tuple(value.shape)}.")  # fmt: skip
    if not torch.isfinite(value).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


def checked_callback_tensor(outputs: dict, name: str, current: torch.Tensor, step_index: int) -> torch.Tensor:
    """`outputs[name]` when a step callback returned it, else `current`; refused unless it is a tensor of the same
    shape and dtype as `current`."""
    if name not in outputs:
        return current
    value = outputs[name]
    if not isinstance(value, torch.Tensor) or value.shape != current.shape or value.dtype != current.dtype:
        got = (
            f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        )
        raise ValueError(
            f"`callback_on_step_end` returned `{name}` as {got} at step {step_index}; it must be a tensor of the "
            f"shape {tuple(current.shape)} and dtype {current.dtype} it was given."
        )
    return value.to(current.device)


@dataclass
class ScratchPipelineOutput(BaseOutput):
    """Generated images: a list of PIL images, an `(N, H, W, 3)` array in [0, 1], an `(N, 3, H, W)` tensor in [0, 1],
    or the final latents `(N, C, H / f, W / f)` for `output_type="latent"`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class ScratchStableDiffusionPipeline(DiffusionPipeline, ScratchLoadersMixin):
    """Stable Diffusion text-to-image, with the denoising loop written out in `denoise`.

    Components are any with the diffusers / transformers API: our `Scratch*` models, or diffusers'
    `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextModel`; and any diffusers-style scheduler.

    Loading:
      - `ScratchStableDiffusionPipeline.from_pretrained(folder)` loads a folder saved by this class or by diffusers'
        `StableDiffusionPipeline`, each component with the class its folder records.
      - `from_official(folder)` loads a diffusers-layout folder into our own U-Net, VAE and text encoder classes.
      - `from_single_file(path, config=folder)` loads an LDM single-file checkpoint.
      - `save_pretrained(folder)` also writes `pipeline.py`, so `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` returns this class.

    Adapters (`ScratchLoadersMixin`, diffusers' own loaders): `load_lora_weights` / `fuse_lora` / `set_adapters` /
    `unload_lora_weights`, `load_textual_inversion`, `enable_freeu`, `fuse_qkv_projections`, and the attention
    processors of the U-Net (`pipe.unet.set_attn_processor`, `pipe.enable_attention_slicing()`).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "noise_pred", "pred_original_sample"]

    def __init__(
        self,
        vae: ScratchAutoencoderKL | AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: ScratchUNet2DConditionModel | UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = downsampling_factor(self.vae.config.block_out_channels)
        # Pixel sizes must be a multiple of 8 (as in diffusers) and of the VAE's downsampling factor.
        self.size_multiple = math.lcm(8, self.vae_scale_factor)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # What the U-Net was trained as ("ddpm", "edm" or "flow"): the family of the scheduler it came with (of the
        # folder's own scheduler when loaded by `from_pretrained`). A scheduler of another family set later is named.
        self.model_family = scheduler_family(scheduler.config) if scheduler is not None else None
        self._family_warnings: set[str] = set()

    @property
    def components(self) -> dict[str, Any]:
        """The components to build another pipeline with, e.g. `StableDiffusionImg2ImgPipeline(**pipe.components)`:
        the same model and tokenizer objects (no copies), but a new scheduler of the same class and config.
        Schedulers carry per-run state, and diffusers' `StableDiffusionPipeline.__init__` rewrites its scheduler's
        config (`steps_offset` to 1, `clip_sample` off), which on a shared scheduler would change this pipeline's
        later images."""
        components = dict(super().components)
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
        if isinstance(pipe, ScratchStableDiffusionPipeline) and saved_scheduler.is_file():
            pipe.model_family = scheduler_family(cls.read_json(saved_scheduler))
        return pipe

    @staticmethod
    def read_json(path: str | os.PathLike) -> dict:
        """A JSON object from `path`; ValueError naming the file when it is not one."""
        try:
            loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{str(path)!r} is not valid JSON ({error}).") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(loaded).__name__}.")
        return loaded

    @classmethod
    def from_official(cls, folder: str | os.PathLike, **kwargs: Any) -> "ScratchStableDiffusionPipeline":
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
    ) -> "ScratchStableDiffusionPipeline":
        """Load an LDM single-file checkpoint (`.ckpt` / `.safetensors`) into our component classes.

        `config` is a local diffusers-layout folder that supplies the model configs, the tokenizer and the scheduler
        (its model weights are not read). `kwargs` go to `from_pretrained`, e.g. `scheduler=...`.
        """
        from hf_scratch.formats.single_file import load_single_file

        components = load_single_file(path, config=config)
        return cls.from_pretrained(config, **components, **kwargs)

    # ------------------------------------------------------------------ input checks

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_inference_steps: int,
        num_images_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
        clip_skip: int | None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        callback_on_step_end: StepCallback | None = None,
        return_dict: bool = True,
    ) -> int:
        """Raise `TypeError` or `ValueError`, naming the argument, for inputs shared by both pipelines; return the
        number of prompts."""
        check_real("guidance_scale", guidance_scale, maximum=MAX_GUIDANCE_SCALE)
        check_real("eta", eta, minimum=0.0, maximum=1.0)  # DDIM's η: 0 deterministic, 1 DDPM's variance (Eq. 16)
        if not isinstance(return_dict, bool):
            raise TypeError(f"`return_dict` must be True or False, got {return_dict!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        if not isinstance(callback_on_step_end_tensor_inputs, (list, tuple)) or not all(
            isinstance(name, str) for name in callback_on_step_end_tensor_inputs
        ):
            raise TypeError(
                "`callback_on_step_end_tensor_inputs` must be a list of names, got "
                f"{callback_on_step_end_tensor_inputs!r}."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            if not (isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator)):
                raise TypeError(
                    f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}."
                )
        if not isinstance(output_type, str):
            raise TypeError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None:
                check_tensor(name, embeds, ndim=3)
                if embeds.shape[-1] != self.unet.config.cross_attention_dim:
                    raise ValueError(
                        f"`{name}` has {embeds.shape[-1]} features per token, but the U-Net's cross_attention_dim is "
                        f"{self.unet.config.cross_attention_dim}."
                    )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(
                f"Pass exactly one of `prompt` and `prompt_embeds`, got {'both' if prompt is not None else 'neither'}."
            )
        if prompt is not None:
            is_text_list = isinstance(prompt, list) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt)
            if not (isinstance(prompt, str) or is_text_list):
                raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
            if batch_size == 0:
                raise ValueError("`prompt_embeds` holds no prompt (its batch dimension is 0).")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`, got both.")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch_size} prompts; pass one "
                "string, or a list with one entry per prompt."
            )
        if negative_prompt is not None and not (
            isinstance(negative_prompt, str)
            or (isinstance(negative_prompt, list) and all(isinstance(text, str) for text in negative_prompt))
        ):
            raise TypeError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}.")
        if negative_prompt_embeds is not None:
            expected = (batch_size, *prompt_embeds.shape[1:]) if prompt_embeds is not None else None
            if negative_prompt_embeds.shape[0] != batch_size or (
                expected is not None and tuple(negative_prompt_embeds.shape) != expected
            ):
                raise ValueError(
                    f"`negative_prompt_embeds` has shape {tuple(negative_prompt_embeds.shape)}, which does not match "
                    f"{batch_size} prompts" + (f" with `prompt_embeds` of shape {expected}." if expected else ".")
                )
        num_inference_steps = check_integer("num_inference_steps", num_inference_steps, minimum=1)
        num_images_per_prompt = check_integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        self.check_schedule(num_inference_steps)
        num_images = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {batch_size} prompts x "
                f"{num_images_per_prompt} `num_images_per_prompt` make {num_images} images; pass one per image."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has unknown names {unknown}; allowed: "
                f"{self._callback_tensor_inputs}."
            )
        if clip_skip is not None:
            num_layers = self.text_encoder.config.num_hidden_layers
            integer = isinstance(clip_skip, (int, np.integer)) and not isinstance(clip_skip, bool)
            if not (integer and 0 <= clip_skip < num_layers):
                raise ValueError(f"`clip_skip` must be an integer in [0, {num_layers - 1}], got {clip_skip!r}.")
        return batch_size

    def check_size(self, height: int, width: int, names: tuple[str, str] = ("`height`", "`width`")) -> None:
        """Raise `ValueError` unless `height` and `width` are positive multiples of `self.size_multiple`."""
        for name, value in zip(names, (height, width)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(
                    f"{name} must be an integer number of pixels, got {value!r} of type {type(value).__name__}."
                )
            if value <= 0 or value % self.size_multiple != 0:
                raise ValueError(
                    f"{name} must be a positive multiple of {self.size_multiple} (8 and the VAE's downsampling "
                    f"factor {self.vae_scale_factor}), got {value!r}."
                )

    def check_schedule(self, num_inference_steps: int) -> None:
        """Refuse step counts the scheduler cannot run: more steps than training timesteps; "leading" spacing whose
        first timestep leaves more of the noisiest timesteps unvisited than two steps and a tenth of the chain (as
        DPM-Solver's leading spacing does from 200 steps on: it starts at t = 801); and PNDM's Runge–Kutta warm-up below
        4 steps (diffusers' PNDM then fails with a numpy broadcast error)."""
        config = self.scheduler.config
        num_train_timesteps = config.get("num_train_timesteps")
        if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) exceeds the {num_train_timesteps} timesteps the model "
                f"was trained on; pass at most {num_train_timesteps}."
            )
        runge_kutta_warm_up = type(self.scheduler).__name__ == "PNDMScheduler" and not config.get("skip_prk_steps")
        if runge_kutta_warm_up and num_inference_steps < 4:
            raise ValueError(
                f"PNDMScheduler's Runge–Kutta warm-up needs `num_inference_steps` >= 4, got {num_inference_steps}; "
                "pass more steps, or a scheduler built with skip_prk_steps=True."
            )
        if config.get("timestep_spacing") == "leading" and hasattr(self.scheduler, "alphas_cumprod"):
            self.scheduler.set_timesteps(num_inference_steps)  # cheap; __call__ sets them again
            timesteps = [int(t) for t in self.scheduler.timesteps]
            spacing = timesteps[0] - timesteps[1] if len(timesteps) > 1 else num_train_timesteps
            unvisited = num_train_timesteps - 1 - timesteps[0]
            if unvisited > max(2 * spacing, num_train_timesteps // 10):
                name = type(self.scheduler).__name__
                signal = float(self.scheduler.alphas_cumprod[timesteps[0]]) ** 0.5
                raise ValueError(
                    f'With "leading" spacing, {name} at {num_inference_steps} steps starts at t={timesteps[0]} of '
                    f"{num_train_timesteps}: sampling would begin from pure noise where the model expects signal "
                    f"(√ᾱ = {signal:.2f}) and wash out. Use fewer steps, or trailing spacing: pipe.scheduler = "
                    f'{name}.from_config(pipe.scheduler.config, timestep_spacing="trailing").'
                )

    def check_timesteps(
        self, num_inference_steps: int, timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None
    ) -> int:
        """Refuse, by name, custom `timesteps` / `sigmas` the scheduler cannot take or that are not finite, strictly
        decreasing and in range for its family (`check_custom_schedule`); name, once per pipeline, a scheduler of
        another family than the model's. Return the number of steps the call will run."""
        family = scheduler_family(self.scheduler.config)
        if self.model_family is not None and family != self.model_family and family not in self._family_warnings:
            self._family_warnings.add(family)
            logger.warning(
                f"{type(self.scheduler).__name__} samples {family}-family models, but this pipeline's U-Net came with "
                f"a {self.model_family}-family scheduler; its images will be wrong. Set a {self.model_family}-family "
                "scheduler (hf_scratch.schedulers.make_scheduler names them)."
            )
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass at most one of `timesteps` and `sigmas`, got both.")
        for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
            if values is None:
                continue
            values = check_custom_schedule(name, values, family, self.scheduler.config.get("num_train_timesteps"))
            if name not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"`{name}` is not supported by {type(self.scheduler).__name__}, whose `set_timesteps` takes no "
                    f"custom {name}; use a scheduler that does (diffusers' DDPMScheduler or EulerDiscreteScheduler, "
                    "or a flow-matching scheduler)."
                )
            return len(values)
        return num_inference_steps

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

    def check_memory(self, num_images: int, height: int, width: int) -> None:
        """Refuse, before allocating anything, a request whose decode cannot fit in the memory that is free.

        The estimate is the VAE decoder's full-resolution stage, the largest live set: about four tensors of
        `block_out_channels[0]` channels per image at `height` x `width` (tiled decoding, `enable_vae_tiling`, keeps
        only a tile of it).
        """
        if getattr(self.vae, "use_tiling", False):
            return
        element_size = torch.empty((), dtype=self.vae.dtype).element_size()
        needed = 4 * num_images * height * width * self.vae.config.block_out_channels[0] * element_size
        device = self._execution_device
        if device.type == "cuda":
            available = torch.cuda.mem_get_info(device)[0]
        else:
            try:
                meminfo = Path("/proc/meminfo").read_text().splitlines()
                available = 1024 * int(next(line for line in meminfo if line.startswith("MemAvailable")).split()[1])
            except (OSError, StopIteration, ValueError):
                return  # no way to tell on this system
        if needed > available:
            raise ValueError(
                f"{num_images} image(s) of {height}x{width} pixels need about {needed / 2**30:.1f} GiB to decode, but "
                f"only {available / 2**30:.1f} GiB of {device.type} memory is free; use a smaller `height`/`width`, "
                "fewer images, or `pipe.enable_vae_tiling()`."
            )

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
    ) -> torch.Tensor:
        """The text embeddings the denoising loop reads: `[uncond; cond]` stacked on the batch axis when guidance is
        on (w > 1), else the prompts' alone (`encode_prompt`)."""
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, guidance_scale > 1, negative_prompt,
            prompt_embeds, negative_prompt_embeds, clip_skip,
        )  # fmt: skip
        return prompt_embeds if negative_prompt_embeds is None else torch.cat([negative_prompt_embeds, prompt_embeds])

    def prepare_extra_step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, eta: float
    ) -> dict[str, Any]:
        """`eta` and `generator` for `scheduler.step`, each only if the scheduler's `step` accepts it."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs = {"eta": eta, "generator": generator}
        return {name: value for name, value in extra_step_kwargs.items() if name in accepted}

    def prepare_latents(
        self,
        num_images: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_T ~ N(0, init_noise_sigma^2 I), drawn here or given as unit-variance `latents`. Flow schedulers, which
        start from x_1 = ε, may have no `init_noise_sigma`: it is 1 for them."""
        if latents is None:
            shape = self.latent_shape(num_images, height, width)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def latent_shape(self, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(N, C, H / f, W / f): the U-Net's input shape for `num_images` images of `height` x `width` pixels."""
        f = self.vae_scale_factor
        return (num_images, self.unet.config.in_channels, height // f, width // f)

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
    ) -> torch.Tensor:
        """Run x_t -> ε̂ -> x_{t-1} over `timesteps`. With guidance, `prompt_embeds` is `[uncond; cond]`, and
        `guidance_rescale` > 0 rescales the guided prediction (`rescale_noise_cfg`). `conditioning` is stacked after
        the latents on the U-Net's channel axis (an inpainting U-Net's mask and masked image), and
        `step_end(step_index, latents)` returns the latents to go on with after each step (inpainting's blending)."""
        do_classifier_free_guidance = guidance_scale > 1
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step_index, timestep in enumerate(timesteps):
                # Classifier-free guidance: one U-Net call on [x_t; x_t] with [uncond; cond] text.
                model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):  # flow schedulers feed x_t as it is
                    model_input = self.scheduler.scale_model_input(model_input, timestep)
                if conditioning is not None:
                    model_input = torch.cat([model_input, conditioning], dim=1)
                noise_pred = self.unet(model_input, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)

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

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    @scales_lora
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        clip_skip: int | None = None,
        guidance_rescale: float = 0.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> ScratchPipelineOutput | tuple:
        """Generate images from text.

        Args:
            prompt: the prompt or prompts; or pass `prompt_embeds` instead.
            height, width: image size in pixels, a multiple of 8; default `unet.config.sample_size * vae_scale_factor`.
            num_inference_steps: number of denoising steps (>= 1).
            guidance_scale: classifier-free guidance weight w; `w <= 1` turns guidance off (one U-Net batch, not two).
            negative_prompt: text to steer away from (one string, or one per prompt); used only with guidance.
            num_images_per_prompt: images generated for each prompt.
            eta: DDIM's η (0 is deterministic); passed only to schedulers whose `step` accepts it.
            generator: a `torch.Generator`, or one per image, for reproducible noise.
            latents: unit-variance starting noise of shape `(N, C, height / f, width / f)`.
            prompt_embeds, negative_prompt_embeds: precomputed text embeddings `(N, tokens, dim)`.
            output_type: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent".
            return_dict: return a `ScratchPipelineOutput` rather than the tuple `(images,)`.
            callback_on_step_end: called as `callback(pipe, step_index, timestep, callback_kwargs)` after each step;
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (from "latents",
                "prompt_embeds", "noise_pred", "pred_original_sample"); it may return a dict that replaces "latents"
                or "prompt_embeds".
            clip_skip: use the text encoder's hidden state this many layers before the last.
            guidance_rescale: φ of rescaled guidance (Lin et al. 2024, Sec. 3.4), in [0, 1]; 0 leaves it off.
            timesteps, sigmas: a custom schedule, for schedulers whose `set_timesteps` takes one (it then sets the
                number of steps).
            cross_attention_kwargs: `{"scale": s}` scales the loaded LoRA adapters' updates by s for this call
                (applied by `scales_lora`); no other key is taken.
        """
        default_height, default_width = self._default_size()
        height = default_height if height is None else height
        width = default_width if width is None else width
        batch_size = self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
            num_images_per_prompt, generator, output_type, callback_on_step_end_tensor_inputs, clip_skip,
            guidance_scale, eta, callback_on_step_end, return_dict,
        )  # fmt: skip
        self.check_size(height, width)
        check_real("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
        height, width = int(height), int(width)
        num_inference_steps, num_images_per_prompt = int(num_inference_steps), int(num_images_per_prompt)
        self.check_timesteps(num_inference_steps, timesteps, sigmas)
        num_images = batch_size * num_images_per_prompt
        self.check_memory(num_images, height, width)
        latent_shape = self.latent_shape(num_images, height, width)
        if latents is not None:
            check_tensor("latents", latents, ndim=4)
            if tuple(latents.shape) != latent_shape:
                raise ValueError(
                    f"`latents` has shape {tuple(latents.shape)}, expected {latent_shape} for {batch_size} prompts x "
                    f"{num_images_per_prompt} images at {height}x{width}."
                )

        device = self._execution_device
        prompt_embeds = self.guidance_embeddings(
            prompt, device, num_images_per_prompt, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip,
        )  # fmt: skip

        timesteps, num_inference_steps = self.retrieve_timesteps(num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(num_images, height, width, prompt_embeds.dtype, device, generator, latents)
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale,
        )  # fmt: skip
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return ScratchPipelineOutput(images=images) if return_dict else (images,)

    def _default_size(self) -> tuple[int, int]:
        """(height, width) from the U-Net's `sample_size` (an int or a pair) times the VAE's downsampling factor."""
        sample_size = self.unet.config.sample_size
        latent_height, latent_width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return latent_height * self.vae_scale_factor, latent_width * self.vae_scale_factor
