"""Text-to-image, image-to-image, inpainting and ControlNet pipelines on our submodels and any diffusers-style
scheduler, all on one base (`base.ScratchPipelineBase`, with the input checks in `checks.py`).

Importing this package (any of our pipelines imports it) registers them with diffusers' AutoPipelines under the model
name "hf-scratch", so `AutoPipelineForImage2Image.from_pipe(text_to_image_pipe)` and the like switch between them,
sharing the components, and `AutoPipelineForText2Image.from_pretrained(folder)` loads a folder they saved.

A saved folder's model_index.json names its class as `["pipeline", "<Class>"]`, the form with which
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` imports `pipeline.py` from the folder. diffusers'
AutoPipelines look a class up by a plain name only; `_model_name_of` lets them read that form too.
"""

from diffusers.pipelines import auto_pipeline

from hf_scratch.pipelines.base import REMOTE_CODE_MODULE
from hf_scratch.pipelines.controlnet import ScratchStableDiffusionControlNetPipeline
from hf_scratch.pipelines.controlnet_variants import (
    ScratchStableDiffusionControlNetImg2ImgPipeline,
    ScratchStableDiffusionControlNetInpaintPipeline,
)
from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline
from hf_scratch.pipelines.inpaint import ScratchStableDiffusionInpaintPipeline
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

AUTO_PIPELINE_NAME = "hf-scratch"
auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING[AUTO_PIPELINE_NAME] = ScratchStableDiffusionPipeline
auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING[AUTO_PIPELINE_NAME] = ScratchStableDiffusionImg2ImgPipeline
auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING[AUTO_PIPELINE_NAME] = ScratchStableDiffusionInpaintPipeline
# `AutoPipelineForText2Image.from_pipe(pipe, controlnet=...)` looks up "<name of pipe's class>" with "Pipeline" spelled
# "ControlNetPipeline" (and the image-to-image and inpainting AutoPipelines likewise), as diffusers' own
# "stable-diffusion-controlnet"; `AutoPipelineForImage2Image.from_pipe(controlnet_pipe)` keeps the ControlNets.
auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING[f"{AUTO_PIPELINE_NAME}-controlnet"] = (
    ScratchStableDiffusionControlNetPipeline
)
auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING[f"{AUTO_PIPELINE_NAME}-controlnet"] = (
    ScratchStableDiffusionControlNetImg2ImgPipeline
)
auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING[f"{AUTO_PIPELINE_NAME}-controlnet"] = (
    ScratchStableDiffusionControlNetInpaintPipeline
)

_diffusers_model_name_of = getattr(auto_pipeline._get_model, "__wrapped__", auto_pipeline._get_model)


def _model_name_of(pipeline_class_name: str | list[str]) -> str | None:
    """diffusers' `auto_pipeline._get_model` (the AutoPipeline model name of a pipeline class name), reading a saved
    folder's `["pipeline", "<Class>"]` as "<Class>"."""
    if isinstance(pipeline_class_name, (list, tuple)) and list(pipeline_class_name[:1]) == [REMOTE_CODE_MODULE]:
        pipeline_class_name = pipeline_class_name[-1]
    return _diffusers_model_name_of(pipeline_class_name)


_model_name_of.__wrapped__ = _diffusers_model_name_of
auto_pipeline._get_model = _model_name_of
