"""Training objectives for the latent-diffusion U-Net: from clean latents x_0 and noise ε, what the network sees, what
it regresses onto, how each sample is weighted, and which scheduler samples the model it trains.

| objective | forward process | network input, timestep | target | weight | sampler |
|---|---|---|---|---|---|
| `epsilon` | x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, t ~ U{0, T−1} | x_t, t | ε (Ho et al. 2020, Eq. 14) | 1, min-SNR | DDPM |
| `v_prediction` | the same | x_t, t | v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022) | 1 or min-SNR-γ | DDPM |
| `edm` | x = x_0 + σ ε, ln σ ~ N(P_mean, P_std²) | c_in(σ) x, c_noise(σ) | (x_0 − c_skip x) / c_out | 1 | EDM DPM++ |
| `flow_matching` | x_t = (1 − t) x_0 + t ε, t from a density | x_t, 1000 t | ε − x_0 | 1 | flow Euler |

Ho et al. 2020 is arXiv:2006.11239; Salimans & Ho 2022 (Sec. 4) arXiv:2202.00512.

EDM is Karras et al. 2022 (arXiv:2206.00364), Table 1: the denoiser D(x; σ) = c_skip x + c_out F(c_in x; c_noise)
with c_skip = σ_d² / (σ² + σ_d²), c_out = σ σ_d / √(σ² + σ_d²), c_in = 1 / √(σ² + σ_d²), c_noise = ¼ ln σ, trained with
λ(σ) ‖D − x_0‖², λ = (σ² + σ_d²) / (σ σ_d)² (Eq. 2 and 8). Rewritten for F, the loss is λ c_out² ‖F − (x_0 − c_skip x)
/ c_out‖², and λ c_out² = 1: every σ gets unit weight on the network's own output. These are the conventions of
diffusers' `EDMDPMSolverMultistepScheduler` (prediction type "epsilon"), which samples the result.

Flow matching is rectified flow (Liu et al. 2022, arXiv:2209.03003) with the time densities of Esser et al. 2024
(arXiv:2403.03206, Sec. 3.1, the Stable Diffusion 3 objective): logit-normal π(t) ∝ N(logit t; m, s) (Eq. 19) and the
"mode" density f(u) = 1 − u − s (cos²(πu/2) − 1 + u) (Eq. 20), with the flag names of diffusers' SD3 trainer
(`compute_density_for_timestep_sampling`); no output preconditioning, unit weight.

Every objective takes the same `ObjectiveOptions`, which its base class `Objective` applies: the noise it draws
(`Objective.noise`), the noise its network input is built from (`Objective.input_noise`), and its loss
(`Objective.loss`):

- `noise_offset`: ε + s·δ with one δ ~ N(0, 1) per sample and channel (offset noise, Guttenberg 2023, "Diffusion with
  Offset Noise"), so that the model can learn to change an image's mean brightness.
- `immiscible_noise` (Li et al. 2024, "Immiscible Diffusion", arXiv:2406.12303, Algorithm 1): each latent of a batch
  is paired with a noise draw by a linear assignment on their L2 distances, so that a noisy sample points back to a
  near latent.
- `input_perturbation` γ (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models",
  arXiv:2301.11706; diffusers' `--input_perturbation`): the network input is built from ε + γξ, ξ ~ N(0, I), while the
  target keeps ε, so that training sees inputs a little off the forward process, as sampling does. Not for EDM, whose
  target is built from the network input itself.
- `loss_type` "huber" with the "snr" schedule (Khrapov & Kotov 2024, arXiv:2403.16728): 2c(√(d² + c²) − c), where
  c = (1 − c_0) / (1 + σ/α)² + c_0 moves from L2 at low noise to L1-like at high noise.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hf_scratch.schedulers.ddpm import ScratchDDPMScheduler
from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler
from hf_scratch.schedulers.schedule import per_sample

OBJECTIVES = ("epsilon", "v_prediction", "edm", "flow_matching")
WEIGHTING_SCHEMES = ("logit_normal", "uniform", "mode")
LOSS_TYPES = ("l2", "huber")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
INPUT_PERTURBATION_NOT_EDM = (
    "--input_perturbation perturbs the noise of the network input while the target keeps the clean noise; edm's "
    "target (x_0 − c_skip x) / c_out is built from the network input itself, so there is no clean noise to keep: "
    "use --objective epsilon, v_prediction or flow_matching, or drop --input_perturbation"
)


@dataclass(frozen=True)
class ObjectiveOptions:
    """The noise and loss options every objective takes (the module docstring cites each one)."""

    noise_offset: float = 0.0  # s of ε + s·δ, δ ~ N(0, 1) per sample and channel
    immiscible_noise: bool = False  # pair the batch's noise with its latents by linear assignment
    input_perturbation: float = 0.0  # γ: the network input is built from ε + γξ, the target from ε
    loss_type: str = "l2"  # one of LOSS_TYPES
    huber_schedule: str = "snr"  # one of HUBER_SCHEDULES
    huber_c: float = 0.1  # c_0 of the pseudo-Huber loss


@dataclass
class TrainingTarget:
    """One batch, ready for the network: `loss = weights · mean((network(model_input, timesteps) − target)²)`.

    `noise_to_signal` is σ_t / α_t of each sample (the inverse square root of its SNR), the clock of the scheduled
    Huber loss.
    """

    model_input: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, C, H, W)
    weights: torch.Tensor  # (B,)
    noise_to_signal: torch.Tensor  # (B,)


class Objective:
    """What the objectives share: the noise they draw, the noise of the network input, and the loss.

    A subclass's `__call__(latents, noise) -> TrainingTarget` is its forward process; one training step reads
    `noise = objective.noise(latents)`, `batch = objective(latents, noise)`, `loss = objective.loss(prediction, batch)`.
    """

    # The "exponential" Huber schedule reads discrete timesteps t ∈ {0, …, T − 1}; only the DDPM chain has them.
    discrete_timesteps = False

    def __init__(self, options: ObjectiveOptions | None = None) -> None:
        self.options = options or ObjectiveOptions()

    @torch.no_grad()
    def noise(self, latents: torch.Tensor) -> torch.Tensor:
        """ε ~ N(0, I) shaped like `latents`, with the offset and the immiscible pairing of `options`."""
        noise = torch.randn_like(latents)
        if self.options.noise_offset:
            noise += self.options.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
        if self.options.immiscible_noise:
            noise = immiscible_noise(latents, noise)
        return noise

    def input_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The noise the network input is built from: ε + γξ, ξ ~ N(0, I), under input perturbation (Ning et al.
        2023), else ε itself, with no draw."""
        if not self.options.input_perturbation:
            return noise
        return noise + self.options.input_perturbation * torch.randn_like(noise)

    def loss(self, prediction: torch.Tensor, batch: TrainingTarget) -> torch.Tensor:
        """Mean over the batch of weight × the sample's L2 or pseudo-Huber loss of prediction − target."""
        options, c = self.options, None
        if options.loss_type == "huber":
            timesteps = batch.timesteps if self.discrete_timesteps else None
            c = huber_c(batch.noise_to_signal, options.huber_schedule, options.huber_c, timesteps=timesteps)
        return (per_sample_loss(prediction, batch.target, options.loss_type, c) * batch.weights).mean()


