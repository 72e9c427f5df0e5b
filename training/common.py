"""What the three training scripts share: arguments, data, the update loop, checkpoints, EMA and logging.

`train_vae.py`, `train_clip.py` and `train_unet.py` each define a model, a loss and a validation; everything around
them lives here, in the order a run meets it:

1. `build_parser` adds the data, optimisation, checkpointing and logging argument groups; `check_args` validates them
   before anything heavy is loaded.
2. `load_image_text_dataset` reads a local `datasets` folder, checks its columns, and drops (and counts) images that do
   not decode, so one bad file never stops a run.
3. `EpochBatches` fixes the data order: one seeded permutation per epoch, cut into global batches and sharded by rank.
   The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
4. `Trainer` runs the update loop under Accelerate: gradient accumulation, EMA, a tqdm bar with loss and samples/s,
   one JSON line per optimizer step in `<output_dir>/train_log.jsonl`, TensorBoard scalars, and checkpoints; and the
   run's ending: the script's `validate(step)` every --validation_steps steps and after the last, the rank report, and
   the script's `save()` on the main process.
5. Checkpoints (`checkpoints.py`) are `accelerator.save_state` folders written to `.checkpoint-N.partial` and renamed
   to `checkpoint-N` once complete, so a kill during a save never leaves a broken `checkpoint-N` for
   `--resume_from_checkpoint latest`, which also skips a checkpoint damaged later. Accelerate stores every rank's RNG
   state with the weights, the optimizer and the LR schedule, which makes a resumed run bit-identical to an
   uninterrupted one; the EMA is stored as safetensors, and nothing on the resume path unpickles code.
6. A run owns its output folder (a lock file, and no fresh run on top of an old one), and a non-finite loss, gradient
   or weight stops it with a `TrainingDiverged` error naming the step, before anything non-finite is saved.
"""

