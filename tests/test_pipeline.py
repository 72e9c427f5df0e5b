"""Tests for `hf_scratch.pipelines`: numerical parity with diffusers' Stable Diffusion pipelines, outputs, callbacks,
saving and loading, and input validation.

Parity tolerance: max |ours - diffusers| <= 1e-4 on `output_type="np"` images in [0, 1].
Scheduler configs use Stable Diffusion's values (`steps_offset=1`, `clip_sample=False`), because diffusers'
`StableDiffusionPipeline.__init__` silently rewrites those two keys of the scheduler it is given, while ours does not.
"""

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_scratch.models.clip import ScratchCLIPTextModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import ScratchAutoencoderKL
from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline
from hf_scratch.pipelines.text_to_image import ScratchPipelineOutput, ScratchStableDiffusionPipeline
from hf_scratch.schedulers.ddim import ScratchDDIMScheduler
from hf_scratch.schedulers.ddpm import ScratchDDPMScheduler
from hf_scratch.schedulers.dpm_solver import ScratchDPMSolverMultistepScheduler

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import tiny_components  # noqa: E402

TOLERANCE = 1e-4
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
# (ours, diffusers') scheduler classes
SCHEDULERS = {
    "ddim": (ScratchDDIMScheduler, DDIMScheduler),
    "dpm": (ScratchDPMSolverMultistepScheduler, DPMSolverMultistepScheduler),
    "ddpm": (ScratchDDPMScheduler, DDPMScheduler),
}


def make_scheduler(scheduler_class: type) -> object:
    no_clip = {"clip_sample": False} if "clip_sample" in scheduler_class().config else {}
    return scheduler_class(**SD_SCHEDULE, **no_clip)


def quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_pipeline(pipeline_class: type, components: dict, scheduler: object) -> DiffusionPipeline:
    no_safety_checker = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return quiet(pipeline_class(**components, scheduler=scheduler, **no_safety_checker))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def diffusers_components() -> dict:
    return tiny_components("diffusers")


@pytest.fixture(scope="module")
def scratch_components() -> dict:
    return tiny_components("scratch")


@pytest.fixture(scope="module")
def pipe(scratch_components) -> ScratchStableDiffusionPipeline:
    return quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=make_scheduler(ScratchDDIMScheduler)))


@pytest.fixture(scope="module")
def img2img_pipe(scratch_components) -> ScratchStableDiffusionImg2ImgPipeline:
    scheduler = make_scheduler(ScratchDDIMScheduler)
    return quiet(ScratchStableDiffusionImg2ImgPipeline(**scratch_components, scheduler=scheduler))


def init_image(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=seeded(seed))


# ---------------------------------------------------------------------------------------------- parity with diffusers

GUIDANCE_CASES = {
    "cfg": dict(guidance_scale=7.5),
    "cfg+negative": dict(guidance_scale=5.0, negative_prompt="blurry"),
    "no-cfg": dict(guidance_scale=1.0),
}


@pytest.mark.parametrize("guidance", ["cfg+negative", "no-cfg"])
def test_diffusers_pipeline_runs_our_components(guidance, scratch_components):
    """diffusers' own StableDiffusionPipeline built from our U-Net, VAE and text encoder gives our images."""
    ours = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=make_scheduler(ScratchDDIMScheduler)))
    official = reference_pipeline(StableDiffusionPipeline, scratch_components, make_scheduler(ScratchDDIMScheduler))
    kwargs = dict(prompt="a red apple", num_inference_steps=3, output_type="np", **GUIDANCE_CASES[guidance])
    assert (
        np.abs(ours(**kwargs, generator=seeded()).images - official(**kwargs, generator=seeded()).images).max()
        <= TOLERANCE
    )


@pytest.mark.parametrize("guidance", GUIDANCE_CASES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_text_to_image_matches_diffusers(scheduler, guidance, diffusers_components, scratch_components):
    """Our pipeline, components and scheduler against diffusers' pipeline, components and scheduler."""
    ours_scheduler, reference_scheduler = SCHEDULERS[scheduler]
    ours = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=make_scheduler(ours_scheduler)))
    reference = reference_pipeline(StableDiffusionPipeline, diffusers_components, make_scheduler(reference_scheduler))
    kwargs = dict(prompt="a red apple", num_inference_steps=3, output_type="np", **GUIDANCE_CASES[guidance])
    image = ours(**kwargs, generator=seeded()).images
    expected = reference(**kwargs, generator=seeded()).images
    assert image.shape == (1, 32, 32, 3)
    assert np.abs(image - expected).max() <= TOLERANCE


def test_batched_prompts_match_diffusers(diffusers_components):
    """Same diffusers components in both pipelines: two prompts x two images, negative prompts, one generator each."""
    ours = quiet(ScratchStableDiffusionPipeline(**diffusers_components, scheduler=make_scheduler(DDIMScheduler)))
    reference = reference_pipeline(StableDiffusionPipeline, diffusers_components, make_scheduler(DDIMScheduler))
    kwargs = dict(
        prompt=["a cat", "a dog on a hill"],
        negative_prompt=["dark", "blurry"],
        num_images_per_prompt=2,
        num_inference_steps=2,
        output_type="np",
    )
    image = ours(**kwargs, generator=[seeded(i) for i in range(4)]).images
    expected = reference(**kwargs, generator=[seeded(i) for i in range(4)]).images
    assert image.shape == (4, 32, 32, 3)
    assert np.abs(image - expected).max() <= TOLERANCE


