"""Inpainting against diffusers' own `StableDiffusionInpaintPipeline`: 9-channel inpainting U-Nets and 4-channel
blending, strengths, generator lists, precomputed masked-image latents, and official-folder loading."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

from hf_scratch import ScratchStableDiffusionInpaintPipeline, ScratchUNet2DConditionModel
from hf_scratch.schedulers.ddim import ScratchDDIMScheduler
from hf_scratch.schedulers.dpm_solver import ScratchDPMSolverMultistepScheduler

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import UNET_CONFIG, tiny_components  # noqa: E402

TOLERANCE = 1e-4
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SCHEDULERS = {"ddim": (ScratchDDIMScheduler, DDIMScheduler), "dpm": (ScratchDPMSolverMultistepScheduler,
              DPMSolverMultistepScheduler)}  # fmt: skip
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def schedule(scheduler_class: type) -> object:
    no_clip = {"clip_sample": False} if "clip_sample" in scheduler_class().config else {}
    return scheduler_class(**SD_SCHEDULE, **no_clip)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def components(channels: int) -> tuple[dict, dict]:
    """(diffusers', ours) tiny components with the same weights; a U-Net of `channels` input channels."""
    reference, ours = tiny_components("diffusers"), tiny_components("scratch")
    if channels != UNET_CONFIG["in_channels"]:
        torch.manual_seed(1)
        reference["unet"] = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": channels}).eval()
        ours["unet"] = ScratchUNet2DConditionModel(**{**UNET_CONFIG, "in_channels": channels}).eval()
        ours["unet"].load_state_dict(reference["unet"].state_dict())
    return reference, ours


def pipelines(channels: int, scheduler: str = "ddim"):
    ours_scheduler, reference_scheduler = SCHEDULERS[scheduler]
    reference_components, our_components = components(channels)
    ours = ScratchStableDiffusionInpaintPipeline(**our_components, scheduler=schedule(ours_scheduler))
    reference = StableDiffusionInpaintPipeline(
        **reference_components, scheduler=schedule(reference_scheduler), **NO_SAFETY_CHECKER
    )
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    return ours, reference


def image_and_mask(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(batch, 3, 32, 32, generator=seeded(1))
    mask = torch.zeros(batch, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1.0  # repaint a rectangle
    return image, mask


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_matches_diffusers(channels, strength, scheduler):
    ours, reference = pipelines(channels, scheduler)
    image, mask = image_and_mask()
    kwargs = dict(prompt="a red apple", image=image, mask_image=mask, strength=strength, num_inference_steps=5,
                  guidance_scale=6.0, negative_prompt="blurry", output_type="np")  # fmt: skip
    got = ours(**kwargs, generator=seeded()).images
    expected = reference(**kwargs, generator=seeded()).images
    assert got.shape == (1, 32, 32, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_blending_keeps_the_unmasked_latents():
    """With a 4-channel U-Net, the last step puts back the image's own latents outside the mask."""
    ours, _ = pipelines(4)
    image, mask = image_and_mask()
    latents = ours("a cat", image=image, mask_image=mask, num_inference_steps=3, output_type="latent",
                   generator=seeded()).images  # fmt: skip
    image_latents = ours.encode_image(image * 2 - 1, seeded())
    keep = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]) < 0.5
    assert keep.any() and (~keep).any()
    # The posterior sample is drawn first from the same seed, so the kept part equals it exactly.
    assert torch.equal(
        latents.masked_select(keep.expand_as(latents)), image_latents.masked_select(keep.expand_as(latents))
    )


@pytest.mark.parametrize("channels", [9, 4])
def test_generator_list_and_images_per_prompt_match_diffusers(channels):
    ours, reference = pipelines(channels)
    image, mask = image_and_mask()
    kwargs = dict(prompt="a dog", image=image, mask_image=mask, num_images_per_prompt=2, strength=0.8,
                  num_inference_steps=4, output_type="np")  # fmt: skip
    got = ours(**kwargs, generator=[seeded(0), seeded(1)]).images
    expected = reference(**kwargs, generator=[seeded(0), seeded(1)]).images
    assert got.shape == (2, 32, 32, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_masked_image_latents_match_diffusers():
    ours, reference = pipelines(9)
    image, mask = image_and_mask()
    masked_latents = ours.encode_image(((image * 2 - 1) * (mask < 0.5)), seeded(5))
    kwargs = dict(prompt="a tree", image=image, mask_image=mask, masked_image_latents=masked_latents,
                  num_inference_steps=4, output_type="np")  # fmt: skip
    got = ours(**kwargs, generator=seeded()).images
    assert np.abs(got - reference(**kwargs, generator=seeded()).images).max() <= TOLERANCE
    # and they are used: other latents give another image
    other = ours(**{**kwargs, "masked_image_latents": torch.zeros_like(masked_latents)}, generator=seeded()).images
    assert np.abs(got - other).max() > TOLERANCE


def test_diffusers_inpainting_runs_our_components_and_official_folders_load_into_ours(tmp_path):
    """An official-layout inpainting folder (saved by diffusers) loads into our classes (`from_official`) and gives
    the same images as diffusers' pipeline on it; diffusers' pipeline also runs our components."""
    _, reference = pipelines(9)
    reference.save_pretrained(tmp_path)
    ours = ScratchStableDiffusionInpaintPipeline.from_official(tmp_path)
    ours.set_progress_bar_config(disable=True)
    assert isinstance(ours.unet, ScratchUNet2DConditionModel) and ours.unet.config.in_channels == 9
    image, mask = image_and_mask()
    kwargs = dict(prompt="a house", image=image, mask_image=mask, num_inference_steps=3, output_type="np")
    expected = reference(**kwargs, generator=seeded()).images
    assert np.abs(ours(**kwargs, generator=seeded()).images - expected).max() <= TOLERANCE
    theirs_on_ours = StableDiffusionInpaintPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        scheduler=DDIMScheduler.from_config(ours.scheduler.config), **NO_SAFETY_CHECKER,
    )  # fmt: skip
    theirs_on_ours.set_progress_bar_config(disable=True)
    assert np.abs(theirs_on_ours(**kwargs, generator=seeded()).images - expected).max() <= TOLERANCE


def test_bad_inputs_name_the_argument():
    ours, _ = pipelines(9)
    image, mask = image_and_mask()
    with pytest.raises(ValueError, match="`mask_image` is required"):
        ours("a cat", image=image, num_inference_steps=2)
    with pytest.raises(ValueError, match="`mask_image` must be"):
        ours("a cat", image=image, mask_image="mask.png", num_inference_steps=2)
    with pytest.raises(ValueError, match="`strength`"):
        ours("a cat", image=image, mask_image=mask, strength=0.0, num_inference_steps=2)
    _, five = components(5)
    odd = ScratchStableDiffusionInpaintPipeline(**five, scheduler=schedule(ScratchDDIMScheduler))
    with pytest.raises(ValueError, match="takes 5 input channels"):
        odd("a cat", image=image, mask_image=mask, num_inference_steps=2)
