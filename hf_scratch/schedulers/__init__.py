"""Noise schedulers, one per file, sharing the β-schedule arithmetic in `schedule.py`.

`SCHEDULERS` names the schedulers that the CLI, the demo and emoji-bench offer: ours, then diffusers' own. Each
belongs to a family that fixes what the model was trained on: the discrete DDPM chain (ε or v), EDM's σ
(Karras et al. 2022) or the flow x_t = (1 − t) x_0 + t ε; a scheduler only samples a model of its own family.
"""

import importlib
from typing import Any

SCHEDULERS: dict[str, tuple[str, str, dict]] = {
    "ddpm": ("hf_scratch.schedulers.ddpm", "ScratchDDPMScheduler", {}),
    "ddim": ("hf_scratch.schedulers.ddim", "ScratchDDIMScheduler", {}),
    "dpm++": ("hf_scratch.schedulers.dpm_solver", "ScratchDPMSolverMultistepScheduler", {}),
    "dpm++-karras": (
        "hf_scratch.schedulers.dpm_solver",
        "ScratchDPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
    ),
    "diffusers-pndm": ("diffusers", "PNDMScheduler", {}),
    "diffusers-ddim": ("diffusers", "DDIMScheduler", {}),
    "diffusers-dpm++": ("diffusers", "DPMSolverMultistepScheduler", {}),
    "diffusers-euler": ("diffusers", "EulerDiscreteScheduler", {}),
    "diffusers-euler-a": ("diffusers", "EulerAncestralDiscreteScheduler", {}),
    "diffusers-unipc": ("diffusers", "UniPCMultistepScheduler", {}),
    "flow-euler": ("hf_scratch.schedulers.flow_match", "ScratchFlowMatchEulerScheduler", {}),
    "diffusers-flow-euler": ("diffusers", "FlowMatchEulerDiscreteScheduler", {}),
    "edm-dpm++": ("diffusers", "EDMDPMSolverMultistepScheduler", {}),
    "edm-euler": ("diffusers", "EDMEulerScheduler", {}),
}
FAMILIES = ("ddpm", "edm", "flow")


def scheduler_family(config: Any) -> str:
    """ "edm", "flow" or "ddpm": what a model sampled by a scheduler of this config was trained on."""
    if "sigma_data" in config:
        return "edm"
    if "shift" in config and "beta_start" not in config:
        return "flow"
    return "ddpm"


def family_of(name: str) -> str:
    """The family of the scheduler `SCHEDULERS[name]` builds."""
    return "edm" if name.startswith("edm-") else "flow" if "flow" in name else "ddpm"


def make_scheduler(name: str, config: Any) -> Any:
    """The scheduler called `name`, built from another scheduler's config (values left at defaults kept)."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    if family_of(name) != scheduler_family(config):
        same = [other for other in SCHEDULERS if family_of(other) == scheduler_family(config)]
        raise ValueError(
            f"Scheduler {name!r} samples {family_of(name)} models, but this model was trained as a "
            f"{scheduler_family(config)} model; choose one of: {', '.join(same)}."
        )
    module, class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(importlib.import_module(module), class_name)
    # An in-memory config drops the values left at the source class's defaults, so pass them all explicitly.
    return scheduler_class.from_config({**dict(config), **overrides})


def scheduler_name(scheduler: Any) -> str | None:
    """The `SCHEDULERS` name that `make_scheduler` would build `scheduler` with: same class, and the entry's fixed
    options set (the entry with the most of them wins); None for a scheduler outside the registry."""
    matches = [
        name for name, (module, class_name, options) in SCHEDULERS.items()
        if type(scheduler).__name__ == class_name and type(scheduler).__module__.startswith(module)
        and all(scheduler.config.get(option) == value for option, value in options.items())
    ]  # fmt: skip
    return max(matches, key=lambda name: len(SCHEDULERS[name][2]), default=None)
