"""Write captioned image datasets as `datasets`-loadable image folders.

The layout is the one the `imagefolder` builder of 🤗 `datasets` reads: one folder per split holding PNG files and a
`metadata.jsonl` whose rows carry `file_name` plus the caption columns. A `README.md` dataset card names every split in
its YAML `configs` block, so `datasets.load_dataset(out_dir)` also returns splits whose names `imagefolder` does not
guess on its own (such as `heldout_style`).
"""

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"


def check_resolution(resolution: int) -> None:
    """Raise `ValueError` unless `resolution` is a positive multiple of 8 (what the VAE's downsampling needs)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise ValueError(f"resolution={resolution!r} is not allowed; use an integer multiple of 8 that is at least 8")


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Return `out_dir` as a created, empty directory; raise `ValueError` if it holds files already."""
    root = Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"out_dir={str(root)!r} exists and is not an empty directory; pass a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


class ImageFolderWriter:
    """Collect images split by split, then write each split's `metadata.jsonl` and the dataset card.

    Images are saved as they are added, so a build streams and never holds the whole dataset in memory. Rows keep the
    order of `add`, which builders make deterministic.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def add(self, split: str, file_name: str, image: Image.Image, metadata: Mapping[str, Any]) -> None:
        """Save `image` as `<root>/<split>/<file_name>` and record its metadata row."""
        split_dir = self.root / split
        split_dir.mkdir(exist_ok=True)
        image.save(split_dir / file_name, format="PNG")
        self._rows.setdefault(split, []).append({"file_name": file_name, **metadata})

    def counts(self) -> dict[str, int]:
        """Number of examples written so far, per split."""
        return {split: len(rows) for split, rows in self._rows.items()}

    def finish(self, splits: Sequence[str], card_metadata: Mapping[str, Any], card_body: str) -> dict[str, int]:
        """Write every split's `metadata.jsonl` and `README.md`; return the example count per split.

        `splits` fixes the order of splits in the card. A split that received no example is left out of the card (an
        empty split cannot be loaded) with a warning.
        """
        unknown = sorted(set(self._rows) - set(splits))
        if unknown:
            raise ValueError(f"splits={list(splits)!r} does not name the written splits {unknown!r}")
        written = [split for split in splits if self._rows.get(split)]
        for split in splits:
            if split not in written:
                logger.warning("split %r is empty and is left out of the dataset card", split)
        for split in written:
            with open(self.root / split / METADATA_FILE, "w", encoding="utf-8") as handle:
                for row in self._rows[split]:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        configs = [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"{split}/*"} for split in written],
            }
        ]
        front_matter = yaml.safe_dump({**card_metadata, "configs": configs}, sort_keys=False, allow_unicode=True)
        (self.root / "README.md").write_text(f"---\n{front_matter}---\n\n{card_body.strip()}\n", encoding="utf-8")
        return {split: len(self._rows.get(split, [])) for split in splits}


def load_dataset_folder(folder: str | Path, cache_dir: str | None = None) -> Any:
    """`datasets.load_dataset(folder)` rebuilt from the files every time: for a folder with a dataset card, datasets
    keys its cache by the card's configuration, not by the files, so a folder rebuilt in place (say, with the Noto
    style added) would otherwise be read back as its old version. (Verification is off because it compares the new
    split sizes with the cached, stale ones.)"""
    import datasets

    return datasets.load_dataset(
        str(folder), cache_dir=cache_dir, download_mode="force_redownload", verification_mode="no_checks"
    )
