"""Pipelines that share weights: `from_pipe` between ours and diffusers', diffusers' AutoPipelines, and diffusers'
pipelines built from our `components` without changing our images."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from hf_scratch import (
    ScratchStableDiffusionImg2ImgPipeline,
    ScratchStableDiffusionInpaintPipeline,
    ScratchStableDiffusionPipeline,
)
from hf_scratch.schedulers.ddim import ScratchDDIMScheduler

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import tiny_components  # noqa: E402

NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
OURS = (ScratchStableDiffusionPipeline, ScratchStableDiffusionImg2ImgPipeline, ScratchStableDiffusionInpaintPipeline)
MODELS = ("unet", "vae", "text_encoder", "tokenizer")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def text_to_image() -> ScratchStableDiffusionPipeline:
    return quiet(ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=ScratchDDIMScheduler()))


@pytest.mark.parametrize("source", OURS)
@pytest.mark.parametrize("target", OURS)
def test_from_pipe_between_our_pipelines_shares_the_models(source, target, text_to_image):
    pipe = source.from_pipe(text_to_image)
    switched = target.from_pipe(pipe)
    assert type(switched) is target
    for name in MODELS:
        assert getattr(switched, name) is getattr(text_to_image, name), name


def test_from_pipe_from_a_diffusers_pipeline_shares_its_models():
    theirs = StableDiffusionPipeline(
        **tiny_components("diffusers"), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), **NO_SAFETY_CHECKER
    )
    for target in OURS:
        ours = target.from_pipe(theirs)
        assert all(getattr(ours, name) is getattr(theirs, name) for name in MODELS)


@pytest.mark.parametrize(
    "auto, expected",
    [(AutoPipelineForText2Image, ScratchStableDiffusionPipeline),
     (AutoPipelineForImage2Image, ScratchStableDiffusionImg2ImgPipeline),
     (AutoPipelineForInpainting, ScratchStableDiffusionInpaintPipeline)],
)  # fmt: skip
def test_diffusers_auto_pipelines_switch_between_ours(auto, expected, text_to_image):
    pipe = auto.from_pipe(text_to_image)
    assert type(pipe) is expected
    assert all(getattr(pipe, name) is getattr(text_to_image, name) for name in MODELS)


@pytest.mark.parametrize(
    "auto, expected",
    [(AutoPipelineForText2Image, ScratchStableDiffusionPipeline),
     (AutoPipelineForImage2Image, ScratchStableDiffusionImg2ImgPipeline),
     (AutoPipelineForInpainting, ScratchStableDiffusionInpaintPipeline)],
)  # fmt: skip
@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_diffusers_auto_pipelines_load_our_saved_folder(auto, expected, trust_remote_code, text_to_image, tmp_path):
    """model_index.json names the class `["pipeline", "ScratchStableDiffusionPipeline"]` (for `DiffusionPipeline`'s
    remote code); the AutoPipelines read it once hf_scratch's pipelines are imported."""
    text_to_image.save_pretrained(tmp_path)
    pipe = quiet(auto.from_pretrained(tmp_path, trust_remote_code=trust_remote_code))
    assert type(pipe) is expected
    if expected is ScratchStableDiffusionPipeline:
        call = dict(prompt="a cat", num_inference_steps=2, output_type="np")
        assert np.array_equal(pipe(**call, generator=seeded()).images, text_to_image(**call, generator=seeded()).images)


def test_from_pipe_images_equal_those_of_a_fresh_pipeline(text_to_image):
    img2img = quiet(ScratchStableDiffusionImg2ImgPipeline.from_pipe(text_to_image))
    fresh = quiet(ScratchStableDiffusionImg2ImgPipeline(**tiny_components("scratch"), scheduler=ScratchDDIMScheduler()))
    kwargs = dict(prompt="a cat", image=torch.rand(1, 3, 32, 32, generator=seeded(1)), num_inference_steps=3,
                  output_type="np")  # fmt: skip
    assert np.array_equal(img2img(**kwargs, generator=seeded()).images, fresh(**kwargs, generator=seeded()).images)


def test_diffusers_pipelines_built_from_our_components_leave_our_images_alone():
    """diffusers' constructor sets its scheduler's `steps_offset` to 1; ours, at the default 0, must not see it."""
    ours = quiet(ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=ScratchDDIMScheduler()))
    assert ours.scheduler.config.steps_offset == 0
    kwargs = dict(prompt="a red apple", num_inference_steps=3, output_type="np")
    before = ours(**kwargs, generator=seeded()).images
    theirs = StableDiffusionPipeline(**ours.components, **NO_SAFETY_CHECKER)
    StableDiffusionImg2ImgPipeline(**ours.components, **NO_SAFETY_CHECKER)
    assert theirs.scheduler.config.steps_offset == 1 and ours.scheduler.config.steps_offset == 0
    assert theirs.unet is ours.unet and theirs.vae is ours.vae and theirs.text_encoder is ours.text_encoder
    assert np.array_equal(ours(**kwargs, generator=seeded()).images, before)
    # The offset does change images, so the equality above is a real check.
    offset = quiet(ScratchStableDiffusionPipeline(**{**ours.components, "scheduler": theirs.scheduler}))
    assert np.abs(offset(**kwargs, generator=seeded()).images - before).max() > 1e-4
