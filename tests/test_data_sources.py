"""The training data's sources, lazy decoding, augmentations and metadata checks (hf_scratch/training/sources.py and
data.py), on small generated images of coloured squares."""

import contextlib
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hf_scratch.metrics import image_to_tensor
from hf_scratch.training import arguments, data, sources

RESOLUTION = 16
COLOURS = ((220, 30, 30), (30, 170, 60), (40, 60, 220), (240, 200, 20), (0, 0, 0), (250, 250, 250), (120, 0, 120))


@pytest.fixture(autouse=True, scope="module")
def accelerate_state():
    """accelerate's logger, which reports skipped images, needs its state."""
    from accelerate import PartialState

    PartialState()


class MainProcess:
    def main_process_first(self):
        return contextlib.nullcontext()


def square(index: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    """A coloured square on white, its colour and place given by `index`."""
    image = Image.new("RGB", size, "white")
    offset = index % 5
    image.paste(COLOURS[index % len(COLOURS)], (offset, offset, offset + 12, offset + 12))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(index: int) -> str:
    return f"square {index}"


def load(source, *extra: str, split: str = "train") -> data.ImageTextDataset:
    argv = ["--train_data_dir", str(source), "--output_dir", "unused", "--resolution", str(RESOLUTION), *extra]
    args = arguments.build_parser("test").parse_args(argv)
    return data.load_image_text_dataset(args, split, MainProcess())


def assert_squares(dataset: data.ImageTextDataset, count: int = 8) -> None:
    assert len(dataset) == count and dataset.num_skipped == 0
    assert sorted(dataset.captions) == sorted(caption(i) for i in range(count))
    for index in (0, count - 1):
        item = dataset[index]
        number = int(item["caption"].split()[-1])
        assert torch.equal(item["pixel_values"], image_to_tensor(square(number), RESOLUTION) * 2 - 1)


def write_metadata_folder(folder: Path, count: int = 8, rows: list | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        square(index).save(folder / f"{index:03d}.png")
    rows = rows if rows is not None else [{"file_name": f"{i:03d}.png", "text": caption(i)} for i in range(count)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


# ----------------------------------------------------------------------------------------------------------- sources
def test_a_flat_image_folder_with_metadata_is_the_train_split(tmp_path):
    assert_squares(load(write_metadata_folder(tmp_path / "flat")))


def test_an_image_folder_with_split_folders(tmp_path):
    write_metadata_folder(tmp_path / "data" / "train")
    write_metadata_folder(tmp_path / "data" / "validation", count=3)
    assert_squares(load(tmp_path / "data"))
    assert len(load(tmp_path / "data", split="validation")) == 3


def test_a_missing_validation_split_names_validation_split_none(tmp_path):
    with pytest.raises(ValueError, match=r"--validation_split='validation' is not a split .*--validation_split none"):
        load(write_metadata_folder(tmp_path / "flat"), split="validation")


def test_a_folder_whose_card_names_its_splits(tmp_path):
    """The layout `hf-scratch data` writes: split folders with metadata.jsonl and a README.md whose configs name
    every split, custom ones included; its metadata is checked too."""
    from hf_scratch.data.folder import ImageFolderWriter

    writer = ImageFolderWriter(tmp_path)
    for index in range(8):
        writer.add("train", f"{index}.png", square(index), {"text": caption(index)})
    writer.add("heldout_style", "x.png", square(0), {"text": "held out"})
    writer.finish(["train", "heldout_style"], {"license": "cc0-1.0"}, "squares")
    assert_squares(load(tmp_path))
    assert load(tmp_path, split="heldout_style").captions == ["held out"]
    (tmp_path / "heldout_style" / "metadata.jsonl").write_text('{"file_name": "x.png", "text": 1}\n')
    with pytest.raises(ValueError, match=r"heldout_style/metadata\.jsonl, line 1: row 0 of split 'heldout_style'"):
        load(tmp_path)


def test_a_folder_with_a_card_rebuilt_elsewhere_under_the_same_name_is_read_afresh(tmp_path):
    """datasets keys its cache of a folder with a card by the card's configuration, not by the files: two such folders
    of one name (a user's data rebuilt, a second checkout) were read as the first one's images."""
    from hf_scratch.data.folder import ImageFolderWriter

    for version, first in ((tmp_path / "a" / "squares", 0), (tmp_path / "b" / "squares", 3)):
        version.mkdir(parents=True)
        writer = ImageFolderWriter(version)
        for index in range(first, first + 4):
            writer.add("train", f"{index}.png", square(index), {"text": caption(index)})
        writer.finish(["train"], {"license": "cc0-1.0"}, "squares")
        dataset = load(version)
        assert sorted(dataset.captions) == [caption(index) for index in range(first, first + 4)]
        assert torch.equal(dataset[0]["pixel_values"], image_to_tensor(square(first), RESOLUTION) * 2 - 1)


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_images_with_txt_captions_beside_them(tmp_path, layout):
    folder = tmp_path / "kohya" / ("train" if layout == "splits" else "")
    folder.mkdir(parents=True)
    for index in range(8):
        square(index).save(folder / f"img_{index}.png")
        (folder / f"img_{index}.txt").write_text(caption(index) + "\n")
    if layout == "splits":
        (tmp_path / "kohya" / "validation").mkdir()
        square(0).save(tmp_path / "kohya" / "validation" / "a.png")
        (tmp_path / "kohya" / "validation" / "a.txt").write_text("held out")
        assert load(tmp_path / "kohya", split="validation").captions == ["held out"]
    assert_squares(load(tmp_path / "kohya"))


def test_csv_and_json_lines_tables_of_relative_image_paths(tmp_path):
    (tmp_path / "images").mkdir()
    for index in range(8):
        square(index).save(tmp_path / "images" / f"{index}.png")
    (tmp_path / "lists").mkdir()
    rows = [{"path": f"../images/{i}.png", "caption": caption(i)} for i in range(8)]
    lines = ["path,caption", *(f"{row['path']},{row['caption']}" for row in rows)]
    (tmp_path / "train.csv").write_text("\n".join(lines).replace("../images", "images") + "\n")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**r, "path": r["path"][3:]}) + "\n" for r in rows))
    for table in ("train.csv", "train.jsonl"):
        assert_squares(load(tmp_path / table, "--image_column", "path", "--caption_column", "caption"))


