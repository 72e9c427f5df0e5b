"""Train CLIP from scratch on captioned images (Radford et al. 2021, arXiv:2103.00020).

A byte-level BPE tokenizer is learned from the training captions (or taken from --tokenizer_dir). Both towers, their
projections and the temperature τ are trained with the symmetric InfoNCE loss of CLIP's Figure 3 on the batch of each
process: logits = exp(logit_scale) · cos(text_i, image_j), cross-entropy over rows and over columns. As in the paper,
logit_scale = log(1/τ) starts at log(1/0.07) and is clipped to at most log(100).

Validation is zero-shot retrieval on the validation split: for each caption the images ranked by similarity
(text→image), and for each image the captions (image→text). A hit is an item with the same caption as the query, so
several images that share a caption count as equally correct. Top-1 and top-5 are logged.

--output_dir receives the full `ScratchCLIPModel`, plus `tokenizer/` and `text_encoder/` (the text tower alone, a
`ScratchCLIPTextModel`), which `train_unet.py` takes as --tokenizer_path and --text_encoder_path.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import CLIPTokenizer

from hf_scratch.metrics import retrieval_accuracy, text_positives
from hf_scratch.models.clip import ScratchCLIPConfig, ScratchCLIPModel
from hf_scratch.tokenization import train_clip_bpe_tokenizer
from hf_scratch.training.arguments import build_parser, check_args, check_at_least, check_divisible
from hf_scratch.training.data import EpochBatches, collate, load_image_text_dataset
from hf_scratch.training.trainer import (
    Trainer,
    create_accelerator,
    create_optimizer,
    step_optimizer,
    with_run_length,
)

MAX_LOGIT_SCALE = math.log(100.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0])
    tokens = parser.add_argument_group("tokenizer")
    tokens.add_argument("--tokenizer_dir", help="use this CLIPTokenizer instead of learning one from the captions")
    tokens.add_argument("--vocab_size", type=int, default=4096, help="at most this many tokens when learning one")
    tokens.add_argument("--max_length", type=int, default=32, help="tokens per caption, BOS and EOS included")

    model = parser.add_argument_group("model")
    model.add_argument("--model_config", help="a JSON file of ScratchCLIPConfig keys; overrides the flags below")
    model.add_argument("--text_hidden_size", type=int, default=256, help="width of the text transformer")
    model.add_argument("--text_layers", type=int, default=4, help="layers of the text transformer")
    model.add_argument("--text_heads", type=int, default=4, help="attention heads of the text transformer")
    model.add_argument("--vision_hidden_size", type=int, default=256, help="width of the vision transformer")
    model.add_argument("--vision_layers", type=int, default=4, help="layers of the vision transformer")
    model.add_argument("--vision_heads", type=int, default=4, help="attention heads of the vision transformer")
    model.add_argument(
        "--patch_size", type=int, default=8, help="pixels a side of each image patch; must divide --resolution"
    )
    model.add_argument("--projection_dim", type=int, default=256, help="dimension of the shared image-text embedding")
    args = parser.parse_args(argv)
    check_args(args)
    if args.streaming:
        raise ValueError(
            "--streaming is for train_vae.py and train_unet.py; train_clip.py learns its tokenizer and validates "
            "retrieval over every caption, so it reads its split whole (drop --streaming)"
        )
    check_at_least(args, 1, "patch_size", "text_layers", "vision_layers", "projection_dim")
    check_at_least(args, 2, "max_length")  # BOS and EOS
    if args.resolution % args.patch_size:
        raise ValueError(f"--patch_size={args.patch_size} must divide --resolution={args.resolution}")
    if not args.model_config:
        check_divisible(args, "text_hidden_size", "text_heads")
        check_divisible(args, "vision_hidden_size", "vision_heads")
    return args


def prepare_tokenizer(args: argparse.Namespace, captions: list[str], accelerator) -> CLIPTokenizer:
    """--tokenizer_dir, or a BPE vocabulary learned from `captions` by the main process into <output_dir>/tokenizer."""
    if args.tokenizer_dir:
        return CLIPTokenizer.from_pretrained(args.tokenizer_dir, model_max_length=args.max_length)
    save_dir = Path(args.output_dir, "tokenizer")
    if accelerator.is_main_process:
        train_clip_bpe_tokenizer(captions, args.vocab_size, save_dir, model_max_length=args.max_length)
    accelerator.wait_for_everyone()
    return CLIPTokenizer.from_pretrained(save_dir)


def build_clip(args: argparse.Namespace, tokenizer: CLIPTokenizer) -> ScratchCLIPModel:
    if args.model_config:
        return ScratchCLIPModel(ScratchCLIPConfig(**json.loads(Path(args.model_config).read_text())))
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.text_hidden_size,
        intermediate_size=4 * args.text_hidden_size,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        max_position_embeddings=args.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        hidden_size=args.vision_hidden_size,
        intermediate_size=4 * args.vision_hidden_size,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        image_size=args.resolution,
        patch_size=args.patch_size,
    )
    return ScratchCLIPModel(
        ScratchCLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=args.projection_dim)
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


@torch.no_grad()
def zero_shot_retrieval(
    clip: ScratchCLIPModel,
    tokenizer: CLIPTokenizer,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Text→image and image→text top-1/top-5 over the whole split."""
    text_embeds, image_embeds = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        tokens = tokenize(tokenizer, batch["caption"]).to(device)
        text_embeds.append(clip.get_text_features(tokens.input_ids, tokens.attention_mask))
        image_embeds.append(clip.get_image_features(batch["pixel_values"].to(device)))
    text = torch.nn.functional.normalize(torch.cat(text_embeds).float(), dim=-1)
    image = torch.nn.functional.normalize(torch.cat(image_embeds).float(), dim=-1)
    positives = text_positives(dataset.captions, dataset.captions)
    text_to_image = retrieval_accuracy(text @ image.t(), positives)
    image_to_text = retrieval_accuracy(image @ text.t(), positives)
    return {
        **{f"text_to_image_{k}": v for k, v in text_to_image.items()},
        **{f"image_to_text_{k}": v for k, v in image_to_text.items()},
    }


