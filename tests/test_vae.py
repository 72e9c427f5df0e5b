"""ScratchAutoencoderKL against diffusers' AutoencoderKL with the same weights.

Parity tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-5 in float32.
"""

import json
import math

import pytest
import torch
from _reference import (
    SD15_VAE_CONFIG,
    SD15_VAE_PARAMETERS,
    TINY_VAE_CONFIG,
    build_reference_vae,
    count_parameters,
    free,
    relative_error,
    scratch_twin,
)
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as ReferenceDistribution

import hf_scratch
from hf_scratch.models.vae import DiagonalGaussianDistribution, ScratchAutoencoderKL

TOLERANCE = 1e-5


def _images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(batch: int = 2, size: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_pair():
    reference = build_reference_vae(TINY_VAE_CONFIG)
    return reference, scratch_twin(ScratchAutoencoderKL, reference)


@pytest.fixture(scope="module")
def full_pair():
    reference = build_reference_vae(SD15_VAE_CONFIG)
    ours = scratch_twin(ScratchAutoencoderKL, reference)
    yield reference, ours
    free(reference, ours)


def test_full_size_state_dict_equals_diffusers():
    with torch.device("meta"):
        ours = ScratchAutoencoderKL(**SD15_VAE_CONFIG)
        reference = AutoencoderKL(**SD15_VAE_CONFIG).state_dict()
    assert count_parameters(ours) == SD15_VAE_PARAMETERS
    assert round(count_parameters(ours) / 1e6, 1) == 83.7
    ours = ours.state_dict()
    assert sorted(ours) == sorted(reference)
    assert all(ours[key].shape == reference[key].shape for key in reference)


def test_scaling_factor_default():
    assert ScratchAutoencoderKL(**TINY_VAE_CONFIG).config.scaling_factor == 0.18215


def test_tiny_encode_decode_parity(tiny_pair):
    reference, ours = tiny_pair
    images, latents = _images(), _latents(size=16)
    with torch.no_grad():
        expected, actual = reference.encode(images).latent_dist, ours.encode(images).latent_dist
        assert relative_error(actual.mean, expected.mean) <= TOLERANCE
        assert relative_error(actual.logvar, expected.logvar) <= TOLERANCE
        assert relative_error(ours.decode(latents).sample, reference.decode(latents).sample) <= TOLERANCE
        assert relative_error(ours(images).sample, reference(images).sample) <= TOLERANCE
        sampled = ours(images, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        expected = reference(images, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        assert relative_error(sampled, expected) <= TOLERANCE


def test_without_quant_convs_and_mid_attention_matches_diffusers():
    options = {"use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False}
    config = {**TINY_VAE_CONFIG, **options}
    reference = build_reference_vae(config)
    ours = scratch_twin(ScratchAutoencoderKL, reference)
    images = _images()
    with torch.no_grad():
        assert relative_error(ours(images).sample, reference(images).sample) <= TOLERANCE


@pytest.mark.slow
def test_full_size_parity(full_pair):
    reference, ours = full_pair
    images, latents = _images(batch=1, size=64), _latents(batch=1, size=8)
    with torch.no_grad():
        expected, actual = reference.encode(images).latent_dist, ours.encode(images).latent_dist
        assert relative_error(actual.mean, expected.mean) <= TOLERANCE
        assert relative_error(actual.logvar, expected.logvar) <= TOLERANCE
        assert relative_error(ours.decode(latents).sample, reference.decode(latents).sample) <= TOLERANCE


def test_posterior_api_matches_diffusers():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(4)) * 3
    moments[:, 4:, 0, 0] = torch.tensor([-50.0, 50.0])[:, None]  # outside the log-variance clamp
    ours, reference = DiagonalGaussianDistribution(moments), ReferenceDistribution(moments)
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(ours.std.square(), ours.var)
    assert torch.equal(ours.mode(), ours.mean)
    assert torch.equal(
        ours.sample(torch.Generator().manual_seed(5)), reference.sample(torch.Generator().manual_seed(5))
    )
    other_moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(6))
    other, reference_other = DiagonalGaussianDistribution(other_moments), ReferenceDistribution(other_moments)
    torch.testing.assert_close(ours.kl(), reference.kl())
    torch.testing.assert_close(ours.kl(other), reference.kl(reference_other))
    sample = ours.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.nll(sample), reference.nll(sample))
    assert ours.kl().shape == (2,)


def test_kl_to_standard_normal_is_zero_for_standard_normal():
    posterior = DiagonalGaussianDistribution(torch.zeros(1, 8, 2, 2))
    assert torch.equal(posterior.kl(), torch.zeros(1))
    # -log N(0; 0, 1) per dimension is log(2π)/2, over 4 x 2 x 2 dimensions.
    torch.testing.assert_close(posterior.nll(torch.zeros(1, 4, 2, 2)), torch.tensor([8 * math.log(2 * math.pi)]))


def test_slicing_equals_unsliced(tiny_pair):
    _, ours = tiny_pair
    images, latents = _images(batch=3), _latents(batch=3)
    with torch.no_grad():
        moments, decoded = ours.encode(images).latent_dist.parameters, ours.decode(latents).sample
        ours.enable_slicing()
        try:
            # Equal up to float rounding: batched convolutions may sum in another order than single-image ones.
            assert relative_error(ours.encode(images).latent_dist.parameters, moments) <= TOLERANCE
            assert relative_error(ours.decode(latents).sample, decoded) <= TOLERANCE
        finally:
            ours.disable_slicing()


@pytest.mark.parametrize("latent_size", [16, 40, 37])
def test_tiled_decode_equals_diffusers_tiled_decode(tiny_pair, latent_size):
    reference, ours = tiny_pair
    latents = _latents(batch=1, size=latent_size)
    reference.enable_tiling()
    ours.enable_tiling()
    try:
        with torch.no_grad():
            expected, actual = reference.decode(latents).sample, ours.decode(latents).sample
    finally:
        reference.disable_tiling()
        ours.disable_tiling()
    assert actual.shape == (1, 3, 2 * latent_size, 2 * latent_size)
    assert relative_error(actual, expected) <= TOLERANCE


def test_tiled_encode_equals_diffusers_tiled_encode(tiny_pair):
    reference, ours = tiny_pair
    images = _images(batch=1, size=80)
    reference.enable_tiling()
    ours.enable_tiling()
    try:
        with torch.no_grad():
            expected, actual = reference.encode(images).latent_dist, ours.encode(images).latent_dist
    finally:
        reference.disable_tiling()
        ours.disable_tiling()
    assert ours.tile_sample_min_size == 32 and ours.tile_latent_min_size == 16 and ours.tile_overlap_factor == 0.25
    assert relative_error(actual.parameters, expected.parameters) <= TOLERANCE


def test_round_trip_ours_to_diffusers(tmp_path):
    ours = ScratchAutoencoderKL(**TINY_VAE_CONFIG).eval()
    ours.save_pretrained(tmp_path)
    reference = AutoencoderKL.from_pretrained(tmp_path).eval()
    for key, value in TINY_VAE_CONFIG.items():
        assert reference.config[key] == value, key
    images = _images()
    with torch.no_grad():
        assert relative_error(ours(images).sample, reference(images).sample) <= TOLERANCE


def test_round_trip_diffusers_to_ours(tmp_path):
    reference = build_reference_vae(TINY_VAE_CONFIG)
    reference.save_pretrained(tmp_path)
    ours = hf_scratch.ScratchAutoencoderKL.from_pretrained(tmp_path).eval()
    public_keys = [key for key in ours.config if not key.startswith("_")]
    assert {key: ours.config[key] for key in public_keys} == {key: reference.config[key] for key in public_keys}
    images = _images()
    with torch.no_grad():
        assert relative_error(ours(images).sample, reference(images).sample) <= TOLERANCE


def test_rejects_wrong_channel_counts(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 32, 32\); expected \(batch, 3"):
        ours.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"z has shape \(1, 3, 8, 8\); expected \(batch, 4"):
        ours.decode(torch.randn(1, 3, 8, 8))


def test_rejects_unsupported_block_types():
    with pytest.raises(ValueError, match="down_block_types=.*'DownEncoderBlock2D' repeated once per block_out_chan"):
        ScratchAutoencoderKL(**{**TINY_VAE_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})


def test_checkpoint_not_fitting_config_names_offending_keys(tmp_path):
    ScratchAutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mid_block_add_attention": False}))
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.mid_block\.attentions\.0\.group_norm\.bias"):
        ScratchAutoencoderKL.from_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=r"Unable to load weights from.*diffusion_pytorch_model\.safetensors"):
        ScratchAutoencoderKL.from_pretrained(tmp_path)
