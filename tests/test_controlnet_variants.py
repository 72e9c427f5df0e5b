"""`ScratchStableDiffusionControlNetImg2ImgPipeline` and `ScratchStableDiffusionControlNetInpaintPipeline` against
diffusers' `StableDiffusionControlNetImg2ImgPipeline` and `StableDiffusionControlNetInpaintPipeline`.

The components are `test_controlnet_pipeline`'s (SD 1.5-shaped at small widths, random weights, two ControlNets copied
from the U-Net with random zero convolutions). Each case runs diffusers' pipeline on diffusers' models and ours on the
same models and on our twins of them. The inpainting U-Net is a 4-channel one (diffusers' latent blending). Tolerance:
max abs difference <= 1e-4 on `output_type="np"` images in [0, 1].
"""

import numpy as np
import pytest
import torch
from _tiny import sd_ddim
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
)
from test_controlnet_pipeline import NO_SAFETY_CHECKER, SIZE, TOLERANCE, condition, models  # noqa: F401 (models: a fixture)

from hf_scratch import (
    ScratchStableDiffusionControlNetImg2ImgPipeline,
    ScratchStableDiffusionControlNetInpaintPipeline,
    ScratchStableDiffusionControlNetPipeline,
    ScratchStableDiffusionImg2ImgPipeline,
)
from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (ours, diffusers') pipeline classes, and the inputs of each beyond the prompt and the condition
KINDS = {
    "image_to_image": (ScratchStableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetImg2ImgPipeline),
    "inpaint": (ScratchStableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetInpaintPipeline),
}


def kind_inputs(kind: str) -> dict:
    image = condition(7)
    if kind == "image_to_image":
        return {"image": image, "strength": 0.75}
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 8:24, 4:20] = 1.0  # repaint a rectangle
    return {"image": image, "mask_image": mask, "strength": 0.75}


def generate(pipeline_class, shared: dict, unet, controlnet, scheduler=None, **call) -> np.ndarray:
    extra = {} if pipeline_class.__module__.startswith("hf_scratch") else NO_SAFETY_CHECKER
    pipe = pipeline_class(**shared, **extra, unet=unet, controlnet=controlnet, scheduler=scheduler or sd_ddim())
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a cat", "num_inference_steps": 4, "output_type": "np", **call}
    return pipe(**call, generator=torch.Generator().manual_seed(0)).images


def assert_ours_give_diffusers_images(components, kind: str, count: int, **call) -> None:
    shared, theirs, ours = components
    ours_class, diffusers_class = KINDS[kind]
    call = {**kind_inputs(kind), **call}
    if "control_image" not in call:
        call["control_image"] = condition(0) if count == 1 else [condition(seed) for seed in range(count)]

    def nets(source: dict):
        return source["controlnets"][0] if count == 1 else source["controlnets"][:count]

    expected = generate(diffusers_class, shared, theirs["unet"], nets(theirs), **call)
    for models_used in (theirs, ours):
        actual = generate(ours_class, shared, models_used["unet"], nets(models_used), **call)
        assert actual.shape == expected.shape == (1, SIZE, SIZE, 3)
        assert np.abs(actual - expected).max() <= TOLERANCE


CASES = {
    "defaults": {},
    "guess-mode": {"guess_mode": True},
    "guidance-window": {"control_guidance_start": 0.3, "control_guidance_end": 0.7},
    "strength-1": {"strength": 1.0, "controlnet_conditioning_scale": 1.2},
}


@pytest.mark.parametrize("call", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_one_controlnet_gives_diffusers_images(models, kind, call):  # noqa: F811 (models: the fixture)
    assert_ours_give_diffusers_images(models, kind, 1, **call)


TWO_CASES = {
    "scales": {"controlnet_conditioning_scale": [0.6, 1.2]},
    "guess-mode": {"guess_mode": True, "controlnet_conditioning_scale": 0.7},
    "guidance-windows": {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]},
}


@pytest.mark.parametrize("call", TWO_CASES.values(), ids=TWO_CASES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_two_controlnets_give_diffusers_images(models, kind, call):  # noqa: F811 (models: the fixture)
    assert_ours_give_diffusers_images(models, kind, 2, **call)


def test_inpainting_with_a_flow_scheduler_gives_diffusers_images(models):  # noqa: F811 (models: the fixture)
    """diffusers' `FlowMatchEulerDiscreteScheduler` has no `init_noise_sigma` or `add_noise`, which diffusers'
    pipeline reads; it runs our flow Euler instead, which takes the same steps (as in `test_pipeline_families`)."""
    shared, theirs, ours = models
    call = {**kind_inputs("inpaint"), "control_image": condition(0)}
    config = ScratchFlowMatchEulerScheduler().config
    expected = generate(StableDiffusionControlNetInpaintPipeline, shared, theirs["unet"], theirs["controlnets"][0],
                        ScratchFlowMatchEulerScheduler.from_config(config), **call)  # fmt: skip
    actual = generate(ScratchStableDiffusionControlNetInpaintPipeline, shared, ours["unet"], ours["controlnets"][0],
                      FlowMatchEulerDiscreteScheduler.from_config(config), **call)  # fmt: skip
    assert np.abs(actual - expected).max() <= TOLERANCE
    assert np.abs(actual - call["image"].permute(0, 2, 3, 1).numpy()).max() > 0.01


def test_auto_pipelines_switch_between_the_controlnet_pipelines(models):  # noqa: F811 (models: the fixture)
    shared, _, ours = models
    controlled = ScratchStableDiffusionControlNetPipeline(**shared, unet=ours["unet"], controlnet=ours["controlnets"],
                                                          scheduler=sd_ddim())  # fmt: skip
    for auto, expected in ((AutoPipelineForImage2Image, ScratchStableDiffusionControlNetImg2ImgPipeline),
                           (AutoPipelineForInpainting, ScratchStableDiffusionControlNetInpaintPipeline)):  # fmt: skip
        switched = auto.from_pipe(controlled)
        assert type(switched) is expected
        assert switched.unet is controlled.unet and switched.controlnet is controlled.controlnet
        assert type(AutoPipelineForText2Image.from_pipe(switched)) is ScratchStableDiffusionControlNetPipeline
    plain = AutoPipelineForImage2Image.from_pipe(controlled, controlnet=None)
    assert type(plain) is ScratchStableDiffusionImg2ImgPipeline
    controlled_again = AutoPipelineForImage2Image.from_pipe(plain, controlnet=ours["controlnets"][0])
    assert type(controlled_again) is ScratchStableDiffusionControlNetImg2ImgPipeline


@pytest.mark.parametrize(
    "call, message",
    [
        ({"control_image": condition(0)}, "one condition"),
        ({"control_image": [condition(0, batch=3)] * 2}, "`control_image` gives 3 condition images"),
        ({"control_image": [condition(0)] * 2, "controlnet_conditioning_scale": [1.0] * 3}, "3 entries"),
        ({"control_image": [condition(0)] * 2, "height": 20}, "height"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_input_errors_name_the_argument(models, kind, call, message):  # noqa: F811 (models: the fixture)
    shared, _, ours = models
    pipe = KINDS[kind][0](**shared, unet=ours["unet"], controlnet=ours["controlnets"], scheduler=sd_ddim())
    with pytest.raises(ValueError, match=message):
        pipe("a cat", num_inference_steps=2, **kind_inputs(kind), **call)
