"""Noise schedulers, one per file, sharing the β-schedule arithmetic in `schedule.py`.

`SCHEDULERS` names the schedulers that the CLI, the demo and emoji-bench offer: ours, then diffusers' own. Each
belongs to a family that fixes what the model was trained on: the discrete DDPM chain (ε or v), EDM's σ
(Karras et al. 2022) or the flow x_t = (1 − t) x_0 + t ε; a scheduler only samples a model of its own family.
"""

import importlib
import inspect
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


def scheduler_family(scheduler: Any) -> str:
    """ "edm", "flow" or "ddpm": what a model sampled by this scheduler was trained on. The one place that decides it.

    `scheduler` is a scheduler, a scheduler class or a scheduler's config (a dict, e.g. read from
    `scheduler_config.json`). EDM schedulers carry EDM's σ_data; flow-matching ones a time `shift` and no β schedule;
    every other diffusers-style scheduler samples the discrete DDPM chain (ε, v or x_0 prediction)."""
    if isinstance(scheduler, type):
        keys = set(inspect.signature(scheduler.__init__).parameters)
    else:
        keys = set(getattr(scheduler, "config", scheduler))
    if "sigma_data" in keys:
        return "edm"
    if "shift" in keys and "beta_start" not in keys:
        return "flow"
    return "ddpm"


def scheduler_class(name: str) -> type:
    """The class of the scheduler `SCHEDULERS[name]`."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    module, class_name, _ = SCHEDULERS[name]
    return getattr(importlib.import_module(module), class_name)


def family_of(name: str) -> str:
    """The family of the scheduler `SCHEDULERS[name]` builds (`scheduler_family` of its class)."""
    return scheduler_family(scheduler_class(name))


def make_scheduler(name: str, config: Any) -> Any:
    """The scheduler called `name`, built from another scheduler's config (values left at defaults kept)."""
    if family_of(name) != scheduler_family(config):
        same = [other for other in SCHEDULERS if family_of(other) == scheduler_family(config)]
        raise ValueError(
            f"Scheduler {name!r} samples {family_of(name)} models, but this model was trained as a "
            f"{scheduler_family(config)} model; choose one of: {', '.join(same)}."
        )
    overrides = SCHEDULERS[name][2]
    # An in-memory config drops the values left at the source class's defaults, so pass them all explicitly.
    return scheduler_class(name).from_config({**dict(config), **overrides})


def scheduler_name(scheduler: Any) -> str | None:
    """The `SCHEDULERS` name that `make_scheduler` would build `scheduler` with: same class, and the entry's fixed
    options set (the entry with the most of them wins); None for a scheduler outside the registry."""
    matches = [
        name for name, (module, class_name, options) in SCHEDULERS.items()
        if type(scheduler).__name__ == class_name and type(scheduler).__module__.startswith(module)
        and all(scheduler.config.get(option) == value for option, value in options.items())
    ]  # fmt: skip
    return max(matches, key=lambda name: len(SCHEDULERS[name][2]), default=None)
