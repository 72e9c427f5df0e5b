"""emoji-bench: how well a Stable Diffusion trained from scratch on the captioned emoji data does, judged by a CLIP.

`run_emoji_bench` measures, each number computed by the run itself:

- **VAE**: PSNR and SSIM of reconstructions x -> mode of q(z|x) -> D(z) on the `validation` split.
- **Judge CLIP** (Radford et al. 2021, arXiv:2103.00020): text->image and image->text top-1/top-5 retrieval over the
  whole `validation` split, next to the chance levels.
- **Generation**, for a deterministic sample of captions of each split (sorted by SHA-256 of the caption) with one
  generator per prompt seeded `seed + index`:
  (a) retrieval: the judge ranks all captions of the split for each generated image; a hit is the prompt's caption
      among the top k (chance k / N for N distinct captions);
  (b) a Fréchet distance, as FID but on the judge's L2-normalised image embeddings, between the generated images and
      the real images of the same captions;
  (c) on `train` and `heldout_style`, whose emoji the model has seen (in another style, for `heldout_style`), the
      pixel PSNR and SSIM of each generated image against the true one;
  (d) independently of the judge, on the features of an ImageNet classifier (`hf_scratch.metrics.ImageQuality`:
      Fréchet distance, KID and its standard error, precision and recall), the generated images against the true
      images of the same captions, and at the size of the floor, beside the floor itself: two halves of the true
      images against each other.
  The judge's top-k is marked saturated where it exceeds the judge's score of the true images of the same captions.
- **Samplers**: (a)-(c) on the first `num_prompts_samplers` prompts of the `train` sample for each sampler
  ("NAME-STEPS", NAME a scheduler of `hf_scratch.schedulers.SCHEDULERS`), with the seconds per generated image.

The metrics and their equations are in `hf_scratch.metrics`; images are tensors (N, 3, H, W) in [0, 1] throughout.
"""

import hashlib
import json
import logging
import math
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from PIL import ImageDraw, ImageFont

from hf_scratch.data.emoji import SPLITS
from hf_scratch.data.folder import load_dataset_folder  # noqa: F401  (the CLI and the study load it from here)
from hf_scratch.metrics import (
    FRECHET_RIDGE,
    KID_SUBSETS,
    MIN_QUALITY_IMAGES,
    PRECISION_RECALL_K,
    SSIM_WINDOW,
    TOP_K,
    chance_accuracy,
    efficientnet_features,
    feature_quality,
    floor_halves,
    frechet_distance,
    image_to_tensor,
    psnr,
    retrieval_accuracy,
    ssim,
    tensor_to_image,
    text_positives,
)

logger = logging.getLogger(__name__)

# Splits whose emoji the model was trained on (in another style, for heldout_style): generations can match the pixels.
PIXEL_SPLITS = ("train", "heldout_style")
# The sampler table of each scheduler family (see `hf_scratch.schedulers.FAMILIES`): a model is sampled by its own.
DEFAULT_SAMPLERS = {
    "ddpm": ("ddpm-1000", "ddim-50", "dpm++-20", "dpm++-10"),
    "edm": ("edm-euler-50", "edm-dpm++-20", "edm-dpm++-10"),
    "flow": ("flow-euler-50", "flow-euler-20", "flow-euler-10"),
}
GRID_ROWS = {"train": 8, "heldout_style": 4, "validation": 4}
GRID_CELL = 128  # images are upscaled (nearest neighbour) to at least this many pixels a side in grid.png


# ------------------------------------------------------------------------------------------------------- data, judge
def hash_sample(texts: Sequence[str], count: int) -> list[int]:
    """Indices of up to `count` distinct texts, the first in order of their SHA-256: a sample that no seed moves."""
    first_index = {}
    for index, text in enumerate(texts):
        first_index.setdefault(text, index)
    ordered = sorted(first_index, key=lambda text: hashlib.sha256(text.encode()).hexdigest())
    return [first_index[text] for text in ordered[:count]]


