"""Image-to-image latent diffusion (SDEdit, Meng et al., arXiv:2108.01073) on Stable Diffusion's components.

The input image is VAE-encoded to x_0, noised to x_t by q(x_t | x_0) at the timestep `strength` of the way into the
schedule, and denoised by the same loop as text-to-image over the remaining timesteps. Given the same components,
scheduler and seed, the images equal those of diffusers' `StableDiffusionImg2ImgPipeline`.
"""

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.utils.torch_utils import randn_tensor

from hf_scratch.pipelines.text_to_image import ScratchPipelineOutput, ScratchStableDiffusionPipeline, StepCallback


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
        if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
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
        """x_t ~ q(x_t | x_0) with x_0 = scaling_factor * (a sample of the VAE posterior of `image`): `add_noise` for
        DDPM-family schedulers, the flow x_σ = (1 − σ) x_0 + σ ε (`scale_noise`) for flow-matching ones."""
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
        if not hasattr(self.scheduler, "add_noise"):
            return self.scheduler.scale_noise(init_latents, timestep.repeat(num_images), noise)
        return self.scheduler.add_noise(init_latents, noise, timestep.repeat(num_images))

    @torch.no_grad()
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
    ) -> ScratchPipelineOutput | tuple:
        """Transform `image` guided by text.

        Args:
            image: a PIL image, an `(H, W, 3)` / `(N, H, W, 3)` array in [0, 1], an `(N, 3, H, W)` tensor in [-1, 1]
                or [0, 1], or a list of them: one image, or one per prompt. Images are resized to the first one's size
                rounded down to a multiple of 8 (and of the VAE's downsampling factor).
            strength: how far into the noise schedule to start, in (0, 1]; 1 ignores the image's content, and
                `int(num_inference_steps * strength)` steps are run.
            The other arguments are those of `ScratchStableDiffusionPipeline.__call__`.
        """
        batch_size = self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
            num_images_per_prompt, generator, output_type, callback_on_step_end_tensor_inputs, clip_skip,
        )  # fmt: skip
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
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, guidance_scale > 1, negative_prompt,
            prompt_embeds, negative_prompt_embeds, clip_skip,
        )  # fmt: skip
        if negative_prompt_embeds is not None:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        latents = self.prepare_image_latents(image, timesteps[:1], num_images, prompt_embeds.dtype, device, generator)
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale,
            self.prepare_extra_step_kwargs(generator, eta), callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return ScratchPipelineOutput(images=images) if return_dict else (images,)
