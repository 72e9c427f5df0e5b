"""Inpainting: repaint the masked part of an image guided by text, the rest kept (Rombach et al. 2022, Sec. 4.5).

Two kinds of U-Net are supported, as in diffusers' `StableDiffusionInpaintPipeline`:

- **9 input channels** (the SD 1.5 inpainting model): the U-Net reads [x_t; m; z_masked] stacked on the channel axis,
  with m the mask at latent size (1 = repaint) and z_masked the scaled VAE latents of the image with the masked part
  blacked out, x ⊙ (m < ½).
- **4 input channels** (any text-to-image U-Net, the "legacy" way, as in RePaint, Lugmayr et al. 2022,
  arXiv:2201.09865, Eq. 8): after every step the unmasked part of the latents is replaced by the image's own latents
  noised to the next timestep, x_{t−1} ← (1 − m) ⊙ q(x_{t−1} | z_0) + m ⊙ x_{t−1}.

`strength` < 1 starts from the image noised to that point of the schedule (SDEdit, as image-to-image); 1 starts from
pure noise. Given the same components, scheduler and seed, the images equal diffusers'.
"""

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.image_processor import PipelineImageInput
from diffusers.utils.torch_utils import randn_tensor

from hf_scratch.images import batch_of, read_images
from hf_scratch.pipelines.base import Generator, ScratchPipelineOutput
from hf_scratch.pipelines.checks import StepCallback, check_tensor
from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline
from hf_scratch.pipelines.loaders import scales_lora

# The inpainting U-Net's input: latents, the mask (one channel) and the masked image's latents.
MASK_CHANNELS = 1


