"""LoRA (Hu et al. 2021, arXiv:2106.09685) on our U-Net, text encoder and pipelines, against diffusers and peft.

A LoRA made with peft on diffusers' own tiny `UNet2DConditionModel` and transformers' `CLIPTextModel`, saved by
diffusers' `save_lora_weights` with peft's keys (and rewritten in kohya's / AUTOMATIC1111's layout), must give our
pipeline diffusers' images: max abs difference <= 1e-4 on images in [0, 1], at scales 1 and 0.5, fused and unfused.
Unfusing must restore the weights bit for bit. A LoRA trained by `training/train_unet.py --lora_rank` must lower its
loss, resume bit for bit, and give our images in diffusers' `StableDiffusionPipeline`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import tiny_components, write_square_images
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers.ddpm import ScratchDDPMScheduler

TOLERANCE = 1e-4  # max abs difference of images in [0, 1]
PROMPT = "a red circle"
RANK, ALPHA = 4, 8.0  # α/r = 2, so a loader that ignored α would be off by a factor of 2
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LORA_FILE = "pytorch_lora_weights.safetensors"


def ddim() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip


def diffusers_pipeline(components: dict | None = None) -> StableDiffusionPipeline:
    components = components or tiny_components("diffusers")
    pipe = StableDiffusionPipeline(
        **components, scheduler=ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scratch_pipeline() -> ScratchStableDiffusionPipeline:
    pipe = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=generator, output_type="np", **kwargs
    ).images


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def kohya_layout(state_dict: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """peft keys (`<module>.lora_A.weight`) in kohya's / AUTOMATIC1111's SD 1.x layout: `<prefix><module with
    underscores>.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`."""
    converted = {}
    for key, tensor in state_dict.items():
        module, kind = key.rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        converted[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = tensor
        converted[f"{name}.alpha"] = torch.tensor(alpha)
    return converted


def make_lora(folder: Path, seed: int) -> Path:
    """A LoRA made with peft on diffusers' tiny U-Net and transformers' text model, saved by diffusers with peft's keys
    and the adapters' configs as metadata; `folder/kohya/` holds the same LoRA in kohya's layout. peft starts B at 0
    (a LoRA that changes nothing), so B is drawn at random here."""
    components = tiny_components("diffusers")
    unet, text_encoder = components["unet"], components["text_encoder"]
    unet_config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
    unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, text_encoder)  # transformers' add_adapter needs peft >= 0.22
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    unet_layers, text_layers = get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )  # fmt: skip
    (folder / "kohya").mkdir()
    kohya = {
        **kohya_layout(unet_layers, "lora_unet_", ALPHA),
        **kohya_layout(text_layers, "lora_te_text_model_", ALPHA),
    }
    save_file(kohya, folder / "kohya" / "lora.safetensors")
    return folder


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora"), seed=1)


@pytest.fixture(scope="module")
def second_lora(tmp_path_factory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora2"), seed=2)


@pytest.fixture(scope="module")
def base_images() -> np.ndarray:
    return images(scratch_pipeline())


# --------------------------------------------------------------------------------------------- loading into pipelines
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_diffusers_lora_gives_diffusers_images(lora, base_images, scale, fused):
    reference, ours = diffusers_pipeline(), scratch_pipeline()
    for pipe in (reference, ours):
        pipe.load_lora_weights(lora)
        if fused:
            pipe.fuse_lora(lora_scale=scale)
    kwargs = {} if fused else {"cross_attention_kwargs": {"scale": scale}}
    expected, got = images(reference, **kwargs), images(ours, **kwargs)
    assert max_difference(got, expected) <= TOLERANCE
    assert max_difference(got, base_images) > 0.02, "the LoRA should change the images"


def test_the_scale_weighs_the_lora(lora, base_images):
    pipe = scratch_pipeline()
    pipe.load_lora_weights(lora)
    full, half, none = (images(pipe, cross_attention_kwargs={"scale": s}) for s in (1.0, 0.5, 0.0))
    assert max_difference(full, half) > 0.01
    assert max_difference(none, base_images) <= 1e-6
    assert max_difference(images(pipe), full) == 0.0  # the scale lasts one call only


def test_a_kohya_file_gives_the_same_images_in_both(lora):
    reference, ours, ours_from_peft_keys = diffusers_pipeline(), scratch_pipeline(), scratch_pipeline()
    reference.load_lora_weights(lora / "kohya", weight_name="lora.safetensors")
    ours.load_lora_weights(lora / "kohya", weight_name="lora.safetensors")
    ours_from_peft_keys.load_lora_weights(lora)
    for kwargs in ({}, {"cross_attention_kwargs": {"scale": 0.5}}):
        expected = images(reference, **kwargs)
        assert max_difference(images(ours, **kwargs), expected) <= TOLERANCE
        assert max_difference(images(ours_from_peft_keys, **kwargs), expected) <= TOLERANCE


def test_unfusing_restores_the_weights_bit_for_bit(lora):
    pipe = scratch_pipeline()
    pipe.load_lora_weights(lora)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}

    def weights() -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": t.clone() for name, m in models.items() for key, t in m.state_dict().items()}

    before = weights()
    pipe.fuse_lora(lora_scale=0.5)
    fused = weights()
    assert any(not torch.equal(before[key], fused[key]) for key in before if "base_layer" in key)
    pipe.unfuse_lora()
    after = weights()
    assert all(torch.equal(before[key], after[key]) for key in before)

    pipe.unet.fuse_lora()  # the U-Net's own API
    pipe.unet.unfuse_lora()
    assert all(torch.equal(before[key], t) for key, t in weights().items())


def test_two_loras_and_their_weights_match_diffusers(lora, second_lora, base_images):
    reference, ours = diffusers_pipeline(), scratch_pipeline()
    for pipe in (reference, ours):
        pipe.load_lora_weights(lora, adapter_name="first")
        pipe.load_lora_weights(second_lora, adapter_name="second")
        pipe.set_adapters(["first", "second"], adapter_weights=[0.5, 0.25])
    assert ours.get_list_adapters() == reference.get_list_adapters()
    assert max_difference(images(ours), images(reference)) <= TOLERANCE
    ours.disable_lora()
    assert max_difference(images(ours), base_images) == 0.0
    ours.enable_lora()
    ours.unload_lora_weights()
    assert max_difference(images(ours), base_images) == 0.0


def test_img2img_takes_the_lora_scale(lora):
    from diffusers import StableDiffusionImg2ImgPipeline

    from hf_scratch.pipelines.image_to_image import ScratchStableDiffusionImg2ImgPipeline

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    reference = StableDiffusionImg2ImgPipeline(**diffusers_pipeline().components, requires_safety_checker=False)
    ours = ScratchStableDiffusionImg2ImgPipeline(**tiny_components("scratch"), scheduler=ddim())
    results = []
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(lora)
        results.append(images(pipe, image=image, strength=0.8, cross_attention_kwargs={"scale": 0.5}))
    assert max_difference(*results) <= TOLERANCE


def test_inpainting_takes_the_lora_scale(lora):
    from diffusers import StableDiffusionInpaintPipeline

    from hf_scratch.pipelines.inpaint import ScratchStableDiffusionInpaintPipeline

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    reference = StableDiffusionInpaintPipeline(**diffusers_pipeline().components, requires_safety_checker=False)
    ours = ScratchStableDiffusionInpaintPipeline(**tiny_components("scratch"), scheduler=ddim())
    results = []
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(lora)
        results.append(images(pipe, image=image, mask_image=mask, cross_attention_kwargs={"scale": 0.5}))
    assert max_difference(*results) <= TOLERANCE
    unscaled = images(ours, image=image, mask_image=mask)
    assert max_difference(results[1], unscaled) > TOLERANCE


# --------------------------------------------------------------------------------------------- the U-Net's adapter API
def test_the_unet_adapter_api_matches_diffusers(lora, second_lora):
    ours, theirs = tiny_components("scratch")["unet"], tiny_components("diffusers")["unet"]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)

    def both(**kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return ours(sample, 500, context, **kwargs).sample, theirs(sample, 500, context, **kwargs).sample

    base, _ = both()
    for unet in (ours, theirs):
        for folder, name in ((lora, "first"), (second_lora, "second")):
            unet.load_lora_adapter(folder, prefix="unet", adapter_name=name, weight_name=LORA_FILE)
        unet.set_adapter("first")
    assert ours.active_adapters() == theirs.active_adapters() == ["first"]
    for kwargs in ({}, {"cross_attention_kwargs": {"scale": 0.5}}):
        torch.testing.assert_close(*both(**kwargs), rtol=0, atol=1e-5)
    block_wise = {"down": 0.25, "mid": 1.0, "up": {"block_0": [0.5, 0.75]}}
    for weights in ([0.5, 1.0], [block_wise, 0.5]):
        for unet in (ours, theirs):
            unet.set_adapters(["first", "second"], weights)
        torch.testing.assert_close(*both(), rtol=0, atol=1e-5)
    ours.disable_adapters()
    assert torch.equal(both()[0], base)
    ours.enable_adapters()
    ours.delete_adapters(["first", "second"])
    assert torch.equal(both()[0], base)


def test_add_adapter_gives_peft_trainable_layers():
    unet = tiny_components("scratch")["unet"]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    trainable = {name for name, parameter in unet.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    attention_layers = sum(name.endswith(("attn1", "attn2")) for name, _ in unet.named_modules())
    assert len(trainable) == 2 * len(UNET_TARGETS) * attention_layers


# --------------------------------------------------------------------------------------------- errors
def test_a_lora_whose_keys_match_no_module_is_refused_naming_them():
    pipe = scratch_pipeline()
    no_prefix = {"foo.lora_A.weight": torch.zeros(4, 8), "foo.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(
        ValueError, match=r"pretrained_model_name_or_path_or_dict.*foo\.lora_A.*name none of their modules"
    ):
        pipe.load_lora_weights(no_prefix)
    other_model = {"unet.add_embedding.lora_A.weight": torch.zeros(4, 8), "unet.add_embedding.lora_B.weight":
                   torch.zeros(8, 4)}  # fmt: skip
    with pytest.raises(ValueError, match=r"could not be loaded as a LoRA.*add_embedding.*made for this architecture"):
        pipe.load_lora_weights(other_model)
    with pytest.raises(ValueError, match=r"could not be loaded as a LoRA.*lora"):
        pipe.load_lora_weights({"unet.conv_in.weight": torch.zeros(1)})
    assert max_difference(images(pipe), images(scratch_pipeline())) == 0.0  # nothing half-loaded


def test_cross_attention_kwargs_other_than_the_scale_are_refused():
    pipe = scratch_pipeline()
    with pytest.raises(ValueError, match=r"`cross_attention_kwargs` must be None or \{'scale': s\}"):
        images(pipe, cross_attention_kwargs={"gligen": {}})
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\['scale'\]"):
        images(pipe, cross_attention_kwargs={"scale": "high"})
    with pytest.raises(ValueError, match=r"cross_attention_kwargs=.*the LoRA scale"):
        pipe.unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 3, 32), cross_attention_kwargs={"ip_adapter_masks": 1})


def test_fusing_qkv_projections_over_an_unfused_lora_is_refused(lora):
    pipe = scratch_pipeline()
    pipe.load_lora_weights(lora)
    with pytest.raises(ValueError, match=r"bypass the loaded LoRA adapters; call fuse_lora\(\) first"):
        pipe.unet.fuse_qkv_projections()


# --------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A tiny pipeline folder of our classes (ε-prediction DDPM schedule), the base model to adapt."""
    folder = tmp_path_factory.mktemp("base") / "pipeline"
    scheduler = ScratchDDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return write_square_images(tmp_path_factory.mktemp("squares"))


