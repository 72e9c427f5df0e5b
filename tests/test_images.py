"""`hf_scratch.images`: one pixel convention for every image input. PIL images of every mode, numpy arrays and torch
tensors of every dtype and range are read as their one meaning or refused by name; a property test draws them."""

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ImageCms

from hf_scratch.images import open_image, read_image, read_images

rng = np.random.default_rng(0)
EIGHT_BIT = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # (H, W, 3)


def as_hwc(pixels: torch.Tensor) -> np.ndarray:
    assert pixels.ndim == 4 and pixels.dtype == torch.float32
    return pixels[0].permute(1, 2, 0).numpy()


def test_a_nearly_black_16_bit_png_is_read_as_nearly_black(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) % 2000).astype(np.uint16)  # at most 3% of white
    PIL.Image.fromarray(values).save(tmp_path / "grey16.png")
    picture = open_image(tmp_path / "grey16.png", "--image")
    assert picture.mode == "I;16"
    pixels = as_hwc(read_image(picture))
    np.testing.assert_allclose(pixels, np.repeat(values[..., None] / 65535, 3, axis=-1), atol=1e-6)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"])
def test_eight_bit_modes_read_as_pillows_rgb(mode):
    picture = PIL.Image.fromarray(EIGHT_BIT).convert(mode)
    expected = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_array_equal(as_hwc(read_image(picture)), expected)


