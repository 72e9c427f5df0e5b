"""The three training scripts under `accelerate launch`, on a tiny generated dataset and tiny models.

Each script runs a few steps in a subprocess and must lower its loss; the U-Net run must end in a pipeline folder that
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` loads and samples from. A real two-process run must
keep the ranks' weights identical. A run killed with SIGKILL right after a checkpoint and resumed with
`--resume_from_checkpoint latest` must reproduce the uninterrupted run's losses and weights bit for bit. User errors
must fail with messages that name the problem.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
RESOLUTION = 32
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")

from hf_scratch.training import arguments, checkpoints, data  # noqa: E402


def draw(colour: str, shape: str, offset: int) -> Image.Image:
    image = Image.new("RGB", (40, 40), "white")
    box = (offset, offset, offset + 24, offset + 24)
    canvas = ImageDraw.Draw(image)
    if shape == "circle":
        canvas.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        canvas.rectangle(box, fill=COLOURS[colour])
    else:
        canvas.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    return image


def write_dataset(root: Path, corrupt: bool = True) -> Path:
    """train/ (48 images, one of them a corrupt file) and validation/ (12), each with metadata.jsonl."""
    for split, count in (("train", 48), ("validation", 12)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for index in range(count):
            colour, shape = list(COLOURS)[index % 4], SHAPES[(index // 4) % 3]
            name = f"{index:03d}.png"
            draw(colour, shape, 4 + (index * 7 + (split == "validation")) % 9).save(folder / name)
            rows.append({"file_name": name, "text": f"a {colour} {shape}", "style": "flat"})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if corrupt:
        (root / "train" / "005.png").write_bytes(b"these bytes are not a PNG file")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def components(tmp_path_factory, data_dir) -> Path:
    """Frozen tiny VAE, text encoder and a BPE tokenizer learned from the captions, saved as separate folders."""
    from hf_scratch.models.clip import ScratchCLIPTextConfig, ScratchCLIPTextModel
    from hf_scratch.models.vae import ScratchAutoencoderKL
    from hf_scratch.tokenization import train_clip_bpe_tokenizer

    root = tmp_path_factory.mktemp("components")
    captions = [json.loads(line)["text"] for line in (data_dir / "train" / "metadata.jsonl").read_text().splitlines()]
    tokenizer = train_clip_bpe_tokenizer(captions, vocab_size=600, save_dir=root / "tokenizer", model_max_length=8)
    torch.manual_seed(0)
    levels = ("DownEncoderBlock2D", "DownEncoderBlock2D")
    ScratchAutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=levels,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=1.0,
    ).save_pretrained(root / "vae")
    text_config = ScratchCLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ScratchCLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    return root


def launch(script: str, args: list[str], launcher: list[str] | None = None, **popen) -> subprocess.Popen:
    """Start `accelerate launch <launcher> training/<script> <args>` in its own process group, one thread each."""
    launcher = launcher or [
        "--num_processes",
        "1",
        "--cpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    command = [ACCELERATE, "launch", *launcher, "--num_cpu_threads_per_process", "1", str(TRAINING / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **popen.pop("env", {})}
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def run(script: str, args: list[str], launcher: list[str] | None = None, timeout: int = 400, **popen) -> str:
    process = launch(script, args, launcher, **popen)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{script} exited with {process.returncode}:\n{output[-6000:]}"
    return output


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / checkpoints.TRAIN_LOG).read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def assert_loss_falls(output_dir: Path, window: int = 2) -> None:
    values = list(losses(output_dir).values())
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    assert last < first, f"loss did not fall: {values}"


def unet_args(data_dir: Path, components: Path, output_dir: Path, steps: int = 8) -> list[str]:
    return [
        "--train_data_dir",
        str(data_dir),
        "--resolution",
        str(RESOLUTION),
        "--output_dir",
        str(output_dir),
        "--vae_path",
        str(components / "vae"),
        "--text_encoder_path",
        str(components / "text_encoder"),
        "--tokenizer_path",
        str(components / "tokenizer"),
        "--block_out_channels",
        "32",
        "64",
        "--layers_per_block",
        "1",
        "--attention_head_dim",
        "4",
        "--train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--max_train_steps",
        str(steps),
        "--learning_rate",
        "1e-3",
        "--lr_warmup_steps",
        "2",
        "--lr_scheduler",
        "constant_with_warmup",
        "--snr_gamma",
        "5",
        "--noise_offset",
        "0.05",
        "--caption_dropout_prob",
        "0.2",
        "--use_ema",
        "--checkpointing_steps",
        "3",
        "--checkpoints_total_limit",
        "2",
        "--report_to",
        "tensorboard",
        "--validation_prompts",
        "a red circle",
        "--num_validation_images",
        "2",
        "--validation_inference_steps",
        "2",
        "--validation_steps",
        "100",
    ]


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory, data_dir, components) -> Path:
    """The uninterrupted reference run: 8 steps, checkpoints every 3, EMA, min-SNR, offset noise, caption dropout."""
    output_dir = tmp_path_factory.mktemp("unet") / "run"
    run("train_unet.py", unet_args(data_dir, components, output_dir))
    return output_dir


@pytest.mark.slow
def test_train_vae(tmp_path, data_dir):
    output_dir = tmp_path / "vae"
    run(
        "train_vae.py",
        [
            "--train_data_dir",
            str(data_dir),
            "--resolution",
            str(RESOLUTION),
            "--output_dir",
            str(output_dir),
            "--block_out_channels",
            "16",
            "32",
            "--norm_num_groups",
            "8",
            "--train_batch_size",
            "8",
            "--max_train_steps",
            "8",
            "--learning_rate",
            "2e-3",
            "--validation_steps",
            "4",
            "--checkpointing_steps",
            "4",
            "--use_discriminator",
            "--disc_start",
            "4",
            "--disc_channels",
            "16",
            "--disc_layers",
            "2",
        ],
    )
    assert_loss_falls(output_dir)
    log = [json.loads(line) for line in (output_dir / checkpoints.TRAIN_LOG).read_text().splitlines()]
    assert "discriminator_loss" not in log[3] and "discriminator_loss" in log[4]  # the GAN joins at --disc_start
    psnr = [json.loads(line)["psnr"] for line in (output_dir / "validation" / "psnr.jsonl").read_text().splitlines()]
    assert len(psnr) == 2 and psnr[1] > psnr[0]

    from hf_scratch.models.vae import ScratchAutoencoderKL

    vae = ScratchAutoencoderKL.from_pretrained(output_dir)
    assert vae.config.scaling_factor != 0.18215  # set from the training latents
    assert vae.encode(torch.zeros(1, 3, RESOLUTION, RESOLUTION)).latent_dist.mean.shape == (1, 4, 16, 16)


@pytest.mark.slow
def test_decoder_only_fine_tuning_keeps_the_encoder_and_its_latent_scale(tmp_path, data_dir):
    """--train_decoder_only: the encoder, quant_conv and scaling_factor come out bit-identical, the decoder moves and
    its reconstruction loss falls, so a U-Net trained on the first VAE's latents still fits."""
    from hf_scratch.models.vae import ScratchAutoencoderKL

    small = ["--train_data_dir", str(data_dir), "--resolution", str(RESOLUTION), "--train_batch_size", "8",
             "--learning_rate", "2e-3", "--validation_steps", "100", "--checkpointing_steps", "100"]  # fmt: skip
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    run("train_vae.py", [*small, "--output_dir", str(first), "--block_out_channels", "16", "32",
                         "--norm_num_groups", "8", "--max_train_steps", "4"])  # fmt: skip
    run("train_vae.py", [*small, "--output_dir", str(tuned), "--pretrained_vae", str(first), "--train_decoder_only",
                         "--max_train_steps", "8"])  # fmt: skip
    assert_loss_falls(tuned)
    before, after = ScratchAutoencoderKL.from_pretrained(first), ScratchAutoencoderKL.from_pretrained(tuned)
    assert after.config.scaling_factor == before.config.scaling_factor
    old, new = before.state_dict(), after.state_dict()
    kept = [key for key in old if key.startswith(("encoder.", "quant_conv."))]
    assert kept and all(torch.equal(old[key], new[key]) for key in kept)
    assert any(not torch.equal(old[key], new[key]) for key in old if key.startswith("decoder."))