def lora_args(base: Path, data: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--resolution", "32",
        "--output_dir", str(output), "--lora_rank", str(RANK), "--lora_alpha", str(ALPHA), "--seed", "0",
        "--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "3e-2",
        "--checkpointing_steps", str(steps // 2), "--validation_steps", "1000", "--report_to", "none",
        "--caption_dropout_prob", "0.1", *extra,
    ]  # fmt: skip


def train(args: list[str]) -> str:
    command = [ACCELERATE, "launch", "--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", str(REPO / "training" / "train_unet.py"),
               *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"train_unet.py exited with {result.returncode}:\n{result.stdout[-3000:]}"
    return result.stdout + result.stderr


def losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_folder, data_folder) -> Path:
    """16 steps of U-Net and text-encoder LoRA training, checkpoints at steps 8 and 16."""
    output = tmp_path_factory.mktemp("lora-run") / "run"
    train(lora_args(base_folder, data_folder, output, 16, "--train_text_encoder_lora"))
    return output


def diffusers_base(base: Path) -> StableDiffusionPipeline:
    """diffusers' and transformers' own classes, loaded from the subfolders of our base pipeline folder."""
    components = {
        "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(base, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
    }
    return diffusers_pipeline(components)


def test_lora_training_lowers_the_loss(lora_run):
    values = list(losses(lora_run).values())
    assert len(values) == 16
    first, last = np.mean(values[:4]), np.mean(values[-4:])
    assert last < 0.98 * first, f"the loss did not fall by 2%: {values}"
    card = (lora_run / "README.md").read_text()
    assert f"rank r = {RANK}" in card and "load_lora_weights" in card


def test_a_trained_lora_gives_our_images_in_diffusers(lora_run, base_folder):
    weights = load_file(lora_run / LORA_FILE)
    assert any(key.startswith("unet.") for key in weights) and any(key.startswith("text_encoder.") for key in weights)
    reference = diffusers_base(base_folder)
    ours = ScratchStableDiffusionPipeline.from_pretrained(base_folder, scheduler=ddim())
    ours.set_progress_bar_config(disable=True)
    base = images(ours)
    for pipe in (reference, ours):
        pipe.load_lora_weights(lora_run)
    trained = images(ours)
    assert max_difference(trained, images(reference)) <= TOLERANCE
    assert max_difference(trained, base) > 1e-3, "the trained LoRA should change the images"


def test_a_resumed_lora_run_repeats_the_uninterrupted_one_bit_for_bit(lora_run, base_folder, data_folder, tmp_path):
    output = tmp_path / "resumed"
    output.mkdir()
    shutil.copytree(lora_run / "checkpoint-8", output / "checkpoint-8")
    args = lora_args(base_folder, data_folder, output, 16, "--train_text_encoder_lora")
    log = train([*args, "--resume_from_checkpoint", "latest"])
    assert "resuming from" in log
    expected = losses(lora_run)
    assert losses(output) == {step: expected[step] for step in range(9, 17)}
    uninterrupted = load_file(lora_run / LORA_FILE)
    resumed = load_file(output / LORA_FILE)
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)


