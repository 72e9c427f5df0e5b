"""Tests for the offline dataset builders: emoji, Fashion-MNIST and the image-folder writer they share."""

import gzip
import json
import re
import struct
from pathlib import Path

import datasets
import pytest
from PIL import Image

from hf_scratch.data.emoji import build_emoji_dataset, caption_name, emoji_entries, is_blank, to_square_rgb
from hf_scratch.data.fashion_mnist import CLASS_NAMES, DEFAULT_SOURCE_DIR, build_fashion_mnist_dataset, caption

EMOJI_SPLITS = {"train", "validation", "heldout_style"}
EMOJI_BUILD = {"resolution": 16, "limit": 24, "validation_fraction": 0.2, "heldout_style_fraction": 0.5}


def read_metadata(root: Path, split: str) -> list[dict]:
    with open(root / split / "metadata.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emoji") / "data"
    build_emoji_dataset(root, **EMOJI_BUILD)
    return root


def test_emoji_dataset_loads_with_all_splits(emoji_dir, tmp_path):
    dataset = datasets.load_dataset(str(emoji_dir), cache_dir=str(tmp_path / "cache"))
    assert set(dataset) == EMOJI_SPLITS
    for split in EMOJI_SPLITS:
        assert set(dataset[split].column_names) == {"image", "text", "style", "codepoints"}
        example = dataset[split][0]
        assert example["image"].size == (16, 16) and example["image"].mode == "RGB"
        assert example["text"] == f"{example['text'].rsplit(', ', 1)[0]}, {example['style']} style"
        assert re.fullmatch(r"U\+[0-9A-F]{4,6}( U\+[0-9A-F]{4,6})*", example["codepoints"])
    assert len(dataset["train"]) == len(read_metadata(emoji_dir, "train"))


def test_emoji_splits_follow_the_documented_rule(emoji_dir):
    rows = {split: read_metadata(emoji_dir, split) for split in EMOJI_SPLITS}
    train_styles: dict[str, set[str]] = {}
    for row in rows["train"]:
        train_styles.setdefault(row["codepoints"], set()).add(row["style"])
    validation_emoji = {row["codepoints"] for row in rows["validation"]}
    assert validation_emoji and not validation_emoji & set(train_styles)
    assert rows["heldout_style"]
    for row in rows["heldout_style"]:
        assert train_styles.get(row["codepoints"], set()) - {row["style"]}, row


def test_emoji_build_is_deterministic(emoji_dir, tmp_path):
    counts = build_emoji_dataset(tmp_path / "again", **EMOJI_BUILD)
    for split in EMOJI_SPLITS:
        again = read_metadata(tmp_path / "again", split)
        assert again == read_metadata(emoji_dir, split)
        assert counts[split] == len(again)
        first = again[0]["file_name"]
        assert (tmp_path / "again" / split / first).read_bytes() == (emoji_dir / split / first).read_bytes()


def test_emoji_build_writes_attribution_and_card(emoji_dir):
    attribution = (emoji_dir / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for licence in ("CC-BY 4.0", "CC-BY-SA 4.0", "Open Font License 1.1", "CLDR"):
        assert licence in attribution
    card = (emoji_dir / "README.md").read_text(encoding="utf-8")
    assert "split: heldout_style" in card and "path: heldout_style/*" in card


def test_emoji_entries_merge_variation_selector_duplicates_and_drop_plain_glyphs():
    entries = emoji_entries()
    keys = [entry.key for entry in entries]
    assert len(keys) == len(set(keys)) > 3500
    assert all("\ufe0f" not in key for key in keys)
    assert not {"\u00a9", "\u00ae", "\U0001f1fa"} & set(keys)
    by_key = {entry.key: entry for entry in entries}
    assert by_key["\u2764"].sequence == "\u2764\ufe0f" and by_key["\u2764"].name == "red heart"


@pytest.mark.parametrize(
    ("name", "sequence", "expected"),
    [
        (":red_heart:", "\u2764\ufe0f", "red heart"),
        (":thumbs_up_medium-dark_skin_tone:", "\U0001f44d\U0001f3fe", "thumbs up medium-dark skin tone"),
        (":United_States:", "\U0001f1fa\U0001f1f8", "flag United States"),
        (":rainbow_flag:", "\U0001f3f3\ufe0f\u200d\U0001f308", "rainbow flag"),
        (":pirate_flag:", "\U0001f3f4\u200d\u2620\ufe0f", "pirate flag"),
        (":England:", "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", "flag England"),
    ],
)
def test_caption_name(name, sequence, expected):
    assert caption_name(name, sequence) == expected


def test_to_square_rgb_pads_centred_on_white():
    glyph = Image.new("RGBA", (32, 16), (255, 0, 0, 255))
    square = to_square_rgb(glyph, 8)
    assert square.size == (8, 8) and square.mode == "RGB"
    assert square.getpixel((4, 0)) == (255, 255, 255) and square.getpixel((4, 4))[1] < 64


def test_is_blank_flags_empty_and_white_glyphs():
    assert is_blank(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))
    assert is_blank(Image.new("RGBA", (32, 32), (255, 255, 255, 255)))
    glyph = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    glyph.paste((200, 30, 30, 255), (8, 8, 24, 24))
    assert not is_blank(glyph)


