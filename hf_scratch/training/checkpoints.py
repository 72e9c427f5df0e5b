"""Checkpoints and output folders of the training scripts: nothing lost, nothing mixed, nothing unpickled.

- **One run per folder.** `claim_output_dir` refuses a folder that holds a run (a final model, a log or checkpoints)
  unless the run resumes (`--resume_from_checkpoint`) or `--overwrite_output_dir` clears it first, and takes a lock
  file (`.hf_scratch.lock`) that a second concurrent run cannot take; a lock whose process is gone is stale and taken
  over with a warning.
- **Atomic, verified checkpoints.** `save_checkpoint` writes `accelerator.save_state` to `.checkpoint-N.partial`, adds
  the EMA weights as safetensors and a manifest of every file's size and SHA-256 to `training_state.json` (with the
  run's settings and its loss at that step), and renames the folder to `checkpoint-N`; weights that are not finite are
  never saved, so `--checkpoints_total_limit` never deletes a good checkpoint in favour of a bad one.
- **`latest` skips what is broken.** `find_resume_checkpoint` checks the manifest (a missing, empty, truncated or
  altered file, a missing or unreadable `training_state.json`), warns once naming the file, and falls back to the
  previous good checkpoint.
- **A finished run is marked.** `mark_finished` writes `run_finished.json` after the final save, so that resuming a
  finished run knows there is nothing left to do.
- **No pickle executes.** accelerate reads model weights from safetensors and every other file with
  `torch.load(weights_only=True)`; the EMA, which accelerate would store as a custom-object pickle
  (`custom_checkpoint_0.pkl`, which it unpickles in full on load), is kept out of `save_state` and stored as
  `ema.safetensors` plus `ema.json` here.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Plain logging: these checks also run before any Accelerator exists (at argument parsing).
logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_STATE = "training_state.json"
RUN_FINISHED = "run_finished.json"
LOCK_FILE = ".hf_scratch.lock"
EMA_WEIGHTS, EMA_STATE = "ema.safetensors", "ema.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_PARTIAL_CHECKPOINT_NAME = re.compile(r"\.checkpoint-(\d+)\.partial")
# What a finished or started run leaves in its output folder.
RUN_MARKERS = ("model_index.json", TRAIN_LOG, "config.json", RUN_FINISHED)


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or weight: the run stops without saving, its last good checkpoint kept."""


