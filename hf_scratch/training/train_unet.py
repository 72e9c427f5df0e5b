"""Train a text-conditioned U-Net in the latent space of a frozen VAE: latent diffusion (Rombach et al. 2022,
arXiv:2112.10752).

Each step samples clean latents z_0 = E(x) · scaling_factor and noise ε ~ N(0, I), and `--objective` turns them into
the network's input, timestep, target and per-sample weight (`hf_scratch.objectives` has each objective's equations):

| --objective | network output | reference |
|---|---|---|
| epsilon | ε, from z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε | Ho et al. 2020, arXiv:2006.11239, Eq. 14 |
| v_prediction | v = √ᾱ_t ε − √(1 − ᾱ_t) z_0 | Salimans & Ho 2022, arXiv:2202.00512, Sec. 4 |
| edm | F of D = c_skip x + c_out F(c_in x; c_noise), x = z_0 + σ ε | Karras et al. 2022, arXiv:2206.00364, Table 1 |
| flow_matching | ε − z_0, from z_t = (1 − t) z_0 + t ε | Esser et al. 2024, arXiv:2403.03206, Sec. 2–3 |

Options: min-SNR-γ loss weights (Hang et al. 2023, arXiv:2303.09556) for ε and v, zero-terminal-SNR betas (Lin et al.
2023, arXiv:2305.08891, which needs v-prediction), immiscible noise assignment (Li et al. 2024, arXiv:2406.12303),
the scheduled pseudo-Huber loss (Khrapov & Kotov 2024, arXiv:2403.16728), input perturbation (Ning et al. 2023,
arXiv:2301.11706), offset noise, and caption dropout, which trains the unconditional model that classifier-free
guidance needs (Ho & Salimans 2022, arXiv:2207.12598). `train_step` is one micro-batch, top to bottom.

The VAE and the text encoder come from a pipeline folder (ours or an official diffusers one) or from the folders
that `train_vae.py` and `train_clip.py` write. The run ends with a complete `ScratchStableDiffusionPipeline` folder in
--output_dir, with the scheduler that samples the objective (DDPM for ε and v, diffusers'
`EDMDPMSolverMultistepScheduler` for EDM, `ScratchFlowMatchEulerScheduler` for flow matching), loadable by
`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`, and a model card. `--snapshot_steps` also saves the
EMA pipeline at chosen steps under `snapshots/step-N`.

`--lora_rank r` trains a LoRA instead (Hu et al. 2021, arXiv:2106.09685): the pipeline folder's U-Net stays frozen and
each attention projection W of it (`to_q`, `to_k`, `to_v`, `to_out.0`) learns W' = W + (α/r)·B·A, with α =
`--lora_alpha` (default r), A Gaussian and B zero at the start (so training starts from the base model). With
`--train_text_encoder_lora` the text encoder's `q_proj`, `k_proj`, `v_proj`, `out_proj` get adapters too. The run ends
with `pytorch_lora_weights.safetensors` in --output_dir, in diffusers' layout: our pipelines' and diffusers'
`StableDiffusionPipeline.load_lora_weights` both load it. The objective is the base model's (from its scheduler).
"""

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from transformers import CLIPTokenizer

