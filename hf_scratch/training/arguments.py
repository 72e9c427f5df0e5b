"""The arguments every training script shares: data, optimisation, checkpointing and logging.

Each script (`train_vae.py`, `train_clip.py`, `train_unet.py`) adds its model and loss arguments to `build_parser`'s
parser; `check_args` validates the shared ones before anything heavy is loaded.
"""

import argparse
import importlib.util
import math

from hf_scratch.training.checkpoints import check_output_dir, find_resume_checkpoint

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# ----------------------------------------------------------------------------------------------------------- arguments
def build_parser(
    description: str, captions: bool = True, other_sources: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """A parser holding the shared argument groups; each script adds its model and loss arguments to it.
    `other_sources` ({flag: help}) are the script's own kinds of training data, each in place of --train_data_dir."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source_help = (
        "local data, its kind found from the path: an image folder with metadata.jsonl (split subfolders optional), "
        "images with a .txt caption beside each (kohya / DreamBooth), a save_to_disk folder, webdataset .tar shards "
        "(a file, a folder or a pattern such as 'shards-{000..009}.tar'), or a .csv / .jsonl / .json / .parquet table "
        "of image paths or bytes (see hf_scratch/training/sources.py)"
    )
    source.add_argument("--train_data_dir", "--data", help=source_help)
    source.add_argument(
        "--dataset_name",
        help="the same as --train_data_dir (kept for diffusers' users; local data only, no hub access)",
    )
    for flag, help in (other_sources or {}).items():
        source.add_argument(flag, help=help)
    data.add_argument("--image_column", default="image", help="the column holding the images (default: %(default)s)")
    if captions:
        data.add_argument(
            "--caption_column",
            default="text",
            help="the column holding the captions (default: %(default)s; webdataset: the txt member, or this field "
            "of the json member)",
        )
    data.add_argument("--train_split", default="train", help="the split to train on (default: %(default)s)")
    data.add_argument(
        "--validation_split",
        default="validation",
        help='the split to validate on, or "none" to skip validation (default: %(default)s)',
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=64,
        help="images are resized (short side) and cropped to this square (default: %(default)s)",
    )
    data.add_argument(
        "--center_crop",
        dest="center_crop",
        action="store_true",
        default=True,
        help="crop the centre of each resized training image (the default here; diffusers' train_text_to_image.py "
        "crops at random unless this is given)",
    )
    data.add_argument(
        "--random_crop",
        dest="center_crop",
        action="store_false",
        help="crop training images at a random place, a new one each epoch, seeded by (--seed, epoch, image) so a "
        "resumed run repeats it (default: off, the centre crop); not with --cache_latents",
    )
    data.add_argument(
        "--random_flip",
        action="store_true",
        help="mirror each training image left-right with probability 0.5, drawn from (--seed, epoch, image) so a "
        "resumed run repeats it (default: off)",
    )
    data.add_argument(
        "--max_train_samples", type=int, default=None, help="use only the first N training images (default: all)"
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="read the training split as a datasets IterableDataset, never whole into memory nor converted to Arrow: "
        "an epoch is one pass over the stream, shuffled per epoch through a buffer seeded by (--seed, epoch); its "
        "number of updates is counted by one pass at start (reading no pixel) or set by --streaming_epoch_updates, "
        "so a resumed run skips exactly the rows already used (see hf_scratch/training/streaming.py); needs "
        "--max_train_steps; not with --cache_latents or --dataloader_num_workers (default: off)",
    )
    data.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="--streaming: rows in the shuffle buffer (datasets' IterableDataset.shuffle), held undecoded "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--streaming_epoch_updates",
        type=int,
        default=None,
        help="--streaming: optimizer updates in an epoch, instead of counting the stream's rows at start; the rest "
        "of a longer pass is unused in that epoch (default: counted)",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="processes decoding images (default: %(default)s, decode in the main process)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=16, help="images per process per micro-batch")
    optim.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW's peak learning rate")
    optim.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers' LR schedule")
    optim.add_argument("--lr_warmup_steps", type=int, default=0, help="optimizer steps of linear warm-up")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's β1")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's β2")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW's decoupled weight decay")
    optim.add_argument(
        "--adam_fused",
        action="store_true",
        help="torch.optim.AdamW(fused=True): one fused kernel over all parameters instead of a loop of ops per tensor "
        "(the same update)",
    )
    optim.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="bitsandbytes' 8-bit AdamW (pip install bitsandbytes; it needs a GPU build)",
    )
    optim.add_argument(
        "--allow_tf32",
        action="store_true",
        help="let CUDA matmuls and convolutions use TF32 on Ampere and newer GPUs (faster, ~1e-3 relative error); "
        "no effect on CPU",
    )
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this; 0: no clip")
    optim.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides epochs")
    optim.add_argument("--num_train_epochs", type=int, default=1, help="passes over the data, when no step count")
    optim.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="micro-batches summed into one optimizer step"
    )
    optim.add_argument(
        "--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="autocast dtype; None: accelerate's"
    )
    optim.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory"
    )
    optim.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights, validate and save it")
    optim.add_argument("--ema_decay", type=float, default=0.9999, help="the EMA's decay per optimizer step")
    optim.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and the noise")

    ckpt = parser.add_argument_group("checkpointing")
    ckpt.add_argument("--output_dir", required=True, help="the run's folder: checkpoints, logs, the final model")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N optimizer steps")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    ckpt.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint-N folder, or "latest"')
    ckpt.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start afresh in an --output_dir that holds a run, removing its checkpoints and logs",
    )
    ckpt.add_argument(
        "--push_to_hub",
        action="store_true",
        help="not available: training here is offline; upload --output_dir afterwards (huggingface-cli upload)",
    )

    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--report_to",
        default="tensorboard",
        choices=("tensorboard", "wandb", "none"),
        help="the tracker of losses and validation images (tensorboard: the train extra; wandb: pip install wandb)",
    )
    logs.add_argument("--logging_dir", default="logs", help="the trackers' folder, relative to --output_dir")
    logs.add_argument("--validation_steps", type=int, default=500, help="validate every N optimizer steps")
    logs.add_argument(
        "--validation_epochs", type=int, default=None, help="validate every N epochs instead of --validation_steps"
    )
    return parser


def check_finite(args: argparse.Namespace) -> None:
    """Refuse NaN and infinity in every number-valued flag (a NaN noise offset would otherwise pass for divergence)."""
    for name, value in vars(args).items():
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ValueError(f"--{name}={value} must be a finite number")


def check_at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """Each flag in `names` (each entry, for a list) is at least `minimum`; unset (None) flags are skipped."""
    for name in names:
        value = getattr(args, name)
        if value is not None and any(number < minimum for number in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{name}={value} must be at least {minimum}")


def check_divisible(args: argparse.Namespace, channels_flag: str, divisor_flag: str) -> None:
    """Every entry of --channels_flag is a multiple of --divisor_flag (group norm's groups, attention heads)."""
    channels, divisor = getattr(args, channels_flag), getattr(args, divisor_flag)
    channels = channels if isinstance(channels, list) else [channels]
    if divisor < 1 or any(width % divisor for width in channels):
        raise ValueError(
            f"--{channels_flag}={channels} must all be multiples of --{divisor_flag}={divisor}; pick channel widths "
            f"divisible by it (e.g. {[max(divisor, width // divisor * divisor) for width in channels]}) or a "
            f"--{divisor_flag} that divides every width"
        )


def check_optional_packages(args: argparse.Namespace) -> None:
    """A flag that needs a package this install lacks (or the network) fails at once, in one line naming it."""
    if args.push_to_hub:
        raise ValueError(
            "--push_to_hub needs network access to the Hugging Face Hub, which these trainers never use; train into "
            "--output_dir, then upload it with `huggingface-cli upload <repo> <output_dir>`"
        )
    needs = {"tensorboard": ("tensorboard", 'pip install "hf-scratch[train]"'), "wandb": ("wandb", "pip install wandb")}
    if args.report_to in needs and importlib.util.find_spec(needs[args.report_to][0]) is None:
        package, install = needs[args.report_to]
        raise ValueError(f"--report_to {args.report_to} needs {package}: {install} (or pass --report_to none)")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop --use_8bit_adam)")


def check_streaming(args: argparse.Namespace) -> None:
    """--streaming and its flags: a stream has no length known in advance and is read in one process."""
    check_at_least(args, 1, "shuffle_buffer_size", "streaming_epoch_updates")
    if not args.streaming:
        if args.streaming_epoch_updates is not None:
            raise ValueError("--streaming_epoch_updates sets the epoch of a stream; pass --streaming with it")
        return
    if args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps: a stream's length is not known before it is read")
    if args.dataloader_num_workers:
        raise ValueError(
            f"--dataloader_num_workers={args.dataloader_num_workers} is not supported with --streaming, which decodes "
            "in the training process; drop --dataloader_num_workers"
        )
    if getattr(args, "cache_latents", False):
        raise ValueError(
            "--cache_latents encodes the whole training split once, which a stream is not held for; drop "
            "--cache_latents or --streaming"
        )


def check_args(args: argparse.Namespace) -> None:
    """Reject argument values that would fail later, naming the flag, the value and what is allowed."""
    check_finite(args)
    check_optional_packages(args)
    check_at_least(args, 1, "validation_epochs")
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
    check_streaming(args)
    if args.max_train_steps is None and args.num_train_epochs < 1:
        raise ValueError(
            f"--num_train_epochs={args.num_train_epochs} must be at least 1 when --max_train_steps is unset"
        )
    if args.resume_from_checkpoint != "latest":  # "latest" is resolved (and broken checkpoints reported) at resume
        find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
