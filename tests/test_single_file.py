"""Tests for `hf_scratch.formats.single_file`: the LDM single file ↔ our U-Net, VAE and text encoder; and for
`ScratchControlNetModel.from_single_file`, the original ControlNet single file.

The independent reference is diffusers' own single-file code: `StableDiffusionPipeline.from_single_file`,
`ControlNetModel.from_single_file` and the converters in `diffusers.loaders.single_file_utils`. Weights must survive
every trip bit for bit; model outputs of our classes and diffusers' are compared at atol 1e-5 (ControlNet residuals:
relative error 1e-5), room for a different summation order in attention.
"""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from _reference import (
    SD15_TEXT_ENCODER_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    free,
    relative_error,
)
from _tiny import TEXT_CONFIG, tiny_tokenizer
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from hf_scratch.formats import configs
from hf_scratch.formats.single_file import (
    LDM_PREFIXES,
    load_single_file,
    save_single_file,
    to_ldm_state_dict,
)
from hf_scratch.models.clip import ScratchCLIPTextConfig, ScratchCLIPTextModel
from hf_scratch.models.controlnet import SD15_CONTROLNET_CONFIG, ScratchControlNetModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import ScratchAutoencoderKL

ATOL = 1e-5


def _jitter(*models: torch.nn.Module) -> None:
    """Random offsets on every tensor, so that two swapped keys (e.g. norm1/norm2, both ones at init) show."""
    with torch.no_grad():
        for model in models:
            for tensor in model.state_dict().values():
                tensor.add_(0.05 * torch.randn_like(tensor))


