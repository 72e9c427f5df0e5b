"""ScratchUNet2DConditionModel against diffusers' UNet2DConditionModel with the same weights.

Parity tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-5 in float32.
"""

import json

import pytest
import torch
from _reference import (
    SD2_UNET_CONFIG,
    SD2_UNET_PARAMETERS,
    SD15_UNET_CONFIG,
    SD15_UNET_PARAMETERS,
    TINY_SD2_UNET_CONFIG,
    TINY_UNET_CONFIG,
    build_reference_unet,
    count_parameters,
    free,
    relative_error,
    scratch_twin,
)
from diffusers import UNet2DConditionModel

import hf_scratch
from hf_scratch.models.unet import ScratchUNet2DConditionModel

TOLERANCE = 1e-5
TINY_CONFIGS = {"sd1-layout": TINY_UNET_CONFIG, "sd2-layout": TINY_SD2_UNET_CONFIG}
FULL_CONFIGS = {"sd1.5": SD15_UNET_CONFIG, "sd2": SD2_UNET_CONFIG}


def _inputs(config: dict, batch: int = 2, size: int = 8, tokens: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, config["in_channels"], size, size, generator=generator)
    text = torch.randn(batch, tokens, config["cross_attention_dim"], generator=generator)
    return sample, text


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_pair(request):
    reference = build_reference_unet(TINY_CONFIGS[request.param])
    return reference, scratch_twin(ScratchUNet2DConditionModel, reference)


@pytest.fixture(scope="module", params=sorted(FULL_CONFIGS))
def full_pair(request):
    reference = build_reference_unet(FULL_CONFIGS[request.param])
    ours = scratch_twin(ScratchUNet2DConditionModel, reference)
    yield reference, ours
    free(reference, ours)


@pytest.mark.parametrize(
    "config, parameters", [(SD15_UNET_CONFIG, SD15_UNET_PARAMETERS), (SD2_UNET_CONFIG, SD2_UNET_PARAMETERS)]
)
def test_full_size_state_dict_equals_diffusers(config, parameters):
    with torch.device("meta"):
        ours = ScratchUNet2DConditionModel(**config).state_dict()
        reference = UNet2DConditionModel(**config)
    assert count_parameters(reference) == parameters
    reference = reference.state_dict()
    assert sorted(ours) == sorted(reference)
    assert all(ours[key].shape == reference[key].shape for key in reference)
    assert sum(tensor.numel() for tensor in ours.values()) == parameters


def test_sd15_parameter_count_is_859_5_million():
    with torch.device("meta"):
        ours = ScratchUNet2DConditionModel(**SD15_UNET_CONFIG)
    assert round(count_parameters(ours) / 1e6, 1) == 859.5


@pytest.mark.parametrize(
    "timestep", [10, 10.0, torch.tensor(10), torch.tensor([10]), torch.tensor([10, 500])], ids=repr
)
def test_tiny_parity(tiny_pair, timestep):
    reference, ours = tiny_pair
    sample, text = _inputs(reference.config)
    with torch.no_grad():
        expected = reference(sample, timestep, text).sample
        actual = ours(sample, timestep, text).sample
    assert actual.shape == sample.shape
    assert relative_error(actual, expected) <= TOLERANCE


def test_return_dict_false_gives_tuple(tiny_pair):
    _, ours = tiny_pair
    sample, text = _inputs(ours.config, batch=1)
    with torch.no_grad():
        (output,) = ours(sample, 3, text, return_dict=False)
        assert torch.equal(output, ours(sample, 3, text).sample)


@pytest.mark.parametrize(
    "options",
    [
        {"center_input_sample": True, "only_cross_attention": [True, False, False]},
        {"mid_block_scale_factor": 1.414, "layers_per_block": [1, 2, 1], "downsample_padding": 0, "act_fn": "mish"},
        {"flip_sin_to_cos": False, "freq_shift": 1, "conv_in_kernel": 1, "conv_out_kernel": 1, "norm_eps": 1e-3},
    ],
    ids=["center-cross-only", "scales-layers", "embedding-kernels"],
)
def test_non_default_options_match_diffusers(options):
    config = {**TINY_UNET_CONFIG, **options}
    reference = build_reference_unet(config)
    ours = scratch_twin(ScratchUNet2DConditionModel, reference)
    sample, text = _inputs(config)
    with torch.no_grad():
        assert relative_error(ours(sample, 7, text).sample, reference(sample, 7, text).sample) <= TOLERANCE


