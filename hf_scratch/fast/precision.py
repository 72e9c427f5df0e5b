"""bfloat16 where the CPU computes it natively: knowing the CPU, and running chosen components in bfloat16.

A CPU with AVX-512 BF16 (`avx512_bf16`) or AMX (`amx_bf16`) multiplies bfloat16 matrices at about twice its float32
rate, and oneDNN uses those instructions for convolutions and linear layers. Without them bfloat16 is emulated through
float32 and runs slower than float32 itself (about 1.4x on an AVX-512 Xeon without BF16). So the fastest dtype is a
property of the CPU, read here from `torch.cpu.get_capabilities()`.

`compute_in(module, dtype)` casts a module's weights and wraps its forward so that the rest of the program keeps
float32 tensors: floating inputs are cast to `dtype` on the way in (a diffusion timestep excepted: its sinusoid is
computed in float32, as diffusers does), floating outputs back to the dtype of the first input on the way out. A
pipeline's latents, scheduler arithmetic and VAE decoder thus stay float32 while its U-Net computes in bfloat16.
"""

import inspect
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

Target = TypeVar("Target")

# The x86 flags with which oneDNN runs bfloat16 matrix products in hardware (AVX-512 BF16, AMX).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Components of a pipeline that compute in bfloat16 on such a CPU, when they are large enough (`BF16_MIN_PARAMETERS`).
# The text encoder and the VAE stay float32: the text encoder runs once per prompt, so bfloat16 saves little there, and
# the VAE decoder's output is the image itself (measured errors in docs/usage.md, "Precision").
BF16_COMPONENTS = ("unet", "controlnet")
# Below this size a model is bound by per-op cost, not arithmetic, and bfloat16 gains nothing: the shipped emoji32's
# 7M-parameter U-Net took 20-22 ms a call at 8x8 latents in either dtype (1 thread, AVX-512 BF16), the SD 1.5 U-Net
# (860M) about half its float32 time.
BF16_MIN_PARAMETERS = 100_000_000
# Inputs that keep their dtype: the timestep's sinusoidal embedding needs float32 (bfloat16 rounds t = 999 to 1000).
KEEP_DTYPE_ARGUMENTS = ("timestep",)


def native_bf16_flags() -> tuple[str, ...]:
    """The flags of `NATIVE_BF16_FLAGS` that this CPU has."""
    capabilities = torch.cpu.get_capabilities()
    return tuple(flag for flag in NATIVE_BF16_FLAGS if capabilities.get(flag, False))


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX-512 BF16 or AMX)."""
    return bool(native_bf16_flags())


def fastest_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype `--dtype auto` computes in on `device`: float16 on CUDA; on the CPU bfloat16 where it is native
    (`cpu_computes_bf16`), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_computes_bf16() else torch.float32
    raise ValueError(f"device {str(device)!r} is not supported; use cpu or cuda.")


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every floating tensor in it (also inside tuples, lists and dict-like outputs) cast to `dtype`."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):  # diffusers' BaseOutput and transformers' ModelOutput are dataclass mappings
        return type(value)(**{key: _cast_floats(item, dtype) for key, item in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(item, dtype) for item in value)
    return value


def _first_float_dtype(args: tuple, kwargs: dict) -> torch.dtype:
    """The dtype of the first floating tensor argument; the default dtype (float32) when there is none (a text
    encoder takes token ids)."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.dtype
    return torch.get_default_dtype()


