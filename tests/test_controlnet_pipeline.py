"""`ScratchStableDiffusionControlNetPipeline` against diffusers' `StableDiffusionControlNetPipeline`.

Components are SD 1.5-shaped at small widths with random weights (`TINY_UNET_CONFIG`), the ControlNets copied from the
U-Net by diffusers' `ControlNetModel.from_unet`, their zero convolutions given random values (or every residual would
be zero and prove nothing). Each case runs diffusers' pipeline on diffusers' models and ours on the same models, and on
our twins of them (`ScratchUNet2DConditionModel`, `ScratchControlNetModel`, same weights). Tolerance: max abs
difference <= 1e-4 on `output_type="np"` images in [0, 1].
"""

import numpy as np
import pytest
import torch
from _reference import TINY_UNET_CONFIG, TINY_VAE_CONFIG, build_reference_unet, build_reference_vae, scratch_twin
from _tiny import TEXT_CONFIG, sd_ddim, tiny_tokenizer
from diffusers import (
    AutoPipelineForText2Image,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel

from hf_scratch.models.controlnet import ScratchControlNetModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.pipelines.controlnet import ScratchStableDiffusionControlNetPipeline
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4
SIZE = 32  # pixels; 16x16 latents
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def randomize_zero_parameters(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """diffusers' U-Net and two ControlNets, and our twins of them; the shared VAE, text encoder and tokenizer."""
    unet = build_reference_unet({**TINY_UNET_CONFIG, "cross_attention_dim": TEXT_CONFIG["hidden_size"]}).eval()
    controlnets = [
        randomize_zero_parameters(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed)
        for seed in (1, 2)
    ]
    torch.manual_seed(0)
    shared = {
        "vae": build_reference_vae(TINY_VAE_CONFIG).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval(),
        "tokenizer": tiny_tokenizer(),
    }
    diffusers_models = {"unet": unet, "controlnets": controlnets}
    ours = {
        "unet": scratch_twin(ScratchUNet2DConditionModel, unet),
        "controlnets": [scratch_twin(ScratchControlNetModel, controlnet) for controlnet in controlnets],
    }
    return shared, diffusers_models, ours


def condition(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def generate(pipeline_class, shared: dict, unet, controlnet, scheduler=None, **call) -> np.ndarray:
    extra = NO_SAFETY_CHECKER if pipeline_class is StableDiffusionControlNetPipeline else {}
    pipe = pipeline_class(**shared, **extra, unet=unet, controlnet=controlnet, scheduler=scheduler or sd_ddim())
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a cat", "num_inference_steps": 4, "output_type": "np", **call}
    return pipe(**call, generator=torch.Generator().manual_seed(0)).images


def assert_ours_give_diffusers_images(models, count: int, scheduler_class=None, **call) -> None:
    shared, theirs, ours = models

    def nets(source: dict):
        return source["controlnets"][0] if count == 1 else source["controlnets"][:count]

    def scheduler():
        return None if scheduler_class is None else scheduler_class.from_config(sd_ddim().config)

    expected = generate(StableDiffusionControlNetPipeline, shared, theirs["unet"], nets(theirs), scheduler(), **call)
    for models_used in (theirs, ours):
        actual = generate(
            ScratchStableDiffusionControlNetPipeline,
            shared,
            models_used["unet"],
            nets(models_used),
            scheduler(),
            **call,
        )
        assert np.abs(actual - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "call",
    [
        {"controlnet_conditioning_scale": 0.8},
        {"guess_mode": True},
        {"control_guidance_start": 0.3, "control_guidance_end": 0.7},
        {"guidance_scale": 1.0, "guess_mode": True},
        {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "negative_prompt": ["blurry", "dark"]},
    ],
    ids=["scale", "guess-mode", "guidance-window", "no-guidance", "batch"],
)
def test_one_controlnet_gives_diffusers_images(models, call):
    assert_ours_give_diffusers_images(models, 1, image=condition(0), **call)


@pytest.mark.parametrize(
    "call",
    [
        {"controlnet_conditioning_scale": [0.6, 1.2]},
        {"guess_mode": True, "controlnet_conditioning_scale": 0.7},
        {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]},
    ],
    ids=["scales", "guess-mode", "guidance-windows"],
)
def test_two_controlnets_give_diffusers_images(models, call):
    assert_ours_give_diffusers_images(models, 2, image=[condition(0), condition(1)], **call)


def test_a_sigma_scheduler_gives_diffusers_images(models):
    """Euler scales the U-Net's input, which guess mode also feeds the ControlNet (the conditional half)."""
    assert_ours_give_diffusers_images(models, 1, EulerDiscreteScheduler, image=condition(0), guess_mode=True)


def test_the_controlnet_changes_the_image_and_a_zero_scale_does_not(models):
    shared, theirs, _ = models
    plain = ScratchStableDiffusionPipeline(**shared, unet=theirs["unet"], scheduler=sd_ddim())
    plain.set_progress_bar_config(disable=True)
    expected = plain("a cat", height=SIZE, width=SIZE, num_inference_steps=4, output_type="np",
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    controlnet = theirs["controlnets"][0]
    controlled = generate(
        ScratchStableDiffusionControlNetPipeline, shared, theirs["unet"], controlnet, image=condition(0)
    )
    unscaled = generate(ScratchStableDiffusionControlNetPipeline, shared, theirs["unet"], controlnet,
                        image=condition(0), controlnet_conditioning_scale=0.0)  # fmt: skip
    assert np.abs(controlled - expected.images).max() > 0.01
    assert np.abs(unscaled - expected.images).max() <= TOLERANCE


def test_auto_pipelines_switch_to_and_from_the_controlnet_pipeline(models):
    shared, _, ours = models
    text_to_image = ScratchStableDiffusionPipeline(**shared, unet=ours["unet"], scheduler=sd_ddim())
    controlled = AutoPipelineForText2Image.from_pipe(text_to_image, controlnet=ours["controlnets"][0])
    assert type(controlled) is ScratchStableDiffusionControlNetPipeline
    assert controlled.unet is text_to_image.unet and controlled.controlnet is ours["controlnets"][0]
    back = AutoPipelineForText2Image.from_pipe(controlled, controlnet=None)
    assert type(back) is ScratchStableDiffusionPipeline and back.unet is text_to_image.unet


@pytest.mark.parametrize(
    "call, message",
    [
        ({"image": condition(0)}, "one condition"),
        ({"image": [condition(0)] * 2, "controlnet_conditioning_scale": [1.0] * 3}, "3 entries for 2 ControlNets"),
        ({"image": [condition(0)] * 2, "control_guidance_start": 0.6, "control_guidance_end": 0.4}, "must be below"),
        ({"image": [condition(0)] * 2, "control_guidance_end": 1.5}, "control_guidance_end"),
        ({"image": [condition(0, batch=3)] * 2}, "one per prompt"),
    ],
)
def test_input_errors_name_the_argument(models, call, message):
    shared, _, ours = models
    pipe = ScratchStableDiffusionControlNetPipeline(**shared, unet=ours["unet"], controlnet=ours["controlnets"],
                                                    scheduler=sd_ddim())  # fmt: skip
    with pytest.raises(ValueError, match=message):
        pipe("a cat", num_inference_steps=2, **call)


def test_a_saved_controlnet_pipeline_loads_with_its_controlnet(models, tmp_path):
    from diffusers import DiffusionPipeline

    shared, _, ours = models
    pipe = ScratchStableDiffusionControlNetPipeline(**shared, unet=ours["unet"], controlnet=ours["controlnets"][0],
                                                    scheduler=sd_ddim())  # fmt: skip
    pipe.save_pretrained(tmp_path)
    call = dict(prompt="a cat", image=condition(0), num_inference_steps=2, output_type="np")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    for loaded in (ScratchStableDiffusionControlNetPipeline.from_pretrained(tmp_path),
                   DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)):  # fmt: skip
        assert type(loaded) is ScratchStableDiffusionControlNetPipeline
        assert isinstance(loaded.controlnet, ScratchControlNetModel)
        assert np.array_equal(loaded(**call, generator=torch.Generator().manual_seed(0)).images, expected)
