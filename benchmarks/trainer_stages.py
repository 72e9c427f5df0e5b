"""The trainer's throughput per stage of `hf-scratch train`, and its U-Net stage against diffusers' training loop.

    python -m benchmarks.trainer_stages --data DATA --run /tmp/trainer-bench [--steps 60] [--rounds 2] [--json F]

Each stage runs its trainer (`python -m hf_scratch.training.train_*`, one process, `--threads` threads) with the
emoji32 recipe's flags (`hf_scratch.training.recipe.stage_flags`: the recipe's batches, models and objectives) for
--steps optimizer steps, in a fresh folder, and its samples/s is read from its own `train_log.jsonl` over the steps
after the first --warmup (the log's samples_per_s is the mean since the first step, so the rate between two steps
is the samples between them over the time between them). Rows:

- `vae`, `decoder`: the autoencoder and its decoder-only stage.
- `unet (recipe: ...)`: the recipe's U-Net stage (flow matching, immiscible noise, EMA, latents cached on disk and
  built before the timed runs, `--cache_text_embeddings`: the frozen text encoder's output for every caption computed
  once, not every step).
- `unet, latent cache only`: without `--cache_text_embeddings` (the text encoder runs every step).
- `unet, no caches`: without either (the VAE encodes and the text encoder runs every batch), and with
  `--dataloader_num_workers 1` (decoding in a worker process).
- `diffusers loop`: diffusers' `train_text_to_image.py` loop at the same U-Net config and batch on the same data,
  written out here because the example scripts do not ship with the diffusers package: a `datasets` split with its
  per-example transform (resize, centre crop, random flip, [-1, 1], tokenised captions; PIL and numpy in place of
  torchvision, which is not installed), a `DataLoader` with its default of no workers, and per step
  `vae.encode(...).latent_dist.sample()`, DDPM `add_noise`, the text encoder, `UNet2DConditionModel`, MSE, AdamW
  and `EMAModel`, under an `Accelerator` -- diffusers' and transformers' own classes throughout.

The U-Net rows share the frozen VAE and text encoder of the shipped model, and the U-Net starts from its config with
fresh weights, as the recipe trains it. Runs are interleaved round by round; the median of the rounds is reported.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTES = (
    "vae", "decoder", "unet (recipe: latent and text caches)", "unet, latent cache only", "unet, no caches",
    "unet, no caches, 1 worker", "diffusers loop",
)  # fmt: skip


def rate_between(log_rows: list[dict], batch: int, first: int) -> float:
    """Samples/s over the steps after `first`, from a train_log whose samples_per_s is the mean since step 1: the
    time to step n is n·batch / samples_per_s(n)."""
    rows = [row for row in log_rows if "samples_per_s" in row]
    start, end = rows[first - 1], rows[-1]
    elapsed = end["step"] * batch / end["samples_per_s"] - start["step"] * batch / start["samples_per_s"]
    return (end["step"] - start["step"]) * batch / elapsed


def run_trainer(module: str, flags: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", f"hf_scratch.training.{module}", *flags]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=ROOT)


def trainer_flags(route: str, args: argparse.Namespace, folder: Path) -> tuple[str, list[str], int]:
    """(trainer module, flags, batch) of a route: the recipe's stage flags for --steps steps, without validation and
    with one checkpoint at the end."""
    from hf_scratch.pretrained import default_model_path
    from hf_scratch.training.recipe import Plan, stage_flags

    shipped = default_model_path()
    stage = route.split()[0].rstrip(",")
    plan = Plan(
        resolution=32, num_train=0, num_validation=0, stages=["vae", "decoder", "unet"],
        steps={"vae": args.steps, "decoder": args.steps, "unet": args.steps},
        batch={"vae": 32, "decoder": 32, "unet": 64}, seed=0, text_encoder=shipped,
    )  # fmt: skip
    flags = stage_flags(plan, folder, Path(args.data))[stage]
    replace = {"--output_dir": str(folder / stage), "--checkpointing_steps": str(args.steps),
               "--validation_steps": str(10 * args.steps)}  # fmt: skip
    if stage == "decoder":
        replace["--pretrained_vae"] = str(Path(shipped, "vae"))
    if stage == "unet":
        replace["--vae_path"] = str(Path(shipped, "vae"))
        replace["--latent_cache_dir"] = str(args.run / "latent-cache")  # built once, outside the timed steps
    for flag, value in replace.items():
        flags[flags.index(flag) + 1] = value
    for flag in ("--snapshot_steps",):
        if flag in flags:
            del flags[flags.index(flag) : flags.index(flag) + 3]
    if "latent cache only" in route or "no caches" in route:
        flags.remove("--cache_text_embeddings")
    if "no caches" in route:
        at = flags.index("--cache_latents")
        del flags[at : at + 3]  # --cache_latents --latent_cache_dir DIR
    if "1 worker" in route:
        flags += ["--dataloader_num_workers", "1"]
    module = {"vae": "train_vae", "decoder": "train_vae", "unet": "train_unet"}[stage]
    return module, flags, plan.batch[stage]


def diffusers_loop(args: argparse.Namespace, batch: int) -> float:
    """diffusers' train_text_to_image.py loop (see the module docstring) for --steps steps; samples/s after --warmup."""
    import datasets
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from hf_scratch.pretrained import default_model_path

    torch.set_num_threads(args.threads)
    shipped = Path(default_model_path())
    accelerator = Accelerator(cpu=True)
    tokenizer = CLIPTokenizer.from_pretrained(shipped / "tokenizer")
    # float32, as the trainer runs them (the shipped files are float16)
    text_encoder = CLIPTextModel.from_pretrained(shipped / "text_encoder", dtype=torch.float32).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(shipped / "vae", torch_dtype=torch.float32).requires_grad_(False)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "unet"))
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ema_unet = EMAModel(unet.parameters(), decay=0.999)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def pixels(image: Image.Image) -> torch.Tensor:  # Resize, CenterCrop, RandomHorizontalFlip, ToTensor, Normalize
        image = image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        if np.random.rand() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

    def preprocess_train(examples: dict) -> dict:
        examples["pixel_values"] = [pixels(image) for image in examples["image"]]
        examples["input_ids"] = tokenizer(
            examples["text"],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return examples  # fmt: skip

    def collate_fn(examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]).float(),
            "input_ids": torch.stack([example["input_ids"] for example in examples]),
        }

    train_dataset = datasets.load_dataset(args.data, split="train").with_transform(preprocess_train)
    loader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn, batch_size=batch)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()
    stamps = []
    for step, batch_data in enumerate(loader):
        if step == args.steps:
            break
        with accelerator.accumulate(unet):
            latents = vae.encode(batch_data["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch_data["input_ids"], return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        ema_unet.step(unet.parameters())
        stamps.append(time.perf_counter())
    return (len(stamps) - args.warmup) * batch / (stamps[-1] - stamps[args.warmup - 1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the emoji dataset folder (hf-scratch data emoji)")
    parser.add_argument("--run", type=Path, required=True, help="scratch folder for the runs (emptied per run)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20, help="untimed first steps of each run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--diffusers-loop-once", action="store_true", help=argparse.SUPPRESS)  # a route's own process
    return parser


def measure(route: str, args: argparse.Namespace, round_index: int) -> float:
    """One run of a route in its own process; its samples/s after the warm-up steps."""
    if route == "diffusers loop":
        flags = ["--data", args.data, "--run", str(args.run), "--steps", str(args.steps), "--warmup",
                 str(args.warmup), "--threads", str(args.threads), "--diffusers-loop-once"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
        output = subprocess.run([sys.executable, "-m", "benchmarks.trainer_stages", *flags], env=env, check=True,
                                capture_output=True, text=True, cwd=ROOT).stdout  # fmt: skip
        return float(output.strip().splitlines()[-1])
    folder = args.run / f"round-{round_index}"
    shutil.rmtree(folder, ignore_errors=True)
    module, flags, batch = trainer_flags(route, args, folder)
    run_trainer(module, flags, args.threads)
    log = Path(flags[flags.index("--output_dir") + 1], "train_log.jsonl")
    return rate_between([json.loads(line) for line in log.read_text().splitlines() if line.strip()], batch, args.warmup)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup={args.warmup} must be below --steps={args.steps}")
    if args.diffusers_loop_once:
        print(diffusers_loop(args, batch=64))
        return 0
    from benchmarks.timing import machine_info

    args.run.mkdir(parents=True, exist_ok=True)
    if any(
        route.startswith("unet") and "no caches" not in route for route in args.routes
    ):  # fill the cache outside the timed runs
        module, flags, _ = trainer_flags(ROUTES[2], argparse.Namespace(**{**vars(args), "steps": 2}),
                                         args.run / "fill")  # fmt: skip
        run_trainer(module, flags, args.threads)
    info = machine_info("cpu")
    results: dict[str, list[float]] = {route: [] for route in args.routes}
    for round_index in range(args.rounds):
        for route in args.routes:
            results[route].append(measure(route, args, round_index))
            print(f"round {round_index + 1}: {route}: {results[route][-1]:.1f} samples/s", flush=True)
    summary = {"machine": info, "loadavg_end": list(os.getloadavg()),
               "settings": {key: str(value) for key, value in vars(args).items()},
               "samples_per_s": {route: statistics.median(rates) for route, rates in results.items()},
               "rounds": results}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["samples_per_s"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