@pytest.mark.parametrize("resolution", [0, 4, 12, 33, 64.0])
def test_builders_reject_bad_resolution(resolution, tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        build_emoji_dataset(tmp_path / "emoji", resolution=resolution, limit=1)
    with pytest.raises(ValueError, match="resolution"):
        build_fashion_mnist_dataset(tmp_path / "fashion", resolution=resolution, source_dir=tmp_path)


def test_builders_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="styles"):
        build_emoji_dataset(tmp_path / "a", styles=("emojione",))
    with pytest.raises(ValueError, match="validation_fraction"):
        build_emoji_dataset(tmp_path / "b", validation_fraction=1.5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        build_emoji_dataset(tmp_path / "full", limit=1)


def write_idx(path: Path, magic: int, shape: tuple[int, ...], values: bytes) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(f">I{len(shape)}I", magic, *shape) + values)


@pytest.fixture
def fake_fashion_dir(tmp_path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for prefix, count in (("train", 3), ("t10k", 2)):
        pixels = bytes((i * 7) % 256 for i in range(28 * 28 * count))
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", 2051, (count, 28, 28), pixels)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 2049, (count,), bytes(range(9, 9 - count, -1)))
    return source


def test_fashion_mnist_reads_idx_files(fake_fashion_dir, tmp_path):
    counts = build_fashion_mnist_dataset(tmp_path / "out", resolution=16, source_dir=fake_fashion_dir)
    assert counts == {"train": 3, "validation": 2}
    dataset = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert set(dataset) == {"train", "validation"}
    example = dataset["train"][0]
    assert example["text"] == "a photo of an ankle boot" and example["label"] == 9
    assert example["image"].size == (16, 16) and example["image"].mode == "RGB"
    assert (tmp_path / "out" / "ATTRIBUTION.md").is_file()


def test_fashion_mnist_errors_name_the_missing_source(fake_fashion_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_fashion_mnist_dataset(tmp_path / "a", source_dir=tmp_path / "nowhere")
    (fake_fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        build_fashion_mnist_dataset(tmp_path / "b", source_dir=fake_fashion_dir)
    write_idx(fake_fashion_dir / "t10k-labels-idx1-ubyte.gz", 2051, (2,), b"\x00\x01")
    with pytest.raises(ValueError, match="magic number 2049"):
        build_fashion_mnist_dataset(tmp_path / "c", source_dir=fake_fashion_dir)


@pytest.mark.skipif(
    not Path(DEFAULT_SOURCE_DIR).is_dir(), reason="Debian package dataset-fashion-mnist is not installed"
)
def test_fashion_mnist_from_debian_package(tmp_path):
    counts = build_fashion_mnist_dataset(tmp_path / "out", resolution=32, split_limit=20)
    assert counts == {"train": 20, "validation": 20}
    rows = read_metadata(tmp_path / "out", "validation")
    assert all(row["text"] == caption(row["label"]) for row in rows)
    assert {row["label"] for row in rows} <= set(range(len(CLASS_NAMES)))
    with Image.open(tmp_path / "out" / "train" / rows[0]["file_name"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
