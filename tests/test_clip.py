"""Tests of hf_scratch.models.clip against transformers' CLIP implementation (same weights, same inputs).

Parity tolerance: relative error (max |ours − reference| / max |reference|) at most 1e-5 in float32.
"""

import gc
import json
import re

import pytest
import torch
from _reference import SD15_TEXT_ENCODER_CONFIG_JSON
from _tiny import CLIP_TEXT_CONFIG, CLIP_VISION_CONFIG, prompt_batch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
from transformers.initialization import no_init_weights
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_scratch.models.clip import (
    ScratchCLIPConfig,
    ScratchCLIPModel,
    ScratchCLIPTextConfig,
    ScratchCLIPTextModel,
    ScratchCLIPVisionConfig,
)

RELATIVE_TOLERANCE = 1e-5
BOS, EOS = 49406, 49407

# SD 2.x's OpenCLIP ViT-H text tower. It uses the modern eos_token_id so that the first-EOS pooling path is tested too.
SD2_TEXT_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=1,
)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def reference_sharing_weights(ours: ScratchCLIPTextModel, reference_config: CLIPTextConfig) -> CLIPTextModel:
    """transformers' CLIPTextModel holding our very tensors (no copy, no random init)."""
    with no_init_weights():
        reference = CLIPTextModel(reference_config)
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return reference.eval()


@pytest.fixture(scope="module")
def sd15_text_encoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15_config")
    (folder / "config.json").write_text(json.dumps(SD15_TEXT_ENCODER_CONFIG_JSON))
    ours = ScratchCLIPTextModel(ScratchCLIPTextConfig.from_pretrained(folder)).eval()
    reference = reference_sharing_weights(ours, CLIPTextConfig.from_pretrained(folder))
    yield ours, reference
    del ours, reference
    gc.collect()


