"""Training data: a local dataset read as (image, caption) pairs, the epoch order, and the latent cache.

1. `load_image_text_dataset` reads a split of --train_data_dir / --dataset_name through `sources.load_splits` (which
   knows the kinds of input), and `image_text_dataset` scans it, dropping (and counting) images that do not open, so
   one bad file never stops a run. The scan reads the files' headers only, in small batches, and keeps no bytes.
2. `ImageTextDataset` reads and decodes one row per item from the memory-mapped Arrow table: {"pixel_values" in
   [-1, 1], "caption"}. Indexed by `(epoch, index)`, as `EpochBatches` does, it augments (--random_flip,
   --random_crop) with a generator seeded by (seed, epoch, index): a resumed run sees the same flips and crops, and no
   global RNG is drawn. Indexed by a plain int (validation, the latent cache) it gives the centre crop, unflipped.
   `collate` stacks rows into a batch.
3. `EpochBatches` fixes the data order: one seeded permutation per epoch, cut into global batches and sharded by rank.
   The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
4. `cache_latents` encodes the images once with the frozen VAE, for the U-Net's training (both orientations when
   --random_flip is on).

With --streaming the training split is read by `streaming.ImageTextStream` instead (the same batch structure, from a
`datasets.IterableDataset`); a validation split is then streamed once and kept (it should be small).
"""

import argparse
import hashlib
import io
import json
import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hf_scratch.metrics import image_to_tensor
from hf_scratch.models.vae import ScratchAutoencoderKL
from hf_scratch.training.checkpoints import parameter_checksum
from hf_scratch.training.sources import load_splits

logger = get_logger(__name__)
# Items are read on every rank and in DataLoader workers, where accelerate's logger may have no state: plain logging.
item_logger = logging.getLogger(__name__)

SCAN_BATCH = 16  # rows whose image cells the decodability scan holds at once
Index = int | tuple[int, int]  # a row, or (epoch, row) for the augmented view


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def save_validation_grid(grid: Image.Image, step: int, output_dir: str | Path, accelerator: Accelerator) -> None:
    """A validation grid as <output_dir>/validation/step-N.png, and in TensorBoard when it is a tracker."""
    folder = Path(output_dir, "validation")
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")