def _official_components(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    components = {
        "unet": UNet2DConditionModel(**TINY_UNET_CONFIG),
        "vae": AutoencoderKL(**TINY_VAE_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
    }
    _jitter(*components.values())
    return {name: model.eval() for name, model in components.items()}


def _our_components(seed: int = 1) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    components = {
        "unet": ScratchUNet2DConditionModel(**TINY_UNET_CONFIG),
        "vae": ScratchAutoencoderKL(**TINY_VAE_CONFIG),
        "text_encoder": ScratchCLIPTextModel(ScratchCLIPTextConfig(**TEXT_CONFIG)),
    }
    _jitter(*components.values())
    return {name: model.eval() for name, model in components.items()}


def _diffusers_conversion(checkpoint: dict[str, torch.Tensor], unet_config, vae_config) -> dict[str, dict]:
    """diffusers' LDM → diffusers converters, with transformers 5's un-prefixed text-encoder keys."""
    text_encoder = convert_ldm_clip_checkpoint(checkpoint)
    return {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(unet_config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(vae_config)),
        "text_encoder": {key.removeprefix("text_model."): value for key, value in text_encoder.items()},
    }


def _assert_same_weights(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert set(ours_state) == set(reference_state)
    for key, tensor in reference_state.items():
        assert torch.equal(ours_state[key], tensor), key


@torch.no_grad()
def _assert_same_outputs(ours: dict[str, torch.nn.Module], reference: dict[str, torch.nn.Module]) -> None:
    """U-Net ε̂, VAE encoder mean and decoder image, and text-encoder hidden states agree to ATOL."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, TINY_UNET_CONFIG["cross_attention_dim"], generator=generator)
    images = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    input_ids = torch.randint(0, TEXT_CONFIG["vocab_size"], (2, 77), generator=generator)
    timestep = torch.tensor([10, 900])
    pairs = [
        (ours["unet"](latents, timestep, context).sample, reference["unet"](latents, timestep, context).sample),
        (ours["vae"].decode(latents).sample, reference["vae"].decode(latents).sample),
        (ours["vae"].encode(images).latent_dist.mean, reference["vae"].encode(images).latent_dist.mean),
        (ours["text_encoder"](input_ids).last_hidden_state, reference["text_encoder"](input_ids).last_hidden_state),
    ]
    for ours_output, reference_output in pairs:
        assert reference_output.abs().max() > 0
        torch.testing.assert_close(ours_output, reference_output, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory) -> Path:
    """A diffusers folder (model_index, configs, tokenizer, scheduler) that `from_single_file(config=…)` reads."""
    folder = tmp_path_factory.mktemp("reference") / "tiny-sd"
    pipeline = StableDiffusionPipeline(
        **_official_components(),
        tokenizer=tiny_tokenizer(),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def test_our_export_loads_in_diffusers_from_single_file(tmp_path, reference_folder):
    ours = _our_components()
    path = tmp_path / "ours.safetensors"
    save_single_file(path, **ours)

    pipeline = StableDiffusionPipeline.from_single_file(str(path), config=str(reference_folder), local_files_only=True)

    theirs = {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
    for name in theirs:
        _assert_same_weights(ours[name], theirs[name])
    _assert_same_outputs(ours, theirs)


def test_official_weights_round_trip_through_diffusers_converter(tmp_path, reference_folder):
    official = _official_components(seed=2)
    path = tmp_path / "official.safetensors"
    save_single_file(path, **official)
    checkpoint = load_file(path)

    converted = _diffusers_conversion(checkpoint, official["unet"].config, official["vae"].config)
    assert sum(len(state_dict) for state_dict in converted.values()) == len(checkpoint), "a file key went unused"
    for name, state_dict in converted.items():
        reference_state = official[name].state_dict()
        assert set(state_dict) == set(reference_state), name
        for key, tensor in reference_state.items():
            assert torch.equal(state_dict[key], tensor), f"{name}.{key}"

    ours = load_single_file(path, config=reference_folder)
    assert isinstance(ours["unet"], ScratchUNet2DConditionModel)
    assert isinstance(ours["vae"], ScratchAutoencoderKL)
    assert isinstance(ours["text_encoder"], ScratchCLIPTextModel)
    assert ours["vae"].config.scaling_factor == official["vae"].config.scaling_factor
    for name in ours:
        _assert_same_weights(ours[name], official[name])
    _assert_same_outputs(ours, official)


@pytest.mark.parametrize("wrap", [True, False])
def test_ckpt_round_trip_with_weights_only(tmp_path, wrap):
    ours = _our_components()
    saved = tmp_path / "ours.ckpt"
    save_single_file(saved, **ours)
    assert set(torch.load(saved, weights_only=True)) == {"state_dict"}
    path = saved if wrap else tmp_path / "bare.pt"
    if not wrap:
        torch.save(torch.load(saved, weights_only=True)["state_dict"], path)

    config = {name: dict(model.config) for name, model in ours.items() if name != "text_encoder"}
    config["text_encoder"] = TEXT_CONFIG
    loaded = load_single_file(path, config=config)

    for name in ours:
        _assert_same_weights(loaded[name], ours[name])


def test_ignores_keys_outside_the_components_and_old_position_ids(tmp_path, reference_folder):
    ours = _our_components()
    checkpoint = to_ldm_state_dict(**ours)
    checkpoint["alphas_cumprod"] = torch.ones(1000)
    checkpoint["model_ema.decay"] = torch.tensor(0.9999)
    checkpoint[LDM_PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "with_extras.safetensors"
    save_file(checkpoint, path)

    loaded = load_single_file(path, config=reference_folder)

    _assert_same_weights(loaded["unet"], ours["unet"])


def test_default_configs_are_the_published_sd15_configs():
    """Every key of the configs that diffusers and transformers build from our defaults (their own defaults filled
    in) equals that built from the published v1.5 values."""
    defaults = configs.default_configs()
    with torch.device("meta"):
        built = {
            "unet": (UNet2DConditionModel(**defaults["unet"]), UNet2DConditionModel(**SD15_UNET_CONFIG)),
            "vae": (AutoencoderKL(**defaults["vae"]), AutoencoderKL(**SD15_VAE_CONFIG)),
        }
    pairs = {name: (dict(ours.config), dict(published.config)) for name, (ours, published) in built.items()}
    text_encoder_configs = CLIPTextConfig(**defaults["text_encoder"]), CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)
    pairs["text_encoder"] = tuple(config.to_dict() for config in text_encoder_configs)

    for name, (ours, published) in pairs.items():
        assert ours.keys() == published.keys(), name
        for key, value in published.items():
            assert ours[key] == value, f"{name}.{key}: ours {ours[key]!r}, published {value!r}"


def test_full_size_export_is_exactly_what_diffusers_converter_expects():
    """At the published SD v1.5 configs, on the meta device: every LDM key is consumed, none is missing, shapes
    agree, and the text encoder's sizes read back from the weights are the published ones."""
    with torch.device("meta"):
        official = {
            "unet": UNet2DConditionModel(**SD15_UNET_CONFIG),
            "vae": AutoencoderKL(**SD15_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)),
        }
    checkpoint = to_ldm_state_dict(**official)

    # the key counts of v1-5-pruned-emaonly (whose text encoder also stores the `position_ids` buffer)
    counts = {name: sum(key.startswith(prefix) for key in checkpoint) for name, prefix in LDM_PREFIXES.items()}
    assert counts == {"unet": 686, "vae": 248, "text_encoder": 196}
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    prefix = LDM_PREFIXES["text_encoder"]
    text_weights = {key[len(prefix) :]: value for key, value in checkpoint.items() if key.startswith(prefix)}
    assert configs.infer_text_encoder_config(text_weights) == SD15_TEXT_ENCODER_CONFIG
    converted = _diffusers_conversion(checkpoint, official["unet"].config, official["vae"].config)
    for name, state_dict in converted.items():
        reference_state = official[name].state_dict()
        assert set(state_dict) == set(reference_state), name
        assert all(state_dict[key].shape == tensor.shape for key, tensor in reference_state.items()), name


def test_text_encoder_config_is_read_from_the_weights():
    ours = _our_components()
    prefix = LDM_PREFIXES["text_encoder"]
    weights = {key[len(prefix) :]: value for key, value in to_ldm_state_dict(**ours).items() if key.startswith(prefix)}

    inferred = configs.infer_text_encoder_config(weights)

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
        assert inferred[key] == TEXT_CONFIG[key], key


@pytest.mark.slow
def test_full_size_round_trip_with_default_config(tmp_path):
    """Random full-size SD v1.5 components → one fp16 file (as most shared SD files are) → `load_single_file(path)`
    with config=None, which builds fp32 models holding exactly the stored fp16 values."""
    defaults = configs.default_configs()
    official = {
        "unet": UNet2DConditionModel(**defaults["unet"]).half(),
        "vae": AutoencoderKL(**defaults["vae"]).half(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**defaults["text_encoder"])).half(),
    }
    path = tmp_path / "sd15.safetensors"
    save_single_file(path, **official)

    loaded = load_single_file(path)

    assert loaded["text_encoder"].config.hidden_size == 768
    for name in official:
        assert loaded[name].dtype == torch.float32
        _assert_same_weights(loaded[name].half(), official[name])
    free(*official.values(), *loaded.values())


# Errors


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_single_file(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_single_file(path, **_our_components())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"model{suffix}.*truncated or corrupt"):
        load_single_file(path, config={"unet": TINY_UNET_CONFIG, "vae": TINY_VAE_CONFIG, "text_encoder": TEXT_CONFIG})


class _Payload:
    """Any custom class: unpickling it would need code from this module."""


def test_ckpt_that_needs_pickle_code_is_refused(tmp_path):
    path = tmp_path / "custom.ckpt"
    with path.open("wb") as file:
        torch.save({"state_dict": {}, "callback": _Payload()}, file)
    with pytest.raises(ValueError, match="needs pickle code execution.*safetensors"):
        load_single_file(path)


def test_mismatched_checkpoint_names_first_offenders_and_counts(tmp_path, reference_folder):
    checkpoint = to_ldm_state_dict(**_our_components())
    del checkpoint["model.diffusion_model.out.2.weight"]
    checkpoint["model.diffusion_model.surplus.weight"] = torch.zeros(1)
    checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "broken.safetensors"
    save_file(checkpoint, path)

    with pytest.raises(ValueError) as error:
        load_single_file(path, config=reference_folder)
    message = str(error.value)
    assert "broken.safetensors" in message
    assert "1 missing keys [model.diffusion_model.out.2.weight (unet.conv_out.weight)]" in message
    assert "1 unexpected keys [model.diffusion_model.surplus.weight]" in message
    assert "1 shape mismatches [first_stage_model.decoder.mid.attn_1.q.weight: file (3, 3)" in message


def test_wrong_config_reports_shape_mismatches(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_single_file(path, **_our_components())
    wide_text = {**TEXT_CONFIG, "hidden_size": 64}
    with pytest.raises(ValueError, match=r"shape mismatches \[cond_stage_model\.transformer\.text_model\.embeddings"):
        load_single_file(path, config={"unet": TINY_UNET_CONFIG, "vae": TINY_VAE_CONFIG, "text_encoder": wide_text})


def test_open_clip_text_encoder_is_refused(tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.positional_embedding": torch.zeros(77, 8)}, path)
    with pytest.raises(ValueError, match="OpenCLIP"):
        load_single_file(path, config={"unet": TINY_UNET_CONFIG, "vae": TINY_VAE_CONFIG, "text_encoder": TEXT_CONFIG})


@pytest.mark.parametrize(
    "config, match",
    [
        ({"unet": TINY_UNET_CONFIG, "scheduler": {}}, "unknown components"),
        (42, "`config` must be"),
        ("/no/such/folder", "`config` must be a diffusers folder"),
    ],
)
def test_bad_config_is_refused(tmp_path, config, match):
    path = tmp_path / "tiny.safetensors"
    save_single_file(path, **_our_components())
    with pytest.raises(ValueError, match=match):
        load_single_file(path, config=config)


def test_bad_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`path` must end in"):
        save_single_file(tmp_path / "model.bin.gz", **_our_components())
    with pytest.raises(ValueError, match=r"`path` must end in"):
        (tmp_path / "model.onnx").write_bytes(b"\0")
        load_single_file(tmp_path / "model.onnx")


# The original ControlNet single file (lllyasviel's ControlNet 1.0/1.1 layout)

# A config that the original code can express: 32 groups in every norm, the 16-32-96-256 condition encoder.
CONTROLNET_CONFIG = {
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "cross_attention_dim": 24,
}
# The same architecture as the original yaml (the shape of `cldm_v15.yaml`) states it.
_UNET_PARAMS = {
    "in_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_heads": 2,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 24,
    "legacy": False,
}
CONTROLNET_YAML = {
    "model": {
        "target": "cldm.cldm.ControlLDM",
        "params": {
            "control_stage_config": {"target": "cldm.cldm.ControlNet", "params": {**_UNET_PARAMS, "hint_channels": 3}},
            "unet_config": {"target": "cldm.cldm.ControlledUnetModel", "params": {**_UNET_PARAMS, "out_channels": 4}},
            "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
        },
    }
}
_ORIGINAL_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _original_controlnet_state_dict(model: ControlNetModel, prefix: str) -> dict[str, torch.Tensor]:
    """diffusers' ControlNet weights under the original code's names: an explicit inverse of diffusers'
    `convert_controlnet_checkpoint`, written here so that the file does not come from the code under test."""
    slots = model.config.layers_per_block + 1  # input_blocks per level: its layers, then its downsampler
    # input_hint_block: conv_in, SiLU, then each block and a SiLU, then conv_out
    hint_blocks = 2 * (len(model.config.conditioning_embedding_out_channels) - 1)

    def input_block(m: re.Match) -> int:
        return 1 + int(m[1]) * slots + int(m[2])

    rules = [  # (our prefix, original prefix, whether a U-Net ResNet follows)
        (r"time_embedding\.linear_(\d)\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}.", False),
        (r"conv_in\.", lambda m: "input_blocks.0.0.", False),
        (r"controlnet_cond_embedding\.conv_in\.", lambda m: "input_hint_block.0.", False),
        (r"controlnet_cond_embedding\.blocks\.(\d+)\.", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}.", False),
        (r"controlnet_cond_embedding\.conv_out\.", lambda m: f"input_hint_block.{2 * hint_blocks + 2}.", False),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{input_block(m)}.0.", True),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{input_block(m)}.1.", False),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
            lambda m: f"input_blocks.{(int(m[1]) + 1) * slots}.0.op.",
            False,
        ),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}.", True),
        (r"mid_block\.attentions\.0\.", lambda m: "middle_block.1.", False),
        (r"controlnet_down_blocks\.(\d+)\.", lambda m: f"zero_convs.{m[1]}.0.", False),
        (r"controlnet_mid_block\.", lambda m: "middle_block_out.0.", False),
    ]
    original = {}
    for key, tensor in model.state_dict().items():
        match, head, is_resnet = next((re.match(p, key), t, r) for p, t, r in rules if re.match(p, key))
        leaf, dot, rest = key[match.end() :].partition(".")
        leaf = _ORIGINAL_RESNET_LEAVES.get(leaf, leaf) if is_resnet else leaf
        original[prefix + head(match) + leaf + dot + rest] = tensor.clone()
    assert len(original) == len(model.state_dict())
    return original


