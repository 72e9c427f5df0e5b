"""Textual inversion (Gal et al. 2022, arXiv:2208.01618) on our pipeline, through diffusers' own loader mixin.

Embeddings in diffusers' layout (`{"<token>": vectors}`, as `.bin` and `.safetensors`) and AUTOMATIC1111's
(`string_to_param` in a `.pt`, `emb_params` in a `.safetensors`), single- and multi-vector, must give our pipeline the
images diffusers' `StableDiffusionPipeline` gives with the same files: max abs difference <= 1e-4 on images in [0, 1].
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import TEXT_CONFIG, twin_pipelines
from safetensors.torch import save_file

TOLERANCE = 1e-4
WIDTH = TEXT_CONFIG["hidden_size"]


def images(pipe, prompt: str, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=3, guidance_scale=3.0, generator=generator, output_type="np", **kwargs
    ).images


def vectors(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> dict[str, Path]:
    """One embedding file of each layout: diffusers' single-vector `.bin` and multi-vector `.safetensors`, and
    AUTOMATIC1111's multi-vector `.pt` and `.safetensors`."""
    folder = tmp_path_factory.mktemp("embeddings")
    files = {
        "diffusers-bin": folder / "learned_embeds.bin",
        "diffusers-safetensors": folder / "learned_embeds.safetensors",
        "a1111-pt": folder / "style.pt",
        "a1111-safetensors": folder / "style-b.safetensors",
    }
    torch.save({"<cat-toy>": vectors(1, 0)[0]}, files["diffusers-bin"])
    save_file({"<three>": vectors(3, 1)}, files["diffusers-safetensors"])
    torch.save({"string_to_param": {"*": vectors(2, 2)}, "name": "style", "step": 500}, files["a1111-pt"])
    save_file({"emb_params": vectors(4, 3)}, files["a1111-safetensors"])
    return files


def load_all(pipe, embeddings: dict[str, Path]) -> None:
    pipe.load_textual_inversion(str(embeddings["diffusers-bin"]))
    pipe.load_textual_inversion(str(embeddings["diffusers-safetensors"]))
    pipe.load_textual_inversion(str(embeddings["a1111-pt"]), token="<style>")
    pipe.load_textual_inversion(str(embeddings["a1111-safetensors"]), token="<style-b>")


@pytest.mark.parametrize(
    "prompt, negative_prompt",
    [
        ("a photo of <cat-toy>", None),
        ("<three> on a table", None),
        ("a house in <style> and <style-b> style", "<three>"),
    ],
    ids=["single-vector", "multi-vector", "a1111-and-negative"],
)
def test_embeddings_give_diffusers_images(embeddings, prompt, negative_prompt):
    reference, ours = twin_pipelines()
    plain = images(ours, prompt.replace("<", "").replace(">", ""))
    for pipe in (reference, ours):
        load_all(pipe, embeddings)
    expected = images(reference, prompt, negative_prompt=negative_prompt)
    got = images(ours, prompt, negative_prompt=negative_prompt)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got - plain).max() > 1e-3, "the embedding should change the images"


def test_multi_vector_tokens_are_spelled_out_and_hold_the_vectors(embeddings):
    _, ours = twin_pipelines()
    load_all(ours, embeddings)
    assert (
        ours.maybe_convert_prompt("<three> and <cat-toy>", ours.tokenizer)
        == "<three> <three>_1 <three>_2 and <cat-toy>"
    )
    table = ours.text_encoder.get_input_embeddings().weight
    ids = ours.tokenizer.convert_tokens_to_ids(["<three>", "<three>_1", "<three>_2", "<style>", "<style>_1"])
    torch.testing.assert_close(table[ids[:3]], vectors(3, 1), rtol=0, atol=0)
    torch.testing.assert_close(table[ids[3:]], vectors(2, 2), rtol=0, atol=0)
    assert ours.text_encoder.config.vocab_size == len(ours.tokenizer)


def test_unloading_restores_the_vocabulary_and_the_images(embeddings):
    _, ours = twin_pipelines()
    vocabulary, before = len(ours.tokenizer), images(ours, "a photo of a cat")
    rows = ours.text_encoder.get_input_embeddings().weight.shape[0]  # the tiny table is larger than its vocabulary
    load_all(ours, embeddings)
    ours.unload_textual_inversion()
    assert len(ours.tokenizer) == vocabulary
    assert ours.text_encoder.get_input_embeddings().weight.shape[0] == rows
    assert np.abs(images(ours, "a photo of a cat") - before).max() == 0.0


def test_an_embedding_of_the_wrong_width_is_refused(tmp_path):
    _, ours = twin_pipelines()
    save_file({"<wide>": torch.zeros(2, WIDTH + 1)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=rf"pretrained_model_name_or_path.*wide.*width is not {WIDTH}"):
        ours.load_textual_inversion(str(tmp_path / "wide.safetensors"))


def with_word_red(pipe):
    """`pipe` with a tokenizer whose vocabulary, like CLIP's, holds the word "red" only as the word ending "red</w>"."""
    from transformers import CLIPTokenizer

    vocabulary = dict(pipe.tokenizer.get_vocab())
    vocabulary.update({"re": len(vocabulary), "red</w>": len(vocabulary) + 1})
    pipe.tokenizer = CLIPTokenizer(vocab=vocabulary, merges=[("r", "e"), ("re", "d</w>")], model_max_length=77)
    assert pipe.tokenizer.tokenize("red") == ["red</w>"] and "red" not in pipe.tokenizer.get_vocab()
    return pipe


@pytest.mark.parametrize(
    "token, message",
    [("red", r"`token` 'red' is already in the tokenizer's vocabulary \(as 'red</w>'\)"),
     ("Red", r"`token` 'Red' is already in the tokenizer's vocabulary \(as 'red</w>'\)"),
     ("", "`token` must be a non-empty string, got ''"),
     ("  ", "`token` must be a non-empty string"),
     ("<|endoftext|>", "already in tokenizer vocabulary")],
)  # fmt: skip
def test_tokens_that_are_words_or_empty_are_refused_and_change_nothing(token, message, tmp_path):
    """diffusers' own check let "red" through (the vocabulary holds "red</w>"), and "" overwrote the end-of-text
    embedding, which unloading did not restore."""
    ours = with_word_red(twin_pipelines()[1])
    table = ours.text_encoder.get_input_embeddings().weight.detach().clone()
    vocabulary = dict(ours.tokenizer.get_vocab())
    torch.save(vectors(1, 5)[0], tmp_path / "vector.bin")
    with pytest.raises(ValueError, match=message):
        ours.load_textual_inversion(str(tmp_path / "vector.bin"), token=token)
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight, table)
    assert ours.tokenizer.get_vocab() == vocabulary


def test_unloading_restores_every_embedding_it_touched(embeddings):
    _, ours = twin_pipelines()
    table, vocabulary = (
        ours.text_encoder.get_input_embeddings().weight.detach().clone(),
        dict(ours.tokenizer.get_vocab()),
    )
    load_all(ours, embeddings)
    ours.unload_textual_inversion()
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight, table)
    assert ours.tokenizer.get_vocab() == vocabulary