import argparse
import atexit
import hashlib
import io
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from checkpoints import (
    CHECKPOINT_STATE,
    TRAIN_LOG,
    OutputDirLock,
    TrainingDiverged,
    check_finite,
    check_output_dir,
    clear_run,
    find_resume_checkpoint,
    list_checkpoints,
    load_ema,
    random_states_restorable,
    remove_partial_checkpoints,
    save_checkpoint,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from hf_scratch.metrics import image_to_tensor

logger = get_logger(__name__)

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# ----------------------------------------------------------------------------------------------------------- arguments
def build_parser(description: str, captions: bool = True) -> argparse.ArgumentParser:
    """A parser holding the shared argument groups; each script adds its model and loss arguments to it."""
    parser = argparse.ArgumentParser(description=description)
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", help="an image folder (split folders, each with metadata.jsonl)")
    source.add_argument("--dataset_name", help="a local folder that datasets.load_dataset reads (no hub access)")
    data.add_argument("--image_column", default="image")
    if captions:
        data.add_argument("--caption_column", default="text")
    data.add_argument("--train_split", default="train")
    data.add_argument("--validation_split", default="validation", help='a split name, or "none" to skip it')
    data.add_argument("--resolution", type=int, default=64, help="images are resized and center-cropped to this")
    data.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training images")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=16, help="per process")
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2)
    optim.add_argument(
        "--adam_fused",
        action="store_true",
        help="torch.optim.AdamW(fused=True): one fused kernel over all parameters instead of a loop of ops per tensor "
        "(the same update)",
    )
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides epochs")
    optim.add_argument("--num_train_epochs", type=int, default=1)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="default: accelerate's")
    optim.add_argument("--gradient_checkpointing", action="store_true")
    optim.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights and save it")
    optim.add_argument("--ema_decay", type=float, default=0.9999)
    optim.add_argument("--seed", type=int, default=0)

    ckpt = parser.add_argument_group("checkpointing")
    ckpt.add_argument("--output_dir", required=True)
    ckpt.add_argument("--checkpointing_steps", type=int, default=500)
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N")
    ckpt.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint-N folder, or "latest"')
    ckpt.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start afresh in an --output_dir that holds a run, removing its checkpoints and logs",
    )

    logs = parser.add_argument_group("logging")
    logs.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "none"))
    logs.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    logs.add_argument("--validation_steps", type=int, default=500)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject argument values that would fail later, naming the flag, the value and what is allowed."""
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(
            f"--resolution={args.resolution} is not a positive multiple of 8; the VAE halves the image size in each "
            "down block, so pass e.g. 32, 64 or 512"
        )
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps={args.max_train_steps} must be at least 1 (or unset, to train epochs)")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise ValueError(f"--learning_rate={args.learning_rate} must be a positive number, e.g. 1e-4")
    if args.lr_warmup_steps < 0 or (args.max_train_steps is not None and args.lr_warmup_steps > args.max_train_steps):
        raise ValueError(
            f"--lr_warmup_steps={args.lr_warmup_steps} must be between 0 and --max_train_steps={args.max_train_steps}"
        )
    if not 0 < args.ema_decay < 1:
        raise ValueError(f"--ema_decay={args.ema_decay} must lie strictly between 0 and 1, e.g. 0.999")
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0):
        raise ValueError(f"--max_grad_norm={args.max_grad_norm} must be a non-negative number (0 turns clipping off)")
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit={args.checkpoints_total_limit} must be at least 1 (or unset)")
    if args.max_train_steps is None and args.num_train_epochs < 1:
        raise ValueError(
            f"--num_train_epochs={args.num_train_epochs} must be at least 1 when --max_train_steps is unset"
        )
    if args.resume_from_checkpoint != "latest":  # "latest" is resolved (and broken checkpoints reported) at resume
        find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)


# ---------------------------------------------------------------------------------------------------------------- data
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


# ---------------------------------------------------------------------------------------------------------- accelerate
def create_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator logging to <output_dir>/<logging_dir>, with INFO logs on the main process only."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    if not accelerator.is_main_process:
        for name in ("datasets", "transformers", "diffusers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        lock = OutputDirLock(args.output_dir)
        lock.acquire()
        atexit.register(lock.release)
        if args.overwrite_output_dir and args.resume_from_checkpoint is None:
            clear_run(args.output_dir)
    accelerator.wait_for_everyone()
    return accelerator


def create_optimizer(
    args: argparse.Namespace, parameters: Any, updates_per_epoch: int, accelerator: Accelerator
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and the LR schedule; fills in args.max_train_steps / args.num_train_epochs from each other."""
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    optimizer = torch.optim.AdamW(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=True if args.adam_fused else None,  # None: torch's default, the multi-tensor (foreach) loop
    )
    # A prepared scheduler steps once per process for every optimizer step, hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler


def optimizer_step(
    accelerator: Accelerator,
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    max_grad_norm: float,
) -> None:
    """Backward, and on the last micro-batch of an accumulation window clip, step and reset the gradients.

    A non-finite gradient norm (a non-finite loss gives one) raises `TrainingDiverged` before the optimizer touches
    the weights. The check is on the all-reduced gradients, so every process stops at the same step."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        parameters = [p for p in model.parameters() if p.grad is not None]
        if max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in parameters]))
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"the gradient norm is {float(grad_norm)} (this micro-batch's loss is {loss.detach().float().item()})"
            )
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state-dict order: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """`args` with values TensorBoard's hparams accept (numbers, strings, booleans)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