@pytest.mark.slow
def test_full_size_parity(full_pair):
    reference, ours = full_pair
    sample, text = _inputs(reference.config, batch=1, size=16, tokens=77)
    with torch.no_grad():
        expected = reference(sample, 981, text).sample
        actual = ours(sample, 981, text).sample
    assert relative_error(actual, expected) <= TOLERANCE


def test_round_trip_ours_to_diffusers(tmp_path):
    ours = ScratchUNet2DConditionModel(**TINY_SD2_UNET_CONFIG).eval()
    ours.save_pretrained(tmp_path)
    reference = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    for key, value in TINY_SD2_UNET_CONFIG.items():
        assert reference.config[key] == value, key
    sample, text = _inputs(ours.config)
    with torch.no_grad():
        assert relative_error(ours(sample, 5, text).sample, reference(sample, 5, text).sample) <= TOLERANCE


def test_round_trip_diffusers_to_ours(tmp_path):
    reference = build_reference_unet(TINY_SD2_UNET_CONFIG)
    reference.save_pretrained(tmp_path)
    ours = hf_scratch.ScratchUNet2DConditionModel.from_pretrained(tmp_path).eval()
    public_keys = [key for key in ours.config if not key.startswith("_")]
    assert {key: ours.config[key] for key in public_keys} == {key: reference.config[key] for key in public_keys}
    sample, text = _inputs(ours.config)
    with torch.no_grad():
        assert relative_error(ours(sample, 5, text).sample, reference(sample, 5, text).sample) <= TOLERANCE


def test_loads_hub_style_config_with_only_sd_keys(tmp_path):
    """The SD 1.5 Hub config.json lists only the keys in SD15_UNET_CONFIG; the rest take their defaults."""
    reference = build_reference_unet(TINY_UNET_CONFIG)
    reference.save_pretrained(tmp_path)
    minimal = {"_class_name": "UNet2DConditionModel", **TINY_UNET_CONFIG}
    (tmp_path / "config.json").write_text(json.dumps(minimal))
    ours = ScratchUNet2DConditionModel.from_pretrained(tmp_path).eval()
    sample, text = _inputs(TINY_UNET_CONFIG)
    with torch.no_grad():
        assert relative_error(ours(sample, 5, text).sample, reference(sample, 5, text).sample) <= TOLERANCE


@pytest.mark.parametrize("height, width", [(9, 8), (8, 6), (6, 6), (5, 3), (1, 1)])
def test_latent_sizes_not_divisible_by_the_downsampling_match_diffusers(tiny_pair, height, width):
    """diffusers' U-Net runs any size, upsampling to each skip's size on the way up; ours gives its outputs."""
    reference, ours = tiny_pair
    sample = torch.randn(2, 4, height, width)
    text = torch.randn(2, 7, ours.config.cross_attention_dim)
    with torch.no_grad():
        expected = reference(sample, 1, text).sample
        assert expected.shape == sample.shape
        torch.testing.assert_close(ours(sample, 1, text).sample, expected, rtol=1e-5, atol=1e-6)


def test_the_shipped_unet_runs_24_pixel_images_as_diffusers_does():
    """6x6 latents (24 px) through the shipped model's three levels: 6 → 3 → 2 on the way down."""
    from diffusers import UNet2DConditionModel

    from hf_scratch import default_model_path

    folder = default_model_path()
    ours = ScratchUNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    sample = torch.randn(1, ours.config.in_channels, 6, 6)
    text = torch.randn(1, 32, ours.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(sample, 10, text).sample, reference(sample, 10, text).sample)


def test_rejects_wrong_cross_attention_dim(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(1, 7, 25\).*24"):
        ours(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 7, 25))


def test_rejects_wrong_channel_count(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match=r"sample has shape \(1, 3, 8, 8\); expected \(batch, 4"):
        ours(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 7, 24))


