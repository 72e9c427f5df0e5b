"""Does a colour-layout ControlNet follow its condition? Measured on held-out emoji.

    python training/evaluate_controlnet.py --model hf_scratch/pretrained/emoji32 --controlnet runs/controlnet \
        --data DATA --num_prompts 256 --out docs

N validation emoji are taken in hash order (`hf_scratch.evaluation.hash_sample`, the emoji-bench sample), each with
its caption p_i and its colour layout L_i (`hf_scratch.conditions`); emoji i's partner is j = i + N/2 (mod N), another
emoji. Three sets of images are drawn with the same sampler and seeds:

- **own**: p_i with L_i. It follows its layout when d(x, L_i) < d(x, L_j), d being `layout_distance` (the mean
  absolute difference of the k × k colour grids, in [0, 1]).
- **swapped**: p_i with L_j, the partner's layout. It follows the layout rather than the caption's own emoji when
  d(x, L_j) < d(x, L_i): the harder test, since the caption pulls towards L_i.
- **no control**: p_i alone through the base pipeline, the rate the caption gives by itself (the chance level the
  first two are read against).

The rates come with their binomial standard errors. The own images' quality is scored by the independent judge
(EfficientNet-Lite0 features: KID against the true images of their prompts, `hf_scratch.evaluation.independent_scores`)
beside the no-control images'. Writes controlnet.json, controlnet_grid.png (rows: condition, drawn, true; then a
swapped row) and controlnet_loss.png (the training loss, from the run's train_log.jsonl) to --out.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image

from hf_scratch import ScratchControlNetModel, ScratchStableDiffusionControlNetPipeline
from hf_scratch.conditions import colour_layout, layout_distance
from hf_scratch.evaluation import hash_sample, independent_scores, load_dataset_folder, load_pipeline
from hf_scratch.metrics import FRECHET_RIDGE, image_to_tensor

GRID_ROWS = 8
GRID_SCALE = 4  # 32 px cells drawn 4x larger, nearest-neighbour


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the base pipeline folder")
    parser.add_argument("--controlnet", required=True, help="the ControlNet folder (train_controlnet.py's output)")
    parser.add_argument("--data", required=True, help="the emoji dataset folder (hf-scratch data emoji)")
    parser.add_argument("--split", default="validation", help="held-out split (default: %(default)s)")
    parser.add_argument("--num_prompts", type=int, default=256, help="N, even (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=16, help="Euler steps (default: %(default)s)")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="CFG w (default: %(default)s)")
    parser.add_argument("--cells", type=int, default=8, help="the layout's k (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for controlnet.json and the figures")
    args = parser.parse_args(argv)
    if args.num_prompts < 2 or args.num_prompts % 2:
        raise ValueError(f"--num_prompts={args.num_prompts} must be an even number of at least 2 (pairs i, i + N/2)")
    return args


def draw(pipe, prompts: list[str], layouts: torch.Tensor | None, args: argparse.Namespace) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], in batches, image i from the generator seeded seed + i whatever the batch."""
    images = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))]
        control = {} if layouts is None else {"image": layouts[start : start + args.batch_size]}
        output = pipe(batch, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generators,
                      output_type="pt", **control)  # fmt: skip
        images.append(output.images.float().cpu())
    return torch.cat(images)


def follow_rate(images: torch.Tensor, given: torch.Tensor, other: torch.Tensor, cells: int) -> dict:
    """How often each image is closer to the layout `given` than to `other`, with its binomial standard error, and
    the mean distances."""
    to_given = layout_distance(images * 2 - 1, given, cells)
    to_other = layout_distance(images * 2 - 1, other, cells)
    rate = (to_given < to_other).float().mean().item()
    return {
        "rate": rate,
        "standard_error": math.sqrt(rate * (1 - rate) / len(images)),
        "distance_to_given": to_given.mean().item(),
        "distance_to_other": to_other.mean().item(),
    }


def loss_plot(run: Path, out: Path) -> None:
    """The training loss per step and its 100-step running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [row["step"] for row in rows]
    losses = torch.tensor([row["loss"] for row in rows])
    window = min(100, len(losses))
    running = losses.unfold(0, window, 1).mean(dim=1)
    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.plot(steps, losses, color="0.8", linewidth=0.6, label="per step")
    axis.plot(steps[window - 1 :], running, color="C0", label=f"mean of {window}")
    axis.set(xlabel="optimizer step", ylabel="flow-matching loss", title="emoji32 colour-layout ControlNet")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def grid(layouts: torch.Tensor, own: torch.Tensor, real: torch.Tensor, swapped: torch.Tensor) -> torch.Tensor:
    """Rows of (condition, drawn, true, partner's condition, drawn with it) for the first GRID_ROWS emoji, (3, H, W)."""
    half = len(layouts) // 2
    rows = []
    for i in range(min(GRID_ROWS, half)):
        j = i + half
        rows.append(torch.cat([layouts[i], own[i], real[i], layouts[j], swapped[i]], dim=2))
    picture = torch.cat(rows, dim=1)
    return picture.repeat_interleave(GRID_SCALE, 1).repeat_interleave(GRID_SCALE, 2)


def main(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    base = load_pipeline(args.model, "--model")
    base.set_progress_bar_config(disable=True)
    controlnet = ScratchControlNetModel.from_pretrained(args.controlnet, dtype=torch.float32)
    controlled = ScratchStableDiffusionControlNetPipeline.from_pipe(base, controlnet=controlnet)
    controlled.set_progress_bar_config(disable=True)
    resolution = base.unet.config.sample_size * base.vae_scale_factor

    dataset = load_dataset_folder(args.data)[args.split]
    indices = hash_sample(dataset["text"], args.num_prompts)
    prompts = [dataset[i]["text"] for i in indices]
    real = torch.stack([image_to_tensor(dataset[i]["image"], resolution) for i in indices])  # (N, 3, H, W) in [0, 1]
    layouts = colour_layout(real * 2 - 1, args.cells)
    partners = layouts.roll(-(len(layouts) // 2), dims=0)  # L_j, j = i + N/2

    own = draw(controlled, prompts, layouts, args)
    swapped = draw(controlled, prompts, partners, args)
    uncontrolled = draw(base, prompts, None, args)
    settings = {"batch_size": args.batch_size, "seed": args.seed, "device": "cpu", "frechet_ridge": FRECHET_RIDGE}
    results = {
        "settings": {key: value for key, value in vars(args).items() if key != "out"} | {"resolution": resolution},
        "own_layout": follow_rate(own, layouts, partners, args.cells),
        "swapped_layout": follow_rate(swapped, partners, layouts, args.cells),
        "no_control": follow_rate(uncontrolled, layouts, partners, args.cells),
        "quality_own_layout": independent_scores(own, real, settings),
        "quality_no_control": independent_scores(uncontrolled, real, settings),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controlnet.json").write_text(json.dumps(results, indent=2) + "\n")
    picture = (grid(layouts, own, real, swapped).clamp(0, 1) * 255).round().to(torch.uint8)
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out / "controlnet_grid.png")
    if (Path(args.controlnet) / "train_log.jsonl").is_file():
        loss_plot(Path(args.controlnet), out / "controlnet_loss.png")
    for name in ("own_layout", "swapped_layout", "no_control"):
        figures = results[name]
        print(f"{name}: follows the given layout in {figures['rate']:.3f} ± {figures['standard_error']:.3f}")


if __name__ == "__main__":
    main(parse_args())
