"""DDIM: denoising diffusion implicit models (Song et al. 2020, arXiv:2010.02502).

Matches diffusers' `DDIMScheduler` (0.42) step for step, and loads its configuration, or any Stable Diffusion
`scheduler_config.json`, unchanged.
"""

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
    predict_original_sample_and_noise,
)


class ScratchDDIMScheduler(NoiseScheduleMixin, SchedulerMixin, ConfigMixin):
    """The non-Markovian sampler of DDIM: a model trained as a DDPM, sampled in few steps.

    `eta` = 0 gives the deterministic implicit model, `eta` = 1 the DDPM posterior variance (Song et al. 2020, Eq. 16).
    One step goes from t to t' = t − T // num_inference_steps.

    Args:
        num_train_timesteps: T, the length of the training chain.
        beta_start, beta_end, beta_schedule, trained_betas: the β_t of the forward process (see `schedule.make_betas`).
        clip_sample, clip_sample_range: clamp x̂_0 to [−range, range].
        set_alpha_to_one: the ᾱ of the step past t = 0: 1 if True, else ᾱ_0 (Stable Diffusion uses False).
        steps_offset: added to "leading" timesteps (Stable Diffusion uses 1).
        prediction_type: what the model predicts: "epsilon" ε, "sample" x_0 or "v_prediction" v.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x̂_0 instead of clipping.
        timestep_spacing: how `set_timesteps` picks its timesteps (see `schedule.spaced_timesteps`).
        rescale_betas_zero_snr: rescale β_t to zero terminal SNR (Lin et al. 2023, Algorithm 1); pair it with
            v_prediction, since ε cannot give x̂_0 at ᾱ_T = 0.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self.set_forward_process()
        # ᾱ past the last step t = 0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ScratchSchedulerOutput | tuple:
        """One generalised step x_t → x_{t'} (Song et al. 2020, Eq. 12).

        Notation (Song et al. 2020; their α_t is DDPM's ᾱ_t):
            sample                      x_t
            model_output                ε_θ(x_t), or v̂ or x̂_0 by `prediction_type`
            alpha_prod_t                ᾱ_t
            alpha_prod_t_prev           ᾱ_{t'}
            pred_original_sample        x̂_0, "predicted x_0"
            pred_epsilon                ε̂
            std_dev_t                   σ_t(η)
            pred_sample_direction       √(1 − ᾱ_{t'} − σ_t²) ε̂, "direction pointing to x_t"
            prev_sample                 x_{t'}

        Args:
            eta: η of Eq. 16; 0 is deterministic DDIM, 1 is DDPM's posterior variance.
            use_clipped_model_output: recompute ε̂ from the clipped x̂_0, so that the step stays consistent.
            generator: draws z for η > 0.
            variance_noise: z itself, instead of drawing it (for methods such as CycleDiffusion).
        """
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is not set: call `set_timesteps` before `step`.")
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass either `generator` or `variance_noise`, not both.")

        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        # 1. x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t, "predicted x_0"                            (Eq. 12)
        pred_original_sample, pred_epsilon = predict_original_sample_and_noise(
            model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5, self.config.prediction_type
        )

        # 2. keep x̂_0 in the data range
        pred_original_sample = self.bound_original_sample(pred_original_sample)

        # 3. σ_t(η) = η √((1 − ᾱ_{t'}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t'})                        (Eq. 16)
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance**0.5

        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5

        # 4. x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z                            (Eq. 12)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return ScratchSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
