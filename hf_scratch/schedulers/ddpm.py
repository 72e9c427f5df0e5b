"""DDPM: ancestral sampling from the learned reverse process (Ho et al. 2020, arXiv:2006.11239).

Matches diffusers' `DDPMScheduler` (0.42) step for step for the variance types implemented here, and loads its
configuration, or any Stable Diffusion `scheduler_config.json`, unchanged.
"""

from typing import Literal

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .schedule import (
    BetaSchedule,
    NoiseScheduleMixin,
    PredictionType,
    ScratchSchedulerOutput,
    TimestepSpacing,
    check_choice,
    predict_original_sample_and_noise,
)

# None is how a DPM-Solver config records "no learned variance"; it reads as fixed_small, as in diffusers
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range", None)


class ScratchDDPMScheduler(NoiseScheduleMixin, SchedulerMixin, ConfigMixin):
    """Denoising diffusion probabilistic models: x_{t-1} ~ p_θ(x_{t-1} | x_t) = N(μ_θ(x_t, t), σ_t² I).

    The reverse mean is the posterior mean of q(x_{t-1} | x_t, x_0) (Eq. 7) at the predicted x̂_0 (Eq. 15), which equals
    Eq. 11, μ_θ = (x_t − β_t / √(1 − ᾱ_t) · ε_θ) / √α_t: the noise term is scaled by the noise level √(1 − ᾱ_t) of x_t.
    Going through x̂_0 lets one step serve every `prediction_type` and clip x̂_0 before it is used.

    With fewer inference steps than training steps, one step jumps from t to the previous timestep t' of the schedule,
    and the one-step α_t becomes ᾱ_t / ᾱ_{t'}; without `set_timesteps` it walks the full chain t → t − 1.

    Args:
        num_train_timesteps: T, the length of the training chain.
        beta_start, beta_end, beta_schedule, trained_betas: the β_t of the forward process (see `schedule.make_betas`).
        variance_type: σ_t² of the reverse step: "fixed_small" β̃_t (the posterior variance), "fixed_large" β_t (both
            Section 3.2), "learned" (the model's second half of channels is σ_t²), "learned_range" (it interpolates
            log β̃_t and log β_t, Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 15). None, as a DPM-Solver config
            records it, reads as "fixed_small".
        clip_sample, clip_sample_range: clamp x̂_0 to [−range, range].
        prediction_type: what the model predicts: "epsilon" ε, "sample" x_0 or "v_prediction" v.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x̂_0 instead of clipping.
        timestep_spacing, steps_offset: how `set_timesteps` picks its timesteps (see `schedule.spaced_timesteps`).
        rescale_betas_zero_snr: rescale β_t to zero terminal SNR (Lin et al. 2023, Algorithm 1).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: Literal["fixed_small", "fixed_large", "learned", "learned_range"] | None = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self.set_forward_process()

    def previous_timestep(self, timestep: int) -> int:
        """t', the timestep after t in the schedule (t − 1 on the full chain); −1 past the last step."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = int((self.timesteps == timestep).nonzero(as_tuple=True)[0][0])
        return int(self.timesteps[index + 1]) if index < len(self.timesteps) - 1 else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ScratchSchedulerOutput | tuple:
        """One ancestral step x_t → x_{t'} (Algorithm 2 of Ho et al. 2020, with t' = t − 1 on the full chain).

        Notation (Ho et al. 2020):
            sample                      x_t
            model_output                ε_θ(x_t, t), or v̂ or x̂_0 by `prediction_type`
            alpha_prod_t                ᾱ_t
            alpha_prod_t_prev           ᾱ_{t'}  (1 past the last step)
            current_alpha_t             α_t = ᾱ_t / ᾱ_{t'}, the α of one jump
            current_beta_t              β_t = 1 − α_t
            pred_original_sample        x̂_0
            pred_prev_sample            μ̃_t(x_t, x̂_0), the posterior mean
            posterior_variance          β̃_t
            std_dev_t                   σ_t
            prev_sample                 x_{t'}
        """
        t = int(timestep)
        prev_t = self.previous_timestep(t)

        if self.config.variance_type in ("learned", "learned_range") and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # 1. x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t                                         (Eq. 15)
        pred_original_sample, _ = predict_original_sample_and_noise(
            model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5, self.config.prediction_type
        )

        # 2. keep x̂_0 in the data range
        pred_original_sample = self.bound_original_sample(pred_original_sample)

        # 3. μ̃_t = √ᾱ_{t'} β_t / (1 − ᾱ_t) · x̂_0 + √α_t (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t   (Eq. 7; with Eq. 15, Eq. 11)
        pred_original_sample_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 4. x_{t'} = μ̃_t + σ_t z, z ~ N(0, I), and no noise on the last step (t = 0)     (Algorithm 2, lines 3-4)
        prev_sample = pred_prev_sample
        if t > 0:
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            std_dev_t = self._std_dev(current_beta_t, beta_prod_t, beta_prod_t_prev, predicted_variance)
            prev_sample = pred_prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return ScratchSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _std_dev(
        self,
        current_beta_t: torch.Tensor,
        beta_prod_t: torch.Tensor,
        beta_prod_t_prev: torch.Tensor,
        predicted_variance: torch.Tensor | None,
    ) -> torch.Tensor:
        """σ_t of the reverse step, by `config.variance_type`."""
        # posterior q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (Eq. 6), β̃_t = (1 − ᾱ_{t-1}) / (1 − ᾱ_t) · β_t (Eq. 7),
        # clamped so that its log stays finite
        posterior_variance = torch.clamp(beta_prod_t_prev / beta_prod_t * current_beta_t, min=1e-20)
        variance_type = self.config.variance_type
        if variance_type in ("fixed_small", None):
            return posterior_variance**0.5
        if variance_type == "fixed_large":
            return current_beta_t**0.5
        if predicted_variance is None:
            raise ValueError(
                f"variance_type={variance_type!r} needs a model_output with twice the sample's channels "
                "(the prediction, then the variance)."
            )
        if variance_type == "learned":
            return predicted_variance**0.5
        # learned_range: log σ_t² = v log β_t + (1 − v) log β̃_t, v = (output + 1) / 2 (Nichol & Dhariwal 2021, Eq. 15)
        frac = (predicted_variance + 1) / 2
        log_variance = frac * torch.log(current_beta_t) + (1 - frac) * torch.log(posterior_variance)
        return torch.exp(0.5 * log_variance)
