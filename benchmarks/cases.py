"""The benchmark cases: each builds ours and diffusers' side by side, times them interleaved and returns table rows.

Every case times our eager model against diffusers' first. Where `hf_scratch.fast` applies, each chosen fast path
then runs on its own copy of ours and is timed against diffusers again (one phase per path, so at most one extra copy
of the weights is alive), recording its set-up time (build, transform or compile, with the first call) and the
relative error of its output against our eager output. Cases that report peak memory run each implementation in a
fresh process (`benchmarks.child`).
"""

import copy
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import peers
from .builders import build_pair, build_pipeline, place, shipped_pipelines
from .rows import Row, Settings, relative_error
from .timing import interleaved, median, run_child, time_call

# Each fast path of `hf_scratch.fast`: the row's variant name and the function that applies it in place.
FAST_PATHS = {
    "winograd": ("ours + use_winograd", "use_winograd"),
    "compile": ("ours + compile_for_inference", "compile_for_inference"),
    "freeze": ("ours + freeze_for_inference", "freeze_for_inference"),
}
SD_PATHS = ("winograd", "compile")  # those for the SD 1.5 models; freeze_for_inference is for small U-Nets
BF16_VARIANT = "ours bf16"


def _in_bfloat16(target: Any) -> Any:
    """Our bfloat16 path (`hf_scratch.fast.compute_in` and `use_bf16_attention`, as `use_fastest_dtypes` runs them): a
    pipeline's U-Net, a VAE's decoder or a U-Net computes in bfloat16 behind float32 inputs and outputs, whatever its
    size, its attention through our bfloat16 kernel where the CPU computes bfloat16 natively (a forced `--bf16`
    elsewhere keeps PyTorch's attention); in place. Winograd tiles are float32 only, so there is no bfloat16 Winograd
    variant."""
    from hf_scratch.fast import compute_in, cpu_computes_bf16, use_bf16_attention

    if hasattr(target, "unet"):
        modules = [target.unet]
    elif hasattr(target, "decoder"):
        modules = [module for module in (target.post_quant_conv, target.decoder) if module is not None]
    else:
        modules = [target]
    for module in modules:
        compute_in(module, torch.bfloat16)
        if cpu_computes_bf16():
            use_bf16_attention(module)
    return target


def _time_row(
    case: str,
    description: str,
    variant: str,
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    settings: Settings,
    warmup: int | None = None,
) -> Row:
    times = interleaved(
        {"ours": ours, "reference": reference},
        settings.warmup if warmup is None else warmup,
        settings.repeats,
        settings.device,
    )
    return Row(
        case, description, variant, "s", median(times["ours"]), median(times["reference"]),
        times=times["ours"], reference_times=times["reference"],
    )  # fmt: skip


def _eager_and_fast_rows(
    case: str,
    description: str,
    ours: Any,
    run: Callable[[Any], torch.Tensor],
    reference: Callable[[], torch.Tensor],
    settings: Settings,
    *,
    paths: tuple[str, ...],
    first_call: Callable[[Any], Any] | None = None,
    warmup: int | None = None,
) -> list[Row]:
    """Times `run(ours)` against `reference`, then each fast path of `settings.fast` that is in `paths` (those that
    apply to `ours`) on a copy of `ours`, and with `settings.bf16` our bfloat16 path (`_in_bfloat16`).

    The eager row records the relative error against diffusers' output; each fast row its set-up time (build,
    transform or compile, with the first call, `first_call` when given) and its error against our eager output.
    """
    import hf_scratch.fast

    eager_output = run(ours)
    rows = [_time_row(case, description, "ours", lambda: run(ours), reference, settings, warmup)]
    rows[0].extra["rel_err_vs_diffusers"] = relative_error(eager_output, reference())
    variants = [(FAST_PATHS[name][0], getattr(hf_scratch.fast, FAST_PATHS[name][1])) for name in settings.fast
                if name in paths]  # fmt: skip
    if settings.bf16:
        variants.append((BF16_VARIANT, _in_bfloat16))
    for variant, function in variants:
        fast = function(copy.deepcopy(ours))
        setup_s = time_call(lambda fast=fast: (first_call or run)(fast), settings.device)
        error = relative_error(run(fast), eager_output)
        row = _time_row(case, description, variant, lambda fast=fast: run(fast), reference, settings, warmup)
        row.extra.update(setup_s=setup_s, rel_err_vs_eager=error)
        rows.append(row)
        del fast
        torch._dynamo.reset()  # drops a compiled graph and its frozen copy of the weights
        gc.collect()
    return rows


