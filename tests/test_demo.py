"""The Gradio Space: API calls through gradio_client, friendly errors, and a real Chromium driven by Playwright."""

import importlib
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The demo serving a tiny pipeline folder from the allow-list, on a free localhost port."""
    from _tiny import tiny_components

    from hf_scratch.models.controlnet import ScratchControlNetModel
    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
    from hf_scratch.schedulers.dpm_solver import ScratchDPMSolverMultistepScheduler

    folder = tmp_path_factory.mktemp("models") / "tiny-model"
    scheduler = ScratchDPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    components = tiny_components("scratch")
    ScratchStableDiffusionPipeline(**components, scheduler=scheduler).save_pretrained(str(folder))
    # A ControlNet of the tiny U-Net whose zero convolutions are not zero, so that the layout changes the image.
    controlnet = ScratchControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    controlnet.save_pretrained(folder.parent / "tiny-controlnet")
    env = {
        "HF_SCRATCH_DEMO_MODELS": str(folder),
        "HF_SCRATCH_DEMO_CONTROLNET": os.pathsep.join([str(folder), str(folder.parent / "tiny-controlnet")]),
        "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    sys.path.insert(0, str(ROOT / "spaces_demo"))
    demo_module = importlib.import_module("app")
    demo = demo_module.build_demo()
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "model": folder.name, "module": demo_module, "folder": folder}
    demo.close()
    sys.path.remove(str(ROOT / "spaces_demo"))
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _gallery_path(item) -> str:
    """gradio_client returns a gallery item as {"image": path or {"path": ...}, "caption": ...}."""
    image = item["image"]
    return image["path"] if isinstance(image, dict) else image


def _predict(app, **overrides):
    from gradio_client import Client

    request = dict(
        prompt="red heart",
        negative_prompt="",
        steps=4,
        guidance=3.0,
        seed=1,
        scheduler="dpm++",
        size=32,
        frames=3,
        model=app["model"],
        guidance_kind="CFG",
        sigma_low=0.28,
        sigma_high=5.42,
    )
    request.update(overrides)
    client = Client(app["url"], verbose=False)
    return client.predict(*request.values(), api_name="/generate")


def test_generate_through_gradio_client(app):
    image_path, trajectory, info = _predict(app, size=40, frames=3)
    assert Image.open(image_path).size == (40, 40)
    assert len(trajectory) == 3
    frames = [np.asarray(Image.open(_gallery_path(item))) for item in trajectory]
    assert all(frame.shape == (40, 40, 3) for frame in frames)
    assert not np.array_equal(frames[0], frames[-1]), "the predicted x0 should change along the trajectory"
    assert "dpm++" in info


def test_the_default_scheduler_is_the_models_own_even_after_another_request(app):
    """A flow-matching or EDM model has no DDPM-family sampler, so the dropdown starts at the model's own; a request
    for another scheduler does not change what "the model's own" means for the next one."""
    own = app["module"].OWN_SCHEDULER
    first, _, info = _predict(app, scheduler=own)
    assert "dpm++ ·" in info  # the tiny model was saved with DPM-Solver++
    _predict(app, scheduler="ddim")
    again, _, info = _predict(app, scheduler=own)
    assert "dpm++ ·" in info
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompt": "   "}, "Please type a prompt"),
        # Gradio's own slider and dropdown checks may answer first; either way the message names the problem.
        ({"steps": 500}, "Steps must be (a whole number |a number )?between 1 and 50"),
        ({"size": 36}, "multiple of 8"),
        ({"model": "/etc"}, "not on this Space's allow-list|not in the list of choices"),
        ({"steps": 2.5}, "Steps must be a whole number between 1 and 50; got 2.5"),
        ({"size": "big"}, "Size \\(px\\) must be a number between 8 and 256; got 'big'"),
        ({"seed": "x"}, "Seed must be a number; got 'x'"),
        ({"guidance": "strong"}, "Guidance scale must be a number between 1.0 and 15.0; got 'strong'"),
    ],
)
def test_bad_requests_get_friendly_errors_and_the_app_keeps_serving(app, overrides, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        _predict(app, **overrides)
    image_path, _, _ = _predict(app, steps=1, frames=1)
    assert Image.open(image_path).size == (32, 32)


def _pipeline_image(folder: Path, **kwargs) -> np.ndarray:
    import torch

    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline

    pipe = ScratchStableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("red heart", num_inference_steps=4, height=32, width=32, generator=torch.Generator().manual_seed(1),
                 **kwargs).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


def test_interval_guidance_through_gradio_client_equals_the_pipelines_guider(app):
    """The Guidance dropdown's interval with its σ fields (σ_hi empty: no upper end) is the pipeline's
    IntervalGuidance; the demo's frozen U-Net runs its batches of one and two, within one level of eager. (Gradio
    sends images as lossy WebP, so the pixels are compared on `generate`'s own output.)"""
    from hf_scratch.pipelines.guidance import IntervalGuidance

    demo = app["module"]
    interval = dict(scheduler=demo.OWN_SCHEDULER, guidance_kind="interval", sigma_low=1.0, sigma_high=None)
    image_path, _, info = _predict(app, **interval)
    assert "interval (1, ∞] 3 ·" in info
    plain, _, _ = _predict(app, scheduler=demo.OWN_SCHEDULER)
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(image_path)))
    request = dict(prompt="red heart", negative_prompt="", steps=4, guidance=3.0, seed=1, size=32, frames=1,
                   model=app["model"], **interval)  # fmt: skip
    image, _, _ = demo.generate(**request)
    expected = _pipeline_image(app["folder"], guider=IntervalGuidance(3.0, 1.0, float("inf")))
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1


