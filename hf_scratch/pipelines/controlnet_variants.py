"""Image-to-image and inpainting guided by ControlNets (Zhang et al. 2023, arXiv:2302.05543).

Each runs its own pipeline unchanged (`ScratchStableDiffusionImg2ImgPipeline`, SDEdit's start from the noised image;
`ScratchStableDiffusionInpaintPipeline`, the mask and the masked image) and adds the ControlNets' residuals to every
U-Net call of its loop (`ControlNetMixin`). `control_image` is the condition, `image` the picture to change. Given the
same components, scheduler and seed, the images equal those of diffusers' `StableDiffusionControlNetImg2ImgPipeline`
and `StableDiffusionControlNetInpaintPipeline`.
"""

from collections.abc import Callable
from typing import Any

import torch
from diffusers.image_processor import PipelineImageInput

from hf_scratch.images import batch_of, read_images
from hf_scratch.pipelines.base import Generator, ScratchPipelineOutput
from hf_scratch.pipelines.checks import StepCallback
from hf_scratch.pipelines.controlnet import ControlArguments, ControlNetMixin
from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline
from hf_scratch.pipelines.inpaint import ScratchStableDiffusionInpaintPipeline


class ControlledLoopMixin(ControlNetMixin):
    """Runs the extended pipeline's own `__call__` (`call_controlled`) with the ControlNets' residuals in its loop:
    `denoise`, which that `__call__` reaches once its latents and timesteps are ready, adds them as `unet_extras`,
    sized from the latents (`height` = latent height x the VAE's factor, the batch = the latents' batch)."""

    _control: tuple[ControlArguments, int] | None = None  # during a call: its control and images per prompt

    def call_controlled(self, call: Callable[..., Any], control: ControlArguments, **arguments: Any) -> Any:
        """`call(**arguments)` with `control` acting in `denoise`."""
        self._control = (control, arguments["num_images_per_prompt"])
        try:
            return call(**arguments)
        finally:
            self._control = None

    def denoise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, guidance_scale: float,
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        """`ScratchPipelineBase.denoise`, with the residuals of the call's ControlNets (`control_residuals`)."""
        if self._control is not None:
            control, num_images_per_prompt = self._control
            height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
            num_images = latents.shape[0]
            kwargs["unet_extras"] = self.control_residuals(
                control, height, width, num_images // int(num_images_per_prompt), num_images, len(timesteps),
                guidance_scale > 1,
            )  # fmt: skip
        return super().denoise(latents, timesteps, prompt_embeds, guidance_scale, *args, **kwargs)


class ScratchStableDiffusionControlNetImg2ImgPipeline(ControlledLoopMixin, ScratchStableDiffusionImg2ImgPipeline):
    """Stable Diffusion image-to-image guided by one ControlNet or several."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        control_image: PipelineImageInput | list = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | list | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guidance_rescale: float = 0.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> ScratchPipelineOutput | tuple:
        """Transform `image` guided by text and condition images.

        Args:
            image: the image to transform, as for `ScratchStableDiffusionImg2ImgPipeline`.
            control_image: the condition, as `image` of `ScratchStableDiffusionControlNetPipeline` (one per
                ControlNet when there are several); resized to the output size.
            height, width: output size in pixels, a multiple of 8; default `image`'s size rounded down to one.
            strength: how far into the noise schedule to start, in (0, 1].
            controlnet_conditioning_scale, guess_mode, control_guidance_start, control_guidance_end: as for
                `ScratchStableDiffusionControlNetPipeline`.
            The others are those of `ScratchStableDiffusionImg2ImgPipeline.__call__`.
        """
        control = self.check_control(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode,
            name="control_image",
        )  # fmt: skip
        if height is not None or width is not None:
            pixels = read_images(image, "image")
            image = batch_of(pixels, *self.default_size(pixels, height, width))
        return self.call_controlled(
            super().__call__, control, prompt=prompt, image=image, strength=strength,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, output_type=output_type, return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, clip_skip=clip_skip,
            guidance_rescale=guidance_rescale, timesteps=timesteps, sigmas=sigmas,
            cross_attention_kwargs=cross_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )  # fmt: skip


class ScratchStableDiffusionControlNetInpaintPipeline(ControlledLoopMixin, ScratchStableDiffusionInpaintPipeline):
    """Stable Diffusion inpainting guided by one ControlNet or several. The ControlNets read the latents x_t alone,
    without an inpainting U-Net's mask and masked-image channels."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        control_image: PipelineImageInput | list = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | list | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guidance_rescale: float = 0.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> ScratchPipelineOutput | tuple:
        """Repaint the white part of `mask_image` in `image`, guided by text and condition images.

        Args:
            image, mask_image, latents: as for `ScratchStableDiffusionInpaintPipeline`.
            control_image: the condition, as `image` of `ScratchStableDiffusionControlNetPipeline` (one per
                ControlNet when there are several); resized to the output size.
            height, width: output size in pixels, a multiple of 8; default `image`'s size rounded down to one.
            strength: how far into the noise schedule to start, in (0, 1]; 1 (the default) starts from pure noise.
            controlnet_conditioning_scale, guess_mode, control_guidance_start, control_guidance_end: as for
                `ScratchStableDiffusionControlNetPipeline`.
            The others are those of `ScratchStableDiffusionInpaintPipeline.__call__`.
        """
        control = self.check_control(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode,
            name="control_image",
        )  # fmt: skip
        height, width = self.default_size(read_images(image, "image"), height, width)
        return self.call_controlled(
            super().__call__, control, prompt=prompt, image=image, mask_image=mask_image,
            height=height, width=width, strength=strength, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, clip_skip=clip_skip,
            guidance_rescale=guidance_rescale, timesteps=timesteps, sigmas=sigmas,
            cross_attention_kwargs=cross_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )  # fmt: skip
