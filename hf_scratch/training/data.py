"""Training data: a local dataset read as (image, caption) pairs, the epoch order, and the latent cache.

1. `load_image_text_dataset` reads a local `datasets` folder, checks its columns, and drops (and counts) images that do
   not decode, so one bad file never stops a run.
2. `ImageTextDataset` turns a row into {"pixel_values" in [-1, 1], "caption"}; `collate` stacks rows into a batch.
3. `EpochBatches` fixes the data order: one seeded permutation per epoch, cut into global batches and sharded by rank.
   The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
4. `cache_latents` encodes the images once with the frozen VAE, for the U-Net's training.
"""

import argparse
import io
import math
import os
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from hf_scratch.metrics import image_to_tensor
from hf_scratch.models.vae import ScratchAutoencoderKL

logger = get_logger(__name__)


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def _decode(cell: dict[str, Any]) -> Image.Image:
    """Open an undecoded `datasets.Image` cell ({"bytes", "path"}) and force the pixels to load."""
    image = Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
    image.load()
    return image


class ImageTextDataset(torch.utils.data.Dataset):
    """A split whose images all decode: items are {"pixel_values": (3, R, R) in [-1, 1], "caption": str}, the pixels
    those of `hf_scratch.metrics.image_to_tensor` mapped to the models' range by 2x − 1."""

    def __init__(
        self, split: datasets.Dataset, image_column: str, caption_column: str | None, resolution: int, num_skipped: int
    ) -> None:
        self.images = list(split[image_column])
        self.captions = list(split[caption_column]) if caption_column else [""] * len(self.images)
        self.resolution = resolution
        self.num_skipped = num_skipped

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixel_values = image_to_tensor(_decode(self.images[index]), self.resolution) * 2 - 1
        return {"pixel_values": pixel_values, "caption": self.captions[index]}


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and keep strings as lists."""
    return {
        key: torch.stack([e[key] for e in examples])
        if torch.is_tensor(examples[0][key])
        else [e[key] for e in examples]
        for key in examples[0]
    }


def load_image_text_dataset(
    args: argparse.Namespace, split: str, accelerator: Accelerator, limit: int | None = None
) -> ImageTextDataset:
    """Load `split` of --train_data_dir or --dataset_name, check its columns, and skip images that do not decode."""
    source_flag = "train_data_dir" if args.train_data_dir else "dataset_name"
    source = getattr(args, source_flag)
    if not os.path.isdir(source):
        raise ValueError(
            f"--{source_flag}={source!r} is not an existing folder; training reads local datasets only (for example "
            "one written by `hf-scratch data emoji`)"
        )
    with accelerator.main_process_first():
        if args.train_data_dir:
            dataset = datasets.load_dataset("imagefolder", data_dir=source)
        else:
            dataset = datasets.load_dataset(source)
    if split not in dataset:
        raise ValueError(
            f"split {split!r} is not in --{source_flag}={source!r}; available splits: {', '.join(dataset)}"
        )
    data = dataset[split]
    caption_column = getattr(args, "caption_column", None)
    for flag, column in (("image_column", args.image_column), ("caption_column", caption_column)):
        if column is not None and column not in data.column_names:
            raise ValueError(
                f"--{flag}={column!r} is not a column of split {split!r} of {source!r}; "
                f"available columns: {', '.join(data.column_names)}"
            )
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    data = data.cast_column(args.image_column, datasets.Image(decode=False))
    if caption_column is not None:
        for index, caption in enumerate(data[caption_column]):
            if not isinstance(caption, str):
                image = data[index][args.image_column]
                raise ValueError(
                    f"row {index} of split {split!r} of --{source_flag}={source!r} ({image.get('path') or 'no file'}) "
                    f'has caption {caption!r} in column {caption_column!r}; every row needs a text caption (use "" '
                    "for none)"
                )

    decodable = []
    for index, cell in enumerate(data[args.image_column]):
        try:
            _decode(cell)
            decodable.append(index)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logger.warning(f"skipping image {cell.get('path') or index} of split {split!r}: {error}")
    skipped = len(data) - len(decodable)
    if skipped:
        logger.warning(f"skipped {skipped} of {len(data)} images of split {split!r} that do not decode")
        data = data.select(decodable)
    if len(data) == 0:
        raise ValueError(f"split {split!r} of --{source_flag}={source!r} has no decodable image")
    return ImageTextDataset(data, args.image_column, caption_column, args.resolution, skipped)


class EpochBatches:
    """The data order: per epoch a permutation seeded by (seed, epoch), cut into global batches, sharded by rank.

    A global batch holds `batch_size * num_processes` examples; rank r takes the r-th slice. Each epoch is truncated
    to a whole number of optimizer updates (`gradient_accumulation_steps` batches each), so every update sees the
    same number of examples and step k always consumes the same examples, however the run was interrupted.
    """

    def __init__(self, num_examples: int, batch_size: int, accelerator: Accelerator, seed: int) -> None:
        self.batch_size = batch_size
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.accumulation = accelerator.gradient_accumulation_steps
        self.num_examples = num_examples
        self.seed = seed
        self.updates_per_epoch = num_examples // (batch_size * self.num_processes * self.accumulation)
        if self.updates_per_epoch == 0:
            raise ValueError(
                f"the training split has {num_examples} images, fewer than one optimizer update needs "
                f"(--train_batch_size {batch_size} x {self.num_processes} processes x "
                f"--gradient_accumulation_steps {self.accumulation}); lower --train_batch_size"
            )

    def batches(self, epoch: int, skip_updates: int = 0) -> list[list[int]]:
        """This rank's index batches for `epoch`, leaving out the first `skip_updates` updates."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        global_batch = self.batch_size * self.num_processes
        batches = []
        for start in range(skip_updates * self.accumulation, self.updates_per_epoch * self.accumulation):
            offset = start * global_batch + self.process_index * self.batch_size
            batches.append(order[offset : offset + self.batch_size])
        return batches