def test_a_csv_caption_of_digits_stays_text(tmp_path):
    square(0).save(tmp_path / "0.png")
    (tmp_path / "data.csv").write_text('image,text\n0.png,42\n0.png,""\n')
    assert load(tmp_path / "data.csv").captions == ["42", ""]


@pytest.mark.parametrize("as_bytes", [True, False])
def test_a_parquet_table_of_image_bytes_or_paths(tmp_path, as_bytes):
    for index in range(8):
        square(index).save(tmp_path / f"{index}.png")
    images = [png_bytes(square(i)) if as_bytes else f"{i}.png" for i in range(8)]
    pq.write_table(pa.table({"image": images, "text": [caption(i) for i in range(8)]}), tmp_path / "data.parquet")
    assert_squares(load(tmp_path / "data.parquet"))


@pytest.mark.parametrize("kind", ["dict", "dataset"])
def test_a_save_to_disk_folder(tmp_path, kind):
    rows = {"image": [square(i) for i in range(8)], "text": [caption(i) for i in range(8)]}
    split = datasets.Dataset.from_dict(
        rows, features=datasets.Features(image=datasets.Image(), text=datasets.Value("string"))
    )
    saved = datasets.DatasetDict(train=split, validation=split.select([0])) if kind == "dict" else split
    saved.save_to_disk(str(tmp_path / "saved"))
    assert_squares(load(tmp_path / "saved"))


def write_shard(path: Path, indices: range, caption_member: str = "txt") -> None:
    with tarfile.open(path, "w") as shard:
        for index in indices:
            payload = caption(index).encode() if caption_member == "txt" else json.dumps({"caption": caption(index)})
            members = {
                "png": png_bytes(square(index)),
                caption_member: payload if isinstance(payload, bytes) else payload.encode(),
            }
            for extension, content in members.items():
                info = tarfile.TarInfo(f"sample{index:04d}.{extension}")
                info.size = len(content)
                shard.addfile(info, io.BytesIO(content))


