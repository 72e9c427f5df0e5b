"""Train the KL autoencoder of latent diffusion from scratch (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.1).

The loss per image is a pixel reconstruction term plus a slight KL pull of q(z|x) towards N(0, I):

    L = mean |x − D(z)|  (or squared, --reconstruction_loss l2)  +  --kl_weight · KL(q(z|x) || N(0, I)) / n_latent

with z ~ q(z|x) (the reparameterisation trick). Both terms are averaged per element, so --kl_weight compares a
per-pixel error with a per-latent-element KL; LDM's "f4" autoencoders use a KL weight of 1e-6 on sums, which is of the
same order. With --use_discriminator a PatchGAN (Isola et al. 2017, arXiv:1611.07004) joins at --disc_start with
hinge losses (Lim & Ye 2017, arXiv:1705.02894), as LDM's autoencoders do, at a fixed --disc_weight instead of LDM's
adaptive one.

Validation reports the reconstruction PSNR of the validation split through the posterior mean. At the end the script
sets `scaling_factor` to 1 / std of the training latents (LDM Sec. 4.3.2), so diffusion sees unit-variance latents,
and writes the VAE with `save_pretrained` to --output_dir.

`--pretrained_vae DIR --train_decoder_only` fine-tunes the decoder of a trained VAE and keeps its encoder, and so its
latent space and `scaling_factor`, bit for bit: a U-Net trained on the old latents works with the new decoder (as
Stable Diffusion's ft-MSE VAE was made). The KL term then has no gradient and is left out.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from PIL import Image
from torch import nn

from hf_scratch.metrics import psnr, tensor_to_image
from hf_scratch.models.vae import ScratchAutoencoderKL
from hf_scratch.training.arguments import build_parser, check_args, check_at_least, check_divisible
from hf_scratch.training.data import EpochBatches, collate, image_grid, load_image_text_dataset
from hf_scratch.training.streaming import load_image_text_stream
from hf_scratch.training.trainer import (
    Trainer,
    create_accelerator,
    create_optimizer,
    step_optimizer,
    with_run_length,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0], captions=False)
    model = parser.add_argument_group("model")
    model.add_argument("--model_config", help="a JSON file of ScratchAutoencoderKL config keys; overrides the flags")
    model.add_argument("--pretrained_vae", help="a VAE folder (this script's --output_dir) to start from")
    model.add_argument(
        "--train_decoder_only",
        action="store_true",
        help="with --pretrained_vae: train post_quant_conv and the decoder, keep the encoder",
    )
    model.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[32, 64, 128],
        help="one entry per level; the image shrinks by 2^(levels-1)",
    )
    model.add_argument("--latent_channels", type=int, default=4, help="channels of the latent z")
    model.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per level")
    model.add_argument(
        "--norm_num_groups", type=int, default=32, help="GroupNorm groups; must divide every --block_out_channels entry"
    )

    loss = parser.add_argument_group("loss")
    loss.add_argument(
        "--reconstruction_loss", choices=("l1", "l2"), default="l1", help="the pixel loss of the reconstruction"
    )
    loss.add_argument("--kl_weight", type=float, default=1e-6, help="weight of KL(q(z|x) ‖ N(0, I)) per latent element")
    loss.add_argument(
        "--use_discriminator", action="store_true", help="add a PatchGAN discriminator's adversarial loss (hinge)"
    )
    loss.add_argument("--disc_start", type=int, default=0, help="optimizer step at which the GAN losses start")
    loss.add_argument("--disc_weight", type=float, default=0.1, help="weight of the generator's adversarial loss")
    loss.add_argument("--disc_channels", type=int, default=64, help="channels of the discriminator's first convolution")
    loss.add_argument("--disc_layers", type=int, default=3, help="stride-2 convolutions of the PatchGAN")
    loss.add_argument("--disc_learning_rate", type=float, default=None, help="default: --learning_rate")
    parser.add_argument(
        "--num_scaling_samples",
        type=int,
        default=256,
        help="training images whose latents set scaling_factor at the end",
    )
    args = parser.parse_args(argv)
    check_args(args)
    if args.train_decoder_only and not args.pretrained_vae:
        raise ValueError("--train_decoder_only needs --pretrained_vae, the VAE whose encoder it keeps")
    if args.pretrained_vae and args.model_config:
        raise ValueError("--pretrained_vae and --model_config both give the architecture; pass one")
    if args.pretrained_vae and not Path(args.pretrained_vae, "config.json").is_file():
        raise ValueError(f"--pretrained_vae={args.pretrained_vae!r} holds no config.json; pass a VAE folder")
    check_at_least(args, 0, "kl_weight", "disc_weight", "disc_start")
    check_at_least(args, 1, "latent_channels", "layers_per_block", "num_scaling_samples")
    check_at_least(args, 1, "disc_channels", "disc_layers")
    if not (args.pretrained_vae or args.model_config):
        check_at_least(args, 1, "block_out_channels")
        check_divisible(args, "block_out_channels", "norm_num_groups")
    return args


def build_vae(args: argparse.Namespace) -> ScratchAutoencoderKL:
    if args.pretrained_vae:
        vae = ScratchAutoencoderKL.from_pretrained(args.pretrained_vae, torch_dtype=torch.float32)
        if args.train_decoder_only:
            for frozen in (vae.encoder, vae.quant_conv):
                if frozen is not None:
                    frozen.requires_grad_(False)
        return vae
    if args.model_config:
        return ScratchAutoencoderKL.from_config(json.loads(Path(args.model_config).read_text()))
    levels = len(args.block_out_channels)
    return ScratchAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(args.block_out_channels),
        latent_channels=args.latent_channels,
        layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
    )


class AutoencoderForTraining(nn.Module):
    """Encode, sample and decode in one `forward`, so DistributedDataParallel sees every parameter in one call."""

    def __init__(self, vae: ScratchAutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction D(z) with z ~ q(z|x), KL(q(z|x) || N(0, I)) per latent element and sample)."""
        posterior = self.vae.encode(pixel_values).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        return reconstruction, posterior.kl() / posterior.mean[0].numel()


