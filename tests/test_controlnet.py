"""ScratchControlNetModel against diffusers' ControlNetModel, and diffusers' control pipelines on our U-Net.

Models are SD 1.5-shaped (`TINY_UNET_CONFIG`: three levels, cross-attention in the first two, a plain last level) at
small widths, with random weights; the official-layout folders are written by diffusers' own classes'
`save_pretrained`. Zero convolutions start at zero, so the reference ControlNets get random values there too
(`randomize_zero_parameters`), or every residual would be zero and prove nothing.

Tolerances: model outputs, relative error ||ours - ref|| / ||ref|| <= 1e-5 in float32; pipeline images (floats in
[0, 1]), max abs difference <= 1e-4.
"""

import copy

import numpy as np
import pytest
import torch
from _reference import (
    SD15_UNET_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    build_reference_unet,
    build_reference_vae,
    count_parameters,
    relative_error,
    scratch_twin,
)
from _tiny import TEXT_CONFIG, sd_ddim, tiny_tokenizer
from diffusers import (
    ControlNetModel,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import hf_scratch
from hf_scratch.models.controlnet import ScratchControlNetModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-5
IMAGE_TOLERANCE = 1e-4
UNET_CONFIG = {**TINY_UNET_CONFIG, "cross_attention_dim": TEXT_CONFIG["hidden_size"]}
CONDITION_CHANNELS = (8, 16)  # one stride-2 step: the condition image at the pixel size, as the tiny VAE's factor 2
SIZE = 32  # pixels; 16x16 latents


def randomize_zero_parameters(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every all-zero parameter (the zero convolutions, the norms' biases) seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def reference_controlnet(unet: UNet2DConditionModel, seed: int = 1) -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITION_CHANNELS)
    return randomize_zero_parameters(controlnet, seed).eval()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 7, UNET_CONFIG["cross_attention_dim"], generator=generator)
    condition = torch.rand(batch, 3, 16, 16, generator=generator)
    return sample, text, condition


def assert_same_residuals(ours, reference, *args, **kwargs) -> None:
    with torch.no_grad():
        actual, expected = ours(*args, **kwargs), reference(*args, **kwargs)
    pairs = [*zip(actual.down_block_res_samples, expected.down_block_res_samples)]
    pairs.append((actual.mid_block_res_sample, expected.mid_block_res_sample))
    assert len(actual.down_block_res_samples) == len(expected.down_block_res_samples)
    assert all(ours.shape == theirs.shape for ours, theirs in pairs)
    assert max(relative_error(ours, theirs) for ours, theirs in pairs) <= TOLERANCE


@pytest.fixture(scope="module")
def pair():
    """(diffusers' ControlNet, ours with the same weights)."""
    reference = reference_controlnet(build_reference_unet(UNET_CONFIG))
    return reference, scratch_twin(ScratchControlNetModel, reference)


def test_sd15_controlnet_has_diffusers_keys_and_shapes():
    with torch.device("meta"):
        reference = ControlNetModel.from_unet(UNet2DConditionModel(**SD15_UNET_CONFIG), load_weights_from_unet=False)
        ours = ScratchControlNetModel(**reference.config)
    assert count_parameters(ours) == count_parameters(reference) == 361_279_120  # diffusers' count at SD 1.5
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all(mine[key].shape == theirs[key].shape for key in theirs)


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess-mode"])
def test_residuals_match_diffusers(pair, guess_mode):
    reference, ours = pair
    sample, text, condition = _inputs()
    assert_same_residuals(ours, reference, sample, 5, text, condition, 0.7, guess_mode=guess_mode)


def test_return_dict_false_gives_the_two_residual_groups(pair):
    _, ours = pair
    sample, text, condition = _inputs(batch=1)
    with torch.no_grad():
        down, mid = ours(sample, 5, text, condition, return_dict=False)
        output = ours(sample, 5, text, condition)
    assert len(down) == 9 and all(torch.equal(a, b) for a, b in zip(down, output.down_block_res_samples))
    assert torch.equal(mid, output.mid_block_res_sample)


@pytest.mark.parametrize(
    "options, extra",
    [
        ({"controlnet_conditioning_channel_order": "bgr", "global_pool_conditions": True}, {}),
        ({"num_class_embeds": 3}, {"class_labels": torch.tensor([0, 2])}),
        ({"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
          "projection_class_embeddings_input_dim": 32},
         {"added_cond_kwargs": {"text_embeds": torch.randn(2, 8), "time_ids": torch.rand(2, 6) * 64}}),
        ({"num_attention_heads": 4, "transformer_layers_per_block": [1, 2, 1]}, {}),
    ],
    ids=["bgr-pooled", "class-table", "sdxl-text-time", "heads-layers"],
)  # fmt: skip
def test_configs_match_diffusers(options, extra):
    config = {**ControlNetModel.from_unet(UNet2DConditionModel(**UNET_CONFIG)).config, **options}
    torch.manual_seed(0)
    reference = randomize_zero_parameters(ControlNetModel.from_config(config)).eval()
    ours = scratch_twin(ScratchControlNetModel, reference)
    sample, text, _ = _inputs()
    condition = torch.rand(2, 3, 64, 64)  # the default condition encoder: 3 stride-2 steps
    assert_same_residuals(ours, reference, sample, 5, text, condition, 0.5, **extra)


def test_folders_load_both_ways(pair, tmp_path):
    reference, ours = pair
    sample, text, condition = _inputs()
    reference.save_pretrained(tmp_path / "diffusers")
    ours.save_pretrained(tmp_path / "ours")
    loaded_ours = hf_scratch.ScratchControlNetModel.from_pretrained(tmp_path / "diffusers").eval()
    loaded_reference = ControlNetModel.from_pretrained(tmp_path / "ours").eval()
    public = [key for key in reference.config if not key.startswith("_")]
    assert {key: loaded_ours.config[key] for key in public} == {key: loaded_reference.config[key] for key in public}
    assert_same_residuals(loaded_ours, reference, sample, 5, text, condition)
    assert_same_residuals(ours, loaded_reference, sample, 5, text, condition)


def test_from_unet_copies_the_encoder_as_diffusers_does():
    """From our U-Net or diffusers' (same weights): diffusers' config and weights, and zero residuals at first."""
    reference_unet = build_reference_unet(UNET_CONFIG)
    ours_unet = scratch_twin(ScratchUNet2DConditionModel, reference_unet)
    reference = ControlNetModel.from_unet(reference_unet, conditioning_embedding_out_channels=CONDITION_CHANNELS)
    ours = ScratchControlNetModel.from_unet(ours_unet, conditioning_embedding_out_channels=CONDITION_CHANNELS)
    assert dict(ours.config) == dict(reference.config)
    theirs = reference.state_dict()
    shared = [key for key in theirs if not key.startswith(("controlnet_", "controlnet_cond_embedding"))]
    assert all(torch.equal(ours.state_dict()[key], theirs[key]) for key in shared)
    assert torch.equal(ours.down_blocks[0].resnets[0].conv1.weight, ours_unet.down_blocks[0].resnets[0].conv1.weight)
    sample, text, condition = _inputs()
    with torch.no_grad():
        output = ours(sample, 5, text, condition)
    assert not any(residual.any() for residual in (*output.down_block_res_samples, output.mid_block_res_sample))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type='UNetMidBlock2D' is not supported"),
        ({"class_embed_type": "simple_projection"}, "class_embed_type='simple_projection' is not supported"),
        ({"down_block_types": ["DownBlock2D"]}, r"down_block_types=\['DownBlock2D'\] must list 3 entries"),
    ],
)
def test_rejects_unsupported_config(options, message):
    with pytest.raises(ValueError, match=message):
        ScratchControlNetModel(**{**dict(ScratchControlNetModel.from_unet(UNet2DConditionModel(**UNET_CONFIG)).config),
                                  **options})  # fmt: skip


