"""Gradient checkpointing in the U-Net, the VAE and CLIP: the layers run again in the backward pass, and the gradients
are those of a plain backward pass.

Tolerance: rtol 1.3e-6 (float32's default) and atol 1e-7; recomputing a layer repeats its forward arithmetic exactly.
"""

from collections.abc import Callable

import pytest
import torch
from _reference import TINY_SD2_UNET_CONFIG, TINY_VAE_CONFIG
from _tiny import CLIP_TEXT_CONFIG, CLIP_VISION_CONFIG, prompt_batch

from hf_scratch.models.clip import ScratchCLIPConfig, ScratchCLIPModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import ScratchAutoencoderKL

Case = tuple[torch.nn.Module, Callable[[], torch.Tensor], Callable[[], None]]


def unet_case() -> Case:
    """The SD 2 layout (linear projections, two transformer layers in a block), on an ε-prediction-like loss."""
    model = ScratchUNet2DConditionModel(**TINY_SD2_UNET_CONFIG)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, model.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 7, model.config.cross_attention_dim, generator=generator)
    return model, lambda: model(sample, 10, text).sample.square().mean(), model.enable_gradient_checkpointing


def vae_case() -> Case:
    """Reconstruction plus KL through a posterior sample."""
    model = ScratchAutoencoderKL(**TINY_VAE_CONFIG)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def loss() -> torch.Tensor:
        posterior = model.encode(images).latent_dist
        reconstruction = model.decode(posterior.sample(torch.Generator().manual_seed(0))).sample
        return (reconstruction - images).square().mean() + 1e-6 * posterior.kl().mean()

    return model, loss, model.enable_gradient_checkpointing


def clip_case() -> Case:
    """Both towers, on the contrastive loss of a padded text batch."""
    config = ScratchCLIPConfig(text_config=CLIP_TEXT_CONFIG, vision_config=CLIP_VISION_CONFIG, projection_dim=24)
    model = ScratchCLIPModel(config)
    input_ids, attention_mask = prompt_batch(12, [3, 7], bos=97, eos=98, pad=98)
    pixel_values = torch.randn(2, 3, 32, 32)

    def loss() -> torch.Tensor:
        return model(input_ids, pixel_values, attention_mask=attention_mask, return_loss=True).loss

    return model, loss, model.activation_checkpointing_enable


def forward_calls_and_gradients(
    model: torch.nn.Module, loss: Callable[[], torch.Tensor]
) -> tuple[int, dict[str, torch.Tensor]]:
    """How many module forward calls one backward step makes (a checkpointed layer runs twice), and the gradients."""
    calls = 0

    def count(*_) -> None:
        nonlocal calls
        calls += 1

    handles = [module.register_forward_hook(count) for module in model.modules()]
    model.zero_grad()
    loss().backward()
    for handle in handles:
        handle.remove()
    return calls, {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("case", [unet_case, vae_case, clip_case], ids=["unet", "vae", "clip"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(case):
    torch.manual_seed(0)
    model, loss, enable_checkpointing = case()
    model.train()
    plain_calls, plain = forward_calls_and_gradients(model, loss)

    enable_checkpointing()
    checkpointed_calls, checkpointed = forward_calls_and_gradients(model, loss)

    assert checkpointed_calls > plain_calls, "no layer ran again in the backward pass"
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1.3e-6, atol=1e-7, msg=name)
