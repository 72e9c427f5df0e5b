"""The update loop every training script shares, under Accelerate: optimizer, accumulation, EMA, progress, logs,
checkpoints and resume.

`train_vae.py`, `train_clip.py` and `train_unet.py` each define a model, a loss and a validation; the loop around them
lives here:

1. `create_accelerator` claims the output folder (a lock, and no fresh run on top of an old one) and sets up logging
   (with --fsdp it hands accelerate `fsdp_plugin()`, and refuses a launch where accelerate would not shard);
   `with_run_length` fills in the run's steps and epochs, and `create_optimizer` builds AdamW and the LR schedule.
2. `Trainer.resume` seeds the run, or restores a checkpoint's full state (RNG included): a resumed run is
   bit-identical to an uninterrupted one, and resuming a finished run trains nothing.
3. `Trainer.run` trains to --max_train_steps: gradient accumulation, EMA, a tqdm bar with loss and samples/s, one JSON
   line per optimizer step in `<output_dir>/train_log.jsonl`, TensorBoard scalars, and checkpoints
   (`checkpoints.py`); then the script's `validate(step)`, the rank report, and the script's `save()` on the main
   process.
4. A non-finite loss, gradient or weight stops the run with a `TrainingDiverged` error naming the step, before
   anything non-finite is saved.
"""

import argparse
import atexit
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
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from hf_scratch.models import unet as unet_module
from hf_scratch.training.checkpoints import (
    TRAIN_LOG,
    OutputDirLock,
    TrainingDiverged,
    check_finite,
    clear_run,
    find_resume_checkpoint,
    finished_step,
    list_checkpoints,
    load_ema,
    mark_finished,
    parameter_checksum,
    random_states_restorable,
    read_checkpoint_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from hf_scratch.training.data import EpochBatches, collate
from hf_scratch.training.streaming import ImageTextStream

logger = get_logger(__name__)

# Flags a resumed run may change without changing its result: where things are written and read, how often it
# checkpoints, validates and logs. Every other flag is recorded in each checkpoint and must match on resume.
RESUME_FREE_FLAGS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "report_to", "logging_dir", "checkpointing_steps",
    "checkpoints_total_limit", "dataloader_num_workers", "validation_steps", "validation_prompts",
    "num_validation_images", "validation_inference_steps", "guidance_scale", "snapshot_steps", "train_data_dir",
    "dataset_name", "pretrained_model_name_or_path", "vae_path", "text_encoder_path", "tokenizer_path",
    "pretrained_vae", "validation_epochs", "latent_cache_dir",
})  # fmt: skip
# Flags a resumed run applies from the resume on (the advice after a divergence is to lower the learning rate).
RESUME_APPLIED_FLAGS = ("learning_rate", "max_grad_norm")
# The values (as `tracker_config` records them) of a flag that is off: what a run older than the flag had.
NEW_FLAG_OFF_VALUES = (None, "None", False, 0, 0.0, "none", "[]")
# A checkpoint whose loss exceeds this multiple of the run's first loss was saved while the run was diverging.
DIVERGED_LOSS_RATIO = 10.0


def check_same_settings(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume with a flag that changes the run's result, naming it (RESUME_APPLIED_FLAGS are applied)."""
    if saved is None:  # a checkpoint written before settings were recorded
        return
    # A flag newer than the checkpoint is absent from it; the run had it at its default, off, which matches.
    newer_and_off = {key for key in set(current) - set(saved) if current[key] in NEW_FLAG_OFF_VALUES}
    changed = [
        key for key in sorted(set(saved) | set(current) - newer_and_off)
        if key not in RESUME_APPLIED_FLAGS and saved.get(key) != current.get(key)
    ]  # fmt: skip
    constant_lr = current.get("lr_scheduler") in ("constant", "constant_with_warmup")
    if constant_lr:  # a longer (or shorter) run of a constant schedule continues the same run
        changed = [key for key in changed if key not in ("max_train_steps", "num_train_epochs")]
    if changed:
        differences = "; ".join(
            f"--{key}={current.get(key)!r} (the run was started with {saved.get(key)!r})" for key in changed
        )
        raise ValueError(
            f"cannot resume from {checkpoint} with other settings: {differences}. A resumed run continues the saved "
            "weights, optimizer and data order, so pass the flags it was started with (only --learning_rate and "
            "--max_grad_norm may change on resume), or start a new run in another --output_dir or with "
            "--overwrite_output_dir"
        )
    for key in RESUME_APPLIED_FLAGS:
        if key in saved and saved[key] != current.get(key):
            logger.warning(f"resuming from {checkpoint} with --{key}={current.get(key)} (it was {saved[key]})")


def set_learning_rate(lr_scheduler: Any, learning_rate: float) -> None:
    """Make a restored LR schedule continue from `learning_rate` as its peak: lr = learning_rate · λ(step)."""
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    schedule.base_lrs = [learning_rate] * len(schedule.base_lrs)
    for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]