class PatchDiscriminator(nn.Module):
    """PatchGAN: a stack of 4x4 convolutions whose output map scores each overlapping patch as real (>0) or fake."""

    def __init__(self, channels: int, num_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, num_layers + 1):
            out = channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # (B, 1, h, w) patch logits


@torch.no_grad()
def evaluate_reconstructions(
    vae: ScratchAutoencoderKL, dataset: torch.utils.data.Dataset, batch_size: int, device: torch.device
) -> tuple[float, Image.Image]:
    """(mean PSNR of the posterior-mean reconstructions, a grid of the first 8 originals above their
    reconstructions); the PSNR of images mapped from the VAE's [-1, 1] to [0, 1]."""
    vae.eval()
    scores, shown = [], None
    for start in range(0, len(dataset), batch_size):
        pixels = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])["pixel_values"]
        pixels = pixels.to(device)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        images, reconstructions = (pixels.float() + 1) / 2, (reconstruction.float().clamp(-1, 1) + 1) / 2  # [0, 1]
        scores.append(psnr(reconstructions, images))
        if shown is None:
            shown = (images[:8], reconstructions[:8])
    vae.train()
    originals, reconstructions = shown
    grid = image_grid([tensor_to_image(image) for image in (*originals, *reconstructions)], columns=len(originals))
    return torch.cat(scores).mean().item(), grid


@torch.no_grad()
def latent_scaling_factor(
    vae: ScratchAutoencoderKL, dataset: torch.utils.data.Dataset, count: int, batch_size: int
) -> float:
    """1 / std of posterior samples over the first `count` training images."""
    latents = []
    for start in range(0, min(count, len(dataset)), batch_size):
        indices = range(start, min(start + batch_size, count, len(dataset)))
        pixels = collate([dataset[i] for i in indices])["pixel_values"].to(vae.device)
        latents.append(vae.encode(pixels).latent_dist.sample().float())
    return 1.0 / torch.cat(latents).std().item()


