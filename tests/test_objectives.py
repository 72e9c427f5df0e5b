"""The training objectives' mathematics, each against an independent computation: the papers' closed forms, diffusers'
EDM and flow schedulers, and diffusers' SD3 timestep sampler."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EDMDPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from scipy import stats

from hf_scratch import objectives
from hf_scratch.schedulers.ddpm import ScratchDDPMScheduler

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def latents_and_noise(batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 4, 8, 8, generator=generator)


# ------------------------------------------------------------------------------------------------------------ EDM
def test_edm_coefficients_at_known_sigmas():
    """Karras et al. 2022, Table 1, at σ = σ_d (where c_skip = 1/2) and in the limits σ → 0 and σ → ∞."""
    sigma_data = 0.5
    at_data = objectives.edm_preconditioning(torch.tensor([sigma_data], dtype=torch.float64), sigma_data)
    assert at_data["c_skip"].item() == pytest.approx(0.5)
    assert at_data["c_out"].item() == pytest.approx(sigma_data / math.sqrt(2))
    assert at_data["c_in"].item() == pytest.approx(1 / (sigma_data * math.sqrt(2)))
    assert at_data["c_noise"].item() == pytest.approx(math.log(sigma_data) / 4)
    assert at_data["loss_weight"].item() == pytest.approx(2 / sigma_data**2)
    small, large = (objectives.edm_preconditioning(torch.tensor([s], dtype=torch.float64), sigma_data)
                    for s in (1e-6, 1e6))  # fmt: skip
    assert small["c_skip"].item() == pytest.approx(1.0) and small["c_out"].item() == pytest.approx(1e-6, rel=1e-3)
    assert large["c_skip"].item() == pytest.approx(0.0, abs=1e-12) and large["c_out"].item() == pytest.approx(
        sigma_data
    )
    sigmas = torch.logspace(-3, 2, 50, dtype=torch.float64)
    coefficients = objectives.edm_preconditioning(sigmas, sigma_data)
    torch.testing.assert_close(coefficients["loss_weight"] * coefficients["c_out"] ** 2, torch.ones_like(sigmas))


def test_edm_coefficients_equal_diffusers_edm_scheduler():
    scheduler = EDMDPMSolverMultistepScheduler(sigma_data=1.0, prediction_type="epsilon")
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0])
    coefficients = objectives.edm_preconditioning(sigma, 1.0)
    sample, model_output = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    per_sample = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(scheduler.precondition_noise(sigma), coefficients["c_noise"])
    torch.testing.assert_close(
        scheduler.precondition_inputs(sample, per_sample), coefficients["c_in"].reshape(-1, 1, 1, 1) * sample
    )
    denoised = scheduler.precondition_outputs(sample, model_output, per_sample)
    expected = (
        coefficients["c_skip"].reshape(-1, 1, 1, 1) * sample + coefficients["c_out"].reshape(-1, 1, 1, 1) * model_output
    )
    torch.testing.assert_close(denoised, expected)


def test_edm_target_makes_diffusers_denoiser_return_the_clean_latents():
    """A network that outputs the EDM target exactly gives D(x; σ) = x_0 under diffusers' preconditioning."""
    torch.manual_seed(0)
    latents, noise = latents_and_noise()
    objective = objectives.EDMObjective(sigma_data=1.0, p_mean=0.29, p_std=1.0)
    batch = objective(latents, noise)
    sigma = (4 * batch.timesteps).exp()  # c_noise = ¼ ln σ
    scheduler = objective.sampling_scheduler()
    noisy = batch.model_input / objectives.edm_preconditioning(sigma, 1.0)["c_in"].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, latents + sigma.reshape(-1, 1, 1, 1) * noise, rtol=1e-5, atol=1e-5)
    denoised = scheduler.precondition_outputs(noisy, batch.target, sigma.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(denoised, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch.weights, torch.ones(len(latents)))


def test_edm_sigma_is_log_normal():
    torch.manual_seed(0)
    objective = objectives.EDMObjective(p_mean=-1.2, p_std=1.2)
    log_sigma = (4 * objective(*latents_and_noise(batch=4000)).timesteps).double().numpy()
    assert stats.kstest(log_sigma, stats.norm(loc=-1.2, scale=1.2).cdf).pvalue > 1e-3


def test_edm_refuses_impossible_settings():
    with pytest.raises(ValueError, match="sigma_data"):
        objectives.EDMObjective(sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        objectives.EDMObjective(sigma_min=1.0, sigma_max=0.5)


# ---------------------------------------------------------------------------------------------------- flow matching
@pytest.mark.parametrize(
    "scheme, options",
    [("logit_normal", dict(logit_mean=0.0, logit_std=1.0)), ("logit_normal", dict(logit_mean=0.5, logit_std=0.7)),
     ("mode", dict(mode_scale=1.29)), ("uniform", {})],
)  # fmt: skip
def test_flow_timestep_densities_equal_diffusers_sd3_sampler(scheme, options):
    """Two-sample Kolmogorov–Smirnov test of our draws against diffusers' `compute_density_for_timestep_sampling`."""
    torch.manual_seed(0)
    ours = objectives.sample_flow_timesteps(scheme, 20000, **options).numpy()
    theirs = compute_density_for_timestep_sampling(
        scheme if scheme != "uniform" else "none", 20000, generator=torch.Generator().manual_seed(1),
        logit_mean=options.get("logit_mean"), logit_std=options.get("logit_std"), mode_scale=options.get("mode_scale"),
    ).numpy()  # fmt: skip
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    assert ((0 <= ours) & (ours <= 1)).all()


def test_logit_normal_density_matches_its_closed_form():
    """π(t) = N(logit t; m, s) / (t (1 − t)) (Esser et al. 2024, Eq. 19): its CDF is Φ((logit t − m) / s)."""
    torch.manual_seed(0)
    draws = objectives.sample_flow_timesteps("logit_normal", 20000, logit_mean=0.3, logit_std=0.8).double().numpy()
    cdf = lambda t: stats.norm.cdf((np.log(t / (1 - t)) - 0.3) / 0.8)  # noqa: E731
    assert stats.kstest(draws, cdf).pvalue > 1e-3


def test_flow_matching_target_is_the_velocity_of_diffusers_flow():
    """x_t from the objective equals diffusers' `scale_noise` at the same σ, and one Euler step of diffusers' scheduler
    with the target as the model output lands on x_0."""
    latents, noise = latents_and_noise(batch=1)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(1)  # σ: 1 → 0
    torch.manual_seed(0)
    objective = objectives.FlowMatchingObjective("uniform")
    batch = objective(latents, noise)
    t = batch.timesteps / 1000
    torch.testing.assert_close(batch.model_input, (1 - t) * latents + t * noise)
    torch.testing.assert_close(batch.target, noise - latents)
    # at σ = 1 (the first sampling step) the objective's x_1 is ε, and Euler with v = ε − x_0 reaches x_0
    prev = scheduler.step(noise - latents, scheduler.timesteps[0], noise).prev_sample
    torch.testing.assert_close(prev, latents, rtol=1e-5, atol=1e-5)
    assert scheduler.scale_noise(latents, scheduler.timesteps[:1], noise).equal(noise)


def test_flow_matching_refuses_a_mode_scale_without_a_density():
    with pytest.raises(ValueError, match="mode_scale"):
        objectives.FlowMatchingObjective("mode", mode_scale=3.0)


# ------------------------------------------------------------------------------------------------------ ε and v
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_objective_targets_equal_diffusers_forward_process(prediction_type):
    ours = ScratchDDPMScheduler(**SD_BETAS, prediction_type=prediction_type)
    reference = DDPMScheduler(**SD_BETAS, prediction_type=prediction_type)
    latents, noise = latents_and_noise()
    torch.manual_seed(0)
    batch = objectives.DDPMObjective(ours, snr_gamma=5.0)(latents, noise)
    t = batch.timesteps
    torch.testing.assert_close(batch.model_input, reference.add_noise(latents, noise, t))
    expected = noise if prediction_type == "epsilon" else reference.get_velocity(latents, noise, t)
    torch.testing.assert_close(batch.target, expected)
    # min-SNR-5 (Hang et al. 2023, Eq. 9), written out: SNR = ᾱ / (1 − ᾱ)
    alpha_bar = reference.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(batch.weights.double(), weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(batch.noise_to_signal.double(), (1 / snr).sqrt(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------- immiscible noise
def test_immiscible_pairing_shortens_distances_and_keeps_the_draws():
    generator = torch.Generator().manual_seed(0)
    shorter = []
    for _ in range(20):
        latents = torch.randn(32, 4, 8, 8, generator=generator) * 0.5 + 0.3
        noise = torch.randn(32, 4, 8, 8, generator=generator)
        paired = objectives.immiscible_noise(latents, noise)
        random_distance = (latents - noise).flatten(1).norm(dim=1).mean()
        assigned_distance = (latents - paired).flatten(1).norm(dim=1).mean()
        shorter.append(assigned_distance < random_distance)
        # a permutation of the same draws: each noise tensor is one of the standard normal draws, unchanged
        assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))
    assert all(shorter)


def test_immiscible_noise_values_stay_standard_normal():
    generator = torch.Generator().manual_seed(1)
    pooled = []
    for _ in range(10):
        latents = torch.randn(16, 4, 4, 4, generator=generator) + 1.0
        pooled.append(objectives.immiscible_noise(latents, torch.randn(16, 4, 4, 4, generator=generator)))
    values = torch.cat(pooled).flatten().double().numpy()
    assert stats.kstest(values, stats.norm.cdf).pvalue > 1e-3


# --------------------------------------------------------------------------------------------- pseudo-Huber loss
def test_pseudo_huber_loss_values():
    """2c(√(d² + c²) − c): 0 at d = 0, 8 at d = 3 with c = 4 (√25 = 5), ≈ d² for |d| ≪ c, ≈ 2c|d| for |d| ≫ c."""

    def loss(d: float, c: float) -> float:
        return objectives.per_sample_loss(
            torch.full((1, 1, 1, 1), d), torch.zeros(1, 1, 1, 1), "huber", torch.tensor([c])
        ).item()

    assert loss(0.0, 0.5) == 0.0
    assert loss(3.0, 4.0) == pytest.approx(8.0)
    assert loss(0.05, 1.0) == pytest.approx(0.05**2, rel=1e-3)
    assert loss(100.0, 0.01) == pytest.approx(2 * 0.01 * 100, rel=1e-3)


def test_huber_snr_schedule_moves_from_l2_to_l1():
    """c = (1 − c₀)/(1 + σ/α)² + c₀: 1 without noise, c₀ in the limit of pure noise (diffusers' research example)."""
    c = objectives.huber_c(torch.tensor([0.0, 1.0, 1e6]), "snr", 0.1)
    torch.testing.assert_close(c, torch.tensor([1.0, 0.9 / 4 + 0.1, 0.1]))
    assert objectives.huber_c(
        torch.zeros(1), "exponential", 0.1, timesteps=torch.tensor([1000])
    ).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="exponential"):
        objectives.huber_c(torch.zeros(1), "exponential", 0.1)


# ---------------------------------------------------------------------------------- options shared by every objective
def objective_named(name: str, options: objectives.ObjectiveOptions | None = None) -> objectives.Objective:
    if name == "flow_matching":
        return objectives.FlowMatchingObjective("uniform", options=options)
    return objectives.DDPMObjective(ScratchDDPMScheduler(**SD_BETAS, prediction_type=name), 5.0, options=options)


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "flow_matching"])
def test_input_perturbation_perturbs_the_input_and_keeps_the_target(name):
    """Ning et al. 2023 as diffusers' train_text_to_image.py does it: ξ ~ N(0, I) is drawn first, the network input is
    the forward process applied to ε + γξ, and the target is the one of the clean ε. With γ = 0 nothing is drawn and
    the batch is the unperturbed one."""
    latents, noise = latents_and_noise()
    torch.manual_seed(0)
    plain = objective_named(name)(latents, noise)
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    off = objective_named(name, objectives.ObjectiveOptions(input_perturbation=0.0))(latents, noise)
    assert torch.rand(1).equal(after_plain)  # γ = 0 draws nothing
    for field in ("model_input", "timesteps", "target", "weights", "noise_to_signal"):
        assert getattr(off, field).equal(getattr(plain, field))

    gamma = 0.1
    torch.manual_seed(0)
    batch = objective_named(name, objectives.ObjectiveOptions(input_perturbation=gamma))(latents, noise)
    torch.manual_seed(0)
    perturbed = noise + gamma * torch.randn_like(noise)
    if name == "flow_matching":
        t = (batch.timesteps / 1000).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(batch.model_input, (1 - t) * latents + t * perturbed)
        torch.testing.assert_close(batch.target, noise - latents)
    else:
        reference = DDPMScheduler(**SD_BETAS, prediction_type=name)
        torch.testing.assert_close(batch.model_input, reference.add_noise(latents, perturbed, batch.timesteps))
        clean = noise if name == "epsilon" else reference.get_velocity(latents, noise, batch.timesteps)
        torch.testing.assert_close(batch.target, clean)
    assert not batch.model_input.equal(plain.model_input)