def test_clip_skip_uses_an_earlier_hidden_state_through_the_final_layer_norm(pipe):
    """(diffusers' own `clip_skip` reads `text_encoder.text_model`, which transformers 5's CLIPTextModel lacks.)"""
    input_ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden_states = pipe.text_encoder(input_ids, output_hidden_states=True).hidden_states
        prompt_embeds = pipe.text_encoder.final_layer_norm(hidden_states[-2])
    kwargs = dict(guidance_scale=1.0, num_inference_steps=2, output_type="np")
    skipped = pipe("a cat", clip_skip=1, **kwargs, generator=seeded()).images
    expected = pipe(prompt_embeds=prompt_embeds, **kwargs, generator=seeded()).images
    assert np.abs(skipped - expected).max() == 0
    assert np.abs(skipped - pipe("a cat", **kwargs, generator=seeded()).images).max() > TOLERANCE


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_to_image_matches_diffusers(scheduler, diffusers_components, scratch_components):
    ours_scheduler, reference_scheduler = SCHEDULERS[scheduler]
    ours = quiet(ScratchStableDiffusionImg2ImgPipeline(**scratch_components, scheduler=make_scheduler(ours_scheduler)))
    reference = reference_pipeline(
        StableDiffusionImg2ImgPipeline, diffusers_components, make_scheduler(reference_scheduler)
    )
    kwargs = dict(prompt="a red apple", image=init_image(), strength=0.6, num_inference_steps=5, output_type="np")
    image = ours(**kwargs, generator=seeded()).images
    expected = reference(**kwargs, generator=seeded()).images
    assert image.shape == (1, 32, 32, 3)
    assert np.abs(image - expected).max() <= TOLERANCE


@pytest.mark.parametrize("scheduler_class", [EDMDPMSolverMultistepScheduler, EDMEulerScheduler])
def test_edm_schedulers_match_diffusers(scheduler_class, diffusers_components, scratch_components):
    """An EDM-trained model samples through diffusers' EDM schedulers: σ-scaled start, c_in, c_noise."""
    ours = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=scheduler_class(sigma_data=1.0)))
    reference = reference_pipeline(StableDiffusionPipeline, diffusers_components, scheduler_class(sigma_data=1.0))
    kwargs = dict(prompt="a red apple", num_inference_steps=4, guidance_scale=4.0, output_type="np")
    assert (
        np.abs(ours(**kwargs, generator=seeded()).images - reference(**kwargs, generator=seeded()).images).max()
        <= TOLERANCE
    )


def test_image_to_image_pil_input_and_generator_list_match_diffusers(diffusers_components):
    ours = quiet(ScratchStableDiffusionImg2ImgPipeline(**diffusers_components, scheduler=make_scheduler(DDIMScheduler)))
    reference = reference_pipeline(StableDiffusionImg2ImgPipeline, diffusers_components, make_scheduler(DDIMScheduler))
    picture = PIL.Image.fromarray((init_image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    kwargs = dict(prompt="a cat", image=picture, num_images_per_prompt=2, num_inference_steps=4, output_type="np")
    image = ours(**kwargs, generator=[seeded(0), seeded(1)]).images
    expected = reference(**kwargs, generator=[seeded(0), seeded(1)]).images
    assert image.shape == (2, 32, 32, 3)
    assert np.abs(image - expected).max() <= TOLERANCE


# ---------------------------------------------------------------------------------------------- outputs and callbacks


@pytest.mark.parametrize(
    "output_type, check",
    [
        ("pil", lambda images: len(images) == 2 and all(image.size == (32, 32) for image in images)),
        ("np", lambda images: images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1),
        ("pt", lambda images: images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1),
        ("latent", lambda images: images.shape == (2, 4, 16, 16)),
    ],
)
def test_output_types(pipe, output_type, check):
    output = pipe("a cat", num_images_per_prompt=2, num_inference_steps=1, output_type=output_type)
    assert isinstance(output, ScratchPipelineOutput)
    assert check(output.images)


def test_return_dict_false_gives_a_tuple_and_size_is_configurable(pipe):
    output = pipe("a cat", height=16, width=48, num_inference_steps=1, output_type="np", return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1
    assert output[0].shape == (1, 16, 48, 3)


def test_prompt_embeds_give_the_same_image_as_the_prompt(pipe):
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt("a cat", torch.device("cpu"), 1, True, "a dog")
    from_text = pipe("a cat", negative_prompt="a dog", num_inference_steps=2, generator=seeded(), output_type="np")
    from_embeds = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        num_inference_steps=2,
        generator=seeded(),
        output_type="np",
    )
    assert np.abs(from_text.images - from_embeds.images).max() == 0


def test_given_latents_are_scaled_by_init_noise_sigma_and_used(pipe):
    latents = torch.randn(1, 4, 16, 16, generator=seeded())
    image = pipe("a cat", latents=latents, num_inference_steps=2, output_type="np").images
    same = pipe("a cat", generator=seeded(), num_inference_steps=2, output_type="np").images
    assert np.abs(image - same).max() == 0


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_callback_receives_latents_and_pred_original_sample(scheduler, scratch_components):
    """DDIM reports x̂_0 itself; DPM-Solver does not, so the pipeline derives it from ε̂ and ᾱ_t. Both must agree
    with x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)."""
    scheduler = make_scheduler(SCHEDULERS[scheduler][0])
    pipe = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=scheduler))
    start = torch.randn(1, 4, 16, 16, generator=seeded())
    seen = []

    def callback(pipeline, step_index, timestep, callback_kwargs):
        seen.append((step_index, int(timestep), {name: value.clone() for name, value in callback_kwargs.items()}))
        return {}

    names = ["latents", "noise_pred", "pred_original_sample", "prompt_embeds"]
    pipe("a cat", latents=start, num_inference_steps=3, callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=names, output_type="latent")  # fmt: skip
    assert [step for step, _, _ in seen] == [0, 1, 2]
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    sample = start * pipe.scheduler.init_noise_sigma
    for _, timestep, tensors in seen:
        assert set(tensors) == set(names)
        assert tensors["latents"].shape == tensors["pred_original_sample"].shape == (1, 4, 16, 16)
        assert tensors["prompt_embeds"].shape[0] == 2  # [uncond; cond]
        alpha = alphas_cumprod[timestep]
        expected = (sample - (1 - alpha).sqrt() * tensors["noise_pred"]) / alpha.sqrt()
        torch.testing.assert_close(tensors["pred_original_sample"], expected, atol=1e-4, rtol=1e-4)
        sample = tensors["latents"]