def unet_step(settings: Settings, pixels: int) -> list[Row]:
    """One U-Net forward at batch 2 (a CFG pair), plus OpenVINO and ONNX Runtime at 512 px when installed."""
    size, device, dtype = settings.size, settings.device, settings.dtype
    latent = size.latent_sizes[pixels]
    case, description = f"unet_{pixels}", f"U-Net step, batch {size.batch}, {latent}x{latent} latents ({pixels} px)"
    ours, reference = (place(model, device, dtype) for model in build_pair("unet", size.unet))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(size.batch, size.unet["in_channels"], latent, latent, generator=generator)
    context = torch.randn(size.batch, size.text_length, size.unet["cross_attention_dim"], generator=generator)
    inputs = (sample.to(device, dtype), torch.full((size.batch,), 500, device=device), context.to(device, dtype))

    def run(model: torch.nn.Module) -> torch.Tensor:
        return model(*inputs).sample

    def run_reference() -> torch.Tensor:
        return reference(*inputs).sample

    with torch.no_grad():
        rows = _eager_and_fast_rows(case, description, ours, run, run_reference, settings, paths=SD_PATHS)
        del ours
        gc.collect()
        if settings.peers and settings.bf16:
            rows.append(peers.diffusers_bf16_row(case, description, reference, inputs, run_reference, settings))
        if settings.peers and pixels == 512 and device == "cpu" and dtype == torch.float32:
            rows += peers.unet_rows(case, description, reference, inputs, run_reference, settings)
    return rows


def vae_decode(settings: Settings, pixels: int) -> list[Row]:
    """Decoding one latent to an image, without tiling."""
    size, device, dtype = settings.size, settings.device, settings.dtype
    latent = size.latent_sizes[pixels]
    case, description = f"vae_decode_{pixels}", f"VAE decode, batch 1, {latent}x{latent} latent ({pixels} px)"
    ours, reference = (place(model, device, dtype) for model in build_pair("vae", size.vae))
    latents = torch.randn(1, size.vae["latent_channels"], latent, latent, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)

    def run(model: torch.nn.Module) -> torch.Tensor:
        return model.decode(latents).sample

    def run_reference() -> torch.Tensor:
        return reference.decode(latents).sample

    with torch.no_grad():
        return _eager_and_fast_rows(case, description, ours, run, run_reference, settings, paths=SD_PATHS)