def test_a_models_sampling_json_sets_the_controls_and_offers_autoguidance(app):
    """sampling.json's steps, scale and kind become the controls' values when the model is chosen; its guide makes
    autoguidance available, and a request for it equals the pipeline with ModelAutoGuidance."""
    import gradio as gr

    from hf_scratch.models.unet import ScratchUNet2DConditionModel
    from hf_scratch.pipelines.guidance import ModelAutoGuidance

    demo, folder = app["module"], app["folder"]
    request = dict(prompt="red heart", negative_prompt="", steps=4, guidance=3.0, seed=1,
                   scheduler=demo.OWN_SCHEDULER, size=32, frames=1, model=app["model"])  # fmt: skip
    with pytest.raises(gr.Error, match="'autoguidance' is not offered"):
        demo.generate(**request, guidance_kind="autoguidance")
    ScratchUNet2DConditionModel.from_pretrained(str(folder / "unet")).save_pretrained(str(folder / "guide"))
    sampling = folder / "sampling.json"
    sampling.write_text('{"num_inference_steps": 12, "guidance_kind": "interval", "guidance_scale": 2.5, '
                        '"sigma_low": 0.5, "sigma_high": null, "guide": "guide"}')  # fmt: skip
    try:
        steps, guidance, kind, low, high = demo.model_sampling(app["model"])
        assert (steps, guidance, kind.value, low, high) == (12, 2.5, "interval", 0.5, None)
        assert kind.choices[-1] == ("autoguidance", "autoguidance")
        image, _, info = demo.generate(**request, guidance_kind="autoguidance")
        assert "autoguidance 3 ·" in info
        guide = ScratchUNet2DConditionModel.from_pretrained(str(folder / "guide"))
        expected = _pipeline_image(folder, guider=ModelAutoGuidance(guide, 3.0))
        assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1
        with pytest.raises(gr.Error, match="σ_lo < σ_hi"):
            demo.generate(**request, guidance_kind="interval", sigma_low=2.0, sigma_high=1.0)
        sampling.write_text('{"guidance_kind": "pag"}')
        with pytest.raises(gr.Error, match="sampling.json.*'guidance_kind' is 'pag'"):
            demo.model_sampling(app["model"])
    finally:
        sampling.unlink()


