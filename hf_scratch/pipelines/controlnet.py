"""ControlNet guidance (Zhang et al. 2023, arXiv:2302.05543): a condition image (edges, a pose, a depth map, ...)
steers the U-Net through a ControlNet's residuals; and the text-to-image pipeline with it.

At each step the ControlNet reads x_t, the timestep, the prompt and the condition c, and returns one residual per skip
connection of the U-Net's encoder and one for its bottleneck, each through a zero convolution (Sec. 3.1, Eq. 2); the
U-Net adds them, times `controlnet_conditioning_scale`, to its own (Sec. 3.2). Several ControlNets sum their residuals
(diffusers' `MultiControlNetModel`). `control_guidance_start` / `_end` apply a ControlNet only within that fraction of
the steps. Guess mode (Sec. 4.3) runs the ControlNet on the conditional half of the guidance batch only, with its
residuals scaled from 0.1 at the shallowest to 1 at the bottleneck, and adds nothing to the unconditional half.

`ControlNetMixin` holds all of that once: the ControlNets, the checked control arguments (`check_control`) and the
residuals of each step (`control_residuals`). `ScratchStableDiffusionControlNetPipeline` puts it on text-to-image
(`ScratchPipelineBase`); `controlnet_variants.py` puts it on image-to-image and inpainting. Given the same components,
scheduler and seed, the images equal those of diffusers' `StableDiffusionControlNetPipeline`.
"""

from dataclasses import dataclass
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
from hf_scratch.pipelines.base import Generator, ScratchPipelineBase, ScratchPipelineOutput, UNetExtras
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


@dataclass
class ControlArguments:
    """One call's checked ControlNet arguments (`ControlNetMixin.check_control`): per ControlNet its condition images
    (`read_images`' tensors in [0, 1]), conditioning scale and window [start, end) of the steps; guess mode; and the
    name of the argument that gave the conditions, for error messages."""

    conditions: list[list[torch.Tensor]]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    name: str


