"""The original LDM single-file checkpoint (`v1-5-pruned-emaonly.safetensors`) ↔ our three components.

CompVis' latent-diffusion code (Rombach et al., arXiv:2112.10752) stores the U-Net, the VAE and the CLIP text encoder
of Stable Diffusion in one file, each under its own prefix and with its own block names (`input_blocks.4.1`,
`encoder.down.2.block.0`, …). Our modules carry the diffusers names, so the two layouts differ only in names. A few
rules (regular expressions whose block indices follow from the config) turn each of our keys into its LDM key; the
same mapping serves both directions, so loading and saving cannot drift apart. The reference it matches is diffusers'
`diffusers.loaders.single_file_utils` (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`).

Only the OpenAI-CLIP text encoder of SD 1.x is covered; SD 2.x files keep an OpenCLIP encoder in another layout
(`cond_stage_model.model.…`, fused q/k/v) and are refused with a clear error. Files that also hold EMA copies
(`model_ema.…`, as in `v1-5-pruned.ckpt`) load their `model.diffusion_model.` weights; the EMA copies are ignored.
"""

import json
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import init_empty_weights
from diffusers.utils import logging
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hf_scratch.formats.configs import default_configs, infer_text_encoder_config
from hf_scratch.models.clip import ScratchCLIPTextModel
from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.models.vae import ScratchAutoencoderKL

logger = logging.get_logger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder")
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
_OPEN_CLIP_PREFIX = "cond_stage_model.model."
# Buffers that old LDM files store but that the models rebuild themselves.
_IGNORED_LDM_SUFFIXES = ("embeddings.position_ids",)
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SAVE_SUFFIXES = (".safetensors", ".ckpt")
_FIRST_OFFENDERS = 5
# What a saved config.json records about its writer rather than the architecture.
_METADATA = {"architectures", "model_type", "transformers_version"}

ConfigLike = str | Path | Mapping[str, Mapping[str, Any]] | None


class _Rule(NamedTuple):
    """Renames the key prefix that `pattern` matches to `target`, then the leaf module names after it."""

    pattern: str
    target: str | Callable[[re.Match], str]
    leaves: Mapping[str, str] = {}
    conv_1x1: bool = False  # LDM stores these linear weights as 1×1 convolutions


