"""`hf-scratch train` (hf_scratch/training/recipe.py): captioned images in, a loadable pipeline folder and a quality
figure out; a re-run resumes and changes nothing; the emoji32 recipe reaches each stage with the shipped settings."""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from hf_scratch.training import recipe, train_clip, train_unet, train_vae

REPO = Path(__file__).resolve().parents[1]
HF_SCRATCH = str(Path(sys.executable).parent / "hf-scratch")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 200, 20)}


def write_kohya_folder(root: Path, count: int = 24) -> Path:
    """`count` images of coloured shapes, each with its caption in a .txt file beside it, and no validation split."""
    root.mkdir(parents=True)
    for index in range(count):
        colour, shape = list(COLOURS)[index % 4], ("circle", "square")[(index // 4) % 2]
        image = Image.new("RGB", (40, 40), "white")
        box = (4 + index % 7, 4 + index % 5, 30 + index % 7, 30 + index % 5)
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, COLOURS[colour])
        image.save(root / f"{index:03d}.png")
        (root / f"{index:03d}.txt").write_text(f"a {colour} {shape}")
    return root


def train_command(data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [HF_SCRATCH, "train", "--data", str(data), "--output-dir", str(output_dir), "--threads", "1",
            "--eval-images", "16", *extra]  # fmt: skip


def run(command: list[str], **kwargs) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, **kwargs)
    assert result.returncode == 0, (
        f"{shlex.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n" + (result.stderr[-5000:])
    )
    return result.stdout + result.stderr


def digests(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_one_command_trains_a_loadable_model_judges_it_and_a_rerun_changes_nothing(tmp_path):
    data = write_kohya_folder(tmp_path / "mine")
    output_dir = tmp_path / "runs" / "mine"
    command = train_command(data, output_dir, "--steps", "vae=3", "decoder=2", "text=2", "unet=4")
    output = run(command)
    assert "held out of the training images" in output and "16 training images; validation: 8 images" in output
    for number, stage in enumerate(("vae", "decoder", "text", "unet", "eval"), start=1):
        assert f"[{number}/5] {stage}:" in output
    assert f"model: {output_dir / 'model'}" in output and "hf-scratch generate" in output

    report = json.loads((output_dir / "eval" / "report.json").read_text())
    assert report["images"] == 8
    for key in ("generated_vs_true", "generated_vs_true_at_floor_size", "floor_true_vs_true"):
        assert set(report[key]) >= {"frechet_distance", "kid", "kid_standard_error", "precision", "recall"}
    assert report["floor_true_vs_true"]["num_generated"] == report["generated_vs_true_at_floor_size"]["num_true"] == 4
    assert set(report["caption_agreement"]) == {"generated", "true", "chance"}
    assert all(0 <= value <= 1 for value in report["caption_agreement"].values())
    assert (output_dir / "eval" / "grid.png").is_file() and "floor" in (output_dir / "eval" / "report.md").read_text()

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(output_dir / "model"), trust_remote_code=True)
    assert type(pipe).__name__ == "ScratchStableDiffusionPipeline"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 192
    image_path = tmp_path / "red.png"
    run([HF_SCRATCH, "generate", "a red circle", "--model", str(output_dir / "model"), "--output", str(image_path),
         "--steps", "2"])  # fmt: skip
    assert Image.open(image_path).size == (32, 32)

    before = digests(output_dir / "model")
    output = run(command)
    for stage in ("vae", "decoder", "text", "unet"):
        assert f"{stage}: finished earlier" in output
    assert digests(output_dir / "model") == before


def test_budgets_and_steps_are_read_or_refused_by_name():
    assert recipe.parse_budget("90s") == 90 and recipe.parse_budget("30m") == 1800
    assert recipe.parse_budget("1h30m") == 5400 and recipe.parse_budget("2h") == 7200
    for wrong in ("", "30", "ten minutes", "5x"):
        with pytest.raises(ValueError, match="--budget=.* is not a wall time"):
            recipe.parse_budget(wrong)
    assert recipe.parse_steps(["unet=7200", "vae=5"]) == {"unet": 7200, "vae": 5}
    for wrong in ("unet", "eval=3", "unet=0", "unet=-4", "clip=3"):
        with pytest.raises(ValueError, match="--steps .* must read STAGE=N"):
            recipe.parse_steps([wrong])


def test_it_refuses_to_write_inside_the_installed_package_and_data_too_small_to_hold_out(tmp_path, capsys):
    import hf_scratch

    inside = Path(hf_scratch.__file__).parent / "pretrained" / "mine"
    assert recipe.main(["--data", str(tmp_path), "--output-dir", str(inside)]) == 2
    assert "lies inside the installed hf_scratch package" in capsys.readouterr().err
    assert not inside.exists()

    data = write_kohya_folder(tmp_path / "few", count=10)
    assert recipe.main(["--data", str(data), "--output-dir", str(tmp_path / "out"), "--steps", "unet=2"]) == 2
    assert "holds 10 training images and no 'validation' split" in capsys.readouterr().err


# The emoji32 recipe's flags as its shell script passed them to each trainer before `hf-scratch train` existed
# (git 9f80751, training/recipes/emoji32.sh), at its steps 2400 / 4000 / 300 / 7200.
SHIPPED_COMMON = (
    "--resolution 32 --report_to tensorboard --resume_from_checkpoint latest --checkpoints_total_limit 2 --seed 0"
)
SHIPPED_FLAGS = {
    "vae": "--block_out_channels 32 64 64 --layers_per_block 1 --latent_channels 8 --train_batch_size 32 "
    "--learning_rate 2e-3 --lr_scheduler cosine --lr_warmup_steps 100 --max_train_steps 2400 --kl_weight 1e-6",
    "decoder": "--pretrained_vae RUN/vae --train_decoder_only --reconstruction_loss l2 --train_batch_size 32 "
    "--learning_rate 5e-4 --lr_scheduler cosine --lr_warmup_steps 100 --max_train_steps 4000",
    "text": "--vocab_size 4096 --max_length 32 --text_hidden_size 192 --text_layers 4 --text_heads 4 "
    "--vision_hidden_size 192 --vision_layers 4 --vision_heads 4 --patch_size 4 --projection_dim 192 "
    "--train_batch_size 128 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 --max_train_steps 300",
    "unet": "--vae_path RUN/vae-decoder --text_encoder_path TEXT/text_encoder --tokenizer_path TEXT/tokenizer "
    "--cache_latents --block_out_channels 64 128 128 --layers_per_block 1 --cross_attention_levels 0 1 2 "
    "--objective flow_matching --weighting_scheme logit_normal --logit_mean 0 --logit_std 1 --immiscible_noise "
    "--train_batch_size 64 --learning_rate 5e-4 --lr_scheduler cosine --lr_warmup_steps 200 --max_train_steps 7200 "
    "--caption_dropout_prob 0.1 --use_ema --ema_decay 0.999 --snapshot_steps 2400 4800",
}
PARSERS = {"vae": train_vae.parse_args, "decoder": train_vae.parse_args, "text": train_clip.parse_args,
           "unet": train_unet.parse_args}  # fmt: skip
# What a resumed or repeated run may differ in without changing its result (trainer.RESUME_FREE_FLAGS's kind).
WHERE_AND_HOW_OFTEN = {"dataset_name", "train_data_dir", "output_dir", "report_to", "checkpointing_steps",
                       "latent_cache_dir", "validation_steps", "resume_from_checkpoint"}  # fmt: skip
# Added to the recipe after the shipped run: each changes the cost and the result only at float rounding
# (tests/test_training.py::test_cached_text_embeddings_train_the_same_model_and_resume_bit_for_bit).
COST_ONLY = {"cache_text_embeddings"}


def test_emoji32_reaches_each_stage_with_the_shipped_settings(tmp_path):
    """The recipe hands `hf-scratch train` the shipped steps and text encoder, and `hf-scratch train` turns them into
    the flags the shipped model was trained with (parsed by each trainer, so defaults and spellings compare)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    calls = tmp_path / "calls.txt"
    (shim / "hf-scratch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\n')
    (shim / "hf-scratch").chmod(0o755)
    run_dir = tmp_path / "run"
    env = {"PATH": f"{shim}:{os.environ['PATH']}", "RUN": str(run_dir), "STAGES": "vae decoder clip unet"}
    run(["bash", str(REPO / "training" / "recipes" / "emoji32.sh")], env=env, cwd=REPO)
    argv = calls.read_text().splitlines()
    parsed = recipe.build_parser().parse_args(argv[1:])
    assert argv[0] == "train" and parsed.resolution == 32 and parsed.seed == 0 and parsed.threads == 2
    assert recipe.parse_steps(parsed.steps) == {"vae": 2400, "decoder": 4000, "text": 300, "unet": 7200}
    assert parsed.text_encoder == "hf_scratch/pretrained/emoji32" and parsed.stages == ["vae", "decoder", "unet"]

    text = "hf_scratch/pretrained/emoji32"
    plan = recipe.Plan(resolution=32, num_train=10_000, num_validation=400, stages=["vae", "decoder", "unet", "eval"],
                       steps={"vae": 2400, "decoder": 4000, "unet": 7200}, batch={"vae": 32, "decoder": 32,
                       "text": 128, "unet": 64}, seed=0, text_encoder=text)  # fmt: skip
    flags = recipe.stage_flags(plan, run_dir, tmp_path / "data")
    plan_with_text = recipe.Plan(**{**plan.__dict__, "stages": ["text"], "steps": {"text": 300}, "text_encoder": None})
    flags["text"] = recipe.stage_flags(plan_with_text, run_dir, tmp_path / "data")["text"]
    (run_dir / "vae").mkdir(parents=True)
    (run_dir / "vae" / "config.json").write_text("{}")  # what the decoder stage's --pretrained_vae must hold
    output = ["--output_dir", str(tmp_path / "o")]
    for stage, shipped in SHIPPED_FLAGS.items():
        shipped = f"{SHIPPED_COMMON} {shipped}".replace("RUN", str(run_dir)).replace("TEXT", text).split()
        expected = vars(PARSERS[stage]([*output, "--train_data_dir", str(tmp_path / "data"), *shipped]))
        ours = vars(PARSERS[stage]([*flags[stage], *output]))
        differing = {key for key in expected if expected[key] != ours[key]} - WHERE_AND_HOW_OFTEN - COST_ONLY
        assert not differing, {key: (expected[key], ours[key]) for key in differing}


def test_the_planned_batch_fits_the_data_and_warmups_scale_with_the_steps(tmp_path):
    args = argparse.Namespace(text_encoder=None, steps=["vae=48", "decoder=40", "text=12", "unet=72"], resolution=64,
                              seed=3, budget="30m", threads=1)  # fmt: skip
    plan = recipe.make_plan(args, tmp_path, tmp_path / "data", num_train=20, num_validation=8)
    assert plan.batch == {"vae": 20, "decoder": 20, "text": 20, "unet": 20}
    unet = train_unet.parse_args([*plan.flags["unet"], "--pretrained_model_name_or_path", str(tmp_path)])
    assert unet.lr_warmup_steps == 2 and unet.snapshot_steps == [24, 48] and unet.resolution == 64
    vae = train_vae.parse_args(plan.flags["vae"])
    assert vae.lr_warmup_steps == 2 and vae.block_out_channels == [32, 64, 64] and vae.seed == 3


@pytest.mark.slow
def test_the_built_wheel_alone_trains_at_a_tiny_budget_and_its_model_loads(tmp_path):
    """As a new user would: the built wheel (training included) in a fresh venv, torch pinned first, then
    `hf-scratch train --budget` on a folder of captioned images, from outside the repository; the pipeline folder then
    loads in DiffusionPipeline and draws through `hf-scratch generate`."""
    dist, venv, source = tmp_path / "dist", tmp_path / "venv", tmp_path / "source"
    # A copy, so the build leaves no build/ folder in the repository (a stale one would leak into later wheels).
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                "outputs", "__pycache__", ".pytest_cache"))  # fmt: skip
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("hf_scratch-*.whl")
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, "torch==2.13.0"])
    run([*pip, "-c", str(REPO / "constraints.txt"), f"{wheel}[train]"])
    home = tmp_path / "home"
    home.mkdir()
    data = write_kohya_folder(home / "my_images")
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": ""}
    output = run(["hf-scratch", "train", "--data", "my_images", "--output-dir", "runs/mine", "--budget", "2m",
                  "--threads", "1", "--eval-images", "16"], cwd=home, env=env)  # fmt: skip
    assert "s per step of" in output and "steps fit its" in output  # the budget was planned from measured rates
    plan = json.loads((home / "runs" / "mine" / "plan.json").read_text())
    assert set(plan["seconds_per_step"]) == {"vae", "decoder", "text", "unet"}
    assert (home / "runs" / "mine" / "eval" / "report.json").is_file() and data.is_dir()
    load = (
        "import hf_scratch, diffusers; assert hf_scratch.__file__.startswith(%r), hf_scratch.__file__; "
        "pipe = diffusers.DiffusionPipeline.from_pretrained('runs/mine/model', trust_remote_code=True); "
        "print(type(pipe).__name__)" % str(venv)
    )
    assert "ScratchStableDiffusionPipeline" in run([str(venv / "bin" / "python"), "-c", load], cwd=home, env=env)
    run(["hf-scratch", "generate", "a red circle", "--model", "runs/mine/model", "--output", "red.png", "--steps", "2"],
        cwd=home, env=env)  # fmt: skip
    assert Image.open(home / "red.png").size == (32, 32)


@pytest.mark.slow
def test_two_processes_train_every_stage_with_the_recipe_batches_shared(tmp_path):
    """--num-processes 2 launches each stage under accelerate (gloo on CPU): every stage runs on two ranks whose
    weights end equal, and each rank takes half of the recipe's global batch."""
    data = write_kohya_folder(tmp_path / "mine")
    output_dir = tmp_path / "two"
    output = run(train_command(data, output_dir, "--steps", "vae=2", "decoder=2", "text=2", "unet=2",
                               "--num-processes", "2"))  # fmt: skip
    assert "[1/5] vae: 2 steps of 8 images" in output  # 16 training images: a global batch of 16, 8 per rank
    for folder in ("vae", "vae-decoder", "text", "model"):
        reports = [json.loads(path.read_text()) for path in sorted((output_dir / folder / "ranks").glob("rank-*.json"))]
        assert [report["world_size"] for report in reports] == [2, 2], folder
        assert [report["distributed_type"] for report in reports] == ["MULTI_CPU"] * 2, folder
        assert reports[0]["final_checksum"] == reports[1]["final_checksum"] != reports[0]["initial_checksum"], folder


@pytest.mark.slow
def test_a_stopped_run_stops_its_stage_and_resumes(tmp_path):
    """SIGTERM to `hf-scratch train` alone (a scheduler's kill, not the terminal's Ctrl-C, which reaches the whole
    process group) stops the running stage too, with one line; the same command then resumes and finishes."""
    import signal
    import time

    data = write_kohya_folder(tmp_path / "mine")
    output_dir = tmp_path / "stopped"
    command = train_command(data, output_dir, "--steps", "vae=80", "decoder=2", "text=2", "unet=2")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((output_dir / "vae").glob("checkpoint-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped; re-run the same command to resume" in output
    assert "Traceback" not in output.split("hf-scratch train: stopped")[-1]
    time.sleep(2)
    survivors = subprocess.run(["pgrep", "-f", str(output_dir)], capture_output=True, text=True).stdout.split()
    assert survivors == [], "the stage outlived hf-scratch train"
    assert not (output_dir / "vae" / "run_finished.json").exists()

    resumed = run(train_command(data, output_dir, "--steps", "vae=80", "decoder=2", "text=2", "unet=2"))
    assert "keeping the plan of the first run" in resumed and "resuming from" in resumed
    assert (output_dir / "model" / "model_index.json").is_file()


def test_the_prepared_data_is_kept_for_a_rerun_and_other_data_is_refused(tmp_path):
    """`prepared-data/` holds the train and held-out validation split once; a re-run reads it back (the same held-out
    captions), and a re-run naming other data is refused rather than mixing two datasets in one run."""
    import datasets

    data = write_kohya_folder(tmp_path / "mine", count=20)
    args = recipe.build_parser().parse_args(["--data", str(data), "--output-dir", str(tmp_path / "out")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".prepared-data.partial").mkdir()  # what an interrupted first run left
    folder, num_train, num_validation, where = recipe.prepare_data(args, tmp_path / "out")
    assert (num_train, num_validation) == (12, 8) and "held out" in where
    held_out = datasets.load_from_disk(str(folder))["validation"]["text"]
    assert recipe.prepare_data(args, tmp_path / "out")[1:] == (12, 8, where)
    assert datasets.load_from_disk(str(folder))["validation"]["text"] == held_out
    other = write_kohya_folder(tmp_path / "other", count=20)
    args.data = str(other)
    with pytest.raises(ValueError, match="holds a run on --data=.*mine.*, not .*other"):
        recipe.prepare_data(args, tmp_path / "out")
