"""--streaming (hf_scratch/training/streaming.py): the training split read as a `datasets.IterableDataset`.

A resumed stream must give exactly the batches an uninterrupted one gives, at the batch iterator and in a real
train_vae run killed after a checkpoint (losses bit for bit); every kind of source streams; a pass over data far larger
than the memory it may use keeps the process's peak RSS growth small; and the flags are checked.
"""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training import launch, losses, run, write_dataset

from hf_scratch.training import arguments, checkpoints, sources
from hf_scratch.training.data import collate
from hf_scratch.training.streaming import ImageTextStream

REPO = Path(__file__).resolve().parents[1]


def ranks(world: int, accumulation: int) -> list[SimpleNamespace]:
    """What ImageTextStream reads of an Accelerator, for each rank of a world of `world` processes."""
    return [
        SimpleNamespace(num_processes=world, process_index=rank, gradient_accumulation_steps=accumulation)
        for rank in range(world)
    ]


def image_folder(root: Path, count: int, size: int = 12) -> Path:
    """`count` distinct small images with metadata.jsonl captions "image <i>"."""
    root.mkdir(parents=True)
    rows = []
    for index in range(count):
        Image.new("RGB", (size, size), (index * 7 % 256, index * 13 % 256, index * 29 % 256)).save(
            root / f"{index}.png"
        )
        rows.append({"file_name": f"{index}.png", "text": f"image {index}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def stream_of(source: Path | str, accelerator: SimpleNamespace, **kwargs) -> ImageTextStream:
    split = sources.load_splits(str(source), "image", "text", streaming=True)["train"]
    options = dict(seed=3, buffer_size=8, random_flip=True, center_crop=False)
    return ImageTextStream(split, "image", "text", 8, 2, accelerator, **{**options, **kwargs})


def same_batches(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a["caption"] == b["caption"] and torch.equal(a["pixel_values"], b["pixel_values"])
        for a, b in zip(first, second)
    )


def test_a_resumed_stream_gives_exactly_the_batches_of_an_uninterrupted_one(tmp_path):
    folder = image_folder(tmp_path / "data", 30)
    for rank, accelerator in enumerate(ranks(2, 2)):
        stream = stream_of(folder, accelerator)
        assert stream.updates_per_epoch == 30 // (2 * 2 * 2) == 3 and len(stream) == 24
        for epoch in (0, 1):
            uninterrupted = list(stream.batches(epoch, 0, collate))
            assert len(uninterrupted) == 3 * 2
            for skip in (1, 2):  # a run stopped after `skip` updates of this epoch, resumed by a fresh process
                resumed = list(stream_of(folder, accelerator).batches(epoch, skip, collate))
                assert same_batches(resumed, uninterrupted[skip * 2 :]), (rank, epoch, skip)
    # The ranks split each global batch; the epochs are shuffled differently; every row of an epoch is used once.
    captions = {
        (rank, epoch): [
            c for batch in stream_of(folder, accelerator).batches(epoch, 0, collate) for c in batch["caption"]
        ]
        for rank, accelerator in enumerate(ranks(2, 2))
        for epoch in (0, 1)
    }
    for epoch in (0, 1):
        used = captions[0, epoch] + captions[1, epoch]
        assert len(set(used)) == len(used) == 24
    assert captions[0, 0] != captions[0, 1]
    # The plain view is the unshuffled stream, centre-cropped and unflipped.
    assert [item["caption"] for item in stream_of(folder, ranks(1, 1)[0]).head(3)] == ["image 0", "image 1", "image 2"]


def test_streaming_epoch_updates_sets_the_epoch_and_a_short_stream_is_named(tmp_path):
    folder = image_folder(tmp_path / "data", 10)
    accelerator = ranks(1, 1)[0]
    counted = stream_of(folder, accelerator)
    assert counted.updates_per_epoch == 5
    shorter = stream_of(folder, accelerator, epoch_updates=2)
    assert same_batches(list(shorter.batches(0, 0, collate)), list(counted.batches(0, 0, collate))[:2])
    with pytest.raises(ValueError, match=r"ended after 10 rows in epoch 0, before the 6 updates"):
        list(stream_of(folder, accelerator, epoch_updates=6).batches(0, 0, collate))


def png_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "webdataset", "captions_beside", "save_to_disk"])
def test_every_kind_of_source_streams(kind, tmp_path):
    import datasets

    count = 6
    if kind == "parquet":
        source = tmp_path / "table.parquet"
        datasets.Dataset.from_dict(
            {"image": [{"bytes": png_bytes(i), "path": None} for i in range(count)],
             "text": [f"image {i}" for i in range(count)]},
            features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
        ).to_parquet(source)  # fmt: skip
    elif kind == "jsonl":
        image_folder(tmp_path / "images", count)
        source = tmp_path / "table.jsonl"
        rows = [{"image": f"images/{i}.png", "text": f"image {i}"} for i in range(count)]
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "webdataset":
        source = tmp_path / "shards-0.tar"
        with tarfile.open(source, "w") as tar:
            for i in range(count):
                for suffix, payload in (("png", png_bytes(i)), ("txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    elif kind == "captions_beside":
        source = tmp_path / "kohya"
        source.mkdir()
        for i in range(count):
            Image.open(io.BytesIO(png_bytes(i))).save(source / f"{i}.png")
            (source / f"{i}.txt").write_text(f"image {i}")
    else:
        source = tmp_path / "saved"
        folder = image_folder(tmp_path / "f", count)
        paths = [str(folder / f"{i}.png") for i in range(count)]
        datasets.Dataset.from_dict({"image": paths, "text": [f"image {i}" for i in range(count)]}).save_to_disk(source)
    split = sources.load_splits(str(source), "image", "text", streaming=True)["train"]
    assert isinstance(split, datasets.IterableDataset)
    stream = ImageTextStream(split, "image", "text", 8, 2, ranks(1, 1)[0])
    batches = list(stream.batches(0, 0, collate))
    assert stream.updates_per_epoch == 3 and [b["pixel_values"].shape for b in batches] == [(2, 3, 8, 8)] * 3
    assert sorted(c for b in batches for c in b["caption"]) == [f"image {i}" for i in range(count)]


MEMORY_PROBE = """
import resource, sys, time
from types import SimpleNamespace
from hf_scratch.training import sources
from hf_scratch.training.data import collate
from hf_scratch.training.streaming import ImageTextStream

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

split = sources.load_splits(sys.argv[1], "image", "text", streaming=True)["train"]
accelerator = SimpleNamespace(num_processes=1, process_index=0, gradient_accumulation_steps=1)
stream = ImageTextStream(split, "image", "text", int(sys.argv[2]), 8, accelerator, buffer_size=64)
batch = next(stream.batches(0, 0, collate))  # warm up: the first decode, resize and collate allocate their pools
before = peak_mb()
seen = sum(len(batch["caption"]) for batch in stream.batches(1, 0, collate))
print(seen, before, peak_mb())
"""


def test_a_stream_far_larger_than_the_memory_it_may_use_is_read_in_bounded_memory(tmp_path):
    """A pass over 1,000 images whose decoded pixels take 188 MB (float32 at 128 px) raises the process's peak RSS by
    less than 16 MB, a twelfth of the data: the stream holds its shuffle buffer's paths and one batch, never the data.
    (Peak RSS growth after a warm-up batch is robust where an address-space limit is not: torch maps far more virtual
    memory than it uses.)"""
    count, resolution = 1000, 128
    folder = tmp_path / "noise"
    folder.mkdir()
    generator = np.random.default_rng(0)
    rows = []
    for index in range(count):
        pixels = generator.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
        rows.append({"file_name": f"{index}.jpg", "text": f"noise {index}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    decoded_mb = count * 3 * resolution * resolution * 4 / 2**20
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(folder), str(resolution)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen, before, after = (float(value) for value in result.stdout.split())
    assert seen == count
    assert after - before < 16 < decoded_mb / 10, (before, after, decoded_mb)


def vae_args(data_dir: Path, output_dir: Path) -> list[str]:
    """A tiny VAE on 20 streamed images, 5 updates an epoch, 9 updates, a checkpoint every 3: every checkpoint lies
    inside an epoch (steps 3 and 6 are 3 and 1 updates into epochs 0 and 1)."""
    return [
        "--train_data_dir", str(data_dir), "--output_dir", str(output_dir), "--resolution", "32",
        "--streaming", "--max_train_samples", "20", "--shuffle_buffer_size", "7", "--random_flip",
        "--block_out_channels", "8", "16", "--norm_num_groups", "8", "--train_batch_size", "4",
        "--max_train_steps", "9", "--learning_rate", "2e-3", "--checkpointing_steps", "3",
        "--validation_split", "none", "--report_to", "none", "--num_scaling_samples", "8",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_streamed_train_vae_run_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    data_dir = write_dataset(tmp_path / "shapes")  # its train split holds one corrupt image, replaced as it is met
    reference = tmp_path / "uninterrupted"
    output = run("train_vae.py", vae_args(data_dir, reference))
    assert "does not decode" in output
    assert sorted(losses(reference)) == list(range(1, 10))
    epochs = [json.loads(line)["epoch"] for line in (reference / checkpoints.TRAIN_LOG).read_text().splitlines()]
    assert epochs == [0] * 5 + [1] * 4

    killed = tmp_path / "killed"
    process = launch("train_vae.py", vae_args(data_dir, killed))
    deadline = time.monotonic() + 200
    while not checkpoints.list_checkpoints(killed):
        assert process.poll() is None, f"the run ended before its first checkpoint:\n{process.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 200 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (killed / "config.json").exists(), "the run finished before it was killed"
    killed_at = int(checkpoints.list_checkpoints(killed)[-1].name.split("-")[1])
    assert killed_at in (3, 6)

    output = run("train_vae.py", [*vae_args(data_dir, killed), "--resume_from_checkpoint", "latest"])
    assert f"resuming from {killed / f'checkpoint-{killed_at}'}" in output
    assert losses(killed) == losses(reference)  # every step, bit for bit
    expected, resumed = (load_file(folder / "diffusion_pytorch_model.safetensors") for folder in (reference, killed))
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert (
        json.loads((killed / "config.json").read_text())["scaling_factor"]
        == json.loads((reference / "config.json").read_text())["scaling_factor"]
    )


def parse_vae(tmp_path: Path, *flags: str):
    from hf_scratch.training import train_vae

    return train_vae.parse_args(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--streaming"], r"--streaming needs --max_train_steps"),
        (["--streaming", "--max_train_steps", "2", "--dataloader_num_workers", "2"], r"--dataloader_num_workers=2"),
        (["--streaming_epoch_updates", "3"], r"pass --streaming with it"),
        (["--streaming", "--max_train_steps", "2", "--shuffle_buffer_size", "0"], r"--shuffle_buffer_size=0 must be"),
    ],
)
def test_streaming_flags_are_checked(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        parse_vae(tmp_path, *flags)


def test_streaming_refuses_the_latent_cache_and_train_clip(tmp_path):
    from hf_scratch.training import train_clip, train_unet

    base = ["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2"]
    with pytest.raises(ValueError, match=r"--cache_latents encodes the whole training split"):
        train_unet.parse_args([*base, "--streaming", "--cache_latents"])
    with pytest.raises(ValueError, match=r"--streaming is for train_vae.py and train_unet.py"):
        train_clip.parse_args([*base, "--streaming"])
    assert arguments.build_parser("x").parse_args(["--data", "d", "--output_dir", "o"]).shuffle_buffer_size == 1000