def test_forward_process_follows_the_closed_form(app):
    demo = app["module"]
    source = demo.example_image()
    early, caption_early = demo.forward_process(source, 0)
    late, caption_late = demo.forward_process(source, 999)
    reference = np.asarray(source.resize((128, 128)), dtype=np.float32)
    # At t=0 almost all of x_0 survives; at t=999 the picture is nearly pure noise.
    assert np.abs(np.asarray(early, dtype=np.float32) - reference).mean() < 10
    assert np.abs(np.asarray(late, dtype=np.float32) - reference).mean() > 40
    assert "ᾱ_t = " in caption_early and "SNR" in caption_late


def test_garbage_upload_is_a_friendly_error(app, tmp_path):
    import gradio as gr

    garbage = tmp_path / "not-an-image.png"
    garbage.write_bytes(b"\x89PNG garbage that is not an image")
    with pytest.raises(gr.Error, match="not an image"):
        app["module"].forward_process(str(garbage), 100)


def test_forward_process_reads_a_16_bit_upload_as_the_pipelines_do(app, tmp_path):
    """A nearly black 16-bit PNG stays nearly black at t = 0 (it was read as white), and an upload beyond Pillow's
    pixel limit is a friendly error, not a traceback."""
    import gradio as gr

    values = (np.arange(128 * 128).reshape(128, 128) % 2000).astype(np.uint16)  # at most 3% of white
    Image.fromarray(values).save(tmp_path / "grey16.png")
    x0, _ = app["module"].forward_process(str(tmp_path / "grey16.png"), 0)
    assert np.asarray(x0, dtype=np.float32).mean() < 20
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        with pytest.raises(gr.Error, match="too large to decode safely"):
            app["module"].forward_process(str(tmp_path / "grey16.png"), 0)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _layout_sketch(path: Path) -> Path:
    """A 256 px painting: a red disc on a yellow square, on transparency (as the sketch pad sends it)."""
    from PIL import ImageDraw

    sketch = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    draw = ImageDraw.Draw(sketch)
    draw.rectangle((32, 32, 224, 224), fill=(247, 181, 0, 255))
    draw.ellipse((64, 64, 192, 192), fill=(224, 40, 46, 255))
    sketch.save(path)
    return path


