"""Winograd convolution (`hf_scratch.fast.winograd`) and the `use_winograd` fast path, against direct convolutions.

References are PyTorch's own `F.conv2d` in float64 and diffusers' models on the same weights. The C++ tile kernel is
built on first use (about 30 s, then cached by torch).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from _reference import SD15_UNET_CONFIG, build_reference_unet, free, relative_error, scratch_twin
from _tiny import tiny_components
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torch import nn

from hf_scratch.fast import use_winograd, winograd
from hf_scratch.fast.kernels import load as load_kernel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers.ddim import ScratchDDIMScheduler

# F(4x4, 3x3) rounds each output through a few sums of up to 36 terms with coefficients up to 8: a few 1e-6 in float32.
LAYER_TOLERANCE = 1e-5
MODEL_TOLERANCE = 1e-4  # the bound of the opt-in fast path, relative to eager


def _filters(weight: torch.Tensor):
    return lambda m: winograd.transform_filter(weight, m)


@pytest.mark.parametrize(
    "batch, in_channels, out_channels, height, width, bias",
    [
        (1, 3, 5, 1, 1, True),  # a single pixel: one 2x2 tile, three quarters cropped
        (3, 5, 7, 7, 9, False),  # odd sizes: partial tiles at the edges, 2x2 tiles
        (2, 16, 8, 17, 20, True),  # just past SMALL_OUTPUT: 4x4 tiles, partial at the bottom
        (1, 70, 130, 33, 32, True),  # channel counts that are not multiples of the kernel's channel block
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_convolution_matches_direct(batch, in_channels, out_channels, height, width, bias, channels_last):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator) / (9 * in_channels) ** 0.5
    b = torch.randn(out_channels, generator=generator) if bias else None
    expected = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    actual = winograd.winograd_conv2d(x, _filters(weight), b)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < LAYER_TOLERANCE


def test_both_tile_sizes_are_exercised():
    assert winograd.tile_size(16, 16) == 2 and winograd.tile_size(17, 8) == 4


def test_filter_transform_is_the_papers_product():
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    for m, g in winograd.FILTER_TRANSFORMS.items():
        g = torch.tensor(g, dtype=torch.float64)
        expected = torch.einsum("ik,ockl,jl->ijco", g, weight, g).reshape(len(g) ** 2, 3, 2)
        assert torch.allclose(winograd.transform_filter(weight, m), expected)


def test_convert_keeps_state_dict_and_follows_weight_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1))
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert winograd.convert(model, min_channels=8) == 1  # only the 3x3, stride-1 layer
    assert isinstance(model[0], winograd.WinogradConv2d) and type(model[1]) is nn.Conv2d
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < LAYER_TOLERANCE
        # New weights through load_state_dict: the cached transformed filter must not be reused.
        for parameter in reference.parameters():
            parameter.mul_(-2.0)
        model.load_state_dict(reference.state_dict())
        assert relative_error(model(x), reference(x)) < LAYER_TOLERANCE


def test_min_channels_leaves_thin_layers_direct():
    model = nn.Sequential(nn.Conv2d(4, 300, 3, padding=1), nn.Conv2d(300, 300, 3, padding=1))
    assert winograd.convert(model, min_channels=256) == 1
    assert type(model[0]) is nn.Conv2d


def test_gradients_fall_back_to_the_direct_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1)
    reference = copy.deepcopy(conv)
    winograd.convert(conv, min_channels=1)
    x = torch.randn(1, 6, 8, 8)
    conv(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert torch.equal(conv.weight.grad, reference.weight.grad)


def test_kernel_rejects_bad_input_with_a_named_error():
    kernels = load_kernel("winograd")
    with pytest.raises(RuntimeError, match="float32"):
        kernels.input_transform(torch.zeros(1, 4, 4, 2, dtype=torch.float64), 4, 1)
    with pytest.raises(RuntimeError, match=r"\(N, H, W, C\)"):
        kernels.input_transform(torch.zeros(4, 4, 2), 4, 1)
    with pytest.raises(RuntimeError, match="2x2 or 4x4"):
        kernels.input_transform(torch.zeros(1, 4, 4, 2), 3, 1)
    with pytest.raises(RuntimeError, match="tiles"):
        kernels.output_transform(torch.zeros(36, 5, 2), None, 1, 8, 8)


def test_use_winograd_refuses_other_targets():
    with pytest.raises(ValueError, match="nn.Module or a pipeline"):
        use_winograd("unet")


def test_pipeline_images_match_diffusers():
    """A whole tiny generation, every 3x3 layer converted, against diffusers' own pipeline on the same weights."""

    schedule = dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
    )
    ours = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=ScratchDDIMScheduler(**schedule))
    reference = StableDiffusionPipeline(
        **tiny_components("diffusers"), scheduler=DDIMScheduler(**schedule), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    use_winograd(ours, min_channels=1)
    converted = [module for module in ours.unet.modules() if isinstance(module, winograd.WinogradConv2d)]
    assert len(converted) > 5
    kwargs = dict(num_inference_steps=3, height=32, width=32, output_type="pt")
    with torch.no_grad():
        actual = ours("a red heart", generator=torch.Generator().manual_seed(0), **kwargs).images
        expected = reference("a red heart", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert relative_error(actual, expected) < MODEL_TOLERANCE


@pytest.mark.slow
def test_full_size_unet_within_the_fast_path_bound():
    """The SD 1.5 U-Net at 256 px (32x32 latents: both tile sizes), converted, against diffusers' eager U-Net."""
    reference = build_reference_unet(SD15_UNET_CONFIG)
    ours = scratch_twin(ScratchUNet2DConditionModel, reference)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    text = torch.randn(2, 77, 768, generator=generator)
    with torch.no_grad():
        expected = reference(sample, 981, text).sample
        use_winograd(ours)
        actual = ours(sample, 981, text).sample
    assert relative_error(actual, expected) < MODEL_TOLERANCE
    free(reference, ours)