def test_webdataset_shards_a_file_a_folder_and_a_brace_pattern(tmp_path):
    write_shard(tmp_path / "one.tar", range(8))
    assert_squares(load(tmp_path / "one.tar"))
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "part-000.tar", range(0, 5))
    write_shard(tmp_path / "shards" / "part-001.tar", range(5, 8))
    assert_squares(load(tmp_path / "shards"))
    assert_squares(load(str(tmp_path / "shards" / "part-{000..001}.tar")))
    assert_squares(load(str(tmp_path / "shards" / "part-*.tar")))


def test_webdataset_caption_from_the_json_member(tmp_path):
    write_shard(tmp_path / "json.tar", range(8), caption_member="json")
    assert_squares(load(tmp_path / "json.tar", "--caption_column", "caption"))


def test_brace_expansion():
    assert sources._expand_braces("s-{008..010}-{a,b}.tar") == [
        f"s-{n}-{x}.tar" for n in ("008", "009", "010") for x in ("a", "b")
    ]


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    folder = write_metadata_folder(tmp_path / "flat")
    (folder / "002.png").write_bytes(b"not a png")
    truncated = png_bytes(square(3))
    (folder / "003.png").write_bytes(truncated[: len(truncated) // 2])
    dataset = load(folder)
    assert (len(dataset), dataset.num_skipped) == (6, 2)
    assert caption(2) not in dataset.captions and caption(3) not in dataset.captions


# ------------------------------------------------------------------------------------------------------ lazy decoding
def test_memory_does_not_grow_with_the_data(tmp_path):
    """Building the dataset of 400 noise images (~30 kB each as PNG bytes in a parquet table) allocates no more Python
    memory than building one of 50: the images stay in the memory-mapped table, and the scan holds a few at a time."""
    rng = np.random.default_rng(0)
    noise = [png_bytes(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))) for _ in range(400)]
    peaks = {}
    for count in (50, 400):
        table = pa.table({"image": noise[:count], "text": [caption(i) for i in range(count)]})
        pq.write_table(table, tmp_path / f"noise{count}.parquet")
        load(tmp_path / f"noise{count}.parquet")  # the datasets cache is built outside the measurement
        tracemalloc.start()
        dataset = load(tmp_path / f"noise{count}.parquet")
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(dataset) == count
        assert not any(
            isinstance(value, (bytes, list)) and value and isinstance(value[0], dict)
            for value in vars(dataset).values()
        )
    total = sum(len(image) for image in noise)
    assert peaks[400] - peaks[50] < total / 8, (peaks, total)


def test_the_dataset_holds_no_image_bytes(tmp_path):
    pq.write_table(
        pa.table({"image": [png_bytes(square(i)) for i in range(8)], "text": [caption(i) for i in range(8)]}),
        tmp_path / "b.parquet",
    )
    dataset = load(tmp_path / "b.parquet")
    assert isinstance(dataset.images, datasets.Dataset) and dataset.images.cache_files  # memory-mapped Arrow
    assert all(not isinstance(value, (bytes, bytearray)) for value in vars(dataset).values())


# ---------------------------------------------------------------------------------------------------- augmentations
def wide_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption(index))
    return folder


def test_random_flip_is_a_function_of_seed_epoch_and_index(tmp_path):
    folder = wide_folder(tmp_path)
    plain, flipping = load(folder), load(folder, "--random_flip", "--seed", "3")
    flips = [data.is_flipped(3, epoch, index) for epoch in range(4) for index in range(8)]
    assert 8 < sum(flips) < 24
    for epoch in range(4):
        for index in range(8):
            expected = plain[index]["pixel_values"]
            expected = expected.flip(-1) if data.is_flipped(3, epoch, index) else expected
            assert torch.equal(flipping[(epoch, index)]["pixel_values"], expected)
    assert torch.equal(flipping[5]["pixel_values"], plain[5]["pixel_values"])  # a plain index: no augmentation
    validation = data.load_image_text_dataset(
        arguments.build_parser("t").parse_args(["--data", str(folder), "--output_dir", "x", "--random_flip",
                                                "--resolution", "16", "--train_split", "other"]), "train", MainProcess()
    )  # fmt: skip
    assert not validation.random_flip  # only the training split is augmented