class _ComputeIn:
    """The forward pre-hook and hook of `compute_in`: inputs to the module's dtype, outputs back to the caller's."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.parameter_names = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
        self.caller_dtypes: list[torch.dtype] = []  # a stack: a module may call itself (nested pipelines)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.caller_dtypes.append(_first_float_dtype(args, kwargs))
        names = self.parameter_names

        def cast(name: str | None, value: Any) -> Any:
            return value if name in KEEP_DTYPE_ARGUMENTS else _cast_floats(value, self.dtype)

        args = tuple(cast(names[i] if i < len(names) else None, value) for i, value in enumerate(args))
        return args, {name: cast(name, value) for name, value in kwargs.items()}

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        caller_dtype = self.caller_dtypes.pop()
        return output if caller_dtype == self.dtype else _cast_floats(output, caller_dtype)


def compute_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts `module`'s weights to `dtype` and makes it take and return tensors of its caller's dtype; in place.

    Floating inputs are cast to `dtype` (an argument named `timestep` excepted), and floating outputs, also inside
    tuples and output dataclasses, back to the dtype of the first floating input (float32 when there is none).
    Calling it again with another dtype replaces the wrapping.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.bfloat16, got {dtype}.")
    for handle in getattr(module, "_compute_in_handles", ()):
        handle.remove()
    # nn.Module.to, not ModelMixin.to: diffusers' override warns on every dtype cast.
    nn.Module.to(module, dtype)
    hooks = _ComputeIn(module, dtype)
    module._compute_in_handles = (
        module.register_forward_pre_hook(hooks.before, with_kwargs=True),
        module.register_forward_hook(hooks.after, with_kwargs=True),
    )
    return module


def use_fastest_dtypes(
    pipe: Target, components: tuple[str, ...] = BF16_COMPONENTS, min_parameters: int | None = None
) -> Target:
    """Puts a pipeline's components in the fastest dtypes for its device; in place, returns `pipe`.

    On a CPU that computes bfloat16 natively (`cpu_computes_bf16`) each of `components` (default: the U-Net and a
    ControlNet) with at least `min_parameters` parameters computes in bfloat16 through `compute_in`, its attention
    through `hf_scratch.fast.attention` (built on first use; about 2x PyTorch's bfloat16 attention), while the
    rest (the text encoder, the VAE) and the pipeline's latents stay float32; on other CPUs nothing changes (float32 is
    the fast path there). On CUDA the whole pipeline goes to float16. This is what `hf-scratch generate --dtype auto`
    (the default) and the demo do.

    Args:
        pipe: a pipeline with `unet` and `vae`.
        components: the attribute paths of the modules to run in bfloat16. The VAE decoder is
            `("vae.post_quant_conv", "vae.decoder")`: add those (with `min_parameters=0`) to decode about twice as
            fast, at the accuracy given in docs/usage.md.
        min_parameters: smaller modules stay float32, bound by per-op cost (default `BF16_MIN_PARAMETERS`).

    Example:
        >>> pipe = ScratchStableDiffusionPipeline.from_pretrained(folder)
        >>> use_fastest_dtypes(pipe)  # the SD 1.5 U-Net in bfloat16 on an AVX-512 BF16 CPU, else unchanged
    """
    if not (hasattr(pipe, "unet") and hasattr(pipe, "vae")):
        raise ValueError(f"pipe must be a pipeline with `unet` and `vae`, got {type(pipe).__name__}.")
    dtype = fastest_dtype(pipe.device)
    if pipe.device.type == "cuda":
        return pipe.to(dtype)
    if dtype == torch.float32:
        return pipe
    min_parameters = BF16_MIN_PARAMETERS if min_parameters is None else min_parameters
    for name in components:
        component = pipe
        for attribute in name.split("."):
            component = getattr(component, attribute, None)
        if isinstance(component, nn.Module) and sum(p.numel() for p in component.parameters()) >= min_parameters:
            compute_in(component, dtype)
            _with_bf16_attention(component)
    return pipe


def _with_bf16_attention(component: nn.Module) -> None:
    """`use_bf16_attention` on a component now in bfloat16; where its kernel cannot be built (no C++ compiler) the
    component keeps PyTorch's attention, about 1.2x slower at 512 px, with a warning that says so."""
    from .attention import use_bf16_attention  # it imports this module

    try:
        use_bf16_attention(component)
    except RuntimeError as error:
        warnings.warn(f"{type(component).__name__} keeps PyTorch's bfloat16 attention: {error}", stacklevel=3)
