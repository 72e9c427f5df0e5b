"""hf-scratch: Stable Diffusion rebuilt submodel by submodel as Hugging Face citizens.

Public names are imported lazily, so `import hf_scratch` stays cheap and a command that needs only the schedulers
does not import the models.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC_NAMES = {
    "ScratchAutoencoderKL": "hf_scratch.models.vae",
    "ScratchCLIPTextConfig": "hf_scratch.models.clip",
    "ScratchCLIPTextModel": "hf_scratch.models.clip",
    "ScratchCLIPVisionConfig": "hf_scratch.models.clip",
    "ScratchCLIPVisionModelWithProjection": "hf_scratch.models.clip",
    "ScratchCLIPConfig": "hf_scratch.models.clip",
    "ScratchCLIPModel": "hf_scratch.models.clip",
    "ScratchUNet2DConditionModel": "hf_scratch.models.unet",
    "ScratchControlNetModel": "hf_scratch.models.controlnet",
    "load_single_file": "hf_scratch.formats.single_file",
    "save_single_file": "hf_scratch.formats.single_file",
    "ScratchDDPMScheduler": "hf_scratch.schedulers.ddpm",
    "ScratchDDIMScheduler": "hf_scratch.schedulers.ddim",
    "ScratchDPMSolverMultistepScheduler": "hf_scratch.schedulers.dpm_solver",
    "ScratchFlowMatchEulerScheduler": "hf_scratch.schedulers.flow_match",
    "ScratchStableDiffusionPipeline": "hf_scratch.pipelines.text_to_image",
    "ScratchStableDiffusionImg2ImgPipeline": "hf_scratch.pipelines.image_to_image",
    "ScratchStableDiffusionInpaintPipeline": "hf_scratch.pipelines.inpaint",
    "ScratchStableDiffusionControlNetPipeline": "hf_scratch.pipelines.controlnet",
    "ScratchStableDiffusionControlNetImg2ImgPipeline": "hf_scratch.pipelines.controlnet_variants",
    "ScratchStableDiffusionControlNetInpaintPipeline": "hf_scratch.pipelines.controlnet_variants",
    "default_model_path": "hf_scratch.pretrained",
}

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module 'hf_scratch' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC_NAMES[name]), name)


def __dir__() -> list:
    return __all__ + ["__version__"]
