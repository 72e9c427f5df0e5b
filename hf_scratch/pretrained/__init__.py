"""The default model shipped inside the package: a pipeline folder trained from scratch on the emoji data."""

from pathlib import Path

DEFAULT_MODEL_NAME = "emoji32"


def default_model_path() -> str:
    """Path of the shipped pipeline folder, loadable with `ScratchStableDiffusionPipeline.from_pretrained`."""
    path = Path(__file__).parent / DEFAULT_MODEL_NAME
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The shipped default model is missing from {path} (no model_index.json). Reinstall hf-scratch, or pass "
            "--model with a pipeline folder of your own."
        )
    return str(path)


DEFAULT_CONTROLNET_NAME = "emoji32-controlnet"


def default_controlnet_path() -> str:
    """Path of the shipped ControlNet of the default model, loadable with `ScratchControlNetModel.from_pretrained`;
    its condition is the colour layout of `hf_scratch.conditions`."""
    path = Path(__file__).parent / DEFAULT_CONTROLNET_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The shipped ControlNet is missing from {path} (no config.json). Reinstall hf-scratch, or train one with "
            "training/recipes/emoji32_controlnet.sh."
        )
    return str(path)
