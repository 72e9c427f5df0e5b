"""Text-to-image guided by ControlNets (Zhang et al. 2023, arXiv:2302.05543): a condition image (edges, a pose, a
depth map, ...) steers the U-Net through a ControlNet's residuals.

At each step the ControlNet reads x_t, the timestep, the prompt and the condition c, and returns one residual per skip
connection of the U-Net's encoder and one for its bottleneck, each through a zero convolution (Sec. 3.1, Eq. 2); the
U-Net adds them, times `controlnet_conditioning_scale`, to its own (Sec. 3.2). Several ControlNets sum their residuals
(diffusers' `MultiControlNetModel`). `control_guidance_start` / `_end` apply a ControlNet only within that fraction of
the steps. Guess mode (Sec. 4.3) runs the ControlNet on the conditional half of the guidance batch only, with its
residuals scaled from 0.1 at the shallowest to 1 at the bottleneck, and adds nothing to the unconditional half.

The rest is text-to-image (`ScratchPipelineBase`). Given the same components, scheduler and seed, the images equal
those of diffusers' `StableDiffusionControlNetPipeline`.
"""

from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, SchedulerMixin, UNet2DConditionModel
from diffusers.image_processor import PipelineImageInput
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from hf_scratch.images import batch_of, read_images
from hf_scratch.models.controlnet import ScratchControlNetModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import ScratchAutoencoderKL
from hf_scratch.pipelines.base import Generator, ScratchPipelineBase, ScratchPipelineOutput
from hf_scratch.pipelines.checks import StepCallback, check_real
from hf_scratch.pipelines.loaders import scales_lora

ControlNet = ScratchControlNetModel | ControlNetModel


