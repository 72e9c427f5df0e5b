"""`hf-scratch`: generate images, convert checkpoints, inspect model folders, build the offline datasets, evaluate.

Heavy imports (torch, diffusers) happen inside the sub-commands, so `hf-scratch --help` answers at once.
"""

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hf_scratch.sampling import SAMPLING_DEFAULTS, SAMPLING_FILE, default_sampling, guidance_inputs, read_json_object
from hf_scratch.schedulers import SCHEDULERS, make_scheduler, scheduler_name

SEED_MAX = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def _resolve_model(model: str | None) -> str:
    if model is None:
        from hf_scratch.pretrained import default_model_path

        return default_model_path()
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"--model {model!r} is not a folder. Pass a diffusers-layout pipeline folder.")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--model {model!r} holds no model_index.json. Pass a diffusers-layout pipeline folder.")
    read_json_object(folder / "model_index.json")
    from safetensors import safe_open

    for file in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)  # reads the header entry; a short file fails here
        except PermissionError:
            raise ValueError(f"{str(file)!r} cannot be read (permission denied).") from None
        except Exception as error:  # safetensors' own error types: a truncated or damaged file
            raise ValueError(f"{str(file)!r} is not a complete safetensors file ({error}).") from None
    return model


def _image_format(path: Path, flag: str = "--output") -> str:
    """The Pillow format that writes `path`'s extension; ValueError unless Pillow can write an RGB image in it."""
    import PIL.Image

    image_format = PIL.Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{flag} {str(path)!r} has no image extension; end it with .png, .jpg or .webp.")
    try:
        PIL.Image.new("RGB", (8, 8)).save(io.BytesIO(), format=image_format)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(
            f"{flag} {str(path)!r}: Pillow cannot write RGB images as {image_format} ({error}); use .png, .jpg or "
            ".webp."
        ) from None
    return image_format


def _check_output(path: Path) -> None:
    """Before any model runs: an image extension PIL can write, and a folder that exists (or can be made) and is
    writable."""
    _image_format(path)
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--output {str(path)!r} lies under {str(parent)!r}, which is a file, not a folder.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output {str(path)!r}: cannot create its folder ({error.strerror}).") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"--output {str(path)!r}: the folder {str(path.parent)!r} is not writable.")


def _refuse_overlap(source: Path, target: Path, source_flag: str, target_flag: str) -> None:
    """ValueError when writing `target` could replace `source`: the same path, or a target inside the source."""
    source, target = source.resolve(), target.resolve()
    if source == target or source in target.parents:
        relation = "is" if source == target else "lies inside"
        raise ValueError(
            f"{target_flag} {str(target)!r} {relation} {source_flag} {str(source)!r}; writing it would destroy the "
            "input. Choose a target outside the source."
        )


