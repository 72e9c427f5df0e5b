"""The `hf-scratch` command: generate (also split across two processes), convert, info, and its error messages."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from hf_scratch.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from _tiny import tiny_components

    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
    from hf_scratch.schedulers.ddim import ScratchDDIMScheduler

    folder = tmp_path_factory.mktemp("cli") / "tiny"
    scheduler = ScratchDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=scheduler).save_pretrained(str(folder))
    return folder


def test_generate_writes_a_png_of_the_requested_size(model_dir, tmp_path):
    out = tmp_path / "img.png"
    code = main(
        [
            "generate",
            "red heart",
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--height",
            "40",
            "--width",
            "48",
            "--scheduler",
            "dpm++",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert Image.open(out).size == (48, 40)


def test_generate_is_reproducible_by_seed(model_dir, tmp_path):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("3", "3", "4")):
        assert (
            main(["generate", "x", "--model", str(model_dir), "--steps", "2", "--seed", seed, "--output", str(path)])
            == 0
        )
    a, b, c = (Image.open(path).tobytes() for path in paths)
    assert a == b and a != c


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "x", "--scheduler", "nope"], "Unknown scheduler 'nope'"),
        (["generate", "x", "--steps", "0"], "num_inference_steps"),
        (["generate", "x", "--height", "33"], "multiple of 8"),
        (["generate"], "Give a prompt"),
        (["info", "/nonexistent/folder"], "is not a folder"),
    ],
)
def test_errors_are_one_clear_line(model_dir, argv, message, capsys):
    if argv[0] == "generate":
        argv = argv + ["--model", str(model_dir)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_info_lists_components_and_parameters(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "ScratchUNet2DConditionModel" in out and "ScratchAutoencoderKL" in out and "M parameters" in out


def test_convert_folder_to_single_file_and_back(model_dir, tmp_path):
    from safetensors.torch import load_file

    from hf_scratch.models.unet import ScratchUNet2DConditionModel

    single = tmp_path / "model.safetensors"
    assert main(["convert", str(model_dir), str(single)]) == 0
    assert any(key.startswith("model.diffusion_model.") for key in load_file(str(single)))
    back = tmp_path / "back"
    assert main(["convert", str(single), str(back), "--config", str(model_dir)]) == 0
    original = ScratchUNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet").state_dict()
    restored = ScratchUNet2DConditionModel.from_pretrained(str(back / "unet")).state_dict()
    assert original.keys() == restored.keys()
    assert all((original[key] == restored[key]).all() for key in original)


@pytest.mark.slow
def test_prompts_file_is_split_across_two_processes(model_dir, tmp_path):
    """`accelerate launch` with two real CPU processes: each prompt is drawn once, by one of the two ranks."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red heart\ngrinning face\ndog face\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "hf_scratch.cli",
        "generate",
        "--prompts-file",
        str(prompts),
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--output",
        str(tmp_path / "out.png"),
    ]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    images = sorted(path.name for path in tmp_path.glob("out-*.png"))
    assert images == ["out-0000-0.png", "out-0001-0.png", "out-0002-0.png"], result.stderr[-3000:]
    # Each written image's line names the rank that drew it; both ranks drew.
    ranks = re.findall(r"\[rank (\d)\] '[^']*' -> \S+out-\d{4}-0\.png", result.stdout)
    assert sorted(ranks) in (["0", "0", "1"], ["0", "1", "1"]), result.stdout


def assert_same_image(written: Image.Image, expected: Image.Image, label: str = "", levels: int = 1) -> None:
    """Equal to float32 rounding, which can move a pixel across a uint8 rounding boundary: at most `levels` apart.
    One level for the CLI's frozen U-Net (its CPU default) against the eager pipeline."""
    ours = np.asarray(written.convert("RGB"), dtype=np.int16)
    theirs = np.asarray(expected.convert("RGB"), dtype=np.int16)
    assert ours.shape == theirs.shape, label
    assert np.abs(ours - theirs).max() <= levels, label