def main(args: argparse.Namespace) -> None:
    accelerator = create_accelerator(args)
    set_seed(args.seed)
    vae = build_vae(args)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    autoencoder = AutoencoderForTraining(vae)

    if args.streaming:
        train = batches = load_image_text_stream(args, accelerator)
    else:
        train = load_image_text_dataset(args, args.train_split, accelerator, limit=args.max_train_samples)
        batches = EpochBatches(len(train), args.train_batch_size, accelerator, args.seed)
    validation = None
    if args.validation_split != "none":
        validation = load_image_text_dataset(args, args.validation_split, accelerator)
    args = with_run_length(args, batches.updates_per_epoch)
    trainable = [parameter for parameter in autoencoder.parameters() if parameter.requires_grad]
    optimizer, lr_scheduler = create_optimizer(args, trainable, accelerator)
    autoencoder, optimizer, lr_scheduler = accelerator.prepare(autoencoder, optimizer, lr_scheduler)
    if args.use_discriminator:
        discriminator = PatchDiscriminator(args.disc_channels, args.disc_layers)
        disc_args = argparse.Namespace(**{**vars(args), "learning_rate": args.disc_learning_rate or args.learning_rate})
        disc_optimizer, disc_scheduler = create_optimizer(disc_args, discriminator.parameters(), accelerator)
        discriminator, disc_optimizer, disc_scheduler = accelerator.prepare(
            discriminator, disc_optimizer, disc_scheduler
        )
    trainer = Trainer(accelerator, args, train, batches, autoencoder, lr_scheduler, name="train_vae")
    trainer.resume()
    reconstruction_loss = F.l1_loss if args.reconstruction_loss == "l1" else F.mse_loss

    def train_step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"].to(accelerator.device)
        gan = args.use_discriminator and trainer.global_step >= args.disc_start
        models = (autoencoder, discriminator) if args.use_discriminator else (autoencoder,)
        with accelerator.accumulate(*models):
            reconstruction, kl = autoencoder(pixels)
            rec_loss = reconstruction_loss(reconstruction.float(), pixels.float())
            kl_loss = kl.mean()
            loss = rec_loss if args.train_decoder_only else rec_loss + args.kl_weight * kl_loss
            logs = {"reconstruction_loss": rec_loss, "kl": kl_loss}
            if gan:
                # The generator's view of the critic: its weights stay out of this backward pass.
                critic = accelerator.unwrap_model(discriminator).requires_grad_(False)
                generator_loss = -critic(reconstruction).mean()
                critic.requires_grad_(True)
                loss = loss + args.disc_weight * generator_loss
                logs["generator_loss"] = generator_loss
            accelerator.backward(loss)
            step_optimizer(accelerator, autoencoder, optimizer, lr_scheduler, args.max_grad_norm, loss)
            if gan:
                real, fake = discriminator(pixels), discriminator(reconstruction.detach())
                disc_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())  # hinge loss
                accelerator.backward(disc_loss)
                step_optimizer(
                    accelerator, discriminator, disc_optimizer, disc_scheduler, args.max_grad_norm, disc_loss
                )
                logs["discriminator_loss"] = disc_loss
        return {"loss": loss, **logs}

    def validate(step: int) -> None:
        with trainer.ema_weights():
            score, grid = evaluate_reconstructions(vae, validation, args.train_batch_size, accelerator.device)
        accelerator.log({"validation_psnr": score}, step=step)
        folder = Path(args.output_dir, "validation")
        folder.mkdir(exist_ok=True)
        grid.save(folder / f"step-{step:06d}.png")
        with open(folder / "psnr.jsonl", "a") as handle:
            handle.write(json.dumps({"step": step, "psnr": score}) + "\n")

    def save() -> None:
        with trainer.ema_weights():
            if not args.train_decoder_only:  # a kept encoder keeps its latents' scale
                samples = train.head(args.num_scaling_samples) if args.streaming else train
                vae.register_to_config(
                    scaling_factor=latent_scaling_factor(vae, samples, args.num_scaling_samples, args.train_batch_size)
                )
            vae.save_pretrained(args.output_dir)

    trainer.run(train_step, save, validate if validation is not None else None)


if __name__ == "__main__":
    main(parse_args())