def test_a_unet_only_lora_run_loads_into_diffusers(tmp_path, base_folder, data_folder):
    output = tmp_path / "unet-only"
    train(lora_args(base_folder, data_folder, output, 4, "--snapshot_steps", "2"))
    assert (output / "snapshots" / "step-2" / LORA_FILE).is_file()
    assert not (output / "model_index.json").exists()
    weights = load_file(output / LORA_FILE)
    assert weights and all(key.startswith("unet.") for key in weights)
    reference = diffusers_base(base_folder)
    ours = ScratchStableDiffusionPipeline.from_pretrained(base_folder, scheduler=ddim())
    ours.set_progress_bar_config(disable=True)
    for pipe in (reference, ours):
        pipe.load_lora_weights(output)
    assert max_difference(images(ours), images(reference)) <= TOLERANCE


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_rank", "0"], "--lora_rank=0 must be at least 1"),
        (["--lora_rank", "4", "--lora_alpha", "-1"], "--lora_alpha=-1.0 must be positive"),
        (["--lora_alpha", "8"], "--lora_alpha sets up a LoRA run; add --lora_rank"),
        (["--train_text_encoder_lora"], "--train_text_encoder_lora sets up a LoRA run; add --lora_rank"),
        (["--lora_rank", "4", "--use_ema"], "--use_ema cannot be combined with --lora_rank"),
        (["--lora_rank", "4", "--unet_config", "u.json"], "--unet_config cannot be combined with --lora_rank"),
        (["--lora_rank", "4", "--objective", "v_prediction"], "--objective v_prediction differs .* \\(epsilon"),
    ],
)
def test_incompatible_lora_flags_are_refused(extra, message, base_folder, data_folder, tmp_path):
    from hf_scratch.training import train_unet

    args = ["--pretrained_model_name_or_path", str(base_folder), "--train_data_dir", str(data_folder),
            "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train_unet.parse_args(args)


def test_a_lora_needs_a_pipeline_folder(data_folder, tmp_path):
    from hf_scratch.training import train_unet

    args = ["--train_data_dir", str(data_folder), "--output_dir", str(tmp_path / "out"), "--lora_rank", "4",
            "--vae_path", "v", "--text_encoder_path", "t", "--tokenizer_path", "k"]  # fmt: skip
    with pytest.raises(ValueError, match="--lora_rank adapts a pipeline's U-Net: pass --pretrained_model_name_or_path"):
        train_unet.parse_args(args)
