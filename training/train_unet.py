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
the scheduled pseudo-Huber loss (Khrapov & Kotov 2024, arXiv:2403.16728), offset noise, and caption dropout, which
trains the unconditional model that classifier-free guidance needs (Ho & Salimans 2022, arXiv:2207.12598).

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
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from common import (
    EpochBatches,
    Trainer,
    build_parser,
    check_args,
    create_accelerator,
    create_optimizer,
    image_grid,
    load_image_text_dataset,
    optimizer_step,
    tracker_config,
)
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from hf_scratch import objectives
from hf_scratch.models.clip import ScratchCLIPTextModel
from hf_scratch.models.layers import process_umask
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import ScratchAutoencoderKL, downsampling_factor
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers.ddpm import ScratchDDPMScheduler
from hf_scratch.schedulers.schedule import STABLE_DIFFUSION_BETAS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    source = parser.add_argument_group("frozen components")
    source.add_argument("--pretrained_model_name_or_path", help="a local pipeline folder with vae/, text_encoder/, ...")
    source.add_argument("--vae_path", help="a VAE folder (train_vae.py's --output_dir); overrides the pipeline's")
    source.add_argument("--text_encoder_path", help="a CLIP text model folder (train_clip.py writes text_encoder/)")
    source.add_argument("--tokenizer_path", help="a CLIPTokenizer folder (train_clip.py writes tokenizer/)")

    unet = parser.add_argument_group("U-Net (from scratch unless --unet_from_pretrained)")
    unet.add_argument("--unet_from_pretrained", action="store_true", help="start from the pipeline folder's unet/")
    unet.add_argument("--unet_config", help="a JSON file of ScratchUNet2DConditionModel config keys")
    unet.add_argument("--block_out_channels", type=int, nargs="+", default=[64, 128, 256])
    unet.add_argument("--layers_per_block", type=int, default=2)
    unet.add_argument("--attention_head_dim", type=int, default=8, help="heads per block (diffusers' naming)")
    unet.add_argument("--norm_num_groups", type=int, default=32)
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
    diffusion.add_argument("--loss_type", choices=objectives.LOSS_TYPES, default="l2")
    diffusion.add_argument("--huber_schedule", choices=objectives.HUBER_SCHEDULES, default="snr")
    diffusion.add_argument("--huber_c", type=float, default=0.1, help="c_0 of the pseudo-Huber loss")
    diffusion.add_argument("--noise_offset", type=float, default=0.0)
    diffusion.add_argument("--caption_dropout_prob", type=float, default=0.1)
    diffusion.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode the dataset once and sample latents from the cached posteriors",
    )

    lora = parser.add_argument_group("LoRA (Hu et al. 2021): adapt the pipeline folder's U-Net instead of training one")
    lora.add_argument("--lora_rank", type=int, default=None, help="r, the rank of each low-rank update B·A")
    lora.add_argument("--lora_alpha", type=float, default=None, help="α, which scales B·A by α/r (default: r)")
    lora.add_argument("--train_text_encoder_lora", action="store_true", help="adapt the text encoder's attention too")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_prompts", nargs="+", default=[])
    validation.add_argument("--num_validation_images", type=int, default=4, help="per prompt")
    validation.add_argument("--validation_inference_steps", type=int, default=50)
    validation.add_argument("--guidance_scale", type=float, default=4.0)
    validation.add_argument(
        "--snapshot_steps",
        type=int,
        nargs="+",
        default=[],
        help="also save the (EMA) pipeline, or the LoRA, at these steps, to snapshots/step-N",
    )
    args = parser.parse_args(argv)
    check_args(args)
    if args.prediction_type and args.objective and args.prediction_type != args.objective:
        raise ValueError(f"--prediction_type={args.prediction_type} contradicts --objective={args.objective}; pass one")
    args.objective = args.objective or args.prediction_type
    if args.lora_rank is not None:
        check_lora_args(args)
    else:
        for flag in ("lora_alpha", "train_text_encoder_lora"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} sets up a LoRA run; add --lora_rank R (e.g. 4) or drop --{flag}")
    if args.objective in ("edm", "flow_matching"):
        for flag in ("snr_gamma", "rescale_betas_zero_snr"):
            if getattr(args, flag):
                raise ValueError(
                    f"--{flag} belongs to the DDPM chain of --objective epsilon|v_prediction, "
                    f"not to --objective {args.objective}"
                )
    if args.loss_type == "huber" and not 0 < args.huber_c <= 1:
        raise ValueError(f"--huber_c={args.huber_c} must be in (0, 1]")
    if not args.pretrained_model_name_or_path and not (
        args.vae_path and args.text_encoder_path and args.tokenizer_path
    ):
        raise ValueError(
            "pass --pretrained_model_name_or_path (a pipeline folder), or all of --vae_path, --text_encoder_path and "
            "--tokenizer_path"
        )
    if args.unet_from_pretrained and not args.pretrained_model_name_or_path:
        raise ValueError("--unet_from_pretrained needs --pretrained_model_name_or_path, whose unet/ it loads")
    if not 0.0 <= args.caption_dropout_prob < 1.0:
        raise ValueError(f"--caption_dropout_prob={args.caption_dropout_prob} must be in [0, 1)")
    return args


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' `load_lora_weights` looks for
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def base_objective(pipeline_folder: str) -> str | None:
    """The objective the pipeline folder's U-Net was trained with, read from its scheduler (None without one)."""
    config_file = Path(pipeline_folder, "scheduler", "scheduler_config.json")
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if "FlowMatch" in config.get("_class_name", ""):
        return "flow_matching"
    if config.get("_class_name", "").startswith("EDM"):
        return "edm"
    return config.get("prediction_type", "epsilon")


