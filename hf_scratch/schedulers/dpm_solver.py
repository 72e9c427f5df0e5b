"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE in data prediction (Lu et al. 2022,
arXiv:2211.01095, Algorithm 2), optionally on the Karras et al. 2022 noise levels (arXiv:2206.00364, Eq. 5).

Matches diffusers' `DPMSolverMultistepScheduler` (0.42) step for step for algorithm_type "dpmsolver++", solver_order
1 or 2 and solver_type "midpoint", and loads its configuration, or any Stable Diffusion `scheduler_config.json`.
The configuration keeps every key of diffusers' class, so that configurations convert both ways; a setting this file
does not implement raises a ValueError naming it.
"""

from typing import Literal

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config

from .schedule import (
    BetaSchedule,
    NoiseScheduleMixin,
    PredictionType,
    ScratchSchedulerOutput,
    StepIndexMixin,
    TimestepSpacing,
    check_choice,
    check_num_inference_steps,
    predict_original_sample_and_noise,
    spaced_timesteps,
)

# a DDPM config's fixed variances mean, as None does, that the model output carries no variance channels
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_large")
KARRAS_RHO = 7.0  # ρ of Karras et al. 2022, Eq. 5


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(N − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … N − 1 (Karras et al. 2022, Eq. 5)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigma_to_timestep(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each σ, interpolating linearly in log σ between the two nearest t."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, N)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


class ScratchDPMSolverMultistepScheduler(StepIndexMixin, NoiseScheduleMixin, SchedulerMixin, ConfigMixin):
    """DPM-Solver++ multistep, order 1 (= DDIM) or 2 (2M), for the diffusion ODE of a model trained as a DDPM.

    The solver works in σ = √((1 − ᾱ_t) / ᾱ_t) and the half log-SNR λ = log(α_t / σ_t), with α_t = √ᾱ_t and
    σ_t = √(1 − ᾱ_t); it keeps the previous x̂_0 to form the second-order correction.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the forward process (see
            `schedule.make_betas`).
        solver_order: 1 or 2.
        prediction_type: what the model predicts: "epsilon" ε, "sample" x_0 or "v_prediction" v.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x̂_0.
        algorithm_type: only "dpmsolver++" is implemented; the others are accepted in a config and refused.
        solver_type: only "midpoint" is implemented.
        lower_order_final: take the last step at first order when there are fewer than 15 steps, which steadies
            few-step sampling.
        euler_at_final: always take the last step at first order.
        use_karras_sigmas: step on the Karras et al. 2022 noise levels (Eq. 5, ρ = 7) instead of the spaced timesteps.
        final_sigmas_type: σ after the last step: "zero" (land on x̂_0) or "sigma_min" (the σ of t = 0).
        lambda_min_clipped: drop the timesteps whose λ lies below this value (for the cosine schedule).
        variance_type: "learned" or "learned_range" for a model whose output also carries a variance, which the
            solver drops; None, or a DDPM config's "fixed_small" or "fixed_large", for a plain output.
        timestep_spacing, steps_offset: how `set_timesteps` picks its timesteps (see `schedule.spaced_timesteps`,
            whose `skip_zero` drops t = 0: the last step lands on σ = 0, or σ_min, itself).
        rescale_betas_zero_snr: rescale β_t to zero terminal SNR (Lin et al. 2023, Algorithm 1).
        use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas, use_flow_sigmas, flow_shift, use_dynamic_shifting,
            time_shift_type: diffusers' other noise levels, accepted in a config and refused when switched on.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: Literal["dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Literal["learned", "learned_range", "fixed_small", "fixed_large"] | None = None,
        timestep_spacing: TimestepSpacing = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
    ):
        check_choice("algorithm_type", algorithm_type, ("dpmsolver++",))
        check_choice("solver_order", solver_order, (1, 2))
        check_choice("solver_type", solver_type, ("midpoint",))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        unimplemented_options = {
            "use_exponential_sigmas": use_exponential_sigmas,
            "use_beta_sigmas": use_beta_sigmas,
            "use_lu_lambdas": use_lu_lambdas,
            "use_flow_sigmas": use_flow_sigmas,
            "use_dynamic_shifting": use_dynamic_shifting,
        }
        for option, value in unimplemented_options.items():
            check_choice(option, value, (False,))

        # forward process q(x_t | x_0) = N(α_t x_0, σ_t² I)
        self.set_forward_process()
        if rescale_betas_zero_snr:
            # ᾱ_T = 0 puts λ_T at −∞; a float32-sized ᾱ_T keeps the solver finite
            self.alphas_cumprod[-1] = 2**-24
        # half log-SNR λ_t = log α_t − log σ_t
        self.lambdas = torch.log(torch.sqrt(self.alphas_cumprod)) - torch.log(torch.sqrt(1 - self.alphas_cumprod))
        self.sigmas = None
        self.previous_pred_original_sample = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Chooses the timesteps and their σ_i, and appends the σ the last step lands on."""
        num_train_timesteps = self.config.num_train_timesteps
        check_num_inference_steps(num_inference_steps, num_train_timesteps)
        # σ_t = √((1 − ᾱ_t) / ᾱ_t) on the training chain
        train_sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        if self.config.use_karras_sigmas:
            # the σ_i come first, and each timestep is the (rounded) training t of its σ_i
            sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), num_inference_steps)
            timesteps = sigma_to_timestep(sigmas, np.log(train_sigmas))
            if self.config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            clipped_idx = torch.searchsorted(torch.flip(self.lambdas, [0]), self.config.lambda_min_clipped)
            last_timestep = (num_train_timesteps - clipped_idx).item()
            timesteps = spaced_timesteps(
                num_inference_steps,
                num_train_timesteps,
                self.config.timestep_spacing,
                self.config.steps_offset,
                last_timestep,
                skip_zero=True,
            )
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)

        if self.config.final_sigmas_type == "sigma_min":
            sigma_last = (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()
        else:
            sigma_last = 0.0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.previous_pred_original_sample = None
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: int | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The step index of `timestep`; of a repeated timestep, the second, so that a loop starting mid-schedule
        (image-to-image) does not skip a σ; the last index for a timestep not in the schedule."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        candidates = (schedule_timesteps == timestep).nonzero()
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return candidates[1 if len(candidates) > 1 else 0].item()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ScratchSchedulerOutput | tuple:
        """One step of DPM-Solver++(2M) from t_{i-1} to t_i (Lu et al. 2022, Algorithm 2). The first step, and the last
        when it lands on σ = 0 or `lower_order_final` applies, is the first-order update that opens Algorithm 2
        (DPM-Solver++(1), which is DDIM written in data prediction).

        Notation (Lu et al. 2022):
            sample                          x̃_{t_{i-1}}
            pred_original_sample            x_θ(x̃_{t_{i-1}}, t_{i-1}), the data prediction x̂_0
            previous_pred_original_sample   x_θ(x̃_{t_{i-2}}, t_{i-2})
            alpha_t, sigma_t                α_{t_i}, σ_{t_i}     (α_s0, σ_s0 at t_{i-1}; α_s1, σ_s1 at t_{i-2})
            lambda_t                        λ_{t_i} = log(α_{t_i} / σ_{t_i})
            h                               h_i = λ_{t_i} − λ_{t_{i-1}}
            r                               r_i = h_{i-1} / h_i
            D0, D1                          x_θ(t_{i-1}) and (x_θ(t_{i-1}) − x_θ(t_{i-2})) / r_i
            prev_sample                     x̃_{t_i}

        `generator` is accepted for a uniform pipeline call; the ODE solver draws no noise.
        """
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is not set: call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        is_last_step = i == len(self.timesteps) - 1
        first_order = (
            self.config.solver_order == 1
            or self.previous_pred_original_sample is None
            or (
                is_last_step
                and (
                    self.config.euler_at_final
                    or (self.config.lower_order_final and len(self.timesteps) < 15)
                    or self.config.final_sigmas_type == "zero"
                )
            )
        )

        # x_θ: the data prediction at σ_{t_{i-1}}, from whatever the model predicts
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        pred_original_sample, _ = predict_original_sample_and_noise(
            model_output, sample, alpha_s0, sigma_s0, self.config.prediction_type
        )
        pred_original_sample = self.bound_original_sample(pred_original_sample)

        sample = sample.to(torch.float32)  # the update in float32, as diffusers does: e^{−h} − 1 is small
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        D0 = pred_original_sample
        if first_order:
            # x̃_{t_i} = (σ_{t_i} / σ_{t_{i-1}}) x̃_{t_{i-1}} − α_{t_i} (e^{−h_i} − 1) x_θ(t_{i-1})  (Algorithm 2, i = 1)
            prev_sample = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r = (lambda_s0 - lambda_s1) / h
            D1 = (1.0 / r) * (D0 - self.previous_pred_original_sample)
            # x̃_{t_i} = (σ_{t_i} / σ_{t_{i-1}}) x̃_{t_{i-1}} − α_{t_i} (e^{−h_i} − 1) (D0 + D1 / 2)  (Algorithm 2)
            prev_sample = (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            )

        prev_sample = prev_sample.to(model_output.dtype)
        self.previous_pred_original_sample = pred_original_sample
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return ScratchSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (1 / √(σ² + 1), σ α_t), since σ = σ_t / α_t and α_t² + σ_t² = 1."""
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = α x_0 + σ ε at the solver's own σ_i of each timestep once `set_timesteps` has run, so that
        image-to-image starts exactly on the schedule (a Karras σ_i sits between training timesteps); before, the
        training ᾱ_t (DDPM Eq. 4)."""
        if self.sigmas is None:
            return super().add_noise(original_samples, noise, timesteps)
        alpha_t, sigma_t = self._alpha_sigma(self.sigma_per_sample(timesteps, original_samples))
        return alpha_t * original_samples + sigma_t * noise