def _partial_path(path: Path) -> Path:
    """A hidden name beside `path` to write to first, so that `path` only ever appears complete (by `os.replace`)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def _save_image(image, path: Path, pnginfo=None) -> None:
    """Write `image` to `path` through a temporary file and a rename: an interrupted write leaves no partial image."""
    partial = _partial_path(path)
    try:
        image.save(partial, format=_image_format(path), pnginfo=pnginfo)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command (a KeyboardInterrupt, so that no library's `except Exception` swallows it)."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


@contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Interrupted` while the block runs (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signal_number: int, frame) -> None:
        raise Interrupted(signal_number)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is None:
        if not args.prompt:
            raise ValueError("Give a prompt, or --prompts-file with one prompt per line.")
        return [args.prompt]
    if args.prompt:
        raise ValueError(
            f"Give either a prompt ({args.prompt!r}) or --prompts-file {args.prompts_file!r}, not both; put the "
            "prompt in the file to run it too."
        )
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts-file {str(path)!r} does not exist.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r} holds no prompts.")
    return prompts


DTYPES = ("auto", "float32", "float16", "bfloat16")
# The pipeline class and the A1111 "parameters" line of each generating sub-command.
TASKS = {
    "generate": "hf_scratch.pipelines.text_to_image:ScratchStableDiffusionPipeline",
    "img2img": "hf_scratch.pipelines.image_to_image:ScratchStableDiffusionImg2ImgPipeline",
    "inpaint": "hf_scratch.pipelines.inpaint:ScratchStableDiffusionInpaintPipeline",
}


def _resolve_sampling(args: argparse.Namespace, sampling: dict) -> dict:
    """The run's steps and guidance: the flags, else the model's `sampling` (`default_sampling`). The file's scale
    and options belong to its guidance kind: under another --guidance-kind they fall back to `SAMPLING_DEFAULTS`.
    Returns the guidance settings as recorded in the PNG (`guidance_kind` and that kind's options; `guide` a path);
    sets args.steps and args.guidance. ValueError naming the flag for combinations that cannot run."""
    generate = args.command == "generate"
    guider_flags = {"--guidance-interval": args.guidance_interval, "--apg-eta": args.apg_eta,
                    "--apg-momentum": args.apg_momentum, "--guide": args.guide}  # fmt: skip
    if not generate:
        given = [flag for flag, value in guider_flags.items() if value is not None]
        if args.guidance_kind not in (None, "cfg"):
            given.insert(0, f"--guidance-kind {args.guidance_kind}")
        if given:
            raise ValueError(
                f"{', '.join(given)}: {args.command} guides with classifier-free guidance only (--guidance, "
                "--guidance-rescale); the other guidance kinds are for `hf-scratch generate`."
            )
    kind = args.guidance_kind or (sampling["guidance_kind"] if generate else "cfg")
    own = sampling if kind == sampling["guidance_kind"] else SAMPLING_DEFAULTS
    args.steps = sampling["num_inference_steps"] if args.steps is None else args.steps
    args.guidance = own["guidance_scale"] if args.guidance is None else args.guidance
    for flag, value in {**guider_flags, "--guidance-rescale": args.guidance_rescale}.items():
        option_of = {"--guidance-interval": ("interval",), "--apg-eta": ("apg",), "--apg-momentum": ("apg",),
                     "--guide": ("auto",), "--guidance-rescale": ("cfg", "interval")}[flag]  # fmt: skip
        if value is not None and kind not in option_of:
            raise ValueError(
                f"{flag} applies to --guidance-kind {' or '.join(option_of)}, not {kind}; add --guidance-kind "
                f"{option_of[0]} or drop {flag}."
            )
    settings = {"guidance_kind": kind}
    if kind in ("cfg", "interval"):
        rescale = own["guidance_rescale"] if args.guidance_rescale is None else args.guidance_rescale
        if not 0 <= rescale <= 1:
            raise ValueError(f"--guidance-rescale {rescale} is out of range; use a φ in [0, 1] (0.7 in the paper).")
        settings["guidance_rescale"] = rescale
    if kind == "interval":
        low, high = own["sigma_low"], own["sigma_high"]
        if args.guidance_interval is not None:
            low, high = args.guidance_interval
            high = None if math.isinf(high) else high
        if not 0 <= low < (math.inf if high is None else high):
            raise ValueError(
                f"--guidance-interval {low} {high}: needs 0 <= LOW < HIGH (EDM sigmas; HIGH may be inf), e.g. "
                "--guidance-interval 0.28 5.42."
            )
        settings.update(sigma_low=low, sigma_high=high)
    if kind == "apg":
        settings["eta"] = own["eta"] if args.apg_eta is None else args.apg_eta
        settings["momentum"] = own["momentum"] if args.apg_momentum is None else args.apg_momentum
    if kind == "auto":
        guide = args.guide or sampling["guide"]
        if guide is None:
            raise ValueError(
                "--guidance-kind auto needs --guide FOLDER, the U-Net folder of a weaker guide model (or a 'guide' "
                f"in the model folder's {SAMPLING_FILE})."
            )
        if not (Path(guide) / "config.json").is_file():
            raise ValueError(f"--guide {guide!r} is not a U-Net folder (it holds no config.json).")
        settings["guide"] = str(guide)
    return settings


def _device_and_dtype(args: argparse.Namespace) -> tuple:
    """(torch.device, torch.dtype) of --device and --dtype, the dtype the weights load in: "auto" is CUDA when there
    is one, and float16 on CUDA, float32 on the CPU (where `use_fastest_dtypes` then picks each component's dtype)."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r} is not supported; use cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device; use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    name = ("float16" if device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    return device, getattr(torch, name)


def _scaled_paths(specs: Sequence[str], flag: str) -> list[tuple]:
    """--lora PATH[:SCALE] specs as (path, scale) pairs; the scale defaults to 1."""
    pairs = []
    for spec in specs:
        path, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head and not Path(spec).exists():
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise ValueError(f"{flag} {spec!r}: the scale after ':' must be a number, e.g. {head}:0.8.") from None
        if not Path(path).exists():
            raise ValueError(f"{flag} {spec!r}: {path!r} does not exist.")
        pairs.append((path, scale))
    return pairs


def _open_image(path: str | None, flag: str, grey: bool = False):
    """The image file of `flag`, decoded and checked by the pipelines' reader (`hf_scratch.images`) before any model
    loads."""
    from hf_scratch.images import open_image, read_image

    if path is None:
        raise ValueError(f"{flag} is required: the path of an image file.")
    image = open_image(path, flag)
    try:
        read_image(image, grey=grey)
    except ValueError as error:
        raise ValueError(f"{flag} {path!r}: {error}") from None
    return image


def format_parameters(settings: dict) -> str:
    """The generation settings in AUTOMATIC1111's `parameters` text: the prompt, an optional "Negative prompt:" line,
    then "Key: value" pairs (a value holding a comma or a quote is written as a JSON string, as AUTOMATIC1111 does).
    Guidance other than plain CFG adds "Guidance" (e.g. `interval (0.28, 5.42]`), "Guidance rescale" and "Guide"."""
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings["steps"],
        "Sampler": settings["sampler"],
        "CFG scale": settings["guidance"],
        "Seed": settings["seed"],
        "Size": f"{settings['width']}x{settings['height']}",
        "Model": settings["model"],
    }
    if settings.get("batch_size", 1) > 1:
        fields.update({"Batch size": settings["batch_size"], "Batch pos": settings["batch_pos"]})
    if settings.get("strength") is not None:
        fields["Denoising strength"] = settings["strength"]
    fields.update(_guidance_fields(settings))
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _quoted(value) -> str:
    text = str(value)
    return json.dumps(text) if "," in text or '"' in text else text


def _guidance_fields(settings: dict) -> dict:
    """The A1111 fields of the guidance in `settings` (none for plain CFG, as older images have)."""
    kind, fields = settings.get("guidance_kind", "cfg"), {}
    if kind == "interval":
        high = "inf" if settings["sigma_high"] is None else settings["sigma_high"]
        fields["Guidance"] = f"interval ({settings['sigma_low']}, {high}]"
    elif kind == "apg":
        momentum = "" if settings["momentum"] is None else f" momentum {settings['momentum']}"
        fields["Guidance"] = f"apg eta {settings['eta']}{momentum}"
    elif kind == "auto":
        fields.update({"Guidance": "auto", "Guide": settings["guide"]})
    if settings.get("guidance_rescale"):
        fields["Guidance rescale"] = settings["guidance_rescale"]
    return fields


_GUIDANCE_TEXT = {
    "interval": re.compile(r"interval \((?P<sigma_low>[^,]+), (?P<sigma_high>[^\]]+)\]"),
    "apg": re.compile(r"apg eta (?P<eta>\S+)(?: momentum (?P<momentum>\S+))?"),
    "auto": re.compile(r"auto"),
}


def _parse_guidance(fields: dict) -> dict:
    """The guidance settings of A1111 fields written by `_guidance_fields`; plain CFG when there are none."""
    settings = {"guidance_kind": "cfg"}
    if "Guidance" in fields:
        text = fields["Guidance"]
        kind = text.split(" ", 1)[0]
        match = _GUIDANCE_TEXT[kind].fullmatch(text) if kind in _GUIDANCE_TEXT else None
        number = r"-?\d+(\.\d*)?(e-?\d+)?|inf"
        if match is None or not all(re.fullmatch(number, value) for value in match.groupdict().values() if value):
            raise ValueError(
                f"the parameters text's 'Guidance' field is {text!r}; expected 'interval (LOW, HIGH]', "
                "'apg eta ETA [momentum BETA]' or 'auto'."
            )
        values = {key: None if value in (None, "inf") else float(value) for key, value in match.groupdict().items()}
        settings.update(guidance_kind=kind, **values)
        if kind == "auto":
            if "Guide" not in fields:
                raise ValueError("the parameters text says 'Guidance: auto' but has no 'Guide' field.")
            settings["guide"] = fields["Guide"]
    if "Guidance rescale" in fields:
        try:
            settings["guidance_rescale"] = float(fields["Guidance rescale"])
        except ValueError:
            raise ValueError(f"the parameters text's 'Guidance rescale' is {fields['Guidance rescale']!r}.") from None
    return settings


# PNG text chunk holding the settings as JSON beside A1111's "parameters" text: it round-trips any prompt, those with
# newlines or a line starting "Negative prompt:" included, which the text cannot.
SETTINGS_CHUNK = "hf-scratch"
SETTINGS_FIELDS = {"prompt": str, "negative_prompt": (str, type(None)), "steps": int, "sampler": str,
                   "guidance": (int, float), "seed": int, "width": int, "height": int, "model": str,
                   "batch_size": int, "batch_pos": int}  # fmt: skip
# The guidance keys of the chunk, each optional: an image without them was drawn with plain CFG.
GUIDANCE_FIELDS = {"guidance_kind": str, "guidance_rescale": (int, float), "sigma_low": (int, float),
                   "sigma_high": (int, float, type(None)), "eta": (int, float), "momentum": (int, float, type(None)),
                   "guide": str}  # fmt: skip
# A1111's "Key: value" pairs, a value being a JSON string or running to the next comma.
_A1111_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """The inverse of `format_parameters`: prompt, negative_prompt, steps, sampler, guidance, seed, width, height,
    model, guidance_kind ("cfg" when the text names none) with its options, and batch_size, batch_pos and strength
    when present. Lines after "Negative prompt:" belong to the negative
    prompt, as in AUTOMATIC1111. Raises ValueError naming a missing or malformed field."""
    lines = text.split("\n")
    if len(lines) < 2:
        raise ValueError("the parameters text has no settings line; it should end with 'Steps: ..., Seed: ...'.")
    fields = {key: json.loads(value) if value.startswith('"') else value
              for key, value in _A1111_FIELD.findall(lines[-1])}  # fmt: skip
    negative_start = next((i for i, line in enumerate(lines[:-1]) if line.startswith("Negative prompt: ")), None)
    prompt_lines = lines[: len(lines) - 1 if negative_start is None else negative_start]
    negative = None
    if negative_start is not None:
        negative = "\n".join(lines[negative_start:-1])[len("Negative prompt: ") :]

    def field(name: str, convert: Callable, default=None):
        if name not in fields:
            if default is not None:
                return default
            raise ValueError(f"the parameters text has no {name!r} field; its settings line is {lines[-1]!r}.")
        try:
            return convert(fields[name])
        except ValueError:
            raise ValueError(f"the parameters text's {name!r} field is {fields[name]!r}, not a valid value.") from None

    def pixels(size: str) -> tuple[int, int]:
        width, height = size.split("x")
        return int(width), int(height)

    width, height = field("Size", pixels)
    settings = {
        "prompt": "\n".join(prompt_lines),
        "negative_prompt": negative,
        "steps": field("Steps", int),
        "sampler": field("Sampler", str),
        "guidance": field("CFG scale", float),
        "seed": field("Seed", int),
        "width": width,
        "height": height,
        "model": field("Model", str),
        "batch_size": field("Batch size", int, 1),
        "batch_pos": field("Batch pos", int, 0),
    }
    if "Denoising strength" in fields:
        settings["strength"] = field("Denoising strength", float)
    settings.update(_parse_guidance(fields))
    return settings


def _settings_from_json(text: str, path: str) -> dict:
    """The settings of the `SETTINGS_CHUNK` text, checked field by field."""
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--parameters-from {path!r}: its {SETTINGS_CHUNK!r} chunk is not valid JSON ({error})."
        ) from None
    if not isinstance(settings, dict):
        raise ValueError(f"--parameters-from {path!r}: its {SETTINGS_CHUNK!r} chunk is not a JSON object.")
    for name, kind in SETTINGS_FIELDS.items():
        if not isinstance(settings.get(name), kind) or isinstance(settings.get(name), bool):
            raise ValueError(f"--parameters-from {path!r}: its {SETTINGS_CHUNK!r} chunk has no valid {name!r}.")
    for name, kind in GUIDANCE_FIELDS.items():
        if name in settings and (not isinstance(settings[name], kind) or isinstance(settings[name], bool)):
            raise ValueError(f"--parameters-from {path!r}: its {SETTINGS_CHUNK!r} chunk has an invalid {name!r}.")
    return settings


