"""Opt-in fast path for inference: `torch.compile` (inductor) with the weights frozen into the compiled graph.

Nothing in the library calls this module; eager PyTorch stays the default, because compiling costs minutes on a small
CPU and ties the model to one input shape. `compile_for_inference` compiles a model, a VAE's decoder, or a pipeline's
U-Net in place. With `freeze=True`, inductor treats the weights as constants (constant folding, oneDNN
weight pre-packing for convolutions and linear layers) and fuses the element-wise work around them; the outputs match
eager within float32 rounding. `BENCHMARKS.md` records the speed-ups, compile times and errors measured with
`python -m benchmarks`; on a 2-core Xeon the SD 1.5 U-Net step took 0.61x the eager time (relative error 3e-6).

The costs: compiling the SD 1.5 U-Net took minutes (976 s cold on a loaded 2-core machine), and the frozen,
pre-packed weights are a second copy (peak RSS 9.4 GB for one compiled U-Net, against 3.4 GB eager). Inductor caches
compiled code on disk (`TORCHINDUCTOR_CACHE_DIR`, default `/tmp/torchinductor_$USER`), so a second process with the
same model and shapes compiled in 158 s.

Example:
    >>> pipe = ScratchStableDiffusionPipeline.from_pretrained(folder)
    >>> compile_for_inference(pipe)  # in place; the first call at each shape compiles
    >>> with torch.no_grad():
    ...     image = pipe("red heart, twemoji style", num_inference_steps=20).images[0]
"""

from typing import TypeVar

from torch import nn

Target = TypeVar("Target")


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
    if hasattr(target, "unet") and hasattr(target, "vae"):
        _compile(target.unet, freeze, dynamic)
    elif isinstance(target, nn.Module) and isinstance(getattr(target, "decoder", None), nn.Module):
        _compile(target.decoder, freeze, dynamic)
    elif isinstance(target, nn.Module):
        _compile(target, freeze, dynamic)
    else:
        raise ValueError(
            f"target must be an nn.Module or a pipeline with `unet` and `vae`, got {type(target).__name__}"
        )
    return target