from hf_scratch import objectives
from hf_scratch.models.clip import ScratchCLIPTextModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import ScratchAutoencoderKL, downsampling_factor
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers.ddpm import ScratchDDPMScheduler
from hf_scratch.schedulers.schedule import STABLE_DIFFUSION_BETAS
from hf_scratch.training.arguments import build_parser, check_args, check_at_least, check_divisible
from hf_scratch.training.cards import write_lora_model_card, write_model_card
from hf_scratch.training.data import (
    CoupledLatents,
    EpochBatches,
    cache_latents,
    image_grid,
    load_image_text_dataset,
    save_validation_grid,
)
from hf_scratch.training.lora import add_lora_adapters, check_lora_args, save_lora_weights
from hf_scratch.training.streaming import load_image_text_stream
from hf_scratch.training.trainer import (
    Trainer,
    create_accelerator,
    create_optimizer,
    step_optimizer,
    with_run_length,
)

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    reflow_help = (
        "flow_matching: train on a teacher's (noise, endpoint) couplings instead of images, rectified flow's reflow "
        "(a folder that `training/reflow.py` writes); with --unet_from_pretrained, a few-step student"
    )
    parser = build_parser(__doc__.splitlines()[0], other_sources={"--reflow_pairs": reflow_help})
    add_frozen_component_arguments(parser)

    unet = parser.add_argument_group("U-Net (from scratch unless --unet_from_pretrained)")
    unet.add_argument("--unet_from_pretrained", action="store_true", help="start from the pipeline folder's unet/")
    unet.add_argument("--unet_config", help="a JSON file of ScratchUNet2DConditionModel config keys")
    unet.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        help="channels of each resolution level, widest last",
    )
    unet.add_argument("--layers_per_block", type=int, default=2, help="ResNet (and attention) layers per level")
    unet.add_argument("--attention_head_dim", type=int, default=8, help="heads per block (diffusers' naming)")
    unet.add_argument(
        "--norm_num_groups", type=int, default=32, help="GroupNorm groups; must divide every --block_out_channels entry"
    )
    unet.add_argument(
        "--cross_attention_levels",
        type=int,
        nargs="+",
        default=None,
        help="indices of the resolution levels with cross-attention; default all but the deepest (as in SD)",
    )
    unet.add_argument(
        "--channels_last",
        action="store_true",
        help="train in channels-last (NHWC) weights and activations, where oneDNN's convolution backward can be "
        "faster on CPU; the same model, saved in the usual layout",
    )

    diffusion = add_objective_arguments(parser)
    diffusion.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode the dataset once and sample latents from the cached posteriors, kept on disk (see "
        "--latent_cache_dir) so that resumes, other ranks and later runs on the same data and VAE reuse them",
    )
    diffusion.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="encode every distinct caption of the training split (and the empty one) once, in memory, instead of "
        "running the frozen text encoder every step (captions x tokens x width x 4 bytes: 270 MB for the 11k emoji "
        "captions); not with --train_text_encoder_lora or --streaming",
    )
    diffusion.add_argument(
        "--latent_cache_dir",
        default=None,
        help="where --cache_latents keeps its shards, one folder per (data, VAE) pair; default: "
        "<output_dir>/latent-cache",
    )

    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the U-Net over the GPUs with FSDP2 through accelerate: each down, mid and up block one unit, "
        "checkpoints sharded, the final weights gathered for saving (trainer.fsdp_plugin); needs accelerate launch "
        "--multi_gpu on CUDA, refused elsewhere; not with --use_ema, LoRA, --validation_prompts or --snapshot_steps "
        "(default: off)",
    )
    lora = parser.add_argument_group("LoRA (Hu et al. 2021): adapt the pipeline folder's U-Net instead of training one")
    lora.add_argument("--lora_rank", type=int, default=None, help="r, the rank of each low-rank update B·A")
    lora.add_argument("--lora_alpha", type=float, default=None, help="α, which scales B·A by α/r (default: r)")
    lora.add_argument(
        "--lora_layers",
        choices=("attention", "all"),
        default=None,
        help="the U-Net layers adapted: the attention projections (the default, as diffusers' training scripts), or "
        "every linear and convolution (as few-step LoRAs are trained)",
    )
    lora.add_argument("--train_text_encoder_lora", action="store_true", help="adapt the text encoder's attention too")

    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_prompts",
        nargs="+",
        default=[],
        help="prompts drawn at each validation (none: no validation images)",
    )
    validation.add_argument("--num_validation_images", type=int, default=4, help="per prompt")
    validation.add_argument(
        "--validation_inference_steps", type=int, default=50, help="sampler steps of the validation images"
    )
    validation.add_argument(
        "--guidance_scale", type=float, default=4.0, help="classifier-free guidance of the validation images"
    )
    validation.add_argument(
        "--snapshot_steps",
        type=int,
        nargs="+",
        default=[],
        help="also save the (EMA) pipeline, or the LoRA, at these steps, to snapshots/step-N",
    )
    args = parser.parse_args(argv)
    check_args(args)
    merge_prediction_type(args)
    if args.lora_rank is not None:
        check_lora_args(args)
    else:
        for flag in ("lora_alpha", "train_text_encoder_lora", "lora_layers"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} sets up a LoRA run; add --lora_rank R (e.g. 4) or drop --{flag}")
    check_objective_args(args)
    if not args.pretrained_model_name_or_path and not (
        args.vae_path and args.text_encoder_path and args.tokenizer_path
    ):
        raise ValueError(
            "pass --pretrained_model_name_or_path (a pipeline folder), or all of --vae_path, --text_encoder_path and "
            "--tokenizer_path"
        )
    if args.unet_from_pretrained and not args.pretrained_model_name_or_path:
        raise ValueError("--unet_from_pretrained needs --pretrained_model_name_or_path, whose unet/ it loads")
    check_unet_args(args)
    if args.reflow_pairs:
        check_reflow_args(args)
    if args.cache_text_embeddings:
        for flag, reason in (("train_text_encoder_lora", "the text encoder is trained, so its outputs change"),
                             ("streaming", "a stream's captions are not known before it is read")):  # fmt: skip
            if getattr(args, flag):
                raise ValueError(f"--cache_text_embeddings cannot be combined with --{flag}: {reason}; drop one")
    return args


