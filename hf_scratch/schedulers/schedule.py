"""The noise-schedule arithmetic and the scheduler API that the schedulers here share.

Small named functions, k-diffusion style, so that each scheduler's `step()` reads like its paper:

- β schedules: linear and scaled_linear (Rombach et al. 2022, arXiv:2112.10752), squaredcos_cap_v2 (Nichol & Dhariwal
  2021, arXiv:2102.09672, Eq. 17), and the zero-terminal-SNR rescale (Lin et al. 2023, arXiv:2305.08891, Algorithm 1);
- the timestep spacings "linspace", "leading" and "trailing" of Lin et al. 2023, Table 2;
- the closed form q(x_t | x_0) (Ho et al. 2020, arXiv:2006.11239, Eq. 4) and the velocity v of Salimans & Ho 2022
  (arXiv:2202.00512, Section 4);
- turning a model output (ε, v or x_0) into the pair (x_0, ε), and keeping x̂_0 in the data range; the flow's
  x̂_0 = x_σ − σ v̂; and `original_sample_of_step`, the x̂_0 of any diffusers-style scheduler's step, for pipelines;
- the mixins: `SchedulerBase` (every scheduler, the flow-matching one included), `NoiseScheduleMixin` (those of the
  ᾱ_t table: DDPM, DDIM, DPM-Solver++) and `StepIndexMixin` (those that step by position in a σ table: DPM-Solver++
  and flow matching), and `ScratchSchedulerOutput`, what every `step()` returns.

Every function reproduces diffusers 0.42 to the last float32 bit where diffusers computes the same quantity, so that a
pipeline can swap our schedulers and diffusers' freely. Throughout, ᾱ_t is `alphas_cumprod[t]`, and in the
variance-preserving notation of DPM-Solver α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t), so that x_t = α_t x_0 + σ_t ε.
"""

import importlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput

from hf_scratch.schedulers import scheduler_family

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


