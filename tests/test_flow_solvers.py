"""Higher-order flow solvers of `hf_scratch.schedulers.SCHEDULERS`: "flow-heun" (diffusers' FlowMatchHeunDiscrete),
"flow-dpm++" (DPM-Solver++ 2M) and "flow-unipc" (UniPC), the latter two diffusers' classes on the flow's σ with
velocity outputs.

Each test checks against an independent computation: Heun against the closed-form solution of an ODE its trapezoid
rule integrates exactly (to 1e-5), the registry's DPM-Solver++ / UniPC against diffusers' classes built by hand (exact),
our pipeline against a hand-written loop (1e-5), and every solver at 4 and 16 steps against a fine Euler run of the
shipped model.
"""

import re

import pytest
import torch
from _tiny import sd_ddim, tiny_components
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from hf_scratch import default_model_path
from hf_scratch.pipelines import ScratchStableDiffusionPipeline
from hf_scratch.schedulers import SCHEDULERS, family_of, make_scheduler, scheduler_family, scheduler_name
from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOLVERS = ("flow-heun", "flow-dpm++", "flow-unipc")
MULTISTEP = {"flow-dpm++": DPMSolverMultistepScheduler, "flow-unipc": UniPCMultistepScheduler}
# What the registry entries stand for, written out once more by hand.
HAND_OPTIONS = {
    "flow-dpm++": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "flow-unipc": {"solver_order": 2},
}
SHAPE = (2, 4, 8, 8)


def hand_built(name: str, shift: float) -> object:
    """diffusers' class of `name` with the flow options spelled out, not read from the registry."""
    return MULTISTEP[name](
        num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
        final_sigmas_type="zero", **HAND_OPTIONS[name],
    )  # fmt: skip