def add_objective_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The diffusion objective's flags (`hf_scratch.objectives`) and caption dropout: every script that trains a
    denoiser (the U-Net, a LoRA of it, a ControlNet beside it) takes the same ones. Returns their group."""
    diffusion = parser.add_argument_group("diffusion objective (hf_scratch.objectives)")
    diffusion.add_argument(
        "--objective",
        choices=objectives.OBJECTIVES,
        default=None,
        help="default: the pipeline scheduler's prediction type, or epsilon",
    )
    diffusion.add_argument(
        "--prediction_type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="the older spelling of --objective epsilon|v_prediction",
    )
    diffusion.add_argument("--rescale_betas_zero_snr", action="store_true", help="ε/v: zero terminal SNR, trailing")
    diffusion.add_argument("--snr_gamma", type=float, default=None, help="ε/v: min-SNR-γ weighting; 5.0 is the paper's")
    diffusion.add_argument("--sigma_data", type=float, default=0.5, help="edm: σ_data, the std of the latents")
    diffusion.add_argument("--edm_p_mean", type=float, default=-1.2, help="edm: mean of ln σ (EDM2 latents: -0.4)")
    diffusion.add_argument("--edm_p_std", type=float, default=1.2, help="edm: std of ln σ (EDM2 latents: 1.0)")
    diffusion.add_argument("--edm_sigma_min", type=float, default=0.002, help="edm: the sampler's smallest σ")
    diffusion.add_argument("--edm_sigma_max", type=float, default=80.0, help="edm: the sampler's largest σ")
    diffusion.add_argument(
        "--weighting_scheme",
        choices=objectives.WEIGHTING_SCHEMES,
        default="logit_normal",
        help="flow_matching: the density of t",
    )
    diffusion.add_argument("--logit_mean", type=float, default=0.0, help="flow_matching, logit_normal: m")
    diffusion.add_argument("--logit_std", type=float, default=1.0, help="flow_matching, logit_normal: s")
    diffusion.add_argument("--mode_scale", type=float, default=1.29, help="flow_matching, mode: s")
    diffusion.add_argument(
        "--immiscible_noise",
        action="store_true",
        help="pair each batch's noise with its latents by linear assignment (Li et al. 2024)",
    )
    diffusion.add_argument(
        "--loss_type",
        choices=objectives.LOSS_TYPES,
        default="l2",
        help="per-element loss: l2, l1, or the pseudo-Huber loss",
    )
    diffusion.add_argument(
        "--huber_schedule",
        choices=objectives.HUBER_SCHEDULES,
        default="snr",
        help="huber: how c varies with the noise level",
    )
    diffusion.add_argument("--huber_c", type=float, default=0.1, help="c_0 of the pseudo-Huber loss")
    diffusion.add_argument(
        "--noise_offset", type=float, default=0.0, help="add this times a per-channel N(0, 1) offset to the noise"
    )
    diffusion.add_argument(
        "--input_perturbation",
        type=float,
        default=0.0,
        help="γ of input perturbation (Ning et al. 2023, arXiv:2301.11706; 0 is off, diffusers suggests 0.1): the "
        "network input is built from ε + γξ, ξ ~ N(0, I), while the target keeps ε; epsilon, v_prediction and "
        "flow_matching, not edm",
    )
    diffusion.add_argument(
        "--caption_dropout_prob",
        type=float,
        default=0.1,
        help='replace the caption by "" with this probability (the unconditional model that guidance needs)',
    )
    return diffusion


def merge_prediction_type(args: argparse.Namespace) -> None:
    """--prediction_type is the older spelling of --objective epsilon|v_prediction: keep one value in args.objective."""
    if args.prediction_type and args.objective and args.prediction_type != args.objective:
        raise ValueError(f"--prediction_type={args.prediction_type} contradicts --objective={args.objective}; pass one")
    args.objective = args.objective or args.prediction_type


def check_objective_args(args: argparse.Namespace) -> None:
    """The flags of `add_objective_arguments`, checked against each other and against the objective."""
    check_at_least(args, 0, "noise_offset", "input_perturbation", "huber_c")
    for flag in ("snr_gamma", "sigma_data", "edm_p_std", "edm_sigma_min", "logit_std", "mode_scale"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag}={value} must be positive")
    if args.edm_sigma_max <= args.edm_sigma_min:
        raise ValueError(f"--edm_sigma_max={args.edm_sigma_max} must exceed --edm_sigma_min={args.edm_sigma_min}")
    if args.objective in ("edm", "flow_matching"):
        for flag in ("snr_gamma", "rescale_betas_zero_snr"):
            if getattr(args, flag):
                raise ValueError(
                    f"--{flag} belongs to the DDPM chain of --objective epsilon|v_prediction, "
                    f"not to --objective {args.objective}"
                )
    if args.objective == "edm" and args.input_perturbation:
        raise ValueError(objectives.INPUT_PERTURBATION_NOT_EDM)
    if args.loss_type == "huber" and not 0 < args.huber_c <= 1:
        raise ValueError(f"--huber_c={args.huber_c} must be in (0, 1]")
    if not 0.0 <= args.caption_dropout_prob < 1.0:
        raise ValueError(f"--caption_dropout_prob={args.caption_dropout_prob} must be in [0, 1)")


def check_reflow_args(args: argparse.Namespace) -> None:
    """A reflow run trains on fixed couplings: refuse the flags that would draw other noise or read images."""
    if args.objective != "flow_matching":
        raise ValueError(
            f"--reflow_pairs trains a flow on straight lines between coupled endpoints; add --objective flow_matching "
            f"(got {args.objective})"
        )
    for flag in ("immiscible_noise", "noise_offset", "input_perturbation", "cache_latents", "streaming"):
        if getattr(args, flag):
            raise ValueError(
                f"--{flag} cannot be combined with --reflow_pairs: the pairs fix each latent's noise and hold latents,"
                f" not images; drop --{flag}"
            )


def check_unet_args(args: argparse.Namespace) -> None:
    """The model, validation and snapshot flags, checked before anything is loaded."""
    check_at_least(args, 1, "num_validation_images", "validation_inference_steps", "layers_per_block")
    check_at_least(args, 0, "guidance_scale")
    if not (args.unet_config or args.unet_from_pretrained):
        check_at_least(args, 1, "block_out_channels")
        check_divisible(args, "block_out_channels", "norm_num_groups")
        check_divisible(args, "block_out_channels", "attention_head_dim")
        levels = len(args.block_out_channels)
        outside = [level for level in args.cross_attention_levels or [] if not 0 <= level < levels]
        if outside:
            raise ValueError(
                f"--cross_attention_levels={args.cross_attention_levels} names levels {outside}, but "
                f"--block_out_channels gives {levels} levels (0 to {levels - 1}); without cross-attention the U-Net "
                "ignores the text"
            )
    if args.fsdp:
        # Each of these runs the U-Net or reads its weights on the main process alone, which sharded weights forbid.
        unsupported = [flag for flag in ("use_ema", "lora_rank", "validation_prompts", "snapshot_steps")
                       if getattr(args, flag) not in (None, False, [])]  # fmt: skip
        if unsupported:
            raise ValueError(
                f"--fsdp does not support {', '.join('--' + flag for flag in unsupported)} yet: they use the whole "
                "U-Net on the main process while its weights are sharded; drop them (validate the saved pipeline "
                "afterwards) or drop --fsdp"
            )
    last = args.max_train_steps
    wrong = [step for step in args.snapshot_steps if step < 1 or (last is not None and step > last)]
    if wrong:
        raise ValueError(
            f"--snapshot_steps={args.snapshot_steps}: {wrong} lie outside the run's optimizer steps "
            f"(1 to --max_train_steps={last})"
        )


def add_frozen_component_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the frozen VAE, text encoder and tokenizer come from (`load_frozen_components` reads them)."""
    source = parser.add_argument_group("frozen components")
    source.add_argument("--pretrained_model_name_or_path", help="a local pipeline folder with vae/, text_encoder/, ...")
    source.add_argument("--vae_path", help="a VAE folder (train_vae.py's --output_dir); overrides the pipeline's")
    source.add_argument("--text_encoder_path", help="a CLIP text model folder (train_clip.py writes text_encoder/)")
    source.add_argument("--tokenizer_path", help="a CLIPTokenizer folder (train_clip.py writes tokenizer/)")