def check_custom_schedule(argument: str, values, family: str, num_train_timesteps: int | None) -> list[float]:
    """A custom `timesteps` / `sigmas` list as floats, refused by name unless it is finite, strictly decreasing (noise
    falls step by step) and in range for the scheduler's family: flow σ in [0, 1] and timesteps 1000·σ in
    [0, num_train_timesteps]; DDPM-family timesteps whole numbers in [0, num_train_timesteps − 1]; σ >= 0 otherwise."""
    listed = values.tolist() if hasattr(values, "tolist") else values
    numbers = isinstance(listed, (list, tuple)) and len(listed) > 0
    if not numbers or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in listed):
        raise TypeError(f"`{argument}` must be a non-empty list of numbers, got {values!r}.")
    listed = [float(v) for v in listed]
    if not all(math.isfinite(v) for v in listed):
        raise ValueError(f"`{argument}` must hold finite numbers, got {listed}.")
    if any(later >= earlier for earlier, later in zip(listed, listed[1:])):
        raise ValueError(
            f"`{argument}` must be strictly decreasing (from the noisiest step to the cleanest), got {listed}."
        )
    if argument == "sigmas":
        low, high = 0.0, 1.0 if family == "flow" else math.inf
    elif family == "ddpm" and num_train_timesteps is not None:
        low, high = 0.0, num_train_timesteps - 1.0
        if not all(v.is_integer() for v in listed):
            raise ValueError(f"`timesteps` of a {family}-family scheduler must be whole numbers, got {listed}.")
    else:
        low, high = 0.0, float(num_train_timesteps) if num_train_timesteps is not None else math.inf
    if listed[-1] < low or listed[0] > high:
        allowed = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"`{argument}` of a {family}-family scheduler must lie in {allowed}, got {listed}.")
    return listed


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
    num_inference_steps: int,
    num_train_timesteps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
    last_timestep: int | None = None,
    skip_zero: bool = False,
) -> np.ndarray:
    """N descending int64 timesteps below `last_timestep` (T by default, fewer when a solver clips its λ_t).

    "linspace" spreads them evenly over [0, last_timestep − 1]; "leading" takes multiples of last_timestep // N from 0
    and adds `steps_offset`; "trailing" steps back by T / N from last_timestep − 1. With `skip_zero`, for a solver
    whose last step lands on x_0 itself (DPM-Solver++), "linspace" and "leading" space N + 1 points and drop the one
    at t = 0; "trailing" only reaches t = 0 at N = T and is the same either way.
    """
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    last_timestep = num_train_timesteps if last_timestep is None else last_timestep
    if timestep_spacing == "trailing":
        step_ratio = num_train_timesteps / num_inference_steps
        return np.round(np.arange(last_timestep, 0, -step_ratio)).astype(np.int64) - 1
    num_points = num_inference_steps + 1 if skip_zero else num_inference_steps
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, num_points).round()[::-1]
    else:
        timesteps = (np.arange(0, num_points) * (last_timestep // num_points)).round()[::-1]
    timesteps = timesteps[:-1] if skip_zero else timesteps
    timesteps = timesteps.copy().astype(np.int64)
    return timesteps + steps_offset if timestep_spacing == "leading" else timesteps


# ---------------------------------------------------------------------------------------------------------------------
# The marginal q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
# ---------------------------------------------------------------------------------------------------------------------


def per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, …, 1) so that a per-sample coefficient broadcasts over a sample of `ndim` dimensions."""
    values = values.flatten()
    return values.reshape(values.shape + (1,) * (ndim - values.dim()))


def alpha_sigma_at(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) of each timestep as (B, 1, …, 1), on `like`'s device and dtype."""
    alphas_cumprod = alphas_cumprod.to(device=like.device, dtype=like.dtype)
    alpha_prod_t = alphas_cumprod[timesteps.to(like.device)]
    return per_sample(alpha_prod_t**0.5, like.dim()), per_sample((1 - alpha_prod_t) ** 0.5, like.dim())


def add_noise(
    alphas_cumprod: torch.Tensor, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM Eq. 4, reparametrised)."""
    sqrt_alpha_prod, sqrt_one_minus_alpha_prod = alpha_sigma_at(alphas_cumprod, timesteps, original_samples)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def get_velocity(
    alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, the v-prediction target (Salimans & Ho 2022, Section 4)."""
    sqrt_alpha_prod, sqrt_one_minus_alpha_prod = alpha_sigma_at(alphas_cumprod, timesteps, sample)
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


def flow_original_sample(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂_0 = x_σ − σ v̂ of a flow-matching model, from x_σ = x_0 + σ (ε − x_0) and v = ε − x_0 (Esser et al. 2024,
    arXiv:2403.03206, Eq. 3)."""
    return sample - sigma * velocity


def original_sample_of_step(
    scheduler, step_output: BaseOutput, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """x̂_0 of the step `scheduler.step(model_output, timestep, sample)` that returned `step_output`: the scheduler's
    own `pred_original_sample` where it reports one (ours all do), else derived. For the ᾱ_t family by the prediction
    type (`predict_original_sample_and_noise`); for the σ-parameterised families (`scheduler_family`), at the σ of the
    step just taken, EDM's D = c_skip x + c_out F (`precondition_outputs`) or the flow's x̂_0 = x_σ − σ v̂."""
    if getattr(step_output, "pred_original_sample", None) is not None:
        return step_output.pred_original_sample
    family = scheduler_family(scheduler)
    if family != "ddpm":
        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample)  # step() has moved on by one
        if family == "edm":
            return scheduler.precondition_outputs(sample, model_output, sigma)
        return flow_original_sample(sample, model_output, sigma)
    alpha_prod_t = scheduler.alphas_cumprod[int(timestep)].to(sample)
    pred_original_sample, _ = predict_original_sample_and_noise(
        model_output, sample, alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt(), scheduler.config.prediction_type
    )
    return pred_original_sample


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


@dataclass
class ScratchSchedulerOutput(BaseOutput):
    """What every scheduler's `step` returns.

    `prev_sample` is the sample at the next timestep, the next model input: x_{t'} (DDPM, DDIM), x̃_{t_i}
    (DPM-Solver++) or x_{σ'} (flow matching). `pred_original_sample` is x̂_0, the data prediction the step used, for
    previews and callbacks.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class SchedulerBase:
    """What every scheduler here shares with diffusers' API: one model call per step, x_T ~ N(0, I) and x_t fed to
    the model unscaled (unlike σ-parameterised schedulers such as Euler), and `len()` the training steps T."""

    order = 1
    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The model sees x_t itself."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class StepIndexMixin:
    """The step counter of schedulers whose `step` looks up its σ by position in `sigmas` (diffusers' `step_index`
    API); the class provides `timesteps`, `sigmas` and `index_for_timestep`."""

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

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        """Start counting at `begin_index`, else at the position of the first `timestep` stepped."""
        if self.begin_index is not None:
            self._step_index = self.begin_index
            return
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(self.timesteps.device)
        self._step_index = self.index_for_timestep(timestep)

    def sigma_per_sample(self, timesteps: float | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """σ of each of `timesteps` as (B, 1, …, 1), on `sample`'s device and dtype: looked up in the schedule, or, once
        `begin_index` is set (image-to-image), the σ of the step about to be taken."""
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        schedule_timesteps = self.timesteps.to(sample.device)
        if self.begin_index is None:
            step_indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        else:
            step_indices = [self.step_index if self.step_index is not None else self.begin_index] * len(timesteps)
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        return per_sample(sigmas[step_indices], sample.dim())


class NoiseScheduleMixin(SchedulerBase):
    """The forward process and the bookkeeping of the schedulers that read the ᾱ_t table: `set_forward_process` builds
    it from the config's β schedule.

    It also lets diffusers' `from_config` and `compatibles` resolve our class names, which diffusers alone looks up
    in its own namespace only. Put it before `SchedulerMixin` in the bases so that its `_get_compatibles` wins.
    """

    _compatibles = COMPATIBLE_SCHEDULERS

    def set_forward_process(self) -> None:
        """β_t (`make_betas`), α_t = 1 − β_t and ᾱ_t = ∏_{s ≤ t} α_s from the config: the forward process
        q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I) and its marginal q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I); and, until
        `set_timesteps`, the full chain T − 1, …, 0. Call it first in `__init__`, after `register_to_config`."""
        config = self.config
        check_choice("prediction_type", config.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
        self.betas = make_betas(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, config.num_train_timesteps)[::-1].copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Chooses the `num_inference_steps` timesteps to visit, spaced by `config.timestep_spacing`."""
        timesteps = spaced_timesteps(
            num_inference_steps, self.config.num_train_timesteps, self.config.timestep_spacing, self.config.steps_offset
        )
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def bound_original_sample(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        """x̂_0 kept in the data range: dynamic thresholding when `thresholding`, else clipping when the config has
        `clip_sample` on (DPM-Solver++'s has no such key)."""
        if self.config.thresholding:
            return threshold_sample(
                pred_original_sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value
            )
        if self.config.get("clip_sample", False):
            return pred_original_sample.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return pred_original_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Samples q(x_t | x_0) in closed form: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM Eq. 4)."""
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
        return get_velocity(self.alphas_cumprod, sample, noise, timesteps)

    @classmethod
    def _get_compatibles(cls) -> list:
        diffusers_library = importlib.import_module("diffusers")
        names = set([cls.__name__] + cls._compatibles)
        compatibles = [getattr(diffusers_library, name) for name in names if hasattr(diffusers_library, name)]
        for name, module in SCRATCH_SCHEDULERS.items():
            if name in names:
                compatibles.append(getattr(importlib.import_module(module), name))
        return compatibles