def sample_flow(scheduler, velocity, sample: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dσ = velocity(x, timestep) with `scheduler`, as a pipeline's loop calls it."""
    scheduler.set_timesteps(steps)
    for timestep in scheduler.timesteps:
        sample = scheduler.step(velocity(sample, timestep), timestep, sample).prev_sample
    return sample


# ------------------------------------------------------------------------------------------------ the registry


@pytest.mark.parametrize("name", SOLVERS)
def test_registry_round_trip_and_family(name):
    """Built from the shipped model's own flow config (and a shifted one), each solver is named back, is a flow
    scheduler by instance, config and name, carries the model's shift, and converts to every other flow solver."""
    shipped = ScratchFlowMatchEulerScheduler.from_pretrained(default_model_path(), subfolder="scheduler").config
    for config in (shipped, ScratchFlowMatchEulerScheduler(shift=3.0).config):
        scheduler = make_scheduler(name, config)
        assert scheduler_name(scheduler) == name
        assert family_of(name) == scheduler_family(scheduler) == scheduler_family(scheduler.config) == "flow"
        assert scheduler.config.get("flow_shift", scheduler.config.get("shift")) == config["shift"]
        for other in SCHEDULERS:
            if family_of(other) == "flow":
                converted = make_scheduler(other, scheduler.config)
                assert scheduler_name(converted) == other
                assert converted.config.get("flow_shift", converted.config.get("shift")) == config["shift"]


def test_class_alone_stays_ddpm_and_diffusers_entries_keep_their_names():
    """The fixed options make the flow entries flow; the classes at their defaults and the plain diffusers entries
    stay DDPM-family, and a DDPM-family DPM-Solver / UniPC is still called by its old name."""
    assert scheduler_family(DPMSolverMultistepScheduler) == scheduler_family(UniPCMultistepScheduler) == "ddpm"
    assert family_of("diffusers-dpm++") == family_of("diffusers-unipc") == "ddpm"
    assert scheduler_name(make_scheduler("diffusers-dpm++", sd_ddim().config)) == "diffusers-dpm++"
    assert scheduler_name(make_scheduler("diffusers-unipc", sd_ddim().config)) == "diffusers-unipc"
    assert scheduler_family({"prediction_type": "flow_prediction", "beta_start": 0.00085}) == "flow"


@pytest.mark.parametrize("name", SOLVERS)
def test_flow_solver_is_refused_for_a_ddpm_model(name):
    with pytest.raises(ValueError, match=rf"{re.escape(repr(name))} samples flow models, .* trained as a ddpm model"):
        make_scheduler(name, sd_ddim().config)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_schedule_ends_at_zero_and_the_model_sees_about_1000_sigma(name, steps):
    """Every schedule ends at σ = 0 and starts within 1e-3 of σ = 1 (pure noise). Heun's timesteps are 1000·σ exactly;
    diffusers' DPM-Solver / UniPC round them down to integers, so the model sees ⌊1000·σ⌋, less than one of 1000 off."""
    scheduler = make_scheduler(name, ScratchFlowMatchEulerScheduler().config)
    scheduler.set_timesteps(steps)
    assert scheduler.sigmas[-1] == 0 and scheduler.sigmas[0] >= 0.999
    if name == "flow-heun":
        assert len(scheduler.timesteps) == 2 * steps - 1  # a second evaluation on every step but the last
        # timestep i is taken at σ_i: the first-order half at sigmas[i], the correction at the σ it stepped to
        assert torch.equal(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    else:
        assert len(scheduler.timesteps) == steps
        offset = scheduler.sigmas[:-1].double() * 1000 - scheduler.timesteps.double()
        assert ((offset >= 0) & (offset < 1)).all()
        assert scheduler.init_noise_sigma == 1.0
        sample = torch.randn(SHAPE)
        assert torch.equal(scheduler.scale_model_input(sample, scheduler.timesteps[0]), sample)


# ------------------------------------------------------------------------------------------------ the solvers


@pytest.mark.parametrize("steps", [2, 3, 10])
def test_heun_is_exact_for_a_velocity_linear_in_sigma(steps):
    """v(x, σ) = a + b σ: dx/dσ does not depend on x, so x(0) = x(1) − a − b/2, and Heun's trapezoid rule is exact on
    every step. The last step is Euler's from σ_min = 1e-3 to 0, off by |b| σ_min² / 2 < 1e-5 (so at least 2 steps:
    one step is Euler's alone). The velocity is float64, which the step computes in: in float32 Heun's correction at
    σ_min, v = (x − (x − σ v)) / σ, loses about 1e-4 to cancellation."""
    generator = torch.Generator().manual_seed(0)
    a, b, noise = (torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(3))

    def velocity(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return a + b * (timestep / 1000)  # the model reads σ as timestep / 1000

    scheduler = make_scheduler("flow-heun", ScratchFlowMatchEulerScheduler().config)
    actual = sample_flow(scheduler, velocity, noise, steps)
    torch.testing.assert_close(actual, noise - a - b / 2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MULTISTEP)
@pytest.mark.parametrize("steps", [1, 2, 5, 16])
def test_registry_multistep_solvers_step_as_diffusers_class_by_hand(name, steps):
    """A velocity nonlinear in x and σ; the registry's scheduler and the hand-built one give identical samples."""
    generator = torch.Generator().manual_seed(1)
    weight, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)

    def velocity(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return torch.tanh(weight * sample) + torch.cos(timestep / 300)

    for shift in (1.0, 3.0):
        config = ScratchFlowMatchEulerScheduler(shift=shift).config
        actual = sample_flow(make_scheduler(name, config), velocity, noise, steps)
        expected = sample_flow(hand_built(name, shift), velocity, noise, steps)
        assert torch.equal(actual, expected)


@pytest.fixture(scope="module")
def tiny_flow_pipeline():
    """A tiny random U-Net (with the rest of a pipeline) on the flow's Euler scheduler."""
    pipe = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=ScratchFlowMatchEulerScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", SOLVERS)
def test_pipeline_equals_a_hand_written_loop(tiny_flow_pipeline, name):
    """Our pipeline with the registry's solver equals the U-Net called in a loop by hand with diffusers' scheduler
    (hand-built for DPM-Solver++ / UniPC): start from ε itself, feed x_σ unscaled, classifier-free guidance w = 3."""
    pipe, steps, guidance_scale = tiny_flow_pipeline, 5, 3.0
    pipe.scheduler = make_scheduler(name, ScratchFlowMatchEulerScheduler().config)
    generator = torch.Generator().manual_seed(2)
    text, uncond = torch.randn(2, 1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    noise = torch.randn(pipe.latent_shape(1, 64, 64), generator=generator)
    actual = pipe(prompt_embeds=text, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=steps,
                  guidance_scale=guidance_scale, height=64, width=64, output_type="latent").images  # fmt: skip

    scheduler = hand_built(name, 1.0) if name in MULTISTEP else type(pipe.scheduler)()
    embeds = torch.cat([uncond, text])

    def velocity(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pred_uncond, pred_text = pipe.unet(
                torch.cat([sample] * 2), timestep, encoder_hidden_states=embeds
            ).sample.chunk(2)
        return pred_uncond + guidance_scale * (pred_text - pred_uncond)

    expected = sample_flow(scheduler, velocity, noise, steps)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def shipped_pipeline():
    pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_solvers_converge_to_a_fine_euler_run_of_the_shipped_model(shipped_pipeline):
    """Latent RMS error against 64 Euler steps of the shipped model (one prompt, guidance 4): smaller at 16 steps than
    at 4 for every solver, and at 16 steps within what 16 Euler steps reach (measured: Euler 0.07; Heun, UniPC 0.03)."""
    pipe, own = shipped_pipeline, shipped_pipeline.scheduler.config
    noise = torch.randn(pipe.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0))

    def latents(name: str, steps: int) -> torch.Tensor:
        pipe.scheduler = make_scheduler(name, own)
        return pipe("a red heart", latents=noise, num_inference_steps=steps, guidance_scale=4.0,
                    output_type="latent").images  # fmt: skip

    try:
        reference = latents("flow-euler", 64)
        euler_error = (latents("flow-euler", 16) - reference).pow(2).mean().sqrt()
        for name in SOLVERS:
            errors = [(latents(name, steps) - reference).pow(2).mean().sqrt() for steps in (4, 16)]
            assert errors[1] < errors[0] / 2, (name, errors)
            assert errors[1] < 1.2 * euler_error, (name, errors, euler_error)
    finally:
        pipe.scheduler = make_scheduler("flow-euler", own)