class ScratchStableDiffusionInpaintPipeline(ScratchStableDiffusionImg2ImgPipeline):
    """Stable Diffusion inpainting on a 9-channel inpainting U-Net or, by latent blending, any 4-channel one."""

    # ------------------------------------------------------------------ checks

    def check_unet_channels(self, masked_image_channels: int) -> bool:
        """True for an inpainting U-Net (latents + mask + masked-image latents), False for a plain one; raise
        `ValueError` for any other number of input channels."""
        latent_channels = self.vae.config.latent_channels
        in_channels = self.unet.config.in_channels
        if in_channels == latent_channels:
            return False
        if in_channels == latent_channels + MASK_CHANNELS + masked_image_channels:
            return True
        raise ValueError(
            f"the U-Net takes {in_channels} input channels; inpainting needs {latent_channels} (a text-to-image U-Net, "
            f"blended) or {latent_channels} latents + {MASK_CHANNELS} mask + {masked_image_channels} masked-image "
            "latent channels (an inpainting U-Net such as SD 1.5 inpainting's)."
        )

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    @scales_lora
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        masked_image_latents: torch.Tensor | None = None,
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
        """Repaint the white part of `mask_image` in `image`, guided by text.

        Args:
            image: the image to repaint, as for image-to-image; it is resized to `height` x `width`.
            mask_image: white (≥ ½) where the image is repainted: a PIL image, an array or tensor as for `image` but
                in [0, 1] (colour is read as its luma), or a list of them (one, or one per prompt).
            masked_image_latents: the scaled VAE latents of the masked image, to skip encoding it (9-channel U-Nets).
            height, width: output size in pixels, a multiple of 8; default `unet.config.sample_size * vae_scale_factor`.
            strength: how far into the noise schedule to start, in (0, 1]; 1 (the default) starts from pure noise.
            latents: unit-variance starting noise `(N, C, height / f, width / f)`, used as the noise at strength 1.
            The other arguments (`cross_attention_kwargs={"scale": s}`, the LoRA scale, among them) are those of
            `ScratchStableDiffusionPipeline.__call__`.
        """
        default_height, default_width = self._default_size()
        height = default_height if height is None else height
        width = default_width if width is None else width
        batch_size = self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, num_inference_steps,
            num_images_per_prompt, generator, output_type, callback_on_step_end_tensor_inputs, clip_skip,
            guidance_scale, eta, callback_on_step_end, return_dict, guidance_rescale,
        )  # fmt: skip
        self.check_size(height, width)
        height, width = int(height), int(width)
        num_inference_steps, num_images_per_prompt = int(num_inference_steps), int(num_images_per_prompt)
        pixels = read_images(image, "image")
        if mask_image is None:
            raise ValueError("`mask_image` is required: white (1) where the image is repainted, black (0) elsewhere.")
        masks = read_images(mask_image, "mask_image", grey=True)
        num_steps = self.check_timesteps(num_inference_steps, timesteps, sigmas)
        self.check_image(pixels, strength, num_steps, self.schedule_source(timesteps, sigmas))
        num_images = batch_size * num_images_per_prompt
        self.check_memory(num_images, height, width)
        latent_shape = self.latent_shape(num_images, height, width, self.vae.config.latent_channels)
        self.check_latents(latents, latent_shape, f"{num_images} images at {height}x{width}")
        if masked_image_latents is not None:
            check_tensor("masked_image_latents", masked_image_latents, ndim=4)
        masked_channels = (
            self.vae.config.latent_channels if masked_image_latents is None else masked_image_latents.shape[1]
        )
        inpainting_unet = self.check_unet_channels(masked_channels)

        device = self._execution_device
        prompt_embeds = self.guidance_embeddings(
            prompt, device, num_images_per_prompt, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip,
        )  # fmt: skip
        image_embeds = self.ip_adapter_embeddings(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt, guidance_scale > 1
        )
        dtype = prompt_embeds.dtype

        _, num_inference_steps = self.retrieve_timesteps(num_inference_steps, device, timesteps, sigmas)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        init_image = 2 * batch_of(pixels, height, width) - 1  # [0, 1] -> the VAE's [-1, 1]
        if init_image.shape[0] not in (1, num_images) and num_images % init_image.shape[0]:
            raise ValueError(f"`image` gives {init_image.shape[0]} images; pass one or one per prompt ({batch_size}).")

        # x_T: pure noise at strength 1, else the image's latents noised to the first timestep. The plain U-Net
        # also needs the image's latents z_0 for blending. (The order of draws from `generator` is diffusers'.)
        image_latents = None
        if not inpainting_unet or (latents is None and strength < 1):
            image_latents = self.encode_image(init_image.to(device, dtype), generator)
            image_latents = image_latents.repeat(num_images // image_latents.shape[0], 1, 1, 1)
        noise = (
            randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype) if latents is None else latents
        )
        noise = noise.to(device=device, dtype=dtype)
        if latents is None and strength < 1:
            latents = self.noised(image_latents, noise, timesteps[:1].repeat(num_images))
        else:
            latents = noise * self.init_noise_sigma

        mask = (batch_of(masks, height, width) >= 0.5).to(torch.float32)  # binarised, 1 = repaint
        masked_image = init_image * (mask < 0.5) if masked_image_latents is None else masked_image_latents
        mask = F.interpolate(mask, size=latent_shape[2:]).to(device, dtype)
        masked_image = masked_image.to(device, dtype)
        if masked_image_latents is None:
            masked_image_latents = self.encode_image(masked_image, generator)
        else:
            masked_image_latents = masked_image
        for name, tensor in (("mask_image", mask), ("image", masked_image_latents)):
            if num_images % tensor.shape[0]:
                raise ValueError(
                    f"`{name}` gives {tensor.shape[0]} images for {num_images}; pass one or one per image."
                )
        mask = mask.repeat(num_images // mask.shape[0], 1, 1, 1)
        masked_image_latents = masked_image_latents.repeat(num_images // masked_image_latents.shape[0], 1, 1, 1)

        conditioning, blend = None, None
        if inpainting_unet:
            conditioning = torch.cat([mask, masked_image_latents], dim=1)
            if guidance_scale > 1:
                conditioning = torch.cat([conditioning] * 2)
        else:

            def blend(step_index: int, latents: torch.Tensor) -> torch.Tensor:
                """Keep the unmasked part: z_0 noised to the next timestep (z_0 itself after the last step)."""
                known = image_latents
                if step_index < len(timesteps) - 1:
                    known = self.noised(image_latents, noise, timesteps[step_index + 1 : step_index + 2])
                return (1 - mask) * known + mask * latents

        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale, conditioning, blend,
            added_cond_kwargs=image_embeds,
        )  # fmt: skip
        return self.finish(latents, output_type, return_dict)
