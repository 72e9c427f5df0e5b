"""Tests of hf_scratch.tokenization: a CLIP BPE vocabulary learned from captions, and OpenAI's."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from hf_scratch.models.clip import ScratchCLIPTextConfig, ScratchCLIPTextModel
from hf_scratch.tokenization import (
    BOS_TOKEN,
    CLIP_CONTEXT_LENGTH,
    EOS_TOKEN,
    byte_symbols,
    load_clip_tokenizer,
    train_clip_bpe_tokenizer,
)

CAPTIONS = [
    f"{count} {colour} {thing} {place}"
    for count in ("a", "two", "three")
    for colour in ("red", "green", "yellow", "smiling")
    for thing in ("apple", "cat", "heart", "face with tears of joy")
    for place in ("on a table", "in the park", "next to a window")
]


def openai_bpe_file() -> Path | None:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz, from $HF_SCRATCH_CLIP_BPE or an installed open_clip package."""
    if os.environ.get("HF_SCRATCH_CLIP_BPE"):
        return Path(os.environ["HF_SCRATCH_CLIP_BPE"])
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
        return candidate if candidate.is_file() else None
    return None


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[CLIPTokenizer, Path]:
    save_dir = tmp_path_factory.mktemp("tokenizer")
    return train_clip_bpe_tokenizer(iter(CAPTIONS), vocab_size=700, save_dir=save_dir), save_dir


def test_trained_tokenizer_round_trips_through_from_pretrained(trained):
    tokenizer, save_dir = trained
    saved_files = {path.name for path in save_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= saved_files
    assert (save_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    loaded = CLIPTokenizer.from_pretrained(save_dir)
    assert loaded.model_max_length == CLIP_CONTEXT_LENGTH
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(CAPTIONS).input_ids == tokenizer(CAPTIONS).input_ids
    assert load_clip_tokenizer(save_dir).get_vocab() == tokenizer.get_vocab()


def test_encoding_is_bos_tokens_eos_and_pads_to_context_length(trained):
    tokenizer, _ = trained
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    ids = tokenizer("a smiling cat in the park").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.bos_token_id not in ids[1:-1] and tokenizer.eos_token_id not in ids[1:-1]
    padded = tokenizer(["a cat", "a " * 100], padding="max_length", truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (2, CLIP_CONTEXT_LENGTH)
    assert padded.input_ids[0, 3:].eq(tokenizer.pad_token_id).all() and padded.attention_mask[0].sum() == 4
    assert padded.input_ids[1, -1] == tokenizer.eos_token_id


def test_learned_merges_compress_seen_captions(trained):
    tokenizer, _ = trained
    caption = "three yellow face with tears of joy next to a window"
    tokens = tokenizer.tokenize(caption)
    assert len(tokens) == len(caption.split())  # every word of the corpus became a single token
    assert len(tokenizer(caption).input_ids) < len(caption)


def test_decode_inverts_encode_up_to_clip_normalisation(trained):
    tokenizer, _ = trained
    # Unseen words and characters fall back to byte symbols; NFC, case and whitespace runs are normalised.
    text = "Two  GREEN\tzebras  cafe\u0301 日本"
    normalised = "two green zebras caf\u00e9 日本"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == normalised


def test_vocabulary_layout_matches_openai_clip(trained):
    tokenizer, _ = trained
    vocab = tokenizer.get_vocab()
    symbols = byte_symbols()
    assert sorted(symbols) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert [vocab[symbol] for symbol in symbols] == list(range(256))
    assert vocab["a</w>"] == 320 and vocab["!"] == 0  # the ids OpenAI's vocabulary gives them
    assert vocab[BOS_TOKEN] == len(vocab) - 2 and vocab[EOS_TOKEN] == len(vocab) - 1


def test_trained_tokenizer_drives_a_text_encoder(trained):
    tokenizer, _ = trained
    config = ScratchCLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    batch = tokenizer(CAPTIONS[:3], padding="max_length", return_tensors="pt")
    output = ScratchCLIPTextModel(config)(batch.input_ids, batch.attention_mask)
    assert output.last_hidden_state.shape == (3, CLIP_CONTEXT_LENGTH, 16)
    assert torch.isfinite(output.pooler_output).all()


def test_small_corpus_gives_smaller_vocabulary(tmp_path):
    tokenizer = train_clip_bpe_tokenizer(["a cat", "a cat"], vocab_size=2000, save_dir=tmp_path)
    assert 514 < len(tokenizer) < 2000
    assert tokenizer.tokenize("a cat") == ["a</w>", "cat</w>"]


def test_rejects_vocab_size_without_room_for_merges(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=514 leaves no room for merges"):
        train_clip_bpe_tokenizer(CAPTIONS, vocab_size=514, save_dir=tmp_path)


def test_load_clip_tokenizer_rejects_other_paths(tmp_path):
    with pytest.raises(ValueError, match="is neither a tokenizer folder"):
        load_clip_tokenizer(tmp_path / "missing")


def test_openai_bpe_file_gives_openai_ids():
    bpe_file = openai_bpe_file()
    if bpe_file is None:
        pytest.skip("OpenAI's bpe_simple_vocab_16e6.txt.gz not found: set HF_SCRATCH_CLIP_BPE or install open_clip")
    tokenizer = load_clip_tokenizer(bpe_file)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