def test_center_and_random_crop(tmp_path):
    folder = wide_folder(tmp_path)
    center, random_crop = load(folder), load(folder, "--random_crop")
    image = Image.open(folder / "0.png")
    index = random_crop.captions.index(caption(0))
    assert torch.equal(center[(0, index)]["pixel_values"], image_to_tensor(image, RESOLUTION) * 2 - 1)
    crops = [random_crop[(epoch, index)]["pixel_values"] for epoch in range(6)]
    assert torch.equal(crops[2], random_crop[(2, index)]["pixel_values"])  # the same (epoch, index), the same crop
    assert len({tuple(crop.flatten().tolist()) for crop in crops}) > 1
    windows = [image_to_tensor(image.crop((left, 0, left + 16, 16)), RESOLUTION) * 2 - 1 for left in range(25)]
    assert all(any(torch.equal(crop, window) for window in windows) for crop in crops)
    with pytest.raises(ValueError, match="--random_crop .* drop --cache_latents or --random_crop"):
        data.cache_latents(random_crop, vae=None, accelerator=None, batch_size=2)


def test_cache_latents_encodes_both_orientations_when_flipping(tmp_path):
    """The cache holds the posterior of each image and of its mirror; item (epoch, i) is the one the uncached dataset
    would have drawn. A fake VAE whose posterior mean is the pixels themselves makes that visible."""
    from accelerate import Accelerator
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    class PixelVAE:
        dtype = torch.float32

        def encode(self, pixels):
            posterior = DiagonalGaussianDistribution(torch.cat([pixels, pixels], dim=1))  # mean = logvar = pixels
            return type("Output", (), {"latent_dist": posterior})

    flipping = load(wide_folder(tmp_path), "--random_flip", "--seed", "5")
    cached = data.cache_latents(flipping, PixelVAE(), Accelerator(cpu=True), batch_size=3)
    for epoch in range(2):
        for index in range(8):
            assert torch.equal(cached[(epoch, index)]["latent_mean"], flipping[(epoch, index)]["pixel_values"])
    assert torch.equal(cached[2]["latent_mean"], flipping[2]["pixel_values"])


def test_cached_latents_follow_the_flips():
    means, flipped = torch.zeros(8, 1), torch.ones(8, 1)
    cached = data.CachedLatents(means, means, [""] * 8, flipped=(flipped, flipped), seed=3)
    for epoch in range(3):
        for index in range(8):
            assert cached[(epoch, index)]["latent_mean"].item() == float(data.is_flipped(3, epoch, index))
    assert cached[4]["latent_mean"].item() == 0.0


def test_epoch_batches_carry_the_epoch():
    class OneProcess:
        num_processes, process_index, gradient_accumulation_steps = 1, 0, 1

    batches = data.EpochBatches(num_examples=8, batch_size=4, accelerator=OneProcess(), seed=0).batches(epoch=2)
    assert [epoch for batch in batches for epoch, _ in batch] == [2] * 8
    assert sorted(index for batch in batches for _, index in batch) == list(range(8))


# --------------------------------------------------------------------------------------------------- metadata errors
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"file_name": "003.png", "text": "a"', r"metadata\.jsonl, line 4: not valid JSON"),
        ('["003.png", "a"]', r"metadata\.jsonl, line 4: .* is not a JSON object"),
        ('{"text": "a square"}', r"metadata\.jsonl, line 4: the row has no 'file_name'"),
        (
            '{"file_name": "003.png", "text": 7}',
            r"metadata\.jsonl, line 4: row 3 of split 'train' \(003\.png\) has caption 7",
        ),
        ('{"file_name": "003.png", "text": ["a"]}', r"line 4: row 3 .* has caption \['a'\] in column 'text'"),
        ('{"file_name": "003.png", "text": null}', r"line 4: row 3 .* has caption None in column 'text'"),
        ('{"file_name": "../003.png", "text": "a"}', r"line 4: 'file_name' '\.\./003\.png' points outside"),
        ('{"file_name": "/etc/passwd", "text": "a"}', r"line 4: 'file_name' '/etc/passwd' points outside"),
        ('{"file_name": 3, "text": "a"}', r"line 4: 'file_name' is 3, not a path"),
    ],
)
def test_a_bad_metadata_line_is_refused_naming_file_and_line(tmp_path, line, message):
    folder = write_metadata_folder(tmp_path / "data" / "train")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[3] = line
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load(tmp_path / "data")