# -------------------------------------------------------------------------------------------------------------- loop
class Trainer:
    """The update loop shared by the scripts: data order, accumulation, EMA, progress, logs, checkpoints, resume.

    A script prepares its models and optimizers with `accelerator.prepare`, builds a `Trainer`, calls `resume`, and
    ends with `run(train_step, save, validate)` (see `run`).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        args: argparse.Namespace,
        dataset: torch.utils.data.Dataset,
        batches: EpochBatches,
        model: torch.nn.Module,
        lr_scheduler: Any,
        collate_fn: Callable[[list], dict[str, Any]] = collate,
    ) -> None:
        self.accelerator = accelerator
        self.args = args
        self.dataset = dataset
        self.epoch_batches = batches
        self.model = model
        self.lr_scheduler = lr_scheduler
        self.collate_fn = collate_fn
        self.output_dir = Path(args.output_dir)
        self.global_step = 0
        self.ema = None
        if args.use_ema:
            unwrapped = accelerator.unwrap_model(model)
            # Saved by `save_checkpoint` as safetensors; accelerate's own custom-object checkpoint would be a pickle.
            self.ema = EMAModel(unwrapped.parameters(), decay=args.ema_decay)
        self.samples_per_update = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        self.wall_seconds = 0.0
        self.initial_checksum = parameter_checksum(accelerator.unwrap_model(model))

    def resume(self) -> None:
        """Seed this rank's RNG, then, if asked, restore the full state (RNG included) of a checkpoint."""
        set_seed(self.args.seed, device_specific=True)
        remove_partial_checkpoints(self.accelerator, self.output_dir)
        path = find_resume_checkpoint(self.output_dir, self.args.resume_from_checkpoint)
        if path is None:
            if self.args.resume_from_checkpoint == "latest":
                logger.info(f"no checkpoint in {self.output_dir}; starting from scratch")
            kept = []
        else:
            logger.info(f"resuming from {path}")
            self.accelerator.load_state(str(path))
            try:
                check_finite(self.accelerator.unwrap_model(self.model), f"refusing to resume from {path}")
            except TrainingDiverged as error:
                raise ValueError(f"{error}; resume from an earlier checkpoint-N folder") from None
            if self.ema is not None:
                load_ema(self.ema, path)
            self.global_step = json.loads((path / CHECKPOINT_STATE).read_text())["global_step"]
            kept = [row for row in self._read_log() if row["step"] <= self.global_step]
            problem = random_states_restorable(path, self.accelerator.process_index)
            if problem is not None:
                message = f"the random states were not restored, so the run will not repeat bit for bit: {problem}"
                logger.warning(message, main_process_only=False)
                kept.append({"step": self.global_step, "warning": message})
        if self.accelerator.is_main_process:
            with open(self.output_dir / TRAIN_LOG, "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in kept)

    def _read_log(self) -> list[dict[str, Any]]:
        path = self.output_dir / TRAIN_LOG
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def _batches(self, epoch: int, skip_updates: int) -> Iterator[dict[str, Any]]:
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self.epoch_batches.batches(epoch, skip_updates),
                collate_fn=self.collate_fn,
                num_workers=self.args.dataloader_num_workers,
                # Its own generator, so building a loader never draws from the global RNG that a checkpoint restores.
                generator=torch.Generator().manual_seed(self.args.seed),
            )
        )

    def run(
        self,
        train_step: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        save: Callable[[], None],
        validate: Callable[[int], None] | None = None,
        on_update: Callable[[int], None] | None = None,
    ) -> None:
        """Train to --max_train_steps, then end the run: write the rank report, `save()` the result on the main
        process, and close the trackers.

        `train_step(batch) -> {name: scalar tensor}` does one micro-batch (forward, backward, optimizer step inside
        `accelerator.accumulate`); the tensors are logged. `validate(step)` runs on the main process, while the others
        wait, every --validation_steps optimizer steps and after the last one. `on_update(step)` runs on every process
        after each optimizer step, before that step's validation (snapshots, say).
        """

        def after_update(step: int) -> None:
            if on_update is not None:
                on_update(step)
            if validate is not None and step % self.args.validation_steps == 0:
                self.on_main_process(validate, step)

        self._update_loop(train_step, after_update)
        if validate is not None and self.global_step % self.args.validation_steps:
            self.on_main_process(validate, self.global_step)
        self.write_rank_report()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save()
        self.accelerator.end_training()

    def on_main_process(self, work: Callable[..., None], *args: Any) -> None:
        """`work(*args)` on the main process while the other processes wait for it."""
        if self.accelerator.is_main_process:
            work(*args)
        self.accelerator.wait_for_everyone()

    def _update_loop(
        self, train_step: Callable[[dict[str, Any]], dict[str, torch.Tensor]], after_update: Callable[[int], None]
    ) -> None:
        args, accelerator = self.args, self.accelerator
        updates_per_epoch = self.epoch_batches.updates_per_epoch
        progress = tqdm(
            total=args.max_train_steps,
            initial=self.global_step,
            desc="steps",
            disable=not accelerator.is_local_main_process,
        )
        start, start_step = time.perf_counter(), self.global_step
        window: dict[str, list[torch.Tensor]] = {}
        for epoch in range(self.global_step // updates_per_epoch, args.num_train_epochs):
            skip = self.global_step - epoch * updates_per_epoch if epoch == self.global_step // updates_per_epoch else 0
            for batch in self._batches(epoch, skip):
                try:
                    outputs = train_step(batch)
                except TrainingDiverged as error:
                    last_good = list_checkpoints(self.output_dir)
                    raise TrainingDiverged(
                        f"training diverged at step {self.global_step + 1}: {error}. Nothing was saved from this step; "
                        f"the last good checkpoint is {last_good[-1] if last_good else 'none'}. Lower --learning_rate, "
                        "raise --lr_warmup_steps or set --max_grad_norm, then resume."
                    ) from None
                for name, value in outputs.items():
                    window.setdefault(name, []).append(value.detach().float())
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                if self.ema is not None:
                    self.ema.step(accelerator.unwrap_model(self.model).parameters())
                # Mean over the accumulation window on this rank, then over ranks.
                logs = {
                    k: accelerator.reduce(torch.stack(v).mean(), reduction="mean").item() for k, v in window.items()
                }
                window.clear()
                self.wall_seconds = time.perf_counter() - start
                samples_per_s = (self.global_step - start_step) * self.samples_per_update / self.wall_seconds
                logs.update(lr=self.lr_scheduler.get_last_lr()[0], samples_per_s=samples_per_s, epoch=epoch)
                self._log(logs)
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", samples_per_s=f"{samples_per_s:.1f}")
                if self.global_step % args.checkpointing_steps == 0 or self.global_step == args.max_train_steps:
                    limit = args.checkpoints_total_limit
                    save_checkpoint(accelerator, self.output_dir, self.global_step, limit, self.model, self.ema)
                after_update(self.global_step)
                if self.global_step >= args.max_train_steps:
                    break
            if self.global_step >= args.max_train_steps:
                break
        progress.close()

    def _log(self, logs: dict[str, float]) -> None:
        self.accelerator.log(logs, step=self.global_step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / TRAIN_LOG, "a") as handle:
                handle.write(json.dumps({"step": self.global_step, **logs}) + "\n")

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights into the model for the block (validation, saving); a no-op without --use_ema."""
        if self.ema is None:
            yield
            return
        parameters = list(self.accelerator.unwrap_model(self.model).parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def write_rank_report(self, **extra: Any) -> None:
        """`<output_dir>/ranks/rank-<i>.json`: world size and checksums of the weights before and after training.

        Equal final checksums on every rank show that the gradients were all-reduced; a final checksum that differs
        from the initial one shows that the weights moved.
        """
        report = {
            "rank": self.accelerator.process_index,
            "world_size": self.accelerator.num_processes,
            "global_step": self.global_step,
            "initial_checksum": self.initial_checksum,
            "final_checksum": parameter_checksum(self.accelerator.unwrap_model(self.model)),
            **extra,
        }
        folder = self.output_dir / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{report['rank']}.json").write_text(json.dumps(report, indent=2))

    def compute_summary(self) -> dict[str, Any]:
        """What the run cost, for model cards: steps, samples, wall time, throughput, processes and CPU."""
        log = [row for row in self._read_log() if "samples_per_s" in row]
        return {
            "optimizer_steps": self.global_step,
            "samples_per_step": self.samples_per_update,
            "wall_seconds_this_session": round(self.wall_seconds, 1),
            "samples_per_s": round(log[-1]["samples_per_s"], 2) if log else None,
            "processes": self.accelerator.num_processes,
            "device": f"{self.accelerator.device.type} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads per process)",
            "command": "accelerate launch " + shlex.join(sys.argv),
        }
