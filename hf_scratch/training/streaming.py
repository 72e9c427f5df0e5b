"""--streaming: training data read as a `datasets.IterableDataset`, never converted to Arrow nor held in memory.

`sources.load_splits(..., streaming=True)` gives the stream of undecoded rows; `ImageTextStream` turns it into the
run's batches with the structure `data.EpochBatches` gives an in-memory split, so the rest of the trainer is the same:

- **An epoch is one pass over the stream**, in an order shuffled per epoch: `IterableDataset.shuffle(seed=--seed,
  buffer_size=--shuffle_buffer_size)` with `set_epoch(epoch)` (shards in a seeded order, rows through a seeded buffer),
  a pure function of (seed, epoch).
- **Its length is fixed before training**: one pass at start counts the rows (reading no pixel), and the epoch is that
  many rows cut into global batches of `--train_batch_size x processes`, truncated to whole optimizer updates, as
  `EpochBatches` does; or `--streaming_epoch_updates N` sets it (no counting pass; the rest of a longer pass is unused
  in that epoch, and a shorter one stops with an error). The number is recorded in every checkpoint's settings, so a
  resume on a stream of another length is refused.
- **So the position is global_step**: the epoch is global_step // updates_per_epoch and the updates done in it the
  remainder. A resumed run reads its epoch's stream from the start, skips the rows of the updates already done (read,
  not decoded), and then sees exactly the batches an uninterrupted run would.
- **Split by rank at the global batch**: every rank reads the same stream and decodes only its own slice of each global
  batch (rank r takes rows r*B .. (r+1)*B-1), the rule `EpochBatches` follows. `datasets.distributed.
  split_dataset_by_node` is not used: with a shard count divisible by the processes it hands each rank whole shards,
  reassigned every epoch by the shard shuffle, so ranks would see different row counts (a DDP step waiting on a rank
  that has run out) and an epoch's length would change with the epoch, which exact resume cannot follow.
- **Decoded lazily**: a row's image is read and decoded only when its batch is built, augmented like
  `ImageTextDataset` (--random_flip, --random_crop) with the generator of (seed, epoch, position in the stream). An
  image that does not decode is replaced by the next one of the same batch slice that does, with a warning.

Memory holds the shuffle buffer's undecoded rows and one global batch, whatever the size of the data.
"""

import argparse
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import datasets
from accelerate import Accelerator

from hf_scratch.training.data import _decode, augmentation_rng, image_to_pixels
from hf_scratch.training.sources import load_splits

logger = logging.getLogger(__name__)  # items are read on every rank