def test_lab_is_converted_as_littlecms_converts_it():
    lab = PIL.Image.fromarray(EIGHT_BIT, "LAB")
    to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    expected = np.asarray(ImageCms.applyTransform(lab, to_srgb), dtype=np.float32) / 255
    np.testing.assert_allclose(as_hwc(read_image(lab)), expected, atol=1 / 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La"])
def test_transparency_is_laid_on_white(mode):
    picture = PIL.Image.new(mode, (4, 4))  # all zero: fully transparent
    np.testing.assert_array_equal(as_hwc(read_image(picture)), np.ones((4, 4, 3), np.float32))


def test_modes_f_and_i_are_read_in_their_documented_ranges():
    np.testing.assert_allclose(as_hwc(read_image(PIL.Image.new("F", (4, 4), 0.25))), 0.25)
    np.testing.assert_allclose(as_hwc(read_image(PIL.Image.new("I", (4, 4), 65535))), 1.0)
    np.testing.assert_allclose(as_hwc(read_image(PIL.Image.new("I;16B", (4, 4), 257))), 257 / 65535, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`image` holds mode F values in \[200, 200\].*divide by 255"):
        read_image(PIL.Image.new("F", (4, 4), 200.0))
    with pytest.raises(ValueError, match=r"`image` is a PIL image of mode I with values in \[-1, -1\]"):
        read_image(PIL.Image.new("I", (4, 4), -1))


@pytest.mark.parametrize(
    "image, message",
    [(np.full((8, 8, 3), 200.0), r"`image` holds float64 values in \[200, 200\].*divide by 255"),
     (torch.full((3, 8, 8), 254.0), r"`image` holds float32 values in \[254, 254\]"),
     (np.full((8, 8, 3), -3.0), r"`image` holds float64 values in \[-3, -3\]"),
     (torch.linspace(-5, -1, 192).reshape(3, 8, 8), r"values in \[-5, -1\]"),
     (np.zeros((8, 8, 3), np.int64), "`image` has dtype int64, whose range is ambiguous"),
     (torch.zeros(3, 8, 8, dtype=torch.int32), "`image` has dtype int32, whose range is ambiguous"),
     (np.full((8, 8, 3), np.nan, np.float32), "`image` contains NaN"),
     (np.zeros((3, 8, 8)), r"numpy arrays must be .* got shape \(3, 8, 8\)"),
     (torch.zeros(8, 8), r"tensors must be \(C, H, W\) or \(N, C, H, W\)"),
     (np.zeros((0, 8, 3), np.uint8), "holds no pixels"),
     ("image.png", "`image` must be one of: PIL images"),
     (None, "`image` is required")],
)  # fmt: skip
def test_ambiguous_or_broken_inputs_are_refused_by_name(image, message):
    with pytest.raises(ValueError, match=message):
        read_images(image)


def test_masks_refuse_negative_floats_and_read_colour_as_luma():
    with pytest.raises(
        ValueError, match=r"`mask_image` holds float32 values in \[-0.5, 0.5\]; floats must be in \[0, 1\]"
    ):
        read_image(torch.linspace(-0.5, 0.5, 64).reshape(1, 8, 8), "mask_image", grey=True)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert read_image(red, grey=True).shape == (1, 1, 4, 4)
    np.testing.assert_allclose(read_image(red, grey=True).numpy(), 0.299, rtol=1e-6)
    np.testing.assert_allclose(read_image(torch.ones(8, 8), grey=True).numpy(), 1.0)


def test_an_image_above_pillows_pixel_limit_is_refused_by_name(tmp_path, monkeypatch):
    PIL.Image.new("L", (64, 64)).save(tmp_path / "large.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: past the warning, below the error
    with pytest.raises(ValueError, match="--image .* is too large to decode safely"):
        open_image(tmp_path / "large.png", "--image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="--image .* is not a readable image"):
        open_image(tmp_path / "broken.png", "--image")


# ------------------------------------------------------------------------------------------------------ property tests
DTYPES = ["bool", "uint8", "uint16", "float16", "float32", "float64", "int16", "int64"]
RANGES = {"unit": (0.0, 1.0), "signed": (-1.0, 1.0), "byte": (0.0, 255.0), "far negative": (-5.0, -1.0),
          "slightly over": (0.0, 1.0005), "huge": (-1e6, 1e6)}  # fmt: skip


def expected_pixels(values: np.ndarray, dtype: str) -> np.ndarray | None:
    """The documented reading of `values` (an array of `dtype`), as floats in [0, 1]; None where it must be refused."""
    if dtype == "bool":
        return values.astype(np.float64)
    if dtype == "uint8":
        return values / 255
    if dtype == "uint16":
        return values / 65535
    if not dtype.startswith("float") or not np.isfinite(values).all():
        return None
    low, high = values.min(), values.max()
    if low >= -1e-3 and high <= 1 + 1e-3:
        return np.clip(values, 0, 1)
    if low < 0 and low >= -1 - 1e-3 and high <= 1 + 1e-3:
        return np.clip((values + 1) / 2, 0, 1)
    return None


@st.composite
def arrays(draw) -> tuple[np.ndarray, str]:
    dtype = draw(st.sampled_from(DTYPES))
    height, width, channels = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 3, 4]))
    shape = (height, width, channels)
    seed = draw(st.integers(0, 2**16))
    generator = np.random.default_rng(seed)
    if dtype == "bool":
        values = generator.integers(0, 2, shape).astype(bool)
    elif dtype.startswith(("uint", "int")):
        info = np.iinfo(dtype)
        values = generator.integers(max(info.min, -300), info.max, shape, endpoint=True).astype(dtype)
    else:
        low, high = RANGES[draw(st.sampled_from(sorted(RANGES)))]
        values = generator.uniform(low, high, shape).astype(dtype)  # float16 overflows to inf beyond 65504
        if draw(st.booleans()):
            values.flat[0] = draw(st.sampled_from([np.nan, np.inf, low, high]))
    return values, dtype


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@settings(max_examples=200, deadline=None)
@given(drawn=arrays(), as_tensor=st.booleans(), batched=st.booleans())
def test_arrays_of_any_dtype_and_range_read_as_documented_or_are_refused_by_name(drawn, as_tensor, batched):
    values, dtype = drawn
    image = torch.from_numpy(values.astype(np.int32)).to(torch.uint16) if as_tensor and dtype == "uint16" else values
    if as_tensor and dtype != "uint16":
        image = torch.from_numpy(values)
    if as_tensor:
        image = image.permute(2, 0, 1)  # (C, H, W)
    if batched:
        image = image[None]
    expected = expected_pixels(values.astype(np.float64), dtype)
    if expected is None:
        with pytest.raises(ValueError, match="`image`"):
            read_image(image)
        return
    pixels = read_image(image)
    assert pixels.shape == (1, 3, *values.shape[:2]) and pixels.dtype == torch.float32
    assert 0 <= pixels.min() and pixels.max() <= 1
    channels = values.shape[-1]
    if channels == 4:  # alpha laid on white
        expected = expected[..., :3] * expected[..., 3:] + (1 - expected[..., 3:])
    np.testing.assert_allclose(as_hwc(pixels), np.broadcast_to(expected, (*values.shape[:2], 3)), atol=1e-3)


PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA", "I",
             "I;16", "I;16B", "I;16L", "F"]  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(
    mode=st.sampled_from(PIL_MODES), seed=st.integers(0, 2**16), size=st.tuples(st.integers(1, 6), st.integers(1, 6))
)
def test_pil_images_of_every_mode_read_as_their_one_meaning(mode, seed, size):
    generator = np.random.default_rng(seed)
    width, height = size
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = generator.integers(0, 65536, (height, width))
        layout = {"I": "<i4", "I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]  # (Pillow's I;16 -> I;16B clips)
        picture = PIL.Image.frombytes(mode, size, values.astype(layout).tobytes())
        expected = np.repeat(values[..., None] / 65535, 3, axis=-1)
    elif mode == "F":
        values = generator.uniform(0, 1, (height, width)).astype(np.float32)
        picture = PIL.Image.fromarray(values, "F")
        expected = np.repeat(values[..., None], 3, axis=-1)
    else:
        bands = len(PIL.Image.new(mode, (1, 1)).getbands())
        data = generator.integers(0, 256, (height, width, bands), dtype=np.uint8)
        picture = PIL.Image.frombytes("L" if mode == "1" else mode, size, data.tobytes()).convert(mode)
        rgba = (picture.convert("LA") if mode == "La" else picture).convert("RGBA")
        on_white = PIL.Image.alpha_composite(PIL.Image.new("RGBA", size, (255, 255, 255, 255)), rgba).convert("RGB")
        has_alpha = "A" in picture.getbands() or "a" in picture.getbands()
        expected = np.asarray(on_white if has_alpha else picture.convert("RGB"), dtype=np.float64) / 255
    pixels = read_image(picture)
    assert pixels.shape == (1, 3, height, width)
    np.testing.assert_allclose(as_hwc(pixels), expected, atol=1e-6)