def main(args: argparse.Namespace) -> None:
    accelerator = create_accelerator(args)
    set_seed(args.seed)
    train = load_image_text_dataset(args, args.train_split, accelerator, limit=args.max_train_samples)
    validation = None
    if args.validation_split != "none":
        validation = load_image_text_dataset(args, args.validation_split, accelerator)
    tokenizer = prepare_tokenizer(args, list(train.captions), accelerator)
    clip = build_clip(args, tokenizer)
    if args.gradient_checkpointing:
        clip.gradient_checkpointing_enable()

    batches = EpochBatches(len(train), args.train_batch_size, accelerator, args.seed)
    args = with_run_length(args, batches.updates_per_epoch)
    optimizer, lr_scheduler = create_optimizer(args, clip.parameters(), accelerator)
    model, optimizer, lr_scheduler = accelerator.prepare(clip, optimizer, lr_scheduler)
    trainer = Trainer(accelerator, args, train, batches, model, lr_scheduler, name="train_clip")
    trainer.resume()

    def train_step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tokens = tokenize(tokenizer, batch["caption"]).to(accelerator.device)
        with accelerator.accumulate(model):
            output = model(
                input_ids=tokens.input_ids,
                attention_mask=tokens.attention_mask,
                pixel_values=batch["pixel_values"].to(accelerator.device),
                return_loss=True,
            )
            accelerator.backward(output.loss)
            step_optimizer(accelerator, model, optimizer, lr_scheduler, args.max_grad_norm, output.loss)
            if accelerator.sync_gradients:
                with torch.no_grad():
                    clip.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        return {"loss": output.loss, "temperature": 1.0 / clip.logit_scale.detach().exp()}

    def validate(step: int) -> None:
        clip.eval()
        with trainer.ema_weights():
            metrics = zero_shot_retrieval(clip, tokenizer, validation, args.train_batch_size, accelerator.device)
        clip.train()
        accelerator.log({f"validation_{k}": v for k, v in metrics.items()}, step=step)
        with open(Path(args.output_dir, "validation_retrieval.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def save() -> None:
        with trainer.ema_weights():
            clip.save_pretrained(args.output_dir)
            clip.text_model.save_pretrained(Path(args.output_dir, "text_encoder"))
        tokenizer.save_pretrained(Path(args.output_dir, "tokenizer"))

    trainer.run(train_step, save, validate if validation is not None else None)


if __name__ == "__main__":
    main(parse_args())
