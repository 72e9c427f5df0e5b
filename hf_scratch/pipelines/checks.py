"""Input checks shared by every pipeline: each refuses a bad argument by name, with the value received and what is
allowed, before anything is computed.

`check_integer`, `check_real` and `check_tensor` check one value; `PipelineChecks` holds the checks that need the
pipeline's components (the prompts against the U-Net and text encoder, sizes against the VAE, step counts and custom
schedules against the scheduler, and the memory a decode needs).
"""

import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from hf_scratch.schedulers import scheduler_family
from hf_scratch.schedulers.schedule import check_custom_schedule

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Classifier-free guidance weights in use stay below about 30; from here on ε̂_uncond + w (ε̂_cond − ε̂_uncond) overflows.
MAX_GUIDANCE_SCALE = 1000.0

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


class PipelineChecks:
    """The checks of a pipeline with `unet`, `vae`, `text_encoder` and `scheduler` components (mixed into
    `ScratchPipelineBase`)."""

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
        guidance_rescale: float = 0.0,
    ) -> int:
        """Raise `TypeError` or `ValueError`, naming the argument, for the inputs every pipeline takes; return the
        number of prompts."""
        check_real("guidance_scale", guidance_scale, maximum=MAX_GUIDANCE_SCALE)
        check_real("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
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

    def check_guider(
        self, guider: Any, guidance_rescale: float, ip_adapter_image: Any = None, ip_adapter_image_embeds: Any = None
    ) -> None:
        """A `guider` must be a diffusers guider (`diffusers.guiders.BaseGuidance`); it replaces `guidance_scale` and
        `guidance_rescale` (so a rescale beside it is refused, as is IP-Adapter beside a guide model, which would
        need the image embeddings too)."""
        if guider is None:
            return
        from diffusers.guiders import BaseGuidance

        if not isinstance(guider, BaseGuidance):
            raise TypeError(
                "`guider` must be a diffusers guider (diffusers.guiders.BaseGuidance, e.g. AdaptiveProjectedGuidance) "
                f"or one of hf_scratch.pipelines.guidance, got {type(guider).__name__}."
            )
        if guidance_rescale > 0:
            raise ValueError(
                "`guidance_rescale` applies to the pipeline's own classifier-free guidance; with a `guider`, pass the "
                "rescale to the guider instead (e.g. ClassifierFreeGuidance(guidance_rescale=0.7))."
            )
        guide = getattr(guider, "guide", None)
        if guide is not None:
            if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
                raise ValueError("IP-Adapter images cannot be used with a guide model (`ModelAutoGuidance`).")
            for name in ("in_channels", "cross_attention_dim"):
                if getattr(guide.config, name, None) != getattr(self.unet.config, name, None):
                    raise ValueError(
                        f"The guide model's {name} ({getattr(guide.config, name, None)}) differs from the U-Net's "
                        f"({getattr(self.unet.config, name, None)}); autoguidance needs a guide of the same latents "
                        "and text encoder."
                    )

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
        if config.get("timestep_spacing") == "leading" and scheduler_family(self.scheduler) == "ddpm":
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
        family = scheduler_family(self.scheduler)
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

    def check_latents(self, latents: torch.Tensor | None, expected: tuple[int, ...], description: str) -> None:
        """Refuse given starting `latents` that are not a finite float tensor of the `expected` shape (`description`
        says what that shape is for)."""
        if latents is None:
            return
        check_tensor("latents", latents, ndim=len(expected))
        if tuple(latents.shape) != expected:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {expected} for {description}.")