def test_the_layout_tab_draws_what_the_controlnet_pipeline_draws_from_the_sketchs_layout(app, tmp_path):
    from gradio_client import Client, handle_file

    from hf_scratch.conditions import colour_layout_image
    from hf_scratch.models.controlnet import ScratchControlNetModel
    from hf_scratch.pipelines.controlnet import ScratchStableDiffusionControlNetPipeline

    sketch = _layout_sketch(tmp_path / "sketch.png")
    client = Client(app["url"], verbose=False)
    editor = {"background": None, "layers": [], "composite": handle_file(str(sketch))}
    layout_path, drawn_path, info = client.predict(editor, "red heart", 3.0, 1.0, 7, api_name="/draw_layout")

    layout = colour_layout_image(Image.open(sketch), 32, 8)
    assert np.array_equal(np.asarray(Image.open(layout_path).convert("RGB")), np.asarray(layout))
    assert tuple(np.asarray(layout)[0, 0]) == (255, 255, 255) and tuple(np.asarray(layout)[16, 16]) == (224, 40, 46)
    controlnet = ScratchControlNetModel.from_pretrained(app["folder"].parent / "tiny-controlnet")
    pipe = ScratchStableDiffusionControlNetPipeline.from_pretrained(app["folder"], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 16, "guidance_scale": 3.0, "generator": torch.Generator().manual_seed(7)}
    expected = pipe("red heart", image=layout, **kwargs).images[0]
    other = pipe("red heart", image=Image.new("RGB", (32, 32), "blue"), **kwargs).images[0]
    drawn = np.asarray(Image.open(drawn_path).convert("RGB"), dtype=np.int16)
    assert np.abs(drawn - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert np.abs(drawn - np.asarray(other, dtype=np.int16)).max() > 8  # the layout does steer the drawing
    assert info.startswith("layout distance ")


def test_the_layout_tab_without_a_sketch_says_so(app):
    from gradio_client import Client

    client = Client(app["url"], verbose=False)
    with pytest.raises(Exception, match="Paint a layout"):
        client.predict({"background": None, "layers": [], "composite": None}, "red heart", 3.0, 1.0, 0,
                       api_name="/draw_layout")  # fmt: skip


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (/usr/bin/chromium)")
def test_real_browser_generates_and_moves_the_forward_slider(app, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app["url"])
        page.locator("#prompt textarea").fill("grinning face, openmoji style")
        page.locator("#steps input[type=number]").fill("4")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#generate").click()
        page.wait_for_function(
            "() => { const img = document.querySelector('#image img'); return img && img.naturalWidth > 0; }",
            timeout=120_000,
        )
        page.wait_for_function("() => document.querySelectorAll('#trajectory img').length > 0", timeout=60_000)
        # the 32 px image is shown enlarged with square pixels, not blurred
        shown = page.evaluate(
            "() => { const img = document.querySelector('#image img'); "
            "return [getComputedStyle(img).imageRendering, img.getBoundingClientRect().height]; }"
        )
        assert shown[0] == "pixelated" and shown[1] >= 128, shown
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("HF_SCRATCH_SCREENSHOT"):
            shutil.copy(shot, os.environ["HF_SCRATCH_SCREENSHOT"])

        page.get_by_role("tab", name="Forward process").click()
        xt = page.locator("#xt img")
        xt.wait_for(timeout=60_000)
        before = xt.get_attribute("src")
        page.locator("#timestep input[type=range]").fill("900")
        page.wait_for_function(
            "(old) => { const img = document.querySelector('#xt img'); return img && img.src !== old; }",
            arg=before,
            timeout=60_000,
        )
        assert "t = 900" in page.locator("#alpha").inner_text()
        browser.close()


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (/usr/bin/chromium)")
def test_real_browser_paints_a_layout_and_draws_from_it(app):
    """The sketch pad is a WebGL canvas: Chromium renders it with SwiftShader (software GL) instead of --disable-gpu."""
    import io

    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    args = [arg for arg in CHROMIUM_ARGS if arg != "--disable-gpu"] + ["--use-angle=swiftshader",
                                                                        "--enable-unsafe-swiftshader"]  # fmt: skip
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app["url"])
        page.get_by_role("tab", name="Draw from a layout").click()
        canvas = page.locator("#sketch canvas").first
        canvas.wait_for(timeout=60_000)
        box = canvas.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x - 60, y)
        page.mouse.down()  # the brush is the default tool, in its first colour (red)
        for step in range(13):
            page.mouse.move(x - 60 + 10 * step, y + (step % 2) * 20, steps=3)
        page.mouse.up()
        page.locator("#draw").click()
        page.wait_for_function(
            "() => { const img = document.querySelector('#drawn img'); return img && img.naturalWidth > 0; }",
            timeout=120_000,
        )
        layout = page.request.get(page.locator("#layout img").get_attribute("src")).body()
        cells = np.asarray(Image.open(io.BytesIO(layout)).convert("RGB"))[::4, ::4]  # one pixel per 8 x 8 cell
        painted = (cells != 255).any(axis=-1)
        assert painted[3:5].any() and not painted[0].any() and not painted[-1].any(), painted.astype(int)
        assert (cells[painted][:, 0] > cells[painted][:, 2]).all()  # reddish cells where the stroke went
        assert page.locator("#layout_info").inner_text().startswith("layout distance ")
        browser.close()
