"""Images as people pass them, read one way everywhere: the pixel convention of the pipelines, the CLI and the demo.

`read_image` turns a PIL image, a numpy array or a torch tensor into float32 pixels `(N, C, H, W)` in [0, 1], C = 3
(colour) or 1 (grey, for masks). What has one meaning is converted; what could mean two things is refused by name.

| input | read as |
|---|---|
| PIL `1`, `L`, `P`, `RGB`, `RGBX`, `CMYK`, `YCbCr`, `LAB`, `HSV` | Pillow's conversion to RGB, 0–255 → [0, 1] |
| PIL `RGBA`, `LA`, `PA`, `RGBa`, `La`, `P` with transparency | laid on white, then as RGB |
| PIL `I;16`, `I;16B`, `I;16L`, `I;16N` (16-bit PNG, TIFF, PGM) | 0–65535 → [0, 1] |
| PIL `I` (32-bit integers) | 0–65535 → [0, 1], as 16-bit files load; other values refused |
| PIL `F` (32-bit floats) | [0, 1]; other values refused |
| numpy / torch `bool`, `uint8`, `uint16` | {0, 1}, 0–255, 0–65535 → [0, 1] |
| numpy / torch floats | [0, 1]; or [−1, 1] when any value is negative (diffusers' rule), for colour images only |

Floats elsewhere (0–255, say, or [−5, −1]), other integer types (int64 could be 8- or 16-bit), NaN and infinity are
refused, naming the argument, the value and what is allowed. Floats may overshoot their range by `FLOAT_SLACK`
(resampling ringing) and are clipped.

Layouts: numpy `(H, W)`, `(H, W, C)` or `(N, H, W, C)`, tensors `(C, H, W)` or `(N, C, H, W)` (and `(H, W)` for
grey), C in {1, 3, 4}; the fourth channel is alpha, laid on white. Grey becomes colour by repetition, colour becomes
grey by ITU-R 601-2 luma (Pillow's `L`: 0.299 R + 0.587 G + 0.114 B).
"""

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

FLOAT_SLACK = 1e-3
LUMA = (0.299, 0.587, 0.114)
CHANNEL_COUNTS = (1, 3, 4)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
INTEGER_SCALES = {"uint8": 255, "uint16": 65535}
ALLOWED = "PIL images, or numpy arrays / torch tensors of bool, uint8 (0–255), uint16 (0–65535) or floats in [0, 1]"


def open_image(path: str | Path, name: str) -> PIL.Image.Image:
    """The image file at `path`, decoded, with ValueError naming `name` for a missing, unreadable or too large file
    (Pillow's decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`, is enforced as an error, not a warning)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                image.load()
                return image
    except FileNotFoundError:
        raise ValueError(f"{name} {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise ValueError(f"{name} {str(path)!r} is a folder, not an image file.") from None
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ValueError(f"{name} {str(path)!r} is too large to decode safely ({error}).") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{name} {str(path)!r} is not a readable image ({error}).") from None


def read_image(image: Any, name: str = "image", grey: bool = False) -> torch.Tensor:
    """One image or a batch (see the module docstring) as float32 pixels `(N, C, H, W)` in [0, 1] on the CPU, with C
    = 1 when `grey` else 3. Raises ValueError naming `name`."""
    if isinstance(image, PIL.Image.Image):
        pixels = _pil_pixels(image, name)  # (H, W, C)
        pixels = pixels[None].permute(0, 3, 1, 2)
    elif isinstance(image, np.ndarray):
        pixels = _numbers(image, name, signed=not grey)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        pixels = _check_layout(pixels, name, "numpy arrays", "(H, W), (H, W, C) or (N, H, W, C)", channel_axis=-1)
        pixels = (pixels[None] if pixels.ndim == 3 else pixels).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        pixels = _numbers(image.detach().cpu(), name, signed=not grey)
        if pixels.ndim == 2 and grey:
            pixels = pixels[None]
        layouts = "(H, W), (C, H, W) or (N, C, H, W)" if grey else "(C, H, W) or (N, C, H, W)"
        pixels = _check_layout(pixels, name, "tensors", layouts, channel_axis=-3)
        pixels = pixels[None] if pixels.ndim == 3 else pixels
    else:
        raise ValueError(f"`{name}` must be one of: {ALLOWED}; got {type(image).__name__}.")
    if pixels.shape[0] == 0 or min(pixels.shape[-2:]) == 0:
        raise ValueError(f"`{name}` holds no pixels (shape {tuple(pixels.shape)}).")
    return _to_channels(pixels.contiguous(), 1 if grey else 3)


def read_images(images: Any, name: str = "image", grey: bool = False) -> list[torch.Tensor]:
    """`read_image` of each item of a list (or of one image): a non-empty list of `(N, C, H, W)` tensors."""
    items = images if isinstance(images, (list, tuple)) else [images]
    if images is None or not items:
        raise ValueError(f"`{name}` is required: one of {ALLOWED}, or a non-empty list of them.")
    return [read_image(item, name, grey) for item in items]


def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(N, C, H, W)` pixels in [0, 1] at `height` x `width`: bicubic with antialiasing (as Pillow resizes), clipped."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------------ helpers
def _pil_pixels(image: PIL.Image.Image, name: str) -> torch.Tensor:
    """(H, W, C) float32 in [0, 1] of one PIL image, C in {1, 3}."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        return torch.from_numpy(np.asarray(image).astype(np.float32) / 65535)[..., None]
    if mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"`{name}` is a PIL image of mode I with values in [{values.min()}, {values.max()}]; mode I is read "
                "as 16-bit, 0–65535. Convert it to I;16 (0–65535) or L (0–255)."
            )
        return torch.from_numpy(values.astype(np.float32) / 65535)[..., None]
    if mode == "F":
        return _float_pixels(torch.from_numpy(np.asarray(image).copy()), name, signed=False, what="mode F")[..., None]
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")  # Pillow has no La -> RGBA
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = image.convert("RGB")
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).float() / 255


