"""`hf-scratch`: generate images, convert checkpoints, inspect model folders, build the offline datasets, evaluate.

Heavy imports (torch, diffusers) happen inside the sub-commands, so `hf-scratch --help` answers at once.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from hf_scratch.schedulers import SCHEDULERS, make_scheduler

SEED_MAX = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes

def _resolve_model(model: Optional[str]) -> str:
    if model is None:
        from hf_scratch.pretrained import default_model_path

        return default_model_path()
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"--model {model!r} is not a folder. Pass a diffusers-layout pipeline folder.")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--model {model!r} holds no model_index.json. Pass a diffusers-layout pipeline folder.")
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


def _check_output(path: Path) -> None:
    """Before any model runs: an image extension PIL can write, and a folder that exists (or can be made) and is
    writable."""
    import PIL.Image

    if path.suffix.lower() not in PIL.Image.registered_extensions():
        raise ValueError(f"--output {str(path)!r} has no image extension; end it with .png, .jpg or .webp.")
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--output {str(path)!r} lies under {str(parent)!r}, which is a file, not a folder.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output {str(path)!r}: cannot create its folder ({error.strerror}).") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"--output {str(path)!r}: the folder {str(path.parent)!r} is not writable.")


def _read_prompts(args: argparse.Namespace) -> List[str]:
    if args.prompts_file is None:
        if not args.prompt:
            raise ValueError("Give a prompt, or --prompts-file with one prompt per line.")
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts-file {str(path)!r} does not exist.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r} holds no prompts.")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from PIL import Image

    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {args.scheduler!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    prompts = _read_prompts(args)
    if not 0 <= args.seed <= SEED_MAX - len(prompts):
        raise ValueError(f"--seed {args.seed} is out of range; use 0 to {SEED_MAX - len(prompts)}.")
    if not 1 <= args.upscale <= 64:
        raise ValueError(f"--upscale {args.upscale} is out of range; use a factor from 1 to 64.")
    output = Path(args.output)
    _check_output(output)
    pipe = ScratchStableDiffusionPipeline.from_pretrained(_resolve_model(args.model))
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    if args.winograd:
        from .fast import use_winograd

        use_winograd(pipe)

    # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU: without cpu=True two CPU processes both act as rank 0.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    indexed = list(enumerate(prompts))
    many = len(prompts) > 1 or args.num_images > 1
    with state.split_between_processes(indexed) as mine:
        for index, prompt in mine:
            generator = torch.Generator("cpu").manual_seed(args.seed + index)
            images = pipe(
                prompt,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.height,
                width=args.width,
                num_images_per_prompt=args.num_images,
                generator=generator,
            ).images
            for k, image in enumerate(images):
                path = output.with_name(f"{output.stem}-{index:04d}-{k}{output.suffix}") if many else output
                image.save(path)
                rank = f"[rank {state.process_index}] " if state.num_processes > 1 else ""
                print(f"{rank}{prompt!r} -> {path}")
                if args.upscale > 1:
                    large = path.with_name(f"{path.stem}-x{args.upscale}{path.suffix}")
                    size = (image.width * args.upscale, image.height * args.upscale)
                    image.resize(size, resample=Image.Resampling.NEAREST).save(large)
                    print(f"{rank}{prompt!r} -> {large} (x{args.upscale}, nearest neighbour)")


def cmd_convert(args: argparse.Namespace) -> None:
    from hf_scratch.formats.single_file import load_single_file, save_single_file

    source, target = Path(args.source), Path(args.target)
    if source.is_file():
        components = load_single_file(str(source), config=args.config)
        target.mkdir(parents=True, exist_ok=True)
        for name, component in components.items():
            component.save_pretrained(str(target / name))
        print(f"wrote {', '.join(sorted(components))} under {target}")
    elif source.is_dir():
        from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

        pipe = ScratchStableDiffusionPipeline.from_pretrained(str(source))
        save_single_file(str(target), unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder)
        print(f"wrote the LDM single file {target}")
    else:
        raise ValueError(f"{str(source)!r} is neither a checkpoint file nor a pipeline folder.")


def _count_parameters(folder: Path) -> Optional[int]:
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
    index = json.loads(index_path.read_text())
    print(f"pipeline: {index.get('_class_name')}  ({folder})")
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list):
            continue
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

    parser = argparse.ArgumentParser(prog="hf-scratch eval", description="emoji-bench: VAE, CLIP and generation metrics of a pipeline folder.")
    parser.add_argument("--model", required=True, help="pipeline folder (ScratchStableDiffusionPipeline)")
    parser.add_argument("--clip", required=True, help="judge CLIP folder (train_clip.py's output, with tokenizer/)")
    parser.add_argument("--data", required=True, help="emoji dataset folder (hf-scratch data emoji)")
    parser.add_argument("--out", required=True, help="folder for emoji_bench.json, emoji_bench.md and grid.png")
    parser.add_argument("--num_prompts", type=int, default=64, help="captions sampled from each split")
    parser.add_argument("--num_prompts_samplers", type=int, default=16, help="train prompts for the sampler table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20, help="steps of the pipeline's own scheduler")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--samplers", nargs="*", default=None,
        help="NAME-STEPS, e.g. ddim-50 (default, by the model's scheduler family: "
        + "; ".join(f"{family}: {' '.join(specs)}" for family, specs in DEFAULT_SAMPLERS.items()) + ")",
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_vae_images", type=int, default=None, help="default: the whole validation split")
    parser.add_argument("--cache_dir", default=None, help="datasets' cache folder (default: its own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python training/evaluate.py --model DIR --clip DIR --data DIR --out DIR`; prints the Markdown tables."""
    import logging

    import datasets

    from hf_scratch.evaluation import load_judge, load_pipeline, run_emoji_bench, to_markdown

    args = build_eval_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if not Path(args.data).is_dir():
            raise ValueError(f"--data {args.data!r} is not a folder; build one with `hf-scratch data emoji`")
        pipeline = load_pipeline(args.model).to(args.device)
        pipeline.set_progress_bar_config(disable=True)
        judge_clip, judge_tokenizer = load_judge(args.clip)
        results = run_emoji_bench(
            pipeline, judge_clip.to(args.device), judge_tokenizer,
            datasets.load_dataset(args.data, cache_dir=args.cache_dir),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-scratch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text-to-image with the shipped model or a pipeline folder")
    gen.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    gen.add_argument("--prompts-file", help="one prompt per line; split across processes under `accelerate launch`")
    gen.add_argument("--model", help="pipeline folder (default: the model shipped with hf-scratch)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=5.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--scheduler", default=None, help=f"one of: {', '.join(SCHEDULERS)} (default: the model's own)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--output", default="outputs/image.png")
    gen.add_argument("--upscale", type=int, default=1, metavar="FACTOR",
                     help="also write a copy enlarged FACTOR times by nearest neighbour, <stem>-xFACTOR<suffix>, for "
                     "models whose native images are tiny (default 1: no copy)")  # fmt: skip
    gen.add_argument("--winograd", action="store_true",
                     help="3x3 convolutions through Winograd tiles (hf_scratch.fast.use_winograd): faster on CPUs for "
                          "large models, within 1e-5 of the default; builds a C++ kernel on first use")  # fmt: skip
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="LDM single file <-> diffusers folder")
    conv.add_argument("source", help="a .safetensors/.ckpt single file, or a pipeline folder")
    conv.add_argument("target", help="a folder (from a single file) or a .safetensors/.ckpt path (from a folder)")
    conv.add_argument("--config", default=None, help="diffusers folder whose component configs describe the file")
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="what a pipeline folder holds")
    info.add_argument("model", nargs="?", default=None, help="pipeline folder (default: the shipped model)")
    info.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="build an offline captioned image dataset")
    data.add_argument("source", choices=["emoji", "fashion-mnist"])
    data.add_argument("--out", required=True)
    data.add_argument("--resolution", type=int, default=64)
    data.add_argument("--limit", type=int, default=None, help="cap the number of items (for smoke tests)")
    data.set_defaults(func=cmd_data)

    # `eval` hands all its arguments to `eval_main` (see `main` below); listed here for --help.
    sub.add_parser("eval", help="emoji-bench: VAE, CLIP and generation metrics (hf-scratch eval --help)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (ValueError, TypeError, OSError) as error:  # user errors: one line, exit status 2, no traceback
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"hf-scratch {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