def test_generate_with_winograd_matches_the_default(tmp_path):
    """The flag runs end to end and keeps the image to 8-bit rounding. The shipped model's layers have under 256
    channels, so here it switches the layout to channels-last; the Winograd kernels are checked in test_winograd.py."""
    paths = [tmp_path / "direct.png", tmp_path / "winograd.png"]
    for path, extra in zip(paths, ([], ["--winograd"])):
        assert main(["generate", "red heart, twemoji style", "--steps", "4", "--output", str(path), *extra]) == 0
    assert_same_image(Image.open(paths[1]), Image.open(paths[0]), levels=2)  # within rounding to 8 bits


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_computes_the_unet_in_bf16_only_where_the_cpu_does(monkeypatch, tmp_path, native):
    """--dtype auto against --dtype float32: the same image where bfloat16 is not native; where it is, the U-Net
    (forced past the size threshold) runs in bfloat16 and the image stays within bfloat16's accuracy
    (tests/test_precision.py states the bound)."""
    from hf_scratch.fast import precision

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx512_bf16": native})
    monkeypatch.setattr(precision, "BF16_MIN_PARAMETERS", 0)
    wrapped = []
    compute_in = precision.compute_in
    monkeypatch.setattr(
        precision, "compute_in", lambda module, dtype: wrapped.append(dtype) or compute_in(module, dtype)
    )
    paths = [tmp_path / "float32.png", tmp_path / "auto.png"]
    for path, dtype in zip(paths, ("float32", "auto")):
        argv = ["generate", "red heart, twemoji style", "--steps", "4", "--output", str(path), "--dtype", dtype]
        assert main(argv) == 0
    assert wrapped == ([torch.bfloat16] if native else [])
    difference = np.abs(np.asarray(Image.open(paths[1]), float) - np.asarray(Image.open(paths[0]), float))
    assert difference.mean() <= (1.5 if native else 0)


def _copy_model(model_dir: Path, destination: Path) -> Path:
    import shutil

    shutil.copytree(model_dir, destination)
    return destination


