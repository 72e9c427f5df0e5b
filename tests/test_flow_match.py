"""ScratchFlowMatchEulerScheduler against diffusers' FlowMatchEulerDiscreteScheduler, and flow models in the pipelines
(ours and diffusers')."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from hf_scratch import ScratchFlowMatchEulerScheduler
from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers import make_scheduler

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import tiny_components  # noqa: E402

RELATIVE_TOLERANCE = 1e-6
IMAGE_TOLERANCE = 1e-4


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def run_both(ours, reference, steps: int, set_kwargs: dict | None = None) -> list[float]:
    """Feed both schedulers the same model outputs over a whole loop; return the relative error of each step."""
    ours.set_timesteps(steps, **(set_kwargs or {}))
    reference.set_timesteps(steps, **(set_kwargs or {}))
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert torch.equal(ours.sigmas, reference.sigmas)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    ours_sample, reference_sample, errors = sample.clone(), sample.clone(), []
    for timestep in ours.timesteps:
        model_output = torch.randn(2, 4, 8, 8, generator=generator)
        ours_sample = ours.step(model_output, timestep, ours_sample).prev_sample
        reference_sample = reference.step(model_output, timestep, reference_sample).prev_sample
        errors.append(relative_error(ours_sample, reference_sample))
    return errors


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_step_parity_with_diffusers(shift, steps):
    errors = run_both(ScratchFlowMatchEulerScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift), steps)
    assert max(errors) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize(
    "config, set_kwargs",
    [
        ({"use_dynamic_shifting": True}, {"mu": 0.8}),
        ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.5}),
        ({"shift": 3.0, "shift_terminal": 0.1}, {}),
    ],
)
def test_dynamic_shifting_and_shift_terminal_match_diffusers(config, set_kwargs):
    errors = run_both(
        ScratchFlowMatchEulerScheduler(**config), FlowMatchEulerDiscreteScheduler(**config), 12, set_kwargs
    )
    assert max(errors) <= RELATIVE_TOLERANCE


def test_custom_sigmas_match_diffusers():
    sigmas = [1.0, 0.8, 0.5, 0.3, 0.1]
    ours, reference = ScratchFlowMatchEulerScheduler(shift=2.0), FlowMatchEulerDiscreteScheduler(shift=2.0)
    ours.set_timesteps(sigmas=sigmas)
    reference.set_timesteps(sigmas=sigmas)
    assert torch.equal(ours.sigmas, reference.sigmas) and torch.equal(ours.timesteps, reference.timesteps)


def test_the_flow_forward_process_and_its_exact_reversal():
    """scale_noise is x_σ = (1 − σ) x_0 + σ ε, as diffusers'; the true velocity ε − x_0 takes any x_σ back to x_0."""
    ours, reference = ScratchFlowMatchEulerScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (ours, reference):
        scheduler.set_timesteps(10)
    original, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timestep = ours.timesteps[2:3].repeat(3)
    noised = ours.scale_noise(original, timestep, noise)
    assert torch.equal(noised, reference.scale_noise(original, timestep, noise))
    sigma = ours.sigmas[2]
    assert torch.allclose(noised, (1 - sigma) * original + sigma * noise)
    # a perfect model: Euler on a straight line is exact, whatever the step sizes
    ours.set_begin_index(2)
    sample = noised
    for t in ours.timesteps[2:]:
        output = ours.step(noise - original, t, sample)
        sample = output.prev_sample
    assert torch.allclose(sample, original, atol=1e-5)
    assert torch.allclose(output.pred_original_sample, original, atol=1e-5)


def test_configs_load_both_ways(tmp_path):
    ours = ScratchFlowMatchEulerScheduler(shift=3.0, use_dynamic_shifting=False)
    assert set(ours.config) == set(FlowMatchEulerDiscreteScheduler().config)
    ours.save_pretrained(tmp_path / "ours")
    theirs = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "ours")
    assert theirs.config.shift == 3.0
    FlowMatchEulerDiscreteScheduler(shift=2.5).save_pretrained(tmp_path / "theirs")
    assert ScratchFlowMatchEulerScheduler.from_pretrained(tmp_path / "theirs").config.shift == 2.5
    assert type(make_scheduler("flow-euler", theirs.config)) is ScratchFlowMatchEulerScheduler


@pytest.mark.parametrize("option", ["use_karras_sigmas", "invert_sigmas"])
def test_unsupported_options_are_refused_by_name(option):
    with pytest.raises(ValueError, match=option):
        ScratchFlowMatchEulerScheduler(**{option: True})


def test_step_refuses_integer_timesteps_and_a_missing_schedule():
    scheduler = ScratchFlowMatchEulerScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 4, 2, 2), torch.tensor(500.0), torch.zeros(1, 4, 2, 2))
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(torch.zeros(1, 4, 2, 2), 3, torch.zeros(1, 4, 2, 2))


