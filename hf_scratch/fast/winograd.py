"""Winograd convolution for CPU inference: F(4x4, 3x3) and F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016).

A 3x3 convolution computes each m x m output tile from an a x a input tile d, a = m + 2, with a² multiplications per
channel pair instead of 9m² (Eq. 8):

    Y = A^T [ U ⊙ V ] A,   U = G g G^T (the filter, transformed once),   V = B^T d B (the input tile).

Summed over input channels, the a² element-wise products become a² matrix products, V_ξ (tiles x C_in) @ U_ξ
(C_in x C_out), which `torch.bmm` runs at full speed; the tile transforms run in a small C++ kernel
(`kernels/winograd.cpp`) over channels-last memory. F(4x4) saves 4x the multiplications and suits large outputs;
small outputs (at most `SMALL_OUTPUT` pixels a side) use F(2x2), whose filters are less than half the size, because
there the products are bound by reading the filters, not by arithmetic.

The trade-offs, all opt-in through `hf_scratch.fast.use_winograd`:
- exactness: outputs match the direct convolution to float32 rounding of the transforms (relative error about 4e-6
  per layer with 4x4 tiles, 6e-7 with 2x2, 6e-6 over the whole SD 1.5 U-Net), not bit for bit;
- memory: a layer keeps U for each tile size it has run at, a²/9 times its 3x3 weights (4.1 GiB for the SD 1.5 U-Net
  at 512 px), beside the original weights, so the state dict is unchanged;
- a C++ compiler: the kernel is built on first use with `torch.utils.cpp_extension` and cached.
Anything else (gradients, other dtypes or devices) falls back to the layer's own convolution.
"""

from collections.abc import Callable

import torch
from torch import nn

from .kernels import load

KERNEL_SIZE = 3
# The filter transforms G of F(m x m, 3x3), applied here once per layer (Lavin & Gray, Sections 4.1 and 4.2); the
# input and output transforms B^T and A^T, applied to every tile, are constants of the C++ kernel.
FILTER_TRANSFORMS = {
    2: [
        [1, 0, 0],
        [1 / 2, 1 / 2, 1 / 2],
        [1 / 2, -1 / 2, 1 / 2],
        [0, 0, 1],
    ],
    4: [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
}
# Outputs at most this many pixels on a side use 2x2 tiles: there the batched products are too small to be limited
# by arithmetic, and F(2x2)'s filters (16 values per 3x3 kernel, not 36) are cheaper to read.
SMALL_OUTPUT = 16


def tile_size(height: int, width: int) -> int:
    """m of F(m x m, 3x3) for an output of `height` x `width` pixels."""
    return 2 if max(height, width) <= SMALL_OUTPUT else 4


def transform_filter(weight: torch.Tensor, m: int) -> torch.Tensor:
    """U = G g G^T for every (output, input) channel pair, laid out (a*a, C_in, C_out) for `torch.bmm`, a = m + 2.

    Computed in float64 and rounded once, so the transform adds no error of its own beyond float32 storage.
    """
    g = torch.tensor(FILTER_TRANSFORMS[m], dtype=torch.float64)  # (a, 3)
    out_channels, in_channels = weight.shape[:2]
    a = g.shape[0]
    rows = weight.detach().double().permute(2, 0, 1, 3).reshape(KERNEL_SIZE, -1)  # (k, C_out * C_in * l)
    u = (g @ rows).reshape(a, out_channels * in_channels, KERNEL_SIZE) @ g.T  # (i, C_out * C_in, j)
    u = u.reshape(a, out_channels, in_channels, a).permute(0, 3, 2, 1)  # (i, j, C_in, C_out)
    return u.reshape(a * a, in_channels, out_channels).to(weight.dtype).contiguous()


def winograd_conv2d(
    x: torch.Tensor, filters: Callable[[int], torch.Tensor], bias: torch.Tensor | None, padding: int = 1
) -> torch.Tensor:
    """A stride-1 3x3 convolution of `x` (N, C_in, H, W); `filters(m)` gives the filter transformed for F(m x m).

    Returns (N, C_out, H_out, W_out) in channels-last memory; a channels-last `x` is read without a copy.
    """
    batch, _, height, width = x.shape
    out_height, out_width = height + 2 * padding - KERNEL_SIZE + 1, width + 2 * padding - KERNEL_SIZE + 1
    m = tile_size(out_height, out_width)
    kernels = load("winograd")
    tokens = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C_in): free when x is channels-last
    v = kernels.input_transform(tokens, m, padding)  # (a*a, tiles, C_in): B^T d B for every tile
    products = torch.bmm(v, filters(m))  # (a*a, tiles, C_out): Eq. 8's element-wise product, summed over C_in
    y = kernels.output_transform(products, bias, batch, out_height, out_width)  # (N, H_out, W_out, C_out)
    return y.permute(0, 3, 1, 2)


def is_eligible(conv: nn.Module, min_channels: int) -> bool:
    """A plain 3x3, stride-1 `nn.Conv2d` with zero padding of 1 and at least `min_channels` in and out."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (KERNEL_SIZE, KERNEL_SIZE)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= min_channels
    )


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` that runs Winograd tiles (`tile_size` picks F(4x4) or F(2x2)) for float32 CPU inference and its
    own convolution otherwise.

    Made by `convert` from an existing layer: same parameters and state-dict keys. The transformed filter is cached
    and rebuilt whenever the weight changes (e.g. after `load_state_dict`).
    """

    _filters: dict[int, torch.Tensor] | None = None
    _filters_key: tuple[int, int] | None = None

    def transformed_filter(self, m: int) -> torch.Tensor:
        """U for F(m x m, 3x3), built on first use at each tile size and rebuilt when the weight changes."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._filters is None or self._filters_key != key:
            self._filters, self._filters_key = {}, key
        if m not in self._filters:
            self._filters[m] = transform_filter(self.weight, m)
        return self._filters[m]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fast = (
            input.device.type == "cpu"
            and input.dtype == self.weight.dtype == torch.float32
            and input.dim() == 4
            and not (torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad))
        )
        if not fast:
            return super().forward(input)
        return winograd_conv2d(input, self.transformed_filter, self.bias)


def convert(model: nn.Module, min_channels: int = 256) -> int:
    """Turns every eligible `nn.Conv2d` in `model` into a `WinogradConv2d` in place; returns how many.

    `min_channels` keeps thin layers on the direct convolution: at 128 channels and 512x512 px (the VAE decoder's
    last block) the tile transforms cost more than the multiplications they save.
    """
    converted = 0
    for module in model.modules():
        if is_eligible(module, min_channels):
            module.__class__ = WinogradConv2d
            converted += 1
    return converted