class CachedLatents(torch.utils.data.Dataset):
    """The VAE posterior N(μ, σ²) of every training image, encoded once: items {"latent_mean", "latent_logvar",
    "caption"}. Latents are still sampled afresh every step, so caching changes the cost, not the objective."""

    def __init__(self, means: torch.Tensor, logvars: torch.Tensor, captions: list[str]) -> None:
        self.means, self.logvars, self.captions = means, logvars, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latent_mean": self.means[index], "latent_logvar": self.logvars[index], "caption": self.captions[index]}


@torch.no_grad()
def cache_latents(
    dataset: torch.utils.data.Dataset, vae: ScratchAutoencoderKL, accelerator: Accelerator, batch_size: int
) -> CachedLatents:
    """Encode the dataset once, each process a contiguous share of it, and gather the posteriors on every process."""
    means, logvars = [], []
    with accelerator.split_between_processes(list(range(len(dataset)))) as indices:
        starts = range(0, len(indices), batch_size)
        for start in tqdm(starts, desc="caching latents", disable=not accelerator.is_local_main_process):
            pixels = torch.stack([dataset[i]["pixel_values"] for i in indices[start : start + batch_size]])
            posterior = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            logvars.append(posterior.logvar.float().cpu())
    # One tensor pair per process, in rank order. (Gathering per-sample rows, views of their batch, pickled each
    # batch's whole storage once per row: 12 GB on one rank of a 2-process run at 32 px.) An empty share is a
    # 1-D empty tensor, which torch.cat skips.
    shares = gather_object([(torch.cat(means or [torch.empty(0)]), torch.cat(logvars or [torch.empty(0)]))])
    return CachedLatents(
        torch.cat([mean for mean, _ in shares]), torch.cat([logvar for _, logvar in shares]), list(dataset.captions)
    )
