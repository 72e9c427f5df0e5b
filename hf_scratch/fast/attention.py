"""Attention softmax(QKᵀ / √d) V (Vaswani et al. 2017, Eq. 1) in bfloat16 on a CPU that computes it natively.

PyTorch's CPU flash attention ran bfloat16 no faster than float32 on an AVX-512 BF16 CPU (an AMD EPYC): at the SD 1.5
U-Net's 4096 tokens (16 heads of d = 40, 2 threads) a call took 318 ms in either dtype, a third of the bfloat16 U-Net
step. The kernel here (`kernels/attention_bf16.cpp`) multiplies Q Kᵀ and P V with oneDNN's bfloat16 micro-kernels and
takes the exponential as a short polynomial, since the probabilities P are rounded to bfloat16 before they multiply V:
169 ms for that call, with the error of PyTorch's SDPA against float64 attention (relative 2.0e-3 against 1.9e-3 on
bfloat16 inputs).

`use_bf16_attention(model)` gives a model's attention layers `BF16AttnProcessor`, which runs the kernel on bfloat16
CPU inputs without gradients and `F.scaled_dot_product_attention` otherwise. `use_fastest_dtypes` does it for the
components it puts in bfloat16.
"""

import functools
from typing import TypeVar

import torch
from torch import nn

from ..models.layers import ScratchAttnProcessor
from .kernels import load
from .precision import cpu_computes_bf16

Target = TypeVar("Target", bound=nn.Module)


@functools.cache
def _operator() -> torch._ops.OpOverloadPacket:
    """torch.ops.hf_scratch.attention_bf16, built and loaded on first use, with the shape rule torch.compile needs;
    once per process (a failed build is not cached, so a later call tries again)."""
    load("attention_bf16", python_module=False)
    fake = torch.library.register_fake("hf_scratch::attention_bf16")
    fake(lambda query, key, value, scale: query.new_empty(query.shape))  # (B, L, H, D), contiguous
    return torch.ops.hf_scratch.attention_bf16


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, tokens, d) as the kernel's (B, tokens, heads, d) view, copied only when a token's heads x d values
    are not contiguous (the projections' outputs are)."""
    x = x.transpose(1, 2)
    return x if x.stride(3) == 1 and (x.shape[2] == 1 or x.stride(2) == x.shape[3]) else x.contiguous()


def attention_bf16(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ / √d) V of (B, heads, tokens, d) bfloat16 CPU tensors through the C++ kernel; (B, heads, L, d)."""
    scale = query.shape[-1] ** -0.5
    output = _operator()(_tokens_major(query), _tokens_major(key), _tokens_major(value), scale)
    return output.transpose(1, 2)


def kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `attention_bf16` takes these inputs: bfloat16 on the CPU, an even head size equal for Q, K and V, at
    least one query and one key, and no gradient to compute."""
    tensors = (query, key, value)
    return (
        all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() == 4 for t in tensors)
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[-1] % 2 == 0
        and query.shape[2] > 0
        and key.shape[2] > 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


class BF16AttnProcessor(ScratchAttnProcessor):
    """`ScratchAttnProcessor` whose attention product runs `attention_bf16` where `kernel_applies`, and
    `F.scaled_dot_product_attention` elsewhere (float32, gradients, odd head sizes)."""

    @staticmethod
    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if kernel_applies(query, key, value):
            return attention_bf16(query, key, value)
        return ScratchAttnProcessor.attend(query, key, value)


def use_bf16_attention(model: Target) -> Target:
    """Gives every attention layer of `model` that runs the default `ScratchAttnProcessor` a `BF16AttnProcessor`; in
    place, returns `model`. Other processors (IP-Adapter's, a user's) are kept. The kernel is built on the first call
    (a C++ compiler, about 30 s, then cached).

    Raises:
        ValueError: on a CPU without native bfloat16 (AVX-512 BF16 or AMX), where the kernel cannot run.
    """
    if not cpu_computes_bf16():
        raise ValueError(
            "use_bf16_attention needs a CPU that computes bfloat16 natively (AVX-512 BF16 or AMX; see "
            "hf_scratch.fast.cpu_computes_bf16()); on this CPU keep float32 attention."
        )
    _operator()
    for module in model.modules():
        if type(getattr(module, "processor", None)) is ScratchAttnProcessor:
            module.set_processor(BF16AttnProcessor())
    return model