@pytest.mark.parametrize(
    "option, message",
    [
        ({"class_embed_type": "learned"}, "class_embed_type='learned' is not supported; allowed"),
        ({"addition_embed_type": "text_image"}, "addition_embed_type='text_image' is not supported"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier' is not supported"),
        ({"class_embed_type": "projection"}, "needs projection_class_embeddings_input_dim"),
        ({"addition_embed_type": "text_time"}, "needs addition_time_embed_dim"),
        ({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}, "must list 3 entries"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D"]}, "up_block_types="),
        ({"attention_head_dim": [2, 2]}, r"attention_head_dim=\[2, 2\] must have one entry per down block \(3\)"),
        ({"act_fn": "tanh"}, "act_fn='tanh' is not supported"),
        ({"resnet_out_scale_factor": 2.0}, "resnet_out_scale_factor=2.0 is not supported"),
    ],
)
def test_rejects_unsupported_config(option, message):
    with pytest.raises(ValueError, match=message):
        ScratchUNet2DConditionModel(**{**TINY_UNET_CONFIG, **option})


def test_truncated_or_missing_weights_file_is_named(tmp_path):
    ScratchUNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=r"Unable to load weights from.*diffusion_pytorch_model\.safetensors"):
        ScratchUNet2DConditionModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model"):
        ScratchUNet2DConditionModel.from_pretrained(tmp_path)


def test_checkpoint_not_fitting_config_names_offending_keys(tmp_path):
    ScratchUNet2DConditionModel(**{**TINY_UNET_CONFIG, "transformer_layers_per_block": 2}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "transformer_layers_per_block": 1}))
    with pytest.raises(ValueError, match=r"unexpected keys: down_blocks\.0\.attentions\.0\.transformer_blocks\.1\."):
        ScratchUNet2DConditionModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 32}))
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight expected shape torch\.Size\(\[16, 32\]\)"):
        ScratchUNet2DConditionModel.from_pretrained(tmp_path)


# diffusers' forward extras: ControlNet and T2I-Adapter residuals, masks, class labels, timestep_cond, added conditions.


def _skip_shapes(config: dict, batch: int, size: int) -> list[tuple[int, ...]]:
    """Shapes of the U-Net's skips (conv_in's output, then each down-block layer's), finest first."""
    shapes, channels = [(batch, config["block_out_channels"][0], size, size)], config["block_out_channels"]
    for i, width in enumerate(channels):
        shapes += [(batch, width, size, size)] * config["layers_per_block"]
        if i < len(channels) - 1:
            size //= 2
            shapes.append((batch, width, size, size))
    return shapes


def _compare(reference, ours, *args, **kwargs) -> float:
    with torch.no_grad():
        return relative_error(ours(*args, **kwargs).sample, reference(*args, **kwargs).sample)


def test_controlnet_residuals_match_diffusers(tiny_pair):
    reference, ours = tiny_pair
    sample, text = _inputs(reference.config)
    down = [torch.randn(shape) for shape in _skip_shapes(reference.config, 2, 8)]
    mid = torch.randn(2, reference.config.block_out_channels[-1], 2, 2)
    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    assert _compare(reference, ours, sample, 3, text, **residuals) <= TOLERANCE
    with pytest.raises(ValueError, match=r"down_block_additional_residuals has 8 tensors; this U-Net has 9 skip"):
        ours(sample, 3, text, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


@pytest.mark.parametrize("keyword", ["down_intrablock_additional_residuals", "down_block_additional_residuals"])
def test_t2i_adapter_residuals_match_diffusers(tiny_pair, keyword):
    """One feature map per level (the older call passes them as `down_block_additional_residuals`, no mid)."""
    reference, ours = tiny_pair
    sample, text = _inputs(reference.config)
    widths = reference.config.block_out_channels
    features = [torch.randn(2, width, 8 >> i, 8 >> i) for i, width in enumerate(widths)]
    with torch.no_grad():
        expected = reference(sample, 3, text, **{keyword: [f.clone() for f in features]}).sample
        actual = ours(sample, 3, text, **{keyword: features}).sample
    assert relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual, ours(sample, 3, text).sample) > 0.01


def test_encoder_attention_mask_matches_diffusers(tiny_pair):
    reference, ours = tiny_pair
    sample, text = _inputs(reference.config)
    mask = torch.ones(2, text.shape[1])
    mask[0, 4:] = 0
    assert _compare(reference, ours, sample, 3, text, encoder_attention_mask=mask) <= TOLERANCE
    with torch.no_grad():  # the masked tokens no longer matter
        masked = ours(sample, 3, text, encoder_attention_mask=mask).sample
        text[0, 4:] = 100.0
        assert relative_error(ours(sample, 3, text, encoder_attention_mask=mask).sample, masked) <= TOLERANCE


