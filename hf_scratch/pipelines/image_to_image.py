"""Image-to-image latent diffusion (SDEdit, Meng et al., arXiv:2108.01073) on Stable Diffusion's components.

The input image is VAE-encoded to x_0, noised to x_t by q(x_t | x_0) at the timestep `strength` of the way into the
schedule, and denoised by the same loop as text-to-image over the remaining timesteps. Given the same components,
scheduler and seed, the images equal those of diffusers' `StableDiffusionImg2ImgPipeline`.
"""

from typing import Any

import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.utils.torch_utils import randn_tensor

from hf_scratch.images import batch_of, read_images
from hf_scratch.pipelines.base import Generator, ScratchPipelineBase, ScratchPipelineOutput
from hf_scratch.pipelines.checks import StepCallback, check_real
from hf_scratch.pipelines.loaders import scales_lora


class ScratchStableDiffusionImg2ImgPipeline(ScratchPipelineBase):
    """Stable Diffusion image-to-image: the base's loop (`ScratchPipelineBase`), started from a noised input image."""

    def check_image(
        self, pixels: list[torch.Tensor], strength: float, num_steps: int, schedule: str
    ) -> tuple[int, int]:
        """Raise `ValueError` for images (`read_images`' tensors) smaller than `self.size_multiple` or a `strength`
        that leaves none of the `num_steps` steps (`schedule` says where that count comes from); return the size
        (height, width) the images are resized to: the first one's, rounded down to a multiple of
        `self.size_multiple`."""
        if check_real("strength", strength) <= 0 or strength > 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}.")
        if int(num_steps * strength) < 1:
            raise ValueError(
                f"`strength` {strength} x {num_steps} steps ({schedule}) leaves no denoising step; raise either so "
                "that their product is at least 1."
            )
        height, width = pixels[0].shape[-2:]
        if min(height, width) < self.size_multiple:
            raise ValueError(
                f"`image` is {height}x{width} pixels; it must be at least {self.size_multiple} pixels on each side."
            )
        return height - height % self.size_multiple, width - width % self.size_multiple

    @staticmethod
    def schedule_source(timesteps: list | None, sigmas: list | None) -> str:
        """Where the step count comes from, for `check_image`'s message."""
        if timesteps is not None:
            return "the length of `timesteps`"
        return "the length of `sigmas`" if sigmas is not None else "`num_inference_steps`"

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last `strength` fraction of the scheduler's timesteps (call after `scheduler.set_timesteps`)."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = (num_inference_steps - init_timestep) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start)
        timesteps = self.scheduler.timesteps[t_start:]
        if len(timesteps) == 0:
            raise ValueError(
                f"`strength` {strength} leaves none of the scheduler's {len(self.scheduler.timesteps)} timesteps; "
                "raise `strength` or the number of steps."
            )
        return timesteps

    def prepare_image_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        num_images: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Generator,
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) with x_0 the scaled VAE latents of `image` (`encode_image`), by `noised`."""
        image = image.to(device=device, dtype=dtype)
        if isinstance(generator, list):  # one posterior sample per image, each from its own generator
            image = image.repeat_interleave(num_images // image.shape[0], dim=0)
        init_latents = self.encode_image(image, generator)
        init_latents = init_latents.repeat_interleave(num_images // init_latents.shape[0], dim=0)
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.noised(init_latents, noise, timestep.repeat(num_images))

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
        generator: Generator = None,
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
        ip_adapter_image: PipelineImageInput | list | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ) -> ScratchPipelineOutput | tuple:
        """Transform `image` guided by text.

        Args:
            image: a PIL image of any mode, a numpy array `(H, W[, C])` / `(N, H, W, C)` or a tensor `(C, H, W)` /
                `(N, C, H, W)` of uint8, uint16 or floats in [0, 1] (or [-1, 1]), or a list of them: one image, or
                one per prompt, read by `hf_scratch.images.read_image` (which refuses ambiguous ranges by name).
                Images are resized to the first one's size rounded down to a multiple of 8 (and of the VAE's
                downsampling factor).
            strength: how far into the noise schedule to start, in (0, 1]; 1 ignores the image's content, and
                `int(num_inference_steps * strength)` steps are run.
            The other arguments (`guidance_rescale`, `timesteps`, `sigmas`, `cross_attention_kwargs` among them) are
            those of `ScratchStableDiffusionPipeline.__call__` (text-to-image).
        """
        batch_size = self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
            num_images_per_prompt, generator, output_type, callback_on_step_end_tensor_inputs, clip_skip,
            guidance_scale, eta, callback_on_step_end, return_dict, guidance_rescale,
        )  # fmt: skip
        num_inference_steps, num_images_per_prompt = int(num_inference_steps), int(num_images_per_prompt)
        pixels = read_images(image, "image")
        num_steps = self.check_timesteps(num_inference_steps, timesteps, sigmas)
        height, width = self.check_image(pixels, strength, num_steps, self.schedule_source(timesteps, sigmas))
        self.check_memory(batch_size * num_images_per_prompt, height, width)
        image = 2 * batch_of(pixels, height, width) - 1  # [0, 1] -> the VAE's [-1, 1]
        if image.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`image` gives a batch of {image.shape[0]} images; pass one image or one per prompt ({batch_size})."
            )
        num_images = batch_size * num_images_per_prompt

        device = self._execution_device
        prompt_embeds = self.guidance_embeddings(
            prompt, device, num_images_per_prompt, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip,
        )  # fmt: skip
        image_embeds = self.ip_adapter_embeddings(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt, guidance_scale > 1
        )

        _, num_inference_steps = self.retrieve_timesteps(num_inference_steps, device, timesteps, sigmas)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        latents = self.prepare_image_latents(image, timesteps[:1], num_images, prompt_embeds.dtype, device, generator)
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale,
            added_cond_kwargs=image_embeds,
        )  # fmt: skip
        return self.finish(latents, output_type, return_dict)