# The U-Net's blocks, each one FSDP unit (its parameters gathered together, for its forward and backward only).
FSDP_WRAPPED_BLOCKS = tuple(
    block.__name__
    for block in (
        unet_module.DownBlock2D,
        unet_module.CrossAttnDownBlock2D,
        unet_module.UNetMidBlock2DCrossAttn,
        unet_module.UpBlock2D,
        unet_module.CrossAttnUpBlock2D,
    )
)


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """What --fsdp hands accelerate: FSDP2 (`torch.distributed.fsdp.fully_shard`), each U-Net block wrapped by class
    (FSDP_WRAPPED_BLOCKS) and the rest of the model as the root unit, parameters resharded after each forward, and
    checkpoints written sharded (each rank its part, through torch.distributed.checkpoint) by `save_state` and read
    back by `load_state`. The final weights are gathered whole onto the main process (`Trainer.gathered`)."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(FSDP_WRAPPED_BLOCKS),
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator logging to <output_dir>/<logging_dir>, with INFO logs on the main process only.

    A launch whose accelerate config asks for DeepSpeed fails at once, naming `pip install deepspeed`, when it is not
    installed. With --fsdp it gets `fsdp_plugin()`, and a launch on which accelerate does not choose FSDP is refused:
    accelerate keeps the plugin only for a multi-GPU launch, and would otherwise train as plain DDP (MULTI_CPU on CPU)
    or as one process while the user asked for sharding."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not find_spec("deepspeed"):
        raise ValueError(
            "accelerate's config asks for DeepSpeed, which is not installed: pip install deepspeed (or pick another "
            "distributed type in `accelerate config`)"
        )
    fsdp = getattr(args, "fsdp", False)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        fsdp_plugin=fsdp_plugin() if fsdp else None,
    )
    if fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise ValueError(
            f"--fsdp: accelerate chose {accelerator.distributed_type.value} ({accelerator.num_processes} process(es) "
            f"on {accelerator.device.type}), not FSDP, so nothing would be sharded. FSDP needs several GPUs: "
            "accelerate launch --multi_gpu --num_processes N (on CPU accelerate refuses FSDP v1 and runs v2 as plain "
            "DDP); drop --fsdp to train unsharded"
        )
    if not accelerator.is_main_process:
        for name in ("datasets", "transformers", "diffusers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # accelerate logs every file of every checkpoint at INFO; the run's own lines say when a checkpoint is saved.
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
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


def with_run_length(args: argparse.Namespace, updates_per_epoch: int) -> argparse.Namespace:
    """A copy of `args` with the run's length filled in: --max_train_steps (or --num_train_epochs whole epochs of
    `updates_per_epoch` optimizer steps), and the epochs that many steps take. The copy is what the run records in
    its checkpoints' settings; `args` itself is left as parsed."""
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * updates_per_epoch
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    derived = {"max_train_steps": max_train_steps, "num_train_epochs": num_train_epochs}
    if getattr(args, "streaming", False):  # recorded, so a resume on a stream of another length is refused
        derived["streaming_epoch_updates"] = updates_per_epoch
    return argparse.Namespace(**{**vars(args), **derived})


