"""Every pipeline (text-to-image, image-to-image, inpainting) with every scheduler of `hf_scratch.schedulers.SCHEDULERS`
on a model of its family: tiny ε (DDPM-family), EDM and flow models, and the shipped flow model.

Each run is compared with diffusers' pipeline of the same kind on the same components and scheduler, with two
exceptions. diffusers' `FlowMatchEulerDiscreteScheduler` has no `init_noise_sigma` or `add_noise`, so diffusers'
pipelines cannot run it: their reference runs our flow scheduler, which takes the same steps. diffusers' inpainting
takes only 4- or 9-channel U-Nets, so the shipped model's (8 latent channels) is compared with our own inpainting on our
flow scheduler. Tolerance: max |ours − diffusers| <= 1e-4 on `output_type="np"` images in [0, 1].
"""

import numpy as np
import PIL.Image
import pytest
import torch
from _tiny import sd_ddim, tiny_components
from diffusers import (
    EDMEulerScheduler,
    FlowMatchHeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from hf_scratch.cli import main
from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline
from hf_scratch.pipelines.inpaint import ScratchStableDiffusionInpaintPipeline
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers import SCHEDULERS, family_of, make_scheduler, scheduler_family
from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4
STEPS = 4  # PNDM's Runge–Kutta warm-up needs four
SIZE = 32  # pixels: the tiny VAE's 16x16 latents, the shipped model's own size
# (ours, diffusers') pipeline classes, and the inputs beyond the prompt
KINDS = {
    "text_to_image": (ScratchStableDiffusionPipeline, StableDiffusionPipeline),
    "image_to_image": (ScratchStableDiffusionImg2ImgPipeline, StableDiffusionImg2ImgPipeline),
    "inpaint": (ScratchStableDiffusionInpaintPipeline, StableDiffusionInpaintPipeline),
}
# A config of each family for `make_scheduler` to build every scheduler of that family from.
FAMILY_CONFIGS = {
    "ddpm": sd_ddim().config,
    "edm": EDMEulerScheduler().config,
    "flow": ScratchFlowMatchEulerScheduler().config,
}


def kind_inputs(kind: str) -> dict:
    if kind == "text_to_image":
        return {"height": SIZE, "width": SIZE}
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    if kind == "image_to_image":
        return {"image": image, "strength": 0.75}
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:20, 8:24] = 255
    return {"image": image, "mask_image": PIL.Image.fromarray(mask, "L"), "height": SIZE, "width": SIZE}


def run(pipeline_class: type, components: dict, scheduler, kind: str) -> np.ndarray:
    extra = {} if pipeline_class.__module__.startswith("hf_scratch") else {
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
    }  # fmt: skip
    pipe = pipeline_class(**components, **extra, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                  output_type="np", **kind_inputs(kind)).images  # fmt: skip
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    return images


class FlowMatchHeunForStableDiffusion(FlowMatchHeunDiscreteScheduler):
    """diffusers' flow Heun with what diffusers' Stable Diffusion pipelines read of a scheduler and it lacks: a flow
    starts from x_1 = ε (`init_noise_sigma` 1), reads x_σ as it is, and noises by x_σ = (1 − σ) x_0 + σ ε."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep):
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        return self.scale_noise(original_samples, timesteps, noise)


def reference_scheduler(name: str, config) -> object:
    """The scheduler diffusers' pipelines run in place of `name`: itself; our flow Euler for diffusers' own; or
    diffusers' flow Heun with the attributes those pipelines read."""
    if name == "flow-heun":
        return FlowMatchHeunForStableDiffusion.from_config(make_scheduler(name, config).config)
    return make_scheduler("flow-euler" if name == "diffusers-flow-euler" else name, config)


def test_family_is_decided_once_for_names_classes_configs_and_schedulers():
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, FAMILY_CONFIGS[family_of(name)])
        assert scheduler_family(scheduler) == scheduler_family(scheduler.config) == family_of(name)
        if not SCHEDULERS[name][2]:  # a class alone has its family; a registry entry may set it by its options
            assert scheduler_family(type(scheduler)) == family_of(name)
    assert {family_of(name) for name in SCHEDULERS} == {"ddpm", "edm", "flow"}


@pytest.fixture(scope="module")
def tiny():
    return tiny_components("scratch"), tiny_components("diffusers")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_pipeline_runs_every_scheduler_with_diffusers_images(tiny, name, kind):
    ours, reference = KINDS[kind]
    config = FAMILY_CONFIGS[family_of(name)]
    if name == "diffusers-pndm" and kind == "inpaint":
        # diffusers' inpainting pipeline rewrites a PNDM scheduler's skip_prk_steps to True (with a deprecation)
        config = {**config, "skip_prk_steps": True}
    actual = run(ours, tiny[0], make_scheduler(name, config), kind)
    expected = run(reference, tiny[1], reference_scheduler(name, config), kind)
    assert np.abs(actual - expected).max() <= TOLERANCE


@pytest.fixture(scope="module")
def shipped():
    """The shipped flow model's components in float32, and the folder's own scheduler config."""
    from hf_scratch import default_model_path

    pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
    assert scheduler_family(pipe.scheduler) == "flow"
    components = {key: value for key, value in pipe.components.items() if key != "scheduler"}
    return components, pipe.scheduler.config


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [name for name in SCHEDULERS if family_of(name) == "flow"])
def test_shipped_flow_model_runs_every_pipeline_with_its_schedulers(shipped, name, kind):
    components, config = shipped
    ours, reference = KINDS[kind]
    if kind == "inpaint":
        reference = ours  # diffusers' inpainting takes only 4- or 9-channel U-Nets; the shipped one has 8 channels
    actual = run(ours, components, make_scheduler(name, config), kind)
    expected = run(reference, components, reference_scheduler(name, config), kind)
    assert np.abs(actual - expected).max() <= TOLERANCE


def test_cli_inpaint_with_diffusers_flow_euler_on_the_shipped_model(tmp_path):
    """`inpaint.py` read `scheduler.init_noise_sigma`, which diffusers' flow scheduler lacks (an AttributeError)."""
    inputs = kind_inputs("inpaint")
    inputs["image"].save(tmp_path / "in.png")
    inputs["mask_image"].save(tmp_path / "mask.png")
    argv = ["inpaint", "a red heart", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "--scheduler", "diffusers-flow-euler", "--steps", "3", "--output", str(tmp_path / "out.png")]  # fmt: skip
    assert main(argv) == 0
    assert PIL.Image.open(tmp_path / "out.png").size == (SIZE, SIZE)
