"""Euler sampling of a rectified-flow / flow-matching model (Liu et al. 2022, arXiv:2209.03003; Lipman et al. 2023,
arXiv:2210.02747; Esser et al. 2024, arXiv:2403.03206, the objective of Stable Diffusion 3).

The forward process is the straight line between data and noise,

    x_t = (1 − σ) x_0 + σ ε,   σ = t ∈ [0, 1]                                   (Esser et al. Eq. 3, rectified flow)

and the model predicts its velocity v = dx_t/dσ = ε − x_0. Sampling integrates the ODE dx/dσ = v̂(x, σ) from σ = 1
(pure noise) to σ = 0 with Euler steps. The model sees the timestep 1000·σ, as in diffusers.

Matches diffusers' `FlowMatchEulerDiscreteScheduler` (0.42) step for step, with the same config keys, so either class
loads the other's `scheduler_config.json`. Unlike diffusers' class it also offers `init_noise_sigma`,
`scale_model_input`, `add_noise` and `pred_original_sample`, so that pipelines written for DDPM-family schedulers
(diffusers' `StableDiffusionPipeline` and its img2img among them) run a flow model unchanged.
"""

import math
from typing import Literal

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .schedule import (
    SchedulerBase,
    ScratchSchedulerOutput,
    StepIndexMixin,
    check_choice,
    check_custom_schedule,
    check_num_inference_steps,
    flow_original_sample,
)

TIME_SHIFT_TYPES = ("exponential", "linear")