def create_optimizer(
    args: argparse.Namespace, parameters: Any, accelerator: Accelerator
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and the LR schedule over args.max_train_steps (filled in by `with_run_length`)."""
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    hyperparameters = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
    if args.use_8bit_adam:  # checked importable at argument parsing
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(parameters, weight_decay=args.adam_weight_decay, **hyperparameters)
    else:
        optimizer = torch.optim.AdamW(
            parameters,
            weight_decay=args.adam_weight_decay,
            fused=True if args.adam_fused else None,  # None: torch's default, the multi-tensor (foreach) loop
            **hyperparameters,
        )
    # A prepared scheduler steps once per process for every optimizer step, hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler


def step_optimizer(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    max_grad_norm: float,
    loss: torch.Tensor,
) -> None:
    """After `accelerator.backward(loss)`: on the last micro-batch of an accumulation window clip the gradients of
    `model`, then step the optimizer and the LR schedule and reset the gradients (a prepared optimizer skips the step
    on the other micro-batches).

    A non-finite gradient norm (a non-finite loss gives one) raises `TrainingDiverged`, naming `loss`, before the
    optimizer touches the weights. The check is on the all-reduced gradients, so every process stops at the same
    step."""
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
        dataset: torch.utils.data.Dataset | ImageTextStream,
        batches: EpochBatches | ImageTextStream,
        model: torch.nn.Module,
        lr_scheduler: Any,
        collate_fn: Callable[[list], dict[str, Any]] = collate,
        name: str = "train",
    ) -> None:
        assert args.max_train_steps is not None, "pass with_run_length(args, updates_per_epoch) to the Trainer"
        self.accelerator = accelerator
        self.name = name  # the trackers' project name
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
        # diffusers' --validation_epochs, counted in optimizer steps
        self.validation_steps = (
            args.validation_epochs * batches.updates_per_epoch if args.validation_epochs else args.validation_steps
        )
        self.wall_seconds = 0.0
        self.initial_checksum = self.checksum()
        self.full_state_dict: dict[str, torch.Tensor] | None = None  # under FSDP, gathered for the final save

    def resume(self) -> None:
        """Seed this rank's RNG, then, if asked, restore the full state (RNG included) of a checkpoint.

        The checkpoint's run must have had the same settings: a flag that would change the result (the learning rate,
        the batch, the objective, ...) is refused by name rather than silently overridden by the restored state."""
        set_seed(self.args.seed, device_specific=True)
        remove_partial_checkpoints(self.accelerator, self.output_dir)
        path = find_resume_checkpoint(self.output_dir, self.args.resume_from_checkpoint)
        if path is None:
            if self.args.resume_from_checkpoint == "latest":
                logger.info(f"no checkpoint in {self.output_dir}; starting from scratch")
            kept = []
        else:
            state = read_checkpoint_state(path)
            check_same_settings(state.get("settings"), self.settings(), path)
            if state["global_step"] > self.args.max_train_steps:
                raise ValueError(
                    f"{path} is at step {state['global_step']}, past --max_train_steps={self.args.max_train_steps}; "
                    f"pass --max_train_steps {state['global_step']} or more, or resume from an earlier checkpoint"
                )
            logger.info(f"resuming from {path}")
            self.accelerator.load_state(str(path))
            try:
                check_finite(self.accelerator.unwrap_model(self.model), f"refusing to resume from {path}")
            except TrainingDiverged as error:
                raise ValueError(f"{error}; resume from an earlier checkpoint-N folder") from None
            if self.ema is not None:
                load_ema(self.ema, path)
            if state.get("settings", {}).get("learning_rate", self.args.learning_rate) != self.args.learning_rate:
                set_learning_rate(self.lr_scheduler, self.args.learning_rate)
            self.global_step = state["global_step"]
            kept = [row for row in self._read_log() if row["step"] <= self.global_step]
            problem = random_states_restorable(path, self.accelerator.process_index)
            if problem is not None:
                message = f"the random states were not restored, so the run will not repeat bit for bit: {problem}"
                logger.warning(message, main_process_only=False)
                kept.append({"step": self.global_step, "warning": message})
        if self.accelerator.is_main_process:
            with open(self.output_dir / TRAIN_LOG, "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in kept)

    def settings(self) -> dict[str, Any]:
        """What fixes this run's result, as recorded in each checkpoint: every flag but those in RESUME_FREE_FLAGS,
        and the number of processes (which fixes the data order)."""
        recorded = {k: v for k, v in tracker_config(self.args).items() if k not in RESUME_FREE_FLAGS}
        return {**recorded, "num_processes": self.accelerator.num_processes}

    def _read_log(self) -> list[dict[str, Any]]:
        """The rows of train_log.jsonl; a last line cut short by a kill is dropped, with a warning."""
        path = self.output_dir / TRAIN_LOG
        rows = []
        lines = path.read_text().splitlines() if path.exists() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{path}, line {number}, is not JSON: {line[:80]!r}") from None
                logger.warning(f"{path}: dropping its last line, cut short by an interrupted write: {line[:80]!r}")
        return rows

    def _batches(self, epoch: int, skip_updates: int) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of `epoch` after its first `skip_updates` optimizer updates."""
        if isinstance(self.epoch_batches, ImageTextStream):
            return self.epoch_batches.batches(epoch, skip_updates, self.collate_fn)
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

        `train_step(batch) -> {name: scalar tensor}` does one micro-batch inside `accelerator.accumulate`: forward,
        `accelerator.backward(loss)`, then `step_optimizer`; the tensors are logged. `validate(step)` runs on the main
        process, while the others wait, every --validation_steps optimizer steps and after the last one.
        `on_update(step)` runs on every process after each optimizer step, before that step's validation (snapshots,
        say).
        """

        def after_update(step: int) -> None:
            if on_update is not None:
                on_update(step)
            if validate is not None and step % self.validation_steps == 0:
                self.on_main_process(validate, step)

        if self.global_step >= self.args.max_train_steps and finished_step(self.output_dir) == self.global_step:
            logger.info(
                f"the run in {self.output_dir} already finished at step {self.global_step} (--max_train_steps "
                f"{self.args.max_train_steps}) and saved its result; nothing to do"
            )
            self.accelerator.end_training()
            return
        if self.global_step >= self.args.max_train_steps:
            logger.info(f"training had finished at step {self.global_step}; saving the result that was not saved")
        self.accelerator.init_trackers(self.name, config=tracker_config(self.args))
        logger.info(
            f"training on {self.accelerator.num_processes} process(es), accelerate's distributed type "
            f"{self.accelerator.distributed_type.value}, device {self.accelerator.device}"
        )
        self._update_loop(train_step, after_update)
        if validate is not None and self.global_step % self.validation_steps:
            self.on_main_process(validate, self.global_step)
        self.write_rank_report()
        if self.accelerator.distributed_type == DistributedType.FSDP:  # every rank sends its shards; main gets all
            self.full_state_dict = self.accelerator.get_state_dict(self.model)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save()
            mark_finished(self.output_dir, self.global_step)
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
        if self.global_step >= args.max_train_steps:
            progress.close()
            return
        for epoch in range(self.global_step // updates_per_epoch, args.num_train_epochs):
            skip = self.global_step - epoch * updates_per_epoch if epoch == self.global_step // updates_per_epoch else 0
            for batch in self._batches(epoch, skip):
                try:
                    outputs = train_step(batch)
                except TrainingDiverged as error:
                    raise TrainingDiverged(self.divergence_advice(error)) from None
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
                    record = {"settings": self.settings(), "loss": logs["loss"]}
                    save_checkpoint(accelerator, self.output_dir, self.global_step, limit, self.model, self.ema, record)
                after_update(self.global_step)
                if self.global_step >= args.max_train_steps:
                    break
            if self.global_step >= args.max_train_steps:
                break
        progress.close()

    def divergence_advice(self, error: TrainingDiverged) -> str:
        """Why the run stopped, and the checkpoint to go back to: the newest one whose weights are finite and whose
        loss was still sane (at most DIVERGED_LOSS_RATIO times the run's first logged loss), since a checkpoint
        saved while the loss was already exploding holds weights that diverge again at once."""
        first = next((row["loss"] for row in self._read_log() if "loss" in row), None)
        good = None
        for path in reversed(list_checkpoints(self.output_dir)):
            loss = read_checkpoint_state(path).get("loss")
            if loss is None or first is None or (math.isfinite(loss) and loss <= DIVERGED_LOSS_RATIO * first):
                good = path
                break
        if good is None:
            where = "no checkpoint of this run holds a sane loss, so start afresh with --overwrite_output_dir"
        else:
            where = f"the last good checkpoint is {good}: resume with --resume_from_checkpoint {good}"
        return (
            f"training diverged at step {self.global_step + 1}: {error}. Nothing was saved from this step; {where}, "
            "after lowering --learning_rate, raising --lr_warmup_steps or setting --max_grad_norm (a run started "
            "with other settings must use a new --output_dir or --overwrite_output_dir)."
        )

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
        """`<output_dir>/ranks/rank-<i>.json`: world size, accelerate's distributed type, and checksums of the weights
        before and after training.

        Equal final checksums on every rank show that the gradients were all-reduced; a final checksum that differs
        from the initial one shows that the weights moved.
        """
        report = {
            "rank": self.accelerator.process_index,
            "world_size": self.accelerator.num_processes,
            # MULTI_CPU / MULTI_GPU / FSDP / DEEPSPEED / NO: shows a launch that quietly fell back to another engine
            "distributed_type": self.accelerator.distributed_type.value,
            "global_step": self.global_step,
            "initial_checksum": self.initial_checksum,
            "final_checksum": self.checksum(),
            **extra,
        }
        folder = self.output_dir / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{report['rank']}.json").write_text(json.dumps(report, indent=2))

    def checksum(self) -> str | None:
        """`parameter_checksum` of the trained model; None under FSDP, where each rank holds other shards."""
        if self.accelerator.distributed_type == DistributedType.FSDP:
            return None
        return parameter_checksum(self.accelerator.unwrap_model(self.model))

    def gathered(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` (the unwrapped trained model), or under FSDP an unsharded copy holding the weights gathered by
        `run` onto the main process, for `save_pretrained`."""
        if self.full_state_dict is None:
            return module
        whole = type(module).from_config(module.config)
        whole.load_state_dict(self.full_state_dict)
        return whole

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