def assert_text_parity(ours, reference, input_ids, attention_mask) -> None:
    with torch.no_grad():
        ours_out = ours(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        reference_out = reference(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert relative_error(ours_out.last_hidden_state, reference_out.last_hidden_state) <= RELATIVE_TOLERANCE
    assert relative_error(ours_out.pooler_output, reference_out.pooler_output) <= RELATIVE_TOLERANCE
    assert len(ours_out.hidden_states) == len(reference_out.hidden_states) == ours.config.num_hidden_layers + 1
    for ours_state, reference_state in zip(ours_out.hidden_states, reference_out.hidden_states):
        assert relative_error(ours_state, reference_state) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("with_attention_mask", [False, True])
def test_sd15_text_encoder_matches_transformers(sd15_text_encoders, with_attention_mask):
    ours, reference = sd15_text_encoders
    assert sum(parameter.numel() for parameter in ours.parameters()) == 123_060_480
    # SD v1.x pads with the end-of-text token; its config's legacy eos_token_id=2 selects the argmax pooling.
    input_ids, attention_mask = prompt_batch(77, [5, 30], bos=BOS, eos=EOS, pad=EOS)
    assert_text_parity(ours, reference, input_ids, attention_mask if with_attention_mask else None)


@pytest.mark.slow
def test_sd2_text_encoder_matches_transformers():
    ours = ScratchCLIPTextModel(ScratchCLIPTextConfig(**SD2_TEXT_CONFIG)).eval()
    reference = reference_sharing_weights(ours, CLIPTextConfig(**SD2_TEXT_CONFIG))
    # SD 2.x pads with id 0; pooling must pick the first end-of-text token, not the largest id.
    input_ids, attention_mask = prompt_batch(77, [3, 40], bos=BOS, eos=EOS, pad=0)
    for mask in (None, attention_mask):
        assert_text_parity(ours, reference, input_ids, mask)


def test_hidden_states_feed_clip_skip():
    """hidden_states[-1] is the last layer before the final LayerNorm; diffusers' clip-skip path applies
    `text_encoder.text_model.final_layer_norm` to an earlier entry."""
    model = ScratchCLIPTextModel(ScratchCLIPTextConfig(**CLIP_TEXT_CONFIG)).eval()
    input_ids, _ = prompt_batch(16, [4, 9], bos=97, eos=98, pad=98)
    output = model(input_ids, output_hidden_states=True)
    torch.testing.assert_close(model.text_model.final_layer_norm(output.hidden_states[-1]), output.last_hidden_state)
    last_hidden_state, pooler_output, hidden_states = model(input_ids, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(pooler_output, output.last_hidden_state[[0, 1], [5, 10]])
    assert len(hidden_states) == model.config.num_hidden_layers + 1


def tiny_clip_pair() -> tuple[ScratchCLIPModel, CLIPModel]:
    config = dict(text_config=CLIP_TEXT_CONFIG, vision_config=CLIP_VISION_CONFIG, projection_dim=24)
    ours = ScratchCLIPModel(ScratchCLIPConfig(**config)).eval()
    with no_init_weights():
        reference = CLIPModel(CLIPConfig(**config))
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference.eval()


def test_clip_model_matches_transformers():
    ours, reference = tiny_clip_pair()
    input_ids, attention_mask = prompt_batch(12, [3, 7, 10], bos=97, eos=98, pad=98)
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours_out = ours(input_ids, pixel_values, attention_mask=attention_mask, return_loss=True)
        reference_out = reference(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True
        )
        ours_text = ours.get_text_features(input_ids, attention_mask)
        reference_text = reference.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        ours_image = ours.get_image_features(pixel_values)
        reference_image = reference.get_image_features(pixel_values=pixel_values)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "loss"):
        assert relative_error(ours_out[name], reference_out[name]) <= RELATIVE_TOLERANCE, name
    assert relative_error(ours_text, reference_text.pooler_output) <= RELATIVE_TOLERANCE
    assert relative_error(ours_image, reference_image.pooler_output) <= RELATIVE_TOLERANCE
    assert ours_out.logits_per_image.shape == (3, 3)
    assert ours(input_ids, pixel_values).loss is None


def test_contrastive_loss_rewards_matching_pairs():
    ours, _ = tiny_clip_pair()
    input_ids, _ = prompt_batch(12, [3, 7], bos=97, eos=98, pad=98)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours.text_projection.weight.zero_()
        ours.visual_projection.weight.zero_()
        ours.text_projection.weight[0, 0] = ours.visual_projection.weight[0, 0] = 1.0
        ours.text_projection.weight[1, 1] = ours.visual_projection.weight[1, 1] = 1.0
        ours.text_model.final_layer_norm.weight.zero_()
        ours.vision_model.post_layernorm.weight.zero_()
        ours.text_model.final_layer_norm.bias.copy_(torch.arange(32) < 1)
        ours.vision_model.post_layernorm.bias.copy_(torch.arange(40) < 1)
        # Every text and image now embeds to e_0: all logits are equal, so the loss is log(batch size).
        torch.testing.assert_close(ours(input_ids, pixel_values, return_loss=True).loss, torch.log(torch.tensor(2.0)))


def test_text_model_saves_transformers_layout_and_loads_both_ways(tmp_path):
    ours = ScratchCLIPTextModel(ScratchCLIPTextConfig(**CLIP_TEXT_CONFIG)).eval()
    input_ids, attention_mask = prompt_batch(16, [4, 9], bos=97, eos=98, pad=98)
    expected = ours(input_ids, attention_mask).last_hidden_state

    ours.save_pretrained(tmp_path / "ours")
    reference = CLIPTextModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(reference(input_ids, attention_mask).last_hidden_state, expected, rtol=0, atol=0)
    reference.save_pretrained(tmp_path / "reference")
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(
        load_file(tmp_path / "reference" / "model.safetensors")
    )
    reloaded = ScratchCLIPTextModel.from_pretrained(tmp_path / "reference").eval()
    torch.testing.assert_close(reloaded(input_ids, attention_mask).last_hidden_state, expected, rtol=0, atol=0)


def test_text_model_loads_official_prefixed_layout_without_warning(tmp_path):
    """The official SD v1.5 text_encoder: transformers' config.json and keys under `text_model.`."""
    config = {**SD15_TEXT_ENCODER_CONFIG_JSON, **CLIP_TEXT_CONFIG, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = ScratchCLIPTextModel(ScratchCLIPTextConfig(**CLIP_TEXT_CONFIG))
    prefixed = {f"text_model.{key}": value for key, value in source.state_dict().items()}
    save_file(prefixed, tmp_path / "model.safetensors")

    with CaptureLogger(logging.get_logger("transformers.configuration_utils")) as captured:
        loaded = ScratchCLIPTextModel.from_pretrained(tmp_path)
    assert "You are using a model of type" not in captured.out
    assert loaded.config.model_type == "scratch_clip_text_model" and loaded.config.eos_token_id == 2
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_clip_model_round_trips_with_transformers(tmp_path):
    ours, _ = tiny_clip_pair()
    input_ids, _ = prompt_batch(12, [3, 7], bos=97, eos=98, pad=98)
    pixel_values = torch.randn(2, 3, 32, 32)
    expected = ours(input_ids, pixel_values).logits_per_text

    ours.save_pretrained(tmp_path / "ours")
    reference = CLIPModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(reference(input_ids=input_ids, pixel_values=pixel_values).logits_per_text, expected)
    reference.save_pretrained(tmp_path / "reference")
    reloaded = ScratchCLIPModel.from_pretrained(tmp_path / "reference").eval()
    assert isinstance(reloaded.config.text_config, ScratchCLIPTextConfig)
    assert isinstance(reloaded.config.vision_config, ScratchCLIPVisionConfig)
    torch.testing.assert_close(reloaded(input_ids, pixel_values).logits_per_text, expected)


def test_auto_classes_resolve_our_model_types(tmp_path):
    text_config = ScratchCLIPTextConfig(**CLIP_TEXT_CONFIG)
    assert isinstance(AutoModel.from_config(text_config), ScratchCLIPTextModel)
    assert isinstance(AutoConfig.for_model("scratch_clip_vision_model"), ScratchCLIPVisionConfig)
    clip = ScratchCLIPModel(ScratchCLIPConfig(text_config=CLIP_TEXT_CONFIG, vision_config=CLIP_VISION_CONFIG))
    clip.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ScratchCLIPConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), ScratchCLIPModel)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (torch.tensor([[97, 5, 99]]), "token ids from 5 to 99, but the vocabulary has vocab_size=99"),
        (torch.tensor([[97, -1, 98]]), "token ids from -1 to 98"),
        (torch.full((1, 17), 5), "17 tokens per sequence, but the model has only max_position_embeddings=16"),
        (torch.tensor([97, 5, 98]), "input_ids must have shape (batch, sequence)"),
    ],
)
def test_text_model_rejects_bad_input_ids(input_ids, message):
    model = ScratchCLIPTextModel(ScratchCLIPTextConfig(**CLIP_TEXT_CONFIG))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(input_ids)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 30}, "hidden_size=30 must be a multiple of num_attention_heads=4"),
        ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ],
)
def test_config_rejects_bad_architecture(overrides, message):
    with pytest.raises(ValueError, match=message):
        ScratchCLIPTextConfig(**{**CLIP_TEXT_CONFIG, **overrides})