def test_callback_can_replace_latents(pipe):
    def zero_latents(pipeline, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    latents = pipe("a cat", num_inference_steps=2, callback_on_step_end=zero_latents, output_type="latent").images
    assert torch.count_nonzero(latents) == 0


def test_image_to_image_strength_sets_the_number_of_steps(img2img_pipe):
    steps = []
    img2img_pipe("a cat", image=init_image(), strength=0.5, num_inference_steps=6, output_type="latent",
                 callback_on_step_end=lambda pipe, i, t, kwargs: steps.append(int(t)) or {})  # fmt: skip
    assert steps == [int(t) for t in img2img_pipe.scheduler.timesteps[3:]]


def test_model_cpu_offload_sequence(pipe):
    assert pipe.model_cpu_offload_seq == "text_encoder->image_encoder->unet->vae"  # diffusers' own sequence
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            pipe.enable_model_cpu_offload()


# ---------------------------------------------------------------------------------------------- saving and loading


def test_save_then_diffusers_loads_our_class_with_remote_code(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ScratchStableDiffusionPipeline"]
    assert index["unet"] == ["hf_scratch.models.unet", "ScratchUNet2DConditionModel"]

    loaded = quiet(DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True))
    assert type(loaded).__name__ == "ScratchStableDiffusionPipeline"
    assert isinstance(loaded.unet, ScratchUNet2DConditionModel)
    kwargs = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    expected = pipe(**kwargs, generator=seeded()).images
    assert np.abs(loaded(**kwargs, generator=seeded()).images - expected).max() == 0

    # Our own classes need no remote code, and img2img loads from a text-to-image folder.
    assert type(ScratchStableDiffusionPipeline.from_pretrained(tmp_path)) is ScratchStableDiffusionPipeline
    img2img = ScratchStableDiffusionImg2ImgPipeline.from_pretrained(tmp_path)
    assert type(img2img) is ScratchStableDiffusionImg2ImgPipeline
    assert isinstance(img2img.scheduler, ScratchDDIMScheduler)


def test_load_a_folder_saved_by_diffusers(diffusers_components, tmp_path):
    reference = reference_pipeline(StableDiffusionPipeline, diffusers_components, make_scheduler(DDIMScheduler))
    reference.save_pretrained(tmp_path)
    kwargs = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    expected = reference(**kwargs, generator=seeded()).images

    recorded = quiet(ScratchStableDiffusionPipeline.from_pretrained(tmp_path))
    assert type(recorded.unet).__name__ == "UNet2DConditionModel"
    assert np.abs(recorded(**kwargs, generator=seeded()).images - expected).max() <= TOLERANCE

    ours = quiet(ScratchStableDiffusionPipeline.from_official(tmp_path))
    assert isinstance(ours.unet, ScratchUNet2DConditionModel)
    assert isinstance(ours.vae, ScratchAutoencoderKL)
    assert isinstance(ours.text_encoder, ScratchCLIPTextModel)
    assert np.abs(ours(**kwargs, generator=seeded()).images - expected).max() <= TOLERANCE


def test_from_single_file(pipe, tmp_path):
    from hf_scratch.formats.single_file import save_single_file

    pipe.save_pretrained(tmp_path / "folder")
    save_single_file(tmp_path / "model.safetensors", unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder)
    path, config = tmp_path / "model.safetensors", tmp_path / "folder"
    loaded = quiet(ScratchStableDiffusionPipeline.from_single_file(path, config=config))
    kwargs = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    expected = pipe(**kwargs, generator=seeded()).images
    assert np.abs(loaded(**kwargs, generator=seeded()).images - expected).max() == 0


# ---------------------------------------------------------------------------------------------- input validation

BAD_TEXT_TO_IMAGE_INPUTS = {
    "height not a multiple of 8": (dict(height=36), "`height` must be a positive multiple of 8"),
    "width not a multiple of 8": (dict(width=20), "`width` must be a positive multiple of 8"),
    "zero steps": (dict(num_inference_steps=0), "`num_inference_steps` must be an integer >= 1"),
    "no prompt": (dict(prompt=None), "exactly one of `prompt` and `prompt_embeds`, got neither"),
    "prompt and embeds": (dict(prompt_embeds=torch.zeros(1, 77, 32)), "got both"),
    "prompt not text": (dict(prompt=3), "`prompt` must be a string"),
    "bad output type": (dict(output_type="jpeg"), "`output_type` must be one of"),
    "unknown callback tensor": (dict(callback_on_step_end_tensor_inputs=["x0"]), r"unknown names \['x0'\]"),
    "negative prompt count": (dict(prompt=["a", "b"], negative_prompt=["c"]), "`negative_prompt` has 1 entries"),
    "negative prompt and embeds": (
        dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 32)),
        "at most one of `negative_prompt`",
    ),
    "negative embeds batch": (
        dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 32)),
        "`negative_prompt_embeds` has shape",
    ),
    "latents shape": (dict(prompt=["a", "b"], latents=torch.zeros(1, 4, 16, 16)), "`latents` has shape"),
    "generator count": (dict(generator=[seeded(), seeded()]), "`generator` is a list of 2"),
    "images per prompt": (dict(num_images_per_prompt=0), "`num_images_per_prompt` must be an integer >= 1"),
    "clip skip": (dict(clip_skip=5), r"`clip_skip` must be an integer in \[0, 1\]"),
    "nan latents": (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), "`latents` contains NaN"),
    "guidance NaN": (dict(guidance_scale=float("nan")), r"`guidance_scale` must be a finite number .*, got nan"),
    "guidance inf": (dict(guidance_scale=float("inf")), r"`guidance_scale` must be a finite number .*, got inf"),
    "guidance text": (dict(guidance_scale="7.5"), "`guidance_scale` must be a number, got '7.5' of type str"),
    "guidance None": (dict(guidance_scale=None), "`guidance_scale` must be a number, got None"),
    "negative eta": (dict(eta=-0.5), "`eta` must be a finite number >= 0.0"),
    "generator type": (dict(generator=3), "`generator` must be a torch.Generator or a list of them, got int"),
    "generator list of ints": (dict(generator=[1]), "`generator` must be a torch.Generator"),
    "numpy latents": (dict(latents=np.zeros((1, 4, 16, 16), np.float32)), "`latents` must be a torch.Tensor, got nd"),
    "list prompt_embeds": (dict(prompt=None, prompt_embeds=[[[0.0] * 32]]), "`prompt_embeds` must be a torch.Tensor"),
    "prompt_embeds features": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 31)), "has 31 features per token"),
    "integer latents": (dict(latents=torch.zeros(1, 4, 16, 16, dtype=torch.long)), "floating-point tensor"),
    "negative prompt of numbers": (dict(negative_prompt=[3]), "`negative_prompt` must be a string or a list of str"),
    "True as a count": (dict(num_images_per_prompt=True), "`num_images_per_prompt` must be an integer, got True"),
    "True as steps": (dict(num_inference_steps=True), "`num_inference_steps` must be an integer, got True"),
    "True as height": (dict(height=True), "`height` must be an integer number of pixels, got True"),
    "float height": (dict(height=32.0), "`height` must be an integer number of pixels, got 32.0"),
    "return_dict text": (dict(return_dict="yes"), "`return_dict` must be True or False"),
    "callback not callable": (dict(callback_on_step_end="print"), "`callback_on_step_end` must be callable"),
    "clip skip True": (dict(clip_skip=True), r"`clip_skip` must be an integer in \[0, 1\]"),
}