def _apply_parameters_from(args: argparse.Namespace) -> None:
    """--parameters-from PNG: the prompt and settings written into an image by an earlier run replace the flags'."""
    from hf_scratch.images import open_image

    path = args.parameters_from
    try:
        image = open_image(path, "--parameters-from")
    except ValueError as error:
        raise ValueError(f"--parameters-from {path!r} cannot be read ({error}).") from None
    if SETTINGS_CHUNK in image.info:
        settings = _settings_from_json(image.info[SETTINGS_CHUNK], path)
    elif "parameters" in image.info:
        try:
            settings = parse_parameters(image.info["parameters"])
        except ValueError as error:
            raise ValueError(f"--parameters-from {path!r}: {error}") from None
    else:
        raise ValueError(f"--parameters-from {path!r} holds no 'parameters' text chunk; use a PNG hf-scratch wrote.")
    args.prompt, args.prompts_file, args.negative_prompt = settings["prompt"], None, settings["negative_prompt"]
    args.steps, args.scheduler, args.guidance, args.seed = (
        settings[k] for k in ("steps", "sampler", "guidance", "seed")
    )
    args.num_images = settings["batch_size"]
    if args.model is None and settings["model"] != SHIPPED_MODEL_NAME:
        args.model = settings["model"]
    if hasattr(args, "height"):
        args.height, args.width = settings["height"], settings["width"]
    if settings.get("strength") is not None:
        args.strength = settings["strength"]
    guidance = {"guidance_kind": "cfg", **{key: settings[key] for key in GUIDANCE_FIELDS if key in settings}}
    args.guidance_kind = guidance["guidance_kind"]
    args.guidance_rescale = guidance.get("guidance_rescale")
    if "sigma_low" in guidance:
        high = guidance["sigma_high"]
        args.guidance_interval = [guidance["sigma_low"], math.inf if high is None else high]
    args.apg_eta, args.apg_momentum, args.guide = (guidance.get(key) for key in ("eta", "momentum", "guide"))


