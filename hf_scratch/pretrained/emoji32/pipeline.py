"""Loads hf-scratch's pipeline class (`pip install hf-scratch`)."""

from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

__all__ = ["ScratchStableDiffusionPipeline"]