@pytest.mark.parametrize("case", BAD_TEXT_TO_IMAGE_INPUTS)
def test_text_to_image_rejects_bad_inputs_before_any_model_runs(case, pipe, monkeypatch):
    overrides, message = BAD_TEXT_TO_IMAGE_INPUTS[case]
    for model in ("unet", "vae", "text_encoder"):
        monkeypatch.setattr(getattr(pipe, model), "forward", lambda *args, **kwargs: pytest.fail("a model ran"))
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**{"prompt": "a cat", "num_inference_steps": 1, **overrides})


def test_numpy_integers_are_accepted_as_counts_and_sizes(pipe):
    images = pipe("a cat", num_inference_steps=np.int64(2), height=np.int32(16), width=np.int64(24),
                  num_images_per_prompt=np.int16(2), output_type="np").images  # fmt: skip
    assert images.shape == (2, 16, 24, 3)


def test_a_callback_that_returns_something_else_than_a_dict_is_named(pipe):
    with pytest.raises(TypeError, match="`callback_on_step_end` must return a dict .* got list at step 0"):
        pipe("a cat", num_inference_steps=2, callback_on_step_end=lambda *args: [])


BAD_IMAGE_TO_IMAGE_INPUTS = {
    "strength zero": (dict(strength=0.0), r"`strength` must be in \(0, 1\]"),
    "strength above one": (dict(strength=1.5), r"`strength` must be in \(0, 1\]"),
    "strength too small for steps": (dict(strength=0.1, num_inference_steps=5), "leaves no denoising step"),
    "no image": (dict(image=None), "`image` is required"),
    "image too small": (dict(image=torch.rand(1, 3, 6, 32)), "`image` is 6x32 pixels; it must be at least 8"),
    "image dimensions": (dict(image=torch.rand(32, 32)), r"got shape \(32, 32\)"),
    "image count": (dict(prompt=["a", "b", "c"], image=init_image(2)), "pass one image or one per prompt"),
}


@pytest.mark.parametrize("case", BAD_IMAGE_TO_IMAGE_INPUTS)
def test_image_to_image_rejects_bad_inputs_before_any_model_runs(case, img2img_pipe, monkeypatch):
    overrides, message = BAD_IMAGE_TO_IMAGE_INPUTS[case]
    for model in ("unet", "vae", "text_encoder"):
        monkeypatch.setattr(getattr(img2img_pipe, model), "forward", lambda *args, **kwargs: pytest.fail("a model ran"))
    with pytest.raises(ValueError, match=message):
        img2img_pipe(**{"prompt": "a cat", "image": init_image(), "num_inference_steps": 2, **overrides})


def test_long_prompt_is_truncated_with_a_warning_naming_the_dropped_text(pipe, caplog):
    # The tiny tokenizer has one token per character: 75 fit between the start and end tokens.
    prompt = "a" * 75 + "tail end"
    with caplog.at_level(logging.WARNING, logger="hf_scratch.pipelines.text_to_image"):
        pipe(prompt, num_inference_steps=1, output_type="latent")
    assert "tail end" in caplog.text


def test_nan_during_denoising_raises_naming_the_step(scratch_components):
    components = dict(scratch_components, unet=tiny_components("scratch")["unet"])
    with torch.no_grad():
        components["unet"].conv_out.bias.fill_(float("nan"))
    pipe = quiet(ScratchStableDiffusionPipeline(**components, scheduler=make_scheduler(ScratchDDIMScheduler)))
    with pytest.raises(ValueError, match="NaN or infinite at denoising step 0"):
        pipe("a cat", num_inference_steps=2)