def _numbers(values: np.ndarray | torch.Tensor, name: str, signed: bool) -> torch.Tensor:
    """The numbers of a numpy array or tensor as float32 pixels in [0, 1], scaled by their dtype."""
    is_array = isinstance(values, np.ndarray)
    if (values.size if is_array else values.numel()) == 0:
        raise ValueError(f"`{name}` holds no pixels (shape {tuple(values.shape)}).")
    dtype = values.dtype.name if is_array else str(values.dtype).removeprefix("torch.")
    if is_array:
        if values.dtype.kind not in "biuf":
            raise ValueError(f"`{name}` has dtype {dtype}; pass {ALLOWED}.")
        # native byte order (torch refuses big-endian data) and a dtype every torch op takes; uint16 exactly as int32
        values = torch.from_numpy(values.astype(np.int32 if dtype == "uint16" else values.dtype.newbyteorder("=")))
    elif values.dtype == torch.uint16:
        values = values.to(torch.int32)
    if dtype == "bool":
        return values.float()
    if dtype in INTEGER_SCALES:
        return values.float() / INTEGER_SCALES[dtype]
    if values.is_floating_point():
        return _float_pixels(values, name, signed, what=dtype)
    raise ValueError(f"`{name}` has dtype {dtype}, whose range is ambiguous; pass {ALLOWED}.")


def _float_pixels(values: torch.Tensor, name: str, signed: bool, what: str) -> torch.Tensor:
    values = values.float()
    if not torch.isfinite(values).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    low, high = values.min().item(), values.max().item()
    if low >= -FLOAT_SLACK and high <= 1 + FLOAT_SLACK:
        return values.clamp(0, 1)
    if signed and low < 0 and low >= -1 - FLOAT_SLACK and high <= 1 + FLOAT_SLACK:
        return ((values + 1) / 2).clamp(0, 1)
    hint = " For 0–255 values, divide by 255 or pass uint8." if high > 1 + FLOAT_SLACK and low >= 0 else ""
    allowed = "[0, 1], or [-1, 1] when any value is negative" if signed else "[0, 1]"
    raise ValueError(f"`{name}` holds {what} values in [{low:g}, {high:g}]; floats must be in {allowed}.{hint}")


def _check_layout(pixels: torch.Tensor, name: str, kind: str, layouts: str, channel_axis: int) -> torch.Tensor:
    if pixels.ndim not in (3, 4) or pixels.shape[channel_axis] not in CHANNEL_COUNTS:
        raise ValueError(
            f"`{name}` {kind} must be {layouts} with C in {CHANNEL_COUNTS} channels, got shape {tuple(pixels.shape)}."
        )
    return pixels


def _to_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] with alpha laid on white, as 1 (luma) or 3 (grey repeated) channels."""
    if pixels.shape[1] == 4:
        colour, alpha = pixels[:, :3], pixels[:, 3:]
        pixels = colour * alpha + (1 - alpha)  # over white
    if pixels.shape[1] == channels:
        return pixels
    if channels == 3:
        return pixels.repeat(1, 3, 1, 1)
    luma = torch.tensor(LUMA, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels * luma).sum(dim=1, keepdim=True).clamp(0, 1)


def batch_of(pixels: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """The images of `read_images` resized to `height` x `width` and stacked into one batch `(N, C, H, W)`."""
    return torch.cat([resize(item, height, width) for item in pixels])