def test_a_bad_table_row_is_refused_naming_file_and_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "text": "a"}\n\n{"image": "b.png", "text": 5}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl, line 3: row 1 \(b\.png\) has caption 5"):
        load(tmp_path / "t.jsonl")
    (tmp_path / "t.csv").write_text("image,text\na.png,a\nb.png\n")
    with pytest.raises(ValueError, match=r"t\.csv, line 3: row 1 \(b\.png\) has caption None"):
        load(tmp_path / "t.csv")
    pq.write_table(pa.table({"image": ["a.png", "b.png"], "text": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"row 0 of split 'train' of .*t\.parquet' has caption 1"):
        load(tmp_path / "t.parquet")


@pytest.mark.parametrize("empty", ["metadata", "folder", "table"])
def test_an_empty_split_is_refused(tmp_path, empty):
    if empty == "metadata":
        write_metadata_folder(tmp_path / "data", rows=[])
        source, match = tmp_path / "data", r"metadata\.jsonl holds no rows"
    elif empty == "folder":
        (tmp_path / "data").mkdir()
        source, match = tmp_path / "data", "holds nothing training can read"
    else:
        (tmp_path / "t.csv").write_text("image,text\n")
        source, match = tmp_path / "t.csv", r"t\.csv holds no rows"
    with pytest.raises(ValueError, match=match):
        load(source)


def test_a_wrong_caption_column_lists_the_columns(tmp_path):
    with pytest.raises(ValueError, match=r"--caption_column='prompt' is not a column .*available columns: image, text"):
        load(write_metadata_folder(tmp_path / "flat"), "--caption_column", "prompt")


def test_a_missing_path_names_the_kinds_read(tmp_path):
    with pytest.raises(ValueError, match=r"is not an existing folder, file or pattern; .*webdataset"):
        load(tmp_path / "nowhere")


def test_the_latent_cache_on_disk_is_reused_and_keyed_by_the_data_and_the_vae(tmp_path, monkeypatch):
    """The first run encodes every image and writes shards; a second run (a resume, another rank) encodes nothing and
    gets the same posteriors; other VAE weights or other data are another key, encoded afresh."""
    from accelerate import Accelerator

    from hf_scratch.models.vae import ScratchAutoencoderKL

    torch.manual_seed(0)
    levels = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae = ScratchAutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, **levels)
    encoded = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: encoded.append(len(pixels)) or encode(pixels))
    dataset, accelerator, cache = (
        load(write_metadata_folder(tmp_path / "data", count=7)),
        Accelerator(cpu=True),
        tmp_path / "cache",
    )
    in_memory = data.cache_latents(dataset, vae, accelerator, batch_size=3)
    assert sum(encoded) == 7
    first = data.cache_latents(dataset, vae, accelerator, batch_size=3, cache_dir=cache)
    assert sum(encoded) == 14 and len(list(cache.glob("*/rank-0-of-1.safetensors"))) == 1
    again = data.cache_latents(dataset, vae, accelerator, batch_size=3, cache_dir=cache)
    assert sum(encoded) == 14  # read back, nothing encoded
    for cached in (first, again):
        assert torch.equal(cached.means, in_memory.means) and torch.equal(cached.logvars, in_memory.logvars)
        assert cached.captions == dataset.captions

    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # the decoder too: the key covers every weight
    data.cache_latents(dataset, vae, accelerator, batch_size=3, cache_dir=cache)
    assert sum(encoded) == 21 and len(list(cache.iterdir())) == 2
    fewer = load(write_metadata_folder(tmp_path / "fewer", count=5))
    data.cache_latents(fewer, vae, accelerator, batch_size=3, cache_dir=cache)
    assert sum(encoded) == 26 and len(list(cache.iterdir())) == 3