def per_controlnet(name: str, value: Any, count: int) -> list:
    """`value` as a list of one entry per ControlNet: a single value repeated, or a list of `count` values."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"`{name}` has {len(value)} entries for {count} ControlNets; pass one value or one each.")
    return list(value)


class ScratchStableDiffusionControlNetPipeline(ScratchPipelineBase):
    """Stable Diffusion text-to-image with one ControlNet or several (a list, or diffusers' `MultiControlNetModel`):
    ours (`ScratchControlNetModel`) or diffusers' `ControlNetModel`, on our U-Net or diffusers'."""

    def __init__(
        self,
        vae: ScratchAutoencoderKL | AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: ScratchUNet2DConditionModel | UNet2DConditionModel,
        controlnet: ScratchControlNetModel
        | ControlNetModel
        | list[ControlNet]
        | tuple[ControlNet, ...]
        | MultiControlNetModel,
        scheduler: SchedulerMixin,
        image_encoder: PreTrainedModel | None = None,
        feature_extractor: BaseImageProcessor | None = None,
    ):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, image_encoder, feature_extractor)
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(list(controlnet))
        self.register_modules(controlnet=controlnet)

    @property
    def controlnets(self) -> list[ControlNet]:
        """The ControlNets, one or several."""
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

    def control_images(
        self, image: PipelineImageInput | list, height: int | None, width: int | None
    ) -> tuple[list[list[torch.Tensor]], int, int]:
        """Each ControlNet's condition images (`read_images`' tensors in [0, 1]) and the size they are resized to:
        `height` x `width`, by default the first image's size rounded down to a multiple of `size_multiple`."""
        count = len(self.controlnets)
        if count > 1 and not (isinstance(image, (list, tuple)) and len(image) == count):
            got = f"a list of {len(image)}" if isinstance(image, (list, tuple)) else type(image).__name__
            raise ValueError(
                f"`image` must be a list with one condition (an image or a list of images) per ControlNet, {count} "
                f"here, got {got}."
            )
        images = [read_images(item, "image") for item in (image if count > 1 else [image])]
        first_height, first_width = images[0][0].shape[-2:]
        if min(first_height, first_width) < self.size_multiple:
            raise ValueError(
                f"`image` is {first_height}x{first_width} pixels; it must be at least {self.size_multiple} pixels on "
                "each side."
            )
        height = first_height - first_height % self.size_multiple if height is None else height
        width = first_width - first_width % self.size_multiple if width is None else width
        return images, height, width

    def control_guidance(
        self, scale: float | list[float], start: float | list[float], end: float | list[float]
    ) -> tuple[list[float], list[float], list[float]]:
        """Per ControlNet: the conditioning scale and the window [start, end) of the steps it acts in, checked."""
        count = len(self.controlnets)
        scales = [check_real("controlnet_conditioning_scale", value) for value in per_controlnet(
            "controlnet_conditioning_scale", scale, count)]  # fmt: skip
        starts = per_controlnet("control_guidance_start", start, count)
        ends = per_controlnet("control_guidance_end", end, count)
        for start_value, end_value in zip(starts, ends):
            check_real("control_guidance_start", start_value, minimum=0.0)
            check_real("control_guidance_end", end_value, maximum=1.0)
            if start_value >= end_value:
                raise ValueError(
                    f"`control_guidance_start` ({start_value}) must be below `control_guidance_end` ({end_value})."
                )
        return scales, starts, ends

    @torch.no_grad()
    @scales_lora
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput | list = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
    ) -> ScratchPipelineOutput | tuple:
        """Generate images from text, guided by condition images.

        Args:
            image: the condition: an image, as for image-to-image (PIL, array or tensor; floats in [0, 1]), or a list
                with one per prompt; with several ControlNets, a list of one such condition per ControlNet.
            height, width: image size in pixels, a multiple of 8; default the first condition image's size (rounded
                down to a multiple of 8). Conditions are resized to it.
            controlnet_conditioning_scale: the factor on the ControlNet residuals, one for all or one per ControlNet.
            guess_mode: let the ControlNet recognise the condition without the prompt (Zhang et al. Sec. 4.3); on
                for ControlNets with `global_pool_conditions`.
            control_guidance_start, control_guidance_end: the fraction of the steps in which each ControlNet acts
                (step i of n acts when start <= i / n and (i + 1) / n <= end); one for all or one per ControlNet.
            The other arguments (`ip_adapter_image` and `ip_adapter_image_embeds` among them) are those of
            `ScratchStableDiffusionPipeline.__call__` (text-to-image).
        """
        batch_size = self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
            num_images_per_prompt, generator, output_type, callback_on_step_end_tensor_inputs, clip_skip,
            guidance_scale, eta, callback_on_step_end, return_dict, guidance_rescale,
        )  # fmt: skip
        if not isinstance(guess_mode, bool):
            raise TypeError(f"`guess_mode` must be True or False, got {guess_mode!r}.")
        scales, starts, ends = self.control_guidance(
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end
        )
        conditions, height, width = self.control_images(image, height, width)
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
        guess_mode = guess_mode or bool(self.controlnets[0].config.global_pool_conditions)
        do_classifier_free_guidance = guidance_scale > 1

        device = self._execution_device
        control_images = []
        for pixels in conditions:
            control = batch_of(pixels, height, width)
            if control.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"`image` gives {control.shape[0]} condition images to a ControlNet; pass one, or one per prompt "
                    f"({batch_size})."
                )
            control = control.repeat_interleave(num_images // control.shape[0], dim=0)
            control = control.to(device=device, dtype=self.controlnet.dtype)
            control_images.append(
                torch.cat([control] * 2) if do_classifier_free_guidance and not guess_mode else control
            )

        prompt_embeds = self.guidance_embeddings(
            prompt, device, num_images_per_prompt, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip,
        )  # fmt: skip
        image_embeds = self.ip_adapter_embeddings(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt, guidance_scale > 1
        )
        timesteps, num_inference_steps = self.retrieve_timesteps(num_inference_steps, device, timesteps, sigmas)
        # keep[i][k] = 1 while step i lies in ControlNet k's window [start, end) of the steps, else 0
        keep = [
            [
                1.0 - float(i / len(timesteps) < start or (i + 1) / len(timesteps) > end)
                for start, end in zip(starts, ends)
            ]
            for i in range(len(timesteps))
        ]
        multiple = isinstance(self.controlnet, MultiControlNetModel)

        def control_residuals(
            step_index: int, timestep: torch.Tensor, model_input: torch.Tensor, embeds: torch.Tensor
        ) -> dict[str, Any]:
            """The ControlNets' residuals for the U-Net's skip connections and bottleneck at this step."""
            if guess_mode and do_classifier_free_guidance:  # the conditional half of the guidance batch only
                model_input, embeds = model_input.chunk(2)[1], embeds.chunk(2)[1]
            step_scales = [scale * kept for scale, kept in zip(scales, keep[step_index])]
            down, mid = self.controlnet(
                model_input, timestep, encoder_hidden_states=embeds,
                controlnet_cond=control_images if multiple else control_images[0],
                conditioning_scale=step_scales if multiple else step_scales[0], guess_mode=guess_mode,
                return_dict=False,
            )  # fmt: skip
            if guess_mode and do_classifier_free_guidance:  # nothing added to the unconditional half
                down = [torch.cat([torch.zeros_like(residual), residual]) for residual in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        latents = self.prepare_latents(num_images, height, width, prompt_embeds.dtype, device, generator, latents)
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale,
            unet_extras=control_residuals, added_cond_kwargs=image_embeds,
        )  # fmt: skip
        return self.finish(latents, output_type, return_dict)
