"""Opt-in fast paths for inference. The models and pipelines never call this module (eager PyTorch is their path);
`hf-scratch generate` and the demo do.

`use_winograd` is the one that pays on a CPU without native bfloat16. It runs the 3x3 convolutions through
Winograd's minimal filtering (`hf_scratch.fast.winograd`, F(4x4, 3x3) and F(2x2, 3x3) tiles) on channels-last memory.
On a 2-core AVX-512 Xeon, in interleaved runs of `python -m benchmarks`, the SD 1.5 U-Net step at 512 px took about
0.7x diffusers' time, ahead of OpenVINO and ONNX Runtime, and the VAE decode at 512 px 0.69x (BENCHMARKS.md); outputs
stay within 1e-5 relative of eager. The costs: the transformed filters (4.1 GiB for the SD 1.5 U-Net at 512 px, 0.7
GiB for the VAE decoder, kept beside the weights), a C++ compiler for the tile kernel (built once, about 30 s), and
about 30 s to transform the filters on the first call.

`compile_for_inference` compiles with `torch.compile` (inductor) and the weights frozen into the graph. On the same CPU
it gave no gain at 512 px (1.01x diffusers), slowed the end-to-end 256 px pipeline (1.17x), took minutes to compile
(976 s cold on a loaded machine, about 90 s from inductor's on-disk cache) and held a second copy of the weights.

`freeze_for_inference` pays on small models, where a U-Net call is bound by per-op cost rather than arithmetic: it runs
the U-Net as frozen TorchScript graphs, one per input shape (`hf_scratch.fast.frozen`), with outputs equal to eager
ones to float32 rounding. `hf-scratch generate` and the demo use it on CPU by default.

`use_fastest_dtypes` puts a pipeline's large components in bfloat16 on a CPU that computes it natively (AVX-512 BF16
or AMX; `hf_scratch.fast.precision`), with their attention through a bfloat16 kernel (`use_bf16_attention`,
`hf_scratch.fast.attention`), where the SD 1.5 U-Net then takes about half its float32 time, and leaves them
float32 elsewhere. `hf-scratch generate --dtype auto` (the default) and the demo use it.

Example:
    >>> pipe = ScratchStableDiffusionPipeline.from_pretrained(folder)
    >>> use_winograd(pipe)  # in place; the first call transforms the filters
    >>> image = pipe("red heart, twemoji style", num_inference_steps=20).images[0]
"""

import inspect
from typing import TypeVar

import torch
from torch import nn

from .attention import use_bf16_attention
from .precision import compute_in, cpu_computes_bf16, fastest_dtype, use_fastest_dtypes

__all__ = [
    "compile_for_inference",
    "compute_in",
    "cpu_computes_bf16",
    "fastest_dtype",
    "freeze_for_inference",
    "unfreeze",
    "use_bf16_attention",
    "use_fastest_dtypes",
    "use_winograd",
]

Target = TypeVar("Target")


def _is_pipeline(target: object) -> bool:
    return hasattr(target, "unet") and hasattr(target, "vae")


def _check_target(target: object) -> None:
    if not (_is_pipeline(target) or isinstance(target, nn.Module)):
        raise ValueError(
            f"target must be an nn.Module or a pipeline with `unet` and `vae`, got {type(target).__name__}"
        )


def _compile(module: nn.Module, freeze: bool, dynamic: bool) -> None:
    # `nn.Module.compile` compiles in place: the module keeps its class, config and state-dict keys.
    module.compile(backend="inductor", dynamic=dynamic, options={"freezing": freeze})