def test_decoder_only_needs_a_pretrained_vae(tmp_path, data_dir):
    from hf_scratch.training import train_vae

    with pytest.raises(ValueError, match="--train_decoder_only needs --pretrained_vae"):
        train_vae.parse_args([*vae_argv(data_dir, tmp_path / "out"), "--train_decoder_only"])
    with pytest.raises(ValueError, match="holds no config.json"):
        train_vae.parse_args([*vae_argv(data_dir, tmp_path / "out"), "--pretrained_vae", str(tmp_path)])


@pytest.mark.slow
def test_train_clip(tmp_path, data_dir):
    output_dir = tmp_path / "clip"
    run(
        "train_clip.py",
        [
            "--train_data_dir",
            str(data_dir),
            "--resolution",
            str(RESOLUTION),
            "--output_dir",
            str(output_dir),
            "--vocab_size",
            "600",
            "--max_length",
            "8",
            "--text_hidden_size",
            "32",
            "--text_layers",
            "2",
            "--text_heads",
            "2",
            "--vision_hidden_size",
            "32",
            "--vision_layers",
            "2",
            "--vision_heads",
            "2",
            "--projection_dim",
            "32",
            "--train_batch_size",
            "16",
            "--max_train_steps",
            "12",
            "--learning_rate",
            "2e-3",
            "--validation_steps",
            "6",
            "--checkpointing_steps",
            "6",
        ],
    )
    assert_loss_falls(output_dir, window=3)
    retrieval = [json.loads(line) for line in (output_dir / "validation_retrieval.jsonl").read_text().splitlines()]
    assert {"text_to_image_top1", "text_to_image_top5", "image_to_text_top1", "image_to_text_top5"} <= set(
        retrieval[-1]
    )

    from transformers import CLIPTokenizer

    from hf_scratch.models.clip import ScratchCLIPModel, ScratchCLIPTextModel

    tokenizer = CLIPTokenizer.from_pretrained(output_dir / "tokenizer")
    clip = ScratchCLIPModel.from_pretrained(output_dir)
    text_encoder = ScratchCLIPTextModel.from_pretrained(output_dir / "text_encoder")
    ids = tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    torch.testing.assert_close(text_encoder(ids)[0], clip.text_model(ids)[0])  # the saved tower is CLIP's own


