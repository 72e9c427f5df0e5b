"""Tests for hf_scratch.schedulers: parity with diffusers 0.42, configuration round trips, errors and properties.

Parity tests run our scheduler and diffusers' side by side on the same configuration, the same model outputs and the
same generator seeds, and require a relative error (max |ours − theirs| / max |theirs|) of at most 1e-6 at every step.
"""

import json
import logging
import re
from contextlib import contextmanager

import diffusers
import pytest
import torch
from diffusers.pipelines.pipeline_loading_utils import (
    ALL_IMPORTABLE_CLASSES,
    _fetch_class_library_tuple,
    get_class_obj_and_candidates,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_scratch import ScratchDDIMScheduler, ScratchDDPMScheduler, ScratchDPMSolverMultistepScheduler

REL_TOL = 1e-6
SHAPE = (2, 4, 8, 8)

# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json
SD_V15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]

PAIRS = {
    "ddpm": (ScratchDDPMScheduler, diffusers.DDPMScheduler),
    "ddim": (ScratchDDIMScheduler, diffusers.DDIMScheduler),
    "dpm_solver": (ScratchDPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler),
}
OURS = [ScratchDDPMScheduler, ScratchDDIMScheduler, ScratchDPMSolverMultistepScheduler]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def fake_model(sample: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic stand-in for the U-Net: depends on x_t and on the step, like a real model output."""
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1000 + step))
    return 0.3 * sample + noise


def fake_model_with_variance(sample: torch.Tensor, step: int) -> torch.Tensor:
    """A prediction plus a variance output in (−1, 1) on a second set of channels, as for learned variances."""
    variance = torch.tanh(torch.randn(sample.shape, generator=torch.Generator().manual_seed(2000 + step)))
    return torch.cat([fake_model(sample, step), variance], dim=1)


def assert_step_parity(
    ours, theirs, num_inference_steps: int, step_kwargs=lambda step: {}, model=fake_model, compare_x0=True
):
    """Runs both schedulers on their own trajectories from the same x_T and compares every step."""
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    sample_ours = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sample_theirs = sample_ours.clone()
    for step, t in enumerate(ours.timesteps):
        out_ours = ours.step(model(sample_ours, step), t, sample_ours, **step_kwargs(step))
        out_theirs = theirs.step(model(sample_theirs, step), t, sample_theirs, **step_kwargs(step))
        assert relative_error(out_ours.prev_sample, out_theirs.prev_sample) <= REL_TOL, f"step {step}, t={int(t)}"
        if compare_x0:
            assert relative_error(out_ours.pred_original_sample, out_theirs.pred_original_sample) <= REL_TOL
        sample_ours, sample_theirs = out_ours.prev_sample, out_theirs.prev_sample
    assert torch.isfinite(sample_ours).all()


def seeded(step: int) -> dict:
    return {"generator": torch.Generator().manual_seed(step)}


# ---------------------------------------------------------------------------------------------------------------------
# Schedules and timesteps
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
@pytest.mark.parametrize(
    "betas",
    [SD_BETAS, {"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"}],
    ids=["scaled_linear", "linear", "squaredcos_cap_v2"],
)
def test_alphas_cumprod_match_diffusers(betas, rescale_betas_zero_snr):
    for ours_cls, theirs_cls in PAIRS.values():
        ours = ours_cls(**betas, rescale_betas_zero_snr=rescale_betas_zero_snr)
        theirs = theirs_cls(**betas, rescale_betas_zero_snr=rescale_betas_zero_snr)
        torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=REL_TOL, atol=0)
    if rescale_betas_zero_snr:
        assert ScratchDDIMScheduler(**betas, rescale_betas_zero_snr=True).alphas_cumprod[-1] == 0  # zero terminal SNR


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_timesteps_match_diffusers(name, spacing, steps_offset):
    ours_cls, theirs_cls = PAIRS[name]
    for num_inference_steps in (1, 3, 7, 50, 999):
        ours = ours_cls(**SD_BETAS, timestep_spacing=spacing, steps_offset=steps_offset)
        theirs = theirs_cls(**SD_BETAS, timestep_spacing=spacing, steps_offset=steps_offset)
        ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
        assert torch.equal(ours.timesteps, theirs.timesteps), num_inference_steps
        assert ours.timesteps.dtype == torch.int64


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("use_karras_sigmas", [False, True])
def test_dpm_solver_sigmas_match_diffusers(use_karras_sigmas, final_sigmas_type):
    kwargs = dict(SD_BETAS, use_karras_sigmas=use_karras_sigmas, final_sigmas_type=final_sigmas_type)
    for num_inference_steps in (1, 10, 25):
        ours, theirs = ScratchDPMSolverMultistepScheduler(**kwargs), diffusers.DPMSolverMultistepScheduler(**kwargs)
        ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
        assert torch.equal(ours.timesteps, theirs.timesteps)
        torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=REL_TOL, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Step parity
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_step_parity(prediction_type, spacing):
    kwargs = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    kwargs["clip_sample"] = False
    assert_step_parity(ScratchDDPMScheduler(**kwargs), diffusers.DDPMScheduler(**kwargs), 10, seeded)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_ddpm_variance_types_parity(variance_type):
    # linear β, clip_sample=True: diffusers' defaults, the pixel-space DDPM of the paper
    ours = ScratchDDPMScheduler(variance_type=variance_type)
    theirs = diffusers.DDPMScheduler(variance_type=variance_type)
    if variance_type == "learned":  # the second set of channels is σ_t² itself: keep it positive

        def model(sample, step):
            eps, variance = fake_model_with_variance(sample, step).chunk(2, dim=1)
            return torch.cat([eps, 0.01 * (1 + variance)], dim=1)

    elif variance_type == "learned_range":
        model = fake_model_with_variance
    else:
        model = fake_model
    assert_step_parity(ours, theirs, 10, seeded, model=model)


def test_ddpm_full_chain_without_set_timesteps_matches_diffusers():
    ours, theirs = ScratchDDPMScheduler(**SD_BETAS), diffusers.DDPMScheduler(**SD_BETAS)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in (999, 500, 1, 0):
        model_output = fake_model(sample, t)
        out_ours = ours.step(model_output, t, sample, **seeded(t))
        out_theirs = theirs.step(model_output, t, sample, **seeded(t))
        assert relative_error(out_ours.prev_sample, out_theirs.prev_sample) <= REL_TOL


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_parity(prediction_type, spacing, eta):
    kwargs = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    kwargs.update(clip_sample=False, set_alpha_to_one=False)
    assert_step_parity(
        ScratchDDIMScheduler(**kwargs), diffusers.DDIMScheduler(**kwargs), 10, lambda step: {"eta": eta, **seeded(step)}
    )


def test_ddim_variance_noise_and_clipped_model_output_parity():
    # clip_sample=True with a model output that pushes x̂_0 out of [−1, 1], so the clipping matters
    def step_kwargs(step):
        variance_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(step))
        return {"eta": 0.5, "variance_noise": variance_noise, "use_clipped_model_output": True}

    assert_step_parity(ScratchDDIMScheduler(), diffusers.DDIMScheduler(), 10, step_kwargs)


@pytest.mark.parametrize("use_karras_sigmas", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_dpm_solver_step_parity(prediction_type, spacing, use_karras_sigmas):
    kwargs = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    kwargs["use_karras_sigmas"] = use_karras_sigmas
    ours, theirs = ScratchDPMSolverMultistepScheduler(**kwargs), diffusers.DPMSolverMultistepScheduler(**kwargs)
    # diffusers returns no x̂_0 from this scheduler; prev_sample carries it
    assert_step_parity(ours, theirs, 10, compare_x0=False)


@pytest.mark.parametrize(
    "options",
    [
        {"solver_order": 1},
        {"final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"final_sigmas_type": "sigma_min", "euler_at_final": True},
        {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
    ],
    ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()),
)
@pytest.mark.parametrize("num_inference_steps", [5, 20])
def test_dpm_solver_options_parity(options, num_inference_steps):
    kwargs = dict(SD_BETAS, **options)
    ours, theirs = ScratchDPMSolverMultistepScheduler(**kwargs), diffusers.DPMSolverMultistepScheduler(**kwargs)
    assert_step_parity(ours, theirs, num_inference_steps, compare_x0=False)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_zero_terminal_snr_parity(name, spacing):
    # ᾱ_T = 0 leaves ε unable to give x̂_0 there: zero terminal SNR goes with v_prediction (Lin et al. 2023, 3.2)
    ours_cls, theirs_cls = PAIRS[name]
    kwargs = dict(SD_BETAS, prediction_type="v_prediction", timestep_spacing=spacing, rescale_betas_zero_snr=True)
    step_kwargs = seeded if name == "ddpm" else lambda step: {}
    assert_step_parity(ours_cls(**kwargs), theirs_cls(**kwargs), 10, step_kwargs, compare_x0=name != "dpm_solver")


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_thresholding_parity(name):
    ours_cls, theirs_cls = PAIRS[name]
    kwargs = {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}
    assert_step_parity(ours_cls(**kwargs), theirs_cls(**kwargs), 10, seeded)


# ---------------------------------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls", OURS)
def test_add_noise_and_get_velocity_match_diffusers(scheduler_cls):
    ours, theirs = scheduler_cls(**SD_BETAS), diffusers.DDPMScheduler(**SD_BETAS)
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(SHAPE, generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    timesteps = torch.tensor([0, 999])
    noisy = ours.add_noise(original, noise, timesteps)
    assert relative_error(noisy, theirs.add_noise(original, noise, timesteps)) <= REL_TOL
    assert (
        relative_error(ours.get_velocity(original, noise, timesteps), theirs.get_velocity(original, noise, timesteps))
        <= REL_TOL
    )
    assert len(ours) == 1000


@pytest.mark.parametrize("begin_index", [None, 3])
@pytest.mark.parametrize("use_karras_sigmas", [False, True])
def test_dpm_solver_add_noise_on_schedule_matches_diffusers(use_karras_sigmas, begin_index):
    # image-to-image noises the init latent to the σ of the first step it will take
    kwargs = dict(SD_BETAS, use_karras_sigmas=use_karras_sigmas)
    ours, theirs = ScratchDPMSolverMultistepScheduler(**kwargs), diffusers.DPMSolverMultistepScheduler(**kwargs)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
        if begin_index is not None:
            scheduler.set_begin_index(begin_index)
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(SHAPE, generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    timesteps = ours.timesteps[[3, 3]]
    noisy = ours.add_noise(original, noise, timesteps)
    assert relative_error(noisy, theirs.add_noise(original, noise, timesteps)) <= REL_TOL


# ---------------------------------------------------------------------------------------------------------------------
# Configuration: the Stable Diffusion v1.5 config, conversions both ways, compatibles, pipeline loading
# ---------------------------------------------------------------------------------------------------------------------


@contextmanager
def diffusers_warnings():
    """Collects the messages diffusers logs while the block runs (its logger does not propagate to pytest's)."""
    messages = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    library_logger = diffusers.utils.logging.get_logger("diffusers")
    library_logger.addHandler(handler)
    try:
        yield messages
    finally:
        library_logger.removeHandler(handler)


def assert_sd_schedule(scheduler):
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_start == 0.00085
    assert scheduler.config.beta_end == 0.012
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.cumprod(1 - expected, 0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scheduler_cls", OURS)
def test_loads_sd_v15_pndm_config_file(scheduler_cls, tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD_V15_SCHEDULER_CONFIG))
    with diffusers_warnings() as warnings:
        scheduler = scheduler_cls.from_pretrained(tmp_path)
        scheduler_cls.from_config({"bogus_key": 1})  # the one unknown key here, to show warnings are seen
    assert_sd_schedule(scheduler)
    assert scheduler.config.steps_offset == 1
    if "set_alpha_to_one" in scheduler.config:
        assert scheduler.config.set_alpha_to_one is False
    # PNDM's own keys (skip_prk_steps) are dropped silently, as between diffusers' schedulers
    unexpected = [message for message in warnings if "are not expected" in message]
    assert len(unexpected) == 1 and "bogus_key" in unexpected[0]


def test_sd_schedule_survives_every_conversion(tmp_path):
    """PNDM v1.5 config -> any of the six classes -> any of the six, in memory and through a saved file.

    In memory, `from_config` drops the values a source left at its defaults; scaled_linear/0.00085/0.012 are no
    defaults anywhere, and our defaults equal diffusers', so nothing may change on the way.
    """
    classes = OURS + [theirs for _, theirs in PAIRS.values()]
    pndm = diffusers.PNDMScheduler.from_config(SD_V15_SCHEDULER_CONFIG)
    sources = [pndm] + [source_cls.from_config(pndm.config) for source_cls in classes]
    with diffusers_warnings() as warnings:
        for index, source in enumerate(sources):
            source.save_config(tmp_path / str(index))
            for target_cls in classes:
                assert_sd_schedule(target_cls.from_config(source.config))
                loaded = target_cls.from_pretrained(tmp_path / str(index))
                assert_sd_schedule(loaded)
                assert loaded.config.steps_offset == 1
    assert not [message for message in warnings if "are not expected" in message]


@pytest.mark.parametrize("name", list(PAIRS))
def test_conversion_keeps_the_timesteps(name):
    ours_cls, theirs_cls = PAIRS[name]
    ours = ours_cls.from_config(diffusers.PNDMScheduler.from_config(SD_V15_SCHEDULER_CONFIG).config)
    theirs = theirs_cls.from_config(ours.config)
    for converted in (theirs, ours_cls.from_config(theirs.config)):
        ours.set_timesteps(7)
        converted.set_timesteps(7)
        assert torch.equal(ours.timesteps, converted.timesteps)


@pytest.mark.parametrize("name", list(PAIRS))
def test_defaults_equal_diffusers(name):
    ours_cls, theirs_cls = PAIRS[name]
    ours, theirs = dict(ours_cls().config), dict(theirs_cls().config)
    for key in ("_class_name", "_diffusers_version", "_use_default_values"):
        ours.pop(key, None)
        theirs.pop(key, None)
    assert ours == theirs


@pytest.mark.parametrize("scheduler_cls", OURS)
def test_compatibles_list_both_families(scheduler_cls):
    scheduler = scheduler_cls(**SD_BETAS)
    compatibles = set(scheduler.compatibles)
    expected = set(OURS) | {
        diffusers.DDPMScheduler,
        diffusers.DDIMScheduler,
        diffusers.PNDMScheduler,
        diffusers.DPMSolverMultistepScheduler,
        diffusers.EulerDiscreteScheduler,
    }
    assert expected <= compatibles
    # and diffusers' schedulers take our config as it is
    euler = diffusers.EulerDiscreteScheduler.from_config(scheduler.config)
    assert euler.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("scheduler_cls", OURS)
def test_pipeline_loader_finds_load_method(scheduler_cls):
    # what DiffusionPipeline.from_pretrained does with the entry it wrote to model_index.json
    library_name, class_name = _fetch_class_library_tuple(scheduler_cls())
    class_obj, candidates = get_class_obj_and_candidates(
        library_name, class_name, ALL_IMPORTABLE_CLASSES, diffusers.pipelines, False
    )
    assert class_obj is scheduler_cls
    load_methods = {ALL_IMPORTABLE_CLASSES[name][1] for name, c in candidates.items() if c and issubclass(class_obj, c)}
    assert load_methods == {"from_pretrained"}


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls", OURS)
@pytest.mark.parametrize(
    "argument, value",
    [("beta_schedule", "quadratic"), ("prediction_type", "flow"), ("timestep_spacing", "uniform")],
)
def test_unknown_option_names_argument_and_value(scheduler_cls, argument, value):
    with pytest.raises(ValueError, match=f"{argument}.*'{value}'"):
        scheduler_cls(**{argument: value})


@pytest.mark.parametrize("scheduler_cls", OURS)
@pytest.mark.parametrize("num_inference_steps", [0, 1001])
def test_num_inference_steps_out_of_range(scheduler_cls, num_inference_steps):
    with pytest.raises(ValueError, match=f"num_inference_steps.*{num_inference_steps}"):
        scheduler_cls().set_timesteps(num_inference_steps)


@pytest.mark.parametrize("scheduler_cls", [ScratchDDIMScheduler, ScratchDPMSolverMultistepScheduler])
def test_step_before_set_timesteps(scheduler_cls):
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler_cls().step(sample, 999, sample)


@pytest.mark.parametrize(
    "options",
    [
        {"algorithm_type": "sde-dpmsolver++"},
        {"solver_order": 3},
        {"solver_type": "heun"},
        {"use_exponential_sigmas": True},
    ],
)
def test_dpm_solver_refuses_unimplemented_options(options):
    ((argument, value),) = options.items()
    with pytest.raises(ValueError, match=re.escape(argument) + ".*" + re.escape(repr(value))):
        ScratchDPMSolverMultistepScheduler(**options)


def test_ddim_refuses_generator_with_variance_noise():
    scheduler = ScratchDDIMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="variance_noise"):
        scheduler.step(
            sample, scheduler.timesteps[0], sample, eta=1.0, generator=torch.Generator(), variance_noise=sample
        )


# ---------------------------------------------------------------------------------------------------------------------
# Full loops pinned to diffusers 0.42.1's results, and the DDPM reverse mean against the paper
# ---------------------------------------------------------------------------------------------------------------------

# Each loop: the v1.5 config, x_T = randn((1, 4, 8, 8)) seeded 0, `fake_model` outputs, 10 steps, generator seeded 7.
# The numbers are (sum |x_0|, mean x_0) from diffusers' own scheduler on the same loop.
PINNED_LOOPS = {
    "ddpm": (ScratchDDPMScheduler, {}, True, (796.08154296875, 0.19180803000926971)),
    "ddim": (ScratchDDIMScheduler, {}, False, (872.848876953125, 0.1748562753200531)),
    "ddim_eta1": (ScratchDDIMScheduler, {"eta": 1.0}, True, (801.401123046875, 0.19524095952510834)),
    "dpm_karras": (
        ScratchDPMSolverMultistepScheduler,
        {"use_karras_sigmas": True},
        False,
        (1149.6217041015625, 0.2092036008834839),
    ),
}


@pytest.mark.parametrize("name", list(PINNED_LOOPS))
def test_full_loop_matches_pinned_diffusers_result(name):
    scheduler_cls, options, uses_generator, (abs_sum, mean) = PINNED_LOOPS[name]
    config_options = {k: v for k, v in options.items() if k != "eta"}
    step_options = {k: v for k, v in options.items() if k == "eta"}
    if uses_generator:
        step_options["generator"] = torch.Generator().manual_seed(7)
    pndm = diffusers.PNDMScheduler.from_config(SD_V15_SCHEDULER_CONFIG)
    scheduler = scheduler_cls.from_config(pndm.config, **config_options)
    scheduler.set_timesteps(10)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for step, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(fake_model(sample, step), t, sample, **step_options).prev_sample
    assert sample.abs().sum().item() == pytest.approx(abs_sum, rel=1e-5)
    assert sample.mean().item() == pytest.approx(mean, rel=1e-5)


def test_ddpm_reverse_mean_is_eq_11_of_the_paper():
    """μ_θ = (x_t − β_t / √(1 − ᾱ_t) · ε_θ) / √α_t (Ho et al. 2020, Eq. 11), in float64 from the β_t alone."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    scheduler = ScratchDDPMScheduler(**SD_BETAS, clip_sample=False)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    seed_readme_differences = []
    for t in (999, 400, 20, 5):
        eps = fake_model(sample, t)
        prev_sample = scheduler.step(eps, t, sample, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        posterior_variance = (1 - alphas_cumprod[t - 1]) / (1 - alphas_cumprod[t]) * betas[t]
        eq_11_mean = (sample - betas[t] / (1 - alphas_cumprod[t]).sqrt() * eps) / alphas[t].sqrt()
        expected = eq_11_mean + posterior_variance.sqrt() * z
        assert relative_error(prev_sample.double(), expected) <= 1e-5
        seed_readme_mean = (sample - betas[t] / (1 - betas[t]).sqrt() * eps) / alphas[t].sqrt()
        seed_readme_differences.append(relative_error(seed_readme_mean + posterior_variance.sqrt() * z, expected))
    # the seed README's β_t / √(1 − β_t) is a different step, far from it where ᾱ_t is close to 1
    assert max(seed_readme_differences) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    beta_schedule=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    t=st.integers(0, 999),
)
def test_add_noise_preserves_unit_variance(beta_schedule, t):
    """q(x_t | x_0) is variance preserving: √ᾱ² + √(1 − ᾱ)² = 1, so unit-variance x_0 and ε give unit-variance x_t."""
    scheduler = ScratchDDPMScheduler(beta_schedule=beta_schedule)
    timesteps = torch.tensor([t])
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    signal_coeff = scheduler.add_noise(one, zero, timesteps)
    noise_coeff = scheduler.add_noise(zero, one, timesteps)
    assert (signal_coeff**2 + noise_coeff**2).item() == pytest.approx(1.0, abs=1e-6)
    generator = torch.Generator().manual_seed(t)
    original = torch.randn(1, 20000, generator=generator)
    noise = torch.randn(1, 20000, generator=generator)
    assert scheduler.add_noise(original, noise, timesteps).var().item() == pytest.approx(1.0, abs=0.05)


def marginal_coefficients(scheduler, step: int, timestep: torch.Tensor) -> tuple:
    """(α, σ) of the noise level at this step, and of the level the step goes to, with x = α x_0 + σ ε."""
    if isinstance(scheduler, ScratchDDIMScheduler):
        prev_t = int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alpha_prod = scheduler.alphas_cumprod[int(timestep)]
        alpha_prod_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        levels = [(alpha_prod.sqrt(), (1 - alpha_prod).sqrt()), (alpha_prod_prev.sqrt(), (1 - alpha_prod_prev).sqrt())]
    else:  # σ = σ_t / α_t
        sigmas = scheduler.sigmas[step : step + 2]
        levels = [(1 / (sigma**2 + 1).sqrt(), sigma / (sigma**2 + 1).sqrt()) for sigma in sigmas]
    return levels[0], levels[1]


@settings(max_examples=25, deadline=None)
@given(
    scheduler_cls=st.sampled_from([ScratchDDIMScheduler, ScratchDPMSolverMultistepScheduler]),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    spacing=st.sampled_from(SPACINGS),
    num_inference_steps=st.integers(1, 60),
)
def test_perfect_model_stays_on_the_forward_marginal(scheduler_cls, prediction_type, spacing, num_inference_steps):
    """Given the true ε (or x_0, or v), deterministic DDIM (Eq. 12 with σ_t = 0) and DPM-Solver++ (whose D1 is then 0)
    carry x = α x_0 + σ ε exactly to the next noise level. Tolerance 1e-4: float32 arithmetic, amplified by 1/α_T."""
    options = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    if scheduler_cls is ScratchDDIMScheduler:
        options["clip_sample"] = False
    scheduler = scheduler_cls(**options)
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(num_inference_steps)
    original = torch.randn(1, 4, 4, 4, generator=generator)
    noise = torch.randn(1, 4, 4, 4, generator=generator)
    for step, t in enumerate(scheduler.timesteps):
        (alpha, sigma), (alpha_next, sigma_next) = marginal_coefficients(scheduler, step, t)
        target = {"epsilon": noise, "sample": original, "v_prediction": alpha * noise - sigma * original}
        prev_sample = scheduler.step(target[prediction_type], t, alpha * original + sigma * noise).prev_sample
        assert relative_error(prev_sample, alpha_next * original + sigma_next * noise) <= 1e-4
