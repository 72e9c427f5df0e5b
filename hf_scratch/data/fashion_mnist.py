"""Build a captioned Fashion-MNIST dataset, offline, from the Debian package `dataset-fashion-mnist`.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, arXiv:1708.07747; MIT licence, Zalando Research) holds 28x28 grey
photos of clothing in 10 classes: 60,000 for training and 10,000 for testing. Each image becomes an RGB square of
`resolution` pixels (LANCZOS) captioned "a photo of a <class>", e.g. "a photo of a pullover". The `train` split comes
from the training files and `validation` from the test (`t10k`) files. Columns: `image`, `text`, `label`.

The idx format (http://yann.lecun.com/exdb/mnist/): a big-endian header, magic 2049 for labels and 2051 for images,
then the counts and the image size, then one unsigned byte per label or pixel.
"""

import gzip
import logging
import struct
import time
from pathlib import Path

from PIL import Image

from hf_scratch.data.folder import ImageFolderWriter, check_resolution, prepare_output_dir

logger = logging.getLogger(__name__)

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# split name -> prefix of its idx files
SOURCE_PREFIXES = {"train": "train", "validation": "t10k"}
_LABELS_MAGIC = 2049
_IMAGES_MAGIC = 2051

ATTRIBUTION = """\
# Attribution

Fashion-MNIST, Copyright (c) 2017 Zalando SE (https://github.com/zalandoresearch/fashion-mnist), licensed under the MIT
licence. Han Xiao, Kashif Rasul and Roland Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", arXiv:1708.07747, 2017. Read from the Debian package dataset-fashion-mnist; the images were
resized and converted to RGB, and captions were added.
"""


def caption(label: int) -> str:
    """The caption of a class index, e.g. 2 -> "a photo of a pullover", 9 -> "a photo of an ankle boot"."""
    name = CLASS_NAMES[label]
    article = "an" if name[0] in "aeiou" else "a"
    return f"a photo of {article} {name}"


def _source_file(source_dir: Path, prefix: str, kind: str) -> Path:
    path = source_dir / f"{prefix}-{kind}-ubyte.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {str(path)!r} is missing; install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE}) or pass source_dir= a folder holding the idx .gz files"
        )
    return path


def read_idx(path: Path, magic: int) -> tuple[bytes, tuple[int, ...]]:
    """Return the raw bytes and the shape stored in a gzipped idx file, checking its magic number and length."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = 1 if magic == _LABELS_MAGIC else 3
    header_size = 4 * (1 + dims)
    if len(data) < header_size or struct.unpack(">I", data[:4])[0] != magic:
        raise ValueError(f"{str(path)!r} is not an idx file with magic number {magic}")
    shape = struct.unpack(f">{dims}I", data[4:header_size])
    payload = data[header_size:]
    expected = 1
    for size in shape:
        expected *= size
    if len(payload) != expected:
        raise ValueError(f"{str(path)!r} holds {len(payload)} values, its header announces {expected}")
    return payload, shape


def build_fashion_mnist_dataset(
    out_dir: str | Path,
    resolution: int = 32,
    split_limit: int | None = None,
    source_dir: str | Path = DEFAULT_SOURCE_DIR,
) -> dict[str, int]:
    """Write captioned Fashion-MNIST to `out_dir` (new or empty) and return the number of images per split.

    Args:
        out_dir: where to write `train/`, `validation/`, `README.md` and `ATTRIBUTION.md`.
        resolution: side of the square RGB images, a multiple of 8.
        split_limit: keep only the first this many images of each split (for quick builds and tests).
        source_dir: folder of the idx .gz files, by default that of the Debian package dataset-fashion-mnist.

    Returns:
        Images per split.
    """
    check_resolution(resolution)
    if split_limit is not None and split_limit < 1:
        raise ValueError(f"split_limit={split_limit!r} is not allowed; use None or a positive number of images")
    source = Path(source_dir)
    if not source.is_dir():
        raise FileNotFoundError(
            f"source_dir={str(source)!r} does not exist; install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE}) or pass the folder holding the Fashion-MNIST idx .gz files"
        )
    files = {
        split: (_source_file(source, prefix, "images-idx3"), _source_file(source, prefix, "labels-idx1"))
        for split, prefix in SOURCE_PREFIXES.items()
    }
    root = prepare_output_dir(out_dir)

    start = time.perf_counter()
    writer = ImageFolderWriter(root)
    for split, (images_path, labels_path) in files.items():
        pixels, (count, height, width) = read_idx(images_path, _IMAGES_MAGIC)
        labels, (label_count,) = read_idx(labels_path, _LABELS_MAGIC)
        if label_count != count:
            raise ValueError(f"{str(images_path)!r} holds {count} images but {str(labels_path)!r} {label_count} labels")
        if max(labels) >= len(CLASS_NAMES):
            raise ValueError(f"{str(labels_path)!r} holds label {max(labels)}; Fashion-MNIST labels are 0-9")
        for index in range(min(count, split_limit or count)):
            label = labels[index]
            offset = index * height * width
            grey = Image.frombytes("L", (width, height), pixels[offset : offset + height * width])
            image = grey.resize((resolution, resolution), Image.Resampling.LANCZOS).convert("RGB")
            writer.add(split, f"{index:05d}.png", image, {"text": caption(label), "label": label})

    counts = writer.counts()
    card_metadata = {
        "license": "mit",
        "pretty_name": "Captioned Fashion-MNIST",
        "task_categories": ["text-to-image"],
        "language": ["en"],
    }
    split_lines = "\n".join(f"| {split} | {counts.get(split, 0)} |" for split in SOURCE_PREFIXES)
    body = f"""\
# Captioned Fashion-MNIST ({resolution}x{resolution})

Fashion-MNIST photos captioned "a photo of a <class>", built offline by
`hf_scratch.data.fashion_mnist.build_fashion_mnist_dataset`. Columns: `image`, `text`, `label` (class index, 0-9:
{", ".join(CLASS_NAMES)}). `validation` is the Fashion-MNIST test set.

| split | images |
|---|---|
{split_lines}

See ATTRIBUTION.md for the source and its licence (MIT).
"""
    counts = writer.finish(tuple(SOURCE_PREFIXES), card_metadata, body)
    (root / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
    logger.info("wrote %s in %.1f s: %s", root, time.perf_counter() - start, counts)
    return counts