def check_lora_args(args: argparse.Namespace) -> None:
    """Refuse flags that a LoRA run cannot honour, naming them; adopt the base model's U-Net and objective."""
    if args.lora_rank < 1:
        raise ValueError(f"--lora_rank={args.lora_rank} must be at least 1 (4 to 64 are usual)")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha={args.lora_alpha} must be positive (it scales B·A by α/r; default r)")
    if not args.pretrained_model_name_or_path:
        raise ValueError("--lora_rank adapts a pipeline's U-Net: pass --pretrained_model_name_or_path (its folder)")
    for flag, reason in (
        ("unet_config", "it builds a new U-Net, while a LoRA adapts the pipeline folder's"),
        ("use_ema", "the EMA averages the whole U-Net, not the adapters"),
        ("rescale_betas_zero_snr", "the base model keeps the noise schedule it was trained with"),
    ):
        if getattr(args, flag):
            raise ValueError(f"--{flag} cannot be combined with --lora_rank: {reason}; drop --{flag}")
    base = base_objective(args.pretrained_model_name_or_path)
    if args.objective and base and args.objective != base:
        raise ValueError(
            f"--objective {args.objective} differs from the objective of the base model in "
            f"{args.pretrained_model_name_or_path} ({base}, from its scheduler); a LoRA must keep it: drop --objective"
        )
    args.objective = args.objective or base
    args.unet_from_pretrained = True


def add_lora_adapters(args: argparse.Namespace, unet: ScratchUNet2DConditionModel, text_encoder: Any) -> None:
    """Freeze the U-Net (and text encoder) and give their attention projections trainable LoRA adapters.

    peft initialises A with Gaussian entries and B = 0, so W' = W at step 0. The U-Net takes diffusers' `add_adapter`;
    the text encoder takes peft's `inject_adapter_in_model`, what transformers' `add_adapter` calls (and which, unlike
    it, does not require peft >= 0.22)."""
    alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS)
    )
    if args.train_text_encoder_lora:
        config = LoraConfig(
            r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS
        )
        inject_adapter_in_model(config, text_encoder, adapter_name="default")
        text_encoder.train()


