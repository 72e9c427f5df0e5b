"""Attention processors, sliced attention, fused projections and FreeU on our models, against diffusers' own.

Our `Attention` follows diffusers' processor protocol, so diffusers' processors must run on it with diffusers' results
(and ours on diffusers' attention), slicing must really compute the scores a slice at a time, fusing the projections
must keep the outputs (and unfusing restore them exactly), and FreeU (Si et al. 2024, arXiv:2309.11497) must give
diffusers' images. Tolerances: 1e-5 on U-Net outputs, 1e-4 on images in [0, 1].
"""

import numpy as np
import pytest
import torch
from _tiny import tiny_components, twin_pipelines
from diffusers.models.attention_processor import (
    AttnAddedKVProcessor,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
)
from diffusers.utils import is_xformers_available

from hf_scratch.models.layers import Attention, ScratchAttnProcessor

MODEL_TOLERANCE, IMAGE_TOLERANCE = 1e-5, 1e-4
FREEU = {"s1": 0.9, "s2": 0.2, "b1": 1.3, "b2": 1.4}  # the FreeU authors' SD 1.x values


@pytest.fixture
def unets():
    """Our tiny U-Net and diffusers' with the same weights, and one input."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)
    return tiny_components("scratch")["unet"], tiny_components("diffusers")["unet"], (sample, 500, context)


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


def images(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, generator=generator, output_type="np").images


def test_attn_processors_are_named_as_in_diffusers(unets):
    ours, theirs, _ = unets
    assert set(ours.attn_processors) == set(theirs.attn_processors)
    assert all(isinstance(processor, ScratchAttnProcessor) for processor in ours.attn_processors.values())
    vae_ours, vae_theirs = tiny_components("scratch")["vae"], tiny_components("diffusers")["vae"]
    assert set(vae_ours.attn_processors) == set(vae_theirs.attn_processors)


@pytest.mark.parametrize(
    "processor", [AttnProcessor, AttnProcessor2_0, lambda: SlicedAttnProcessor(3)], ids=["plain", "sdpa", "sliced"]
)
def test_diffusers_processors_run_on_our_attention(unets, processor):
    ours, theirs, inputs = unets
    default = run(ours, inputs)
    for unet in (ours, theirs):
        unet.set_attn_processor(processor())
    got = run(ours, inputs)
    assert torch.equal(got, run(theirs, inputs))  # the same processor code on the same weights
    torch.testing.assert_close(got, default, rtol=0, atol=MODEL_TOLERANCE)


def test_our_processor_runs_on_diffusers_attention(unets):
    ours, theirs, inputs = unets
    theirs.set_attn_processor({name: ScratchAttnProcessor() for name in theirs.attn_processors})
    assert torch.equal(run(theirs, inputs), run(ours, inputs))
    vae_ours, vae_theirs = tiny_components("scratch")["vae"], tiny_components("diffusers")["vae"]
    vae_theirs.set_attn_processor(ScratchAttnProcessor())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vae_theirs.decode(latents).sample, vae_ours.decode(latents).sample)


def test_set_default_attn_processor_matches_diffusers(unets):
    ours, theirs, inputs = unets
    for model in (ours, theirs, tiny_components("scratch")["vae"]):
        model.set_default_attn_processor()
        assert all(type(processor) is AttnProcessor for processor in model.attn_processors.values())
    assert torch.equal(run(ours, inputs), run(theirs, inputs))
    ours.set_attn_processor(AttnAddedKVProcessor())
    with pytest.raises(ValueError, match=r"plain attention processors only.*AttnAddedKVProcessor"):
        ours.set_default_attn_processor()


@pytest.mark.parametrize("slice_size, rows", [("max", 1), (2, 2), ("auto", 4)])
def test_attention_slicing_computes_the_scores_a_slice_at_a_time(unets, slice_size, rows, monkeypatch):
    """The tiny U-Net has 8 heads and a batch of 2: 16 (batch x head) rows, computed `rows` at a time."""
    ours, theirs, inputs = unets
    default = run(ours, inputs)
    seen = []
    original = Attention.get_attention_scores

    def recording(self, query, key, attention_mask=None):
        seen.append(query.shape[0])
        return original(self, query, key, attention_mask)

    monkeypatch.setattr(Attention, "get_attention_scores", recording)
    ours.set_attention_slice(slice_size)
    theirs.set_attention_slice(slice_size)
    got = run(ours, inputs)
    assert seen and set(seen) == {rows}
    assert torch.equal(got, run(theirs, inputs))
    torch.testing.assert_close(got, default, rtol=0, atol=MODEL_TOLERANCE)
    ours.set_attention_slice(None)
    assert all(isinstance(processor, ScratchAttnProcessor) for processor in ours.attn_processors.values())


def test_pipeline_attention_slicing_is_real_and_bad_sizes_are_refused():
    _, ours = twin_pipelines()
    default = images(ours)
    ours.enable_attention_slicing()
    assert all(isinstance(processor, SlicedAttnProcessor) for processor in ours.unet.attn_processors.values())
    assert np.abs(images(ours) - default).max() <= IMAGE_TOLERANCE
    ours.disable_attention_slicing()
    assert np.abs(images(ours) - default).max() == 0.0
    with pytest.raises(ValueError, match=r"slice_size=9 must be an integer from 1 to this layer's 8 heads"):
        ours.enable_attention_slicing(9)
    with pytest.raises(ValueError, match=r"slice_size='half' must be 'auto', 'max'"):
        ours.unet.set_attention_slice("half")


@pytest.mark.skipif(is_xformers_available(), reason="xformers is installed here")
def test_xformers_without_xformers_raises_instead_of_doing_nothing():
    _, ours = twin_pipelines()
    with pytest.raises(ModuleNotFoundError, match="xformers"):
        ours.enable_xformers_memory_efficient_attention()


def test_fused_projections_keep_the_outputs_and_unfusing_restores_them(unets):
    ours, theirs, inputs = unets
    default = run(ours, inputs)
    ours.fuse_qkv_projections()
    theirs.fuse_qkv_projections()
    attention = dict(ours.named_modules())["down_blocks.1.attentions.0.transformer_blocks.0"]
    assert hasattr(attention.attn1, "to_qkv") and hasattr(attention.attn2, "to_kv")
    fused = run(ours, inputs)
    torch.testing.assert_close(fused, default, rtol=0, atol=MODEL_TOLERANCE)
    torch.testing.assert_close(fused, run(theirs, inputs), rtol=0, atol=MODEL_TOLERANCE)
    ours.set_attn_processor(FusedAttnProcessor2_0())  # what StableDiffusionMixin.fuse_qkv_projections installs
    torch.testing.assert_close(run(ours, inputs), fused, rtol=0, atol=MODEL_TOLERANCE)
    ours.unfuse_qkv_projections()
    assert not hasattr(attention.attn1, "to_qkv")
    assert all(isinstance(processor, ScratchAttnProcessor) for processor in ours.attn_processors.values())
    assert torch.equal(run(ours, inputs), default)


def test_pipeline_fuse_qkv_projections_covers_our_vae():
    reference, ours = twin_pipelines()
    default = images(ours)
    ours.fuse_qkv_projections()
    reference.fuse_qkv_projections()
    assert hasattr(dict(ours.vae.named_modules())["decoder.mid_block.attentions.0"], "to_qkv")
    fused = images(ours)
    assert np.abs(fused - default).max() <= IMAGE_TOLERANCE
    assert np.abs(fused - images(reference)).max() <= IMAGE_TOLERANCE
    ours.unfuse_qkv_projections()
    assert np.abs(images(ours) - default).max() == 0.0


def test_freeu_gives_diffusers_images():
    reference, ours = twin_pipelines()
    default = images(ours)
    for pipe in (reference, ours):
        pipe.enable_freeu(**FREEU)
    got = images(ours)
    assert np.abs(got - images(reference)).max() <= IMAGE_TOLERANCE
    assert np.abs(got - default).max() > 1e-3, "FreeU should change the images"
    ours.disable_freeu()
    assert np.abs(images(ours) - default).max() == 0.0
    with pytest.raises(ValueError, match=r"b1=0 must be a positive number"):
        ours.enable_freeu(**{**FREEU, "b1": 0})