_UNET_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_LEAVES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_rules(config: Mapping[str, Any]) -> list[_Rule]:
    """LDM numbers the U-Net's layers flat. `input_blocks.0` is `conv_in`; each down block then takes
    `layers_per_block` slots (resnet `.0`, attention `.1`) and one more for its downsampler (`.0.op`). Each up block
    takes `layers_per_block + 1` slots, and its upsampler follows the resnet (and attention) in the last of them."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"`layers_per_block` must be one integer for the LDM single-file layout, got {per_block!r}.")
    up_has_attention = ["CrossAttn" in block_type for block_type in config["up_block_types"]]

    def input_block(m: re.Match) -> int:  # groups: down block, layer
        return 1 + int(m[1]) * (per_block + 1) + int(m[2])

    def output_block(m: re.Match) -> int:  # groups: up block, layer
        return int(m[1]) * (per_block + 1) + int(m[2])

    def downsampler(m: re.Match) -> str:
        return f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op."

    def upsampler(m: re.Match) -> str:
        block = int(m[1])
        return f"output_blocks.{block * (per_block + 1) + per_block}.{2 if up_has_attention[block] else 1}."

    resnet = _UNET_RESNET_LEAVES
    return [
        _Rule(r"time_embedding\.linear_(\d)\.", lambda m: f"time_embed.{2 * (int(m[1]) - 1)}."),
        _Rule(r"conv_in\.", "input_blocks.0.0."),
        _Rule(r"conv_norm_out\.", "out.0."),
        _Rule(r"conv_out\.", "out.2."),
        _Rule(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{input_block(m)}.0.", resnet),
        _Rule(r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{input_block(m)}.1."),
        _Rule(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", downsampler),
        _Rule(r"mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}.", resnet),
        _Rule(r"mid_block\.attentions\.0\.", "middle_block.1."),
        _Rule(r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{output_block(m)}.0.", resnet),
        _Rule(r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{output_block(m)}.1."),
        _Rule(r"up_blocks\.(\d+)\.upsamplers\.0\.", upsampler),
    ]


def _vae_rules(config: Mapping[str, Any]) -> list[_Rule]:
    """The LDM decoder numbers its up blocks from the lowest resolution up, diffusers from the input down; LDM's
    mid-block attention keeps 1×1 convolutions where diffusers has linear layers."""
    num_blocks = len(config["block_out_channels"])

    def ldm_up(m: re.Match) -> int:
        return num_blocks - 1 - int(m[1])

    resnet = _VAE_RESNET_LEAVES
    return [
        _Rule(r"encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block.", resnet),
        _Rule(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        _Rule(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{ldm_up(m)}.block.", resnet),
        _Rule(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{ldm_up(m)}.upsample."),
        _Rule(r"(\w+)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", resnet),
        _Rule(r"(\w+)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1.", _VAE_ATTENTION_LEAVES, True),
        _Rule(r"(\w+)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]


def _text_encoder_rules(config: Mapping[str, Any]) -> list[_Rule]:
    """transformers 5 drops the `text_model.` level that the LDM file (and older transformers) keep; the layout is the
    same at every size, so `config` is not needed."""
    return [_Rule(r"(?!text_model\.)", "text_model.")]


_RULES = {"unet": _unet_rules, "vae": _vae_rules, "text_encoder": _text_encoder_rules}


def _apply(rules: list[_Rule], key: str) -> tuple[str, bool]:
    """Returns the LDM key (without the component prefix) for one of our keys, and whether it is a 1×1 conv there."""
    for rule in rules:
        match = re.match(rule.pattern, key)
        if match is None:
            continue
        head = rule.target if isinstance(rule.target, str) else rule.target(match)
        rest = key[match.end() :]
        for ours, ldm in rule.leaves.items():
            if rest.startswith(ours + "."):
                rest = ldm + rest[len(ours) :]
                break
        is_conv_1x1 = rule.conv_1x1 and rest.endswith(".weight") and not rest.startswith("norm.")
        return head + rest, is_conv_1x1
    return key, False


def _key_map(component: str, keys: list[str], config: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """Maps each of the model's state_dict keys to (full LDM key, stored as 1×1 conv)."""
    rules = _RULES[component](config)
    prefix = LDM_PREFIXES[component]
    key_map = {}
    for key in keys:
        ldm_key, is_conv_1x1 = _apply(rules, key)
        key_map[key] = (prefix + ldm_key, is_conv_1x1)
    assert len({ldm_key for ldm_key, _ in key_map.values()}) == len(key_map), f"{component} rules are not one-to-one"
    return key_map


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def to_ldm_state_dict(
    *, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Our three components' weights under the LDM single-file keys (contiguous, detached, on their own device)."""
    ldm_state_dict = {}
    for component, model in zip(COMPONENTS, (unet, vae, text_encoder)):
        state_dict = model.state_dict()
        for key, (ldm_key, is_conv_1x1) in _key_map(component, list(state_dict), _config_dict(model)).items():
            tensor = state_dict[key].detach()
            ldm_state_dict[ldm_key] = (tensor[:, :, None, None] if is_conv_1x1 else tensor).contiguous()
    return ldm_state_dict


def save_single_file(
    path: str | Path, *, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
) -> None:
    """Writes the three components as one LDM checkpoint: `.safetensors`, or `.ckpt` as a plain
    `{"state_dict": …}` of tensors that `torch.load(weights_only=True)` reads."""
    path = Path(path)
    if path.suffix not in _SAVE_SUFFIXES:
        raise ValueError(f"`path` must end in one of {_SAVE_SUFFIXES}, got {str(path)!r}.")
    ldm_state_dict = to_ldm_state_dict(unet=unet, vae=vae, text_encoder=text_encoder)
    state_dict = {key: tensor.cpu() for key, tensor in ldm_state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state_dict}, path)
    logger.info(f"Saved {len(state_dict)} tensors in the LDM single-file layout to {path}.")


class _SafetensorsFile(Mapping[str, torch.Tensor]):
    """A memory-mapped `.safetensors` file read one tensor at a time, so loading costs one model's memory."""

    def __init__(self, path: Path) -> None:
        self._file = safe_open(str(path), framework="pt")
        self._keys = set(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """Opens a `.safetensors` file, or reads a torch pickle with `weights_only=True` (no code runs), unwrapping
    `{"state_dict": …}`."""
    if not path.is_file():
        raise FileNotFoundError(f"Single-file checkpoint {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        try:
            return _SafetensorsFile(path)
        except SafetensorError as error:
            raise ValueError(f"Cannot read {str(path)!r} as safetensors (truncated or corrupt?): {error}") from error
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"`path` must end in '.safetensors' or one of {_TORCH_SUFFIXES}, got {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{str(path)!r} needs pickle code execution to load, which is refused for safety (weights_only=True). "
            "Convert it to .safetensors with a tool you trust, then load that file."
        ) from error
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"Cannot read {str(path)!r} as a torch checkpoint (truncated or corrupt?): {error}") from error
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a dict of tensors.")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def _read_folder_configs(folder: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for component in COMPONENTS:
        config_path = folder / component / "config.json"
        if not config_path.is_file():
            raise ValueError(f"`config` folder {str(folder)!r} lacks {component}/config.json.")
        configs[component] = json.loads(config_path.read_text())
    return configs


