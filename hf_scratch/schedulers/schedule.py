"""The noise-schedule arithmetic that the DDPM, DDIM and DPM-Solver++ schedulers share.

Small named functions, k-diffusion style, so that each scheduler's `step()` reads like its paper:

- β schedules: linear and scaled_linear (Rombach et al. 2022, arXiv:2112.10752), squaredcos_cap_v2 (Nichol & Dhariwal
  2021, arXiv:2102.09672, Eq. 17), and the zero-terminal-SNR rescale (Lin et al. 2023, arXiv:2305.08891, Algorithm 1);
- the timestep spacings "linspace", "leading" and "trailing" of Lin et al. 2023, Table 2;
- the closed form q(x_t | x_0) (Ho et al. 2020, arXiv:2006.11239, Eq. 4) and the velocity v of Salimans & Ho 2022
  (arXiv:2202.00512, Section 4);
- turning a model output (ε, v or x_0) into the pair (x_0, ε).

Every function reproduces diffusers 0.42 to the last float32 bit where diffusers computes the same quantity, so that a
pipeline can swap our schedulers and diffusers' freely. Throughout, ᾱ_t is `alphas_cumprod[t]`, and in the
variance-preserving notation of DPM-Solver α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t), so that x_t = α_t x_0 + σ_t ε.
"""

import importlib
import math
from typing import Literal

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
TimestepSpacing = Literal["linspace", "leading", "trailing"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
# Stable Diffusion's training schedule (Rombach et al. 2022, the v1 configs): β_t "scaled linear" from 0.00085 to 0.012
# over T = 1000 steps, i.e. √β_t linear in t.
STABLE_DIFFUSION_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

# Our schedulers, by the module that defines each: `from_config` resolves compatible names through this table.
SCRATCH_SCHEDULERS = {
    "ScratchDDPMScheduler": "hf_scratch.schedulers.ddpm",
    "ScratchDDIMScheduler": "hf_scratch.schedulers.ddim",
    "ScratchDPMSolverMultistepScheduler": "hf_scratch.schedulers.dpm_solver",
}
# Every scheduler that reads the same ᾱ_t table: diffusers' own family and ours.
COMPATIBLE_SCHEDULERS = [scheduler.name for scheduler in KarrasDiffusionSchedulers] + list(SCRATCH_SCHEDULERS)


def check_choice(argument: str, value, allowed) -> None:
    """Raises a ValueError naming the argument, the value received and the values allowed."""
    if value not in allowed:
        raise ValueError(f"`{argument}` must be one of {list(allowed)}, got {value!r}.")


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be between 1 and num_train_timesteps={num_train_timesteps}, "
            f"got {num_inference_steps}."
        )


