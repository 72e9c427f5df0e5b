"""Text-to-image, image-to-image and inpainting pipelines on our submodels and any diffusers-style scheduler, all
on one base (`base.ScratchPipelineBase`, with the input checks in `checks.py`).

Importing this package (any of our pipelines imports it) registers them with diffusers' AutoPipelines under the model
name "hf-scratch", so `AutoPipelineForImage2Image.from_pipe(text_to_image_pipe)` and the like switch between them,
sharing the components.
"""

from diffusers.pipelines import auto_pipeline

from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline
from hf_scratch.pipelines.inpaint import ScratchStableDiffusionInpaintPipeline
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

AUTO_PIPELINE_NAME = "hf-scratch"
auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING[AUTO_PIPELINE_NAME] = ScratchStableDiffusionPipeline
auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING[AUTO_PIPELINE_NAME] = ScratchStableDiffusionImg2ImgPipeline
auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING[AUTO_PIPELINE_NAME] = ScratchStableDiffusionInpaintPipeline