def test_self_attention_mask_matches_diffusers():
    """diffusers applies `attention_mask` to every self-attention, so all of them must see as many pixels as the mask
    has entries: a U-Net whose attention sits at one resolution."""
    config = {**TINY_UNET_CONFIG, "block_out_channels": [16, 32], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}  # fmt: skip
    reference = build_reference_unet(config)
    ours = scratch_twin(ScratchUNet2DConditionModel, reference)
    sample, text = _inputs(config)
    mask = (torch.rand(2, 16) > 0.3).float()
    assert _compare(reference, ours, sample, 3, text, attention_mask=mask) <= TOLERANCE


@pytest.mark.parametrize(
    "options, extra",
    [
        ({"num_class_embeds": 5}, {"class_labels": torch.tensor([1, 4])}),
        ({"class_embed_type": "timestep"}, {"class_labels": torch.tensor([10, 900])}),
        ({"class_embed_type": "identity"}, {"class_labels": torch.randn(2, 64)}),
        ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": 6},
         {"class_labels": torch.randn(2, 6)}),
        ({"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 6},
         {"class_labels": torch.randn(2, 6)}),
        ({"num_class_embeds": 5, "class_embeddings_concat": True}, {"class_labels": torch.tensor([0, 3])}),
        ({"time_cond_proj_dim": 10}, {"timestep_cond": torch.randn(2, 10)}),
        ({"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
          "projection_class_embeddings_input_dim": 32},
         {"added_cond_kwargs": {"text_embeds": torch.randn(2, 8), "time_ids": torch.rand(2, 6) * 64}}),
    ],
    ids=["class-table", "class-timestep", "class-identity", "class-projection", "class-linear", "class-concat",
         "lcm-timestep-cond", "sdxl-text-time"],
)  # fmt: skip
def test_embedding_configs_match_diffusers(options, extra):
    """Each config builds diffusers' parameters (strict keys in `scratch_twin`) and gives its outputs."""
    config = {**TINY_UNET_CONFIG, **options}
    reference = build_reference_unet(config)
    ours = scratch_twin(ScratchUNet2DConditionModel, reference)
    sample, text = _inputs(config)
    assert _compare(reference, ours, sample, 7, text, **extra) <= TOLERANCE
    if "timestep_cond" not in extra:  # LCM's condition is optional; the others are not
        with pytest.raises(
            ValueError, match=r"class_labels is None|added_cond_kwargs lacks \['text_embeds', 'time_ids'\]"
        ):
            ours(sample, 7, text)


def test_timestep_cond_without_time_cond_proj_dim_is_refused(tiny_pair):
    _, ours = tiny_pair
    sample, text = _inputs(ours.config)
    with pytest.raises(ValueError, match="timestep_cond was given, but this model has time_cond_proj_dim=None"):
        ours(sample, 7, text, timestep_cond=torch.randn(2, 10))


def test_text_projection_config_matches_diffusers():
    config = {**TINY_UNET_CONFIG, "encoder_hid_dim": 40}
    reference = build_reference_unet(config)
    ours = scratch_twin(ScratchUNet2DConditionModel, reference)
    assert ours.config.encoder_hid_dim_type == reference.config.encoder_hid_dim_type == "text_proj"
    sample, _ = _inputs(config)
    assert _compare(reference, ours, sample, 7, torch.randn(2, 5, 40)) <= TOLERANCE


def test_cross_attention_kwargs_no_processor_takes_are_refused(tiny_pair):
    _, ours = tiny_pair
    sample, text = _inputs(ours.config)
    with pytest.raises(ValueError, match=r"no attention processor of this U-Net takes \(\['gligen'\]\)"):
        ours(sample, 1, text, cross_attention_kwargs={"gligen": {}})


def test_attention_layers_enumerate_in_diffusers_order(tiny_pair):
    """down, up, then mid: IP-Adapter weight files number the cross-attention layers in this order."""
    reference, ours = tiny_pair
    assert list(ours.attn_processors) == list(reference.attn_processors)
