"""Text-to-image latent diffusion: Stable Diffusion's sampling loop (Rombach et al., arXiv:2112.10752).

Gaussian latents x_T are denoised by the U-Net and a scheduler, guided by the prompt, and the VAE decodes x_0 (the
steps are `ScratchPipelineBase`'s). Given the same components, scheduler and seed, the images equal those of
diffusers' `StableDiffusionPipeline`.

There is no safety checker: the pipeline returns exactly what the decoder produces.
"""

from typing import Any

import torch
from diffusers.guiders import BaseGuidance
from diffusers.image_processor import PipelineImageInput

from hf_scratch.pipelines.base import Generator, ScratchPipelineBase, ScratchPipelineOutput
from hf_scratch.pipelines.checks import StepCallback
from hf_scratch.pipelines.loaders import scales_lora

__all__ = ["ScratchPipelineOutput", "ScratchStableDiffusionPipeline"]


class ScratchStableDiffusionPipeline(ScratchPipelineBase):
    """Stable Diffusion text-to-image: the base's loop started from pure noise (see `ScratchPipelineBase` for the
    components, loading and adapters)."""

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
        generator: Generator = None,
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
        ip_adapter_image: PipelineImageInput | list | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        guider: BaseGuidance | None = None,
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
            ip_adapter_image: one image per loaded IP-Adapter (`load_ip_adapter`), encoded by its image encoder.
            ip_adapter_image_embeds: or their embeddings, one tensor per IP-Adapter, `[uncond; cond]` on the first
                axis under guidance (see `ip_adapter_embeddings`).
            guider: guidance other than classifier-free guidance with `guidance_scale` (which it replaces, with
                `guidance_rescale`): a diffusers guider such as `AdaptiveProjectedGuidance(guidance_scale=...)`, or
                `IntervalGuidance` / `ModelAutoGuidance` of `hf_scratch.pipelines.guidance`.
        """
        default_height, default_width = self._default_size()
        height = default_height if height is None else height
        width = default_width if width is None else width
        batch_size = self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
            num_images_per_prompt, generator, output_type, callback_on_step_end_tensor_inputs, clip_skip,
            guidance_scale, eta, callback_on_step_end, return_dict, guidance_rescale,
        )  # fmt: skip
        self.check_guider(guider, guidance_rescale, ip_adapter_image, ip_adapter_image_embeds)
        self.check_size(height, width)
        height, width = int(height), int(width)
        num_inference_steps, num_images_per_prompt = int(num_inference_steps), int(num_images_per_prompt)
        self.check_timesteps(num_inference_steps, timesteps, sigmas)
        num_images = batch_size * num_images_per_prompt
        self.check_memory(num_images, height, width)
        self.check_latents(
            latents, self.latent_shape(num_images, height, width),
            f"{batch_size} prompts x {num_images_per_prompt} images at {height}x{width}",
        )  # fmt: skip

        device = self._execution_device
        prompt_embeds = self.guidance_embeddings(
            prompt, device, num_images_per_prompt, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip, guider,
        )  # fmt: skip
        image_embeds = self.ip_adapter_embeddings(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt,
            self.stacks_uncond(guidance_scale, guider),
        )  # fmt: skip

        timesteps, num_inference_steps = self.retrieve_timesteps(num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(num_images, height, width, prompt_embeds.dtype, device, generator, latents)
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale,
            added_cond_kwargs=image_embeds, guider=guider,
        )  # fmt: skip
        return self.finish(latents, output_type, return_dict)