def _resolve_configs(config: ConfigLike, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """`None` → the official v1.5 configs (text encoder sizes read from the weights); a folder → its config.json
    files; a dict → its entries, the rest defaulting as for `None`."""
    if isinstance(config, (str, Path)):
        if not Path(config).is_dir():
            raise ValueError(f"`config` must be a diffusers folder, a dict of configs or None, got {str(config)!r}.")
        return _read_folder_configs(Path(config))
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(
            f"`config` must be a diffusers folder, a dict of configs or None, got {type(config).__name__}."
        )
    given = dict(config or {})
    unknown = sorted(set(given) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"`config` has unknown components {unknown}; allowed: {list(COMPONENTS)}.")
    configs = default_configs()
    if "text_encoder" not in given:
        prefix = LDM_PREFIXES["text_encoder"]
        text_weights = {key[len(prefix) :]: value for key, value in checkpoint.items() if key.startswith(prefix)}
        configs["text_encoder"] = infer_text_encoder_config(text_weights)
    configs.update({component: dict(value) for component, value in given.items()})
    return configs


def _build_models(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.nn.Module]:
    """Our classes from configs, with parameters on the meta device (no random init; the weights are assigned next)."""
    unet_config, vae_config, text_config = (
        {key: value for key, value in configs[component].items() if not key.startswith("_") and key not in _METADATA}
        for component in COMPONENTS
    )
    with init_empty_weights(include_buffers=False):
        return {
            "unet": ScratchUNet2DConditionModel.from_config(unet_config),
            "vae": ScratchAutoencoderKL.from_config(vae_config),
            "text_encoder": ScratchCLIPTextModel(ScratchCLIPTextModel.config_class(**text_config)),
        }


def _first(items: list[str]) -> str:
    return ", ".join(items[:_FIRST_OFFENDERS])


def load_ldm_state_dict(
    checkpoint: Mapping[str, torch.Tensor],
    *,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    source: str = "checkpoint",
) -> None:
    """Assigns the LDM weights in `checkpoint` to the three models (strict: every key used, every shape equal).

    Tensors are cast to each parameter's dtype. Raises ValueError naming the first missing, unexpected and
    mismatched keys, with their counts, and loads nothing in that case.
    """
    if any(key.startswith(_OPEN_CLIP_PREFIX) for key in checkpoint):
        raise ValueError(
            f"{source} has an OpenCLIP text encoder ({_OPEN_CLIP_PREFIX}…, Stable Diffusion 2.x); only the SD 1.x "
            "CLIP layout (cond_stage_model.transformer.…) is supported."
        )
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    used, missing, mismatched = set(), [], []
    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    for component, model in models.items():
        expected = model.state_dict()
        state_dicts[component] = {}
        for key, (ldm_key, is_conv_1x1) in _key_map(component, list(expected), _config_dict(model)).items():
            if ldm_key not in checkpoint:
                missing.append(f"{ldm_key} ({component}.{key})")
                continue
            used.add(ldm_key)
            tensor = checkpoint[ldm_key]
            if is_conv_1x1 and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            if tensor.shape != expected[key].shape:
                mismatched.append(f"{ldm_key}: file {tuple(tensor.shape)} vs {component} {tuple(expected[key].shape)}")
                continue
            state_dicts[component][key] = tensor.to(expected[key].dtype)
    in_components = [key for key in checkpoint if key.startswith(tuple(LDM_PREFIXES.values()))]
    unexpected = [key for key in in_components if key not in used and not key.endswith(_IGNORED_LDM_SUFFIXES)]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit the configured models: {len(missing)} missing keys [{_first(missing)}]; "
            f"{len(unexpected)} unexpected keys [{_first(unexpected)}]; {len(mismatched)} shape mismatches "
            f"[{_first(mismatched)}]. Pass the `config` (diffusers folder or dict of configs) the file was made with."
        )
    ignored = len(checkpoint) - len(in_components)
    if ignored:
        logger.info(f"{source}: ignored {ignored} keys outside the three components (EMA copies, schedule buffers).")
    for component, model in models.items():
        model.load_state_dict(state_dicts[component], strict=True, assign=True)


def load_single_file(path: str | Path, config: ConfigLike = None) -> dict[str, torch.nn.Module]:
    """Builds our U-Net, VAE and text encoder from an LDM single-file checkpoint.

    Args:
        path: a `.safetensors` file, or a `.ckpt`/`.pt`/`.pth`/`.bin` torch file loadable with `weights_only=True`
            (optionally wrapped as `{"state_dict": …}`).
        config: `None` for the official SD v1.5 configs, a local diffusers folder (its `unet/`, `vae/` and
            `text_encoder/` config.json), or a dict `{"unet": …, "vae": …, "text_encoder": …}` of config dicts
            (components left out get the v1.5 config).

    Returns:
        `{"unet": ScratchUNet2DConditionModel, "vae": ScratchAutoencoderKL, "text_encoder": ScratchCLIPTextModel}`,
        in eval mode.
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path)
    models = _build_models(_resolve_configs(config, checkpoint))
    load_ldm_state_dict(checkpoint, **models, source=repr(str(path)))
    return {component: model.eval() for component, model in models.items()}