def vae_decode_tiled(settings: Settings, pixels: int = 1024) -> list[Row]:
    """Tiled decoding of a large latent, each implementation in a fresh process: time and peak RSS."""
    size = settings.size
    latent = size.latent_sizes[pixels]
    case = f"vae_decode_{pixels}_tiled"
    description = f"VAE decode with tiling, batch 1, {latent}x{latent} latent ({pixels} px)"
    task = {"job": "vae_tiled", "size": size.name, "latent": latent, "device": settings.device}
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "diffusers": []}
    for _ in range(max(1, settings.repeats // 2)):
        for impl in results:
            results[impl].append(run_child({**task, "impl": impl, "dtype": str(settings.dtype).split(".")[1]}))
    time_row = Row(
        case, description, "ours", "s",
        median([r["seconds"] for r in results["ours"]]), median([r["seconds"] for r in results["diffusers"]]),
        times=[r["seconds"] for r in results["ours"]], reference_times=[r["seconds"] for r in results["diffusers"]],
    )  # fmt: skip
    memory_key = "peak_gpu_gib" if settings.device.startswith("cuda") else "peak_rss_gib"
    memory_row = Row(
        f"{case}_memory", f"{description}, peak {'GPU memory' if memory_key == 'peak_gpu_gib' else 'RSS'}", "ours",
        "GiB", max(r[memory_key] for r in results["ours"]), max(r[memory_key] for r in results["diffusers"]),
    )  # fmt: skip
    return [time_row, memory_row]


def text_encoder(settings: Settings) -> list[Row]:
    """The CLIP text encoder on a CFG pair of 77-token prompts."""
    size, device = settings.size, settings.device
    case, description = "text_encoder", f"CLIP text encoder, batch {size.batch} x {size.text_length} tokens"
    pair = build_pair("text_encoder", size.text_encoder)
    ours, reference = (place(model, device, settings.dtype) for model in pair)
    vocab = size.text_encoder["vocab_size"]
    input_ids = torch.randint(0, vocab, (size.batch, size.text_length), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)

    def run_ours() -> torch.Tensor:
        return ours(input_ids)[0]

    def run_reference() -> torch.Tensor:
        return reference(input_ids)[0]

    with torch.no_grad():
        row = _time_row(case, description, "ours", run_ours, run_reference, settings)
        row.extra["rel_err_vs_diffusers"] = relative_error(run_ours(), run_reference())
    return [row]


def pipeline(settings: Settings, pixels: int = 256) -> list[Row]:
    """A whole text-to-image generation with CFG: our pipeline and diffusers' `StableDiffusionPipeline`."""
    size, device, dtype = settings.size, settings.device, settings.dtype
    height = size.latent_sizes[pixels] * size.vae_scale()
    steps = size.pipeline_steps
    case, description = f"pipeline_{pixels}", f"text-to-image, {height}x{height} px, {steps} DPM-Solver++ steps, CFG"
    pairs = {kind: build_pair(kind, getattr(size, kind)) for kind in ("unet", "vae", "text_encoder")}
    ours = place(build_pipeline("ours", {kind: pair[0] for kind, pair in pairs.items()}, size), device, dtype)
    reference = place(build_pipeline("diffusers", {kind: pair[1] for kind, pair in pairs.items()}, size), device, dtype)
    del pairs

    def generate(pipe: Any, num_inference_steps: int = steps) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red heart", height=height, width=height, num_inference_steps=num_inference_steps,
            generator=generator, output_type="pt",
        ).images  # fmt: skip

    with torch.no_grad():
        # A one-step warm-up: a full one would cost a whole generation.
        generate(ours, 1)
        generate(reference, 1)
        return _eager_and_fast_rows(case, description, ours, generate, lambda: generate(reference), settings,
                                    first_call=lambda pipe: generate(pipe, 1), warmup=0,
                                    paths=SD_PATHS)  # fmt: skip


def shipped_generate(settings: Settings) -> list[Row]:
    """One image of the shipped emoji32 (32 px, guidance 4, the model's flow-matching Euler scheduler): our pipeline
    and diffusers' `StableDiffusionPipeline` on the same weights; the latency a user of `hf-scratch generate` sees."""
    steps = settings.size.pipeline_steps
    ours, reference = (place(pipe, settings.device, settings.dtype) for pipe in shipped_pipelines())
    case, description = "generate_emoji32", f"one image of the shipped emoji32, 32x32 px, {steps} steps, CFG"

    def generate(pipe: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe("red heart, twemoji style", num_inference_steps=steps, guidance_scale=4.0, generator=generator,
                    output_type="pt").images  # fmt: skip

    with torch.no_grad():
        return _eager_and_fast_rows(case, description, ours, generate, lambda: generate(reference), settings,
                                    paths=("freeze", "compile"))  # fmt: skip


def train_step(settings: Settings) -> list[Row]:
    """A training step of a small U-Net of the SD layout (`Size.train_unet`)."""
    size = settings.size
    return _train_step_rows(
        settings, "train_step", size.train_unet, size.train_batch, size.train_latent, size.text_length
    )


def train_step_emoji32(settings: Settings) -> list[Row]:
    """A training step at the emoji32 recipe's configuration: the shipped U-Net's config, the recipe's batch, the
    latent size it was trained on and its text encoder's context length."""
    from hf_scratch.pretrained import default_model_path

    folder = Path(default_model_path())
    config = {k: v for k, v in json.loads((folder / "unet" / "config.json").read_text()).items() if k[0] != "_"}
    text_length = json.loads((folder / "text_encoder" / "config.json").read_text())["max_position_embeddings"]
    batch = settings.size.recipe_batch
    return _train_step_rows(settings, "train_step_emoji32", config, batch, config["sample_size"], text_length)


def _train_step_rows(
    settings: Settings, case: str, config: dict[str, Any], batch: int, latent: int, text_length: int
) -> list[Row]:
    """Forward, backward and AdamW step of a U-Net on noise prediction; reported in samples per second."""
    size, device = settings.size, settings.device
    description = f"U-Net training step, batch {batch}, {latent}x{latent} latents"
    ours, reference = (model.to(device).train() for model in build_pair("unet", config, share_weights=False))
    parameters = sum(p.numel() for p in reference.parameters())
    description += f", {parameters / 1e6:.1f}M parameters"
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(batch, config["in_channels"], latent, latent, generator=generator).to(device),
        torch.randint(0, size.scheduler["num_train_timesteps"], (batch,), generator=generator).to(device),
        torch.randn(batch, text_length, config["cross_attention_dim"], generator=generator).to(device),
    )
    target = torch.randn(batch, config["out_channels"], latent, latent, generator=generator).to(device)

    def make_step(
        model: torch.nn.Module, optimizer: torch.optim.Optimizer, sample: torch.Tensor = inputs[0],
        dtype: torch.dtype = settings.dtype,
    ) -> Callable[[], None]:  # fmt: skip
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            # Mixed precision as accelerate's --mixed_precision bf16 runs it: weights and optimiser in float32.
            with torch.autocast(device.split(":")[0], dtype, enabled=dtype != torch.float32):
                loss = F.mse_loss(model(sample, *inputs[1:]).sample.float(), target)
            loss.backward()
            optimizer.step()

        return step

    # diffusers' training scripts use torch.optim.AdamW with its defaults (a per-tensor loop on the CPU).
    reference_step = make_step(reference, torch.optim.AdamW(reference.parameters(), lr=1e-4))
    ours_step = make_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4))
    rows = [_time_row(case, description, "ours", ours_step, reference_step, settings)]
    if settings.fast:
        # The training levers, one at a time on top of each other: a fused optimiser step (one kernel for all
        # tensors), channels-last activations and weights (oneDNN's faster convolution backward), then forward and
        # backward compiled by inductor. None is in hf_scratch.fast: see BENCHMARKS.md for what each gave.
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
        fused_step = make_step(ours, optimizer)
        rows.append(_time_row(case, description, "ours + AdamW(fused=True)", fused_step, reference_step, settings))
        ours.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)  # its state in the new layout
        channels_last_step = make_step(ours, optimizer, inputs[0].contiguous(memory_format=torch.channels_last))
        variant = "ours + AdamW(fused=True) + channels_last"
        rows.append(_time_row(case, description, variant, channels_last_step, reference_step, settings))
        if settings.bf16:
            step = make_step(ours, optimizer, inputs[0].contiguous(memory_format=torch.channels_last), torch.bfloat16)
            rows.append(_time_row(case, description, f"{variant} + bf16 autocast", step, reference_step, settings))
        if "compile" in settings.fast:
            ours.compile(backend="inductor", dynamic=False)  # in place: the step now runs the compiled model
            compile_s = time_call(channels_last_step, device)
            row = _time_row(case, description, f"{variant} + torch.compile", channels_last_step, reference_step,
                            settings)  # fmt: skip
            row.extra["compile_s"] = compile_s
            rows.append(row)
    elif settings.bf16:
        step = make_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), dtype=torch.bfloat16)
        rows.append(_time_row(case, description, "ours + bf16 autocast", step, reference_step, settings))
    if settings.peers and settings.bf16:
        step = make_step(reference, torch.optim.AdamW(reference.parameters(), lr=1e-4), dtype=torch.bfloat16)
        rows.append(_time_row(case, description, "diffusers + bf16 autocast", step, reference_step, settings))
    for row in rows:  # seconds per step -> samples per second
        row.times = [batch / t for t in row.times]
        row.reference_times = [batch / t for t in row.reference_times]
        row.value, row.reference = batch / row.value, batch / row.reference
        row.unit, row.higher_is_better = "samples/s", True
    return rows