def test_truncated_weights_file_is_named(tmp_path):
    ScratchCLIPTextModel(ScratchCLIPTextConfig(**CLIP_TEXT_CONFIG)).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"could not read {re.escape(str(weights))}.*truncated"):
        ScratchCLIPTextModel.from_pretrained(tmp_path)


def test_weights_follow_clip_initialisation():
    config = ScratchCLIPConfig(
        text_config={**CLIP_TEXT_CONFIG, "hidden_size": 64, "intermediate_size": 128},
        vision_config={**CLIP_VISION_CONFIG, "hidden_size": 64},
    )
    model = ScratchCLIPModel(config)
    for tower in (model.text_model, model.vision_model):
        layer, width, depth = tower.encoder.layers[0], 64, 2
        expected_stds = {
            layer.self_attn.q_proj.weight: width**-0.5 * (2 * depth) ** -0.5,
            layer.self_attn.out_proj.weight: width**-0.5,
            layer.mlp.fc1.weight: (2 * width) ** -0.5,
            layer.mlp.fc2.weight: width**-0.5 * (2 * depth) ** -0.5,
            tower.embeddings.position_embedding.weight: 0.02,
        }
        for weight, std in expected_stds.items():
            assert weight.std().item() == pytest.approx(std, rel=0.15)
        assert not layer.self_attn.q_proj.bias.any() and layer.layer_norm1.weight.eq(1).all()
    assert model.text_projection.weight.std().item() == pytest.approx(64**-0.5, rel=0.15)
    assert model.logit_scale.item() == pytest.approx(2.6592)
