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
"""

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

TOP_K = (1, 5)
# SSIM as in Wang et al. 2004, Sec. III-C: an 11x11 Gaussian window of σ 1.5 and C_i = (K_i L)² with L = 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
FRECHET_RIDGE = 1e-6


# ------------------------------------------------------------------------------------------------------------ pixels
def image_to_tensor(image: PIL.Image.Image, resolution: int) -> torch.Tensor:
    """An image as (3, resolution, resolution) in [0, 1]: transparency laid on white, the short side resized (bicubic)
    to `resolution`, the centre cropped."""
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