def test_user_errors_are_one_line_with_exit_status_2_before_generating(model_dir, tmp_path, capsys):
    truncated = _copy_model(model_dir, tmp_path / "truncated")
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    no_index = _copy_model(model_dir, tmp_path / "no_index")
    (no_index / "model_index.json").unlink()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    cases = [
        (["--model", str(truncated)], f"{str(weights)!r} is not a complete safetensors file"),
        (["--model", str(no_index)], "holds no model_index.json"),
        (["--model", str(model_dir), "--output", str(a_file / "x.png")], "which is a file, not a folder"),
        (["--model", str(model_dir), "--output", str(tmp_path / "image")], "has no image extension"),
        (["--model", str(model_dir), "--seed", "-1"], "--seed -1 is out of range"),
        (["--model", str(model_dir), "--seed", str(2**64)], "is out of range"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--model", str(model_dir), "--output", str(read_only / "x.png")], "is not writable"))
    for extra, message in cases:
        argv = ["generate", "x", "--steps", "1", "--output", str(tmp_path / "out.png"), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out.png").exists()  # nothing was generated


def test_eval_on_an_empty_data_folder_is_one_line(model_dir, tmp_path, capsys):
    from hf_scratch.pretrained import default_model_path

    judge = Path(default_model_path()).parent / "emoji32-judge"
    (tmp_path / "empty").mkdir()
    argv = ["eval", "--model", str(model_dir), "--clip", str(judge), "--data", str(tmp_path / "empty"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("emoji-bench: error:") and "doesn't contain any data files" in err[-1]


def test_upscale_writes_a_nearest_neighbour_copy_beside_the_native_image(model_dir, tmp_path):
    out = tmp_path / "img.png"
    argv = ["generate", "x", "--model", str(model_dir), "--steps", "1", "--output", str(out), "--upscale", "4"]
    assert main(argv) == 0
    native, large = Image.open(out), Image.open(tmp_path / "img-x4.png")
    assert large.size == (native.width * 4, native.height * 4)
    assert np.array_equal(np.asarray(large)[::4, ::4], np.asarray(native))  # every 4x4 block is one native pixel


# --------------------------------------------------------------------------- img2img, inpaint, metadata, devices


def _picture(path: Path, mode: str = "RGB", box: tuple | None = None) -> Path:
    rng = np.random.default_rng(0)
    if mode == "L":
        pixels = np.zeros((32, 32), np.uint8)
        pixels[box[1] : box[3], box[0] : box[2]] = 255
    else:
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


def test_img2img_and_inpaint_subcommands_match_their_pipelines(model_dir, tmp_path):
    import torch

    from hf_scratch import ScratchStableDiffusionImg2ImgPipeline, ScratchStableDiffusionInpaintPipeline

    image = _picture(tmp_path / "in.png")
    mask = _picture(tmp_path / "mask.png", "L", box=(8, 8, 24, 20))
    runs = {
        "img2img": (["--strength", "0.5"], ScratchStableDiffusionImg2ImgPipeline, {"strength": 0.5}),
        "inpaint": (["--mask", str(mask)], ScratchStableDiffusionInpaintPipeline,
                    {"mask_image": Image.open(mask).convert("L")}),
    }  # fmt: skip
    for command, (flags, pipeline_class, inputs) in runs.items():
        out = tmp_path / f"{command}.png"
        argv = [command, "a cat", "--model", str(model_dir), "--image", str(image), "--steps", "4", "--seed", "7",
                "--output", str(out), *flags]  # fmt: skip
        assert main(argv) == 0
        pipe = pipeline_class.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe("a cat", image=Image.open(image), num_inference_steps=4, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(7), **inputs).images[0]  # fmt: skip
        assert_same_image(Image.open(out), expected, command)
    # inpainting keeps the unmasked pixels close to the input (up to the VAE), img2img at 0.5 changes them more
    source = np.asarray(Image.open(image), dtype=np.float32)
    inpainted = np.asarray(Image.open(tmp_path / "inpaint.png").convert("RGB"), dtype=np.float32)
    assert np.abs(inpainted - source)[:, :8].mean() < np.abs(inpainted - source)[8:20, 8:24].mean()


def test_png_parameters_reproduce_the_image(model_dir, tmp_path):
    from hf_scratch.cli import parse_parameters

    first = tmp_path / "first.png"
    argv = ["generate", "red heart", "--model", str(model_dir), "--steps", "3", "--seed", "11", "--guidance", "3.5",
            "--negative-prompt", "blurry", "--scheduler", "ddim", "--height", "40", "--width", "32",
            "--output", str(first)]  # fmt: skip
    assert main(argv) == 0
    text = Image.open(first).info["parameters"]
    assert text.splitlines()[:2] == ["red heart", "Negative prompt: blurry"]
    assert parse_parameters(text) == {
        "prompt": "red heart", "negative_prompt": "blurry", "steps": 3, "sampler": "ddim", "guidance": 3.5,
        "seed": 11, "width": 32, "height": 40, "model": str(model_dir), "batch_size": 1, "batch_pos": 0,
        "guidance_kind": "cfg",
    }  # fmt: skip
    again = tmp_path / "again.png"
    assert main(["generate", "--parameters-from", str(first), "--output", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(first).tobytes()
    assert Image.open(again).info["parameters"] == text


def test_device_dtype_and_flag_errors_are_one_line(model_dir, tmp_path, capsys):
    import torch

    cases = [
        (["--device", "nonsense"], "--device 'nonsense' is not a device"),
        (["--lora", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["--embedding", str(tmp_path / "missing.bin")], "does not exist"),
        (["--parameters-from", str(tmp_path / "missing.png")], "cannot be read"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "has no CUDA device; use --device cpu"))
    for extra, message in cases:
        argv = ["generate", "x", "--model", str(model_dir), "--steps", "1", "--output", str(tmp_path / "o.png"), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    for command, extra, message in [("img2img", ["--image", str(tmp_path / "nope.png")], "--image"),
                                    ("inpaint", ["--image", str(_picture(tmp_path / "i.png")), "--mask",
                                                 str(tmp_path / "nope.png")], "--mask")]:  # fmt: skip
        assert main([command, "x", "--model", str(model_dir), *extra]) == 2
        assert message in capsys.readouterr().err
    out = tmp_path / "bf16.png"
    argv = ["generate", "x", "--model", str(model_dir), "--steps", "1", "--dtype", "bfloat16", "--output", str(out)]
    assert main(argv) == 0 and Image.open(out).size == (32, 32)


def test_help_shows_defaults_and_old_spellings_still_work(model_dir, tmp_path, capsys):
    for command in ("generate", "img2img", "inpaint"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "sampling.json, else 20)" in text and "--device" in text and "--lora PATH[:SCALE]" in text, command
        assert "(default: None)" not in text, command
    out = tmp_path / "old.png"
    assert main(["generate", "x", "--model", str(model_dir), "--steps", "1", "--num_images", "1",
                 "--negative_prompt", "dark", "--output", str(out)]) == 0  # fmt: skip
    assert "Negative prompt: dark" in Image.open(out).info["parameters"]


def test_lora_and_embedding_flags_give_the_pipelines_images(model_dir, tmp_path):
    import torch
    from safetensors.torch import save_file
    from test_lora import make_lora

    from hf_scratch import ScratchStableDiffusionPipeline

    lora = make_lora(tmp_path / "lora", seed=3) / "pytorch_lora_weights.safetensors"
    embedding = tmp_path / "two-vectors.safetensors"
    save_file({"<new>": torch.randn(2, 32, generator=torch.Generator().manual_seed(4))}, embedding)
    out, plain = tmp_path / "adapted.png", tmp_path / "plain.png"
    common = ["a <new> cat", "--model", str(model_dir), "--steps", "3", "--seed", "2"]
    adapters = ["--lora", f"{lora}:0.5", "--embedding", str(embedding)]
    assert main(["generate", *common, *adapters, "--output", str(out)]) == 0
    pipe = ScratchStableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="lora0")
    pipe.set_adapters(["lora0"], [0.5])
    pipe.load_textual_inversion(str(embedding))
    expected = pipe("a <new> cat", num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(2)).images[0]  # fmt: skip
    assert_same_image(Image.open(out), expected)
    pipe.unload_lora_weights()
    assert main(["generate", "a cat", *common[1:], "--output", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))


# ------------------------------------------------------------------------------------- no command destroys its inputs
def test_convert_refuses_a_target_inside_or_equal_to_its_source(model_dir, tmp_path, capsys):
    """`convert victim victim/unet/diffusion_pytorch_model.safetensors` replaced its own source and exited 0."""
    victim = _copy_model(model_dir, tmp_path / "victim")
    weights = victim / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    single = tmp_path / "single.safetensors"
    assert main(["convert", str(victim), str(single)]) == 0
    capsys.readouterr()
    for argv, message in [
        (["convert", str(victim), str(weights)], "lies inside source"),
        (["convert", str(victim), str(victim)], "is source"),
        (["convert", str(single), str(single)], "is source"),
        (["convert", str(single), str(victim), "--config", str(victim)], "is --config"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert weights.read_bytes() == before and single.stat().st_size > 0
    # a target folder that merely holds the source file is fine: no folder written holds it
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "model.safetensors").write_bytes(single.read_bytes())
    assert main(["convert", str(beside / "model.safetensors"), str(beside), "--config", str(model_dir)]) == 0
    assert (beside / "unet" / "config.json").is_file() and (beside / "model.safetensors").is_file()


def test_a_failed_convert_leaves_the_previous_target_and_no_partial_file(model_dir, tmp_path, monkeypatch, capsys):
    import hf_scratch.formats.single_file as single_file

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the previous conversion")

    def half_written(path, **components):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(single_file, "save_single_file", half_written)
    assert main(["convert", str(model_dir), str(target)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert target.read_bytes() == b"the previous conversion"
    assert [path.name for path in tmp_path.iterdir()] == ["model.safetensors"]


def test_an_output_that_is_an_input_is_refused_before_generating(model_dir, tmp_path, capsys):
    picture = _picture(tmp_path / "in.png")
    before = picture.read_bytes()
    assert main(["img2img", "x", "--model", str(model_dir), "--image", str(picture), "--output", str(picture)]) == 2
    assert "--output" in capsys.readouterr().err and picture.read_bytes() == before


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_batch_leaves_only_complete_images_and_one_line(model_dir, tmp_path, signal_name):
    import signal
    import time

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(400)))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "hf_scratch.cli", "generate", "--prompts-file", str(prompts), "--model",
            str(model_dir), "--steps", "2", "--device", "cpu", "--output", str(out / "image.png")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(out.glob("image-*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the batch
    process.send_signal(getattr(signal, signal_name))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, signal_name), err
    lines = [line for line in err.strip().splitlines() if "interrupted" in line or "Traceback" in line]
    assert lines == [f"hf-scratch generate: interrupted by {signal_name}; every file written is complete."], err
    written = sorted(out.iterdir())
    assert written and all(path.name.startswith("image-") for path in written), written  # no partial files
    for path in written:
        with Image.open(path) as image:
            image.load()  # a truncated PNG raises here


# ---------------------------------------------------------------------------------- what the probe found, one line each
def test_probe_cases_are_one_line_with_exit_status_2(model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    bad_json = _copy_model(model_dir, tmp_path / "bad_json")
    (bad_json / "model_index.json").write_text("{not json")
    bad_entry = _copy_model(model_dir, tmp_path / "bad_entry")
    index = json.loads((bad_entry / "model_index.json").read_text())
    (bad_entry / "model_index.json").write_text(json.dumps({**index, "unet": ["hf_scratch.models.unet"]}))
    bad_library = _copy_model(model_dir, tmp_path / "bad_library")
    (bad_library / "model_index.json").write_text(json.dumps({**index, "unet": ["no_such_library", "Model"]}))
    no_field = tmp_path / "no_field.png"
    metadata = PngImagePlugin.PngInfo()
    metadata.add_text("parameters", "red heart\nSteps: 3, Sampler: ddim, Seed: 1")
    Image.new("RGB", (32, 32)).save(no_field, pnginfo=metadata)
    picture = _picture(tmp_path / "in.png")
    cases = [
        (["generate", "a", "--prompts-file", str(prompts)], "Give either a prompt ('a') or --prompts-file"),
        (["generate", "x", "--device", "mps"], "--device 'mps' is not supported"),
        (["generate", "x", "--device", "meta"], "--device 'meta' is not supported"),
        (["generate", "x", "--device", "xla"], "--device 'xla'"),
        (["generate", "x", "--output", str(tmp_path / "x.psd")], "Pillow cannot write RGB images as PSD"),
        (["generate", "x", "--output", str(tmp_path / "x.xbm")], "Pillow cannot write RGB images as XBM"),
        (["generate", "--parameters-from", str(no_field)], "has no 'Size' field"),
        (["generate", "x", "--model", str(bad_json)], f"{str(bad_json / 'model_index.json')!r} is not valid JSON"),
        (["generate", "x", "--model", str(bad_entry)], "the entry 'unet' must be [library, class name]"),
        (["generate", "x", "--model", str(bad_library)], "import no_such_library before calling"),
        (["info", str(bad_json)], "model_index.json' is not valid JSON"),
        (["img2img", "x", "--image", str(tmp_path / "x.psd")], "--image"),
    ]
    for argv, message in cases:
        if argv[0] != "info" and "--model" not in argv:
            argv = [*argv, "--model", str(model_dir)]
        assert main([*argv, "--output", str(tmp_path / "o.png")] if argv[0] != "info" and "--output" not in argv
                    else argv) == 2, argv  # fmt: skip
        err = capsys.readouterr().err  # (loading bars above the error where the folder got that far)
        errors = [line for line in err.splitlines() if line.startswith("hf-scratch")]
        assert message in err and len(errors) == 1 and "Traceback" not in err, (argv, err)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32x32 picture is now a decompression bomb
    assert main(["img2img", "x", "--model", str(model_dir), "--image", str(picture)]) == 2
    assert "--image" in (err := capsys.readouterr().err) and "too large to decode safely" in err
    assert not (tmp_path / "o.png").exists()


def test_parameters_round_trip_prompts_with_newlines_and_negative_prompt_lines(model_dir, tmp_path):
    from hf_scratch.cli import parse_parameters

    first = tmp_path / "first.png"
    prompt, negative = "red heart\nNegative prompt: this is the prompt", "blurry\nfoggy"
    argv = ["generate", prompt, "--negative-prompt", negative, "--model", str(model_dir), "--steps", "2",
            "--output", str(first)]  # fmt: skip
    assert main(argv) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--parameters-from", str(first), "--output", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(first).tobytes()
    assert json.loads(Image.open(again).info["hf-scratch"])["prompt"] == prompt
    # AUTOMATIC1111's text alone: the lines after "Negative prompt:" are the negative prompt's
    settings = parse_parameters("a cat\nNegative prompt: blurry\nfoggy\nSteps: 3, Sampler: ddim, CFG scale: 5, "
                                "Seed: 1, Size: 32x32, Model: m")  # fmt: skip
    assert (settings["prompt"], settings["negative_prompt"]) == ("a cat", "blurry\nfoggy")


# ----------------------------------------------------------------------------------- guidance kinds and sampling.json
@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory) -> Path:
    """The shipped 32-px model copied (to add a sampling.json to), with a guide U-Net in guide/: its own U-Net with
    the output convolution halved, a weaker stand-in for a trained guide."""
    import shutil

    import torch

    from hf_scratch.models.unet import ScratchUNet2DConditionModel
    from hf_scratch.pretrained import default_model_path

    folder = tmp_path_factory.mktemp("sampling") / "emoji32"
    shutil.copytree(default_model_path(), folder)
    guide = ScratchUNet2DConditionModel.from_pretrained(str(folder / "unet"))
    with torch.no_grad():
        guide.conv_out.weight.mul_(0.5)
    guide.save_pretrained(str(folder / "guide"))
    return folder


def _settings(path: Path) -> dict:
    return json.loads(Image.open(path).info["hf-scratch"])


def _expected_guidance(kind: str, folder: Path) -> dict:
    import math

    from hf_scratch.models.unet import ScratchUNet2DConditionModel
    from hf_scratch.pipelines.guidance import AdaptiveProjectedGuidance, IntervalGuidance, ModelAutoGuidance

    if kind == "cfg":
        return {"guidance_scale": 3.0, "guidance_rescale": 0.7}
    if kind == "interval":  # with 4 flow steps σ = ∞, 3, 1, 1/3: guided twice (batch 2), unguided twice (batch 1)
        return {"guider": IntervalGuidance(3.0, 0.5, math.inf, guidance_rescale=0.7)}
    if kind == "apg":
        return {"guider": AdaptiveProjectedGuidance(3.0, adaptive_projected_guidance_momentum=-0.5,
                                                    adaptive_projected_guidance_rescale=0.0, eta=0.5)}  # fmt: skip
    return {"guider": ModelAutoGuidance(ScratchUNet2DConditionModel.from_pretrained(str(folder / "guide")), 3.0)}


GUIDANCE_FLAGS = {
    "cfg": ["--guidance-kind", "cfg", "--guidance-rescale", "0.7"],  # the shipped sampling.json says interval
    "interval": ["--guidance-kind", "interval", "--guidance-interval", "0.5", "inf", "--guidance-rescale", "0.7"],
    "apg": ["--guidance-kind", "apg", "--apg-eta", "0.5", "--apg-momentum", "-0.5"],
    "auto": ["--guidance-kind", "auto", "--guide", "GUIDE"],
}
GUIDANCE_TEXT = {"cfg": "Guidance rescale: 0.7", "interval": 'Guidance: "interval (0.5, inf]", Guidance rescale: 0.7',
                 "apg": "Guidance: apg eta 0.5 momentum -0.5", "auto": "Guidance: auto, Guide: "}  # fmt: skip


@pytest.mark.parametrize("kind", list(GUIDANCE_FLAGS))
def test_guidance_flags_give_the_pipelines_guider_and_round_trip_through_the_png(shipped_copy, kind, tmp_path):
    """Each kind's flags equal the pipeline called with that guider (the CLI's frozen U-Net beside eager: one level),
    the PNG records it in both chunks, and --parameters-from draws the same image again."""
    import torch

    from hf_scratch.cli import parse_parameters
    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    flags = [str(shipped_copy / "guide") if flag == "GUIDE" else flag for flag in GUIDANCE_FLAGS[kind]]
    argv = ["generate", "red heart, twemoji style", "--model", str(shipped_copy), "--steps", "4", "--guidance", "3",
            "--seed", "5", "--device", "cpu", "--output", str(first), *flags]  # fmt: skip
    assert main(argv) == 0
    pipe = ScratchStableDiffusionPipeline.from_pretrained(str(shipped_copy))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("red heart, twemoji style", num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                    **_expected_guidance(kind, shipped_copy)).images[0]  # fmt: skip
    assert_same_image(Image.open(first), expected, kind)
    text = Image.open(first).info["parameters"]
    assert GUIDANCE_TEXT[kind] in text, text
    parsed, recorded = parse_parameters(text), _settings(first)
    assert recorded["guidance_kind"] == parsed["guidance_kind"] == kind
    assert {key: parsed[key] for key in recorded if key in parsed} == {key: recorded[key] for key in parsed
                                                                         if key in recorded}  # fmt: skip
    assert main(["generate", "--parameters-from", str(first), "--output", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(first).tobytes()
    assert Image.open(again).info["parameters"] == text


def test_interval_guidance_runs_one_batch_on_unguided_steps_with_the_frozen_unet(shipped_copy, tmp_path):
    """The frozen U-Net keeps a graph per input shape, so interval guidance's batches of 1 and 2 both run frozen."""
    from hf_scratch import cli
    from hf_scratch.fast import frozen

    batches = []
    graph = frozen.FrozenForward.graph

    def recording(self, sample, timestep, encoder_hidden_states):
        batches.append(sample.shape[0])
        return graph(self, sample, timestep, encoder_hidden_states)

    frozen.FrozenForward.graph = recording
    try:
        argv = ["generate", "x", "--model", str(shipped_copy), "--steps", "4", "--device", "cpu", "--guidance-kind",
                "interval", "--guidance-interval", "0.5", "5.42", "--output", str(tmp_path / "o.png")]  # fmt: skip
        assert cli.main(argv) == 0
    finally:
        frozen.FrozenForward.graph = graph
    assert batches == [1, 2, 2, 1]


def test_png_settings_without_guidance_load_as_cfg(shipped_copy, tmp_path):
    """An image written before guidance kinds existed (no guidance keys, no Guidance field) is drawn with plain CFG
    again, even from a model folder whose sampling.json asks for another kind."""
    model = _copy_model(shipped_copy, tmp_path / "model")
    (model / "sampling.json").write_text(json.dumps({"guidance_kind": "interval", "sigma_low": 1.0}))
    first, old, again = tmp_path / "first.png", tmp_path / "old.png", tmp_path / "again.png"
    argv = ["generate", "x", "--model", str(model), "--steps", "3", "--guidance-kind", "cfg", "--output", str(first)]
    assert main(argv) == 0
    settings = _settings(first)
    assert settings.pop("guidance_kind") == "cfg" and settings.pop("guidance_rescale") == 0
    metadata = PngImagePlugin.PngInfo()
    metadata.add_text("parameters", Image.open(first).info["parameters"])
    metadata.add_text("hf-scratch", json.dumps(settings))
    Image.open(first).save(old, pnginfo=metadata)
    assert main(["generate", "--parameters-from", str(old), "--output", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(first).tobytes()
    assert _settings(again)["guidance_kind"] == "cfg"


def test_sampling_json_sets_the_defaults_and_flags_override_it(shipped_copy, tmp_path):
    from hf_scratch.sampling import default_sampling

    model = _copy_model(shipped_copy, tmp_path / "model")
    sampling = {"num_inference_steps": 3, "guidance_kind": "interval", "guidance_scale": 3.0, "sigma_low": 0.5,
                "sigma_high": None, "guide": "guide"}  # fmt: skip
    (model / "sampling.json").write_text(json.dumps(sampling))
    assert default_sampling(model) == {"num_inference_steps": 3, "guidance_kind": "interval", "guidance_scale": 3.0,
                                       "guidance_rescale": 0.0, "sigma_low": 0.5, "sigma_high": None, "eta": 0.0,
                                       "momentum": None, "guide": str(model / "guide")}  # fmt: skip
    runs = {
        "file": ([], {"steps": 3, "guidance": 3.0, "guidance_kind": "interval", "sigma_low": 0.5, "sigma_high": None}),
        "flags": (["--steps", "2", "--guidance", "2", "--guidance-interval", "1", "4"],
                  {"steps": 2, "guidance": 2.0, "guidance_kind": "interval", "sigma_low": 1.0, "sigma_high": 4.0}),
        # another kind: the file's scale and interval are its own kind's; the built-in defaults apply
        "cfg": (["--guidance-kind", "cfg"], {"steps": 3, "guidance": 5.0, "guidance_kind": "cfg"}),
        # the file's guide serves --guidance-kind auto without --guide
        "auto": (["--guidance-kind", "auto"], {"steps": 3, "guidance_kind": "auto", "guide": str(model / "guide")}),
    }  # fmt: skip
    for name, (flags, expected) in runs.items():
        out = tmp_path / f"{name}.png"
        assert main(["generate", "x", "--model", str(model), "--output", str(out), *flags]) == 0, name
        settings = _settings(out)
        assert {key: settings.get(key) for key in expected} == expected, name
    # img2img keeps CFG: the file's steps, and the built-in scale since the file's is the interval's
    picture = _picture(tmp_path / "in.png")
    out = tmp_path / "img2img.png"
    assert main(["img2img", "x", "--model", str(model), "--image", str(picture), "--output", str(out)]) == 0
    assert {key: _settings(out)[key] for key in ("steps", "guidance", "guidance_kind")} == {
        "steps": 3, "guidance": 5.0, "guidance_kind": "cfg"}  # fmt: skip


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "must hold a JSON object"),
        ('{"steps": 20}', "unknown key 'steps'"),
        ('{"num_inference_steps": 0}', "'num_inference_steps' is 0; it must be a whole number"),
        ('{"num_inference_steps": 2.5}', "'num_inference_steps' is 2.5"),
        ('{"guidance_kind": "pag"}', "'guidance_kind' is 'pag'; choose one of cfg, interval, apg, auto"),
        ('{"guidance_scale": "4"}', "'guidance_scale' is '4'; it must be a number"),
        ('{"guidance_kind": "interval", "sigma_high": "inf"}', "'sigma_high' is 'inf'; it must be a number or null"),
        ('{"guidance_kind": "interval", "sigma_low": 6}', "needs 0 <= 'sigma_low' < 'sigma_high'"),
        ('{"guidance_rescale": 2}', "'guidance_rescale' is 2; it must be a number in [0, 1]"),
        ('{"sigma_low": 0.5}', "'sigma_low' is an option of another guidance kind than 'cfg'"),
        ('{"guidance_kind": "auto"}', "'guidance_kind' 'auto' needs 'guide'"),
        ('{"guidance_kind": "auto", "guide": "nowhere"}', "'guide' is 'nowhere'; it must name a subfolder"),
    ],
)
def test_malformed_sampling_json_is_refused_naming_the_file_and_key(shipped_copy, tmp_path, content, message, capsys):
    from hf_scratch.sampling import default_sampling

    model = _copy_model(shipped_copy, tmp_path / "model")
    (model / "sampling.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        default_sampling(model)
    assert str(model / "sampling.json") in str(error.value)
    assert main(["generate", "x", "--model", str(model), "--output", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_bad_guidance_flag_combinations_name_the_flag_and_the_fix(shipped_copy, tmp_path, capsys):
    guide = str(shipped_copy / "guide")
    picture = str(_picture(tmp_path / "in.png"))
    cases = [
        # the shipped sampling.json's kind is interval, so the cases of the cfg kind name it
        (["--guidance-kind", "cfg", "--guide", guide], "--guide applies to --guidance-kind auto, not cfg; add --guid"),
        (["--guidance-kind", "auto"], "--guidance-kind auto needs --guide FOLDER"),
        (["--guidance-kind", "auto", "--guide", str(tmp_path)], "is not a U-Net folder"),
        (["--guidance-kind", "interval", "--guidance-interval", "5", "1"], "--guidance-interval 5.0 1.0: needs 0 <="),
        (["--guidance-kind", "interval", "--guidance-interval", "-1", "1"], "needs 0 <= LOW < HIGH"),
        (
            ["--guidance-kind", "cfg", "--guidance-interval", "0.3", "5"],
            "--guidance-interval applies to --guidance-kind interval, not cfg",
        ),
        (
            ["--guidance-kind", "apg", "--guidance-rescale", "0.7"],
            "--guidance-rescale applies to --guidance-kind cfg or",
        ),
        (["--apg-eta", "0.5"], "--apg-eta applies to --guidance-kind apg"),
        (["--guidance-kind", "interval", "--apg-momentum", "-0.5"], "--apg-momentum applies to --guidance-kind apg"),
        (["--guidance-rescale", "1.5"], "--guidance-rescale 1.5 is out of range"),
    ]
    for command in ("img2img", "inpaint"):
        extra = ["--image", picture] + (["--mask", picture] if command == "inpaint" else [])
        cases += [
            ([command, *extra, "--guidance-kind", "interval"], f"--guidance-kind interval: {command} guides with"),
            ([command, *extra, "--guide", guide, "--apg-eta", "1"], "--apg-eta, --guide: "),
        ]
    for flags, message in cases:
        command = flags[0] if flags[0] in ("img2img", "inpaint") else "generate"
        flags = flags[1:] if command != "generate" else flags
        argv = [command, "x", "--model", str(shipped_copy), "--output", str(tmp_path / "o.png"), *flags]
        assert main(argv) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not (tmp_path / "o.png").exists()
    for command in ("img2img", "inpaint"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--guidance-rescale" in text and "--guidance-kind" not in text and "--guide " not in text


def test_parse_parameters_reads_guidance_fields_and_refuses_malformed_ones():
    from hf_scratch.cli import parse_parameters

    head = 'a\nSteps: 3, Sampler: ddim, CFG scale: 4, Seed: 1, Size: 32x32, Model: "m, with a comma"'
    assert parse_parameters(head)["guidance_kind"] == "cfg" and parse_parameters(head)["model"] == "m, with a comma"
    settings = parse_parameters(head + ', Guidance: "interval (1e-3, 5.42]", Guidance rescale: 0.7')
    assert {key: settings[key] for key in ("guidance_kind", "sigma_low", "sigma_high", "guidance_rescale")} == {
        "guidance_kind": "interval", "sigma_low": 0.001, "sigma_high": 5.42, "guidance_rescale": 0.7}  # fmt: skip
    assert parse_parameters(head + ", Guidance: apg eta 0.5")["momentum"] is None
    for field, message in [("Guidance: pag", "'Guidance' field is 'pag'"), ("Guidance: apg eta x", "'apg eta x'"),
                           ("Guidance: auto", "has no 'Guide' field")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_parameters(f"{head}, {field}")
