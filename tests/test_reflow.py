"""Reflow (Liu et al. 2022, arXiv:2209.03003): `training/reflow.py` draws a teacher's (noise, endpoint) couplings, and
`train_unet.py --reflow_pairs` trains on them with the pair's own noise.

The couplings are checked against the teacher pipeline run prompt by prompt here; the training against the pairs
themselves: every (latent, noise) row the objective receives is a row of one pair, and no fresh noise is drawn.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import tiny_components, write_square_images

from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler
from hf_scratch.training.data import CoupledLatents

REPO = Path(__file__).resolve().parents[1]
SAMPLING = {"num_inference_steps": 3, "guidance_kind": "cfg", "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny flow-matching pipeline folder of our classes, whose sampling.json asks for 3 steps of CFG 2."""
    folder = tmp_path_factory.mktemp("teacher") / "pipeline"
    components = tiny_components("scratch")
    ScratchStableDiffusionPipeline(**components, scheduler=ScratchFlowMatchEulerScheduler()).save_pretrained(folder)
    (folder / "sampling.json").write_text(json.dumps(SAMPLING))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_square_images(tmp_path_factory.mktemp("squares"))


def draw_pairs(teacher: Path, data: Path, out: Path, seed: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "training" / "reflow.py"), "--model", str(teacher), "--data", str(data),
               "--out", str(out), "--shard_size", "3", "--seed", str(seed)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, teacher, data) -> Path:
    out = tmp_path_factory.mktemp("reflow") / "pairs"
    result = draw_pairs(teacher, data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_each_pair_is_the_teachers_endpoint_of_its_noise(pairs, teacher, data):
    coupling = CoupledLatents(pairs)
    captions = [json.loads(line)["text"] for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    assert coupling.captions == captions and len(json.loads((pairs / "index.json").read_text())["shards"]) == 3
    pipe = ScratchStableDiffusionPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    for i, caption in enumerate(captions):
        item = coupling[i]
        noise = torch.randn(item["coupled_noise"].shape, generator=torch.Generator().manual_seed(1 * 1_000_003 + i))
        torch.testing.assert_close(item["coupled_noise"], noise, rtol=0, atol=0)
        endpoint = pipe(caption, latents=noise[None], num_inference_steps=3, guidance_scale=2.0, output_type="latent")
        torch.testing.assert_close(item["latents"], endpoint.images[0], rtol=1e-5, atol=1e-5)
    assert coupling[(4, 2)]["caption"] == captions[2]  # (epoch, index), as EpochBatches asks


def test_a_rerun_draws_only_the_missing_shards_and_the_same_pairs(pairs, teacher, data, tmp_path):
    copy = tmp_path / "pairs"
    copy.mkdir()
    for name in ("pairs-00000.safetensors", "pairs-00002.safetensors"):  # shard 1 and the index were never written
        (copy / name).write_bytes((pairs / name).read_bytes())
    kept = (copy / "pairs-00000.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"has no index.json: draw the pairs first with `python training/reflow.py"):
        CoupledLatents(copy)
    assert draw_pairs(teacher, data, copy).returncode == 0
    assert (copy / "pairs-00000.safetensors").stat().st_mtime_ns == kept
    assert (copy / "pairs-00001.safetensors").read_bytes() == (pairs / "pairs-00001.safetensors").read_bytes()
    assert not list(copy.glob(".*partial"))
    other_seed = draw_pairs(teacher, data, copy, seed=2)  # would mix two couplings in one folder
    assert other_seed.returncode != 0 and "holds pairs drawn with other settings" in other_seed.stderr


def reflow_args(teacher: Path, pairs: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(teacher), "--reflow_pairs", str(pairs), "--objective", "flow_matching",
        "--weighting_scheme", "uniform", "--caption_dropout_prob", "0", "--resolution", "32", "--output_dir",
        str(output), "--train_batch_size", "4", "--max_train_steps", "4", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("student", [["--unet_from_pretrained"], ["--lora_rank", "4", "--lora_layers", "all"]])
def test_training_sees_each_pairs_own_noise(student, teacher, pairs, tmp_path, monkeypatch):
    from hf_scratch import objectives
    from hf_scratch.training import train_unet

    def no_fresh_noise(self, latents):
        raise AssertionError("a reflow step drew fresh noise instead of the pair's")

    seen = []
    flow_target = objectives.FlowMatchingObjective.__call__

    def record(self, latents, noise):
        seen.append((latents.clone(), noise.clone()))
        return flow_target(self, latents, noise)

    monkeypatch.setattr(objectives.Objective, "noise", no_fresh_noise)
    monkeypatch.setattr(objectives.FlowMatchingObjective, "__call__", record)
    output = tmp_path / "student"
    train_unet.main(train_unet.parse_args(reflow_args(teacher, pairs, output, *student)))
    coupling = CoupledLatents(pairs)
    assert len(seen) == 4
    for latents, noise in seen:
        for latent, draw in zip(latents, noise):
            matches = [i for i in range(len(coupling)) if torch.equal(coupling.latents[i], latent)]
            assert len(matches) == 1 and torch.equal(coupling.noise[matches[0]], draw)
    if "--lora_layers" in student:
        from safetensors.torch import load_file

        keys = load_file(output / "pytorch_lora_weights.safetensors")
        assert any(".resnets.0.conv1." in key for key in keys) and any(".to_q." in key for key in keys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--immiscible_noise"], "--immiscible_noise cannot be combined with --reflow_pairs"),
        (["--cache_latents"], "--cache_latents cannot be combined with --reflow_pairs"),
        (["--objective", "epsilon"], "--reflow_pairs trains a flow .* add --objective flow_matching"),
        (["--train_data_dir", "x"], "not allowed with argument --reflow_pairs"),
    ],
)
def test_flags_that_break_the_coupling_are_refused(extra, message, teacher, pairs, tmp_path, capsys):
    from hf_scratch.training import train_unet

    args = reflow_args(teacher, pairs, tmp_path / "out", "--unet_from_pretrained")
    if "--objective" in extra:
        args = [a for a in args if a != "flow_matching" and a != "--objective"]
    try:
        train_unet.parse_args([*args, *extra])
    except SystemExit:  # argparse's refusal of two data sources
        assert re.search(message, capsys.readouterr().err)
    except ValueError as error:
        assert re.search(message, str(error))
    else:
        pytest.fail(f"{extra} was accepted")
