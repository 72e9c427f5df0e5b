"""Tests for `hf_scratch.metrics`: each metric against a hand computation, a closed form or an independent
implementation (numpy, scipy), and the pixel convention that emoji-bench and the training scripts share."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.signal import correlate2d

from hf_scratch.metrics import (
    SSIM_K1,
    SSIM_K2,
    SSIM_SIGMA,
    SSIM_WINDOW,
    chance_accuracy,
    frechet_distance,
    gaussian_frechet_distance,
    image_to_tensor,
    psnr,
    retrieval_accuracy,
    ssim,
    tensor_to_image,
    text_positives,
)


# ------------------------------------------------------------------------------------------------------------ pixels
def test_image_to_tensor_is_the_8_bit_values_over_255_and_tensor_to_image_inverts_it():
    array = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    pixels = image_to_tensor(PIL.Image.fromarray(array), 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert torch.equal(pixels, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    # the models' range [-1, 1] by 2x − 1 is bit for bit the 8-bit value / 127.5 − 1
    assert torch.equal(pixels * 2 - 1, torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1)
    assert np.array_equal(np.asarray(tensor_to_image(pixels)), array)
    assert np.array_equal(np.asarray(tensor_to_image((pixels * 2 - 1 + 1) / 2)), array)


def test_image_to_tensor_lays_transparency_on_white_and_crops_the_centre():
    transparent = PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert torch.equal(image_to_tensor(transparent, 8), torch.ones(3, 8, 8))
    wide = PIL.Image.new("RGB", (24, 8), "black")
    wide.paste((255, 255, 255), (8, 0, 16, 8))  # a white middle third
    assert torch.equal(image_to_tensor(wide, 8), torch.ones(3, 8, 8))


def test_tensor_to_image_clamps_to_the_8_bit_range():
    pixels = torch.tensor([-0.5, 0.5, 1.5]).reshape(3, 1, 1)
    assert np.asarray(tensor_to_image(pixels)).tolist() == [[[0, 128, 255]]]


# ------------------------------------------------------------------------------------------------------------- PSNR
def test_psnr_of_a_2x2_example_matches_the_hand_computed_value():
    reference = torch.zeros(1, 1, 2, 2)
    image = torch.tensor([[[[0.1, 0.0], [0.0, 0.3]]]], dtype=torch.float64)
    # MSE = (0.01 + 0.09) / 4 = 0.025, PSNR = 10 log10(1 / 0.025) = 10 log10(40)
    assert psnr(image, reference).item() == pytest.approx(10 * math.log10(40), abs=1e-9)


def test_psnr_is_10_log10_of_one_over_the_mse_of_each_image():
    rng = np.random.default_rng(2)
    images, references = rng.random((3, 3, 8, 8)), rng.random((3, 3, 8, 8))
    expected = [10 * math.log10(1 / np.mean((image - reference) ** 2)) for image, reference in zip(images, references)]
    assert psnr(torch.from_numpy(images), torch.from_numpy(references)).tolist() == pytest.approx(expected, rel=1e-12)


def test_psnr_of_images_mapped_from_minus_one_one_equals_psnr_with_a_peak_to_peak_of_2():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    references = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    mse = (images.double() - references.double()).pow(2).flatten(1).mean(dim=1)
    expected = 10 * torch.log10(2.0**2 / mse)
    assert torch.allclose(psnr((images + 1) / 2, (references + 1) / 2), expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------- SSIM
def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 24, 24, generator=generator)
    assert torch.allclose(ssim(images, images), torch.ones(2, dtype=torch.float64), atol=1e-12)
    scores = [
        ssim((images + level * torch.randn(images.shape, generator=generator)).clamp(0, 1), images).mean().item()
        for level in (0.05, 0.2, 0.5)
    ]
    assert 1 > scores[0] > scores[1] > scores[2]


def test_ssim_rejects_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004, Eq. 13, with scipy's correlation under the 11x11 Gaussian window (σ 1.5), valid positions."""
    coords = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
    kernel = np.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    window = np.outer(kernel, kernel) / kernel.sum() ** 2
    scores = []
    for channel_x, channel_y in zip(x, y):

        def mean(a: np.ndarray) -> np.ndarray:
            return correlate2d(a, window, mode="valid")

        mu_x, mu_y = mean(channel_x), mean(channel_y)
        var_x, var_y = mean(channel_x**2) - mu_x**2, mean(channel_y**2) - mu_y**2
        cov = mean(channel_x * channel_y) - mu_x * mu_y
        c1, c2 = SSIM_K1**2, SSIM_K2**2
        ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        scores.append(ssim_map.mean())
    return float(np.mean(scores))