# ---------------------------------------------------------------------------------------------------------------------
# β schedules: the forward process q(x_t | x_{t-1}) = N(√(1 − β_t) x_{t-1}, β_t I)
# ---------------------------------------------------------------------------------------------------------------------


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 − ᾱ(t+1)/ᾱ(t) with ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008 (Nichol & Dhariwal 2021, Eq. 17)."""

    def alpha_bar(time: float) -> float:
        return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shifts and scales √ᾱ_t so that √ᾱ_T = 0 while √ᾱ_1 is kept (Lin et al. 2023, Algorithm 1)."""
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    sqrt_alphas_cumprod_first = sqrt_alphas_cumprod[0].clone()
    sqrt_alphas_cumprod_last = sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod -= sqrt_alphas_cumprod_last
    sqrt_alphas_cumprod *= sqrt_alphas_cumprod_first / (sqrt_alphas_cumprod_first - sqrt_alphas_cumprod_last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[0:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """β_1 … β_T in float32, as diffusers builds them."""
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        # linear in √β: the schedule Stable Diffusion was trained with
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(num_train_timesteps)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


# ---------------------------------------------------------------------------------------------------------------------
# Inference timesteps: which t ∈ {0, …, T−1} the sampler visits (Lin et al. 2023, Table 2)
# ---------------------------------------------------------------------------------------------------------------------


def spaced_timesteps(
    num_inference_steps: int, num_train_timesteps: int, timestep_spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """Descending int64 timesteps. "leading" starts from 0 and adds `steps_offset`; "trailing" ends at T − 1."""
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if timestep_spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if timestep_spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        return timesteps + steps_offset
    step_ratio = num_train_timesteps / num_inference_steps
    return np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1


# ---------------------------------------------------------------------------------------------------------------------
# The marginal q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
# ---------------------------------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, …, 1) so that a per-sample coefficient broadcasts over a sample of `ndim` dimensions."""
    values = values.flatten()
    return values.reshape(values.shape + (1,) * (ndim - values.dim()))


def add_noise(
    alphas_cumprod: torch.Tensor, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM Eq. 4, reparametrised)."""
    alphas_cumprod = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    alpha_prod_t = alphas_cumprod[timesteps.to(original_samples.device)]
    sqrt_alpha_prod = _per_sample(alpha_prod_t**0.5, original_samples.dim())
    sqrt_one_minus_alpha_prod = _per_sample((1 - alpha_prod_t) ** 0.5, original_samples.dim())
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def get_velocity(
    alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, the v-prediction target (Salimans & Ho 2022, Section 4)."""
    alphas_cumprod = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    alpha_prod_t = alphas_cumprod[timesteps.to(sample.device)]
    sqrt_alpha_prod = _per_sample(alpha_prod_t**0.5, sample.dim())
    sqrt_one_minus_alpha_prod = _per_sample((1 - alpha_prod_t) ** 0.5, sample.dim())
    return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample


def predict_original_sample_and_noise(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from what the model predicts, given x_t = α_t x_0 + σ_t ε with α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t).

    epsilon: x̂_0 = (x_t − σ_t ε̂) / α_t (DDPM Eq. 15).  sample: ε̂ = (x_t − α_t x̂_0) / σ_t.
    v_prediction: x̂_0 = α_t x_t − σ_t v̂ and ε̂ = α_t v̂ + σ_t x_t (Salimans & Ho 2022, Section 4).
    """
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output, alpha_t * model_output + sigma_t * sample
    raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")


def threshold_sample(sample: torch.Tensor, dynamic_thresholding_ratio: float, sample_max_value: float) -> torch.Tensor:
    """Dynamic thresholding of x̂_0 (Saharia et al. 2022, arXiv:2205.11487, Section 2.3).

    s is the `dynamic_thresholding_ratio` quantile of |x̂_0| per sample, clamped to [1, sample_max_value]; x̂_0 is
    clipped to [−s, s] and divided by s. Meant for pixel-space models, not for latent diffusion.
    """
    dtype = sample.dtype
    batch_size, channels, *remaining_dims = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # quantile needs a float32 or float64 input
    flat = sample.reshape(batch_size, channels * int(np.prod(remaining_dims)))
    s = torch.quantile(flat.abs(), dynamic_thresholding_ratio, dim=1).clamp(min=1, max=sample_max_value)
    s = s.unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(batch_size, channels, *remaining_dims).to(dtype)


class StepIndexMixin:
    """The step counter of schedulers whose `step` looks up its σ by position (diffusers' `step_index` API)."""

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """The index of the next step in `timesteps`, once stepping has begun."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step index, when the loop starts mid-schedule (image-to-image); set by `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index


class NoiseScheduleMixin:
    """The forward process and the bookkeeping every scheduler here shares; the class provides `alphas_cumprod`.

    It also lets diffusers' `from_config` and `compatibles` resolve our class names, which diffusers alone looks up
    in its own namespace only. Put it before `SchedulerMixin` in the bases so that its `_get_compatibles` wins.
    """

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """These schedulers feed x_t to the model unscaled (unlike σ-parameterised ones such as Euler)."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Chooses the `num_inference_steps` timesteps to visit, spaced by `config.timestep_spacing`."""
        timesteps = spaced_timesteps(
            num_inference_steps, self.config.num_train_timesteps, self.config.timestep_spacing, self.config.steps_offset
        )
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def bound_original_sample(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        """x̂_0 kept in the data range: dynamic thresholding when `thresholding`, else clipping when `clip_sample`."""
        if self.config.thresholding:
            return threshold_sample(
                pred_original_sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value
            )
        if self.config.clip_sample:
            return pred_original_sample.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return pred_original_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Samples q(x_t | x_0) in closed form: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM Eq. 4)."""
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
        return get_velocity(self.alphas_cumprod, sample, noise, timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def _get_compatibles(cls) -> list:
        diffusers_library = importlib.import_module("diffusers")
        names = set([cls.__name__] + cls._compatibles)
        compatibles = [getattr(diffusers_library, name) for name in names if hasattr(diffusers_library, name)]
        for name, module in SCRATCH_SCHEDULERS.items():
            if name in names:
                compatibles.append(getattr(importlib.import_module(module), name))
        return compatibles