def test_ddpm_schedulers_are_refused_for_a_flow_model():
    with pytest.raises(ValueError, match="flow-euler"):
        make_scheduler("dpm++", ScratchFlowMatchEulerScheduler().config)


# ---------------------------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def components() -> dict:
    torch.set_num_threads(1)
    return tiny_components("scratch")


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_text_to_image_with_a_flow_scheduler_matches_diffusers(components, guidance_scale):
    """Our pipeline (with diffusers' flow scheduler, and with ours) gives the images of diffusers' own
    StableDiffusionPipeline, which runs a flow model through our scheduler's init_noise_sigma and scale_model_input."""
    kwargs = dict(prompt="a red apple", num_inference_steps=4, guidance_scale=guidance_scale, output_type="np")
    reference = quiet(
        StableDiffusionPipeline(**components, scheduler=ScratchFlowMatchEulerScheduler(shift=2.0), **NO_SAFETY)
    )
    expected = reference(**kwargs, generator=seeded()).images
    for scheduler in (ScratchFlowMatchEulerScheduler(shift=2.0), FlowMatchEulerDiscreteScheduler(shift=2.0)):
        ours = quiet(ScratchStableDiffusionPipeline(**components, scheduler=scheduler))
        assert np.abs(ours(**kwargs, generator=seeded()).images - expected).max() <= IMAGE_TOLERANCE


def test_image_to_image_with_a_flow_scheduler_matches_diffusers(components):
    image = torch.rand(1, 3, 32, 32, generator=seeded(1))
    kwargs = dict(prompt="a cat", image=image, strength=0.6, num_inference_steps=5, output_type="np")
    reference = quiet(
        StableDiffusionImg2ImgPipeline(**components, scheduler=ScratchFlowMatchEulerScheduler(), **NO_SAFETY)
    )
    expected = reference(**kwargs, generator=seeded()).images
    for scheduler in (ScratchFlowMatchEulerScheduler(), FlowMatchEulerDiscreteScheduler()):
        ours = quiet(ScratchStableDiffusionImg2ImgPipeline(**components, scheduler=scheduler))
        assert np.abs(ours(**kwargs, generator=seeded()).images - expected).max() <= IMAGE_TOLERANCE


def test_callback_pred_original_sample_with_diffusers_flow_scheduler(components):
    """diffusers' flow scheduler returns no x̂_0: the pipeline derives x̂_0 = x_σ − σ v̂, equal to ours."""
    seen = {}

    def keep(name):
        def callback(pipe, step, timestep, tensors):
            seen.setdefault(name, []).append(tensors["pred_original_sample"])
            return {}

        return callback

    for name, scheduler in (
        ("ours", ScratchFlowMatchEulerScheduler()),
        ("diffusers", FlowMatchEulerDiscreteScheduler()),
    ):
        pipe = quiet(ScratchStableDiffusionPipeline(**components, scheduler=scheduler))
        pipe("a cat", num_inference_steps=3, generator=seeded(), callback_on_step_end=keep(name),
             callback_on_step_end_tensor_inputs=["pred_original_sample"])  # fmt: skip
    for ours, theirs in zip(seen["ours"], seen["diffusers"]):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_flow_pipeline_folder_loads_through_diffusion_pipeline(components, tmp_path):
    pipe = quiet(ScratchStableDiffusionPipeline(**components, scheduler=ScratchFlowMatchEulerScheduler(shift=3.0)))
    pipe.save_pretrained(tmp_path)
    loaded = quiet(DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True))
    assert type(loaded).__name__ == "ScratchStableDiffusionPipeline"
    assert type(loaded.scheduler) is ScratchFlowMatchEulerScheduler and loaded.scheduler.config.shift == 3.0
    kwargs = dict(prompt="a cat", num_inference_steps=3, output_type="np")
    assert np.abs(loaded(**kwargs, generator=seeded()).images - pipe(**kwargs, generator=seeded()).images).max() == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(sigmas=[5.0, 3.0, 1.0]), r"`sigmas` of a flow-family scheduler must lie in \[0, 1\]"),
     (dict(sigmas=[0.1, 0.5, 1.0]), "`sigmas` must be strictly decreasing"),
     (dict(timesteps=[500, -50]), r"`timesteps` of a flow-family scheduler must lie in \[0, 1000\]"),
     (dict(sigmas=[1.0, float("inf")]), "`sigmas` must hold finite numbers")],
)  # fmt: skip
def test_set_timesteps_refuses_custom_schedules_that_are_not_a_flow(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScratchFlowMatchEulerScheduler().set_timesteps(**kwargs)
