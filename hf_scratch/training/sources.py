"""Data sources: how each kind of local input becomes a `datasets.DatasetDict` of (image, caption) rows.

`load_splits(source, image_column, caption_column, flag)` decides the kind from what the path is, first match wins:

- a folder saved by `save_to_disk` (`dataset_dict.json` or `state.json`): `datasets.load_from_disk`, its own splits (a
  `Dataset` is `train`);
- a folder whose `README.md` card names `configs:`: `datasets.load_dataset(folder)`, the splits the card names;
- a folder of images with `metadata.jsonl` / `metadata.csv`: the `imagefolder` builder, with `train/`, `validation/`,
  `test/` subfolders as splits, or the whole folder as `train`;
- a folder of `.tar` shards (and no images): the `webdataset` builder, `train` or the split names in the file names;
- a folder of images each with a `.txt` caption beside it (the kohya / DreamBooth layout), flat or with the same split
  subfolders (an image without its `.txt` gets the caption "", with a warning);
- a folder of images without captions: the `imagefolder` builder (the VAE needs no captions);
- a folder holding only `.csv` / `.jsonl` / `.json` / `.parquet` tables: one split per file, named by its stem (one
  file: `train`);
- a `.tar` file or a brace / glob pattern of them (`shards-{000..009}.tar`): the `webdataset` builder, `train`;
- a table file, or a pattern of them: the `csv`, `json` or `parquet` builder, `train`.

In every result the image column holds undecoded `datasets.Image(decode=False)` cells ({"bytes", "path"}): the rows
stay in memory-mapped Arrow files and an image is read only when a row is. With `streaming=True` (--streaming) every
kind is read as a `datasets.IterableDataset` instead, never converted to Arrow: the `datasets` builders stream their
files, a save_to_disk folder is iterated, and the `.txt`-caption layout is generated file by file; rows are checked as
they are read. Table image columns may hold paths (relative
to the table's folder, or absolute) or image bytes. Webdataset samples give their image from the `jpg`, `jpeg`, `png`
or `webp` member and their caption from `txt`, or from the `json` member's field --caption_column (else `caption` or
`text`).

Metadata is checked as it is read, and a bad row is refused with ValueError naming the file and the line (or row): a
line that is not a JSON object, a missing `file_name` or image path, a path that leaves the dataset's folder, a caption
that is not a string, an empty split. Errors of the underlying readers are re-raised as one-line ValueErrors naming
the source.
"""

import csv
import functools
import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import datasets

from hf_scratch.data.folder import load_dataset_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SPLIT_FOLDERS = ("train", "validation", "test")
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_CAPTION_FIELDS = ("caption", "text")
PATTERN_CHARACTERS = "*?[{"
LAYOUTS = (
    "an image folder with metadata.jsonl, images with .txt captions beside them, a save_to_disk folder, .tar "
    "webdataset shards, or .csv / .jsonl / .json / .parquet tables"
)


Splits = datasets.DatasetDict | datasets.IterableDatasetDict
Split = datasets.Dataset | datasets.IterableDataset


def load_splits(
    source: str,
    image_column: str = "image",
    caption_column: str | None = "text",
    flag: str = "--train_data_dir",
    streaming: bool = False,
) -> Splits:
    """Every split of `source` (see the module docstring), its `image_column` cast to undecoded `datasets.Image`
    cells and its `caption_column` (unless None) checked to hold a string in every row. `flag` names the argument in
    errors. `streaming`: `datasets.IterableDataset` splits, read lazily (an empty split then shows when it is read)."""
    named = f"{flag}={source!r}"
    if os.path.isdir(source):
        splits = _load_folder(source, image_column, caption_column, named, streaming)
    elif os.path.isfile(source) or any(character in source for character in PATTERN_CHARACTERS):
        splits = _load_files(source, _expand(source, named), image_column, caption_column, named, streaming)
    else:
        raise ValueError(
            f"{named} is not an existing folder, file or pattern; training reads local data only: {LAYOUTS}"
        )
    for name, split in splits.items():
        if not streaming and len(split) == 0:
            raise ValueError(f"split {name!r} of {named} is empty: it holds no rows")
        splits[name] = _normalise(split, image_column, caption_column, f"split {name!r} of {named}")
    return splits