def load_frozen_components(
    args: argparse.Namespace,
) -> tuple[ScratchAutoencoderKL, ScratchCLIPTextModel, CLIPTokenizer]:
    """The VAE, text encoder and tokenizer: explicit paths first, then the pipeline folder's subfolders."""
    root = args.pretrained_model_name_or_path

    def location(path: str | None, subfolder: str) -> dict[str, Any]:
        if path:
            return {"pretrained_model_name_or_path": path}
        return {"pretrained_model_name_or_path": root, "subfolder": subfolder}

    vae = ScratchAutoencoderKL.from_pretrained(**location(args.vae_path, "vae"))
    text_encoder = ScratchCLIPTextModel.from_pretrained(**location(args.text_encoder_path, "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(**location(args.tokenizer_path, "tokenizer"))
    return vae, text_encoder, tokenizer


def build_objective(args: argparse.Namespace) -> objectives.Objective:
    """The training objective of `--objective` with its flags (see `hf_scratch.objectives`)."""
    options = objectives.ObjectiveOptions(
        noise_offset=args.noise_offset,
        immiscible_noise=args.immiscible_noise,
        input_perturbation=args.input_perturbation,
        loss_type=args.loss_type,
        huber_schedule=args.huber_schedule,
        huber_c=args.huber_c,
    )
    if args.objective == "edm":
        return objectives.EDMObjective(
            args.sigma_data, args.edm_p_mean, args.edm_p_std, args.edm_sigma_min, args.edm_sigma_max, options=options
        )
    if args.objective == "flow_matching":
        return objectives.FlowMatchingObjective(
            args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, options=options
        )
    return objectives.DDPMObjective(build_scheduler(args), args.snr_gamma, options=options)


def build_scheduler(args: argparse.Namespace) -> ScratchDDPMScheduler:
    """The pipeline's scheduler with the requested options, or SD's training schedule (scaled-linear β, T=1000)."""
    overrides = {"rescale_betas_zero_snr": args.rescale_betas_zero_snr} if args.rescale_betas_zero_snr else {}
    if args.objective:
        overrides["prediction_type"] = args.objective
    if args.rescale_betas_zero_snr:
        overrides["timestep_spacing"] = "trailing"  # Lin et al. Sec. 3.3: sampling must start at t = T
    scheduler_folder = Path(args.pretrained_model_name_or_path or "", "scheduler")
    if args.pretrained_model_name_or_path and scheduler_folder.is_dir():
        config = ScratchDDPMScheduler.load_config(scheduler_folder)
        scheduler = ScratchDDPMScheduler.from_config(config, **overrides)
    else:
        scheduler = ScratchDDPMScheduler(**STABLE_DIFFUSION_BETAS, clip_sample=False, **overrides)
    if scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "epsilon":
        raise ValueError(
            "--rescale_betas_zero_snr gives ᾱ_T = 0, where ε-prediction carries no information about the image; "
            "add --prediction_type v_prediction (Lin et al. 2023, Sec. 3.2)"
        )
    return scheduler


def build_unet(
    args: argparse.Namespace, vae: ScratchAutoencoderKL, text_encoder: ScratchCLIPTextModel
) -> ScratchUNet2DConditionModel:
    if args.unet_from_pretrained:
        unet = ScratchUNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet")
    elif args.unet_config:
        unet = ScratchUNet2DConditionModel.from_config(json.loads(Path(args.unet_config).read_text()))
    else:
        levels = len(args.block_out_channels)
        attention = args.cross_attention_levels if args.cross_attention_levels is not None else range(levels - 1)
        down = ["CrossAttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)]
        unet = ScratchUNet2DConditionModel(
            sample_size=args.resolution // vae_scale_factor(vae),
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels,
            down_block_types=tuple(down),
            up_block_types=tuple(block.replace("Down", "Up") for block in reversed(down)),
            block_out_channels=tuple(args.block_out_channels),
            layers_per_block=args.layers_per_block,
            attention_head_dim=args.attention_head_dim,
            norm_num_groups=args.norm_num_groups,
            cross_attention_dim=text_encoder.config.hidden_size,
        )
    for key, expected, source in (
        ("in_channels", vae.config.latent_channels, "the VAE's latent_channels"),
        ("cross_attention_dim", text_encoder.config.hidden_size, "the text encoder's hidden_size"),
    ):
        if unet.config[key] != expected:
            raise ValueError(f"the U-Net's {key}={unet.config[key]} does not match {source} ({expected})")
    return unet


def vae_scale_factor(vae: ScratchAutoencoderKL) -> int:
    return downsampling_factor(vae.config.block_out_channels)


@dataclass
class UNetStepParts:
    """What one U-Net training step works on, besides the batch and the flags."""

    unet: torch.nn.Module  # prepared by accelerate
    vae: ScratchAutoencoderKL  # frozen
    text_encoder: torch.nn.Module  # frozen, or prepared with trained LoRA adapters (--train_text_encoder_lora)
    tokenizer: CLIPTokenizer
    objective: objectives.Objective
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    trained: torch.nn.Module  # the trained parameters, which are clipped and checked: the U-Net (and text encoder)
    weight_dtype: torch.dtype  # of the frozen weights
    text_cache: "TextEmbeddingCache | None" = None  # --cache_text_embeddings


class TextEmbeddingCache:
    """The frozen text encoder's last hidden states of every distinct caption of the training split and of "" (the
    dropped caption), encoded once, so that a step looks its captions up instead of running the encoder (about a
    tenth of an emoji32 step). The captions are encoded sorted, in fixed batches, so the values never depend on the
    training order: a resumed run reads exactly what the uninterrupted one read."""

    def __init__(
        self, tokenizer: CLIPTokenizer, text_encoder: torch.nn.Module, captions: list[str], device: torch.device,
        batch_size: int = 256,
    ) -> None:  # fmt: skip
        distinct = sorted(set(captions) | {""})
        self.row = {caption: i for i, caption in enumerate(distinct)}
        with torch.no_grad():
            self.embeddings = torch.cat([
                encode_prompts(tokenizer, text_encoder, distinct[start : start + batch_size], device)
                for start in range(0, len(distinct), batch_size)
            ])  # fmt: skip

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(B, L, D): the cached hidden states of `captions`."""
        return self.embeddings[[self.row[caption] for caption in captions]]


def latents_of(
    batch: dict[str, Any], vae: ScratchAutoencoderKL, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """z_0 = E(x) · scaling_factor in float32: a reflow pair's endpoint (--reflow_pairs, already scaled), a sample of
    the cached posterior N(μ, σ²) of each image (--cache_latents), or of the VAE's posterior of the batch's pixels."""
    if "latents" in batch:
        return batch["latents"].to(device, torch.float32)
    if "latent_mean" in batch:
        std = (0.5 * batch["latent_logvar"]).exp()
        latents = batch["latent_mean"] + std * torch.randn_like(std)
    else:
        latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample()
    return latents.to(device, torch.float32) * vae.config.scaling_factor


def drop_captions(captions: list[str], probability: float) -> list[str]:
    """Each caption replaced by "" with `probability`: the unconditional model that guidance needs."""
    dropped = torch.rand(len(captions)) < probability
    return ["" if drop else caption for drop, caption in zip(dropped.tolist(), captions)]


def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: torch.nn.Module, captions: list[str], device: torch.device
) -> torch.Tensor:
    """The text encoder's last hidden states of the captions, padded to the tokenizer's length: (B, L, D)."""
    input_ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(input_ids.to(device))[0]


def train_step(
    batch: dict[str, Any], parts: UNetStepParts, accelerator: Accelerator, args: argparse.Namespace
) -> dict[str, torch.Tensor]:
    """One micro-batch: latents → caption dropout → text embeddings → noise → objective → prediction → loss → backward
    → optimizer step (taken on the last micro-batch of each accumulation window)."""
    device = accelerator.device
    models = (parts.unet, parts.text_encoder) if args.train_text_encoder_lora else (parts.unet,)
    with accelerator.accumulate(*models):
        with torch.no_grad():
            latents = latents_of(batch, parts.vae, device, parts.weight_dtype)
            captions = drop_captions(batch["caption"], args.caption_dropout_prob)
            if parts.text_cache is not None:
                encoder_hidden_states = parts.text_cache(captions)
            else:
                with torch.set_grad_enabled(args.train_text_encoder_lora):
                    encoder_hidden_states = encode_prompts(parts.tokenizer, parts.text_encoder, captions, device)
            if "coupled_noise" in batch:  # reflow: the noise the teacher's endpoint was drawn from
                noise = batch["coupled_noise"].to(device)
            else:
                noise = parts.objective.noise(latents)  # ε, with the offset and the immiscible pairing
            batch_target = parts.objective(latents, noise)  # the network's input, timesteps, target and weights

        model_input = batch_target.model_input
        if args.channels_last:
            model_input = model_input.contiguous(memory_format=torch.channels_last)
        prediction = parts.unet(model_input, batch_target.timesteps, encoder_hidden_states).sample
        loss = parts.objective.loss(prediction, batch_target)
        accelerator.backward(loss)
        step_optimizer(accelerator, parts.trained, parts.optimizer, parts.lr_scheduler, args.max_grad_norm, loss)
    return {"loss": loss}


def main(args: argparse.Namespace) -> None:
    accelerator = create_accelerator(args)
    set_seed(args.seed)
    vae, text_encoder, tokenizer = load_frozen_components(args)
    objective = build_objective(args)
    scheduler = objective.sampling_scheduler()
    unet = build_unet(args, vae, text_encoder)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    lora = args.lora_rank is not None
    if lora:
        unet.to(accelerator.device, dtype=weight_dtype)
        add_lora_adapters(args, unet, text_encoder)
        # The adapters train in float32 under mixed precision too; the frozen weights may stay in half precision.
        cast_training_params([unet, text_encoder], dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)  # before the optimizer, so its moments take the same layout

    if args.streaming:
        images = dataset = batches = load_image_text_stream(args, accelerator)
    elif args.reflow_pairs:
        images = dataset = CoupledLatents(args.reflow_pairs)
        batches = EpochBatches(len(dataset), args.train_batch_size, accelerator, args.seed)
    else:
        images = load_image_text_dataset(args, args.train_split, accelerator, limit=args.max_train_samples)
        if args.cache_latents:
            cache_dir = args.latent_cache_dir or Path(args.output_dir, "latent-cache")
            dataset = cache_latents(images, vae, accelerator, args.train_batch_size, cache_dir)
        else:
            dataset = images
        batches = EpochBatches(len(dataset), args.train_batch_size, accelerator, args.seed)
    args = with_run_length(args, batches.updates_per_epoch)
    trainable = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    optimizer, lr_scheduler = create_optimizer(args, trainable, accelerator)
    if args.train_text_encoder_lora:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
        # One module holding both, for the trainer's checksums and finiteness checks and for gradient clipping.
        trained = torch.nn.ModuleDict(
            {"unet": accelerator.unwrap_model(unet), "text_encoder": accelerator.unwrap_model(text_encoder)}
        )
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained = unet
    trainer = Trainer(accelerator, args, dataset, batches, trained, lr_scheduler, name="train_unet")
    trainer.resume()
    text_cache = None
    if args.cache_text_embeddings:
        text_cache = TextEmbeddingCache(tokenizer, text_encoder, dataset.captions, accelerator.device)
        size = text_cache.embeddings.nbytes / 2**20
        logger.info(f"text embeddings of {len(text_cache.row)} captions cached in memory: {size:.0f} MiB")
    parts = UNetStepParts(
        unet, vae, text_encoder, tokenizer, objective, optimizer, lr_scheduler, trained, weight_dtype, text_cache
    )

    def pipeline() -> ScratchStableDiffusionPipeline:
        return ScratchStableDiffusionPipeline(
            vae=vae,
            text_encoder=accelerator.unwrap_model(text_encoder),
            tokenizer=tokenizer,
            unet=accelerator.unwrap_model(unet),
            scheduler=scheduler,
        )

    def save_result(folder: Path) -> None:
        """The LoRA file of a LoRA run, else the whole (EMA) pipeline."""
        if lora:
            adapted_text_encoder = accelerator.unwrap_model(text_encoder) if args.train_text_encoder_lora else None
            save_lora_weights(folder, accelerator.unwrap_model(unet), adapted_text_encoder)
        else:
            with trainer.ema_weights():
                whole = pipeline()
                whole.unet = trainer.gathered(whole.unet)  # under FSDP, the weights gathered from every rank
                whole.save_pretrained(folder)

    def validate(step: int) -> None:
        with trainer.ema_weights():
            pipe = pipeline()
            pipe.set_progress_bar_config(disable=True)
            result = pipe(
                args.validation_prompts,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.guidance_scale,
                num_images_per_prompt=args.num_validation_images,
                generator=torch.Generator().manual_seed(args.seed),
            )
        grid = image_grid(result.images, columns=args.num_validation_images)  # one row per prompt
        save_validation_grid(grid, step, args.output_dir, accelerator)

    def save_snapshot(step: int) -> None:
        if step in args.snapshot_steps:
            trainer.on_main_process(save_result, Path(args.output_dir, "snapshots", f"step-{step}"))

    def save() -> None:
        save_result(Path(args.output_dir))
        write_card = write_lora_model_card if lora else write_model_card
        write_card(args, trainer, len(dataset), images.num_skipped, scheduler)

    step = functools.partial(train_step, parts=parts, accelerator=accelerator, args=args)
    trainer.run(step, save, validate if args.validation_prompts else None, on_update=save_snapshot)


if __name__ == "__main__":
    main(parse_args())