class ImageTextStream:
    """The training split as a stream: the `dataset` and the `batches` the `Trainer` takes, in one object.

    `batches(epoch, skip_updates, collate_fn)` yields this rank's collated micro-batches of `epoch`, leaving out the
    first `skip_updates` optimizer updates; `updates_per_epoch` and `len()` (the rows an epoch uses) are known before
    training. `head(count)` gives the first rows of the unshuffled stream in the plain view (centre crop, unflipped),
    for what a script computes over a few training images (the VAE's latent scale)."""

    def __init__(
        self,
        stream: datasets.IterableDataset,
        image_column: str,
        caption_column: str | None,
        resolution: int,
        batch_size: int,
        accelerator: Accelerator,
        seed: int = 0,
        buffer_size: int = 1000,
        epoch_updates: int | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        name: str = "the stream",
    ) -> None:
        self.stream = stream.cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.caption_column = image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.batch_size, self.seed, self.buffer_size, self.name = batch_size, seed, buffer_size, name
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.accumulation = accelerator.gradient_accumulation_steps
        self.rows_per_update = batch_size * self.num_processes * self.accumulation
        self.num_skipped = 0  # images met that did not decode, on this rank, in this session
        if epoch_updates is None:
            rows = self.count_rows()
            epoch_updates = rows // self.rows_per_update
            if epoch_updates == 0:
                raise ValueError(
                    f"{name} holds {rows} rows, fewer than one optimizer update needs (--train_batch_size "
                    f"{batch_size} x {self.num_processes} processes x --gradient_accumulation_steps "
                    f"{self.accumulation}); lower --train_batch_size"
                )
        self.updates_per_epoch = epoch_updates

    def count_rows(self) -> int:
        """The rows of one pass, read without their images' pixels (a path, or bytes left undecoded)."""
        column = self.caption_column or self.image_column
        return sum(1 for _ in self.stream.select_columns([column]))

    def __len__(self) -> int:
        return self.updates_per_epoch * self.rows_per_update

    def epoch_rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The rows of `epoch`, undecoded, in its shuffled order: a pure function of (seed, epoch)."""
        shuffled = self.stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        shuffled.set_epoch(epoch)
        return iter(shuffled)

    def batches(
        self, epoch: int, skip_updates: int, collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]]
    ) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of `epoch` after the first `skip_updates` updates, each `collate_fn` of its
        decoded items."""
        global_batch = self.batch_size * self.num_processes
        first = skip_updates * self.accumulation
        rows = self.epoch_rows(epoch)
        skipped = sum(1 for _ in itertools.islice(rows, first * global_batch))  # read, not decoded
        for micro_batch in range(first, self.updates_per_epoch * self.accumulation):
            chunk = list(itertools.islice(rows, global_batch))
            if skipped < first * global_batch or len(chunk) < global_batch:
                found = skipped + (micro_batch - first) * global_batch + len(chunk)
                raise ValueError(
                    f"{self.name} ended after {found} rows in epoch {epoch}, before the "
                    f"{self.updates_per_epoch} updates of --streaming_epoch_updates "
                    f"({self.updates_per_epoch * self.rows_per_update} rows); lower --streaming_epoch_updates, or "
                    "leave it unset to count the stream's rows"
                )
            start = micro_batch * global_batch + self.process_index * self.batch_size
            mine = chunk[self.process_index * self.batch_size : (self.process_index + 1) * self.batch_size]
            yield collate_fn([self.item(mine, offset, epoch, start + offset) for offset in range(len(mine))])

    def item(self, rows: list[dict[str, Any]], offset: int, epoch: int | None, position: int) -> dict[str, Any]:
        """{"pixel_values", "caption"} of `rows[offset]`, augmented by (seed, epoch, position) unless `epoch` is None;
        should its image not decode, the next row's of `rows` that does."""
        image = None
        for step in range(len(rows)):
            cell = rows[(offset + step) % len(rows)][self.image_column]
            try:
                image = _decode(cell)
                break
            except Exception as error:  # Pillow's plugins raise many types for a broken file
                self.num_skipped += 1
                where = (cell or {}).get("path") or f"row {position + step} of epoch {epoch}"
                logger.warning(f"image {where} of {self.name} does not decode ({error}); using the next one")
        if image is None:
            raise ValueError(f"no image of a batch of {self.name} decodes (epoch {epoch}, row {position})")
        rng = None if epoch is None else augmentation_rng(self.seed, epoch, position)
        flip = rng is not None and rng.random() < 0.5 and self.random_flip
        crop_rng = None if rng is None or self.center_crop else rng
        caption = rows[offset][self.caption_column] if self.caption_column else ""
        return {"pixel_values": image_to_pixels(image, self.resolution, crop_rng, flip), "caption": caption}

    def head(self, count: int) -> list[dict[str, Any]]:
        """The first `count` rows of the unshuffled stream, decoded in the plain view."""
        rows = list(itertools.islice(iter(self.stream), count))
        return [self.item(rows, offset, None, offset) for offset in range(len(rows))]


def load_image_text_stream(args: argparse.Namespace, accelerator: Accelerator) -> ImageTextStream:
    """--train_split of --train_data_dir / --dataset_name as an `ImageTextStream` (see the module docstring)."""
    source_flag = "train_data_dir" if args.train_data_dir else "dataset_name"
    source = getattr(args, source_flag)
    caption_column = getattr(args, "caption_column", None)
    splits = load_splits(source, args.image_column, caption_column, flag=f"--{source_flag}", streaming=True)
    if args.train_split not in splits:
        raise ValueError(
            f"--train_split={args.train_split!r} is not a split of --{source_flag}={source!r}; available splits: "
            f"{', '.join(splits)}"
        )
    stream = splits[args.train_split]
    if args.max_train_samples is not None:
        stream = stream.take(args.max_train_samples)
    return ImageTextStream(
        stream,
        args.image_column,
        caption_column,
        args.resolution,
        args.train_batch_size,
        accelerator,
        seed=args.seed,
        buffer_size=args.shuffle_buffer_size,
        epoch_updates=args.streaming_epoch_updates,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        name=f"split {args.train_split!r} of --{source_flag}={source!r} (streamed)",
    )