def generation_memory(settings: Settings, pixels: int = 512) -> list[Row]:
    """Peak memory of a whole generation (text encoder, a few U-Net steps, VAE decode), each in a fresh process."""
    size = settings.size
    height = size.latent_sizes[pixels] * size.vae_scale()
    case = f"generate_{pixels}_memory"
    description = f"peak RSS of a {height}x{height} px generation ({size.generation_steps} steps, CFG)"
    task = {"job": "generate", "size": size.name, "pixels": pixels, "device": settings.device}
    dtype = str(settings.dtype).split(".")[1]
    results = {impl: run_child({**task, "impl": impl, "dtype": dtype}) for impl in ("ours", "diffusers")}
    key = "peak_rss_gib"
    if settings.device.startswith("cuda"):
        key, description = "peak_gpu_gib", description.replace("RSS", "GPU memory")
    row = Row(case, description, "ours", "GiB", results["ours"][key], results["diffusers"][key])
    row.extra["seconds"] = {impl: result["seconds"] for impl, result in results.items()}
    return [row]


CASES: dict[str, Callable[[Settings], list[Row]]] = {
    "unet_256": lambda settings: unet_step(settings, 256),
    "unet_512": lambda settings: unet_step(settings, 512),
    "vae_decode_256": lambda settings: vae_decode(settings, 256),
    "vae_decode_512": lambda settings: vae_decode(settings, 512),
    "vae_decode_1024_tiled": vae_decode_tiled,
    "text_encoder": text_encoder,
    "pipeline_256": pipeline,
    "train_step": train_step,
    "generate_emoji32": shipped_generate,
    "train_step_emoji32": train_step_emoji32,
    "generate_512_memory": generation_memory,
}
