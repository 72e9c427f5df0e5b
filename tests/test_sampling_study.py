"""The sampling study's runner and report (training/sampling_study.py, training/sampling_study_report.py): the verdict
rule, the cost bookkeeping and the report, on results made up here; and one real cell of the study on the shipped
model."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import sampling_study  # noqa: E402
from sampling_study_report import compare, write_report  # noqa: E402


def cells_of(values: dict[tuple[str, int, str], list[float]]) -> dict:
    cells = {}
    for (method, nfe, split), kids in values.items():
        for seed, kid in enumerate(kids):
            cells[f"{method} | {nfe} | {split} | {seed}"] = {
                "method": method, "nfe_target": nfe, "split": split, "seed": seed, "kid_x1e3": kid, "fd": 10 * kid,
                "nfe": nfe, "unet_evaluations_per_image": 2 * nfe, "seconds_per_image": 0.01,
            }  # fmt: skip
    return cells


def test_a_method_is_better_only_when_its_worst_seed_beats_the_baselines_best_on_every_split():
    base = {("base", 8, "validation"): [5.0, 6.0, 7.0], ("base", 8, "train"): [5.0, 6.0, 7.0]}
    clear = {("new", 8, "validation"): [3.0, 4.0, 4.9], ("new", 8, "train"): [2.0, 3.0, 4.0]}
    overlapping = {("new", 8, "validation"): [3.0, 4.0, 5.5], ("new", 8, "train"): [2.0, 3.0, 4.0]}
    one_split = {("new", 8, "validation"): [3.0, 4.0, 4.5], ("new", 8, "train"): [5.5, 6.0, 6.5]}
    worse = {("new", 8, "validation"): [8.0, 9.0], ("new", 8, "train"): [7.5, 9.0]}
    splits = ["validation", "train"]
    assert compare(cells_of({**base, **clear}), "new", "base", 8, splits) == "better"
    assert compare(cells_of({**base, **overlapping}), "new", "base", 8, splits) == "within the spread"
    assert compare(cells_of({**base, **one_split}), "new", "base", 8, splits) == "within the spread"
    assert compare(cells_of({**base, **worse}), "new", "base", 8, splits) == "worse"
    assert compare(cells_of(base), "new", "base", 8, splits) is None


def test_report_tables_and_plot(tmp_path):
    values = {
        (method, nfe, split): [kid + nfe_shift, kid + nfe_shift + 0.5, kid + nfe_shift + 1.0]
        for method, kid in (("base", 6.0), ("new", 3.0))
        for nfe, nfe_shift in ((4, 4.0), (8, 1.0))
        for split in ("validation", "train")
    }
    results = {"cells": cells_of(values), "floor": {"validation": {"kid_x1e3": 0.1}, "train": {"kid_x1e3": 0.2}}}
    results["tune"] = {"cfg x": {"kind": "cfg", "options": {"guidance_scale": 4.0}, "kid_x1e3": 1.0}}
    methods = {"base": None, "new": None}
    write_report(results, methods, "base", tmp_path / "study")
    text = (tmp_path / "study.md").read_text()
    assert "| new | better | better |" in text
    assert "| base | 10.50 (10.00–11.00) | 7.50 (7.00–8.00) |" in text  # KID at NFE 4 and 8: mean (min–max)
    assert "KID ×10³ validation 0.10, train 0.20" in text
    assert (tmp_path / "study.png").stat().st_size > 10_000
    # Today's default (here "base" at NFE 8, 16 U-Net evaluations, KID 7-8): "new" beats it at NFE 8 (4-5); at NFE 4
    # (7-8) it is within the spread.
    write_report(results, methods, "base", tmp_path / "study", today=("base", 8))
    text = (tmp_path / "study.md").read_text()
    assert "Beating it beyond the spread at no more evaluations: new at NFE 8 (4.50)." in text
    assert "- NFE 4: best **new**, KID ×10³ 7.50 (better against plain CFG)." in text


def test_steps_fit_the_network_evaluations():
    assert [sampling_study.steps_for("flow-heun", n) for n in (4, 8, 16)] == [2, 4, 8]  # 2n − 1 calls
    assert [sampling_study.steps_for("flow-euler", n) for n in (4, 8, 16)] == [4, 8, 16]


def test_results_are_written_whole_and_claims_are_exclusive(tmp_path):
    path = tmp_path / "results.json"
    with sampling_study.locked_results(path) as results:
        results["cells"]["a"] = {"kid_x1e3": 1.0}
    assert json.loads(path.read_text())["cells"] == {"a": {"kid_x1e3": 1.0}}
    assert not list(tmp_path.glob("*.partial"))
    assert not sampling_study.claim(path, "a")  # recorded already
    assert sampling_study.claim(path, "b") and sampling_study.claim(path, "b")  # ours, still ours
    with sampling_study.locked_results(path) as results:
        results["claims"]["c"] = 1  # pid 1 is alive: another process draws it
    assert not sampling_study.claim(path, "c")


@pytest.mark.usefixtures("one_torch_thread")
def test_one_cell_on_the_shipped_model_counts_its_network_evaluations():
    import torch

    from hf_scratch import default_model_path
    from hf_scratch.pipelines import ScratchStableDiffusionPipeline
    from hf_scratch.pipelines.guidance import IntervalGuidance

    pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    loaded = {"pipe": pipe, "scheduler_config": dict(pipe.scheduler.config), "guides": {}, "schedules": {}}
    prompts = ["red heart, twemoji style", "rocket, noto style"]
    options = {"guidance_scale": 5.0, "sigma_low": 0.28, "sigma_high": None}
    drawn = sampling_study.sample(loaded, prompts, 1, sampling_study.METHODS["euler, guidance interval"], options, 8)
    # σ_EDM = t / (1 − t) on the 8 Euler times 1, 7/8, ..., 1/8 (plus the shift-free grid's 1/1000 offset): guided
    # above 0.28, i.e. t > 0.219: 6 of the 8 steps run [uncond; cond], 2 run cond alone.
    assert drawn["nfe"] == 8 and drawn["unet_evaluations_per_image"] == 6 * 2 + 2
    again = pipe(
        prompts, num_inference_steps=8, output_type="pt", guider=IntervalGuidance(5.0, 0.28, np.inf),
        generator=[torch.Generator().manual_seed(100_000 + i) for i in range(2)],
    ).images  # fmt: skip
    assert np.allclose(drawn["images"].numpy(), again.float().numpy())


def test_a_student_cell_draws_with_the_students_unet_unguided_on_equal_steps_to_zero():
    import copy

    import torch

    from hf_scratch import default_model_path
    from hf_scratch.pipelines import ScratchStableDiffusionPipeline

    pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    student = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        student.conv_out.bias.add_(0.3)  # any other U-Net
    shipped = pipe.unet
    loaded = {"pipe": pipe, "scheduler_config": dict(pipe.scheduler.config), "guides": {}, "schedules": {},
              "students": {"reflow full": student}}  # fmt: skip
    prompts = ["red heart, twemoji style", "rocket, noto style"]
    method = sampling_study.METHODS["reflow full, euler"]
    drawn = sampling_study.sample(loaded, prompts, 1, method, dict(method.options), 2)
    assert pipe.unet is shipped
    assert drawn["nfe"] == 2 and drawn["unet_evaluations_per_image"] == 2  # one conditional evaluation per step
    pipe.unet = student
    again = pipe(
        prompts, sigmas=[1.0, 0.5], guidance_scale=1.0, output_type="pt",
        generator=[torch.Generator().manual_seed(100_000 + i) for i in range(2)],
    ).images  # fmt: skip
    assert pipe.scheduler.sigmas.tolist() == [1.0, 0.5, 0.0]  # two Euler steps of equal length, the last to σ = 0
    assert np.allclose(drawn["images"].numpy(), again.float().numpy())
