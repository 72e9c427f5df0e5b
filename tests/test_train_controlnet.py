"""Training a ControlNet beside a frozen pipeline (`training/train_controlnet.py`) on a condition computed from each
image (`hf_scratch.conditions`).

The colour layout is checked against a block mean written here with numpy; the training against the base model (its
weights never move, the objective is its own, a fresh ControlNet draws exactly the base model), against diffusers'
`ControlNetModel` (which loads the result), and against itself (a resumed run ends with the same weights as an
uninterrupted one).
"""

import json
import re

import numpy as np
import pytest
import torch
from _tiny import tiny_components, write_square_images
from PIL import Image
from safetensors.torch import load_file
from test_training import run

from hf_scratch.conditions import colour_layout, colour_layout_image, layout_distance
from hf_scratch.metrics import image_to_tensor
from hf_scratch.pipelines.controlnet import ScratchStableDiffusionControlNetPipeline
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler
from hf_scratch.training import train_controlnet


def block_mean_layout(image: np.ndarray, cells: int) -> np.ndarray:
    """Each cell of an (H, W, C) image filled with its mean: numpy reshapes, no pooling."""
    height, width, channels = image.shape
    blocks = image.reshape(cells, height // cells, cells, width // cells, channels).mean(axis=(1, 3))
    return blocks.repeat(height // cells, axis=0).repeat(width // cells, axis=1)


def test_the_colour_layout_is_each_cells_mean_colour():
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    layout = colour_layout(pixels, cells=8)
    for image, result in zip(pixels, layout):
        expected = (block_mean_layout(image.permute(1, 2, 0).numpy().astype(np.float64), 8) + 1) / 2
        np.testing.assert_allclose(result.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)
    assert layout_distance(pixels, layout).abs().max() < 1e-6  # an image follows its own layout exactly
    assert (layout_distance(pixels, layout.flip(0)) > 0.05).all()
    with pytest.raises(ValueError, match="cells=5 must divide the image's height and width"):
        colour_layout(pixels, cells=5)


def test_the_layout_of_a_picture_is_that_of_its_pixels_on_white():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    from_tensor = colour_layout(image_to_tensor(picture, 32)[None] * 2 - 1, 8)[0].permute(1, 2, 0).numpy() * 255
    from_picture = np.asarray(colour_layout_image(picture, 32, 8), dtype=np.float64)
    assert np.abs(from_picture - from_tensor).max() <= 0.5 + 1e-3  # one rounding
    sketch = Image.new("RGBA", (256, 256), (0, 0, 0, 0))  # a transparent sketch pad with one red stroke
    sketch.paste((255, 0, 0, 255), (0, 0, 128, 32))
    layout = np.asarray(colour_layout_image(sketch, 32, 8))
    assert (layout[0, 0] == (255, 0, 0)).all() and (layout[31, 31] == (255, 255, 255)).all()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny flow-matching pipeline folder of our classes."""
    folder = tmp_path_factory.mktemp("base") / "pipeline"
    ScratchStableDiffusionPipeline(
        **tiny_components("scratch"), scheduler=ScratchFlowMatchEulerScheduler()
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_square_images(tmp_path_factory.mktemp("squares"))


def controlnet_args(base, data, output, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--resolution", "32",
        "--output_dir", str(output), "--train_batch_size", "4", "--max_train_steps", "4", "--learning_rate", "1e-3",
        "--checkpointing_steps", "2", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip


def test_a_fresh_controlnet_draws_exactly_the_base_model(base):
    pipe = ScratchStableDiffusionPipeline.from_pretrained(base)
    args = train_controlnet.parse_args(controlnet_args(base, base, "unused"))
    controlnet = train_controlnet.build_controlnet(args, pipe.unet, pipe.vae_scale_factor)
    assert controlnet.config.conditioning_embedding_out_channels == (16, 32)  # the VAE halves once
    controlled = ScratchStableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    condition = torch.rand(1, 3, 32, 32)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "pt"}
    drawn = controlled("a red square", image=condition, generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(drawn, plain, rtol=0, atol=0)  # zero convolutions: y_c = y at step 0


def test_training_moves_only_the_controlnet_and_feeds_it_each_images_layout(base, data, tmp_path, monkeypatch):
    from diffusers import ControlNetModel

    from hf_scratch import objectives
    from hf_scratch.models.controlnet import ScratchControlNetModel

    conditions_seen, objectives_used = [], []
    forward = ScratchControlNetModel.forward

    def record(self, sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs):
        conditions_seen.append(controlnet_cond.clone())
        return forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs)

    flow_target = objectives.FlowMatchingObjective.__call__
    monkeypatch.setattr(ScratchControlNetModel, "forward", record)
    monkeypatch.setattr(objectives.FlowMatchingObjective, "__call__",
                        lambda self, *a: objectives_used.append(type(self)) or flow_target(self, *a))  # fmt: skip
    output = tmp_path / "controlnet"
    train_controlnet.main(train_controlnet.parse_args(controlnet_args(
        base, data, output, "--validation_images", str(data / "train" / "0.png"), "--validation_prompts",
        "a red square", "--validation_steps", "4", "--num_validation_images", "2", "--validation_inference_steps", "2",
    )))  # fmt: skip

    # The base model's objective (flow matching, from its scheduler), and each image's own layout as the condition.
    assert objectives_used and set(objectives_used) == {objectives.FlowMatchingObjective}
    layouts = [colour_layout(image_to_tensor(Image.open(data / "train" / f"{i}.png"), 32)[None] * 2 - 1, 8)[0]
               for i in range(8)]  # fmt: skip
    training_conditions = [c for batch in conditions_seen[:4] for c in batch]
    assert len(training_conditions) == 16
    for condition in training_conditions:
        assert min((condition - layout).abs().max().item() for layout in layouts) < 1e-5

    # Only the ControlNet moved, and it did move; diffusers' ControlNetModel loads it.
    trained = load_file(output / "diffusion_pytorch_model.safetensors")
    fresh = ScratchControlNetModel.from_unet(ScratchStableDiffusionPipeline.from_pretrained(base).unet,
                                             conditioning_embedding_out_channels=(16, 32)).state_dict()  # fmt: skip
    assert not torch.equal(trained["controlnet_mid_block.weight"], fresh["controlnet_mid_block.weight"])
    after = ScratchStableDiffusionPipeline.from_pretrained(base)
    before = tiny_components("scratch")
    for name in ("unet", "vae", "text_encoder"):
        for key, value in before[name].state_dict().items():
            assert torch.equal(getattr(after, name).state_dict()[key], value), (name, key)
    reference = ControlNetModel.from_pretrained(output)
    assert set(reference.state_dict()) == set(trained)
    assert Image.open(output / "validation" / "step-000004.png").size == (3 * 32, 32)  # condition + 2 drawings
    assert "train_controlnet.py" in (output / "README.md").read_text()


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(base, data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run("train_controlnet.py", controlnet_args(base, data, whole))
    first = controlnet_args(base, data, parts)
    first[first.index("--max_train_steps") + 1] = "2"
    run("train_controlnet.py", first)
    run("train_controlnet.py", controlnet_args(base, data, parts, "--resume_from_checkpoint", "latest"))
    a = load_file(whole / "diffusion_pytorch_model.safetensors")
    b = load_file(parts / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    steps = [json.loads(line)["step"] for line in (parts / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--objective", "epsilon"], "differs from the objective of the base model .* a ControlNet must keep it"),
        (["--condition_cells", "5"], "--condition_cells=5 must divide --resolution=32"),
        (["--validation_images", "a.png", "b.png", "--validation_prompts", "x", "y", "z"], "gives 3 prompts for 2"),
        (["--validation_prompts", "x"], "--validation_prompts draw with conditions: add --validation_images"),
    ],
)
def test_bad_flags_are_refused_by_name(extra, message, base, data, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_controlnet.parse_args(controlnet_args(base, data, tmp_path / "out", *extra))


def test_without_a_pipeline_folder_it_says_what_to_pass(data, tmp_path):
    args = [
        a for a in controlnet_args("x", data, tmp_path / "out") if a not in ("--pretrained_model_name_or_path", "x")
    ]
    with pytest.raises(ValueError, match=re.escape("pass --pretrained_model_name_or_path")):
        train_controlnet.parse_args(args)