def _features(output: Any) -> torch.Tensor:
    """transformers 5's `CLIPModel` returns an output whose `pooler_output` is the projection; ours, the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def judge_image_features(judge: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L2-normalised image embeddings (N, D) of images (N, 3, H, W) in [0, 1], resized to the judge's input size."""
    size = judge.config.vision_config.image_size
    features = []
    for batch in images.split(batch_size):
        if batch.shape[-2:] != (size, size):
            batch = F.interpolate(batch, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        pixel_values = (batch * 2 - 1).to(judge.device, judge.dtype)
        features.append(_features(judge.get_image_features(pixel_values=pixel_values)).float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


@torch.no_grad()
def judge_text_features(judge: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """L2-normalised text embeddings (N, D), tokenised to the tokenizer's `model_max_length`."""
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(
            list(texts[start : start + batch_size]), padding="max_length", truncation=True, return_tensors="pt"
        ).to(judge.device)
        output = judge.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        features.append(_features(output).float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


# ------------------------------------------------------------------------------------------------------------ parts
@torch.no_grad()
def reconstruct(vae: torch.nn.Module, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D(mode of q(z|x)) in [0, 1] of images (N, 3, H, W) in [0, 1], and the scaled latents (N, C, h, w)."""
    reconstructions, latents = [], []
    for batch in images.split(batch_size):
        latent = vae.encode((batch * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        reconstructions.append(((vae.decode(latent).sample.float().cpu() + 1) / 2).clamp(0, 1))
        latents.append(latent.float().cpu() * vae.config.scaling_factor)
    return torch.cat(reconstructions), torch.cat(latents)


@torch.no_grad()
def evaluate_vae(
    vae: torch.nn.Module, images: torch.Tensor, batch_size: int, styles: Sequence[str] | None = None
) -> dict:
    """PSNR and SSIM of x -> D(mode of q(z|x)) for images (N, 3, H, W) in [0, 1], and the std of the scaled latents;
    with `styles` (one name per image) also the mean PSNR and SSIM of each style."""
    reconstructions, latents = reconstruct(vae, images, batch_size)
    psnrs, ssims = psnr(reconstructions, images), ssim(reconstructions, images)
    result = {
        "images": len(images),
        "psnr": psnrs.mean().item(),
        "ssim": ssims.mean().item(),
        "scaled_latent_std": latents.std().item(),
    }
    if styles is not None:
        result["per_style"] = {}
        for style in sorted(set(styles)):
            chosen = torch.tensor([name == style for name in styles])
            result["per_style"][style] = {
                "images": int(chosen.sum()),
                "psnr": psnrs[chosen].mean().item(),
                "ssim": ssims[chosen].mean().item(),
            }
    return result


def evaluate_judge(
    judge: torch.nn.Module, tokenizer: Any, texts: list[str], images: torch.Tensor, batch_size: int
) -> dict:
    """Text->image and image->text top-k retrieval over one split; a hit shares the query's caption."""
    text_features = judge_text_features(judge, tokenizer, texts, batch_size)
    image_features = judge_image_features(judge, images, batch_size)
    positives = text_positives(texts, texts)
    chance = chance_accuracy(len(set(texts)))
    return {
        "images": len(texts),
        "text_to_image": {**retrieval_accuracy(text_features @ image_features.T, positives), **chance},
        "image_to_text": {**retrieval_accuracy(image_features @ text_features.T, positives), **chance},
    }


@torch.no_grad()
def generate(
    pipeline: Any, prompts: Sequence[str], seed: int, steps: int, guidance: float, resolution: int, batch_size: int
) -> tuple[torch.Tensor, float]:
    """Images (N, 3, H, W) in [0, 1] for `prompts` and the seconds taken. Prompt i draws its noise from a CPU generator
    seeded `seed + i`, so an image does not depend on the batch it is in, nor on the device."""
    images = []
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = list(prompts[first : first + batch_size])
        generators = [torch.Generator("cpu").manual_seed(seed + first + i) for i in range(len(batch))]
        output = pipeline(
            batch, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance,
            generator=generators, output_type="pt",
        )  # fmt: skip
        images.append(output.images.float().cpu())
    return torch.cat(images), time.perf_counter() - start


@dataclass
class SplitSample:
    """The hash sample of one split: prompts, their true images (N, 3, H, W) in [0, 1], and all distinct captions of
    the split with the judge's embeddings of them."""

    split: str
    prompts: list[str]
    real: torch.Tensor
    captions: list[str]
    caption_features: torch.Tensor

    def head(self, count: int) -> "SplitSample":
        """The first `count` prompts, which are also the hash sample of that size."""
        return replace(self, prompts=self.prompts[:count], real=self.real[:count])


def sample_split(
    dataset: Any, split: str, count: int, resolution: int, judge: torch.nn.Module, tokenizer: Any, batch_size: int
) -> SplitSample:
    """The first `count` distinct captions of `dataset` in hash order, with their images at `resolution`."""
    indices = hash_sample(dataset["text"], count)
    captions = sorted(set(dataset["text"]))
    return SplitSample(
        split=split,
        prompts=[dataset[i]["text"] for i in indices],
        real=torch.stack([image_to_tensor(dataset[i]["image"], resolution) for i in indices]),
        captions=captions,
        caption_features=judge_text_features(judge, tokenizer, captions, batch_size),
    )


def generate_and_score(
    pipeline: Any, sample: SplitSample, judge: torch.nn.Module, settings: dict, steps: int
) -> tuple[dict, torch.Tensor]:
    """Metrics (a)-(c) of the module docstring, and seconds per image, for images generated from `sample.prompts`
    with `steps` steps of the pipeline's scheduler; also returns the images."""
    scheduler = type(pipeline.scheduler).__name__
    logger.info("%s, %d steps: %d prompts of %s", scheduler, steps, len(sample.prompts), sample.split)
    generated, seconds = generate(
        pipeline, sample.prompts, settings["seed"], steps, settings["guidance"], settings["resolution"],
        settings["batch_size"],
    )  # fmt: skip
    scores = score_images(generated, sample, judge, settings)
    scores["seconds_per_image"] = seconds / len(sample.prompts)
    return scores, generated


def score_images(images: torch.Tensor, sample: SplitSample, judge: torch.nn.Module, settings: dict) -> dict:
    """Metrics (a)-(c) of the module docstring for images (N, 3, H, W) in [0, 1], one per prompt of `sample`."""
    batch_size = settings["batch_size"]
    generated = images
    generated_features = judge_image_features(judge, generated, batch_size)
    similarity = generated_features @ sample.caption_features.T  # (prompts, captions)
    scores = {"prompts": len(sample.prompts), "captions": len(sample.captions)}
    scores.update(retrieval_accuracy(similarity, text_positives(sample.prompts, sample.captions)))
    scores.update(chance_accuracy(len(sample.captions)))
    if len(sample.prompts) >= 2:
        real_features = judge_image_features(judge, sample.real, batch_size)
        ridge = settings["frechet_ridge"]
        scores["frechet_clip"] = frechet_distance(generated_features.numpy(), real_features.numpy(), ridge)
    else:
        logger.warning("%s has %d prompt(s): too few for a Fréchet distance", sample.split, len(sample.prompts))
        scores["frechet_clip"] = None
    pixels = sample.split in PIXEL_SPLITS
    scores["psnr"] = psnr(generated, sample.real).mean().item() if pixels else None
    scores["ssim"] = ssim(generated, sample.real).mean().item() if pixels else None
    return scores


def independent_scores(generated: torch.Tensor, real: torch.Tensor, settings: dict) -> dict:
    """Metric (d) of the module docstring: the figures of `hf_scratch.metrics.ImageQuality` for generated images
    (N, 3, H, W) in [0, 1] against the true images of their prompts ("generated", N against N); and, with the prompts
    cut into two halves A and B (seeded `settings["seed"]`), the generated images of A against the true images of B
    ("generated_half") beside the floor, the true images of A against those of B ("floor"), at equal sizes. A
    comparison with fewer than `MIN_QUALITY_IMAGES` images a side is None."""
    batch_size, seed, device = settings["batch_size"], settings["seed"], settings["device"]
    generated_features = efficientnet_features(generated, batch_size, device)  # (N, 1280)
    real_features = efficientnet_features(real, batch_size, device)
    half_a, half_b = floor_halves(len(real), seed)
    comparisons = {
        "generated": (generated_features, real_features),
        "generated_half": (generated_features[half_a], real_features[half_b]),
        "floor": (real_features[half_a], real_features[half_b]),
    }
    scores = {}
    for name, (features, reference) in comparisons.items():
        if min(len(features), len(reference)) < MIN_QUALITY_IMAGES:
            logger.warning("%s: %d image(s) a side, too few for the image-quality figures", name, len(features))
            scores[name] = None
        else:
            scores[name] = feature_quality(features, reference, seed, settings["frechet_ridge"]).to_dict()
    return scores


def saturated_judge_figures(generated: dict, true: dict) -> list[str]:
    """The judge's top-k figures ("top1", "top5") in which the generated images score above the true images of the
    same prompts: there, the judge no longer ranks generators by how close they come to real images."""
    return [f"top{k}" for k in TOP_K if generated[f"top{k}"] > true[f"top{k}"]]


@torch.no_grad()
def ceiling_scores(vae: torch.nn.Module, sample: SplitSample, judge: torch.nn.Module, settings: dict) -> dict:
    """What a perfect generator would score: the metrics of `score_images` on the true images of the prompts
    ("true"; their Fréchet distance, PSNR and SSIM against themselves are trivial and left out) and on their VAE
    reconstructions ("vae"), the best a latent diffusion model on this VAE can draw."""
    true = score_images(sample.real, sample, judge, settings)
    true.update(frechet_clip=None, psnr=None, ssim=None)
    reconstructions, _ = reconstruct(vae, sample.real, settings["batch_size"])
    return {"true": true, "vae": score_images(reconstructions, sample, judge, settings)}


def parse_sampler(spec: str) -> tuple[str, int]:
    """ "dpm++-20" -> ("dpm++", 20): a scheduler name of `hf_scratch.schedulers.SCHEDULERS` and a number of steps."""
    from hf_scratch.schedulers import SCHEDULERS

    name, _, steps = spec.rpartition("-")
    if name not in SCHEDULERS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(
            f"samplers={spec!r} is not allowed; use NAME-STEPS, e.g. ddim-50, with NAME one of {', '.join(SCHEDULERS)}"
        )
    return name, int(steps)


def _default_resolution(pipeline: Any) -> int:
    sample_size = pipeline.unet.config.sample_size
    return (sample_size if isinstance(sample_size, int) else sample_size[0]) * pipeline.vae_scale_factor


# ------------------------------------------------------------------------------------------------------------ runner
def run_emoji_bench(
    pipeline: Any,
    judge_clip: torch.nn.Module,
    judge_tokenizer: Any,
    dataset_dict: Any,
    *,
    num_prompts: int = 64,
    num_prompts_samplers: int = 16,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    samplers: Sequence[str] | None = None,
    resolution: int | None = None,
    batch_size: int = 16,
    max_vae_images: int | None = None,
    frechet_ridge: float = FRECHET_RIDGE,
    model: str | None = None,
    judge: str | None = None,
    data: str | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Run emoji-bench (see the module docstring) and return its results as a JSON-ready dict.

    Args:
        pipeline: a text-to-image pipeline with the diffusers API (`ScratchStableDiffusionPipeline`); its own
            scheduler runs the generation table, and it is restored after the sampler table.
        judge_clip, judge_tokenizer: a CLIP (`get_text_features`, `get_image_features`) and its tokenizer.
        dataset_dict: the emoji dataset (`datasets.load_dataset(folder)`), splits train/validation/heldout_style.
        num_prompts: captions sampled from each split for the generation table.
        num_prompts_samplers: captions sampled from `train` for each of `samplers` (the first of the same order).
        seed, steps, guidance: prompt i uses a generator seeded `seed + i`, `steps` steps and guidance weight w.
        samplers: "NAME-STEPS" specs, e.g. "ddim-50"; default `DEFAULT_SAMPLERS` of the scheduler's family.
        resolution: image side; default the pipeline's. Real images are resized (bicubic) to it.
        batch_size: images per pipeline call and per encoder batch.
        max_vae_images: reconstruct at most this many validation images (a hash sample); default all.
        frechet_ridge: ε of the ridge ε·I added to the covariances of the Fréchet distance.
        model, judge, data: names to record; `model` and `judge` default to the models' `name_or_path`.
        out_dir: when given, also write emoji_bench.json, emoji_bench.md and grid.png there.
    """
    for name, value in (("num_prompts", num_prompts), ("num_prompts_samplers", num_prompts_samplers)):
        if value < 1:
            raise ValueError(f"{name}={value!r} is not allowed; use a positive number of prompts")
    missing = [split for split in SPLITS if split not in dataset_dict]
    if missing:
        raise ValueError(f"dataset_dict lacks the splits {missing}; emoji-bench needs {SPLITS}")
    if samplers is None:
        from hf_scratch.schedulers import scheduler_family

        samplers = DEFAULT_SAMPLERS[scheduler_family(pipeline.scheduler.config)]
    sampler_specs = {spec: parse_sampler(spec) for spec in samplers}
    resolution = _default_resolution(pipeline) if resolution is None else resolution
    pipeline.check_size(resolution, resolution, names=("resolution", "resolution"))
    if resolution < SSIM_WINDOW:
        raise ValueError(f"resolution={resolution} is not allowed; SSIM needs at least {SSIM_WINDOW} pixels")
    settings = {
        "num_prompts": num_prompts, "num_prompts_samplers": num_prompts_samplers, "seed": seed, "steps": steps,
        "guidance": guidance, "scheduler": type(pipeline.scheduler).__name__, "samplers": list(samplers),
        "resolution": resolution, "batch_size": batch_size, "max_vae_images": max_vae_images,
        "frechet_ridge": frechet_ridge, "device": str(pipeline.device),
        "independent_features": "EfficientNet-lite0 (ImageNet), mean-pooled, 224 px", "kid_subsets": KID_SUBSETS,
        "precision_recall_k": PRECISION_RECALL_K,
    }  # fmt: skip
    start = time.perf_counter()

    validation = dataset_dict["validation"]
    validation_texts = list(validation["text"])
    validation_images = torch.stack([image_to_tensor(image, resolution) for image in validation["image"]])
    vae_indices = range(len(validation)) if max_vae_images is None else hash_sample(validation_texts, max_vae_images)
    logger.info("VAE: reconstructing %d validation images", len(vae_indices))
    styles = [validation["style"][i] for i in vae_indices] if "style" in validation.column_names else None
    vae = evaluate_vae(pipeline.vae, validation_images[list(vae_indices)], batch_size, styles)
    logger.info("judge: retrieval over %d validation images", len(validation_texts))
    clip = evaluate_judge(judge_clip, judge_tokenizer, validation_texts, validation_images, batch_size)

    samples = {
        split: sample_split(
            dataset_dict[split],
            split,
            max(num_prompts, num_prompts_samplers) if split == "train" else num_prompts,
            resolution,
            judge_clip,
            judge_tokenizer,
            batch_size,
        )  # fmt: skip
        for split in SPLITS
    }
    generation, ceiling, independent, grid_rows = {}, {}, {}, []
    for split, sample in samples.items():
        sample = sample.head(num_prompts)
        generation[split], generated = generate_and_score(pipeline, sample, judge_clip, settings, steps)
        ceiling[split] = ceiling_scores(pipeline.vae, sample, judge_clip, settings)
        generation[split]["saturated"] = saturated_judge_figures(generation[split], ceiling[split]["true"])
        logger.info("image quality: %d generated and true images of %s", len(sample.prompts), split)
        independent[split] = independent_scores(generated, sample.real, settings)
        rows = range(min(GRID_ROWS[split], len(sample.prompts)))
        grid_rows += [(split, sample.prompts[i], generated[i], sample.real[i]) for i in rows]

    from hf_scratch.schedulers import make_scheduler

    sampler_results = {}
    own_scheduler = pipeline.scheduler
    sample = samples["train"].head(num_prompts_samplers)
    try:
        for spec, (name, sampler_steps) in sampler_specs.items():
            pipeline.scheduler = make_scheduler(name, own_scheduler.config)
            sampler_results[spec], _ = generate_and_score(pipeline, sample, judge_clip, settings, sampler_steps)
    finally:
        pipeline.scheduler = own_scheduler

    results = {
        "model": model if model is not None else str(getattr(pipeline, "name_or_path", None)),
        "judge": judge if judge is not None else str(getattr(judge_clip, "name_or_path", None)),
        "data": data,
        "vae": vae,
        "clip": clip,
        "generation": generation,
        "ceiling": ceiling,
        "independent": independent,
        "samplers": sampler_results,
        "settings": settings,
        "seconds": time.perf_counter() - start,
    }
    if out_dir is not None:
        write_outputs(results, make_grid(grid_rows), out_dir)
    return results


# ----------------------------------------------------------------------------------------------------------- outputs
def make_grid(rows: Sequence[tuple[str, str, torch.Tensor, torch.Tensor]]) -> PIL.Image.Image:
    """Under a header, one row per (split, prompt, generated, true): the text, then both images upscaled by nearest
    neighbour to at least `GRID_CELL` pixels."""
    side = rows[0][2].shape[-1]
    cell = side * math.ceil(GRID_CELL / side)
    text_width = 2 * cell
    font = ImageFont.load_default()
    characters_per_line = max(1, int(text_width / font.getlength("n")) - 2)
    header = 2 * font.getbbox("Ag")[3]
    grid = PIL.Image.new("RGB", (text_width + 2 * cell, header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for left, title in ((0, "prompt"), (text_width, "generated"), (text_width + cell, "true emoji")):
        draw.text((left + 4, header // 4), title, fill="black", font=font)
    for row, (split, prompt, generated, true) in enumerate(rows):
        top = header + row * cell
        lines = [f"[{split}]", *textwrap.wrap(prompt, characters_per_line)]
        draw.multiline_text((4, top + 4), "\n".join(lines), fill="black", font=font)
        for column, pixels in enumerate((generated, true)):
            image = tensor_to_image(pixels).resize((cell, cell), PIL.Image.Resampling.NEAREST)
            grid.paste(image, (text_width + column * cell, top))
    return grid


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


_SCORE_COLUMNS = ("top1", "top5", "chance_top1", "chance_top5", "frechet_clip", "psnr", "ssim", "seconds_per_image")
_SCORE_HEADER = ("top-1", "top-5", "chance top-1", "chance top-5", "Fréchet (CLIP)", "PSNR (dB)", "SSIM", "s / image")
_COMPARISONS = {
    "generated": "generated vs true",
    "generated_half": "generated, half A vs true, half B",
    "floor": "floor: true, half A vs true, half B",
}


def _generation_cells(scores: dict) -> list:
    """The `_SCORE_COLUMNS` of one split, with the judge's saturated top-k marked."""
    saturated = scores.get("saturated", [])
    return [f"{scores[key]:.3f} (saturated)" if key in saturated else scores[key] for key in _SCORE_COLUMNS]


def _quality_cells(quality: dict | None) -> tuple:
    """Images, Fréchet distance, KID ×10³ ± its standard error, precision and recall of one `ImageQuality` dict."""
    if quality is None:
        return (None,) * 5
    images = f"{quality['num_generated']} / {quality['num_true']}"
    kid = f"{quality['kid'] * 1e3:.2f} ± {quality['kid_standard_error'] * 1e3:.2f}"
    return images, quality["frechet_distance"], kid, quality["precision"], quality["recall"]


def to_markdown(results: dict) -> str:
    """The results of `run_emoji_bench` as Markdown tables."""
    settings, vae, clip = results["settings"], results["vae"], results["clip"]
    directions = [
        (direction.replace("_", " "), *(clip[direction][key] for key in ("top1", "top5", "chance_top1", "chance_top5")))
        for direction in ("text_to_image", "image_to_text")
    ]
    generation = [
        (split, scores["prompts"], scores["captions"], *_generation_cells(scores))
        for split, scores in results["generation"].items()
    ]
    samplers = [
        (spec, scores["prompts"], *(scores[key] for key in _SCORE_COLUMNS))
        for spec, scores in results["samplers"].items()
    ]
    ceilings = [
        (split, source, *(scores.get(key) for key in _SCORE_COLUMNS[:-1]))
        for split, by_source in results.get("ceiling", {}).items()
        for source, scores in by_source.items()
    ]
    vae_rows = [("all", vae["images"], vae["psnr"], vae["ssim"], vae["scaled_latent_std"])]
    vae_rows += [(style, v["images"], v["psnr"], v["ssim"], None) for style, v in vae.get("per_style", {}).items()]
    steps, guidance, seed = settings["steps"], settings["guidance"], settings["seed"]
    independent = ""
    if "independent" in results:
        quality_rows = [
            (split, _COMPARISONS[name], *_quality_cells(quality))
            for split, comparisons in results["independent"].items()
            for name, quality in comparisons.items()
        ]
        independent = f"""
## Independent image quality (EfficientNet-lite0, ImageNet)

The generated images of the table above against true images, on the features of an ImageNet classifier that no
model here was trained with: {settings["independent_features"]}.
Fréchet distance; KID ×10³ (unbiased, cubic kernel) ± its standard error over {settings["kid_subsets"]} disjoint
subsets; precision and recall (k-NN radii, k = {settings["precision_recall_k"]}).
The prompts are cut into two halves A and B (seed {seed}): the floor compares the true images of A with those of B,
what a generator drawing real images would score, and the row above it the generated images of A with the same true
images of B. Only rows of equal sizes compare: the Fréchet distance and precision / recall depend on the number of
images.

{_table(("split", "images compared", "generated / true", "Fréchet", "KID ×10³", "precision", "recall"), quality_rows)}
"""
    return f"""\
# emoji-bench

model `{results["model"]}`, judge `{results["judge"]}`, data `{results["data"]}`; {results["seconds"]:.0f} s.

## VAE reconstruction (validation, {settings["resolution"]} px)

{_table(("style", "images", "PSNR (dB)", "SSIM", "std of scaled latents"), vae_rows)}

## Judge CLIP retrieval (validation, {clip["images"]} images)

{_table(("direction", "top-1", "top-5", "chance top-1", "chance top-5"), directions)}

## Generation ({settings["scheduler"]}, {steps} steps, guidance {guidance}, seed {seed})

Retrieval ranks all captions of the split for each generated image. PSNR and SSIM compare with the true emoji, for
the splits whose emoji were trained on. A top-k marked *saturated* is above the judge's top-k of the true images of
the same prompts (the ceiling below): there the judge prefers the generated images to real ones, so it cannot rank
generators; the independent figures below can.

{_table(("split", "prompts", "captions", *_SCORE_HEADER), generation)}

Ceiling: the same metrics on the true images of the same prompts, and on their VAE reconstructions (the best this
latent space allows).

{_table(("split", "ceiling from", *_SCORE_HEADER[:-1]), ceilings)}
{independent}
## Samplers (train)

{_table(("sampler", "prompts", *_SCORE_HEADER), samplers)}
"""


def comparison_markdown(runs: dict[str, dict]) -> str:
    """One Markdown table of several `run_emoji_bench` results (label -> results) with the same judge, prompts,
    steps and guidance: top-5 and Fréchet distance per split and the VAE's PSNR, then the ceilings of the last run
    (true images, and their reconstructions by the last run's VAE)."""
    if not runs:
        raise ValueError("runs is empty; pass at least one emoji-bench result")
    keys = ("num_prompts", "seed", "steps", "guidance", "resolution")
    first = next(iter(runs.values()))
    for label, results in runs.items():
        if results["judge"] != first["judge"] and Path(results["judge"]).name != Path(first["judge"]).name:
            raise ValueError(f"{label} was judged by {results['judge']!r}, not {first['judge']!r}: not comparable")
        differing = [key for key in keys if results["settings"][key] != first["settings"][key]]
        if differing:
            raise ValueError(f"{label} differs from the first run in {differing}: not comparable")
    header = ["model", *(f"top-5 {split}" for split in SPLITS), *(f"Fréchet {split}" for split in SPLITS)]
    header += ["VAE PSNR (dB)", "VAE SSIM"]
    rows = [
        (label, *(r["generation"][split]["top5"] for split in SPLITS),
         *(r["generation"][split]["frechet_clip"] for split in SPLITS), r["vae"]["psnr"], r["vae"]["ssim"])
        for label, r in runs.items()
    ]  # fmt: skip
    last_label, last = list(runs.items())[-1]
    for source, name in (("true", "ceiling: true images"), ("vae", f"ceiling: {last_label}'s VAE images")):
        scores = [last["ceiling"][split][source] for split in SPLITS]
        rows.append((name, *(s["top5"] for s in scores), *(s["frechet_clip"] for s in scores), None, None))
    settings = first["settings"]
    return (
        f"{settings['num_prompts']} prompts per split, {settings['steps']} steps of each model's own sampler, guidance "
        f"{settings['guidance']}, seed {settings['seed']}; judge `{Path(first['judge']).name}`; VAE on the validation"
        " split.\n\n" + _table(header, rows)
    )


def write_outputs(results: dict, grid: PIL.Image.Image, out_dir: str | Path) -> None:
    """Write emoji_bench.json, emoji_bench.md and grid.png to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "emoji_bench.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "emoji_bench.md").write_text(to_markdown(results), encoding="utf-8")
    grid.save(out / "grid.png")
    logger.info("wrote %s", ", ".join(str(out / name) for name in ("emoji_bench.json", "emoji_bench.md", "grid.png")))


def load_pipeline(folder: str | Path, name: str = "folder") -> Any:
    """`ScratchStableDiffusionPipeline.from_pretrained(folder)`, with a clear error for a folder that isn't one;
    `name` is what the error calls the folder (the CLI passes its flag)."""
    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

    if not (Path(folder) / "model_index.json").is_file():
        raise ValueError(f"{name} {str(folder)!r} holds no model_index.json; pass a pipeline folder")
    return ScratchStableDiffusionPipeline.from_pretrained(folder)


def load_judge(folder: str | Path, name: str = "folder") -> tuple[torch.nn.Module, Any]:
    """A CLIP saved by `save_pretrained` and its `CLIPTokenizer`, from `folder/tokenizer` or else `folder` itself;
    `name` is what an error calls the folder (the CLI passes its flag)."""
    from transformers import CLIPTokenizer

    from hf_scratch.models.clip import ScratchCLIPModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{name} {str(folder)!r} holds no config.json; pass the output folder of train_clip.py")
    tokenizer_folder = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    # fp32 whatever the stored dtype: the shipped judge is stored in fp16, which the CPU runs slowly or not at all.
    judge = ScratchCLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    return judge, CLIPTokenizer.from_pretrained(tokenizer_folder)
