"""Guidance beyond plain classifier-free guidance, as diffusers guiders (`diffusers.guiders.BaseGuidance`).

Every pipeline here guides with classifier-free guidance (Ho & Salimans, arXiv:2207.12598) by default,

    v̂ = v_uncond + w (v_cond − v_uncond),                                        (CFG)

on whatever the U-Net predicts (ε, v or the flow velocity). A `guider=` argument replaces it with any diffusers guider
whose `forward(pred_cond, pred_uncond)` mixes two predictions: diffusers' `ClassifierFreeGuidance` (with `start` /
`stop` as fractions of the steps) and `AdaptiveProjectedGuidance` (APG, Sadat et al. 2024, arXiv:2410.02416, Eq. 8–12:
the update v_cond − v_uncond split into its parts parallel and orthogonal to v_cond, the parallel part scaled by η,
its norm capped at r, with optional negative momentum), or the two defined here:

- `IntervalGuidance`: CFG only while the noise level σ lies in (σ_lo, σ_hi], the conditional prediction alone
  elsewhere (Kynkäänniemi et al. 2024, arXiv:2404.07724, Eq. 5). σ is EDM's noise level (x_t / s = x_0 + σ ε), the
  paper's own axis, so that an interval carries over between model families: a flow model at time t has
  σ = t / (1 − t); a DDPM model at step t has σ = √((1 − ᾱ_t) / ᾱ_t). Steps outside the interval cost one U-Net
  batch instead of two.
- `ModelAutoGuidance`: autoguidance (Karras et al. 2024, arXiv:2406.02507, Eq. 2): the second prediction comes from a
  weaker *guide* model of the same task and conditioning rather than from the unconditional one,

      v̂ = v_guide(x; c) + w (v_main(x; c) − v_guide(x; c)),

  with the guide a smaller U-Net trained for a fraction of the main one's steps (the paper's "XS, T/16").

The pipelines call a guider with `set_state(step, num_inference_steps, timestep)` and, when it has one,
`set_noise_level(σ)` before each step; its `num_conditions` (1 or 2) says whether the step needs a second prediction.
"""

import math
from typing import Any

import torch
from diffusers.guiders import BaseGuidance, ClassifierFreeGuidance
from diffusers.guiders.adaptive_projected_guidance import AdaptiveProjectedGuidance, MomentumBuffer
from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg

from hf_scratch.sampling import GUIDANCE_KINDS
from hf_scratch.schedulers import scheduler_family

__all__ = [
    "AdaptiveProjectedGuidance",
    "ClassifierFreeGuidance",
    "IntervalGuidance",
    "ModelAutoGuidance",
    "GUIDANCE_KINDS",
    "classifier_free_guidance",
    "guidance_kwargs",
    "noise_level",
    "start_guider_step",
]