def test_ssim_matches_an_independent_scipy_implementation_of_eq_13():
    rng = np.random.default_rng(4)
    images = rng.random((2, 3, 20, 17))
    references = np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1)
    expected = [_reference_ssim(x, y) for x, y in zip(images, references)]
    assert ssim(torch.from_numpy(images), torch.from_numpy(references)).tolist() == pytest.approx(expected, rel=1e-10)


def test_ssim_of_two_flat_images_is_the_luminance_term_alone():
    a, b = 0.2, 0.7  # no variance: SSIM = (2ab + C_1) / (a² + b² + C_1)
    c1 = SSIM_K1**2
    images, references = torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b)
    assert ssim(images, references).item() == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), rel=1e-6)


# -------------------------------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_of_identical_sets_is_zero_and_a_shift_adds_its_square():
    features = np.random.default_rng(0).normal(size=(50, 4))
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(features, features + shift) == pytest.approx(np.sum(shift**2), abs=1e-8)


def test_frechet_distance_matches_the_closed_form_in_one_dimension():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(40, 1)), rng.normal(-0.5, 0.5, size=(30, 1))
    # d² of N(m1, s1²) and N(m2, s2²) is (m1 - m2)² + (s1 - s2)²
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b, ridge=0.0) == pytest.approx(expected, rel=1e-9)


def test_gaussian_frechet_distance_matches_the_closed_form_with_scipy_sqrtm():
    rng = np.random.default_rng(5)
    mean_a, mean_b = rng.normal(size=4), rng.normal(size=4)
    factor_a, factor_b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cov_a, cov_b = factor_a @ factor_a.T + 0.1 * np.eye(4), factor_b @ factor_b.T + 0.1 * np.eye(4)
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real)
    assert gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-9)


def test_gaussian_frechet_distance_of_diagonal_gaussians_is_the_sum_over_dimensions():
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # d² = Σ_i (μ_a,i − μ_b,i)² + (σ_a,i − σ_b,i)² for commuting (diagonal) covariances
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    result = gaussian_frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b))
    assert result == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_needs_two_samples_per_set():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# --------------------------------------------------------------------------------------------------------- retrieval
def test_retrieval_accuracy_on_a_constructed_similarity_matrix():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0, 0.0, 0.0],  # positive ranked 1st
            [0.9, 0.5, 0.2, 0.3, 0.4, 0.0],  # positive ranked 2nd
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],  # positive ranked 6th
        ]
    )
    positives = torch.eye(3, 6, dtype=torch.bool)
    positives[2] = torch.tensor([False] * 5 + [True])
    assert retrieval_accuracy(similarity, positives) == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}
    assert chance_accuracy(6) == {"chance_top1": 1 / 6, "chance_top5": 5 / 6}
    assert chance_accuracy(3) == {"chance_top1": 1 / 3, "chance_top5": 1.0}


def test_text_positives_count_every_item_with_the_query_s_caption():
    positives = text_positives(["cat", "dog"], ["dog", "cat", "cat"])
    assert positives.tolist() == [[False, True, True], [True, False, False]]
    similarity = torch.tensor([[0.0, 0.2, 0.9], [0.1, 0.9, 0.0]])  # "cat": the second "cat" first; "dog": last
    assert retrieval_accuracy(similarity, positives, ks=(1, 3)) == {"top1": 0.5, "top3": 1.0}


def test_chance_accuracy_is_the_mean_top_k_of_random_rankings():
    generator = torch.Generator().manual_seed(6)
    similarity = torch.rand(20_000, 8, generator=generator)
    positives = torch.zeros(20_000, 8, dtype=torch.bool)
    positives[:, 0] = True
    measured = retrieval_accuracy(similarity, positives, ks=(1, 5))
    chance = chance_accuracy(8, ks=(1, 5))
    assert measured["top1"] == pytest.approx(chance["chance_top1"], abs=0.01)
    assert measured["top5"] == pytest.approx(chance["chance_top5"], abs=0.01)
