"""Guidance other than plain classifier-free guidance (`hf_scratch.pipelines.guidance`), each checked against an
independent computation: a denoising loop written out here from the papers' equations, calling the shipped flow
model's U-Net and Euler steps directly."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

from hf_scratch import ScratchStableDiffusionPipeline, default_model_path
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.pipelines.guidance import IntervalGuidance, ModelAutoGuidance, noise_level
from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["red heart, twemoji style", "grinning face, noto style", "rocket, openmoji style"]
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
    pipe.scheduler = ScratchFlowMatchEulerScheduler.from_config(pipe.scheduler.config)  # the loop written out below
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators():
    return [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]


def draw(pipe, **kwargs):
    kwargs.setdefault("guidance_scale", 4.0)
    return pipe(PROMPTS, num_inference_steps=STEPS, generator=generators(), output_type="latent", **kwargs).images


@torch.no_grad()
def loop_by_hand(pipe, mix, guide=None):
    """Euler on the flow, x_{σ'} = x_σ + (σ' − σ) v̂ with v̂ = mix(σ, v_uncond, v_cond, v_guide), from the same noise."""
    cond = pipe._encode_text(PROMPTS, "cpu", None)
    uncond = pipe._encode_text([""] * len(PROMPTS), "cpu", None)
    shape = pipe.latent_shape(len(PROMPTS), 32, 32)
    x = torch.stack([torch.randn(shape[1:], generator=g) for g in generators()])
    scheduler = ScratchFlowMatchEulerScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas
    for i in range(STEPS):
        t = sigmas[i] * 1000
        v_cond = pipe.unet(x, t, encoder_hidden_states=cond).sample
        v_uncond = pipe.unet(x, t, encoder_hidden_states=uncond).sample
        v_guide = None if guide is None else guide(x, t, encoder_hidden_states=cond).sample
        edm_sigma = math.inf if sigmas[i] >= 1 else float(sigmas[i] / (1 - sigmas[i]))
        x = x + (sigmas[i + 1] - sigmas[i]) * mix(edm_sigma, v_uncond, v_cond, v_guide)
    return x


def test_interval_covering_every_noise_level_is_classifier_free_guidance(pipe):
    assert torch.equal(draw(pipe, guider=IntervalGuidance(4.0, 0.0, math.inf)), draw(pipe))
    assert torch.equal(draw(pipe, guider=ClassifierFreeGuidance(4.0)), draw(pipe))


def test_interval_guides_only_inside_it_and_saves_the_other_batches(pipe):
    low, high, w = 0.3, 3.0, 5.0

    def mix(sigma, v_uncond, v_cond, _):
        return v_uncond + w * (v_cond - v_uncond) if low < sigma <= high else v_cond

    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].shape[0]))
    try:
        drawn = draw(pipe, guider=IntervalGuidance(w, low, high))
    finally:
        hook.remove()
    torch.testing.assert_close(drawn, loop_by_hand(pipe, mix), atol=2e-5, rtol=1e-4)
    scheduler = ScratchFlowMatchEulerScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    inside = [low < (math.inf if s >= 1 else s / (1 - s)) <= high for s in scheduler.sigmas[:-1].tolist()]
    assert 0 < sum(inside) < STEPS
    assert batches == [2 * len(PROMPTS) if guided else len(PROMPTS) for guided in inside]
    # An interval that holds no step is the conditional prediction alone.
    assert torch.equal(draw(pipe, guider=IntervalGuidance(w, 100.0, 200.0)), draw(pipe, guidance_scale=1.0))


def test_autoguidance_with_the_main_model_as_guide_is_the_conditional_prediction(pipe):
    torch.testing.assert_close(
        draw(pipe, guider=ModelAutoGuidance(pipe.unet, 3.0)), draw(pipe, guidance_scale=1.0), atol=1e-5, rtol=1e-5
    )


def test_autoguidance_mixes_the_guide_and_the_main_model_as_karras_et_al(pipe):
    torch.manual_seed(0)
    guide = ScratchUNet2DConditionModel.from_config(
        {**pipe.unet.config, "block_out_channels": (32, 64, 64), "attention_head_dim": 8}
    ).eval()
    w = 2.5

    def mix(_, v_uncond, v_cond, v_guide):
        return v_guide + w * (v_cond - v_guide)

    torch.testing.assert_close(
        draw(pipe, guider=ModelAutoGuidance(guide, w)), loop_by_hand(pipe, mix, guide), atol=2e-5, rtol=1e-4
    )


def test_apg_without_projection_is_cfg_and_with_it_drops_the_parallel_part(pipe):
    off = AdaptiveProjectedGuidance(4.0, adaptive_projected_guidance_rescale=0.0, eta=1.0)
    torch.testing.assert_close(draw(pipe, guider=off), draw(pipe), atol=1e-5, rtol=1e-5)
    w = 6.0

    def mix(_, v_uncond, v_cond, __):  # Sadat et al. 2024, Eq. 8-10 with η = 0: only the orthogonal part of Δv
        delta = (v_cond - v_uncond).double()
        unit = v_cond.double() / v_cond.double().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        parallel = (delta * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
        return v_uncond + w * (delta - parallel).float()

    apg = AdaptiveProjectedGuidance(w, adaptive_projected_guidance_rescale=0.0, eta=0.0)
    torch.testing.assert_close(draw(pipe, guider=apg), loop_by_hand(pipe, mix), atol=2e-5, rtol=1e-4)


def test_noise_level_is_edm_sigma():
    flow = ScratchFlowMatchEulerScheduler()
    assert noise_level(flow, 500.0) == pytest.approx(1.0)
    assert noise_level(flow, 1000.0) == math.inf
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[400].item()
    assert noise_level(ddpm, 400) == pytest.approx(math.sqrt((1 - alpha_bar) / alpha_bar), rel=1e-5)


def test_bad_guiders_are_refused_by_name(pipe):
    with pytest.raises(TypeError, match="`guider` must be a diffusers guider"):
        draw(pipe, guider=lambda cond, uncond: cond)
    with pytest.raises(ValueError, match="`guidance_rescale`"):
        draw(pipe, guider=ClassifierFreeGuidance(4.0), guidance_rescale=0.5)
    with pytest.raises(ValueError, match="sigma_low < sigma_high"):
        IntervalGuidance(4.0, 2.0, 1.0)
    other = ScratchUNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 4, "out_channels": 4})
    with pytest.raises(ValueError, match="guide model's in_channels"):
        draw(pipe, guider=ModelAutoGuidance(other, 2.0))


def test_a_model_folders_sampling_json_gives_the_pipeline_its_guidance(pipe, tmp_path):
    import json
    import shutil

    from hf_scratch.sampling import sampling_kwargs

    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    torch.manual_seed(0)
    guide = ScratchUNet2DConditionModel.from_config({**pipe.unet.config, "block_out_channels": (32, 64, 64)})
    guide.save_pretrained(folder / "my-guide")
    (folder / "sampling.json").write_text(
        json.dumps({"num_inference_steps": STEPS, "guidance_kind": "auto", "guidance_scale": 2.5, "guide": "my-guide"})
    )
    kwargs = sampling_kwargs(folder)
    assert kwargs["num_inference_steps"] == STEPS and isinstance(kwargs["guider"], ModelAutoGuidance)
    expected = draw(pipe, guider=ModelAutoGuidance(guide.eval(), 2.5))
    kwargs.pop("num_inference_steps")
    torch.testing.assert_close(draw(pipe, **kwargs), expected, atol=1e-6, rtol=1e-6)