def guidance_kwargs(
    kind: str,
    guidance_scale: float,
    *,
    guidance_rescale: float = 0.0,
    sigma_low: float = 0.28,
    sigma_high: float | None = 5.42,
    eta: float = 0.0,
    momentum: float | None = None,
    guide: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """The pipeline arguments of a guidance kind of `GUIDANCE_KINDS`: "cfg" (the pipeline's own classifier-free
    guidance, with `guidance_rescale`), "interval" (`IntervalGuidance` on σ ∈ (`sigma_low`, `sigma_high`], None for
    no upper end), "apg" (diffusers' `AdaptiveProjectedGuidance` with η = `eta` and momentum β = `momentum`, no norm
    cap) or "auto" (`ModelAutoGuidance` by the U-Net `guide`)."""
    if kind == "cfg":
        return {"guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale}
    if guidance_rescale > 0 and kind != "interval":
        raise ValueError(f"guidance_rescale applies to the cfg and interval guidance kinds, not to {kind!r}.")
    if kind == "interval":
        high = math.inf if sigma_high is None else sigma_high
        return {"guider": IntervalGuidance(guidance_scale, sigma_low, high, guidance_rescale=guidance_rescale)}
    if kind == "apg":
        return {
            "guider": AdaptiveProjectedGuidance(
                guidance_scale, adaptive_projected_guidance_momentum=momentum,
                adaptive_projected_guidance_rescale=0.0, eta=eta,
            )
        }  # fmt: skip
    if kind == "auto":
        if guide is None:
            raise ValueError("Autoguidance needs a guide U-Net (a smaller, shorter-trained model of the same latents).")
        return {"guider": ModelAutoGuidance(guide, guidance_scale)}
    raise ValueError(f"Unknown guidance kind {kind!r}; choose one of: {', '.join(GUIDANCE_KINDS)}.")


def classifier_free_guidance(
    pred_uncond: torch.Tensor, pred_cond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """(CFG) of the module docstring, then rescaled guidance when `guidance_rescale` φ > 0 (Lin et al. 2024,
    arXiv:2305.08891, Sec. 3.4, Eq. 15–16: the guided prediction scaled to the conditional one's standard deviation
    and mixed back with weight φ; diffusers' `rescale_noise_cfg`). The same arithmetic, in the same order, as
    diffusers' `StableDiffusionPipeline`."""
    guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    return rescale_noise_cfg(guided, pred_cond, guidance_rescale) if guidance_rescale > 0 else guided


def noise_level(scheduler: Any, timestep: torch.Tensor | float) -> float:
    """EDM's σ of the scheduler's `timestep` (see the module docstring): t / (1 − t) with t = timestep / T for flow
    schedulers (∞ at t = 1), √((1 − ᾱ_t) / ᾱ_t) for DDPM-family ones."""
    family = scheduler_family(scheduler)
    if family == "flow":
        t = float(timestep) / scheduler.config.num_train_timesteps
        return math.inf if t >= 1 else t / (1 - t)
    if family == "ddpm":
        alpha_bar = float(scheduler.alphas_cumprod[int(round(float(timestep)))])
        return math.sqrt((1 - alpha_bar) / alpha_bar)
    raise ValueError(
        f"The noise level of {type(scheduler).__name__}'s timesteps is not known here; `IntervalGuidance` needs a "
        "flow or DDPM-family scheduler."
    )


def start_guider_step(guider: BaseGuidance, scheduler: Any, step: int, num_steps: int, timestep: torch.Tensor) -> None:
    """Tell `guider` where sampling is: its step, the number of steps, the timestep and (for guiders that read it) the
    noise level. At step 0 an APG guider with momentum gets a fresh momentum buffer, as diffusers' `prepare_inputs`
    gives it (the pipelines call `forward` directly)."""
    guider.set_state(step, num_steps, timestep)
    if hasattr(guider, "set_noise_level"):
        guider.set_noise_level(noise_level(scheduler, timestep))
    momentum = getattr(guider, "adaptive_projected_guidance_momentum", None)
    if step == 0 and momentum is not None:
        guider.momentum_buffer = MomentumBuffer(momentum)


class IntervalGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance limited to the noise levels σ ∈ (`sigma_low`, `sigma_high`] (EDM's σ; see the module
    docstring), the conditional prediction alone outside. The paper's interval for EDM2 at 512 px is (0.28, 5.42];
    `sigma_low=0, sigma_high=math.inf` is plain CFG. Other arguments as diffusers' `ClassifierFreeGuidance`."""

    def __init__(
        self,
        guidance_scale: float = 7.5,
        sigma_low: float = 0.28,
        sigma_high: float = 5.42,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        enabled: bool = True,
    ):
        if not 0 <= sigma_low < sigma_high:
            raise ValueError(
                f"The guidance interval needs 0 <= sigma_low < sigma_high, got ({sigma_low}, {sigma_high}]."
            )
        super().__init__(
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            use_original_formulation=use_original_formulation, enabled=enabled,
        )  # fmt: skip
        self.sigma_low, self.sigma_high = float(sigma_low), float(sigma_high)
        self._sigma: float | None = None

    def set_noise_level(self, sigma: float) -> None:
        """The current step's σ (the pipelines set it before each step)."""
        self._sigma = sigma

    def _is_cfg_enabled(self) -> bool:
        if self._sigma is None:
            if self._timestep is None:  # no step yet (a repr, say): as CFG
                return super()._is_cfg_enabled()
            raise RuntimeError("IntervalGuidance needs the step's noise level: call `set_noise_level(sigma)` first.")
        return self.sigma_low < self._sigma <= self.sigma_high and super()._is_cfg_enabled()


class ModelAutoGuidance(BaseGuidance):
    """Autoguidance by a weaker guide model (module docstring): `guide` is a U-Net taking the main U-Net's inputs
    (sample, timestep, text embeddings); the pipelines run it on the conditional text as the second prediction.
    `guidance_scale` w = 1 gives the main model's conditional prediction alone."""

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, guide: torch.nn.Module, guidance_scale: float = 2.0, start: float = 0.0, stop: float = 1.0):
        super().__init__(start, stop)
        self.guide = guide
        self.guidance_scale = guidance_scale

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        """`pred_uncond` here is the guide's conditional prediction."""
        if pred_uncond is None or not self._is_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        return GuiderOutput(
            pred=pred_uncond + self.guidance_scale * (pred_cond - pred_uncond), pred_cond=pred_cond,
            pred_uncond=pred_uncond,
        )  # fmt: skip

    def _is_enabled(self) -> bool:
        if not self._enabled or math.isclose(self.guidance_scale, 1.0):
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_enabled() else 1

    @property
    def is_conditional(self) -> bool:
        return True
