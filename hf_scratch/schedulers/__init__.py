"""Noise schedulers, one per file, sharing the β-schedule arithmetic in `schedule.py`.

`SCHEDULERS` names the schedulers that the CLI, the demo and emoji-bench offer: ours, then diffusers' own. Each
belongs to a family that fixes what the model was trained on: the discrete DDPM chain (ε or v), EDM's σ
(Karras et al. 2022) or the flow x_t = (1 − t) x_0 + t ε; a scheduler only samples a model of its own family.
Higher-order flow solvers are diffusers' Heun and, on the flow's σ with velocity ("flow_prediction") outputs,
DPM-Solver++ 2M (Lu et al. 2022, arXiv:2211.01095) and UniPC (Zhao et al. 2023, arXiv:2302.04867).
"""

import importlib
import inspect
from typing import Any

# DPM-Solver++ / UniPC on a flow model: σ on the flow's line x_σ = (1 − σ) x_0 + σ ε, the model's output the velocity,
# second order, and a last step to σ = 0.
FLOW_SIGMAS = {
    "use_flow_sigmas": True,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "final_sigmas_type": "zero",
}
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
    "flow-heun": ("diffusers", "FlowMatchHeunDiscreteScheduler", {}),
    "flow-dpm++": ("diffusers", "DPMSolverMultistepScheduler", {**FLOW_SIGMAS, "algorithm_type": "dpmsolver++"}),
    "flow-unipc": ("diffusers", "UniPCMultistepScheduler", dict(FLOW_SIGMAS)),
    "edm-dpm++": ("diffusers", "EDMDPMSolverMultistepScheduler", {}),
    "edm-euler": ("diffusers", "EDMEulerScheduler", {}),
}
FAMILIES = ("ddpm", "edm", "flow")


def scheduler_family(scheduler: Any) -> str:
    """ "edm", "flow" or "ddpm": what a model sampled by this scheduler was trained on. The one place that decides it.

    `scheduler` is a scheduler, a scheduler class (at its defaults) or a scheduler's config (a dict, e.g. read from
    `scheduler_config.json`). EDM schedulers carry EDM's σ_data; flow-matching ones a time `shift` and no β schedule,
    or DPM-Solver's / UniPC's flow options (`use_flow_sigmas`, velocity "flow_prediction"); every other diffusers-style
    scheduler samples the discrete DDPM chain (ε, v or x_0 prediction)."""
    config = init_defaults(scheduler) if isinstance(scheduler, type) else getattr(scheduler, "config", scheduler)
    if "sigma_data" in config:
        return "edm"
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return "flow"
    if "shift" in config and "beta_start" not in config:
        return "flow"
    return "ddpm"


def init_defaults(scheduler_class: type) -> dict[str, Any]:
    """The config a scheduler class has at its defaults: each `__init__` argument and its default value."""
    parameters = list(inspect.signature(scheduler_class.__init__).parameters.values())[1:]  # without `self`
    return {parameter.name: parameter.default for parameter in parameters}


def scheduler_class(name: str) -> type:
    """The class of the scheduler `SCHEDULERS[name]`."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    module, class_name, _ = SCHEDULERS[name]
    return getattr(importlib.import_module(module), class_name)


def family_of(name: str) -> str:
    """The family of the scheduler `SCHEDULERS[name]` builds: `scheduler_family` of its class with the entry's fixed
    options."""
    return scheduler_family({**init_defaults(scheduler_class(name)), **SCHEDULERS[name][2]})


def flow_settings(config: Any) -> dict[str, Any]:
    """A flow model's sampling settings (the keys of the flow-match Euler schedulers' config: `shift`, dynamic
    shifting, …) read from any flow scheduler's config, where DPM-Solver's and UniPC's call the shift `flow_shift`."""
    config = dict(getattr(config, "config", config))
    if config.get("use_flow_sigmas"):
        config["shift"] = config["flow_shift"]
    return {key: value for key, value in config.items() if key in init_defaults(scheduler_class("flow-euler"))}


def make_scheduler(name: str, config: Any) -> Any:
    """The scheduler called `name`, built from another scheduler's config (values left at defaults kept)."""
    if family_of(name) != scheduler_family(config):
        same = [other for other in SCHEDULERS if family_of(other) == scheduler_family(config)]
        raise ValueError(
            f"Scheduler {name!r} samples {family_of(name)} models, but this model was trained as a "
            f"{scheduler_family(config)} model; choose one of: {', '.join(same)}."
        )
    target, overrides = scheduler_class(name), SCHEDULERS[name][2]
    if family_of(name) == "flow":
        # Only the flow settings, named as the target names them, so that no other solver's options carry over.
        settings = flow_settings(config)
        settings["flow_shift"] = settings.get("shift", 1.0)
        config = {key: value for key, value in settings.items() if key in init_defaults(target)}
    # An in-memory config drops the values left at the source class's defaults, so pass them all explicitly.
    return target.from_config({**dict(config), **overrides})


def scheduler_name(scheduler: Any) -> str | None:
    """The `SCHEDULERS` name that `make_scheduler` would build `scheduler` with: same class, and the entry's fixed
    options set (the entry with the most of them wins); None for a scheduler outside the registry."""
    matches = [
        name for name, (module, class_name, options) in SCHEDULERS.items()
        if type(scheduler).__name__ == class_name and type(scheduler).__module__.startswith(module)
        and all(scheduler.config.get(option) == value for option, value in options.items())
    ]  # fmt: skip
    return max(matches, key=lambda name: len(SCHEDULERS[name][2]), default=None)