@pytest.fixture(scope="module")
def official_controlnet(tmp_path_factory) -> tuple[ControlNetModel, Path]:
    """diffusers' ControlNet with random weights everywhere (zero convolutions included), and its saved folder."""
    torch.manual_seed(3)
    model = ControlNetModel(**CONTROLNET_CONFIG)
    _jitter(model)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    model.save_pretrained(folder)
    return model.eval(), folder


def _plain_config(model: ControlNetModel | ScratchControlNetModel) -> dict:
    """The config as its config.json has it (lists, not tuples), without diffusers' bookkeeping keys."""
    return {key: value for key, value in json.loads(model.to_json_string()).items() if not key.startswith("_")}


@torch.no_grad()
def _controlnet_error(ours: torch.nn.Module, reference: torch.nn.Module) -> float:
    """The largest relative error over the residuals, for one random input."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 7, CONTROLNET_CONFIG["cross_attention_dim"], generator=generator)
    condition = torch.rand(2, 3, 64, 64, generator=generator)  # the condition encoder's factor 8
    timestep = torch.tensor([10, 900])
    actual, expected = (model(latents, timestep, context, condition) for model in (ours, reference))
    pairs = [*zip(actual.down_block_res_samples, expected.down_block_res_samples)]
    pairs.append((actual.mid_block_res_sample, expected.mid_block_res_sample))
    assert len(pairs) == len(expected.down_block_res_samples) + 1
    assert all(theirs.abs().max() > 0 for _, theirs in pairs)
    return max(relative_error(mine, theirs) for mine, theirs in pairs)


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_controlnet_single_file_loads_as_in_diffusers(tmp_path, official_controlnet, prefix):
    official, folder = official_controlnet
    path = tmp_path / "control_tiny.safetensors"
    save_file(_original_controlnet_state_dict(official, prefix), path)

    theirs = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True).eval()
    ours = ScratchControlNetModel.from_single_file(path, config=folder)

    assert not ours.training
    _assert_same_weights(ours, theirs)
    _assert_same_weights(ours, official)
    assert _controlnet_error(ours, theirs) <= 1e-5
    assert _controlnet_error(ours, official) <= 1e-5


def test_controlnet_10_pth_with_the_sd_model_and_original_yaml(tmp_path, official_controlnet):
    """A ControlNet 1.0-style `.pth` (`{"state_dict": …}` holding the SD model beside `control_model.`), read with
    weights_only=True, its architecture from the original yaml."""
    official, folder = official_controlnet
    checkpoint = _original_controlnet_state_dict(official, "control_model.")
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    path, config_path = tmp_path / "control_tiny.pth", tmp_path / "cldm_tiny.yaml"
    torch.save({"state_dict": checkpoint}, path)
    config_path.write_text(yaml.safe_dump(CONTROLNET_YAML))

    ours = ScratchControlNetModel.from_single_file(path, original_config=config_path)

    assert _plain_config(ours) == _plain_config(official)
    _assert_same_weights(ours, official)
    assert _controlnet_error(ours, official) <= 1e-5


def test_default_controlnet_config_is_the_published_sd15_one():
    """With no config, the file is read at the config of diffusers' ControlNet copied from the SD v1.5 U-Net, which
    is that of lllyasviel's SD 1.5 ControlNets."""
    with torch.device("meta"):
        published = ControlNetModel.from_unet(UNet2DConditionModel(**SD15_UNET_CONFIG), load_weights_from_unet=False)
        ours = ScratchControlNetModel.from_config(SD15_CONTROLNET_CONFIG)
    assert _plain_config(ours) == _plain_config(published)


def test_controlnet_loader_refuses_a_stable_diffusion_file(tmp_path):
    path = tmp_path / "sd.safetensors"
    save_single_file(path, **_our_components())
    with pytest.raises(ValueError, match=r"sd\.safetensors' is not an original-layout ControlNet checkpoint: it lacks"):
        ScratchControlNetModel.from_single_file(path, config=CONTROLNET_CONFIG)


def test_controlnet_file_at_the_wrong_config_names_the_mismatches(tmp_path, official_controlnet):
    path = tmp_path / "control_tiny.safetensors"
    save_file(_original_controlnet_state_dict(official_controlnet[0], "control_model."), path)
    with pytest.raises(ValueError, match=r"0 missing keys.*shape mismatches \['down_blocks\.0\.attentions\.0\..*attn2"):
        ScratchControlNetModel.from_single_file(path, config={**CONTROLNET_CONFIG, "cross_attention_dim": 16})
    with pytest.raises(ValueError, match="not both"):
        ScratchControlNetModel.from_single_file(path, config=CONTROLNET_CONFIG, original_config=CONTROLNET_YAML)
