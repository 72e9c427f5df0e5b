"""The objectives study's report: the verdict rule (a winner must beat the baseline by more than the seed spread), the
tables and the plot, on hand-made results."""

import json
import sys
from pathlib import Path

from hf_scratch.data.emoji import SPLITS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import study_report  # noqa: E402
from study import DESIGN, STEP_COUNTS  # noqa: E402


def fake_run(arm: str, seed: int, top5: float, frechet: float = 0.2) -> dict:
    scores = {"prompts": 4, "top1": top5 / 2, "top5": top5, "frechet_clip": frechet, "psnr": 10.0, "ssim": 0.3}
    checkpoint = {split: {str(steps): dict(scores) for steps in STEP_COUNTS} for split in SPLITS}
    ceiling = {split: {"true": {**scores, "top5": 0.9, "frechet_clip": None, "psnr": None},
                       "vae": {**scores, "top5": 0.6}} for split in SPLITS}  # fmt: skip
    return {
        "arm": arm, "seed": seed, "flags": ["--objective", "x"], "steps": 30, "train_seconds": 10.0,
        "eval_seconds": 2.0, "samples_per_s": 50.0, "final_loss": 0.1, "loss_curve": [[1, 1.0]],
        "checkpoints": {"10": checkpoint, "20": checkpoint, "30": checkpoint}, "ceiling": ceiling,
    }  # fmt: skip


def verdict_of(results: dict) -> tuple[str, list[str]]:
    return study_report.verdict(study_report._by_arm(results, DESIGN), DESIGN)


def results(scores: dict[str, list[float]]) -> dict:
    return {
        "runs": {
            f"{arm}-s{seed}": fake_run(arm, seed, top5)
            for arm, values in scores.items()
            for seed, top5 in enumerate(values)
        }
    }


def test_a_winner_must_beat_the_baseline_by_more_than_the_seed_spread():
    sentence, lines = verdict_of(results({"A0": [0.30, 0.32], "A4": [0.40, 0.42]}))
    assert sentence.startswith("A4 (flow matching") and "beats the baseline A0" in sentence
    sentence, lines = verdict_of(results({"A0": [0.30, 0.40], "A4": [0.38, 0.45]}))
    assert sentence.startswith("tie") and "within the spread (tie)" in lines[0]  # 0.065 apart, spread 0.10


def test_a_single_seed_is_never_judged():
    sentence, lines = verdict_of(results({"A0": [0.30], "A4": [0.90]}))
    assert sentence.startswith("tie") and "not judged yet" in lines[0]


def test_close_top_two_ask_for_a_third_seed_and_share_the_win():
    sentence, lines = verdict_of(results({"A0": [0.30, 0.31], "A3": [0.40, 0.44], "A4": [0.41, 0.45]}))
    assert sentence.startswith("A4") and "A3 also does, within the seed spread of A4" in sentence
    assert any("a third seed is due" in line and "--seeds 2 --arms A4 A3" in line for line in lines)


def test_report_writes_tables_and_a_plot(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(results({"A0": [0.3, 0.31], "A1": [0.35, 0.36]})))
    study_report.write_report(path, tmp_path / "study.md", tmp_path / "study.png", DESIGN)
    markdown = (tmp_path / "study.md").read_text()
    assert "| A1 | ε + min-SNR-5 (the shipped recipe) | 2 | 0.355 (0.010)" in markdown
    assert "| ceiling (true images) |" in markdown and "![learning curves](study.png)" in markdown
    assert (tmp_path / "study.png").stat().st_size > 10_000
