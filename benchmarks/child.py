"""One memory-measured workload in a fresh process: `python -m benchmarks.child '<json task>'`.

It prints one JSON line with the seconds the workload took and the process's peak RSS (and peak GPU memory on CUDA).
The models are randomly initialised from a seed in this process (not loaded from the parent), so the peak holds one
copy of the weights, as it would for a user who loads a checkpoint; the values do not change time or memory.
"""

import json
import sys
from typing import Any

import torch

from .builders import build, build_pipeline, place
from .sizes import get_size
from .timing import peak_rss_gib, time_call


def _vae_tiled(task: dict[str, Any]) -> float:
    size, device, dtype = get_size(task["size"]), task["device"], getattr(torch, task["dtype"])
    vae = place(build("vae", task["impl"], size.vae), device, dtype)
    vae.enable_tiling()
    latents = torch.randn(1, size.vae["latent_channels"], task["latent"], task["latent"]).to(device, dtype)
    with torch.no_grad():
        return time_call(lambda: vae.decode(latents), device)


def _generate(task: dict[str, Any]) -> float:
    size, device, dtype, impl = get_size(task["size"]), task["device"], getattr(torch, task["dtype"]), task["impl"]
    components = {kind: build(kind, impl, getattr(size, kind)) for kind in ("unet", "vae", "text_encoder")}
    pipe = place(build_pipeline(impl, components, size), device, dtype)
    height = size.latent_sizes[task["pixels"]] * size.vae_scale()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return time_call(
            lambda: pipe("a red heart", height=height, width=height, num_inference_steps=size.generation_steps,
                         generator=generator, output_type="pil"),
            device,
        )  # fmt: skip


JOBS = {"vae_tiled": _vae_tiled, "generate": _generate}


def main() -> None:
    task = json.loads(sys.argv[1])
    torch.set_num_threads(task.get("threads", torch.get_num_threads()))
    seconds = JOBS[task["job"]](task)
    result = {"seconds": seconds, "peak_rss_gib": peak_rss_gib()}
    if task["device"].startswith("cuda"):
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result))


if __name__ == "__main__":
    main()
