"""`hf_scratch.fast.freeze_for_inference`: the U-Net run as frozen TorchScript graphs gives eager's numbers.

References: our eager U-Net with the same convolution backend (the graph holds the same kernels, so equality is
bitwise), and diffusers' `UNet2DConditionModel` and `StableDiffusionPipeline` on the same weights.
"""

import contextlib

import pytest
import torch
from _tiny import UNET_CONFIG, twin_pipelines

from hf_scratch.fast import freeze_for_inference, unfreeze
from hf_scratch.fast.frozen import FrozenForward, onednn_enabled
from hf_scratch.models.unet import ScratchUNet2DConditionModel


def _inputs(batch: int = 2, size: int = 16, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, UNET_CONFIG["in_channels"], size, size, generator=generator)
    context = torch.randn(batch, 7, UNET_CONFIG["cross_attention_dim"], generator=generator)
    return sample, torch.tensor(321), context


def _pair(onednn: bool | None = None) -> tuple:
    torch.manual_seed(0)
    eager = ScratchUNet2DConditionModel(**UNET_CONFIG).eval()
    frozen = ScratchUNet2DConditionModel(**UNET_CONFIG).eval()
    frozen.load_state_dict(eager.state_dict())
    return eager, freeze_for_inference(frozen, onednn=onednn)


@pytest.fixture
def unet_pair():
    return _pair()


@pytest.mark.parametrize("onednn", [None, True])
@torch.no_grad()
def test_frozen_unet_equals_eager_per_shape_and_against_diffusers(onednn):
    from diffusers import UNet2DConditionModel

    eager, frozen = _pair(onednn)
    reference = UNet2DConditionModel(**UNET_CONFIG).eval()
    reference.load_state_dict(eager.state_dict())

    # Eager on the graph's convolution backend: the same kernels in the same order.
    def same_kernels():
        return contextlib.nullcontext() if onednn else onednn_enabled(False)

    # Two shapes (the second odd-sized, so the U-Net takes its other upsampling branch): a graph each.
    for inputs in (_inputs(2, 16), _inputs(1, 10, seed=1)):
        output = frozen(*inputs).sample
        with same_kernels():
            assert torch.equal(output, eager(*inputs).sample)
        torch.testing.assert_close(output, eager(*inputs).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(output, reference(*inputs).sample, rtol=0, atol=1e-5)
    assert len(frozen.forward.graphs) == 2
    # Python-number timesteps are read as the eager forward reads them; tuple output when return_dict=False.
    sample, _, context = _inputs()
    for timestep in (321, 321.5):
        (output,) = frozen(sample, timestep, context, return_dict=False)
        with same_kernels():
            assert torch.equal(output, eager(sample, timestep, context).sample)
    assert torch.backends.mkldnn.enabled  # the graph's backend choice does not leak out


@torch.no_grad()
def test_updated_weights_are_traced_again(unet_pair):
    eager, frozen = unet_pair
    inputs = _inputs()
    before = frozen(*inputs).sample
    for model in (eager, frozen):
        model.conv_in.weight.mul_(1.5)  # in place, as an optimiser step or load_state_dict would
    after = frozen(*inputs).sample
    assert not torch.equal(after, before)
    with onednn_enabled(False):
        assert torch.equal(after, eager(*inputs).sample)
    assert len(frozen.forward.graphs) == 1  # the stale graph was dropped


def test_calls_a_graph_cannot_stand_for_run_eagerly(unet_pair):
    eager, frozen = unet_pair
    inputs = _inputs()
    # Gradients enabled: the eager forward, so backward works.
    output = frozen(*inputs).sample
    assert output.requires_grad and not frozen.forward.graphs
    output.square().mean().backward()
    assert frozen.conv_in.weight.grad is not None
    with torch.no_grad():
        # Extra arguments (the LoRA scale) and training mode also go eager.
        scaled = frozen(*inputs, cross_attention_kwargs={"scale": 0.5}).sample
        assert torch.equal(scaled, eager(*inputs, cross_attention_kwargs={"scale": 0.5}).sample)
        frozen.train()
        frozen(*inputs)
        assert not frozen.forward.graphs


@torch.no_grad()
def test_unfreeze_restores_the_eager_forward_and_saving_is_unchanged(unet_pair, tmp_path):
    eager, frozen = unet_pair
    frozen(*_inputs())
    frozen.save_pretrained(tmp_path / "frozen")
    reloaded = ScratchUNet2DConditionModel.from_pretrained(tmp_path / "frozen").eval()
    assert not isinstance(reloaded.forward, FrozenForward)
    assert torch.equal(reloaded(*_inputs()).sample, eager(*_inputs()).sample)  # the same weights
    assert isinstance(frozen.forward, FrozenForward)
    unfreeze(frozen)
    assert not isinstance(frozen.forward, FrozenForward)
    assert "forward" not in vars(frozen)


@torch.no_grad()
def test_frozen_pipeline_equals_eager_and_diffusers():
    reference, ours = twin_pipelines()
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", height=32, width=32)
    eager = ours("a red heart", generator=torch.Generator().manual_seed(0), **kwargs).images
    freeze_for_inference(ours)
    assert isinstance(ours.unet.forward, FrozenForward)
    frozen = ours("a red heart", generator=torch.Generator().manual_seed(0), **kwargs).images
    expected = reference("a red heart", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(frozen - eager).max() <= 1e-5
    assert abs(frozen - expected).max() <= 1e-4


def test_rejects_what_it_cannot_freeze():
    with pytest.raises(ValueError, match="target must be"):
        freeze_for_inference("unet")
    from hf_scratch.models.vae import ScratchAutoencoderKL

    with pytest.raises(ValueError, match=r"U-Net whose forward is \(sample, timestep, encoder_hidden_states"):
        freeze_for_inference(ScratchAutoencoderKL())


@torch.no_grad()
def test_default_keeps_onednn_on_latents_larger_than_gemm_max_side(unet_pair):
    from hf_scratch.fast.frozen import GEMM_MAX_SIDE

    eager, frozen = unet_pair
    small, large = _inputs(1, GEMM_MAX_SIDE), _inputs(1, GEMM_MAX_SIDE + 8)
    assert torch.equal(frozen(*large).sample, eager(*large).sample)  # oneDNN, as eager
    with onednn_enabled(False):
        assert torch.equal(frozen(*small).sample, eager(*small).sample)
    assert sorted(onednn for _, onednn in frozen.forward.graphs.values()) == [False, True]
