"""Condition images computed from an image: what a ControlNet trains on when a dataset has no condition column, and
what the demo turns a sketch into.

The one built in is the **colour layout** (the "spatial palette" of T2I-Adapter, Mou et al. 2023, arXiv:2302.08453:
an image downsampled by a large factor and upsampled again by nearest neighbour). The image x of
size H × W is cut into a k × k grid of cells, and each cell is filled with its mean colour:

    L(x)[c, h, w] = mean of x[c] over the cell holding (h, w)

so L keeps where each colour is and drops every detail finer than a cell. It is in [0, 1], as diffusers' ControlNet
pipelines pass condition images, and `layout_distance` compares two of them on the grid.
"""

import torch
import torch.nn.functional as F
from PIL import Image

CONDITIONS = ("colour_layout",)
DEFAULT_CELLS = 8


def colour_grid(pixels: torch.Tensor, cells: int = DEFAULT_CELLS) -> torch.Tensor:
    """The mean colour of each cell, (B, C, k, k) in [0, 1], of images (B, C, H, W) in [-1, 1] (the training range)."""
    height, width = pixels.shape[-2:]
    if height % cells or width % cells:
        raise ValueError(f"cells={cells} must divide the image's height and width ({height} x {width})")
    return (F.adaptive_avg_pool2d(pixels.float(), cells) + 1) / 2


def colour_layout(pixels: torch.Tensor, cells: int = DEFAULT_CELLS) -> torch.Tensor:
    """L(x): each of the k × k cells filled with its mean colour, (B, C, H, W) in [0, 1], of images in [-1, 1]."""
    return F.interpolate(colour_grid(pixels, cells), size=pixels.shape[-2:], mode="nearest")


def layout_distance(pixels: torch.Tensor, layout: torch.Tensor, cells: int = DEFAULT_CELLS) -> torch.Tensor:
    """Mean absolute difference, per image, between the colour grid of images (B, C, H, W) in [-1, 1] and that of
    layouts (B or 1, C, H, W) in [0, 1]: how far each image is from following a layout, in [0, 1]."""
    return (colour_grid(pixels, cells) - colour_grid(layout * 2 - 1, cells)).abs().mean(dim=(1, 2, 3))


def colour_layout_image(image: Image.Image, resolution: int, cells: int = DEFAULT_CELLS) -> Image.Image:
    """The colour layout of a picture (a sketch, an uploaded image) at `resolution` px: the picture is first resized
    to the model's square (alpha composited on white, as the emoji data is), then averaged over the cells."""
    if image.mode in ("RGBA", "LA", "P"):
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image.convert("RGBA"))
    square = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BOX)
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    pixels = pixels.permute(2, 0, 1)[None].float() / 127.5 - 1
    layout = colour_layout(pixels, cells)[0].permute(1, 2, 0)
    return Image.fromarray((layout * 255).round().to(torch.uint8).numpy())