@pytest.mark.slow
def test_train_unet_ends_with_a_loadable_pipeline(unet_run):
    from diffusers import DiffusionPipeline

    assert_loss_falls(unet_run)
    assert sorted(losses(unet_run)) == list(range(1, 9))
    assert [p.name for p in checkpoints.list_checkpoints(unet_run)] == ["checkpoint-6", "checkpoint-8"]  # total limit 2
    assert (unet_run / "validation" / "step-000008.png").is_file()
    assert list((unet_run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    card = (unet_run / "README.md").read_text()
    assert "(1 skipped" in card and "optimizer steps" in card

    pipe = DiffusionPipeline.from_pretrained(unet_run, trust_remote_code=True)
    assert type(pipe).__name__ == "ScratchStableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)


OBJECTIVE_CASES = {
    "epsilon+huber": ["--objective", "epsilon", "--loss_type", "huber", "--huber_schedule", "snr"],
    "v+zero-snr": ["--objective", "v_prediction", "--rescale_betas_zero_snr", "--snr_gamma", "5"],
    "edm+immiscible": [
        "--objective",
        "edm",
        "--sigma_data",
        "1.0",
        "--edm_p_mean",
        "0.29",
        "--edm_p_std",
        "1.0",
        "--immiscible_noise",
    ],
    "flow-logit-normal": ["--objective", "flow_matching", "--weighting_scheme", "logit_normal"],
    "flow-mode+huber": ["--objective", "flow_matching", "--weighting_scheme", "mode", "--loss_type", "huber"],
}
SAMPLER_OF = {
    "epsilon": "ScratchDDPMScheduler",
    "v_prediction": "ScratchDDPMScheduler",
    "edm": "EDMDPMSolverMultistepScheduler",
    "flow_matching": "ScratchFlowMatchEulerScheduler",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", OBJECTIVE_CASES)
def test_every_objective_trains_saves_and_samples(case, tmp_path, data_dir, components):
    """A few steps of each objective; the folder loads through DiffusionPipeline with the objective's sampler, which
    draws a finite image, and the snapshot asked for is a pipeline too."""
    from diffusers import DiffusionPipeline

    output_dir = tmp_path / case
    args = unet_args(data_dir, components, output_dir, steps=4)
    args[args.index("--snr_gamma") : args.index("--snr_gamma") + 2] = []  # the case says which weighting
    run("train_unet.py", [*args, *OBJECTIVE_CASES[case], "--snapshot_steps", "2"])
    values = list(losses(output_dir).values())
    assert len(values) == 4 and all(math.isfinite(value) for value in values)
    objective = OBJECTIVE_CASES[case][1]
    for folder in (output_dir, output_dir / "snapshots" / "step-2"):
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        assert type(pipe.scheduler).__name__ == SAMPLER_OF[objective]
        image = pipe("a red circle", num_inference_steps=3, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        assert image.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    assert objective.replace("_", " ").split()[0] in (output_dir / "README.md").read_text().lower()


def test_objective_flags_are_checked(tmp_path, data_dir, components):
    from hf_scratch.training import train_unet

    base = unet_args(data_dir, components, tmp_path / "run")
    with pytest.raises(ValueError, match="--snr_gamma belongs to the DDPM chain"):
        train_unet.parse_args([*base, "--objective", "flow_matching"])  # base passes --snr_gamma 5
    with pytest.raises(ValueError, match="contradicts"):
        train_unet.parse_args([*base, "--objective", "epsilon", "--prediction_type", "v_prediction"])


@pytest.mark.slow
def test_kill_after_checkpoint_and_resume_is_bit_identical(tmp_path, data_dir, components, unet_run):
    output_dir = tmp_path / "killed"
    args = unet_args(data_dir, components, output_dir)
    process = launch("train_unet.py", args)
    deadline = time.monotonic() + 300
    while not checkpoints.list_checkpoints(output_dir):
        assert process.poll() is None, f"the run ended before its first checkpoint:\n{process.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (output_dir / "model_index.json").exists(), "the run finished before it was killed"
    killed_at = int(checkpoints.list_checkpoints(output_dir)[-1].name.split("-")[1])
    assert killed_at < 8
    (output_dir / ".checkpoint-99.partial").mkdir()  # what a kill during a save leaves behind

    output = run("train_unet.py", [*args, "--resume_from_checkpoint", "latest"])
    assert f"resuming from {output_dir / f'checkpoint-{killed_at}'}" in output
    assert not (output_dir / ".checkpoint-99.partial").exists()
    assert losses(output_dir) == losses(unet_run)  # every step, bit for bit
    for component in ("unet/diffusion_pytorch_model.safetensors",):
        expected, resumed = load_file(unet_run / component), load_file(output_dir / component)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    reference = json.loads((unet_run / "ranks" / "rank-0.json").read_text())
    assert (
        json.loads((output_dir / "ranks" / "rank-0.json").read_text())["final_checksum"] == reference["final_checksum"]
    )


@pytest.mark.slow
def test_channels_last_and_fused_adamw_train_the_same_model_and_resume_bit_for_bit(
    tmp_path, data_dir, components, unet_run
):
    """--channels_last --adam_fused run the same update in another layout and kernel: the losses and the trained
    U-Net's outputs follow the default run's to float rounding, the weights load as usual, and a run resumed from its
    checkpoint-6 repeats its last two steps bit for bit."""
    from hf_scratch.models.unet import ScratchUNet2DConditionModel

    flags = ["--channels_last", "--adam_fused"]
    output_dir = tmp_path / "fast"
    run("train_unet.py", [*unet_args(data_dir, components, output_dir), *flags])
    default, fast = losses(unet_run), losses(output_dir)
    assert fast.keys() == default.keys()
    np.testing.assert_allclose(list(fast.values()), list(default.values()), rtol=1e-4)
    unets = [ScratchUNet2DConditionModel.from_pretrained(folder / "unet") for folder in (unet_run, output_dir)]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unets[0].config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 8, unets[0].config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        outputs = [unet(sample, torch.tensor([10, 500]), context).sample for unet in unets]
    # Not the weights themselves: Adam's normalised step turns rounding-level gradients (the biases ahead of a
    # GroupNorm) into steps of up to the learning rate, along directions the outputs barely see (measured: weights
    # 1e-3 apart, outputs 1.3e-6 apart at a scale of 1.9).
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output_dir / "checkpoint-6", resumed / "checkpoint-6")
    run("train_unet.py", [*unet_args(data_dir, components, resumed), *flags, "--resume_from_checkpoint", "latest"])
    assert losses(resumed) == {step: fast[step] for step in (7, 8)}
    name = "unet/diffusion_pytorch_model.safetensors"
    trained, final = load_file(output_dir / name), load_file(resumed / name)
    assert trained.keys() == final.keys() and all(torch.equal(final[key], trained[key]) for key in trained)


@pytest.mark.slow
def test_two_processes_keep_weights_in_sync(tmp_path, data_dir, components):
    output_dir = tmp_path / "ddp"
    args = [*unet_args(data_dir, components, output_dir, steps=3), "--cache_latents", "--report_to", "none"]
    launcher = [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    process = launch("train_unet.py", args, launcher, env={"ACCELERATE_USE_CPU": "1"})
    output, _ = process.communicate(timeout=400)
    # Judge by the files the ranks wrote: a torch.distributed teardown can abort after training has finished.
    reports = sorted((output_dir / "ranks").glob("rank-*.json")) if (output_dir / "ranks").exists() else []
    assert len(reports) == 2, f"launcher exited with {process.returncode}:\n{output[-6000:]}"
    if process.returncode != 0:
        print(f"two-process launcher exited with {process.returncode} after both ranks wrote their reports")
    ranks = [json.loads(path.read_text()) for path in reports]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["initial_checksum"] == ranks[1]["initial_checksum"]
    assert ranks[0]["final_checksum"] == ranks[1]["final_checksum"] != ranks[0]["initial_checksum"]
    assert (output_dir / "model_index.json").is_file()
    assert sorted(losses(output_dir)) == [1, 2, 3]
    assert all(r["distributed_type"] == "MULTI_CPU" for r in ranks)

    # A longer run resumed on both ranks reads the latents each rank wrote to disk and encodes none.
    (shards,) = [sorted(key.glob("rank-*.safetensors")) for key in (output_dir / "latent-cache").iterdir()]
    assert [shard.name for shard in shards] == ["rank-0-of-2.safetensors", "rank-1-of-2.safetensors"]
    longer = [*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    process = launch("train_unet.py", longer, launcher, env={"ACCELERATE_USE_CPU": "1"})
    output, _ = process.communicate(timeout=400)
    assert sorted(losses(output_dir)) == [1, 2, 3, 4], output[-4000:]
    assert output.count("reading the latents of 47 images") == 2 and "caching latents" not in output


# -------------------------------------------------------------------------------------------------------- user errors
def vae_argv(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--train_data_dir", str(data_dir), "--output_dir", str(output_dir), "--resolution", str(RESOLUTION), *extra]


def test_missing_dataset_folder(tmp_path):
    from hf_scratch.training import train_vae

    args = train_vae.parse_args(vae_argv(tmp_path / "nowhere", tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--train_data_dir='.*nowhere' is not an existing folder"):
        train_vae.main(args)


def test_missing_caption_column(tmp_path, data_dir):
    from hf_scratch.training import train_clip

    args = train_clip.parse_args(vae_argv(data_dir, tmp_path / "out", "--caption_column", "prompt"))
    with pytest.raises(
        ValueError, match=r"--caption_column='prompt' is not a column .* available columns: image, text"
    ):
        train_clip.main(args)


def test_corrupt_image_is_skipped_and_counted(tmp_path, data_dir):
    from accelerate import Accelerator

    args = arguments.build_parser("test").parse_args(vae_argv(data_dir, tmp_path / "out"))
    dataset = data.load_image_text_dataset(args, "train", Accelerator())
    assert (len(dataset), dataset.num_skipped) == (47, 1)
    example = dataset[0]
    assert example["pixel_values"].shape == (3, RESOLUTION, RESOLUTION) and example["caption"] == "a red circle"
    assert -1.0 <= example["pixel_values"].min() and example["pixel_values"].max() <= 1.0


def test_resolution_must_be_a_multiple_of_8(tmp_path, data_dir):
    from hf_scratch.training import train_vae

    with pytest.raises(ValueError, match=r"--resolution=30 is not a positive multiple of 8"):
        train_vae.parse_args([*vae_argv(data_dir, tmp_path / "out"), "--resolution", "30"])


def test_resume_path_that_does_not_exist(tmp_path, data_dir):
    from hf_scratch.training import train_vae

    missing = tmp_path / "out" / "checkpoint-7"
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint='.*checkpoint-7' does not exist"):
        train_vae.parse_args(vae_argv(data_dir, tmp_path / "out", "--resume_from_checkpoint", str(missing)))


def test_latest_ignores_partial_checkpoints(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.partial", "checkpoint-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-2" / checkpoints.CHECKPOINT_STATE).write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-10" / checkpoints.CHECKPOINT_STATE).write_text('{"global_step": 10}')
    assert checkpoints.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert checkpoints.find_resume_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        checkpoints.find_resume_checkpoint(tmp_path, str(tmp_path / ".checkpoint-12.partial"))


def test_epoch_batches_are_a_seeded_function_of_the_epoch():
    class FakeAccelerator:
        num_processes, process_index, gradient_accumulation_steps = 2, 1, 2

    batches = data.EpochBatches(num_examples=21, batch_size=2, accelerator=FakeAccelerator(), seed=3)
    assert batches.updates_per_epoch == 2  # 21 // (2 per rank x 2 ranks x 2 micro-batches)
    epoch = batches.batches(epoch=1)
    assert len(epoch) == 4 and all(len(b) == 2 for b in epoch)
    assert batches.batches(epoch=1, skip_updates=1) == epoch[2:]
    assert batches.batches(epoch=1) == epoch and batches.batches(epoch=2) != epoch


# ------------------------------------------------------------------------------------ nothing lost, nothing unpickled
def copy_run(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def test_a_fresh_run_into_a_used_output_dir_is_refused(tmp_path, data_dir, components, unet_run):
    from hf_scratch.training import train_unet

    used = copy_run(unet_run, tmp_path / "used")
    with pytest.raises(ValueError, match="holds a run .*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        train_unet.parse_args(unet_args(data_dir, components, used))
    train_unet.parse_args([*unet_args(data_dir, components, used), "--resume_from_checkpoint", "latest"])  # allowed


@pytest.mark.slow
def test_overwrite_output_dir_removes_the_old_checkpoints(tmp_path, data_dir, components, unet_run):
    used = copy_run(unet_run, tmp_path / "used")
    (used / "checkpoint-100").mkdir()  # a checkpoint of the old run that "latest" must never find again
    (used / "checkpoint-100" / checkpoints.CHECKPOINT_STATE).write_text('{"global_step": 100}')
    args = unet_args(data_dir, components, used, steps=2)
    run("train_unet.py", [*args, "--overwrite_output_dir"])
    assert [p.name for p in checkpoints.list_checkpoints(used)] == ["checkpoint-2"]
    assert sorted(losses(used)) == [1, 2]


def test_output_dir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    from hf_scratch.training.checkpoints import LOCK_FILE, OutputDirLock

    first = OutputDirLock(tmp_path)
    first.acquire()
    with pytest.raises(ValueError, match="in use by another run"):
        OutputDirLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    second = OutputDirLock(tmp_path)
    second.acquire()  # the holder is gone: stale
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused_while_the_first_runs(tmp_path, data_dir, components):
    output_dir = tmp_path / "busy"
    first = launch("train_unet.py", [*unet_args(data_dir, components, output_dir, steps=400), "--checkpointing_steps",
                                     "1000"])  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (output_dir / ".hf_scratch.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = launch("train_unet.py", [*unet_args(data_dir, components, output_dir), "--resume_from_checkpoint",
                                          "latest"])  # fmt: skip
        output, _ = second.communicate(timeout=120)
        assert second.returncode != 0 and "is in use by another run" in output
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()


@pytest.mark.parametrize(
    "flag, value, message",
    [("--max_train_steps", "0", "--max_train_steps=0 must be at least 1"),
     ("--learning_rate", "0", "--learning_rate=0.0 must be a positive number"),
     ("--learning_rate", "nan", "--learning_rate=nan must be a finite number"),
     ("--lr_warmup_steps", "50", "--lr_warmup_steps=50 must be between 0 and --max_train_steps=8"),
     ("--ema_decay", "1.5", "--ema_decay=1.5 must lie strictly between 0 and 1"),
     ("--train_batch_size", "0", "--train_batch_size=0 must be at least 1")],
)  # fmt: skip
def test_impossible_numbers_are_refused(flag, value, message, tmp_path, data_dir, components):
    from hf_scratch.training import train_unet

    args = unet_args(data_dir, components, tmp_path / "run")
    with pytest.raises(ValueError, match=re.escape(message)):
        train_unet.parse_args([*args, flag, value])


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_good_checkpoints(tmp_path, data_dir, components):
    output_dir = tmp_path / "diverged"
    args = unet_args(data_dir, components, output_dir, steps=6)
    args[args.index("--learning_rate") + 1] = "1e38"  # the weights overflow within a few steps
    args[args.index("--checkpointing_steps") + 1] = "1"
    process = launch("train_unet.py", [*args, "--max_grad_norm", "0"])
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    match = re.search(r"training diverged at step (\d+): the (loss|gradient norm) is (nan|inf)", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert not (output_dir / "model_index.json").exists(), "a diverged run must not save a final model"
    kept = checkpoints.list_checkpoints(output_dir)
    assert kept and int(kept[-1].name.split("-")[1]) == step - 1  # the limit of 2 kept the last good ones
    weights = load_file(kept[-1] / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def _rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest agree with the files, as an attacker who replaces files could."""
    state = json.loads((checkpoint / checkpoints.CHECKPOINT_STATE).read_text())
    state["files"] = {name: (checkpoint / name).stat().st_size for name in state["files"]}
    (checkpoint / checkpoints.CHECKPOINT_STATE).write_text(json.dumps(state))


class _Payload:
    """Unpickling this runs code: it creates the file at `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_payloads_planted_in_every_checkpoint_file_never_run(tmp_path, data_dir, components, unet_run):
    import pickle

    source = checkpoints.list_checkpoints(unet_run)[-1]
    names = sorted(path.name for path in source.iterdir()) + ["custom_checkpoint_0.pkl"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors"} <= set(names)
    for name in names:
        run_dir = copy_run(unet_run, tmp_path / f"run-{name}")
        checkpoint = run_dir / source.name
        marker = tmp_path / f"ran-{name}"
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
        if name != checkpoints.CHECKPOINT_STATE:
            if name in json.loads((checkpoint / checkpoints.CHECKPOINT_STATE).read_text())["files"]:
                _rewrite_manifest(checkpoint)
        process = launch("train_unet.py", [*unet_args(data_dir, components, run_dir, steps=9),
                                           "--resume_from_checkpoint", str(checkpoint)])  # fmt: skip
        output, _ = process.communicate(timeout=300)
        assert not marker.exists(), f"unpickling {name} ran code:\n{output[-3000:]}"
        if name == "random_states_0.pkl":  # unreadable random states: the run goes on, and says so
            assert process.returncode == 0 and "random states were not restored" in output
            assert any(
                "warning" in json.loads(line) for line in (run_dir / checkpoints.TRAIN_LOG).read_text().splitlines()
            )
        elif name == "custom_checkpoint_0.pkl":  # accelerate's EMA pickle of older checkpoints is refused unread
            assert process.returncode != 0 and "which is never loaded because unpickling can run code" in output
        else:
            assert process.returncode != 0


@pytest.mark.slow
def test_latest_skips_a_truncated_checkpoint_for_the_previous_good_one(tmp_path, data_dir, components, unet_run):
    run_dir = copy_run(unet_run, tmp_path / "damaged")
    newest = checkpoints.list_checkpoints(run_dir)[-1]
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    (run_dir / "model_index.json").unlink()
    output = run("train_unet.py", [*unet_args(data_dir, components, run_dir), "--resume_from_checkpoint", "latest"])
    assert f"skipping {newest.name}: {optimizer} has 100 bytes" in output
    assert output.count(f"skipping {newest.name}") == 1 and f"resuming from {run_dir / 'checkpoint-6'}" in output
    assert losses(run_dir) == losses(unet_run)  # the previous checkpoint continues the same run, bit for bit


def test_checkpoint_problems_name_the_file(tmp_path):
    from hf_scratch.training.checkpoints import checkpoint_problem

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    assert "training_state.json is missing" in checkpoint_problem(folder)
    (folder / checkpoints.CHECKPOINT_STATE).write_text("{not json")
    assert "is not a valid training state" in checkpoint_problem(folder)
    (folder / checkpoints.CHECKPOINT_STATE).write_text(json.dumps({"global_step": 3, "files": {"optimizer.bin": 10}}))
    assert f"{folder / 'optimizer.bin'} is missing" in checkpoint_problem(folder)
    (folder / "optimizer.bin").write_bytes(b"")
    assert "has 0 bytes, 10 were written" in checkpoint_problem(folder)


@pytest.mark.slow
def test_resuming_from_non_finite_weights_is_refused(tmp_path, data_dir, components, unet_run):
    from safetensors.torch import save_file

    run_dir = copy_run(unet_run, tmp_path / "nan")
    checkpoint = checkpoints.list_checkpoints(run_dir)[-1]
    weights = load_file(checkpoint / "model.safetensors")
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, checkpoint / "model.safetensors")
    _rewrite_manifest(checkpoint)
    process = launch("train_unet.py", [*unet_args(data_dir, components, run_dir, steps=9), "--resume_from_checkpoint",
                                       str(checkpoint)])  # fmt: skip
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and f"refusing to resume from {checkpoint}" in output and first in output


@pytest.mark.parametrize("row", [{"file_name": "000.png", "text": None}, {"file_name": "000.png"}])
def test_a_row_without_a_caption_fails_at_load_naming_the_row(row, tmp_path, data_dir):
    from hf_scratch.training import train_unet

    copied = tmp_path / "data"
    shutil.copytree(data_dir, copied)
    lines = (copied / "train" / "metadata.jsonl").read_text().splitlines()
    lines[3] = json.dumps({**row, "file_name": "003.png"})
    (copied / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    args = train_unet.parse_args(["--train_data_dir", str(copied), "--output_dir", str(tmp_path / "out"),
                                  "--pretrained_model_name_or_path", str(tmp_path)])  # fmt: skip

    class MainProcess:
        def main_process_first(self):
            return contextlib.nullcontext()

    with pytest.raises(ValueError, match=r"row 3 of split 'train' .*003\.png.* has caption None"):
        data.load_image_text_dataset(args, "train", MainProcess())


def _file_digests(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing_and_an_unsaved_end_saves_the_uninterrupted_weights(
    tmp_path, data_dir, components, unet_run
):
    """The reference run stops at step 8 with 5 updates per epoch (47 images, 8 per update): not a multiple of an
    epoch. Re-running it with --resume_from_checkpoint latest trains nothing and writes nothing; a run killed after its
    last checkpoint but before its final save (and whose last log line was cut short) resumes to the same weights."""
    finished = tmp_path / "finished"
    shutil.copytree(unet_run, finished)
    before = _file_digests(finished)
    output = run("train_unet.py", [*unet_args(data_dir, components, finished), "--resume_from_checkpoint", "latest"])
    assert "already finished at step 8" in output
    assert _file_digests(finished) == before

    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    shutil.copytree(unet_run / "checkpoint-8", unsaved / "checkpoint-8")
    shutil.copy(unet_run / checkpoints.TRAIN_LOG, unsaved / checkpoints.TRAIN_LOG)
    with open(unsaved / checkpoints.TRAIN_LOG, "a") as log:
        log.write('{"step": 9, "lo')  # a write cut short by a kill
    output = run("train_unet.py", [*unet_args(data_dir, components, unsaved), "--resume_from_checkpoint", "latest"])
    assert "saving the result that was not saved" in output and "dropping its last line" in output
    assert [path.name for path in checkpoints.list_checkpoints(unsaved)] == ["checkpoint-8"]
    assert losses(unsaved) == losses(unet_run)
    name = "unet/diffusion_pytorch_model.safetensors"
    expected, resumed = load_file(unet_run / name), load_file(unsaved / name)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert "8 optimizer steps" in (unsaved / "README.md").read_text()


@pytest.mark.slow
def test_a_resume_applies_a_new_learning_rate_and_refuses_a_flag_that_changes_the_run(
    tmp_path, data_dir, components, unet_run
):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(unet_run / "checkpoint-6", resumed / "checkpoint-6")
    base = [*unet_args(data_dir, components, resumed), "--resume_from_checkpoint", "latest"]

    process = launch("train_unet.py", [*base, "--train_batch_size", "2"])
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "--train_batch_size=2 (the run was started with 4)" in output and "Traceback" not in output.split("\n")[-3]
    assert not (resumed / "checkpoint-8").exists()

    output = run("train_unet.py", [*base, "--learning_rate", "5e-4"])
    assert "with --learning_rate=0.0005 (it was 0.001)" in output
    rows = {row["step"]: row for row in map(json.loads, (resumed / checkpoints.TRAIN_LOG).read_text().splitlines())}
    reference = {
        row["step"]: row for row in map(json.loads, (unet_run / checkpoints.TRAIN_LOG).read_text().splitlines())
    }
    assert reference[7]["lr"] == pytest.approx(1e-3) and rows[7]["lr"] == pytest.approx(5e-4)
    assert rows[7]["loss"] == reference[7]["loss"]  # computed on the weights of step 6, before the new rate acts


@pytest.mark.slow
def test_latest_falls_back_past_a_checkpoint_with_a_flipped_bit(tmp_path, unet_run):
    root = tmp_path / "run"
    root.mkdir()
    for name in ("checkpoint-6", "checkpoint-8"):
        shutil.copytree(unet_run / name, root / name)
    weights = root / "checkpoint-8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a weight's bit, past the header: the file still parses
    weights.write_bytes(bytes(data))
    assert "does not hash to the SHA-256" in checkpoints.checkpoint_problem(root / "checkpoint-8")
    assert checkpoints.find_resume_checkpoint(root, "latest") == root / "checkpoint-6"


def test_divergence_advice_names_the_last_checkpoint_whose_loss_was_sane(tmp_path):
    """At a huge learning rate the newest checkpoint holds finite weights with an exploding loss: resuming from it
    diverges again, so the advice goes back to the one saved while the loss was still near its start."""
    from types import SimpleNamespace

    from hf_scratch.training.trainer import Trainer

    for step, loss in ((2, 0.9), (4, 0.4), (6, 3.0e4)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / checkpoints.CHECKPOINT_STATE).write_text(json.dumps({"global_step": step, "loss": loss}))
    run_state = SimpleNamespace(output_dir=tmp_path, global_step=6, _read_log=lambda: [{"step": 1, "loss": 1.0}])
    advice = Trainer.divergence_advice(run_state, checkpoints.TrainingDiverged("the loss is inf"))
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-4'}" in advice
    assert "training diverged at step 7: the loss is inf" in advice


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cross_attention_levels", "5"], r"--cross_attention_levels=\[5\] names levels \[5\]"),
        (["--snr_gamma", "-5"], r"--snr_gamma=-5.0 must be positive"),
        (["--noise_offset", "nan"], r"--noise_offset=nan must be a finite number"),
        (["--guidance_scale", "nan"], r"--guidance_scale=nan must be a finite number"),
        (["--snapshot_steps", "0", "-2", "99"], r"--snapshot_steps=\[0, -2, 99\]: \[0, -2, 99\] lie outside"),
        (["--validation_inference_steps", "0"], r"--validation_inference_steps=0 must be at least 1"),
        (["--num_validation_images", "0"], r"--num_validation_images=0 must be at least 1"),
        (["--block_out_channels", "16", "32"], r"--block_out_channels=\[16, 32\] must all be multiples of --norm_num"),
        (["--norm_num_groups", "8", "--attention_head_dim", "3"], r"multiples of --attention_head_dim=3"),
    ],
)
def test_unet_flags_are_checked_before_the_run_starts(flags, message, tmp_path):
    from hf_scratch.training import train_unet

    base = ["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "10",
            "--pretrained_model_name_or_path", str(tmp_path)]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train_unet.parse_args([*base, *flags])


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("train_vae", ["--kl_weight", "-1"], r"--kl_weight=-1.0 must be at least 0"),
        ("train_vae", ["--block_out_channels", "16", "32"], r"multiples of --norm_num_groups=32"),
        ("train_clip", ["--text_hidden_size", "30", "--text_heads", "4"], r"--text_hidden_size=\[30\] must all be"),
        ("train_clip", ["--learning_rate", "inf"], r"--learning_rate=inf must be a finite number"),
    ],
)
def test_vae_and_clip_flags_are_checked_before_the_run_starts(script, flags, message, tmp_path):
    import importlib

    module = importlib.import_module(f"hf_scratch.training.{script}")
    with pytest.raises(ValueError, match=message):
        module.parse_args(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *flags])


@pytest.mark.parametrize("script", ["train_unet", "train_vae", "train_clip"])
def test_every_training_option_has_help_with_its_default(script, tmp_path, monkeypatch):
    import argparse
    import importlib

    parsers = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: parsers.append(self) or exit())
    with pytest.raises(SystemExit):
        importlib.import_module(f"hf_scratch.training.{script}").parse_args([])
    options = [action for action in parsers[0]._actions if action.option_strings and action.dest != "help"]
    assert len(options) > 40
    assert [action.option_strings[0] for action in options if not action.help] == []
    help_text = parsers[0].format_help()
    assert "(default: 0.0001)" in help_text and "(default: constant)" in help_text  # the shared defaults show


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--push_to_hub"], r"--push_to_hub needs network access .*huggingface-cli upload"),
        (["--use_8bit_adam"], r"--use_8bit_adam needs bitsandbytes: pip install bitsandbytes"),
        (["--report_to", "wandb"], r"--report_to wandb needs wandb: pip install wandb \(or pass --report_to none\)"),
        (["--validation_epochs", "0"], r"--validation_epochs=0 must be at least 1"),
    ],
)
def test_diffusers_flags_are_taken_or_refused_in_one_line(flags, message, tmp_path):
    """diffusers' train_text_to_image.py flags: each is accepted, or refused naming what it needs (wandb and
    bitsandbytes are not installed here)."""
    from hf_scratch.training import train_vae

    with pytest.raises(ValueError, match=message):
        train_vae.parse_args(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"), *flags])


def test_allow_tf32_random_flip_and_validation_epochs_are_accepted(tmp_path):
    from hf_scratch.training import train_unet

    args = train_unet.parse_args(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                                  "--pretrained_model_name_or_path", str(tmp_path), "--allow_tf32", "--random_flip",
                                  "--validation_epochs", "2", "--center_crop"])  # fmt: skip
    assert args.allow_tf32 and args.random_flip and args.validation_epochs == 2 and args.center_crop


def test_input_perturbation_is_refused_for_edm_and_below_zero(tmp_path):
    from hf_scratch.training import train_unet

    base = ["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--pretrained_model_name_or_path", str(tmp_path)]  # fmt: skip
    assert train_unet.parse_args([*base, "--input_perturbation", "0.1"]).input_perturbation == 0.1
    with pytest.raises(ValueError, match="--input_perturbation perturbs the noise .* edm's target"):
        train_unet.parse_args([*base, "--objective", "edm", "--input_perturbation", "0.1"])
    with pytest.raises(ValueError, match="--input_perturbation=-0.1 must be"):
        train_unet.parse_args([*base, "--input_perturbation", "-0.1"])


def test_cached_text_embeddings_train_the_same_model_and_resume_bit_for_bit(tmp_path, data_dir, components, unet_run):
    """--cache_text_embeddings looks the captions' encodings up instead of running the frozen text encoder: the
    losses follow the default run's to float rounding (each caption encoded in another batch), and a run resumed
    from checkpoint-6 repeats the last two steps bit for bit (the cache never depends on the training order)."""
    output_dir = tmp_path / "cached"
    run("train_unet.py", [*unet_args(data_dir, components, output_dir), "--cache_text_embeddings"])
    default, cached = losses(unet_run), losses(output_dir)
    assert cached.keys() == default.keys()
    np.testing.assert_allclose(list(cached.values()), list(default.values()), rtol=1e-4)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output_dir / "checkpoint-6", resumed / "checkpoint-6")
    run("train_unet.py", [*unet_args(data_dir, components, resumed), "--cache_text_embeddings",
                          "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert losses(resumed) == {step: cached[step] for step in (7, 8)}
    name = "unet/diffusion_pytorch_model.safetensors"
    trained, final = load_file(output_dir / name), load_file(resumed / name)
    assert trained.keys() == final.keys() and all(torch.equal(final[key], trained[key]) for key in trained)


def test_the_text_embedding_cache_holds_each_captions_encoding_and_runs_the_encoder_only_to_fill(components):
    from transformers import CLIPTokenizer

    from hf_scratch.models.clip import ScratchCLIPTextModel
    from hf_scratch.training.train_unet import TextEmbeddingCache, encode_prompts

    tokenizer = CLIPTokenizer.from_pretrained(components / "tokenizer")
    encoder = ScratchCLIPTextModel.from_pretrained(components / "text_encoder").eval()
    captions = ["a red square", "a blue circle", "a red square", "green"]
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    cache = TextEmbeddingCache(tokenizer, encoder, captions, torch.device("cpu"), batch_size=2)
    assert len(calls) == 2 and sorted(cache.row) == ["", "a blue circle", "a red square", "green"]
    looked_up = cache(["green", "", "a red square"])
    assert len(calls) == 2
    with torch.no_grad():
        for row, caption in zip(looked_up, ["green", "", "a red square"]):
            torch.testing.assert_close(
                row, encode_prompts(tokenizer, encoder, [caption], "cpu")[0], rtol=1e-5, atol=1e-6
            )


def test_cached_text_embeddings_refuse_a_stream(tmp_path, data_dir, components):
    from hf_scratch.training import train_unet

    flags = [*unet_args(data_dir, components, tmp_path / "out"), "--cache_text_embeddings"]
    with pytest.raises(ValueError, match="--cache_text_embeddings cannot be combined with --streaming"):
        train_unet.parse_args([*flags, "--streaming"])
