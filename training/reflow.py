"""Reflow couplings: the teacher's own noise-to-latent pairs, on which a few-step student is trained.

    python training/reflow.py --model hf_scratch/pretrained/emoji32 --data DATA --out runs/reflow/pairs

Rectified flow's reflow (Liu et al. 2022, arXiv:2209.03003, Sec. 2.3, "Reflow"): draw ε ~ N(0, I), solve the
teacher's ODE from x_1 = ε to its endpoint z_0 = ODE[v](ε), and train a new flow on the coupling (z_0, ε) instead of
independent pairs. The straight line x_t = (1 − t) z_0 + t ε between coupled endpoints is the student's target path
(`FlowMatchingObjective` with the pair's ε, `train_unet.py --reflow_pairs`), and paths that do not cross can be
followed in a few Euler steps. The teacher here samples with its folder's default (`sampling.json`: guidance included),
so the student also learns the guided endpoint and samples without classifier-free guidance, at one U-Net evaluation
per step (guidance distilled into the coupling, as in InstaFlow, Liu et al. 2023, arXiv:2309.06380, Sec. 3).

One pair per caption of the training split (`--pairs_per_caption` more), prompt i's noise from
`torch.Generator().manual_seed(seed · 1000003 + i)`. Pairs are written in shards of `--shard_size` (each written
under a temporary name, then renamed) and an `index.json` once all are there; a re-run draws only the missing shards,
and refuses a folder whose `settings.json` records other settings (its shards would mix two couplings).
"""

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_scratch.training.data import COUPLING_INDEX


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


@torch.no_grad()
def draw_shard(pipe, kwargs: dict, captions: list[str], first: int, seed: int, resolution: int) -> dict:
    """Noise ε of prompts first, first + 1, ... and the teacher's endpoints z_0 (in the U-Net's latent space)."""
    shape = pipe.latent_shape(1, resolution, resolution)[1:]
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + first + i))
         for i in range(len(captions))]
    )  # fmt: skip
    latents = pipe(captions, latents=noise, output_type="latent", **kwargs).images
    return {"noise": noise.contiguous(), "latents": latents.float().contiguous()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf_scratch/pretrained/emoji32", help="the teacher pipeline folder")
    parser.add_argument("--data", required=True, help="a dataset folder (`hf-scratch data emoji`) with a train split")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, required=True, help="the pairs folder (train_unet.py --reflow_pairs)")
    parser.add_argument("--pairs_per_caption", type=int, default=1)
    parser.add_argument("--shard_size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.pairs_per_caption < 1 or args.shard_size < 1:
        parser.error("--pairs_per_caption and --shard_size must be at least 1")
    torch.set_num_threads(args.threads)

    from hf_scratch.data.folder import load_dataset_folder
    from hf_scratch.models.layers import process_umask
    from hf_scratch.pipelines import ScratchStableDiffusionPipeline
    from hf_scratch.sampling import default_sampling, sampling_kwargs

    captions = list(load_dataset_folder(args.data)[args.split]["text"]) * args.pairs_per_caption
    pipe = ScratchStableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = sampling_kwargs(args.model)
    settings = {
        "teacher": str(args.model), "sampling": default_sampling(args.model), "data": str(args.data),
        "split": args.split, "seed": args.seed, "pairs": len(captions), "shard_size": args.shard_size,
        "resolution": args.resolution,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    settings_file = args.out / "settings.json"
    if not settings_file.is_file():
        write_json(settings_file, settings)
    elif json.loads(settings_file.read_text()) != settings:  # its shards would mix two couplings
        parser.error(
            f"--out {str(args.out)!r} holds pairs drawn with other settings ({settings_file}); pass another --out, "
            "or the settings it records to finish it"
        )
    shards = []
    for index, first in enumerate(range(0, len(captions), args.shard_size)):
        shards.append(shard_name(index))
        if (args.out / shards[-1]).is_file():
            continue
        chunk = captions[first : first + args.shard_size]
        tensors = draw_shard(pipe, kwargs, chunk, first, args.seed, args.resolution)
        partial = args.out / f".{shards[-1]}.partial"
        save_file(tensors, partial, metadata={"captions": json.dumps(chunk)})
        os.chmod(partial, 0o666 & ~process_umask())
        os.replace(partial, args.out / shards[-1])
        print(f"{shards[-1]}: pairs {first}-{first + len(chunk) - 1} of {len(captions)}", flush=True)
    write_json(args.out / COUPLING_INDEX, {"shards": shards, **settings})


def write_json(path: Path, value: dict) -> None:
    """`value` as JSON at `path`, written under a temporary name and then renamed."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(partial, path)


if __name__ == "__main__":
    main()