# ---------------------------------------------------------------------------------------------- property test


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    img2img=st.booleans(),
    height=st.integers(1, 5).map(lambda k: 8 * k) | st.integers(1, 40),
    width=st.sampled_from([16, 32, 20]),
    steps=st.integers(0, 3),
    prompts=st.integers(1, 2),
    per_prompt=st.integers(0, 2),
    strength=st.sampled_from([0.0, 0.3, 0.5, 1.0, 1.2]),
    guidance_scale=st.sampled_from([1.0, 3.0]),
)
def test_random_inputs_give_images_or_value_errors(
    pipe, img2img_pipe, img2img, height, width, steps, prompts, per_prompt, strength, guidance_scale
):
    """Valid combinations give images of the requested shape; invalid ones raise ValueError and nothing else."""
    common = dict(prompt=["a cat"] * prompts, num_inference_steps=steps, num_images_per_prompt=per_prompt,
                  guidance_scale=guidance_scale, output_type="np")  # fmt: skip
    if img2img:
        image = torch.rand(1, 3, height, width)
        output_size = (height - height % 8, width - width % 8)  # the input is resized down to a multiple of 8
        valid = height >= 8 and 0 < strength <= 1 and int(steps * strength) >= 1
        run = lambda: img2img_pipe(**common, image=image, strength=strength)  # noqa: E731
    else:
        output_size = (height, width)
        valid = height % 8 == 0 and width % 8 == 0
        run = lambda: pipe(**common, height=height, width=width)  # noqa: E731
    if valid and steps >= 1 and per_prompt >= 1:
        assert run().images.shape == (prompts * per_prompt, *output_size, 3)
    else:
        with pytest.raises(ValueError):
            run()


def test_an_image_too_large_for_memory_is_refused_before_allocating(pipe, monkeypatch):
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the U-Net ran"))
    with pytest.raises(ValueError, match=r"100000x100000 pixels need about .* GiB to decode.*enable_vae_tiling"):
        pipe("a cat", height=100000, width=100000, num_inference_steps=1)


def test_24_pixel_images_run_on_a_three_level_unet_as_in_diffusers():
    """The shipped model at 24 px: 6x6 latents through a U-Net that halves twice (6 → 3 → 2)."""
    from diffusers import UNet2DConditionModel

    from hf_scratch import default_model_path

    ours = quiet(ScratchStableDiffusionPipeline.from_pretrained(default_model_path()))
    diffusers_unet = UNet2DConditionModel.from_pretrained(default_model_path(), subfolder="unet", dtype=torch.float32)
    components = {**ours.components, "unet": diffusers_unet}
    reference = reference_pipeline(StableDiffusionPipeline, {k: v for k, v in components.items() if k != "scheduler"},
                                   ours.scheduler)  # fmt: skip
    kwargs = dict(prompt="red heart, twemoji style", height=24, width=24, num_inference_steps=3, output_type="np")
    image = ours(**kwargs, generator=seeded()).images
    assert image.shape == (1, 24, 24, 3)
    assert np.abs(image - reference(**kwargs, generator=seeded()).images).max() <= TOLERANCE


@pytest.mark.parametrize(
    "scheduler, steps, message",
    [(DPMSolverMultistepScheduler(**SD_SCHEDULE), 1001, r"exceeds the 1000 timesteps"),
     (ScratchDPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="leading"), 200, r"starts at t=801 of 1000"),
     (DPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="leading"), 500, r"starts at t=501 .*\"trailing\""),
     (DDIMScheduler(**SD_SCHEDULE), 150, r"DDIMScheduler at 150 steps starts at t=895"),
     (DDIMScheduler(**SD_SCHEDULE), 10000, r"exceeds the 1000 timesteps"),
     (PNDMScheduler(**SD_SCHEDULE), 2, r"PNDMScheduler's Runge–Kutta warm-up needs `num_inference_steps` >= 4")],
)  # fmt: skip
def test_schedules_that_cannot_work_are_refused(scheduler, steps, message, scratch_components, monkeypatch):
    pipe = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=scheduler))
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the U-Net ran"))
    with pytest.raises(ValueError, match=message):
        pipe("a cat", num_inference_steps=steps)


# ------------------------------------------------------------------------------------- images as people pass them
def _img2img(pipe, image, **kwargs):
    return pipe("a cat", image=image, strength=0.5, num_inference_steps=2, output_type="np", generator=seeded(),
                **kwargs).images  # fmt: skip


