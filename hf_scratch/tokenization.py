"""CLIP's byte-level BPE tokenizer: learn a vocabulary from captions, or load OpenAI's.

CLIP (Radford et al. 2021, arXiv:2103.00020) lower-cases text, splits it with a regex into words, numbers and
punctuation, maps bytes to printable symbols and applies byte-pair-encoding merges (Sennrich et al. 2016,
arXiv:1508.07909) whose last symbol in a word carries the end-of-word suffix `</w>`. The files follow openai/CLIP's
`simple_tokenizer.py` as converted for transformers' `CLIPTokenizer`: vocab.json lists the 256 byte symbols, the same
with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`; merges.txt holds the merges in rank order.
"""

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"
CLIP_CONTEXT_LENGTH = 77
# openai/CLIP's simple_tokenizer.py reads this many merges from bpe_simple_vocab_16e6.txt.gz (49,408 tokens in all).
OPENAI_CLIP_NUM_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255 in CLIP's order (GPT-2's `bytes_to_unicode`): printable Latin-1
    bytes keep their character, the others map to code points from 256 on. Their position fixes the token ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    num_unprintable = 256 - len(printable)
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(num_unprintable)]


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token → id in CLIP's layout: byte symbols, byte symbols + `</w>`, merged tokens in rank order, BOS, EOS."""
    symbols = byte_symbols()
    tokens = symbols + [symbol + END_OF_WORD_SUFFIX for symbol in symbols] + ["".join(pair) for pair in merges]
    vocabulary: dict[str, int] = {}
    for token in tokens + [BOS_TOKEN, EOS_TOKEN]:
        vocabulary.setdefault(token, len(vocabulary))
    return vocabulary


def build_clip_tokenizer(merges: list[tuple[str, str]], model_max_length: int = CLIP_CONTEXT_LENGTH) -> CLIPTokenizer:
    """A `CLIPTokenizer` (pad = `<|endoftext|>`) from BPE merges in rank order."""
    return CLIPTokenizer(vocab=clip_vocabulary(merges), merges=merges, model_max_length=model_max_length)


def save_clip_tokenizer(tokenizer: CLIPTokenizer, merges: list[tuple[str, str]], save_dir: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (`save_pretrained`) plus CLIP's vocab.json and merges.txt."""
    save_dir = Path(save_dir)
    tokenizer.save_pretrained(save_dir)
    (save_dir / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (save_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def train_clip_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    save_dir: str | Path,
    model_max_length: int = CLIP_CONTEXT_LENGTH,
) -> CLIPTokenizer:
    """Learn a CLIP BPE vocabulary of at most `vocab_size` tokens from `texts` and save it to `save_dir`.

    Text is normalised and pre-tokenised exactly as `CLIPTokenizer` does (NFC, whitespace runs to one space,
    lower case, CLIP's regex split, byte-level symbols), so the merges apply to the tokens it will see. The result
    loads with `CLIPTokenizer.from_pretrained(save_dir)` and encodes a caption as `[bos, ..., eos]`. A corpus too
    small to yield `vocab_size - 514` merges gives a smaller vocabulary (with a warning).
    """
    num_reserved = 2 * len(byte_symbols()) + 2  # byte symbols with and without `</w>`, BOS, EOS
    if vocab_size <= num_reserved:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: CLIP's vocabulary reserves {num_reserved} tokens "
            "(256 byte symbols, the same with `</w>`, BOS and EOS); pass a larger vocab_size."
        )
    num_merges = vocab_size - num_reserved

    # CLIPTokenizer's own normaliser and pre-tokeniser; with an empty vocabulary it is used for nothing else.
    clip_pipeline = CLIPTokenizer().backend_tokenizer
    learner = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD_SUFFIX))
    learner.normalizer = clip_pipeline.normalizer
    learner.pre_tokenizer = clip_pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=num_merges + 2 * len(byte_symbols()),  # the learner's alphabet plus its merges
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD_SUFFIX,
        show_progress=False,
    )
    learner.train_from_iterator(texts, trainer)
    merges = [tuple(pair) for pair in json.loads(learner.to_str())["model"]["merges"][:num_merges]]

    tokenizer = build_clip_tokenizer(merges, model_max_length)
    if len(tokenizer) < vocab_size:
        logger.warning(
            f"The texts yielded only {len(merges)} merges: the vocabulary has {len(tokenizer)} of the {vocab_size} "
            "tokens asked for."
        )
    save_clip_tokenizer(tokenizer, merges, save_dir)
    return tokenizer


def read_openai_bpe_merges(path: str | Path) -> list[tuple[str, str]]:
    """The merges of openai/CLIP's `bpe_simple_vocab_16e6.txt(.gz)` (shipped in the open_clip_torch wheel)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as bpe_file:
        lines = bpe_file.read().split("\n")
    # The first line is a version header.
    return [tuple(line.split()) for line in lines[1 : OPENAI_CLIP_NUM_MERGES + 1]]


def load_clip_tokenizer(path: str | Path, model_max_length: int = CLIP_CONTEXT_LENGTH) -> CLIPTokenizer:
    """Load a CLIP tokenizer from a saved folder (`from_pretrained`) or from OpenAI's BPE merges file."""
    path = Path(path)
    if path.is_dir():
        return CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length)
    if path.name.startswith("bpe_simple_vocab") and path.is_file():
        return build_clip_tokenizer(read_openai_bpe_merges(path), model_max_length)
    raise ValueError(
        f"path={str(path)!r} is neither a tokenizer folder (saved by save_pretrained or train_clip_bpe_tokenizer) "
        "nor an OpenAI `bpe_simple_vocab_16e6.txt[.gz]` file."
    )