def test_edm_refuses_input_perturbation_by_name():
    with pytest.raises(ValueError, match="--input_perturbation .* edm's target"):
        objectives.EDMObjective(options=objectives.ObjectiveOptions(input_perturbation=0.1))


def test_noise_offset_adds_one_draw_per_sample_and_channel():
    latents = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(0)
    noise = objectives.FlowMatchingObjective(options=objectives.ObjectiveOptions(noise_offset=0.05)).noise(latents)
    torch.manual_seed(0)
    expected = torch.randn(3, 4, 8, 8) + 0.05 * torch.randn(3, 4, 1, 1)
    assert noise.equal(expected)


def test_the_loss_is_the_weighted_mean_and_the_exponential_huber_schedule_needs_discrete_timesteps():
    """`Objective.loss` = mean of weight × per-sample loss; the "exponential" c_0^(t/T) of the Huber loss reads the
    DDPM chain's integer timesteps, and the continuous objectives refuse it."""
    latents, noise = latents_and_noise()
    prediction = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    huber = objectives.ObjectiveOptions(loss_type="huber", huber_schedule="exponential", huber_c=0.1)
    torch.manual_seed(0)
    ddpm = objective_named("epsilon", huber)
    batch = ddpm(latents, noise)
    c = (0.1 ** (batch.timesteps.double() / 1000)).reshape(-1, 1, 1, 1)
    difference = (prediction - batch.target).double()
    per_sample = 2 * c * ((difference**2 + c**2).sqrt() - c)
    expected = (per_sample.flatten(1).mean(dim=1) * batch.weights.double()).mean()
    torch.testing.assert_close(ddpm.loss(prediction, batch).double(), expected, rtol=1e-5, atol=0)

    l2 = objective_named("flow_matching")
    batch = l2(latents, noise)
    expected = ((prediction - batch.target) ** 2).flatten(1).mean(dim=1).mul(batch.weights).mean()
    torch.testing.assert_close(l2.loss(prediction, batch), expected)
    flow = objective_named("flow_matching", huber)
    with pytest.raises(ValueError, match="exponential needs discrete timesteps"):
        flow.loss(prediction, flow(latents, noise))