def test_uint8_arrays_are_read_in_0_to_255(img2img_pipe):
    pixels = (init_image()[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    assert (
        np.abs(_img2img(img2img_pipe, pixels) - _img2img(img2img_pipe, pixels.astype(np.float32) / 255)).max()
        <= TOLERANCE
    )
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)  # uint8 (3, H, W)
    assert (
        np.abs(_img2img(img2img_pipe, tensor) - _img2img(img2img_pipe, pixels.astype(np.float32) / 255)).max()
        <= TOLERANCE
    )


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "YCbCr", "HSV", "CMYK"])
def test_pil_modes_are_converted_to_rgb(img2img_pipe, mode):
    rgb = PIL.Image.fromarray((init_image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    if mode in ("RGBA", "LA"):
        picture = rgb.convert(mode)
        alpha = PIL.Image.linear_gradient("L").resize(rgb.size)
        picture.putalpha(alpha)
        white = PIL.Image.new("RGBA", rgb.size, (255, 255, 255, 255))
        expected_input = PIL.Image.alpha_composite(white, picture.convert("RGBA")).convert("RGB")  # laid on white
    else:
        picture = rgb.convert(mode)
        expected_input = picture.convert("RGB")
    assert np.abs(_img2img(img2img_pipe, picture) - _img2img(img2img_pipe, expected_input)).max() <= TOLERANCE


def test_grey_arrays_and_mixed_lists_are_accepted(img2img_pipe):
    grey = init_image()[0].mean(dim=0).numpy()  # (H, W) floats in [0, 1]
    images = _img2img(img2img_pipe, grey)
    expected = _img2img(img2img_pipe, np.repeat(grey[..., None], 3, axis=-1))
    assert np.abs(images - expected).max() <= TOLERANCE
    picture = PIL.Image.fromarray((init_image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    mixed = img2img_pipe(["a", "b"], image=[picture, np.repeat(grey[..., None], 3, axis=-1)], num_inference_steps=2,
                         strength=0.5, output_type="np").images  # fmt: skip
    assert mixed.shape == (2, 32, 32, 3)


def test_nan_images_are_refused_by_name(img2img_pipe):
    with pytest.raises(ValueError, match="`image` contains NaN"):
        _img2img(img2img_pipe, np.full((32, 32, 3), np.nan, np.float32))


def test_sixteen_bit_images_and_float_ranges_are_read_as_meant(img2img_pipe, tmp_path):
    """A nearly black 16-bit PNG is nearly black (not white), and floats in 0–255 are refused, not taken as 0–1."""
    values = (np.arange(32 * 32).reshape(32, 32) % 2000).astype(np.uint16)
    PIL.Image.fromarray(values).save(tmp_path / "grey16.png")
    with PIL.Image.open(tmp_path / "grey16.png") as picture:
        sixteen_bit = _img2img(img2img_pipe, picture)
    as_floats = np.repeat(values[..., None].astype(np.float32) / 65535, 3, axis=-1)
    assert np.abs(sixteen_bit - _img2img(img2img_pipe, as_floats)).max() <= TOLERANCE
    assert np.abs(_img2img(img2img_pipe, values) - sixteen_bit).max() <= TOLERANCE  # a uint16 array alike
    with pytest.raises(ValueError, match=r"`image` holds float32 values in \[0, 255\].*divide by 255"):
        _img2img(img2img_pipe, np.linspace(0, 255, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3))
    with pytest.raises(ValueError, match=r"`image` holds float32 values in \[-5, -1\]"):
        _img2img(img2img_pipe, torch.linspace(-5, -1, 3 * 32 * 32).reshape(1, 3, 32, 32))


# Values of any type, for the arguments that are drawn: a few valid ones among many that are not.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2), st.sampled_from([np.int64(2), np.float32(1.5), np.zeros(3), object()]),
    st.sampled_from([torch.zeros(2), torch.zeros(1, 4, 16, 16), torch.zeros(1, 77, 32), torch.Generator()]),
)  # fmt: skip
PIPELINE_ARGUMENTS = {
    "prompt": st.sampled_from(["a cat", ["a", "b"]]) | ANY_VALUE,
    "height": st.sampled_from([16, 32]) | ANY_VALUE,
    "width": st.sampled_from([16, 32]) | ANY_VALUE,
    "num_inference_steps": st.sampled_from([1, 2]) | ANY_VALUE,
    "guidance_scale": st.sampled_from([1.0, 3.0]) | ANY_VALUE,
    "negative_prompt": st.sampled_from([None, "blurry"]) | ANY_VALUE,
    "num_images_per_prompt": st.sampled_from([1, 2]) | ANY_VALUE,
    "eta": st.sampled_from([0.0, 0.5]) | ANY_VALUE,
    "generator": st.sampled_from([None]) | ANY_VALUE,
    "latents": st.sampled_from([None]) | ANY_VALUE,
    "prompt_embeds": st.sampled_from([None]) | ANY_VALUE,
    "negative_prompt_embeds": st.sampled_from([None]) | ANY_VALUE,
    "output_type": st.sampled_from(["np", "latent"]) | ANY_VALUE,
    "return_dict": st.sampled_from([True]) | ANY_VALUE,
    "callback_on_step_end": st.sampled_from([None]) | ANY_VALUE,
    "callback_on_step_end_tensor_inputs": st.sampled_from([["latents"]]) | ANY_VALUE,
    "clip_skip": st.sampled_from([None, 1]) | ANY_VALUE,
    "guidance_rescale": st.sampled_from([0.0, 0.7]) | ANY_VALUE,
    "timesteps": st.sampled_from([None]) | ANY_VALUE,
    "sigmas": st.sampled_from([None]) | ANY_VALUE,
}


@settings(max_examples=int(os.environ.get("HF_SCRATCH_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_arguments_of_any_type_give_images_or_errors_that_name_them(pipe, data):
    """Up to three arguments drawn from values of any type: the call gives images, or a ValueError / TypeError whose
    message names one of the drawn arguments; never an error from deep inside a library."""
    names = data.draw(st.lists(st.sampled_from(sorted(PIPELINE_ARGUMENTS)), min_size=1, max_size=3, unique=True))
    kwargs = {"prompt": "a cat", "num_inference_steps": 1, "output_type": "latent"}
    kwargs.update({name: data.draw(PIPELINE_ARGUMENTS[name], label=name) for name in names})
    try:
        pipe(**kwargs)
    except (ValueError, TypeError) as error:
        assert any(f"`{name}`" in str(error) for name in names), f"{error!r} names none of {names}"


def test_a_decoder_that_produces_nan_raises(scratch_components):
    components = dict(scratch_components, vae=tiny_components("scratch")["vae"])
    with torch.no_grad():
        components["vae"].decoder.conv_out.bias.fill_(float("nan"))
    pipe = quiet(ScratchStableDiffusionPipeline(**components, scheduler=make_scheduler(ScratchDDIMScheduler)))
    with pytest.raises(ValueError, match="The VAE decoder produced NaN or infinite values"):
        pipe("a cat", num_inference_steps=1)


def test_a_folder_without_its_tokenizer_fails_at_load_naming_it(pipe, tmp_path):
    import shutil

    pipe.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"lists the components \['tokenizer'\] .* no such subfolder"):
        ScratchStableDiffusionPipeline.from_pretrained(tmp_path)


def test_saved_weights_respect_the_umask(pipe, tmp_path):
    previous = os.umask(0o027)
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    modes = {str(path): path.stat().st_mode & 0o777 for path in tmp_path.rglob("*.safetensors")}
    assert len(modes) == 3 and set(modes.values()) == {0o640}


def test_variant_round_trips_at_the_pipeline_level(scratch_components, tmp_path):
    """`save_pretrained(folder, variant="fp16")` writes every model's weights under the variant's name (diffusers
    passes `variant` only to a `save_pretrained` whose signature names it), and `from_pretrained(folder,
    variant="fp16")` reads them back."""
    half = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=make_scheduler(ScratchDDIMScheduler))
    half.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    weights = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.fp16.safetensors"]  # fmt: skip
    loaded = ScratchStableDiffusionPipeline.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        expected, actual = getattr(half, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys(), name
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name
        assert getattr(loaded, name).dtype == torch.float16


@pytest.mark.parametrize(
    "scheduler, steps",
    [(ScratchDPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="leading"), 20),
     (ScratchDPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="leading"), 100),
     (DDIMScheduler(**SD_SCHEDULE), 6), (DDIMScheduler(**SD_SCHEDULE), 50),
     (ScratchDPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="trailing"), 500)],
)  # fmt: skip
def test_usual_schedules_are_accepted(scheduler, steps, scratch_components):
    ScratchStableDiffusionPipeline(**scratch_components, scheduler=scheduler).check_schedule(steps)


def test_callback_pred_original_sample_of_edm_schedulers_agree(scratch_components):
    """EDM's Euler reports x̂_0; for its DPM-Solver++ (which does not) the pipeline derives D = c_skip x + c_out F: at
    the first step, where both start from the same σ and latents, the two agree."""
    first = {}

    for name, scheduler_class in (("euler", EDMEulerScheduler), ("dpm", EDMDPMSolverMultistepScheduler)):

        def keep(pipe, step, timestep, tensors, name=name):
            first.setdefault(name, tensors["pred_original_sample"])
            return {}

        pipe = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=scheduler_class(sigma_data=1.0)))
        pipe("a cat", num_inference_steps=4, generator=seeded(), callback_on_step_end=keep,
             callback_on_step_end_tensor_inputs=["pred_original_sample"], output_type="latent")  # fmt: skip
    torch.testing.assert_close(first["dpm"], first["euler"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- guidance_rescale and custom schedules (diffusers')
@pytest.mark.parametrize(
    "kwargs, scheduler_class",
    [(dict(guidance_rescale=0.7), DDIMScheduler),
     (dict(timesteps=[999, 700, 400, 100]), DDPMScheduler),
     (dict(timesteps=[950, 500, 50], guidance_rescale=0.3), DDPMScheduler)],
)  # fmt: skip
def test_guidance_rescale_and_custom_timesteps_match_diffusers(kwargs, scheduler_class, diffusers_components,
                                                               scratch_components):  # fmt: skip
    ours = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=make_scheduler(scheduler_class)))
    reference = reference_pipeline(StableDiffusionPipeline, diffusers_components, make_scheduler(scheduler_class))
    call = dict(prompt="a red apple", num_inference_steps=3, guidance_scale=6.0, output_type="np", **kwargs)
    image = ours(**call, generator=seeded()).images
    assert np.abs(image - reference(**call, generator=seeded()).images).max() <= TOLERANCE
    if "guidance_rescale" in kwargs:  # the option does something
        plain = {key: value for key, value in call.items() if key != "guidance_rescale"}
        assert np.abs(image - ours(**plain, generator=seeded()).images).max() > TOLERANCE


def test_custom_sigmas_of_a_flow_scheduler_match_diffusers(diffusers_components, scratch_components):
    from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

    call = dict(prompt="a cat", sigmas=[1.0, 0.7, 0.4, 0.1], guidance_scale=3.0, output_type="np")
    ours = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=ScratchFlowMatchEulerScheduler()))
    reference = reference_pipeline(StableDiffusionPipeline, diffusers_components, ScratchFlowMatchEulerScheduler())
    image = ours(**call, generator=seeded()).images
    assert np.abs(image - reference(**call, generator=seeded()).images).max() <= TOLERANCE


