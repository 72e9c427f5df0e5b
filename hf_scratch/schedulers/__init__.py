"""Noise schedulers, one per file, sharing the β-schedule arithmetic in `schedule.py`.

`SCHEDULERS` names the schedulers that the CLI, the demo and emoji-bench offer: ours, then diffusers' own.
"""

import importlib
from typing import Any, Dict, Tuple

SCHEDULERS: Dict[str, Tuple[str, str, dict]] = {
    "ddpm": ("hf_scratch.schedulers.ddpm", "ScratchDDPMScheduler", {}),
    "ddim": ("hf_scratch.schedulers.ddim", "ScratchDDIMScheduler", {}),
    "dpm++": ("hf_scratch.schedulers.dpm_solver", "ScratchDPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("hf_scratch.schedulers.dpm_solver", "ScratchDPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "diffusers-pndm": ("diffusers", "PNDMScheduler", {}),
    "diffusers-ddim": ("diffusers", "DDIMScheduler", {}),
    "diffusers-dpm++": ("diffusers", "DPMSolverMultistepScheduler", {}),
    "diffusers-euler": ("diffusers", "EulerDiscreteScheduler", {}),
    "diffusers-euler-a": ("diffusers", "EulerAncestralDiscreteScheduler", {}),
    "diffusers-unipc": ("diffusers", "UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: Any) -> Any:
    """The scheduler called `name`, built from another scheduler's config (values left at defaults kept)."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    module, class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(importlib.import_module(module), class_name)
    # An in-memory config drops the values left at the source class's defaults, so pass them all explicitly.
    return scheduler_class.from_config({**dict(config), **overrides})
