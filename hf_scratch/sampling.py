"""A model folder's default sampling: the steps and the guidance it draws best with, kept in `sampling.json` beside
its model_index.json, e.g. `{"num_inference_steps": 12, "guidance_kind": "auto", "guidance_scale": 2.0,
"guide": "guide"}`. `hf-scratch generate`, `hf-scratch eval` and the demo start from it; in Python,

    pipe = ScratchStableDiffusionPipeline.from_pretrained(folder)
    image = pipe(prompt, **sampling_kwargs(folder)).images[0]

draws with it too. The guidance kinds are those of `hf_scratch.pipelines.guidance.guidance_kwargs`.

This module imports neither torch nor diffusers at import time, so the CLI's `--help` stays fast.
"""

import json
import math
from pathlib import Path
from typing import Any

# The guidance kinds by name (`hf_scratch.pipelines.guidance.guidance_kwargs`), as the CLI, the demo and the sampling
# study offer them.
GUIDANCE_KINDS = ("cfg", "interval", "apg", "auto")


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`, or ValueError naming the file."""
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}).") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(loaded).__name__}.")
    return loaded


# The sampling a model folder's `sampling.json` may set, and the defaults where it is silent (or absent). The options
# of each guidance kind (`hf_scratch.pipelines.guidance.guidance_kwargs`) are set in the file for its own kind only;
# `guide` names a subfolder of the model folder holding the autoguidance U-Net, for any kind.
SAMPLING_FILE = "sampling.json"
SAMPLING_DEFAULTS = {"num_inference_steps": 20, "guidance_kind": "cfg", "guidance_scale": 5.0,
                     "guidance_rescale": 0.0, "sigma_low": 0.28, "sigma_high": 5.42, "eta": 0.0, "momentum": None,
                     "guide": None}  # fmt: skip
KIND_OPTIONS = {"cfg": ("guidance_rescale",), "interval": ("guidance_rescale", "sigma_low", "sigma_high"),
                "apg": ("eta", "momentum"), "auto": ()}  # fmt: skip


def default_sampling(model_folder: str | Path) -> dict:
    """The default sampling of a pipeline folder: `SAMPLING_DEFAULTS` updated by the folder's `sampling.json` (beside
    model_index.json) when there is one, e.g. {"num_inference_steps": 20, "guidance_kind": "interval",
    "guidance_scale": 4.0, "sigma_low": 0.3, "sigma_high": null}. `sigma_high` null means no upper end, and `guide`
    comes back as the path of its subfolder. ValueError naming the file and the key for anything else."""
    path = Path(model_folder) / SAMPLING_FILE
    sampling = dict(SAMPLING_DEFAULTS)
    if not path.is_file():
        return sampling
    given = read_json_object(path)

    def refuse(key: str, allowed: str) -> ValueError:
        return ValueError(f"{str(path)!r}: {key!r} is {given[key]!r}; {allowed}.")

    for key, value in given.items():
        if key not in SAMPLING_DEFAULTS:
            raise ValueError(f"{str(path)!r}: unknown key {key!r}; the keys are {', '.join(SAMPLING_DEFAULTS)}.")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "num_inference_steps" and not (number and value == int(value) and value >= 1):
            raise refuse(key, "it must be a whole number of at least 1")
        if key == "guidance_kind" and value not in GUIDANCE_KINDS:
            raise refuse(key, f"choose one of {', '.join(GUIDANCE_KINDS)}")
        if key == "guide" and not (isinstance(value, str) and (Path(model_folder) / value / "config.json").is_file()):
            raise refuse(key, "it must name a subfolder of the model folder holding a U-Net (config.json)")
        if key in ("guidance_scale", "eta", "sigma_low") and not number:
            raise refuse(key, "it must be a number")
        if key in ("momentum", "sigma_high") and not (number or value is None):
            raise refuse(key, "it must be a number or null")
        if key == "guidance_rescale" and not (number and 0 <= value <= 1):
            raise refuse(key, "it must be a number in [0, 1]")
    sampling.update(given)
    kind = sampling["guidance_kind"]
    for key in given.keys() & {option for options in KIND_OPTIONS.values() for option in options}:
        if key not in KIND_OPTIONS[kind]:
            raise ValueError(f"{str(path)!r}: {key!r} is an option of another guidance kind than {kind!r}.")
    high = math.inf if sampling["sigma_high"] is None else sampling["sigma_high"]
    if kind == "interval" and not 0 <= sampling["sigma_low"] < high:
        raise ValueError(f"{str(path)!r}: the interval needs 0 <= 'sigma_low' < 'sigma_high'.")
    if kind == "auto" and sampling["guide"] is None:
        raise ValueError(f"{str(path)!r}: 'guidance_kind' 'auto' needs 'guide', the subfolder of the guide U-Net.")
    sampling["num_inference_steps"] = int(sampling["num_inference_steps"])
    if sampling["guide"] is not None:
        sampling["guide"] = str(Path(model_folder) / sampling["guide"])
    return sampling


def guidance_inputs(
    kind: str,
    guidance_scale: float,
    options: dict,
    guide: str | Path | None = None,
    device: Any = "cpu",
    dtype: Any = None,
) -> dict:
    """The pipeline arguments of a guidance kind with its options (`guidance_kwargs`), autoguidance's guide U-Net
    loaded from its folder `guide` onto `device` in `dtype` (default float32)."""
    import torch

    from hf_scratch.pipelines.guidance import guidance_kwargs

    guide_model = None
    if kind == "auto":
        from hf_scratch.models.unet import ScratchUNet2DConditionModel

        dtype = torch.float32 if dtype is None else dtype
        guide_model = ScratchUNet2DConditionModel.from_pretrained(str(guide), torch_dtype=dtype).to(device)
    return guidance_kwargs(kind, guidance_scale, guide=guide_model, **options)


def sampling_kwargs(model_folder: str | Path, device: Any = "cpu", dtype: Any = None) -> dict:
    """The pipeline arguments of the folder's default sampling (`default_sampling`): `num_inference_steps` and the
    guidance (`guidance_inputs`)."""
    sampling = default_sampling(model_folder)
    kind = sampling["guidance_kind"]
    options = {key: sampling[key] for key in KIND_OPTIONS[kind]}
    kwargs = guidance_inputs(kind, sampling["guidance_scale"], options, sampling["guide"], device, dtype)
    return {"num_inference_steps": sampling["num_inference_steps"], **kwargs}