SHIPPED_MODEL_NAME = "hf-scratch/emoji32"


def cmd_generate(args: argparse.Namespace) -> None:
    """`generate`, `img2img` and `inpaint`: load the pipeline, its adapters and the inputs, then write one image per
    prompt and image with its settings in the PNG's `parameters` text."""
    import importlib

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from PIL import Image, PngImagePlugin

    if args.parameters_from:
        _apply_parameters_from(args)
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {args.scheduler!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    prompts = _read_prompts(args)
    if not 0 <= args.seed <= SEED_MAX - len(prompts):
        raise ValueError(f"--seed {args.seed} is out of range; use 0 to {SEED_MAX - len(prompts)}.")
    if not 1 <= args.upscale <= 64:
        raise ValueError(f"--upscale {args.upscale} is out of range; use a factor from 1 to 64.")
    device, dtype = _device_and_dtype(args)
    model = _resolve_model(args.model)
    # An image's settings are complete: the model's sampling.json does not fill in what they leave at the defaults.
    guidance = _resolve_sampling(args, SAMPLING_DEFAULTS if args.parameters_from else default_sampling(model))
    loras = _scaled_paths(args.lora, "--lora")
    embeddings = _scaled_paths(args.embedding, "--embedding")
    inputs = {}
    if args.command in ("img2img", "inpaint"):
        inputs = {"image": _open_image(args.image, "--image"), "strength": args.strength}
    if args.command == "inpaint":
        inputs["mask_image"] = _open_image(args.mask, "--mask", grey=True)
    output = Path(args.output)
    _check_output(output)
    inputs_read = {"--image": args.image if args.command != "generate" else None, "--mask": getattr(args, "mask", None),
                   "--parameters-from": args.parameters_from, "--prompts-file": args.prompts_file}  # fmt: skip
    for path in _output_paths(output, len(prompts), args.num_images, args.upscale):
        for flag, source in inputs_read.items():
            if source is not None:
                _refuse_overlap(Path(source), path, flag, "--output")

    module, name = TASKS[args.command].split(":")
    pipeline_class = getattr(importlib.import_module(module), name)
    try:
        pipe = pipeline_class.from_pretrained(model, dtype=dtype).to(device)
    except (ImportError, AttributeError, KeyError, IndexError) as error:  # diffusers on a malformed model_index.json
        raise ValueError(f"--model {model!r} could not be loaded ({type(error).__name__}: {error}).") from None
    options = {key: value for key, value in guidance.items() if key not in ("guidance_kind", "guide")}
    guidance_args = guidance_inputs(
        guidance["guidance_kind"], args.guidance, options, guidance.get("guide"), device, dtype
    )
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    for index, (path, scale) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{index}")
    if loras:
        pipe.set_adapters([f"lora{index}" for index in range(len(loras))], [scale for _, scale in loras])
    for path, _ in embeddings:
        pipe.load_textual_inversion(path)
    if args.dtype == "auto" and device.type == "cpu" and not args.winograd:  # Winograd tiles compute in float32
        from .fast import use_fastest_dtypes

        use_fastest_dtypes(pipe)
    if args.winograd:
        from .fast import use_winograd

        use_winograd(pipe)
    elif device.type == "cpu" and not args.eager:
        from .fast import freeze_for_inference

        freeze_for_inference(pipe)
    if args.command != "img2img":
        inputs.update(height=args.height, width=args.width)

    sampler = args.scheduler or scheduler_name(pipe.scheduler) or type(pipe.scheduler).__name__
    model_name = SHIPPED_MODEL_NAME if args.model is None else str(args.model)
    # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU: without cpu=True two CPU processes are both rank 0.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or device.type == "cpu")
    indexed = list(enumerate(prompts))
    many = len(prompts) > 1 or args.num_images > 1
    with state.split_between_processes(indexed) as mine:
        for index, prompt in mine:
            generator = torch.Generator("cpu").manual_seed(args.seed + index)
            images = pipe(prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                          num_images_per_prompt=args.num_images, generator=generator, **guidance_args,
                          **inputs).images  # fmt: skip
            for k, image in enumerate(images):
                path = _output_path(output, index, k, many)
                settings = dict(
                    prompt=prompt, negative_prompt=args.negative_prompt, steps=args.steps, sampler=sampler,
                    guidance=args.guidance, seed=args.seed + index, width=image.width, height=image.height,
                    model=model_name, batch_size=args.num_images, batch_pos=k, strength=inputs.get("strength"),
                    **guidance,
                )  # fmt: skip
                metadata = PngImagePlugin.PngInfo()
                metadata.add_text("parameters", format_parameters(settings))
                metadata.add_text(SETTINGS_CHUNK, json.dumps(settings))
                _save_image(image, path, pnginfo=metadata if path.suffix.lower() == ".png" else None)
                rank = f"[rank {state.process_index}] " if state.num_processes > 1 else ""
                # flush=True: the line leaves in one write, so lines of two ranks sharing a pipe do not interleave.
                print(f"{rank}{prompt!r} -> {path}", flush=True)
                if args.upscale > 1:
                    large = _upscaled_path(path, args.upscale)
                    size = (image.width * args.upscale, image.height * args.upscale)
                    _save_image(image.resize(size, resample=Image.Resampling.NEAREST), large)
                    print(f"{rank}{prompt!r} -> {large} (x{args.upscale}, nearest neighbour)", flush=True)


def _output_path(output: Path, index: int, k: int, many: bool) -> Path:
    """Image k of prompt `index`: `output` itself for a single image, else <stem>-<index>-<k><suffix>."""
    return output.with_name(f"{output.stem}-{index:04d}-{k}{output.suffix}") if many else output


def _upscaled_path(path: Path, factor: int) -> Path:
    return path.with_name(f"{path.stem}-x{factor}{path.suffix}")


def _output_paths(output: Path, num_prompts: int, num_images: int, upscale: int) -> list[Path]:
    """Every file a run writes, to check before generating that none is an input."""
    many = num_prompts > 1 or num_images > 1
    paths = [_output_path(output, i, k, many) for i in range(num_prompts) for k in range(num_images)]
    return paths + [_upscaled_path(path, upscale) for path in paths] if upscale > 1 else paths


def cmd_convert(args: argparse.Namespace) -> None:
    """Single file -> pipeline-component folders, or pipeline folder -> single file. The target is written under a
    temporary name and renamed into place, and a target that is, holds or lies inside the source is refused."""
    from hf_scratch.formats.single_file import _SAVE_SUFFIXES, load_single_file, save_single_file

    source, target = Path(args.source), Path(args.target)
    if not source.exists():
        raise ValueError(f"{str(source)!r} is neither a checkpoint file nor a pipeline folder.")
    _refuse_overlap(source, target, "source", "target")
    if args.config is not None:
        _refuse_overlap(Path(args.config), target, "--config", "target")
    if source.is_file():
        if target.exists() and not target.is_dir():
            raise ValueError(f"target {str(target)!r} is a file; converting a single file writes a folder.")
        components = load_single_file(str(source), config=args.config)
        for name in components:  # the target folder may hold the source, but no folder written may
            _refuse_overlap(source, target / name, "source", "target")
            if args.config is not None:
                _refuse_overlap(Path(args.config), target / name, "--config", "target")
        target.mkdir(parents=True, exist_ok=True)
        partial = _partial_path(target / "components")
        try:
            for name, component in components.items():
                component.save_pretrained(str(partial / name))
            for name in components:
                _replace_folder(partial / name, target / name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        print(f"wrote {', '.join(sorted(components))} under {target}")
    else:
        from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

        if target.suffix not in _SAVE_SUFFIXES:
            raise ValueError(f"target {str(target)!r} must end in one of {_SAVE_SUFFIXES} (an LDM single file).")
        if target.is_dir():
            raise ValueError(f"target {str(target)!r} is a folder; converting a pipeline folder writes one file.")
        _resolve_model(str(source))
        pipe = ScratchStableDiffusionPipeline.from_pretrained(str(source))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial_path(target)
        try:
            save_single_file(str(partial), unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        print(f"wrote the LDM single file {target}")


def _replace_folder(new: Path, destination: Path) -> None:
    """Move the complete folder `new` to `destination`, replacing what is there only once `new` is in place."""
    if not destination.exists():
        os.replace(new, destination)
        return
    old = _partial_path(destination.with_name(destination.name + "-old"))
    os.replace(destination, old)
    os.replace(new, destination)
    shutil.rmtree(old)


def _count_parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += _numel(handle.get_slice(key).get_shape())
    return total if files else None


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def cmd_info(args: argparse.Namespace) -> None:
    folder = Path(_resolve_model(args.model))
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{str(folder)!r} has no model_index.json: it is not a diffusers pipeline folder.")
    index = read_json_object(index_path)
    print(f"pipeline: {index.get('_class_name')}  ({folder})")
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list):
            continue
        if len(spec) != 2:
            raise ValueError(f"{str(index_path)!r}: the entry {name!r} must be [library, class name], got {spec!r}.")
        line = f"  {name:<13} {spec[0]}.{spec[1]}"
        params = _count_parameters(folder / name) if (folder / name).is_dir() else None
        if params is not None:
            line += f"  {params / 1e6:.2f}M parameters"
        print(line)


def cmd_data(args: argparse.Namespace) -> None:
    if args.source == "emoji":
        from hf_scratch.data.emoji import build_emoji_dataset

        counts = build_emoji_dataset(args.out, resolution=args.resolution, limit=args.limit)
    else:
        from hf_scratch.data.fashion_mnist import build_fashion_mnist_dataset

        counts = build_fashion_mnist_dataset(args.out, resolution=args.resolution, split_limit=args.limit)
    print(json.dumps(counts, indent=2))


def build_eval_parser() -> argparse.ArgumentParser:
    import torch

    from hf_scratch.evaluation import DEFAULT_SAMPLERS

    parser = argparse.ArgumentParser(
        prog="hf-scratch eval",
        description="emoji-bench: VAE, CLIP and generation metrics of a pipeline folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="pipeline folder (ScratchStableDiffusionPipeline)")
    parser.add_argument("--clip", required=True, help="judge CLIP folder (train_clip.py's output, with tokenizer/)")
    parser.add_argument("--data", required=True, help="emoji dataset folder (hf-scratch data emoji)")
    parser.add_argument("--out", required=True, help="folder for emoji_bench.json, emoji_bench.md and grid.png")
    parser.add_argument(
        "--num-prompts",
        "--num_prompts",
        dest="num_prompts",
        type=int,
        default=64,
        help="captions sampled from each split",
    )
    parser.add_argument(
        "--num-prompts-samplers",
        "--num_prompts_samplers",
        dest="num_prompts_samplers",
        type=int,
        default=16,
        help="train prompts for the sampler table",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20, help="steps of the pipeline's own scheduler")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--samplers", nargs="*", default=None,
        help="NAME-STEPS, e.g. ddim-50 (default, by the model's scheduler family: "
        + "; ".join(f"{family}: {' '.join(specs)}" for family, specs in DEFAULT_SAMPLERS.items()) + ")",
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16)
    parser.add_argument(
        "--max-vae-images",
        "--max_vae_images",
        dest="max_vae_images",
        type=int,
        default=None,
        help="default: the whole validation split",
    )
    parser.add_argument(
        "--cache-dir", "--cache_dir", dest="cache_dir", default=None, help="datasets' cache folder (default: its own)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`python training/evaluate.py --model DIR --clip DIR --data DIR --out DIR`; prints the Markdown tables."""
    import logging

    from hf_scratch.evaluation import load_dataset_folder, load_judge, load_pipeline, run_emoji_bench, to_markdown

    args = build_eval_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if not Path(args.data).is_dir():
            raise ValueError(f"--data {args.data!r} is not a folder; build one with `hf-scratch data emoji`")
        pipeline = load_pipeline(args.model, name="--model").to(args.device)
        pipeline.set_progress_bar_config(disable=True)
        judge_clip, judge_tokenizer = load_judge(args.clip, name="--clip")
        results = run_emoji_bench(
            pipeline, judge_clip.to(args.device), judge_tokenizer,
            load_dataset_folder(args.data, args.cache_dir),
            num_prompts=args.num_prompts, num_prompts_samplers=args.num_prompts_samplers, seed=args.seed,
            steps=args.steps, guidance=args.guidance, samplers=args.samplers, resolution=args.resolution,
            batch_size=args.batch_size, max_vae_images=args.max_vae_images, model=args.model, judge=args.clip,
            data=args.data, out_dir=args.out,
        )  # fmt: skip
    except (ValueError, TypeError, OSError) as error:  # datasets' "no data files" errors are OSErrors
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"emoji-bench: error: {message}", file=sys.stderr)
        return 2
    print(to_markdown(results))
    return 0


def add_guidance_arguments(parser: argparse.ArgumentParser, shown: bool) -> None:
    """The guidance flags. `img2img` and `inpaint` take only --guidance-rescale; the others are hidden from their help
    and refused by name when given (`_resolve_sampling`)."""
    from_file = f"default: the model folder's {SAMPLING_FILE}"

    def shown_help(text: str) -> str:
        return text if shown else argparse.SUPPRESS

    parser.add_argument(
        "--guidance-kind", choices=("cfg", "interval", "apg", "auto"), default=None,
        help=shown_help(
            "cfg: classifier-free guidance; interval: CFG only for EDM noise levels in --guidance-interval "
            "(Kynkäänniemi et al. 2024); apg: adaptive projected guidance (Sadat et al. 2024); auto: autoguidance by "
            f"the weaker U-Net of --guide (Karras et al. 2024) ({from_file}, else cfg)"
        ),
    )  # fmt: skip
    parser.add_argument(
        "--guidance-rescale", type=float, default=None, metavar="PHI",
        help=f"rescaled CFG φ in [0, 1] (Lin et al. 2024; 0.7 in the paper) for cfg and interval ({from_file}, else 0)",
    )  # fmt: skip
    parser.add_argument(
        "--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
        help=shown_help(f"interval: guide only where LOW < σ <= HIGH, EDM's σ; HIGH may be inf ({from_file}, else "
                        "0.28 5.42)"),
    )  # fmt: skip
    parser.add_argument(
        "--apg-eta", type=float, default=None, metavar="ETA",
        help=shown_help(f"apg: weight η of the update's part parallel to the prediction ({from_file}, else 0)"),
    )  # fmt: skip
    parser.add_argument(
        "--apg-momentum", type=float, default=None, metavar="BETA",
        help=shown_help(f"apg: momentum β of the update, negative in the paper, e.g. -0.5 ({from_file}, else none)"),
    )  # fmt: skip
    parser.add_argument(
        "--guide", default=None, metavar="FOLDER",
        help=shown_help(f"auto: the guide U-Net folder ({from_file}'s 'guide' subfolder)"),
    )  # fmt: skip


def add_generation_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of `generate`, `img2img` and `inpaint`, in one style (hyphens; the underscore spellings of earlier
    versions are kept as aliases)."""
    parser.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    parser.add_argument(
        "--prompts-file",
        "--prompts_file",
        dest="prompts_file",
        default=None,
        help="one prompt per line; split across processes under `accelerate launch`",
    )
    parser.add_argument("--model", default=None, help="pipeline folder (default: the model shipped with hf-scratch)")
    parser.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=None)
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"denoising steps (default: the model folder's {SAMPLING_FILE}, else 20)",
    )  # fmt: skip
    parser.add_argument(
        "--guidance", type=float, default=None,
        help=f"guidance weight w (default: the model folder's {SAMPLING_FILE}, else 5.0)",
    )  # fmt: skip
    add_guidance_arguments(parser, shown=command == "generate")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--scheduler", default=None, help=f"one of: {', '.join(SCHEDULERS)} (default: the model's own)")
    if command in ("img2img", "inpaint"):
        parser.add_argument("--image", required=True, help="the input image file")
        parser.add_argument(
            "--strength",
            type=float,
            default=0.8 if command == "img2img" else 1.0,
            help="how far into the noise schedule to start, in (0, 1]",
        )
    if command == "inpaint":
        parser.add_argument("--mask", required=True, help="mask image file: white where the image is repainted")
    if command != "img2img":
        parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's trained size)")
        parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's trained size)")
    parser.add_argument(
        "--num-images", "--num_images", dest="num_images", type=int, default=1, help="images per prompt"
    )
    parser.add_argument(
        "--output", default=f"outputs/{command}.png", help="image path; several images get -<prompt>-<image> suffixes"
    )
    parser.add_argument(
        "--upscale",
        type=int,
        default=1,
        metavar="FACTOR",
        help="also write a copy enlarged FACTOR times by nearest neighbour, <stem>-xFACTOR<suffix>, "
        "for models whose native images are tiny (1: no copy)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto: cuda when there is one")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: float16 on CUDA; on the CPU a large U-Net in bfloat16 where the "
        "CPU computes it natively (AVX-512 BF16, AMX), all else float32",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA file or folder (diffusers/peft or kohya layout) at SCALE; repeatable",
    )
    parser.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH",
        help="a textual-inversion embedding (diffusers .bin/.safetensors or AUTOMATIC1111); repeatable",
    )
    parser.add_argument(
        "--parameters-from",
        "--parameters_from",
        dest="parameters_from",
        default=None,
        metavar="PNG",
        help="reuse the prompt and settings an earlier run wrote into this PNG",
    )
    parser.add_argument(
        "--winograd",
        action="store_true",
        help="3x3 convolutions through Winograd tiles (hf_scratch.fast.use_winograd): faster on CPUs "
        "for large models, within 1e-5 of the default; builds a C++ kernel on first use",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="run the U-Net eagerly on CPU; by default it runs as frozen TorchScript graphs "
        "(hf_scratch.fast.freeze_for_inference), with the same output and less per-op cost",
    )
    parser.set_defaults(func=cmd_generate)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of a flag, unless it is None: those flags' help says where their default comes from."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-scratch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tasks = {
        "generate": "text-to-image with the shipped model or a pipeline folder",
        "img2img": "image-to-image (SDEdit): repaint a whole image guided by text",
        "inpaint": "repaint the white part of a mask in an image, guided by text",
    }
    for command, description in tasks.items():
        add_generation_arguments(
            sub.add_parser(
                command,
                help=description,
                description=description,
                formatter_class=_DefaultsHelpFormatter,
            ),
            command,
        )

    defaults = argparse.ArgumentDefaultsHelpFormatter
    conv = sub.add_parser("convert", help="LDM single file <-> diffusers folder", formatter_class=defaults)
    conv.add_argument("source", help="a .safetensors/.ckpt single file, or a pipeline folder")
    conv.add_argument("target", help="a folder (from a single file) or a .safetensors/.ckpt path (from a folder)")
    conv.add_argument("--config", default=None, help="diffusers folder whose component configs describe the file")
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="what a pipeline folder holds", formatter_class=defaults)
    info.add_argument("model", nargs="?", default=None, help="pipeline folder (default: the shipped model)")
    info.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="build an offline captioned image dataset", formatter_class=defaults)
    data.add_argument("source", choices=["emoji", "fashion-mnist"])
    data.add_argument("--out", required=True)
    data.add_argument("--resolution", type=int, default=64)
    data.add_argument("--limit", type=int, default=None, help="cap the number of items (for smoke tests)")
    data.set_defaults(func=cmd_data)

    # `eval` hands all its arguments to `eval_main` (see `main` below); listed here for --help.
    sub.add_parser("eval", help="emoji-bench: VAE, CLIP and generation metrics (hf-scratch eval --help)")
    sub.add_parser("train", help="train a text-to-image model from captioned images (hf-scratch train --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["train"]:
        from hf_scratch.training.recipe import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        with _interruptible():
            func(args)
    except Interrupted as interrupt:  # the files written so far are complete (written and renamed)
        print(
            f"hf-scratch {args.command}: interrupted by {interrupt}; every file written is complete.", file=sys.stderr
        )
        return 128 + interrupt.signal_number
    except (ValueError, TypeError, OSError) as error:  # user errors: one line, exit status 2, no traceback
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"hf-scratch {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
