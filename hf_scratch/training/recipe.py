"""`hf-scratch train`: a text-to-image model from captioned images in one command.

The stages, in order, each a run of one of the package's trainers in its own folder of --output-dir:

| stage | trainer | folder | what it learns |
|---|---|---|---|
| vae | `train_vae` | `vae/` | the KL autoencoder: L1 + a small KL (Rombach et al. 2022, arXiv:2112.10752) |
| decoder | `train_vae --train_decoder_only` | `vae-decoder/` | the decoder alone, on the L2 that PSNR measures |
| text | `train_clip` | `text/` | CLIP and its BPE tokenizer; the text tower conditions the U-Net |
| unet | `train_unet` | `model/` | the objectives study's winner: flow matching, logit-normal t, immiscible noise |
| eval | `evaluate_model` | `eval/` | validation captions' images against the true ones, on an independent judge |

`plan` sizes the models from the resolution and the step counts from `--budget`: the wall time is split between the
stages (`BUDGET_SHARES`), and each stage's share becomes steps at the rate measured on a few steps of its model
(`measure_seconds_per_step`). `--steps stage=N` fixes a stage's steps instead. The plan is written to `plan.json` on
the first run and reused on every re-run, so a re-run resumes each stage (a finished stage is skipped) rather than
starting another run. The data is read once into `prepared-data/` (a `save_to_disk` folder of images and captions)
with a validation split made from the training images when the source has none.
"""

import argparse
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hf_scratch

logger = logging.getLogger(__name__)

STAGES = ("vae", "decoder", "text", "unet", "eval")
STAGE_FOLDERS = {"vae": "vae", "decoder": "vae-decoder", "text": "text", "unet": "model", "eval": "eval"}
# How a wall-time budget is split; a stage that does not run gives its share to the U-Net.
BUDGET_SHARES = {"vae": 0.22, "decoder": 0.10, "text": 0.08, "unet": 0.55, "eval": 0.05}
# A margin for what the timed model step leaves out (the data path, logging, the EMA), and each stage's start-up
# (imports, data, the latent cache: 10-15 s for small data here). A guess with room: the 30-minute Fashion-MNIST run's
# U-Net stage took 0.94 s a step in all, against 1.18 s measured for its model step alone on a busier machine.
STEP_OVERHEAD = 1.25
STAGE_STARTUP_SECONDS = 15.0
MIN_STEPS = 10
# Per stage: learning rate, warm-up as a share of the steps, checkpoints and validations per run. At the emoji32
# recipe's steps (2400, 4000, 300, 7200) these give its warm-ups (100, 100, 50, 200) and intervals.
SCHEDULES = {
    "vae": ("2e-3", 1 / 24, 8, 4),
    "decoder": ("5e-4", 1 / 40, 8, 4),
    "text": ("1e-3", 1 / 6, 3, 6 / 5),
    "unet": ("5e-4", 1 / 36, 24, 1),
}
VALIDATION_FRACTION, MIN_VALIDATION, MAX_VALIDATION = 0.1, 8, 256


def parse_budget(text: str) -> float:
    """Seconds in a wall time like "90s", "30m", "2h" or "1h30m"."""
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if not text.strip() or parts is None or not any(parts.groups()):
        raise ValueError(f"--budget={text!r} is not a wall time; write it like 90s, 30m, 2h or 1h30m")
    hours, minutes, seconds = (float(value or 0) for value in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_steps(items: list[str]) -> dict[str, int]:
    """{"unet": 7200, ...} from ["unet=7200", ...]."""
    steps = {}
    for item in items:
        stage, _, count = item.partition("=")
        if stage not in STAGES[:-1] or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"--steps {item!r} must read STAGE=N with STAGE one of {', '.join(STAGES[:-1])} and N >= 1"
            )
        steps[stage] = int(count)
    return steps


# ------------------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Everything that fixes the run: the sizes, the step counts and the flags of each stage."""

    resolution: int
    num_train: int
    num_validation: int
    stages: list[str]
    steps: dict[str, int]
    batch: dict[str, int]
    seed: int
    text_encoder: str | None
    flags: dict[str, list[str]] = field(default_factory=dict)
    seconds_per_step: dict[str, float] = field(default_factory=dict)


