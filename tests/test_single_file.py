"""Tests for `hf_scratch.formats.single_file`: the LDM single file ↔ our U-Net, VAE and text encoder.

The independent reference is diffusers' own single-file code: `StableDiffusionPipeline.from_single_file` and the
converters in `diffusers.loaders.single_file_utils`. Weights must survive every trip bit for bit; model outputs of
our classes and diffusers' are compared at atol 1e-5, room for a different summation order in attention.
"""

from pathlib import Path

import pytest
import torch
from _reference import (
    SD15_TEXT_ENCODER_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    free,
)
from _tiny import TEXT_CONFIG, tiny_tokenizer
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
