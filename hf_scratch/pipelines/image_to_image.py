"""Image-to-image latent diffusion (SDEdit, Meng et al., arXiv:2108.01073) on Stable Diffusion's components.

The input image is VAE-encoded to x_0, noised to x_t by q(x_t | x_0) at the timestep `strength` of the way into the
schedule, and denoised by the same loop as text-to-image over the remaining timesteps. Given the same components,
scheduler and seed, the images equal those of diffusers' `StableDiffusionImg2ImgPipeline`.
"""

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.utils.torch_utils import randn_tensor

from hf_scratch.pipelines.loaders import scales_lora
from hf_scratch.pipelines.text_to_image import (
    ScratchPipelineOutput,
    ScratchStableDiffusionPipeline,
    StepCallback,
    check_real,
)


def _rgb_pil(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode as RGB; transparent pixels (RGBA, LA, PA, palette transparency) are laid on white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _rgb_array(image: np.ndarray | torch.Tensor, channel_axis: int) -> np.ndarray | torch.Tensor:
    """Floats in [0, 1] (or the caller's [-1, 1]) with 3 channels: uint8 is read as 0–255, grey is repeated, and an
    alpha channel is laid on white."""
    is_tensor = isinstance(image, torch.Tensor)
    if image.dtype in (np.uint8, torch.uint8):
        image = image.float() / 255 if is_tensor else image.astype(np.float32) / 255
    elif not (image.is_floating_point() if is_tensor else np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"`image` arrays must hold floats in [0, 1] or uint8 in 0–255, got dtype {image.dtype}.")
    finite = torch.isfinite(image).all() if is_tensor else np.isfinite(image).all()
    if not finite:
        raise ValueError("`image` contains NaN or infinite values.")
    channels = image.shape[channel_axis]
    if channels == 4:
        index = [slice(None)] * image.ndim
        index[channel_axis] = slice(0, 3)
        colour = image[tuple(index)]
        index[channel_axis] = slice(3, 4)
        alpha = image[tuple(index)]
        image = colour * alpha + (1 - alpha)  # over white
    elif channels == 1:
        repeats = [1] * image.ndim
        repeats[channel_axis] = 3
        image = image.repeat(*repeats) if is_tensor else np.tile(image, repeats)
    return image


def as_rgb_images(image: PipelineImageInput) -> PipelineImageInput:
    """The image(s) as people pass them, made into what the VAE reads: RGB PIL images, or float arrays (H, W, 3) /
    tensors (3, H, W) with a leading batch axis optional. Grey numpy (H, W) arrays become (H, W, 3). A list mixing PIL
    images and arrays becomes a list of PIL images."""
    if isinstance(image, list):
        converted = [as_rgb_images(item) for item in image]
        if any(isinstance(item, PIL.Image.Image) for item in converted) and not all(
            isinstance(item, PIL.Image.Image) for item in converted
        ):
            converted = [item if isinstance(item, PIL.Image.Image) else _to_pil(item) for item in converted]
        return converted
    if isinstance(image, PIL.Image.Image):
        return _rgb_pil(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        return _rgb_array(image, channel_axis=-1) if image.ndim in (3, 4) else image
    if isinstance(image, torch.Tensor):  # (C, H, W) or (N, C, H, W); a 2-D tensor is refused by `check_image`
        return _rgb_array(image, channel_axis=-3) if image.ndim in (3, 4) else image
    return image


def _to_pil(image: np.ndarray | torch.Tensor) -> PIL.Image.Image:
    """One float image, (H, W, 3) array in [0, 1] or (3, H, W) tensor in [-1, 1] or [0, 1], as an RGB PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = ((image + 1) / 2 if image.min() < 0 else image).permute(*range(image.ndim - 3), -2, -1, -3).numpy()
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError("`image` lists that mix PIL images and arrays need one image per array.")
        image = image[0]
    return PIL.Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


class ScratchStableDiffusionImg2ImgPipeline(ScratchStableDiffusionPipeline):
    """Stable Diffusion image-to-image: text-to-image's components and loop, started from a noised input image."""

    def check_image(self, image: PipelineImageInput, strength: float, num_inference_steps: int) -> tuple[int, int]:
        """Raise `ValueError` for a bad `image` or a `strength` that leaves no denoising step; return the size
        (height, width) the image is resized to: its own, rounded down to a multiple of `self.size_multiple`."""
        images = image if isinstance(image, list) else [image]
        if not images or not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in images):
            raise ValueError(
                "`image` must be a PIL image, a numpy array, a torch tensor or a non-empty list of them, got "
                f"{type(image).__name__}."
            )
        first = images[0]
        if not isinstance(first, PIL.Image.Image) and first.ndim not in (3, 4):
            raise ValueError(
                f"`image` arrays must be (H, W, C) or (N, H, W, C) and tensors (C, H, W) or (N, C, H, W), got shape "
                f"{tuple(first.shape)}."
            )
        if check_real("strength", strength) <= 0 or strength > 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}.")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(
                f"`strength` {strength} x `num_inference_steps` {num_inference_steps} leaves no denoising step; "
                "raise either so that their product is at least 1."
            )
        if isinstance(first, PIL.Image.Image):
            height, width = first.height, first.width
        elif isinstance(first, torch.Tensor):
            height, width = first.shape[-2:]
        else:
            height, width = first.shape[-3:-1]
        if min(height, width) < self.size_multiple:
            raise ValueError(
                f"`image` is {height}x{width} pixels; it must be at least {self.size_multiple} pixels on each side."
            )
        return height - height % self.size_multiple, width - width % self.size_multiple

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last `strength` fraction of the scheduler's timesteps (call after `scheduler.set_timesteps`)."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = (num_inference_steps - init_timestep) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start)
        return self.scheduler.timesteps[t_start:]

    def prepare_image_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        num_images: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) with x_0 = scaling_factor * (a sample of the VAE posterior of `image`), by `noised`."""
        image = image.to(device=device, dtype=dtype)
        if isinstance(generator, list):
            # One posterior sample per image, each from its own generator.
            image = image.repeat_interleave(num_images // image.shape[0], dim=0)
            init_latents = torch.cat(
                [self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(num_images)]
            )
        else:
            init_latents = self.vae.encode(image).latent_dist.sample(generator)
            init_latents = init_latents.repeat_interleave(num_images // init_latents.shape[0], dim=0)
        init_latents = self.vae.config.scaling_factor * init_latents
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.noised(init_latents, noise, timestep.repeat(num_images))

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0 = latents) with the given noise: `add_noise` for DDPM-family schedulers, the flow's
        x_σ = (1 − σ) x_0 + σ ε (`scale_noise`) for flow-matching ones."""
        if hasattr(self.scheduler, "add_noise"):
            return self.scheduler.add_noise(latents, noise, timestep)
        return self.scheduler.scale_noise(latents, timestep, noise)

    @torch.no_grad()
    @scales_lora
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        """Transform `image` guided by text.

        Args:
            image: a PIL image, an `(H, W, 3)` / `(N, H, W, 3)` array in [0, 1], an `(N, 3, H, W)` tensor in [-1, 1]
                or [0, 1], or a list of them: one image, or one per prompt. Images are resized to the first one's size
                rounded down to a multiple of 8 (and of the VAE's downsampling factor).
            strength: how far into the noise schedule to start, in (0, 1]; 1 ignores the image's content, and
                `int(num_inference_steps * strength)` steps are run.
            The other arguments (`guidance_rescale`, `timesteps`, `sigmas`, `cross_attention_kwargs` among them) are
            those of `ScratchStableDiffusionPipeline.__call__`.
        """
        batch_size = self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
            num_images_per_prompt, generator, output_type, callback_on_step_end_tensor_inputs, clip_skip,
            guidance_scale, eta, callback_on_step_end, return_dict,
        )  # fmt: skip
        num_inference_steps, num_images_per_prompt = int(num_inference_steps), int(num_images_per_prompt)
        check_real("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
        image = as_rgb_images(image)
        height, width = self.check_image(image, strength, num_inference_steps)
        self.check_memory(batch_size * num_images_per_prompt, height, width)
        image = self.image_processor.preprocess(image, height=height, width=width)
        if image.shape[0] not in (1, batch_size) or image.shape[1] != self.vae.config.in_channels:
            raise ValueError(
                f"`image` gives a batch of shape {tuple(image.shape)}; pass one image or one per prompt "
                f"({batch_size}), each with {self.vae.config.in_channels} channels."
            )
        num_images = batch_size * num_images_per_prompt

        device = self._execution_device
        prompt_embeds = self.guidance_embeddings(
            prompt, device, num_images_per_prompt, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip,
        )  # fmt: skip

        _, num_inference_steps = self.retrieve_timesteps(num_inference_steps, device, timesteps, sigmas)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        latents = self.prepare_image_latents(image, timesteps[:1], num_images, prompt_embeds.dtype, device, generator)
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale,
        )  # fmt: skip
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return ScratchPipelineOutput(images=images) if return_dict else (images,)