def vae_levels(resolution: int) -> list[int]:
    """The VAE's channels per level: f = 4 (three levels) up to 64 px, where the U-Net then sees 8x8 to 16x16 latents;
    f = 8 (four levels) above, as in Stable Diffusion."""
    return [32, 64, 64] if resolution <= 64 else [32, 64, 128, 128]


def stage_flags(plan: Plan, output_dir: Path, data_dir: Path) -> dict[str, list[str]]:
    """The trainer flags of every stage: the emoji32 recipe's settings (training/recipes/emoji32.sh), with the step
    counts, warm-ups (a fixed share of the steps), checkpoint intervals and batches of this plan."""

    def schedule(stage: str) -> list[str]:
        steps, (learning_rate, warmup, checkpoints, validations) = plan.steps[stage], SCHEDULES[stage]
        return [
            "--max_train_steps", str(steps), "--train_batch_size", str(plan.batch[stage]),
            "--learning_rate", learning_rate, "--lr_scheduler", "cosine",
            "--lr_warmup_steps", str(max(1, round(warmup * steps))),
            "--checkpointing_steps", str(max(1, steps // checkpoints)),
            "--validation_steps", str(max(1, int(steps // validations))),
        ]  # fmt: skip

    common = [
        "--dataset_name", str(data_dir), "--resolution", str(plan.resolution), "--report_to", "none",
        "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "2", "--seed", str(plan.seed),
    ]  # fmt: skip
    folder = {stage: str(output_dir / name) for stage, name in STAGE_FOLDERS.items()}
    vae = folder["decoder"] if "decoder" in plan.stages else folder["vae"]
    text = plan.text_encoder or folder["text"]
    builders = {  # each built only for a stage of the plan
        "vae": lambda: [
            *common, "--output_dir", folder["vae"], "--block_out_channels", *map(str, vae_levels(plan.resolution)),
            "--layers_per_block", "1", "--latent_channels", "8", "--kl_weight", "1e-6",
            *schedule("vae"),
        ],
        "decoder": lambda: [
            *common, "--output_dir", folder["decoder"], "--pretrained_vae", folder["vae"], "--train_decoder_only",
            "--reconstruction_loss", "l2", *schedule("decoder"),
        ],
        "text": lambda: [
            *common, "--output_dir", folder["text"], "--vocab_size", "4096", "--max_length", "32",
            "--text_hidden_size", "192", "--text_layers", "4", "--text_heads", "4", "--vision_hidden_size", "192",
            "--vision_layers", "4", "--vision_heads", "4", "--patch_size", str(max(1, plan.resolution // 8)),
            "--projection_dim", "192", *schedule("text"),
        ],
        "unet": lambda: [
            *common, "--output_dir", folder["unet"], "--vae_path", vae,
            "--text_encoder_path", str(Path(text, "text_encoder")), "--tokenizer_path", str(Path(text, "tokenizer")),
            "--cache_latents", "--latent_cache_dir", str(output_dir / "latent-cache"), "--cache_text_embeddings",
            "--block_out_channels", "64", "128", "128", "--layers_per_block", "1",
            "--cross_attention_levels", "0", "1", "2", "--objective", "flow_matching",
            "--weighting_scheme", "logit_normal", "--logit_mean", "0", "--logit_std", "1", "--immiscible_noise",
            "--caption_dropout_prob", "0.1", "--use_ema", "--ema_decay", "0.999",
            *schedule("unet"),
        ],
    }  # fmt: skip
    flags = {stage: builders[stage]() for stage in plan.stages if stage in builders}
    if plan.steps.get("unet", 0) >= 3 and "unet" in flags:
        flags["unet"] += ["--snapshot_steps", str(plan.steps["unet"] // 3), str(2 * plan.steps["unet"] // 3)]
    return flags


def _probe_model(stage: str, plan: Plan, flags: list[str]) -> tuple[Any, Any]:
    """(model, loss) of `stage` as its trainer builds the model, with a loss of the same cost on random inputs."""
    from types import SimpleNamespace

    import torch

    from hf_scratch.models.clip import ScratchCLIPTextConfig, ScratchCLIPTextModel
    from hf_scratch.training import train_clip, train_unet, train_vae

    generator = torch.Generator().manual_seed(0)
    batch, resolution = plan.batch[stage], plan.resolution
    pixels = torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1
    if stage in ("vae", "decoder"):  # the decoder's VAE does not exist yet: time the whole autoencoder
        model = train_vae.AutoencoderForTraining(train_vae.build_vae(train_vae.parse_args(plan.flags["vae"])))

        def loss() -> torch.Tensor:
            reconstruction, kl = model(pixels)
            return (reconstruction - pixels).abs().mean() + 1e-6 * kl.mean()

        return model, loss
    if stage == "text":
        args = train_clip.parse_args(flags)
        model = train_clip.build_clip(args, _Vocabulary(args.vocab_size))
        tokens = torch.randint(0, args.vocab_size, (batch, args.max_length), generator=generator)
        return model, lambda: model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
    args = train_unet.parse_args(flags)
    if plan.text_encoder:
        text_encoder = ScratchCLIPTextModel.from_pretrained(args.text_encoder_path)
    else:  # the text stage's tower
        text_config = ScratchCLIPTextConfig(
            vocab_size=4096, hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=32,
        )  # fmt: skip
        text_encoder = ScratchCLIPTextModel(text_config)
    vae = SimpleNamespace(config=SimpleNamespace(latent_channels=8, block_out_channels=vae_levels(resolution)))
    model = train_unet.build_unet(args, vae, text_encoder)
    size = resolution // 2 ** (len(vae_levels(resolution)) - 1)
    latents = torch.randn(batch, 8, size, size, generator=generator)
    tokens = torch.randint(0, text_encoder.config.vocab_size, (batch, 32), generator=generator)

    def loss() -> torch.Tensor:
        with torch.no_grad():
            context = text_encoder(tokens[:, : text_encoder.config.max_position_embeddings])[0]
        timesteps = torch.rand(batch, generator=generator) * 1000
        return (model(latents, timesteps, context).sample - latents).pow(2).mean()

    return model, loss


class _Vocabulary:
    """A stand-in tokenizer for timing: what `build_clip` reads of one."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def measure_seconds_per_step(stage: str, plan: Plan, threads: int, warmup: int = 2, repeats: int = 5) -> float:
    """Seconds per optimizer step of `stage`'s model at its batch and resolution: forward, backward and AdamW on
    random inputs, the median of `repeats` timed steps after `warmup` untimed ones (the first steps pay for memory
    and kernel set-up, and a busy machine makes single steps slow); the data path is left to STEP_OVERHEAD."""
    import torch

    torch.set_num_threads(threads)
    model, loss = _probe_model(stage, plan, plan.flags[stage])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for step in range(warmup + repeats):
        start = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# ------------------------------------------------------------------------------------------------------------ the data
def prepare_data(args: argparse.Namespace, output_dir: Path) -> tuple[Path, int, int, str]:
    """`output_dir/prepared-data`: the source's training split and its validation split (held out of the training
    images, seeded, when the source has none), as a `save_to_disk` folder with columns "image" and "text" that every
    stage reads. Returns (folder, training images, validation images, where the validation images came from)."""
    import datasets

    from hf_scratch.training.sources import load_splits

    folder, record = output_dir / "prepared-data", output_dir / "prepared-data.json"
    if record.is_file() and folder.is_dir():
        source = json.loads(record.read_text())["source"]
        if os.path.abspath(source) != os.path.abspath(args.data):
            raise ValueError(
                f"--output-dir={str(output_dir)!r} holds a run on --data={source!r}, not {args.data!r}; re-run it "
                "with its own data, or give this data another --output-dir"
            )
    else:
        splits = load_splits(args.data, args.image_column, args.caption_column, flag="--data")
        if "train" not in splits:
            raise ValueError(f"--data={args.data!r} has no 'train' split; its splits: {', '.join(splits)}")
        train = splits["train"]
        if args.validation_split in splits:
            validation = splits[args.validation_split]
        else:
            held_out = min(MAX_VALIDATION, max(MIN_VALIDATION, round(VALIDATION_FRACTION * len(train))))
            if len(train) < 2 * held_out:
                raise ValueError(
                    f"--data={args.data!r} holds {len(train)} training images and no {args.validation_split!r} split; "
                    f"at least {2 * MIN_VALIDATION} are needed to hold {MIN_VALIDATION} out for validation (or add "
                    "a validation split and name it with --validation-split)"
                )
            parts = train.train_test_split(test_size=held_out, seed=args.seed)
            train, validation = parts["train"], parts["test"]
        result = datasets.DatasetDict({"train": train, "validation": validation})
        for name, split in result.items():
            split = split.select_columns([args.image_column, args.caption_column])
            if args.image_column != "image":
                split = split.rename_column(args.image_column, "image")
            if args.caption_column != "text":
                split = split.rename_column(args.caption_column, "text")
            result[name] = split
        staging = output_dir / ".prepared-data.partial"
        shutil.rmtree(staging, ignore_errors=True)  # what an interrupted first run left
        result.save_to_disk(str(staging))
        note = (
            f"the data's own {args.validation_split!r} split"
            if args.validation_split in splits
            else f"held out of the training images (seeded): the data has no {args.validation_split!r} split"
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        record.write_text(json.dumps({"source": os.path.abspath(args.data), "validation": note}))
    saved = datasets.load_from_disk(str(folder))
    note = json.loads(record.read_text())["validation"]
    return folder, len(saved["train"]), len(saved["validation"]), note


# ---------------------------------------------------------------------------------------------------------- planning
def make_plan(args: argparse.Namespace, output_dir: Path, data_dir: Path, num_train: int, num_validation: int) -> Plan:
    """Sizes, batches and step counts: --steps where given, else each stage's share of --budget at its measured
    rate."""
    stages = [stage for stage in STAGES if not (stage == "text" and args.text_encoder)]
    # The recipe's global batches, capped by the data and shared between the processes (--train_batch_size is per
    # process), so the run trains the same model on one process or several.
    recipe_batch = {"vae": 32, "decoder": 32, "text": 128, "unet": 64}
    processes = getattr(args, "num_processes", 1)
    batch = {stage: max(1, min(size, num_train) // processes) for stage, size in recipe_batch.items()}
    explicit = parse_steps(args.steps)
    plan = Plan(
        resolution=args.resolution, num_train=num_train, num_validation=num_validation, stages=stages,
        steps={stage: explicit.get(stage, MIN_STEPS) for stage in stages if stage != "eval"}, batch=batch,
        seed=args.seed, text_encoder=args.text_encoder,
    )  # fmt: skip
    plan.flags = stage_flags(plan, output_dir, data_dir)
    budget = parse_budget(args.budget)
    shares = {stage: BUDGET_SHARES[stage] for stage in stages}
    shares["unet"] += sum(share for stage, share in BUDGET_SHARES.items() if stage not in stages)
    for stage in plan.steps:
        if stage in explicit:
            continue
        seconds = measure_seconds_per_step(stage, plan, args.threads) * STEP_OVERHEAD
        plan.seconds_per_step[stage] = round(seconds, 4)
        plan.steps[stage] = max(MIN_STEPS, int((budget * shares[stage] - STAGE_STARTUP_SECONDS) / seconds))
        logger.info(
            f"  {stage}: {seconds:.3f} s per step of {batch[stage]} measured, so {plan.steps[stage]} steps fit its "
            f"{budget * shares[stage] / 60:.1f} min"
        )
    plan.flags = stage_flags(plan, output_dir, data_dir)
    return plan


def load_or_make_plan(args: argparse.Namespace, output_dir: Path, data_dir: Path, sizes: tuple[int, int]) -> Plan:
    """The plan of `output_dir/plan.json` (a re-run keeps it, so every stage resumes), else a new one, saved."""
    path = output_dir / "plan.json"
    if path.is_file():
        plan = Plan(**json.loads(path.read_text()))
        logger.info(f"keeping the plan of the first run ({path}): the stages resume where they stopped")
        return plan
    logger.info(f"planning the stages for a budget of {args.budget}:")
    plan = make_plan(args, output_dir, data_dir, *sizes)
    staging = path.with_suffix(".partial")
    staging.write_text(json.dumps(asdict(plan), indent=2))
    os.replace(staging, path)
    return plan


# -------------------------------------------------------------------------------------------------------------- running
TRAINERS = {"vae": "train_vae", "decoder": "train_vae", "text": "train_clip", "unet": "train_unet"}


def stage_command(stage: str, plan: Plan, args: argparse.Namespace) -> list[str]:
    """The trainer's command: `python -m hf_scratch.training.<trainer>` in one process, `accelerate launch` in more."""
    module = ["-m", f"hf_scratch.training.{TRAINERS[stage]}"]
    precision = ["--mixed_precision", args.mixed_precision]
    if args.num_processes == 1:
        return [sys.executable, *module, *plan.flags[stage], *precision]
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.num_processes),
        "--num_machines", "1", "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", str(args.threads),
    ]  # fmt: skip
    return [*launcher, *module, *plan.flags[stage]]


def run_stage(stage: str, plan: Plan, args: argparse.Namespace, output_dir: Path) -> float:
    """Run (or resume) one training stage; its wall seconds. A stage that finished earlier is not run again."""
    from hf_scratch.training.checkpoints import finished_step

    folder = output_dir / STAGE_FOLDERS[stage]
    if finished_step(folder) == plan.steps[stage]:
        logger.info(f"{stage}: finished earlier ({plan.steps[stage]} steps in {folder}), kept")
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if args.num_processes > 1 and args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    process = subprocess.Popen(stage_command(stage, plan, args), env=env)
    try:
        returncode = process.wait()
    except BaseException:  # Ctrl-C, or SIGTERM (see `main`): the stage stops too, its checkpoints are whole
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    if returncode != 0:
        raise RuntimeError(
            f"stage {stage} failed (exit status {returncode}; its output is above). Re-run the same command "
            f"to resume it from its last checkpoint in {folder}"
        )
    return time.perf_counter() - start


def check_output_dir(output_dir: Path) -> None:
    package = Path(hf_scratch.__file__).resolve().parent
    resolved = output_dir.resolve()
    if resolved == package or package in resolved.parents:
        raise ValueError(
            f"--output-dir={str(output_dir)!r} lies inside the installed hf_scratch package ({package}); "
            "pick a folder of your own, e.g. runs/mine"
        )


# ----------------------------------------------------------------------------------------------------------- judging
def evaluate_model(
    model_dir: Path, data_dir: Path, out_dir: Path, resolution: int, seed: int, max_images: int, device: str
) -> dict[str, Any]:
    """Images of the validation captions (seed + i for caption i, the model's own scheduler, 20 steps, guidance 4)
    against the true validation images on EfficientNet-lite0 features (`hf_scratch.metrics.image_quality`), beside
    the floor: two disjoint halves of the true images, and the generated images at that size. Writes `report.json`,
    `report.md` and `grid.png` (generated above true) to `out_dir`."""
    import datasets
    import torch

    from hf_scratch.metrics import (
        MIN_QUALITY_IMAGES,
        caption_agreement,
        floor_halves,
        image_quality,
        image_quality_floor,
        tensor_to_image,
    )
    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
    from hf_scratch.training.data import image_grid, image_text_dataset

    split = datasets.load_from_disk(str(data_dir))["validation"]
    true = image_text_dataset(split.select(range(min(max_images, len(split)))), "image", "text", resolution)
    captions = true.captions
    true_images = [tensor_to_image((true[i]["pixel_values"] + 1) / 2) for i in range(len(true))]
    pipe = ScratchStableDiffusionPipeline.from_pretrained(str(model_dir)).to(device)
    pipe.set_progress_bar_config(disable=True)
    generated = []
    for start in range(0, len(captions), 16):
        prompts = captions[start : start + 16]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(prompts))]
        generated += pipe(
            prompts, height=resolution, width=resolution, num_inference_steps=20, guidance_scale=4.0,
            generator=generators,
        ).images  # fmt: skip
    report: dict[str, Any] = {"images": len(captions), "captions_from": "the validation split"}
    if len(captions) >= 2 * MIN_QUALITY_IMAGES:
        report["generated_vs_true"] = image_quality(generated, true_images, seed).to_dict()
        half_a, half_b = floor_halves(len(true_images), seed)
        report["generated_vs_true_at_floor_size"] = image_quality(
            [generated[i] for i in half_a], [true_images[i] for i in half_b], seed
        ).to_dict()
        report["floor_true_vs_true"] = image_quality_floor(true_images, seed).to_dict()
        report["caption_agreement"] = caption_agreement(generated, true_images, captions, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = min(8, len(captions))
    image_grid(generated[:columns] + true_images[:columns], columns).save(out_dir / "grid.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(report_markdown(report, captions[:columns]))
    return report


def report_markdown(report: dict[str, Any], grid_captions: list[str]) -> str:
    lines = [
        "# Quality on held-out captions",
        "",
        f"{report['images']} captions of {report['captions_from']}, one image each, judged on ImageNet EfficientNet-"
        "lite0 features (an independent judge, trained on none of this data). Lower Fréchet distance and KID, higher "
        "precision and recall are better; the floor is what two halves of the true images score against each other.",
        "",
    ]
    if "generated_vs_true" not in report:
        return "\n".join([*lines, "Too few validation images for the figures.", ""])
    rows = (
        ("Fréchet distance", "frechet_distance", "{:.2f}"), ("KID", "kid", "{:.4f}"),
        ("KID standard error", "kid_standard_error", "{:.4f}"), ("precision", "precision", "{:.3f}"),
        ("recall", "recall", "{:.3f}"),
    )  # fmt: skip
    full, half, floor = (report[key] for key in ("generated_vs_true", "generated_vs_true_at_floor_size",
                                                 "floor_true_vs_true"))  # fmt: skip
    agreement = report["caption_agreement"]
    lines += [
        f"| figure | generated vs true ({full['num_generated']} vs {full['num_true']}) | generated vs true "
        f"({half['num_generated']} vs {half['num_true']}) | floor: true vs true ({floor['num_generated']} vs "
        f"{floor['num_true']}) |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {fmt.format(full[key])} | {fmt.format(half[key])} | {fmt.format(floor[key])} |"
          for name, key, fmt in rows),
        "",
        "**Does an image show its caption?** For the generated images of half the captions, the share whose nearest "
        "true image of the other half (on the same features) carries the same caption: "
        f"{agreement['generated']:.3f}, against {agreement['true']:.3f} for the true images of those captions and "
        f"{agreement['chance']:.3f} by chance. It means something where captions repeat (classes, say).",
        "",
        "`grid.png`: generated (top row) and true (bottom row) for the captions " + "; ".join(
            f"“{caption}”" for caption in grid_captions) + ".",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-scratch train",
        description="Train a text-to-image latent diffusion model from scratch on captioned images: VAE, decoder, "
        "text encoder and tokenizer, U-Net, then an independent quality figure and a pipeline folder. Re-running the "
        "same command resumes every stage.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        required=True,
        help="captioned images: an image folder (metadata.jsonl, or a .txt "
        "caption beside each image), CSV / JSON lines / parquet tables, a save_to_disk folder, or "
        "webdataset .tar shards",
    )
    parser.add_argument("--output-dir", required=True, help="the run's folder; the pipeline lands in OUTPUT_DIR/model")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (a multiple of 8)")
    parser.add_argument(
        "--budget",
        default="30m",
        help="wall time for the whole run, like 10m, 2h or 1h30m; each "
        "stage's steps come from its share and the rate measured on its first steps",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        default=[],
        metavar="STAGE=N",
        help="fixed optimizer steps for stages (vae, decoder, text, unet) instead of the budget's",
    )
    parser.add_argument(
        "--text-encoder",
        help="reuse a trained text encoder: a folder holding text_encoder/ and "
        "tokenizer/ (e.g. a pipeline folder); skips the text stage",
    )
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=None, help="run only these stages (default: all)"
    )
    parser.add_argument("--image-column", default="image", help="the column holding the images")
    parser.add_argument("--caption-column", default="text", help="the column holding the captions")
    parser.add_argument(
        "--validation-split",
        default="validation",
        help="the split judged at the end; held out of the training images when the data lacks it",
    )
    parser.add_argument("--eval-images", type=int, default=256, help="validation captions generated and judged")
    parser.add_argument("--seed", type=int, default=0, help="seeds the held-out split, every stage and the judging")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 on CUDA, none on CPU",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="data-parallel processes (accelerate launch); they share the recipe's batches",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per process")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(f"--resolution={args.resolution} must be a positive multiple of 8, e.g. 32 or 64")
    for flag in ("eval_images", "num_processes", "threads"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    parse_budget(args.budget)
    parse_steps(args.steps)
    if args.text_encoder:
        for part in ("text_encoder", "tokenizer"):
            if not Path(args.text_encoder, part).is_dir():
                raise ValueError(
                    f"--text-encoder={args.text_encoder!r} holds no {part}/ folder; pass a pipeline folder"
                )
    check_output_dir(Path(args.output_dir))


def _stop(number: int, frame: Any) -> None:
    """SIGTERM: one line, then unwind through `run_stage`, which stops the running stage."""
    os.write(2, b"hf-scratch train: stopped; re-run the same command to resume\n")  # signal-safe, unlike logging
    sys.exit(128 + number)


def show_progress() -> None:
    """The command's own lines, bare: progress on stdout, errors on stderr (the stages' tqdm bars go to stderr)."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()
    progress, errors = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    errors.setLevel(logging.WARNING)
    for handler in (progress, errors):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_progress()
    signal.signal(signal.SIGTERM, _stop)
    try:
        check_args(args)
        import torch

        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.mixed_precision == "auto":
            args.mixed_precision = "bf16" if args.device == "cuda" else "no"
        return train(args)
    except (ValueError, RuntimeError) as error:
        logger.error(f"hf-scratch train: error: {error}")
        return 2
    except KeyboardInterrupt:
        logger.error("hf-scratch train: interrupted; re-run the same command to resume")
        return 130


def train(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir, num_train, num_validation, where = prepare_data(args, output_dir)
    logger.info(f"data: {num_train} training images; validation: {num_validation} images, {where}")
    plan = load_or_make_plan(args, output_dir, data_dir, (num_train, num_validation))
    timings_path = output_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    selected = [stage for stage in plan.stages if args.stages is None or stage in args.stages]
    for number, stage in enumerate(selected, start=1):
        if stage == "eval":
            start = time.perf_counter()
            count = min(args.eval_images, num_validation)
            logger.info(f"[{number}/{len(selected)}] eval: generating {count} images of the validation captions and "
                        "judging them")  # fmt: skip
            evaluate_model(output_dir / "model", data_dir, output_dir / "eval", plan.resolution, plan.seed,
                                    args.eval_images, args.device)  # fmt: skip
            seconds = time.perf_counter() - start
        else:
            planned = plan.steps[stage] * plan.seconds_per_step.get(stage, float("nan")) / 60
            eta = f", about {planned:.0f} min" if math.isfinite(planned) else ""
            logger.info(f"[{number}/{len(selected)}] {stage}: {plan.steps[stage]} steps of {plan.batch[stage]} images"
                  f"{eta}, in {output_dir / STAGE_FOLDERS[stage]}")  # fmt: skip
            seconds = run_stage(stage, plan, args, output_dir)
        timings[stage] = round(timings.get(stage, 0.0) + seconds, 1)
        timings_path.write_text(json.dumps(timings, indent=2))
    logger.info(summary(output_dir, plan, timings))
    return 0


def summary(output_dir: Path, plan: Plan, timings: dict[str, float]) -> str:
    lines = ["", "done.", "| stage | steps | wall time |", "|---|---:|---:|"]
    for stage in plan.stages:
        steps = plan.steps.get(stage, "")
        lines.append(f"| {stage} | {steps} | {timings.get(stage, 0.0) / 60:.1f} min |")
    report_path = output_dir / "eval" / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if "generated_vs_true" in report:
            quality, floor = report["generated_vs_true_at_floor_size"], report["floor_true_vs_true"]
            lines.append(
                f"quality ({quality['num_generated']} held-out captions): Fréchet distance "
                f"{quality['frechet_distance']:.2f} (floor {floor['frechet_distance']:.2f}), KID {quality['kid']:.4f} "
                f"(floor {floor['kid']:.4f}), precision {quality['precision']:.2f}, recall {quality['recall']:.2f}; "
                f"nearest true image has the caption: {report['caption_agreement']['generated']:.2f} (true images "
                f"{report['caption_agreement']['true']:.2f}, chance {report['caption_agreement']['chance']:.2f}); "
                f"details in {output_dir / 'eval' / 'report.md'}"
            )
    model = output_dir / "model"
    lines += [
        f"model: {model} (DiffusionPipeline.from_pretrained({str(model)!r}, trust_remote_code=True))",
        f'generate: hf-scratch generate "a caption like your data\'s" --model {shlex.quote(str(model))} '
        "--output sample.png",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