# ----------------------------------------------------------------------------------------------------------- folders
def _load_folder(
    root: str, image_column: str, caption_column: str | None, named: str, streaming: bool = False
) -> Splits:
    load_dataset = functools.partial(datasets.load_dataset, streaming=streaming)
    if os.path.exists(os.path.join(root, "dataset_dict.json")) or os.path.exists(os.path.join(root, "state.json")):
        saved = _read(lambda: datasets.load_from_disk(root), named, "a save_to_disk folder")
        saved = saved if isinstance(saved, datasets.DatasetDict) else datasets.DatasetDict(train=saved)
        if streaming:  # already Arrow on disk, memory-mapped: iterate it
            return datasets.IterableDatasetDict({name: split.to_iterable_dataset() for name, split in saved.items()})
        return saved
    files = sorted(_walk(root))
    images = [path for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
    metadata = [path for path in files if os.path.basename(path) in METADATA_FILES]
    for path in metadata:
        # imagefolder reads file_name relative to the metadata file's folder; the split is its top folder
        base, parts = os.path.dirname(path), os.path.relpath(path, root).split(os.sep)
        rows = _jsonl_rows(path) if path.endswith(".jsonl") else _csv_rows(path) if path.endswith(".csv") else None
        if rows is not None:
            split = parts[0] if len(parts) > 1 else "train"
            _check_rows(rows, path, "file_name", caption_column, image_column, base, split=split)
    if _card_names_configs(root):
        card_folder = (lambda: load_dataset(root)) if streaming else (lambda: load_dataset_folder(root))
        return _read(card_folder, named, "a dataset whose README.md names its configs")
    if metadata:
        return _read(lambda: load_dataset("imagefolder", data_dir=root), named, "an image folder")
    shards = [path for path in files if path.endswith(".tar")]
    if shards and not images:
        return _read(lambda: load_dataset("webdataset", data_dir=root), named, "webdataset shards")
    if images and any(os.path.exists(os.path.splitext(path)[0] + ".txt") for path in images):
        return _captions_beside(root, images, image_column, caption_column or "text", named, streaming)
    if images:
        return _read(lambda: load_dataset("imagefolder", data_dir=root), named, "an image folder")
    tables = [entry.path for entry in os.scandir(root) if entry.is_file() and _table_builder(entry.path)]
    if tables:
        stems = [os.path.splitext(os.path.basename(path))[0] for path in sorted(tables)]
        if len(set(stems)) < len(stems):
            raise ValueError(f"{named} holds tables with the same name and different types: {', '.join(stems)}")
        split_names = ["train"] if len(tables) == 1 else stems
        kind = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
        return kind(
            {
                name: _load_table(path, image_column, caption_column, named, streaming)
                for name, path in zip(split_names, tables)
            }
        )
    raise ValueError(f"{named} holds nothing training can read; it reads {LAYOUTS}")


def _walk(root: str) -> Iterator[str]:
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        yield from (os.path.join(folder, name) for name in names if not name.startswith("."))


def _card_names_configs(root: str) -> bool:
    """Whether `root/README.md` opens with a YAML block naming `configs:`, as `datasets.load_dataset` reads them."""
    card = os.path.join(root, "README.md")
    if not os.path.isfile(card):
        return False
    with open(card, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    match = re.match(r"---\n(.*?)\n---", text, flags=re.DOTALL)
    return bool(match and re.search(r"^configs:", match.group(1), flags=re.MULTILINE))


def _captions_beside(
    root: str, images: list[str], image_column: str, caption_column: str, named: str, streaming: bool = False
) -> Splits:
    """The kohya / DreamBooth layout: `x.png` captioned by `x.txt`. Split folders `train/`, `validation/`, `test/`
    are splits; without them the whole tree is `train`. An image without its `.txt` gets the caption "" (counted; when
    streaming, warned of as it is read)."""
    present = [name for name in SPLIT_FOLDERS if os.path.isdir(os.path.join(root, name))]
    prefixes = {name: os.path.join(root, name, "") for name in present} or {"train": os.path.join(root, "")}
    features = datasets.Features({image_column: datasets.Image(decode=False), caption_column: datasets.Value("string")})
    splits, uncaptioned = {}, 0
    for name, prefix in prefixes.items():
        paths = [os.path.abspath(path) for path in images if path.startswith(prefix)]
        if streaming:
            splits[name] = datasets.IterableDataset.from_generator(
                _caption_rows, features=features, gen_kwargs=dict(paths=paths, columns=(image_column, caption_column))
            )
            continue
        captions = [_caption_beside(path) for path in paths]
        uncaptioned += sum(caption is None for caption in captions)
        captions = ["" if caption is None else caption for caption in captions]
        splits[name] = datasets.Dataset.from_dict({image_column: paths, caption_column: captions}, features=features)
    if uncaptioned:
        datasets.logging.get_logger(__name__).warning(
            f'{uncaptioned} images of {named} have no .txt caption beside them; they train with the caption ""'
        )
    return datasets.IterableDatasetDict(splits) if streaming else datasets.DatasetDict(splits)


def _caption_beside(path: str) -> str | None:
    """The text of `x.txt` beside image `x.png`, stripped; None when there is no such file."""
    caption_file = os.path.splitext(path)[0] + ".txt"
    if not os.path.exists(caption_file):
        return None
    try:
        with open(caption_file, encoding="utf-8") as handle:
            return handle.read().strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"{caption_file}: the caption is not UTF-8 text ({error.reason})") from None


def _caption_rows(paths: list[str], columns: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """The streamed rows of the `.txt`-caption layout (`paths` is split into shards by `datasets`)."""
    for path in paths:
        caption = _caption_beside(path)
        if caption is None:
            datasets.logging.get_logger(__name__).warning(f'{path} has no .txt caption beside it; it trains with ""')
        yield {columns[0]: {"path": path, "bytes": None}, columns[1]: caption or ""}


# ------------------------------------------------------------------------------------------------- files and patterns
def _expand(source: str, named: str) -> list[str]:
    """The files a path or pattern names: `{a,b}` and `{000..009}` expanded, then globs matched, in sorted order."""
    if os.path.isfile(source):
        return [source]
    files = sorted({path for pattern in _expand_braces(source) for path in glob.glob(pattern) if os.path.isfile(path)})
    if not files:
        raise ValueError(f"{named} matches no file")
    return files


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in _expand_braces(head + choice + tail)]


def _table_builder(path: str) -> str | None:
    return TABLE_BUILDERS.get(os.path.splitext(path)[1].lower())


def _load_files(
    source: str, files: list[str], image_column: str, caption_column: str | None, named: str, streaming: bool = False
) -> Splits:
    if all(path.endswith(".tar") for path in files):
        return _read(
            lambda: datasets.load_dataset("webdataset", data_files={"train": files}, streaming=streaming),
            named,
            "webdataset shards",
        )
    if all(_table_builder(path) for path in files):
        tables = [_load_table(path, image_column, caption_column, named, streaming) for path in files]
        table = datasets.concatenate_datasets(tables) if len(tables) > 1 else tables[0]
        return datasets.IterableDatasetDict(train=table) if streaming else datasets.DatasetDict(train=table)
    kinds = sorted({os.path.splitext(path)[1] or os.path.basename(path) for path in files})
    raise ValueError(
        f"{named} names files of kinds {', '.join(kinds)}; training reads .tar shards or .csv / .jsonl / .json / "
        ".parquet tables (all of one kind), or a folder"
    )


def _load_table(path: str, image_column: str, caption_column: str | None, named: str, streaming: bool = False) -> Split:
    """One table file as a Dataset (or, `streaming`, an IterableDataset) whose image column holds absolute paths or
    bytes."""
    builder, base = _table_builder(path), os.path.dirname(os.path.abspath(path))
    kwargs: dict[str, Any] = {}
    if path.endswith(".jsonl"):
        _check_rows(_jsonl_rows(path), path, image_column, caption_column, image_column, base, absolute=True)
    elif path.endswith(".csv"):
        header = _check_rows(_csv_rows(path), path, image_column, caption_column, image_column, base, absolute=True)
        # Every column as text, "" kept as "": a caption "42" stays a caption, not a number.
        kwargs = dict(
            features=datasets.Features({column: datasets.Value("string") for column in header}), keep_default_na=False
        )
    load = functools.partial(
        datasets.load_dataset, builder, data_files=path, split="train", streaming=streaming, **kwargs
    )
    table = _read(load, named, f"a {builder} table ({path})")
    if table.features is None:  # a streamed JSON table: its columns are known once its first rows are read
        table = _read(table._resolve_features, named, f"a {builder} table ({path})")
    if image_column not in table.column_names:
        raise ValueError(
            f"--image_column={image_column!r} is not a column of {path}; available columns: "
            f"{', '.join(table.column_names)}"
        )
    if table.features[image_column] == datasets.Value("string"):

        def absolute_paths(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            paths = []
            for index, value in zip(indices, batch[image_column]):
                where = f"{path}, row {index}"
                paths.append(_inside(value, base, where, image_column, absolute=True))
            return {image_column: paths}

        table = table.map(absolute_paths, batched=True, with_indices=True)
    return table


# ------------------------------------------------------------------------------------------------- rows and columns
def _jsonl_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each non-blank line of a JSON-lines file, refusing a line that is not a JSON object."""
    with open(path, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}); each line must "
                        "be one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: {line.strip()[:60]!r} is not a JSON object")
                yield f"{path}, line {number}", row
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _csv_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        try:
            reader = csv.DictReader(handle)
            for row in reader:
                yield f"{path}, line {reader.line_num}", row
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None


def _check_rows(
    rows: Iterator[tuple[str, dict[str, Any]]],
    path: str,
    path_key: str,
    caption_column: str | None,
    image_column: str,
    base: str,
    absolute: bool = False,
    split: str | None = None,
) -> list[str]:
    """Check each row's image path (`path_key`) and caption; returns the first row's keys. A caption column missing
    from the first row is a wrong --caption_column; missing from a later row, a bad row."""
    keys: list[str] = []
    for index, (where, row) in enumerate(rows):
        if index == 0:
            keys = list(row)
            columns = keys if path_key == image_column else [image_column, *(key for key in keys if key != path_key)]
            for flag, column in (("image_column", path_key), ("caption_column", caption_column)):
                if column is not None and column not in row and (flag == "caption_column" or column == image_column):
                    raise ValueError(
                        f"--{flag}={column!r} is not a column of {path}; available columns: {', '.join(columns)}"
                    )
        if path_key not in row or row[path_key] in (None, ""):
            raise ValueError(f"{where}: the row has no {path_key!r} (the image's path): {json.dumps(row)[:120]}")
        _inside(row[path_key], base, where, path_key, absolute)
        if caption_column is not None and not isinstance(row.get(caption_column), str):
            caption = row.get(caption_column)
            problem = (
                f"has caption None: the key {caption_column!r} is missing"
                if caption_column not in row
                else (f"has caption {caption!r} in column {caption_column!r}")
            )
            in_split = f" of split {split!r}" if split else ""
            raise ValueError(
                f'{where}: row {index}{in_split} ({row[path_key]}) {problem}; every row needs a text caption (use "" '
                "for none)"
            )
    if not keys:
        raise ValueError(f"{path} holds no rows: an empty split")
    return keys


def _inside(value: Any, base: str, where: str, key: str, absolute: bool) -> str:
    """`value` as an absolute path, refusing a non-string and a relative path that leaves `base` (and an absolute
    one unless `absolute`)."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} is {value!r}, not a path")
    if os.path.isabs(value) and absolute:
        return value
    resolved = os.path.normpath(os.path.join(base, value))
    if os.path.commonpath([resolved, os.path.normpath(base)]) != os.path.normpath(base):
        allowed = "a path inside it, or an absolute path" if absolute else "a path inside it"
        raise ValueError(f"{where}: {key!r} {value!r} points outside {base}; use {allowed}")
    return resolved


def _normalise(split: Split, image_column: str, caption_column: str | None, named: str) -> Split:
    """Webdataset members renamed to the image and caption columns, the image column cast to undecoded cells, and
    every caption checked to be a string (a streamed split: each row as it is read)."""
    streaming = isinstance(split, datasets.IterableDataset)
    if streaming and split.features is None:
        split = _read(split._resolve_features, named, "a stream")
    columns = split.column_names
    if image_column not in columns:
        members = [column for column in WEBDATASET_IMAGE_KEYS if column in columns]
        if not members:
            raise ValueError(
                f"--image_column={image_column!r} is not a column of {named}; available columns: {', '.join(columns)}"
            )
        if len(members) > 1:  # shards mixing image types: the first member each sample has
            split = split.map(
                lambda row: {image_column: next((row[m] for m in members if row[m] is not None), None)},
                remove_columns=members,
                features=None,
            )
        else:
            split = split.rename_column(members[0], image_column)
    if caption_column is not None and caption_column not in split.column_names:
        split = _webdataset_caption(split, caption_column, named)
    if streaming and split.features is None:  # a map above leaves a stream's columns to be read again
        split = split._resolve_features()
    split = split.cast_column(image_column, datasets.Image(decode=False))
    if caption_column is not None and streaming:
        check = functools.partial(_check_caption, caption_column=caption_column, named=named)
        return split.map(check, with_indices=True, features=split.features)
    if caption_column is not None:
        for index, caption in enumerate(split[caption_column]):
            if not isinstance(caption, str):
                raise ValueError(
                    f"row {index} of {named} has caption {caption!r} in column {caption_column!r}; every row needs a "
                    'text caption (use "" for none)'
                )
    return split


def _check_caption(row: dict[str, Any], index: int, caption_column: str, named: str) -> dict[str, Any]:
    """A streamed row, refused unless its caption is a string."""
    if not isinstance(row[caption_column], str):
        raise ValueError(
            f"row {index} of {named} has caption {row[caption_column]!r} in column {caption_column!r}; every row needs "
            'a text caption (use "" for none)'
        )
    return row


def _webdataset_caption(split: Split, caption_column: str, named: str) -> Split:
    columns = split.column_names
    if "txt" in columns:
        return split.rename_column("txt", caption_column)
    if "json" in columns and isinstance(split.features["json"], dict):
        fields = [field for field in (caption_column, *WEBDATASET_CAPTION_FIELDS) if field in split.features["json"]]
        if fields and isinstance(split, datasets.IterableDataset):
            field = fields[0]
            return split.map(lambda row: {caption_column: None if row["json"] is None else row["json"].get(field)})
        if fields:
            captions = [None if row is None else row.get(fields[0]) for row in split["json"]]
            return split.add_column(caption_column, captions)
    raise ValueError(
        f"--caption_column={caption_column!r} is not a column of {named}; available columns: {', '.join(columns)}"
    )


def _read(load: Callable[[], Any], named: str, kind: str) -> Any:
    """`load()`, its reader's errors (pyarrow, datasets, JSON) re-raised as one line naming the source."""
    try:
        return load()
    except ValueError as error:
        if str(error).startswith(named):
            raise
        raise ValueError(f"{named} could not be read as {kind}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # pyarrow, datasets and the builders raise many types; the message is what matters
        if isinstance(error, datasets.exceptions.DatasetGenerationError) and error.__cause__ is not None:
            error = error.__cause__  # the reader's own error, which datasets wraps
        first_line = (str(error).splitlines() or [""])[0]
        raise ValueError(f"{named} could not be read as {kind}: {type(error).__name__}: {first_line}") from None