def compile_for_inference(target: Target, *, freeze: bool = True, dynamic: bool = False) -> Target:
    """Compiles `target` in place with inductor and returns it.

    Args:
        target: a pipeline with `unet` and `vae` (only its U-Net is compiled: the compiled VAE decoder measured
            slower than eager on a 2-core CPU, and the text encoder runs once per prompt), an `AutoencoderKL`-like
            model with a `decoder` (the decoder is compiled), or any other `nn.Module` (compiled whole).
        freeze: fold the weights into the compiled graph as constants. This only takes effect when the compiled
            module is called with gradients disabled (`torch.no_grad()` or `torch.inference_mode()`, as pipelines
            do), and the weights must not change afterwards.
        dynamic: compile shape-generic kernels. The default specialises on the first shapes seen (faster kernels);
            a new shape compiles again.
    """
    _check_target(target)
    if _is_pipeline(target):
        _compile(target.unet, freeze, dynamic)
    elif isinstance(getattr(target, "decoder", None), nn.Module):
        _compile(target.decoder, freeze, dynamic)
    else:
        _compile(target, freeze, dynamic)
    return target


def freeze_for_inference(target: Target, *, onednn: bool | None = None) -> Target:
    """Runs the U-Net of `target` (a pipeline, or a U-Net itself) as frozen TorchScript graphs; in place.

    Each new input signature (shapes, dtypes, device) is traced and frozen on first use, about 0.1 s for the shipped
    `emoji32`. Calls with gradients, in training mode or with extra arguments (`cross_attention_kwargs`) run
    eagerly, and an in-place change of the weights (or new parameters, such as LoRA adapters) traces again. Python
    attributes are frozen with the graph: after `set_adapters` changes adapter scales, call it again. `unfreeze`
    undoes it.

    Args:
        target: a pipeline with `unet` and `vae`, or a U-Net whose forward is (sample, timestep,
            encoder_hidden_states, ...).
        onednn: run the graph's convolutions through oneDNN, as eager PyTorch does (outputs then equal eager ones
            bit for bit), or not (ATen's im2col and GEMM, within float32 rounding of eager). The default, `None`,
            leaves oneDNN off for latents of at most 32 a side, where it was slower for the shipped model's
            64-128 channels of float32, and on for larger ones and for other dtypes (bfloat16).
    """
    from . import frozen

    _check_target(target)
    unet = target.unet if _is_pipeline(target) else target
    parameters = list(inspect.signature(unet.forward).parameters)
    if parameters[:3] != ["sample", "timestep", "encoder_hidden_states"]:
        raise ValueError(
            f"freeze_for_inference takes a pipeline or a U-Net whose forward is (sample, timestep, "
            f"encoder_hidden_states, ...); {type(unet).__name__}.forward takes ({', '.join(parameters)})"
        )
    frozen.freeze(unet, onednn)
    return target


def unfreeze(target: Target) -> Target:
    """Undoes `freeze_for_inference`: the U-Net of `target` runs its eager forward again."""
    from . import frozen

    _check_target(target)
    frozen.unfreeze(target.unet if _is_pipeline(target) else target)
    return target


def use_winograd(target: Target, *, min_channels: int = 256) -> Target:
    """Runs the 3x3 convolutions of `target` through Winograd tiles and keeps it channels-last; in place.

    Args:
        target: a pipeline with `unet` and `vae` (both are converted), or any `nn.Module`.
        min_channels: only layers with at least this many input and output channels are converted (all of the SD 1.5
            U-Net's, and the VAE's 256- and 512-channel blocks; thin layers at high resolution are faster direct).

    Outputs match the direct convolution to float32 rounding (about 6e-6 relative over the SD 1.5 U-Net). The cost is
    memory: each converted layer keeps its transformed filters, 16/9 or 4 times its 3x3 weights (by tile size).
    Gradients, other dtypes and other devices fall back to the layers' own convolution. The C++ tile kernel builds on
    first use (a compiler is needed; about 30 s, then cached).
    """
    from . import winograd

    _check_target(target)
    for module in [target.unet, target.vae] if _is_pipeline(target) else [target]:
        winograd.convert(module, min_channels)
        # Channels-last lets the tile kernels and the transformer blocks read activations without copies.
        module.to(memory_format=torch.channels_last)
    return target
