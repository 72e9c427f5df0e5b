"""A U-Net forward run as frozen TorchScript graphs, one per input signature, for small models bound by per-op cost.

A small U-Net on an 8x8 latent (the shipped `emoji32`: 0.45 GFLOP a call) spends more of its time in Python and in
the dispatcher, between about 1,900 small ops a call, than in arithmetic. `torch.jit.trace` records those ops once
as a graph, and `torch.jit.freeze` folds the weights and the module attributes into it as constants, so a call runs
the graph's ops without Python.

On latents of at most `GEMM_MAX_SIDE` a side, convolutions go through ATen's own path (im2col and a GEMM) rather than
oneDNN by default: on 8x8 to 32x32 maps of the shipped model's 64-128 channels it was faster on a 2-core AVX-512 CPU
(U-Net call 14.1 ms against 17.8 ms at 8x8, 80.8 against 84.2 ms at 32x32; oneDNN won at 64x64), and outputs stay
within float32 rounding of eager (about 1e-6). Larger latents keep oneDNN, and with `onednn=True` every graph does:
it then holds the same kernels as eager in the same order, and outputs are equal. Inputs of other dtypes than float32
(a bfloat16 U-Net) keep oneDNN too: ATen's GEMM path in bfloat16 was 5-16x slower than oneDNN's.

A trace records one path through `forward`, fixed by the input shapes (the U-Net's odd-size branch, its skip
bookkeeping), so one graph is kept per signature: shapes, dtypes and device of the inputs, and the parameters'
identity and version counters, so that an in-place update of the weights (an optimiser step, `load_state_dict`,
fusing a LoRA) traces again instead of running stale constants. Calls a graph cannot stand for run eagerly: with
gradients enabled, in training mode, or with extra arguments (`cross_attention_kwargs`, `timestep_cond`, ...).
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

GEMM_MAX_SIDE = 32  # latent sides up to this run their convolutions as im2col + GEMM unless onednn=True


@contextmanager
def onednn_enabled(enabled: bool) -> Iterator[None]:
    """Switches oneDNN (mkldnn) kernels on or off for the block, and nothing else: `torch.backends.mkldnn.flags`
    also sets `allow_tf32`, which warns on a CPU build."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class _ForwardOnly(nn.Module):
    """`module.forward(sample, timestep, encoder_hidden_states)` returning the sample tensor alone, for tracing."""

    def __init__(self, module: nn.Module, forward: Any) -> None:
        super().__init__()
        self.module = module
        self.eager_forward = forward

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.eager_forward(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class FrozenForward:
    """Stands in for `module.forward`: a frozen graph per signature when it can, the eager forward otherwise."""

    def __init__(self, module: nn.Module, onednn: bool | None = None) -> None:
        self.module = module
        self.eager_forward = module.forward
        self.onednn = onednn  # None: by the latent's size
        self.graphs: dict[tuple, tuple[torch.jit.ScriptModule, bool]] = {}

    def _signature(self, *tensors: torch.Tensor) -> tuple:
        inputs = tuple((tuple(t.shape), t.dtype, t.device, t.is_contiguous()) for t in tensors)
        weights = tuple((id(p), p._version) for p in self.module.parameters())
        return inputs, weights

    def graph(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        """(the frozen graph for these inputs, whether it runs oneDNN), traced on first use (a stale one, of older
        weights, is dropped)."""
        key = self._signature(sample, timestep, encoder_hidden_states)
        if key not in self.graphs:
            self.graphs = {k: g for k, g in self.graphs.items() if k[1] == key[1]}
            onednn = self.onednn
            if onednn is None:  # ATen's GEMM path has no fast bfloat16 kernel: 5-16x slower than oneDNN there
                onednn = max(sample.shape[-2:]) > GEMM_MAX_SIDE or sample.dtype != torch.float32
            wrapper = _ForwardOnly(self.module, self.eager_forward).eval()
            with warnings.catch_warnings(), onednn_enabled(onednn):  # the shape-dependent branches the key pins down
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(wrapper, (sample, timestep, encoder_hidden_states), check_trace=False)
            self.graphs[key] = torch.jit.freeze(traced), onednn
        return self.graphs[key]

    def __call__(self, sample, timestep, encoder_hidden_states, *args: Any, return_dict: bool = True, **kwargs: Any):
        extra = args or any(value not in (None, {}) for value in kwargs.values())
        if extra or torch.is_grad_enabled() or self.module.training or not torch.is_tensor(sample):
            return self.eager_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        # As the eager forward reads it: a Python number becomes a tensor of its own dtype (int64 or float32).
        timestep = torch.as_tensor(timestep, device=sample.device)
        graph, onednn = self.graph(sample, timestep, encoder_hidden_states)
        with onednn_enabled(onednn):
            output = graph(sample, timestep, encoder_hidden_states)
        if not return_dict:
            return (output,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=output)


def freeze(unet: nn.Module, onednn: bool | None = None) -> nn.Module:
    """Installs a `FrozenForward` as `unet.forward` (the instance attribute shadows the class's); returns `unet`."""
    unfreeze(unet)
    unet.forward = FrozenForward(unet, onednn)
    return unet


def unfreeze(unet: nn.Module) -> nn.Module:
    """Puts the eager forward back."""
    if isinstance(unet.forward, FrozenForward):
        del unet.forward
    return unet