def test_image_to_image_with_custom_timesteps_matches_diffusers(diffusers_components, scratch_components):
    scheduler = make_scheduler(DDPMScheduler)
    ours = quiet(ScratchStableDiffusionImg2ImgPipeline(**scratch_components, scheduler=scheduler))
    reference = reference_pipeline(StableDiffusionImg2ImgPipeline, diffusers_components, make_scheduler(DDPMScheduler))
    call = dict(prompt="a cat", image=init_image(), strength=0.5, timesteps=[900, 600, 300, 100], output_type="np")
    image = ours(**call, generator=seeded()).images
    assert np.abs(image - reference(**call, generator=seeded()).images).max() <= TOLERANCE
    # diffusers' img2img has no guidance_rescale; ours takes it, as its text-to-image does
    assert np.abs(ours(**call, guidance_rescale=0.5, generator=seeded()).images - image).max() > TOLERANCE


@pytest.mark.parametrize(
    "kwargs, error, message",
    [(dict(timesteps=[999, 500]), ValueError, "`timesteps` is not supported by ScratchDDIMScheduler"),
     (dict(timesteps=[999], sigmas=[1.0]), ValueError, "at most one of `timesteps` and `sigmas`"),
     (dict(timesteps="999"), TypeError, "`timesteps` must be a non-empty list of numbers"),
     (dict(guidance_rescale=1.5), ValueError, "`guidance_rescale` must be a finite number >= 0.0 and <= 1.0")],
)  # fmt: skip
def test_bad_schedules_and_rescale_are_named(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe("a cat", num_inference_steps=2, **kwargs)


# --------------------------------------------------------------------------------------------- every schedule checked
def flow_pipe(components: dict, pipeline_class: type = ScratchStableDiffusionPipeline) -> DiffusionPipeline:
    from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

    return quiet(pipeline_class(**components, scheduler=ScratchFlowMatchEulerScheduler()))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(sigmas=[5.0, 3.0, 1.0]), r"`sigmas` of a flow-family scheduler must lie in \[0, 1\]"),
     (dict(sigmas=[-1.0, -2.0]), r"`sigmas` of a flow-family scheduler must lie in \[0, 1\]"),
     (dict(sigmas=[0.1, 0.5, 1.0]), "`sigmas` must be strictly decreasing"),
     (dict(sigmas=[1.0, float("nan")]), "`sigmas` must hold finite numbers"),
     (dict(timesteps=[500, -50]), r"`timesteps` of a flow-family scheduler must lie in \[0, 1000\]")],
)  # fmt: skip
def test_custom_flow_schedules_are_checked_before_any_model_runs(kwargs, message, scratch_components, monkeypatch):
    pipe = flow_pipe(scratch_components)
    for model in ("unet", "vae", "text_encoder"):
        monkeypatch.setattr(getattr(pipe, model), "forward", lambda *args, **kwargs: pytest.fail("a model ran"))
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **kwargs)