class ControlNetMixin:
    """What a ControlNet pipeline adds to the pipeline it extends (`ScratchPipelineBase` or a subclass): the
    `controlnet` component, one ControlNet or several (a list, or diffusers' `MultiControlNetModel`), ours
    (`ScratchControlNetModel`) or diffusers' `ControlNetModel`, on our U-Net or diffusers'; and the U-Net's extra
    arguments at each step, for `denoise`'s `unet_extras`."""

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

    def default_size(self, pixels: list[torch.Tensor], height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) as given, each by default that of the first image (`read_images`' tensors), rounded down
        to a multiple of `size_multiple` (as diffusers' ControlNet pipelines size their output); `check_size`d."""
        image_height, image_width = pixels[0].shape[-2:]
        height = image_height - image_height % self.size_multiple if height is None else height
        width = image_width - image_width % self.size_multiple if width is None else width
        self.check_size(height, width)
        return int(height), int(width)

    def check_control(
        self,
        image: PipelineImageInput | list,
        scale: float | list[float],
        start: float | list[float],
        end: float | list[float],
        guess_mode: bool,
        name: str = "image",
    ) -> ControlArguments:
        """Read the condition images (argument `name`: one condition per ControlNet) and check the scales, the windows
        [start, end) and guess mode, which ControlNets with `global_pool_conditions` turn on."""
        if not isinstance(guess_mode, bool):
            raise TypeError(f"`guess_mode` must be True or False, got {guess_mode!r}.")
        count = len(self.controlnets)
        if count > 1 and not (isinstance(image, (list, tuple)) and len(image) == count):
            got = f"a list of {len(image)}" if isinstance(image, (list, tuple)) else type(image).__name__
            raise ValueError(
                f"`{name}` must be a list with one condition (an image or a list of images) per ControlNet, {count} "
                f"here, got {got}."
            )
        conditions = [read_images(item, name) for item in (image if count > 1 else [image])]
        height, width = conditions[0][0].shape[-2:]
        if min(height, width) < self.size_multiple:
            raise ValueError(
                f"`{name}` is {height}x{width} pixels; it must be at least {self.size_multiple} pixels on each side."
            )
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
        guess_mode = guess_mode or bool(self.controlnets[0].config.global_pool_conditions)
        return ControlArguments(conditions, scales, starts, ends, guess_mode, name)

    def control_residuals(
        self,
        control: ControlArguments,
        height: int,
        width: int,
        batch_size: int,
        num_images: int,
        num_steps: int,
        guided: bool,
    ) -> UNetExtras:
        """`denoise`'s `unet_extras` for `num_steps` steps of `num_images` images of `height` x `width` pixels from
        `batch_size` prompts: at each step, the ControlNets' residuals for the U-Net's skip connections and bottleneck.
        `guided`: the U-Net input is the guidance batch [x_t; x_t] with [uncond; cond] text."""
        device = self._execution_device
        control_images = []
        for pixels in control.conditions:
            images = batch_of(pixels, height, width)
            if images.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"`{control.name}` gives {images.shape[0]} condition images to a ControlNet; pass one, or one per "
                    f"prompt ({batch_size})."
                )
            images = images.repeat_interleave(num_images // images.shape[0], dim=0)
            images = images.to(device=device, dtype=self.controlnet.dtype)
            control_images.append(torch.cat([images] * 2) if guided and not control.guess_mode else images)
        # keep[i][k] = 1 while step i lies in ControlNet k's window [start, end) of the steps, else 0
        keep = [
            [1.0 - float(i / num_steps < start or (i + 1) / num_steps > end) for start, end in zip(
                control.starts, control.ends)]
            for i in range(num_steps)
        ]  # fmt: skip
        multiple = isinstance(self.controlnet, MultiControlNetModel)
        conditional_only = control.guess_mode and guided

        def residuals(
            step_index: int, timestep: torch.Tensor, model_input: torch.Tensor, embeds: torch.Tensor
        ) -> dict[str, Any]:
            """The ControlNets' residuals for the U-Net's skip connections and bottleneck at this step (Eq. 2)."""
            if conditional_only:  # guess mode: the conditional half of the guidance batch only
                model_input, embeds = model_input.chunk(2)[1], embeds.chunk(2)[1]
            step_scales = [scale * kept for scale, kept in zip(control.scales, keep[step_index])]
            down, mid = self.controlnet(
                model_input, timestep, encoder_hidden_states=embeds,
                controlnet_cond=control_images if multiple else control_images[0],
                conditioning_scale=step_scales if multiple else step_scales[0], guess_mode=control.guess_mode,
                return_dict=False,
            )  # fmt: skip
            if conditional_only:  # nothing added to the unconditional half
                down = [torch.cat([torch.zeros_like(residual), residual]) for residual in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return residuals


class ScratchStableDiffusionControlNetPipeline(ControlNetMixin, ScratchPipelineBase):
    """Stable Diffusion text-to-image guided by one ControlNet or several (`ControlNetMixin`)."""

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
        control = self.check_control(
            image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode
        )
        height, width = self.default_size(control.conditions[0], height, width)
        num_inference_steps, num_images_per_prompt = int(num_inference_steps), int(num_images_per_prompt)
        self.check_timesteps(num_inference_steps, timesteps, sigmas)
        num_images = batch_size * num_images_per_prompt
        self.check_memory(num_images, height, width)
        self.check_latents(
            latents, self.latent_shape(num_images, height, width),
            f"{batch_size} prompts x {num_images_per_prompt} images at {height}x{width}",
        )  # fmt: skip

        device = self._execution_device
        timesteps, num_inference_steps = self.retrieve_timesteps(num_inference_steps, device, timesteps, sigmas)
        control_residuals = self.control_residuals(
            control, height, width, batch_size, num_images, len(timesteps), guidance_scale > 1
        )
        prompt_embeds = self.guidance_embeddings(
            prompt, device, num_images_per_prompt, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip,
        )  # fmt: skip
        image_embeds = self.ip_adapter_embeddings(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt, guidance_scale > 1
        )
        latents = self.prepare_latents(num_images, height, width, prompt_embeds.dtype, device, generator, latents)
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale,
            unet_extras=control_residuals, added_cond_kwargs=image_embeds,
        )  # fmt: skip
        return self.finish(latents, output_type, return_dict)