# ------------------------------------------------------------------------------------------------ DDPM: ε and v
def min_snr_weights(alphas_cumprod: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """min(SNR_t, γ) / SNR_t for ε, min(SNR_t, γ) / (SNR_t + 1) for v (Hang et al. 2023, arXiv:2303.09556, Eq. 9),
    with SNR_t = ᾱ_t / (1 − ᾱ_t); `alphas_cumprod` holds ᾱ_t of each sample."""
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)


class DDPMObjective(Objective):
    """ε- or v-prediction on the discrete variance-preserving chain of `scheduler` (its `prediction_type`)."""

    discrete_timesteps = True

    def __init__(
        self, scheduler: ScratchDDPMScheduler, snr_gamma: float | None = None, options: ObjectiveOptions | None = None
    ) -> None:
        super().__init__(options)
        self.scheduler = scheduler
        self.snr_gamma = snr_gamma

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor) -> TrainingTarget:
        batch = len(latents)
        input_noise = self.input_noise(noise)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), device=latents.device)
        alphas_cumprod = self.scheduler.alphas_cumprod.to(latents.device)[timesteps]
        noisy_latents = self.scheduler.add_noise(latents, input_noise, timesteps)  # z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε
        if self.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        weights = torch.ones(batch, device=latents.device)
        if self.snr_gamma is not None:
            weights = min_snr_weights(alphas_cumprod, self.scheduler.config.prediction_type, self.snr_gamma)
        noise_to_signal = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        return TrainingTarget(noisy_latents, timesteps, target, weights, noise_to_signal)

    def sampling_scheduler(self) -> ScratchDDPMScheduler:
        return self.scheduler


