"""Tests of `ScratchCLIPVisionModelWithProjection` against transformers' `CLIPVisionModelWithProjection`.

Random weights come from transformers' own class (its initialisation) at `_tiny.CLIP_VISION_CONFIG`, saved with
`save_pretrained`; each class loads the other's folder. Parity tolerance: relative error (max |ours − reference| /
max |reference|) at most 1e-5 in float32; IP-Adapter pipeline images with our encoder and with transformers' within
max |difference| <= 1e-4 (images in [0, 1]), as in tests/test_ip_adapter.py.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _tiny import CLIP_VISION_CONFIG, tiny_components
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from test_clip import RELATIVE_TOLERANCE, relative_error
from test_ip_adapter import SIZE, TOLERANCE, adapter_folder, generate  # noqa: F401 (adapter_folder: a fixture)
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hf_scratch import ScratchCLIPVisionConfig, ScratchCLIPVisionModelWithProjection, ScratchStableDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIXELS = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """transformers' CLIPVisionModelWithProjection with its own random initialisation, saved."""
    folder = tmp_path_factory.mktemp("clip_vision_reference")
    torch.manual_seed(1)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION_CONFIG)).save_pretrained(folder)
    return folder


def assert_same_outputs(ours, reference, pixel_values: torch.Tensor, **call) -> None:
    with torch.no_grad():
        ours_out = ours(pixel_values, output_hidden_states=True, **call)
        reference_out = reference(pixel_values, output_hidden_states=True, **call)
    assert relative_error(ours_out.image_embeds, reference_out.image_embeds) <= RELATIVE_TOLERANCE
    assert relative_error(ours_out.last_hidden_state, reference_out.last_hidden_state) <= RELATIVE_TOLERANCE
    assert len(ours_out.hidden_states) == len(reference_out.hidden_states) == ours.config.num_hidden_layers + 1
    for ours_state, reference_state in zip(ours_out.hidden_states, reference_out.hidden_states):
        assert relative_error(ours_state, reference_state) <= RELATIVE_TOLERANCE


def test_loads_transformers_folder_and_matches_it(reference_folder):
    ours = ScratchCLIPVisionModelWithProjection.from_pretrained(reference_folder).eval()
    reference = CLIPVisionModelWithProjection.from_pretrained(reference_folder).eval()
    assert isinstance(ours.config, ScratchCLIPVisionConfig) and ours.config.projection_dim == 24
    assert_same_outputs(ours, reference, PIXELS)
    # Other image sizes, with the position embeddings resized as transformers resizes them.
    assert_same_outputs(ours, reference, torch.rand(1, 3, 48, 40), interpolate_pos_encoding=True)
    image_embeds, last_hidden_state = ours(PIXELS, return_dict=False)
    assert image_embeds.shape == (2, 24) and last_hidden_state.shape == (2, 17, 40)


def test_transformers_loads_our_folder_and_matches_it(tmp_path):
    ours = ScratchCLIPVisionModelWithProjection(ScratchCLIPVisionConfig(**CLIP_VISION_CONFIG)).eval()
    ours.save_pretrained(tmp_path)
    reference = CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    assert_same_outputs(ours, reference, PIXELS)


def test_state_dict_keys_equal_transformers(reference_folder, tmp_path):
    ours = ScratchCLIPVisionModelWithProjection(ScratchCLIPVisionConfig(**CLIP_VISION_CONFIG))
    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION_CONFIG))
    assert {key: value.shape for key, value in ours.state_dict().items()} == {
        key: value.shape for key, value in reference.state_dict().items()
    }
    ours.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors").keys() == load_file(reference_folder / "model.safetensors").keys()


def test_legacy_position_ids_key_is_ignored(reference_folder, tmp_path):
    """Image encoders saved before transformers 4.31 (as many IP-Adapter repositories' are) hold the embeddings'
    `position_ids` buffer, which ours does not keep."""
    CLIPVisionModelWithProjection.from_pretrained(reference_folder).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, loading_info = ScratchCLIPVisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading_info["unexpected_keys"] and not loading_info["missing_keys"]


def test_attentions_match_transformers_eager_attention(reference_folder):
    ours = ScratchCLIPVisionModelWithProjection.from_pretrained(reference_folder).eval()
    reference = CLIPVisionModelWithProjection.from_pretrained(reference_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ours_attentions = ours(PIXELS, output_attentions=True).attentions
        reference_attentions = reference(PIXELS, output_attentions=True).attentions
    assert len(ours_attentions) == len(reference_attentions) == 2
    for ours_weights, reference_weights in zip(ours_attentions, reference_attentions):
        assert ours_weights.shape == (2, 4, 17, 17)
        assert relative_error(ours_weights, reference_weights) <= RELATIVE_TOLERANCE
    assert ours(PIXELS).attentions is None


def test_other_image_sizes_need_interpolate_pos_encoding():
    ours = ScratchCLIPVisionModelWithProjection(ScratchCLIPVisionConfig(**CLIP_VISION_CONFIG))
    with pytest.raises(ValueError, match=r"shape \(1, 3, 48, 48\); this model takes \(batch, 3, 32, 32\)"):
        ours(torch.rand(1, 3, 48, 48))


@pytest.mark.parametrize("output_hidden_states", [False, True])
def test_diffusers_encode_image_gives_transformers_embeddings(reference_folder, output_hidden_states):
    """diffusers' `encode_image` reads `image_embeds` (IP-Adapter) or `hidden_states[-2]` (IP-Adapter Plus)."""
    outputs = []
    for encoder_class in (ScratchCLIPVisionModelWithProjection, CLIPVisionModelWithProjection):
        holder = SimpleNamespace(image_encoder=encoder_class.from_pretrained(reference_folder).eval())
        with torch.no_grad():
            outputs.append(StableDiffusionPipeline.encode_image(holder, PIXELS, "cpu", 2, output_hidden_states))
    for ours, reference in zip(*outputs):  # (cond, uncond); without hidden states, uncond is zeros
        torch.testing.assert_close(ours, reference, rtol=0, atol=RELATIVE_TOLERANCE * reference.abs().max().item())


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_ip_adapter_with_our_image_encoder_gives_transformers_encoder_images(adapter_folder, guidance_scale):  # noqa: F811
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))  # the encoder's pixel values
    call = {"ip_adapter_image": image, "guidance_scale": guidance_scale}
    expected = generate(ScratchStableDiffusionPipeline, tiny_components("scratch"), "text_to_image", adapter_folder,
                        True, **call)  # fmt: skip
    encoder = ScratchCLIPVisionModelWithProjection.from_pretrained(adapter_folder / "models" / "image_encoder").eval()
    components = {**tiny_components("scratch"), "image_encoder": encoder}
    actual = generate(ScratchStableDiffusionPipeline, components, "text_to_image", adapter_folder, False, **call)
    assert np.abs(actual - expected).max() <= TOLERANCE