def shift_sigmas(sigmas: np.ndarray | torch.Tensor, shift: float) -> np.ndarray | torch.Tensor:
    """σ' = s σ / (1 + (s − 1) σ): more of the schedule at high noise for s > 1 (Esser et al. 2024, Sec. 5.3.2)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class ScratchFlowMatchEulerScheduler(StepIndexMixin, SchedulerBase, SchedulerMixin, ConfigMixin):
    """Euler steps x_{σ'} = x_σ + (σ' − σ) v̂ along the flow from σ = 1 to σ = 0.

    Args:
        num_train_timesteps: the model's timestep is `num_train_timesteps · σ`.
        shift: the static shift s of `shift_sigmas` (1 leaves the schedule linear in σ).
        use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type: a shift
            chosen per call from `mu` (Esser et al. 2024, Sec. 5.3.2, as in FLUX): σ' = e^μ / (e^μ + (1/σ − 1))
            ("exponential") or μ / (μ + (1/σ − 1)) ("linear").
        shift_terminal: stretch the shifted schedule so that its last σ equals this value.
        stochastic_sampling: instead of the Euler step, re-noise x̂_0 to the next σ with fresh noise.
        invert_sigmas, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: diffusers' options for other model
            families; kept as config keys for compatibility, refused when set.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
    ):
        check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        for name in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if self.config[name]:
                raise ValueError(
                    f"`{name}=True` is not supported by ScratchFlowMatchEulerScheduler; use diffusers' "
                    "FlowMatchEulerDiscreteScheduler, which loads the same config."
                )
        if shift <= 0:
            raise ValueError(f"`shift` must be positive, got {shift!r}.")
        # The training grid σ = 1, 1 − 1/T, …, 1/T (shifted), as diffusers lays it out.
        sigmas = torch.from_numpy(
            np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        sigmas = sigmas / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift_sigmas(sigmas, shift)
        self.sigmas = sigmas
        self.timesteps = sigmas * num_train_timesteps
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.num_inference_steps = None

    # ------------------------------------------------------------------ bookkeeping shared with diffusers' API

    def time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
        """The dynamic shift of the class docstring."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return mu / (mu + (1 / sigmas - 1))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """The σ visited by sampling: `num_inference_steps` values from σ_max to σ_min, linear in the model's timestep
        and then shifted, or the given `sigmas` / `timesteps`; a final σ = 0 is appended."""
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed to `set_timesteps` when `use_dynamic_shifting=True`.")
        T = self.config.num_train_timesteps
        if sigmas is not None:
            sigmas = check_custom_schedule("sigmas", sigmas, "flow", T)
        if timesteps is not None:
            timesteps = check_custom_schedule("timesteps", timesteps, "flow", T)
        custom = sigmas if sigmas is not None else timesteps
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"`sigmas` ({len(sigmas)}) and `timesteps` ({len(timesteps)}) differ in length.")
        if num_inference_steps is None:
            if custom is None:
                raise ValueError("Pass `num_inference_steps`, `sigmas` or `timesteps` to `set_timesteps`.")
            num_inference_steps = len(custom)
        elif custom is not None and len(custom) != num_inference_steps:
            raise ValueError(
                f"`num_inference_steps={num_inference_steps}` differs from the {len(custom)} `sigmas`/`timesteps`."
            )
        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps

        given_timesteps = None if timesteps is None else np.array(timesteps).astype(np.float32)
        if sigmas is None:
            grid = given_timesteps
            if grid is None:
                grid = np.linspace(self.sigma_max * T, self.sigma_min * T, num_inference_steps)
            sigmas = grid / T
        else:
            sigmas = np.array(sigmas).astype(np.float32)
        sigmas = (
            self.time_shift(mu, sigmas) if self.config.use_dynamic_shifting else shift_sigmas(sigmas, self.config.shift)
        )
        if self.config.shift_terminal:
            # stretch 1 − σ so that the last σ is `shift_terminal`
            one_minus_sigmas = 1 - sigmas
            sigmas = 1 - one_minus_sigmas / (one_minus_sigmas[-1] / (1 - self.config.shift_terminal))

        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if given_timesteps is not None:
            self.timesteps = torch.from_numpy(given_timesteps).to(dtype=torch.float32, device=device)
        else:
            self.timesteps = sigmas * T
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The position of `timestep` in the schedule (the second match when it occurs twice, as in diffusers)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of the scheduler's `timesteps`.")
        return indices[1 if len(indices) > 1 else 0].item()

    # ------------------------------------------------------------------ the flow

    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The forward process x_σ = (1 − σ) x_0 + σ ε at the schedule's `timestep` (img2img's start)."""
        if noise is None:
            raise ValueError("`scale_noise` needs the `noise` ε to mix with the sample.")
        sigma = self.sigma_per_sample(timestep, sample)  # (B, 1, 1, 1)
        return sigma * noise + (1.0 - sigma) * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`scale_noise` under the DDPM schedulers' name and argument order, so that img2img pipelines written for
        them (diffusers' among them) start a flow model from x_σ = (1 − σ) x_0 + σ ε."""
        return self.scale_noise(original_samples, timesteps, noise)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ScratchSchedulerOutput | tuple:
        """One Euler step of the flow ODE.

        Notation (Esser et al. 2024, Sec. 2):
            sample                      x_σ
            model_output                v̂ = v_θ(x_σ, σ), the predicted velocity ε − x_0
            sigma, sigma_next           σ, σ' < σ
            pred_original_sample        x̂_0 = x_σ − σ v̂
            prev_sample                 x_{σ'}
        """
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is not set: call `set_timesteps` before `step`.")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                f"`timestep` must be one of the scheduler's float `timesteps`, got the integer {timestep!r} "
                "(an index from `enumerate`?)."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)  # the update in float32, as diffusers does
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]

        # 1. x̂_0 = x_σ − σ v̂, from x_σ = x_0 + σ (ε − x_0)
        pred_original_sample = flow_original_sample(sample, model_output, sigma)
        if self.config.stochastic_sampling:
            # 2a. re-noise x̂_0 to σ' with fresh ε
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (1.0 - sigma_next) * pred_original_sample + sigma_next * noise
        else:
            # 2b. x_{σ'} = x_σ + (σ' − σ) v̂, Euler's method on dx/dσ = v̂
            prev_sample = sample + (sigma_next - sigma) * model_output
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return prev_sample, pred_original_sample
        return ScratchSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