def save_lora_weights(folder: Path, unet: ScratchUNet2DConditionModel, text_encoder: Any | None) -> Path:
    """Write the adapters to `folder/pytorch_lora_weights.safetensors` as diffusers' training scripts do (keys
    `unet.…` and `text_encoder.…`, with each adapter's LoraConfig, α included, as metadata), atomically: to a temporary
    name first, then renamed, readable as the umask allows."""
    folder.mkdir(parents=True, exist_ok=True)
    layers, metadata = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}, {}
    metadata["unet_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()
    if text_encoder is not None:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        metadata["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    staging = f".{LORA_WEIGHTS}.partial"
    ScratchStableDiffusionPipeline.save_lora_weights(folder, weight_name=staging, **layers, **metadata)
    os.chmod(folder / staging, 0o666 & ~process_umask())
    os.replace(folder / staging, folder / LORA_WEIGHTS)
    return folder / LORA_WEIGHTS


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


def build_objective(args: argparse.Namespace) -> Any:
    """The training objective of `--objective` with its flags (see `hf_scratch.objectives`)."""
    if args.objective == "edm":
        return objectives.EDMObjective(
            args.sigma_data, args.edm_p_mean, args.edm_p_std, args.edm_sigma_min, args.edm_sigma_max
        )
    if args.objective == "flow_matching":
        return objectives.FlowMatchingObjective(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    return objectives.DDPMObjective(build_scheduler(args), args.snr_gamma)


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


def describe_objective(args: argparse.Namespace, scheduler: Any) -> str:
    """One line of the model card naming the objective and its settings."""
    extras = f"immiscible noise {args.immiscible_noise}, loss {args.loss_type}" + (
        f" ({args.huber_schedule} schedule, c_0 {args.huber_c})" if args.loss_type == "huber" else ""
    )
    if args.objective == "edm":
        return (
            f"EDM (Karras et al. 2022), σ_data {args.sigma_data}, ln σ ~ N({args.edm_p_mean}, {args.edm_p_std}²), "
            f"{extras}"
        )
    if args.objective == "flow_matching":
        return f"flow matching (rectified flow), t ~ {args.weighting_scheme}, {extras}"
    return (
        f"{scheduler.config.prediction_type}, {scheduler.config.num_train_timesteps} timesteps, "
        f"β schedule {scheduler.config.beta_schedule}, zero terminal SNR {scheduler.config.rescale_betas_zero_snr}, "
        f"min-SNR γ {args.snr_gamma}, noise offset {args.noise_offset}, {extras}"
    )


def write_model_card(
    args: argparse.Namespace, trainer: Trainer, dataset_size: int, skipped: int, scheduler: Any
) -> None:
    """README.md of the pipeline folder: how to load it, the data, the objective, the run and its compute."""
    compute = trainer.compute_summary()
    source = args.train_data_dir or args.dataset_name
    origin = f"fine-tuned from `{args.pretrained_model_name_or_path}`" if args.unet_from_pretrained else "from scratch"
    card = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [text-to-image, latent-diffusion, hf-scratch]
---

# hf-scratch latent diffusion model

A U-Net trained {origin} by `training/train_unet.py` of hf-scratch, in the latent space of a frozen VAE and
conditioned on a frozen CLIP text encoder.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{args.output_dir}", trust_remote_code=True)
image = pipe("{(args.validation_prompts or ["a prompt"])[0]}", guidance_scale={args.guidance_scale}).images[0]
```

## Data
- source: `{source}`, split `{args.train_split}`, {dataset_size} images ({skipped} skipped because they do not decode)
- resolution {args.resolution} px, captions from column `{args.caption_column}`, dropped with probability
  {args.caption_dropout_prob} for classifier-free guidance

## Training
- objective: {describe_objective(args, scheduler)}
- sampler saved with the model: `{type(scheduler).__name__}`
- {compute["optimizer_steps"]} optimizer steps of {compute["samples_per_step"]} samples, learning rate
  {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps), EMA {args.use_ema}
- command: `{compute["command"]}`

## Compute
- {compute["processes"]} process(es) on {compute["device"]}
- {compute["samples_per_s"]} samples/s; {compute["wall_seconds_this_session"]} s of wall time in the last session

## Limitations
A small model trained briefly on a small dataset: expect rough images, and only for prompts like its captions.
"""
    (Path(args.output_dir) / "README.md").write_text(card)


def write_lora_model_card(
    args: argparse.Namespace, trainer: Trainer, dataset_size: int, skipped: int, scheduler: Any
) -> None:
    """README.md next to the LoRA file: the base model, the adapters, how to load them, the data and the run."""
    compute = trainer.compute_summary()
    alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
    adapted = "the U-Net's attention projections" + (" and the text encoder's" if args.train_text_encoder_lora else "")
    prompt = (args.validation_prompts or ["a prompt"])[0]
    card = f"""---
library_name: diffusers
base_model: {args.pretrained_model_name_or_path}
tags: [text-to-image, lora, hf-scratch]
---

# LoRA for `{args.pretrained_model_name_or_path}`

Low-rank adapters (Hu et al. 2021, arXiv:2106.09685) of rank r = {args.lora_rank} and α = {alpha} on {adapted}, trained
by `training/train_unet.py --lora_rank` of hf-scratch: each adapted weight becomes W' = W + (α/r)·B·A.

```python
from hf_scratch import ScratchStableDiffusionPipeline

pipe = ScratchStableDiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")
pipe.load_lora_weights("{args.output_dir}")
image = pipe("{prompt}", guidance_scale={args.guidance_scale}, cross_attention_kwargs={{"scale": 1.0}}).images[0]
```

diffusers' `StableDiffusionPipeline.load_lora_weights` reads the same `{LORA_WEIGHTS}`.

## Data
- source: `{args.train_data_dir or args.dataset_name}`, split `{args.train_split}`, {dataset_size} images
  ({skipped} skipped because they do not decode), resolution {args.resolution} px, captions from column
  `{args.caption_column}`

## Training
- objective: {describe_objective(args, scheduler)}
- {compute["optimizer_steps"]} optimizer steps of {compute["samples_per_step"]} samples, learning rate
  {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)
- command: `{compute["command"]}`
- {compute["processes"]} process(es) on {compute["device"]}, {compute["samples_per_s"]} samples/s
"""
    (Path(args.output_dir) / "README.md").write_text(card)


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

    images = load_image_text_dataset(args, args.train_split, accelerator, limit=args.max_train_samples)
    dataset = cache_latents(images, vae, accelerator, args.train_batch_size) if args.cache_latents else images
    batches = EpochBatches(len(dataset), args.train_batch_size, accelerator, args.seed)
    trainable = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    optimizer, lr_scheduler = create_optimizer(args, trainable, batches.updates_per_epoch, accelerator)
    if args.train_text_encoder_lora:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
        # One module holding both, for the trainer's checksums and finiteness checks and for gradient clipping.
        trained = torch.nn.ModuleDict(
            {"unet": accelerator.unwrap_model(unet), "text_encoder": accelerator.unwrap_model(text_encoder)}
        )
        accumulated = (unet, text_encoder)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained, accumulated = unet, (unet,)
    trainer = Trainer(accelerator, args, dataset, batches, trained, lr_scheduler)
    trainer.resume()
    accelerator.init_trackers("train_unet", config=tracker_config(args))

    def encode_prompts(captions: list[str]) -> torch.Tensor:
        input_ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(input_ids.to(accelerator.device))[0]

    def train_step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with accelerator.accumulate(*accumulated):
            with torch.no_grad():
                if args.cache_latents:
                    std = (0.5 * batch["latent_logvar"]).exp()
                    latents = batch["latent_mean"] + std * torch.randn_like(std)
                else:
                    pixels = batch["pixel_values"].to(accelerator.device, weight_dtype)
                    latents = vae.encode(pixels).latent_dist.sample()
                latents = latents.to(accelerator.device, torch.float32) * vae.config.scaling_factor
                dropped = torch.rand(len(batch["caption"])) < args.caption_dropout_prob
                captions = ["" if drop else caption for drop, caption in zip(dropped.tolist(), batch["caption"])]
                with torch.set_grad_enabled(args.train_text_encoder_lora):
                    encoder_hidden_states = encode_prompts(captions)

                noise = torch.randn_like(latents)
                if args.noise_offset:
                    noise += args.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
                if args.immiscible_noise:
                    noise = objectives.immiscible_noise(latents, noise)
                batch_target = objective(latents, noise)

            model_input = batch_target.model_input
            if args.channels_last:
                model_input = model_input.contiguous(memory_format=torch.channels_last)
            prediction = unet(model_input, batch_target.timesteps, encoder_hidden_states).sample
            huber_c = None
            if args.loss_type == "huber":
                discrete = batch_target.timesteps if isinstance(objective, objectives.DDPMObjective) else None
                huber_c = objectives.huber_c(
                    batch_target.noise_to_signal, args.huber_schedule, args.huber_c, timesteps=discrete
                )
            loss = objectives.per_sample_loss(prediction, batch_target.target, args.loss_type, huber_c)
            loss = (loss * batch_target.weights).mean()
            optimizer_step(accelerator, loss, trained, optimizer, lr_scheduler, args.max_grad_norm)
        return {"loss": loss}

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
                pipeline().save_pretrained(folder)

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
        folder = Path(args.output_dir, "validation")
        folder.mkdir(exist_ok=True)
        grid.save(folder / f"step-{step:06d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")

    def save_snapshot(step: int) -> None:
        if step in args.snapshot_steps:
            trainer.on_main_process(save_result, Path(args.output_dir, "snapshots", f"step-{step}"))

    def save() -> None:
        save_result(Path(args.output_dir))
        write_card = write_lora_model_card if lora else write_model_card
        write_card(args, trainer, len(dataset), images.num_skipped, scheduler)

    trainer.run(train_step, save, validate if args.validation_prompts else None, on_update=save_snapshot)


if __name__ == "__main__":
    main(parse_args())