def test_ddpm_family_timesteps_are_whole_numbers_in_the_training_range(scratch_components):
    pipe = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=make_scheduler(DDPMScheduler)))
    with pytest.raises(ValueError, match=r"`timesteps` of a ddpm-family scheduler must lie in \[0, 999\]"):
        pipe("a cat", timesteps=[1500, 500])
    with pytest.raises(ValueError, match="`timesteps` of a ddpm-family scheduler must be whole numbers"):
        pipe("a cat", timesteps=[900.5, 500])


def test_a_strength_that_leaves_no_step_of_a_custom_schedule_is_refused(scratch_components):
    """img2img with `sigmas=[1.0, 0.5], strength=0.4` returned zero images: int(2 x 0.4) = 0 steps."""
    img2img = flow_pipe(scratch_components, ScratchStableDiffusionImg2ImgPipeline)
    with pytest.raises(ValueError, match=r"`strength` 0.4 x 2 steps \(the length of `sigmas`\) leaves no denoising"):
        img2img("a cat", image=init_image(), sigmas=[1.0, 0.5], strength=0.4)
    from hf_scratch.pipelines.inpaint import ScratchStableDiffusionInpaintPipeline

    inpaint = flow_pipe(scratch_components, ScratchStableDiffusionInpaintPipeline)
    with pytest.raises(ValueError, match=r"x 2 steps \(the length of `sigmas`\) leaves no denoising step"):
        inpaint("a cat", image=init_image(), mask_image=torch.ones(1, 1, 32, 32), sigmas=[1.0, 0.5], strength=0.4)
    assert img2img("a cat", image=init_image(), sigmas=[1.0, 0.5], strength=0.5, output_type="np").images.shape[0] == 1


def test_a_scheduler_of_another_family_is_named_once(scratch_components, tmp_path, caplog):
    """The CLI and the demo refuse a flow scheduler on a DDPM-family model; the Python API says so, once."""
    from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

    saved = quiet(ScratchStableDiffusionPipeline(**scratch_components, scheduler=make_scheduler(ScratchDDIMScheduler)))
    saved.save_pretrained(tmp_path)
    for pipe in (
        saved,
        ScratchStableDiffusionPipeline.from_pretrained(tmp_path, scheduler=ScratchFlowMatchEulerScheduler()),
    ):
        pipe.scheduler = ScratchFlowMatchEulerScheduler()
        quiet(pipe)
        with caplog.at_level(logging.WARNING, logger="hf_scratch.pipelines.text_to_image"):
            caplog.clear()
            for _ in range(2):
                pipe("a cat", num_inference_steps=1, output_type="latent")
        warnings = [record.message for record in caplog.records if "family" in record.message]
        assert len(warnings) == 1, warnings
        assert "samples flow-family models" in warnings[0] and "a ddpm-family scheduler" in warnings[0]


@pytest.mark.parametrize(
    "returned, message",
    [(lambda latents: latents[:, :2], r"returned `latents` as torch.float32 of shape \(1, 2, 16, 16\) at step 0"),
     (lambda latents: latents.double(), r"returned `latents` as torch.float64 .* dtype torch.float32"),
     (lambda latents: latents.tolist(), "returned `latents` as list")],
)  # fmt: skip
def test_callback_tensors_are_checked_for_shape_and_dtype(pipe, returned, message):
    def callback(pipeline, step, timestep, tensors):
        return {"latents": returned(tensors["latents"])}

    with pytest.raises(ValueError, match=message):
        pipe("a cat", num_inference_steps=2, callback_on_step_end=callback, output_type="latent")


SCHEDULE_VALUES = st.lists(
    st.one_of(st.floats(-2, 1200), st.integers(-5, 1100), st.sampled_from([float("nan"), float("inf"), 0.0, 1.0])),
    min_size=1, max_size=4,
)  # fmt: skip


def valid_schedule(values: list, family: str, argument: str) -> bool:
    """The documented rule: finite, strictly decreasing, and in range (flow σ in [0, 1], timesteps in [0, 1000]; DDPM
    timesteps whole numbers in [0, 999])."""
    if not all(np.isfinite(v) for v in values) or any(b >= a for a, b in zip(values, values[1:])):
        return False
    if argument == "sigmas":
        return 0 <= values[-1] and values[0] <= 1
    if family == "ddpm":
        return all(float(v).is_integer() for v in values) and 0 <= values[-1] and values[0] <= 999
    return 0 <= values[-1] and values[0] <= 1000


@settings(max_examples=int(os.environ.get("HF_SCRATCH_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(values=SCHEDULE_VALUES, family=st.sampled_from(["flow", "ddpm"]), sigmas=st.booleans())
def test_custom_schedules_run_when_valid_and_are_refused_by_name_otherwise(scratch_components, values, family, sigmas):
    """Custom `sigmas` (flow) or `timesteps` (flow, DDPM): valid ones give finite latents, all others a ValueError
    naming the argument before any model runs."""
    argument = "sigmas" if sigmas and family == "flow" else "timesteps"
    pipe = flow_pipe(scratch_components) if family == "flow" else quiet(
        ScratchStableDiffusionPipeline(**scratch_components, scheduler=make_scheduler(DDPMScheduler))
    )  # fmt: skip
    call = lambda: pipe("a cat", guidance_scale=1.0, output_type="latent", **{argument: values}).images  # noqa: E731
    if valid_schedule(values, family, argument):
        assert torch.isfinite(call()).all()
    else:
        with pytest.raises(ValueError, match=f"`{argument}`"):
            call()