def test_rejects_a_condition_with_the_wrong_channels(pair):
    _, ours = pair
    sample, text, condition = _inputs()
    with pytest.raises(ValueError, match=r"controlnet_cond has shape \(2, 1, 16, 16\); expected \(batch, 3"):
        ours(sample, 5, text, condition[:, :1])


# diffusers' ControlNet, T2I-Adapter and IP-Adapter pipelines, on our U-Net and on diffusers' with the same weights.


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Shared components, and both U-Nets: diffusers' and ours, loaded from the folder diffusers' U-Net saved."""
    folder = tmp_path_factory.mktemp("unet")
    build_reference_unet(UNET_CONFIG).save_pretrained(folder)
    torch.manual_seed(0)
    shared = {
        "vae": build_reference_vae(TINY_VAE_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval(),
        "tokenizer": tiny_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    unets = {
        "diffusers": UNet2DConditionModel.from_pretrained(folder).eval(),
        "ours": ScratchUNet2DConditionModel.from_pretrained(folder).eval(),
    }
    return shared, unets


def images(pipeline_class, shared: dict, unet, **call) -> np.ndarray:
    extra = {key: call.pop(key) for key in ("controlnet", "adapter") if key in call}
    pipe = pipeline_class(**shared, **extra, unet=unet, scheduler=sd_ddim())
    pipe.set_progress_bar_config(disable=True)
    load = call.pop("load", None)
    if load is not None:
        load(pipe)
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat", height=SIZE, width=SIZE, num_inference_steps=3, generator=generator, output_type="np",
                **call).images  # fmt: skip


def assert_same_images(pipeline_class, parts, **call) -> float:
    shared, unets = parts
    expected = images(pipeline_class, shared, unets["diffusers"], **dict(call))
    actual = images(pipeline_class, shared, unets["ours"], **dict(call))
    difference = float(np.abs(actual - expected).max())
    assert difference <= IMAGE_TOLERANCE, difference
    return difference


def condition_image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "call",
    [
        {"controlnet_conditioning_scale": 0.8},
        {"guess_mode": True},
        {"control_guidance_start": 0.3, "control_guidance_end": 0.7},
    ],
    ids=["scale", "guess-mode", "guidance-window"],
)
def test_controlnet_pipeline_on_our_unet_gives_diffusers_images(parts, call, tmp_path):
    shared, unets = parts
    reference_controlnet(unets["diffusers"]).save_pretrained(tmp_path)
    controlnet = ControlNetModel.from_pretrained(tmp_path).eval()
    plain = images(StableDiffusionPipeline, shared, unets["ours"])
    controlled = images(StableDiffusionControlNetPipeline, shared, unets["ours"], controlnet=controlnet,
                        image=condition_image(0), **call)  # fmt: skip
    assert np.abs(controlled - plain).max() > 0.01  # the ControlNet changes the image
    assert_same_images(
        StableDiffusionControlNetPipeline, parts, controlnet=controlnet, image=condition_image(0), **call
    )


def test_our_controlnets_in_diffusers_multi_controlnet_give_its_images(parts):
    """diffusers' pipeline takes a list of ControlNets as `MultiControlNetModel`; ours and diffusers' there, on our
    U-Net, against two of diffusers' on diffusers' U-Net."""
    shared, unets = parts
    references = [reference_controlnet(unets["diffusers"], seed) for seed in (1, 2)]
    ours = [scratch_twin(ScratchControlNetModel, reference) for reference in references]
    call = {"image": [condition_image(0), condition_image(1)], "controlnet_conditioning_scale": [0.6, 1.2]}
    expected = images(StableDiffusionControlNetPipeline, shared, unets["diffusers"], controlnet=references, **call)
    for controlnets in ([ours[0], references[1]], ours):
        actual = images(StableDiffusionControlNetPipeline, shared, unets["ours"], controlnet=controlnets, **call)
        assert np.abs(actual - expected).max() <= IMAGE_TOLERANCE


def test_adapter_pipeline_on_our_unet_gives_diffusers_images(parts, tmp_path):
    torch.manual_seed(3)
    T2IAdapter(channels=UNET_CONFIG["block_out_channels"], num_res_blocks=1, downscale_factor=2).save_pretrained(
        tmp_path
    )
    adapter = T2IAdapter.from_pretrained(tmp_path).eval()
    assert_same_images(StableDiffusionAdapterPipeline, parts, adapter=adapter, image=condition_image(0))


IMAGE_EMBED_DIM = 12


def write_ip_adapter(folder, unet: UNet2DConditionModel) -> None:
    """A random IP-Adapter in the official single-file layout (`image_proj.*` for the image projection, then
    `ip_adapter.{1, 3, 5, ...}.to_{k,v}_ip.weight` for each cross-attention layer in `attn_processors` order)."""
    generator = torch.Generator().manual_seed(4)
    cross_dim, tokens = unet.config.cross_attention_dim, 4

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    weights = {
        "image_proj.proj.weight": random(tokens * cross_dim, IMAGE_EMBED_DIM),
        "image_proj.proj.bias": random(tokens * cross_dim),
        "image_proj.norm.weight": 1 + random(cross_dim),
        "image_proj.norm.bias": random(cross_dim),
    }
    cross_attentions = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(cross_attentions):
        width = dict(unet.named_modules())[name.removesuffix(".processor")].to_out[0].out_features
        weights[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = random(width, cross_dim)
        weights[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = random(width, cross_dim)
    (folder / "models").mkdir()
    save_file(weights, folder / "models" / "ip-adapter_sd15.safetensors")


def test_ip_adapter_loads_on_our_unet_and_gives_diffusers_images(parts, tmp_path):
    shared, unets = parts[0], copy.deepcopy(parts[1])  # loading an IP-Adapter changes the U-Net
    write_ip_adapter(tmp_path, unets["diffusers"])

    def load(pipe) -> None:
        pipe.load_ip_adapter(tmp_path, subfolder="models", weight_name="ip-adapter_sd15.safetensors",
                             image_encoder_folder=None)  # fmt: skip
        pipe.set_ip_adapter_scale(0.7)

    negative_and_positive = torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(5))
    call = {"ip_adapter_image_embeds": [negative_and_positive], "load": load}
    plain = images(StableDiffusionPipeline, shared, unets["ours"])
    with_image = images(StableDiffusionPipeline, shared, unets["ours"], **call)
    assert np.abs(with_image - plain).max() > 0.01  # the image tokens change the image
    assert_same_images(StableDiffusionPipeline, (shared, unets), **call)
    assert type(unets["ours"].encoder_hid_proj).__name__ == "MultiIPAdapterImageProjection"


def test_shipped_model_with_a_controlnet_from_its_unet_gives_diffusers_images():
    """The shipped emoji32 U-Net, ours and diffusers' (same folder), each with a ControlNet copied from it by
    `from_unet` (ours, and diffusers' with the same weights), in diffusers' ControlNet pipeline."""
    from transformers import CLIPTokenizer

    from hf_scratch import ScratchAutoencoderKL, ScratchCLIPTextModel, default_model_path

    folder = default_model_path()
    ours_unet = ScratchUNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    reference_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    shared = {
        "vae": ScratchAutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).eval(),
        "text_encoder": ScratchCLIPTextModel.from_pretrained(folder, subfolder="text_encoder").float().eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    factor = 2 ** (len(shared["vae"].config.block_out_channels) - 1)
    channels = tuple(16 * 2**i for i in range(len(shared["vae"].config.block_out_channels)))  # one step per factor 2
    ours = randomize_zero_parameters(
        ScratchControlNetModel.from_unet(ours_unet, conditioning_embedding_out_channels=channels)
    ).eval()
    reference = ControlNetModel.from_config(ours.config)
    reference.load_state_dict(ours.state_dict())
    size = ours_unet.config.sample_size * factor
    condition = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def run(unet, controlnet) -> np.ndarray:
        pipe = StableDiffusionControlNetPipeline(**shared, unet=unet, controlnet=[controlnet], scheduler=sd_ddim())
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red heart", image=[condition], height=size, width=size, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    assert np.abs(run(ours_unet, ours) - run(reference_unet, reference.eval())).max() <= IMAGE_TOLERANCE