# ----------------------------------------------------------------------------------------------------------- EDM
def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> dict[str, torch.Tensor]:
    """c_skip, c_out, c_in, c_noise of Karras et al. 2022, Table 1 (column "ours"), and the loss weight λ (Eq. 8)."""
    return {
        "c_skip": sigma_data**2 / (sigma**2 + sigma_data**2),
        "c_out": sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt(),
        "c_in": 1 / (sigma**2 + sigma_data**2).sqrt(),
        "c_noise": sigma.log() / 4,
        "loss_weight": (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2,
    }


class EDMObjective(Objective):
    """Karras et al. 2022's preconditioned denoiser with log-normal σ (Table 1, Eq. 2–8).

    Defaults are the paper's pixel-space values (σ_d = 0.5, P_mean = −1.2, P_std = 1.2); EDM2 (Karras et al. 2024,
    arXiv:2312.02696) uses P_mean = −0.4, P_std = 1.0 for latents scaled to std 0.5. Latents scaled to std 1 take
    σ_d = 1 and P_mean shifted by ln 2.
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        options: ObjectiveOptions | None = None,
    ) -> None:
        super().__init__(options)
        if self.options.input_perturbation:
            raise ValueError(INPUT_PERTURBATION_NOT_EDM)
        for name, value in (("sigma_data", sigma_data), ("p_std", p_std), ("sigma_min", sigma_min)):
            if not value > 0:
                raise ValueError(f"EDM's {name} must be positive, got {value!r}")
        if not sigma_max > sigma_min:
            raise ValueError(f"EDM's sigma_max={sigma_max!r} must exceed sigma_min={sigma_min!r}")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor) -> TrainingTarget:
        sigma = (self.p_mean + self.p_std * torch.randn(len(latents), device=latents.device)).exp()  # ln σ ~ N
        coefficients = edm_preconditioning(sigma, self.sigma_data)
        c_skip, c_out, c_in = (per_sample(coefficients[name], latents.dim()) for name in ("c_skip", "c_out", "c_in"))
        noisy_latents = latents + per_sample(sigma, latents.dim()) * noise  # x = x_0 + σ ε
        return TrainingTarget(
            model_input=c_in * noisy_latents,
            timesteps=coefficients["c_noise"],
            target=(latents - c_skip * noisy_latents) / c_out,  # F's target, so that D = c_skip x + c_out F → x_0
            weights=coefficients["loss_weight"] * coefficients["c_out"] ** 2,  # = 1
            noise_to_signal=sigma,
        )

    def sampling_scheduler(self):
        from diffusers import EDMDPMSolverMultistepScheduler

        return EDMDPMSolverMultistepScheduler(
            sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data, prediction_type="epsilon"
        )


# ------------------------------------------------------------------------------------------------ flow matching
def sample_flow_timesteps(
    weighting_scheme: Literal["logit_normal", "uniform", "mode"],
    batch_size: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """t ∈ (0, 1) of each sample, from the density named by `weighting_scheme` (Esser et al. 2024, Sec. 3.1)."""
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, device=device))  # Eq. 19
    u = torch.rand(batch_size, device=device)
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)  # Eq. 20, the inverse CDF's sample
    if weighting_scheme == "uniform":
        return u
    raise ValueError(f"weighting_scheme={weighting_scheme!r} is not one of {list(WEIGHTING_SCHEMES)}")


class FlowMatchingObjective(Objective):
    """Rectified flow: x_t = (1 − t) x_0 + t ε, target the velocity ε − x_0, unit weight."""

    def __init__(
        self,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        num_train_timesteps: int = 1000,
        options: ObjectiveOptions | None = None,
    ) -> None:
        super().__init__(options)
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"--weighting_scheme={weighting_scheme!r} is not one of {list(WEIGHTING_SCHEMES)}")
        if weighting_scheme == "logit_normal" and not logit_std > 0:
            raise ValueError(f"--logit_std={logit_std!r} must be positive")
        if weighting_scheme == "mode" and not -1 <= mode_scale <= 2 / (math.pi - 2):
            # the density of Eq. 20 is non-negative only for −1 ≤ s ≤ 2 / (π − 2)
            raise ValueError(f"--mode_scale={mode_scale!r} must lie in [-1, {2 / (math.pi - 2):.3f}]")
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale, self.num_train_timesteps = mode_scale, num_train_timesteps

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor) -> TrainingTarget:
        input_noise = self.input_noise(noise)
        t = sample_flow_timesteps(
            self.weighting_scheme, len(latents), self.logit_mean, self.logit_std, self.mode_scale, latents.device
        )
        t_ = per_sample(t, latents.dim())
        return TrainingTarget(
            model_input=(1 - t_) * latents + t_ * input_noise,
            timesteps=t * self.num_train_timesteps,
            target=noise - latents,
            weights=torch.ones_like(t),
            noise_to_signal=t / (1 - t),
        )

    def sampling_scheduler(self) -> ScratchFlowMatchEulerScheduler:
        return ScratchFlowMatchEulerScheduler(num_train_timesteps=self.num_train_timesteps)


# ------------------------------------------------------------------------------------------- options for all of them
@torch.no_grad()
def immiscible_noise(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise` reordered so that latent i gets the draw that a minimum-cost assignment on the L2 distances
    ‖x_0^i − ε^j‖ gives it (Li et al. 2024, Algorithm 1). Each draw is still a standard normal tensor; only the
    pairing with the data changes."""
    distances = torch.cdist(latents.flatten(1).float(), noise.flatten(1).float())  # (B, B)
    _, assigned = linear_sum_assignment(distances.cpu().numpy())  # rows come back as 0 … B−1
    return noise[torch.from_numpy(assigned).to(noise.device)]


def huber_c(
    noise_to_signal: torch.Tensor,
    schedule: str,
    huber_c0: float,
    num_train_timesteps: int = 1000,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-sample c of the pseudo-Huber loss under diffusers' `--huber_schedule`: "snr" (1 − c_0)/(1 + σ/α)² + c_0,
    "exponential" c_0^(t / T) (needs the discrete `timesteps`), or "constant" c_0."""
    if schedule == "snr":
        return (1 - huber_c0) / (1 + noise_to_signal) ** 2 + huber_c0
    if schedule == "exponential":
        if timesteps is None:
            raise ValueError('--huber_schedule exponential needs discrete timesteps; use "snr" with this objective')
        return huber_c0 ** (timesteps.float() / num_train_timesteps)
    if schedule == "constant":
        return torch.full_like(noise_to_signal, huber_c0)
    raise ValueError(f"--huber_schedule={schedule!r} is not one of {list(HUBER_SCHEDULES)}")


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over each sample's elements of (prediction − target)², or of the pseudo-Huber 2c(√(d² + c²) − c)."""
    if loss_type == "l2":
        return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if loss_type == "huber":
        c = per_sample(huber_c, prediction.dim())
        difference = prediction.float() - target.float()
        return (2 * c * ((difference**2 + c**2).sqrt() - c)).flatten(1).mean(dim=1)
    raise ValueError(f"--loss_type={loss_type!r} is not one of {list(LOSS_TYPES)}")