def _open(cell: dict[str, Any] | None) -> Image.Image:
    """Open an undecoded `datasets.Image` cell ({"bytes", "path"}), reading the header only; Pillow's
    decompression-bomb warning is an error."""
    if cell is None or not (cell.get("bytes") or cell.get("path")):
        raise ValueError("the row has no image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])


def _decode(cell: dict[str, Any] | None) -> Image.Image:
    """The cell's image with its pixels loaded."""
    image = _open(cell)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image.load()
    return image


def augmentation_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one item's augmentation: a pure function of (seed, epoch, index). Its first draw decides the
    flip, the next ones the crop."""
    return random.Random(f"{seed}:{epoch}:{index}")


def is_flipped(seed: int, epoch: int, index: int) -> bool:
    """Whether --random_flip mirrors item `index` in `epoch` (p = 0.5)."""
    return augmentation_rng(seed, epoch, index).random() < 0.5


def image_to_pixels(
    image: Image.Image, resolution: int, rng: random.Random | None = None, flip: bool = False
) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: a square of the short side's length, the centre one (`rng` None) or one at a random place
    drawn from `rng`, resized to R by `hf_scratch.metrics.image_to_tensor`, then mirrored left-right if `flip`.

    Cropping the square before resizing takes the same window as diffusers' resize-then-`RandomCrop`, placed to the
    source pixel."""
    if rng is not None:
        side = min(image.size)
        left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
        image = image.crop((left, top, left + side, top + side))
    pixels = image_to_tensor(image, resolution) * 2 - 1  # (3, R, R)
    return pixels.flip(-1) if flip else pixels


class ImageTextDataset(torch.utils.data.Dataset):
    """A split whose images all open: items are {"pixel_values": (3, R, R) in [-1, 1], "caption": str}, the pixels
    those of `hf_scratch.metrics.image_to_tensor` mapped to the models' range by 2x − 1.

    Holds the memory-mapped split and the captions (`captions`, a list of str), never the images: each item reads and
    decodes its row. `dataset[i]` is the plain view (centre crop, unflipped); `dataset[(epoch, i)]` the training view,
    augmented as --random_flip / --random_crop ask, seeded by (seed, epoch, i)."""

    def __init__(
        self,
        split: datasets.Dataset,
        image_column: str,
        caption_column: str | None,
        resolution: int,
        num_skipped: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.images = split.select_columns([image_column])
        self.image_column = image_column
        self.captions = list(split[caption_column]) if caption_column else [""] * len(split)
        self.resolution = resolution
        self.num_skipped = num_skipped
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: Index) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (None, index)
        image = self._decode_from(index)
        rng = None if epoch is None else augmentation_rng(self.seed, epoch, index)
        flip = rng is not None and rng.random() < 0.5 and self.random_flip
        crop_rng = None if rng is None or self.center_crop else rng
        return {
            "pixel_values": image_to_pixels(image, self.resolution, crop_rng, flip),
            "caption": self.captions[index],
        }

    def _decode_from(self, index: int) -> Image.Image:
        """Row `index`'s image; should its pixels not decode (the scan reads headers only), the next row's that do."""
        for offset in range(len(self)):
            cell = self.images[(index + offset) % len(self)][self.image_column]
            try:
                return _decode(cell)
            except Exception as error:  # Pillow's plugins raise many types for a broken file
                item_logger.warning(
                    f"image {(cell or {}).get('path') or index + offset} does not decode ({error}); using the next"
                )
        raise ValueError(f"no image of this split decodes (from row {index} on)")


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and keep strings as lists."""
    return {
        key: torch.stack([e[key] for e in examples])
        if torch.is_tensor(examples[0][key])
        else [e[key] for e in examples]
        for key in examples[0]
    }


def image_text_dataset(
    split: datasets.Dataset,
    image_column: str,
    caption_column: str | None,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    seed: int = 0,
    name: str = "the split",
) -> ImageTextDataset:
    """An `ImageTextDataset` of the rows of `split` (from `sources.load_splits`) whose image opens; the others are
    skipped with a warning and counted in `num_skipped`. `name` names the split in messages."""
    if isinstance(split.features.get(image_column), datasets.Image) and split.features[image_column].decode:
        split = split.cast_column(image_column, datasets.Image(decode=False))  # rows read as {"bytes", "path"}
    decodable = []
    for start in range(0, len(split), SCAN_BATCH):
        cells = split[start : start + SCAN_BATCH][image_column]
        for index, cell in enumerate(cells, start=start):
            try:
                with _open(cell) as image:
                    image.verify()  # PNG: every chunk's CRC; other formats: the header; no pixel is decoded
                decodable.append(index)
            except Exception as error:  # Pillow's plugins raise many types for a broken file
                where = (cell or {}).get("path") or f"row {index}"
                logger.warning(f"skipping image {where} of {name}: {type(error).__name__}: {error}")
    skipped = len(split) - len(decodable)
    if skipped:
        logger.warning(f"skipped {skipped} of {len(split)} images of {name} that do not open")
        split = split.select(decodable)
    if len(split) == 0:
        raise ValueError(f"{name} has no decodable image")
    return ImageTextDataset(split, image_column, caption_column, resolution, skipped, center_crop, random_flip, seed)


def load_image_text_dataset(
    args: argparse.Namespace, split: str, accelerator: Accelerator, limit: int | None = None
) -> ImageTextDataset:
    """Load `split` of --train_data_dir or --dataset_name (any source `sources.load_splits` reads), check its columns
    and rows, and skip images that do not open. The augmentations apply to the training split only."""
    source_flag = "train_data_dir" if args.train_data_dir else "dataset_name"
    source = getattr(args, source_flag)
    caption_column = getattr(args, "caption_column", None)
    streaming = getattr(args, "streaming", False)
    with accelerator.main_process_first():
        splits = load_splits(source, args.image_column, caption_column, flag=f"--{source_flag}", streaming=streaming)
    if split not in splits:
        which = "--validation_split" if split == getattr(args, "validation_split", None) else "--train_split"
        advice = (
            " (or pass --validation_split none to train without validation)" if which == "--validation_split" else ""
        )
        raise ValueError(
            f"{which}={split!r} is not a split of --{source_flag}={source!r}; available splits: "
            f"{', '.join(splits)}{advice}"
        )
    data = splits[split]
    if streaming:  # read this split whole (the training split streams through streaming.ImageTextStream instead)
        data = datasets.Dataset.from_list(list(data), features=data.features)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    training = split == getattr(args, "train_split", "train")
    return image_text_dataset(
        data,
        args.image_column,
        caption_column,
        args.resolution,
        center_crop=getattr(args, "center_crop", True) or not training,
        random_flip=getattr(args, "random_flip", False) and training,
        seed=args.seed,
        name=f"split {split!r} of --{source_flag}={source!r}",
    )


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

    def batches(self, epoch: int, skip_updates: int = 0) -> list[list[tuple[int, int]]]:
        """This rank's batches for `epoch`, leaving out the first `skip_updates` updates: each item an (epoch, index)
        pair, so the dataset can seed the item's augmentation by the epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        global_batch = self.batch_size * self.num_processes
        batches = []
        for start in range(skip_updates * self.accumulation, self.updates_per_epoch * self.accumulation):
            offset = start * global_batch + self.process_index * self.batch_size
            batches.append([(epoch, index) for index in order[offset : offset + self.batch_size]])
        return batches


class CachedLatents(torch.utils.data.Dataset):
    """The VAE posterior N(μ, σ²) of every training image, encoded once: items {"latent_mean", "latent_logvar",
    "caption"}. Latents are still sampled afresh every step, so caching changes the cost, not the objective. With
    --random_flip the mirrored images' posteriors are cached too, and item (epoch, i) takes the orientation that
    `ImageTextDataset` would have drawn."""

    def __init__(
        self,
        means: torch.Tensor,
        logvars: torch.Tensor,
        captions: list[str],
        flipped: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        self.means, self.logvars, self.captions = means, logvars, captions
        self.flipped, self.seed = flipped, seed

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: Index) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (None, index)
        means, logvars = self.means, self.logvars
        if self.flipped is not None and epoch is not None and is_flipped(self.seed, epoch, index):
            means, logvars = self.flipped
        return {"latent_mean": means[index], "latent_logvar": logvars[index], "caption": self.captions[index]}


def latent_cache_key(dataset: ImageTextDataset, vae: ScratchAutoencoderKL) -> str:
    """What the cached posteriors depend on, hashed: the rows (the split's `datasets` fingerprint, its length and
    captions), the pixels' resolution, crop and flips, and every weight of the VAE."""
    settings = [dataset.images._fingerprint, len(dataset), dataset.resolution, dataset.center_crop, dataset.random_flip]
    rows = json.dumps(settings + dataset.captions).encode()
    return hashlib.sha256(rows + parameter_checksum(vae).encode()).hexdigest()[:24]


@torch.no_grad()
def cache_latents(
    dataset: ImageTextDataset,
    vae: ScratchAutoencoderKL,
    accelerator: Accelerator,
    batch_size: int,
    cache_dir: str | Path | None = None,
) -> CachedLatents:
    """Encode the dataset once, each process a contiguous share of it, and give every process all the posteriors.

    With `cache_dir`, each process writes its share to `cache_dir/<key>/rank-<i>-of-<n>.safetensors` (`key` from
    `latent_cache_key`), the main process then `index.json`, and every process reads the shards back; a later run,
    a resume or another rank count finds the index and encodes nothing."""
    if not dataset.center_crop:
        raise ValueError(
            "--random_crop draws a new crop every epoch, which latents cached once cannot hold; drop --cache_latents "
            "or --random_crop"
        )
    orientations = (False, True) if dataset.random_flip else (False,)
    folder = Path(cache_dir, latent_cache_key(dataset, vae)) if cache_dir is not None else None
    if folder is not None and (folder / LATENT_INDEX).is_file():
        logger.info(f"reading the latents of {len(dataset)} images from {folder}", main_process_only=False)
        return _read_latent_cache(folder, dataset, orientations)
    means, logvars = {flip: [] for flip in orientations}, {flip: [] for flip in orientations}
    with accelerator.split_between_processes(list(range(len(dataset)))) as indices:
        starts = range(0, len(indices), batch_size)
        for start in tqdm(starts, desc="caching latents", disable=not accelerator.is_local_main_process):
            pixels = torch.stack([dataset[i]["pixel_values"] for i in indices[start : start + batch_size]])
            for flip in orientations:
                posterior = vae.encode((pixels.flip(-1) if flip else pixels).to(accelerator.device, vae.dtype))
                means[flip].append(posterior.latent_dist.mean.float().cpu())
                logvars[flip].append(posterior.latent_dist.logvar.float().cpu())
    # One tensor pair per process and orientation. An empty share is a 1-D empty tensor, which torch.cat skips.
    share = {
        flip: (torch.cat(means[flip] or [torch.empty(0)]), torch.cat(logvars[flip] or [torch.empty(0)]))
        for flip in orientations
    }
    if folder is not None:
        _write_latent_cache(folder, share, accelerator)
        return _read_latent_cache(folder, dataset, orientations)
    # In rank order. (Gathering per-sample rows, views of their batch, pickled each batch's whole storage once per
    # row: 12 GB on one rank of a 2-process run at 32 px.)
    shares = gather_object([share])
    gathered = {
        flip: (torch.cat([share[flip][0] for share in shares]), torch.cat([share[flip][1] for share in shares]))
        for flip in orientations
    }
    return CachedLatents(*gathered[False], list(dataset.captions), gathered.get(True), dataset.seed)


LATENT_INDEX = "index.json"


def _write_latent_cache(
    folder: Path, share: dict[bool, tuple[torch.Tensor, torch.Tensor]], accelerator: Accelerator
) -> None:
    """This process's share as safetensors (written under a temporary name, then renamed), then the index."""
    rank, world = accelerator.process_index, accelerator.num_processes
    folder.mkdir(parents=True, exist_ok=True)
    name = f"rank-{rank}-of-{world}.safetensors"
    tensors = {f"{kind}.{int(flip)}": pair[i].contiguous() for flip, pair in share.items()
               for i, kind in enumerate(("mean", "logvar"))}  # fmt: skip
    save_file(tensors, folder / f".{name}.partial")
    os.replace(folder / f".{name}.partial", folder / name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = [f"rank-{i}-of-{world}.safetensors" for i in range(world)]
        (folder / f".{LATENT_INDEX}.partial").write_text(json.dumps({"shards": shards}))
        os.replace(folder / f".{LATENT_INDEX}.partial", folder / LATENT_INDEX)
    accelerator.wait_for_everyone()


def _read_latent_cache(folder: Path, dataset: ImageTextDataset, orientations: tuple[bool, ...]) -> CachedLatents:
    shards = [load_file(folder / name) for name in json.loads((folder / LATENT_INDEX).read_text())["shards"]]
    pairs = {
        flip: tuple(torch.cat([shard[f"{kind}.{int(flip)}"] for shard in shards]) for kind in ("mean", "logvar"))
        for flip in orientations
    }
    if len(pairs[False][0]) != len(dataset):
        raise ValueError(f"the latent cache {folder} holds {len(pairs[False][0])} images, the data {len(dataset)}")
    return CachedLatents(*pairs[False], list(dataset.captions), pairs.get(True), dataset.seed)


COUPLING_INDEX = "index.json"


class CoupledLatents(torch.utils.data.Dataset):
    """Reflow's coupling (Liu et al. 2022, arXiv:2209.03003, Sec. 2.3): a teacher's endpoint z_0 = ODE[v](ε) and the
    noise ε it started from, with the caption it was drawn for; items {"latents", "coupled_noise", "caption"}, read
    from the shards `training/reflow.py` writes (the folder's `index.json` lists them)."""

    num_skipped = 0  # (the pairs hold latents: no image is read)

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / COUPLING_INDEX).is_file():
            raise ValueError(
                f"--reflow_pairs={str(folder)!r} has no {COUPLING_INDEX}: draw the pairs first with "
                "`python training/reflow.py --out FOLDER` (a re-run finishes an interrupted one)"
            )
        noise, latents, self.captions = [], [], []
        for name in json.loads((folder / COUPLING_INDEX).read_text())["shards"]:
            with safe_open(folder / name, "pt") as shard:
                noise.append(shard.get_tensor("noise"))
                latents.append(shard.get_tensor("latents"))
                self.captions += json.loads(shard.metadata()["captions"])
        self.noise, self.latents = torch.cat(noise), torch.cat(latents)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: Index) -> dict[str, Any]:
        index = index[1] if isinstance(index, tuple) else index
        return {"latents": self.latents[index], "coupled_noise": self.noise[index], "caption": self.captions[index]}