# ------------------------------------------------------------------------------------------------- output folder
def run_artifacts(output_dir: str | Path) -> list[str]:
    """Names in `output_dir` that show a run has been there: a final model, a training log, checkpoints."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [name for name in RUN_MARKERS if (root / name).exists()]
    return found + [path.name for path in list_checkpoints(root)]


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> None:
    """Refuse to start a fresh run on top of another one (before anything heavy is loaded)."""
    found = run_artifacts(output_dir)
    if found and resume_from_checkpoint is None and not overwrite_output_dir:
        listing = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
        raise ValueError(
            f"--output_dir={output_dir!r} already holds a run ({listing}); "
            "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another "
            "--output_dir"
        )


def _process_start_time(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/pid/stat), so that a reused pid is not mistaken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _lock_is_live(lock: dict[str, Any]) -> bool:
    if lock.get("host") != socket.gethostname():
        return True  # another machine's lock: it cannot be checked from here, so it stands
    pid = int(lock.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_start_time(pid) == lock.get("start_time")


class OutputDirLock:
    """`<output_dir>/.hf_scratch.lock`, created exclusively; released by `release` (and at interpreter exit)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _process_start_time(os.getpid())}
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder and _lock_is_live(holder):
                    raise ValueError(
                        f"--output_dir={str(self.path.parent)!r} is in use by another run (process {holder['pid']} on "
                        f"{holder['host']}, lock {self.path}); wait for it to finish or choose another --output_dir"
                    ) from None
                logger.warning(f"taking over the stale lock {self.path} of a run that is no longer alive: {holder}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise ValueError(f"could not take the lock {self.path}; another run may be starting in --output_dir")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def clear_run(output_dir: str | Path) -> None:
    """What --overwrite_output_dir removes: checkpoints, logs, snapshots and the finished-run markers."""
    root = Path(output_dir)
    for path in list_checkpoints(root) + [p for p in root.glob(".checkpoint-*.partial")]:
        shutil.rmtree(path)
    for name in ("snapshots", "validation", "ranks", "logs"):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in RUN_MARKERS:
        (root / name).unlink(missing_ok=True)
    logger.warning(f"--overwrite_output_dir: removed the previous run's checkpoints and logs from {root}")


# --------------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-N` folders) in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (naming the file), or None when it looks whole."""
    state_file = path / CHECKPOINT_STATE
    try:
        state = json.loads(state_file.read_text())
        int(state["global_step"])
    except FileNotFoundError:
        return f"{state_file} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{state_file} is not a valid training state ({type(error).__name__}: {error})"
    for name, written in state.get("files", {}).items():
        file = path / name
        size, digest = (written, None) if isinstance(written, int) else (written["size"], written["sha256"])
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written (truncated or replaced)"
        if digest is not None and file_sha256(file) != digest:
            return f"{file} does not hash to the SHA-256 written with it (its bytes changed after the save)"
    for file in sorted(path.glob("custom_checkpoint_*.pkl")):
        return (
            f"{file} is a pickle (an EMA saved by an older hf-scratch through accelerate), which is never loaded "
            "because unpickling can run code"
        )
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as error:  # safetensors raises its own error types for a broken header
            return f"{file} is not a readable safetensors file ({error})"
    return None


def find_resume_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The folder --resume_from_checkpoint names: None to start fresh, "latest" for the newest whole checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logger.warning(f"skipping {path.name}: {problem}; trying the previous checkpoint")
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        problem = "does not exist"
    elif (problem := checkpoint_problem(path)) is not None:
        problem = f"is not a complete checkpoint: {problem}"
    if problem is not None:
        raise ValueError(
            f"--resume_from_checkpoint={resume_from_checkpoint!r} {problem}; pass a checkpoint-N folder written by a "
            'previous run, or "latest" for the newest complete one in --output_dir'
        )
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every state-dict tensor's bytes, in order: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """`training_state.json` of a checkpoint: its step, its file manifest, and the run's settings and loss."""
    return json.loads((path / CHECKPOINT_STATE).read_text())


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Raise TrainingDiverged naming the first parameter that holds NaN or infinity."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise TrainingDiverged(f"{what}: parameter {name!r} holds NaN or infinite values")


def save_ema(ema: Any, folder: Path) -> None:
    """The EMA as tensors (safetensors) and numbers (JSON): no pickle."""
    state = ema.state_dict()
    shadow = {f"shadow.{i}": tensor.detach().cpu().contiguous() for i, tensor in enumerate(state.pop("shadow_params"))}
    state.pop("collected_params", None)
    save_file(shadow, folder / EMA_WEIGHTS)
    (folder / EMA_STATE).write_text(json.dumps(state))


def load_ema(ema: Any, folder: Path) -> None:
    if not (folder / EMA_WEIGHTS).is_file():
        raise ValueError(
            f"{folder} has no {EMA_WEIGHTS}, but the run uses --use_ema; resume from a checkpoint with one"
        )
    shadow = load_file(folder / EMA_WEIGHTS)
    state = json.loads((folder / EMA_STATE).read_text())
    state["shadow_params"] = [shadow[f"shadow.{i}"] for i in range(len(shadow))]
    ema.load_state_dict(state)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None, model: torch.nn.Module,
    ema: Any = None, record: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write the full training state to `.checkpoint-N.partial`, then publish it by renaming it to `checkpoint-N`.

    `record` (the run's settings, the loss) is stored beside the step in `training_state.json`."""
    check_finite(accelerator.unwrap_model(model), f"not saving checkpoint-{step}")
    root = Path(output_dir)
    staging, final = root / f".checkpoint-{step}.partial", root / f"checkpoint-{step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            save_ema(ema, staging)
        files = {
            path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
            for path in sorted(staging.iterdir())
            if path.is_file()
        }
        (staging / CHECKPOINT_STATE).write_text(json.dumps({"global_step": step, "files": files, **(record or {})}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        logger.info(f"saved {final}")
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                logger.info(f"removing {old} (--checkpoints_total_limit {total_limit})")
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def random_states_restorable(path: Path, process_index: int) -> str | None:
    """None when this rank's random states in `path` load without code execution, else why not."""
    file = path / f"random_states_{process_index}.pkl"
    try:
        accelerate_load(file)  # torch.load(weights_only=True) with numpy's array types allowed
    except Exception as error:  # an unpickling error, a truncated file, a missing file
        return f"{file} cannot be read safely ({type(error).__name__}: {error})"
    return None


def remove_partial_checkpoints(accelerator: Accelerator, output_dir: str | Path) -> None:
    """Delete staging folders that an interrupted save left behind."""
    root = Path(output_dir)
    if accelerator.is_main_process and root.is_dir():
        for path in root.iterdir():
            if _PARTIAL_CHECKPOINT_NAME.fullmatch(path.name):
                logger.warning(f"removing {path}, an incomplete checkpoint left by an interrupted save")
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def mark_finished(output_dir: str | Path, step: int) -> None:
    """Record, after the final save, that the run in `output_dir` finished at `step` (written atomically)."""
    root = Path(output_dir)
    staging = root / f".{RUN_FINISHED}.partial"
    staging.write_text(json.dumps({"global_step": step}))
    os.replace(staging, root / RUN_FINISHED)


def finished_step(output_dir: str | Path) -> int | None:
    """The step at which the run in `output_dir` finished and saved its result, or None."""
    try:
        return int(json.loads((Path(output_dir) / RUN_FINISHED).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
