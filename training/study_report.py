"""docs/study.md and docs/study.png from the objectives study's results (docs/study.json, written by study.py).

Every figure is a mean over seeds followed by its spread (max − min over seeds) in parentheses. The verdict compares
each arm with the baseline A0 on the primary metric, judge top-5 averaged over the three splits at the end of training
with 20 sampler steps: an arm wins only when its mean beats the baseline's by more than the larger of the two spreads.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from hf_scratch.data.emoji import SPLITS

SPLIT_NAMES = {"train": "train", "validation": "val", "heldout_style": "heldout"}


@dataclass(frozen=True)
class StudyDesign:
    """What the report needs of the study's design (`study.DESIGN`): each arm's description, in table order, the
    baseline arm, and the sampler steps of the primary metric."""

    arms: dict[str, str]
    baseline: str
    sampler_steps: int


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), max(values) - min(values)


def _cell(values: list[float], digits: int = 3) -> str:
    mean, spread = _mean_spread(values)
    return f"{mean:.{digits}f} ({spread:.{digits}f})" if len(values) > 1 else f"{mean:.{digits}f}"


def _by_arm(results: dict, design: StudyDesign) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for run in results["runs"].values():
        runs.setdefault(run["arm"], []).append(run)
    return {arm: sorted(runs[arm], key=lambda run: run["seed"]) for arm in design.arms if arm in runs}


def _score(run: dict, step: str, split: str, steps: int, metric: str) -> float:
    return run["checkpoints"][step][split][str(steps)][metric]


def _split_mean(run: dict, step: str, steps: int, metric: str) -> float:
    return sum(_score(run, step, split, steps, metric) for split in SPLITS) / len(SPLITS)


def _last(run: dict) -> str:
    return str(max(int(step) for step in run["checkpoints"]))


def verdict(by_arm: dict[str, list[dict]], design: StudyDesign) -> tuple[str, list[str]]:
    """The one-sentence verdict and the per-arm comparison lines."""
    baseline = design.baseline
    if baseline not in by_arm:
        return "no verdict: the baseline has not run", []
    primary = {
        arm: [_split_mean(run, _last(run), design.sampler_steps, "top5") for run in runs]
        for arm, runs in by_arm.items()
    }
    base_mean, base_spread = _mean_spread(primary[baseline])
    lines, winners = [], []
    for arm, values in primary.items():
        if arm == baseline:
            continue
        mean, spread = _mean_spread(values)
        margin = max(spread, base_spread)
        difference = mean - base_mean
        if len(values) < 2 or len(primary[baseline]) < 2:
            status = "not judged yet: one of the two arms has a single seed"
        elif difference > margin:
            status = "**beats the baseline**"
        elif difference < -margin:
            status = "worse than the baseline"
        else:
            status = "within the spread (tie)"
        beats = status == "**beats the baseline**"
        lines.append(
            f"- {arm} vs {baseline}: {mean:.3f} − {base_mean:.3f} = {difference:+.3f}, "
            f"seed spread {margin:.3f}: {status}"
        )
        if beats:
            winners.append((mean, arm))
    ranked = sorted(((sum(v) / len(v), arm) for arm, v in primary.items()), reverse=True)
    if len(ranked) >= 2:
        (first, a), (second, b) = ranked[:2]
        spread = max(_mean_spread(primary[a])[1], _mean_spread(primary[b])[1])
        seeds = (len(primary[a]), len(primary[b]))
        if min(seeds) >= 2 and max(seeds) < 3 and first - second < 2 * spread:
            lines.append(
                f"- the top two, {a} and {b}, are closer ({first - second:.3f}) than twice their seed spread "
                f"({2 * spread:.3f}): a third seed is due (`python training/study.py run --seeds 2 --arms {a} {b}`)"
            )
    if not winners:
        return f"tie: no arm beats the baseline {baseline} by more than the seed spread", lines
    winners.sort(reverse=True)
    best_mean, best = winners[0]
    sentence = f"{best} ({design.arms[best]}) wins: it beats the baseline {baseline} by more than the seed spread"
    close = [
        arm for mean, arm in winners[1:]
        if best_mean - mean <= max(_mean_spread(primary[best])[1], _mean_spread(primary[arm])[1])
    ]  # fmt: skip
    if close:
        sentence += f"; {', '.join(close)} also {'does' if len(close) == 1 else 'do'}, within the seed spread of {best}"
    return sentence, lines


def markdown(results: dict, design: StudyDesign) -> str:
    by_arm = _by_arm(results, design)
    runs = [run for arm_runs in by_arm.values() for run in arm_runs]
    if not runs:
        return "# Objectives study\n\nNo run has finished yet.\n"
    first = runs[0]
    last = _last(first)
    sentence, comparisons = verdict(by_arm, design)

    def end_table(steps: int) -> str:
        header = ["arm", "objective", "seeds"] + [f"top-5 {SPLIT_NAMES[s]}" for s in SPLITS]
        header += ["top-5 mean", "Fréchet mean", "PSNR train"]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm, arm_runs in by_arm.items():
            cells = [arm, design.arms[arm], str(len(arm_runs))]
            cells += [_cell([_score(r, _last(r), s, steps, "top5") for r in arm_runs]) for s in SPLITS]
            cells.append(_cell([_split_mean(r, _last(r), steps, "top5") for r in arm_runs]))
            cells.append(_cell([_split_mean(r, _last(r), steps, "frechet_clip") for r in arm_runs]))
            cells.append(_cell([_score(r, _last(r), "train", steps, "psnr") for r in arm_runs], 2))
            rows.append("| " + " | ".join(cells) + " |")
        ceiling = first["ceiling"]
        for source in ("true", "vae"):
            cells = [f"ceiling ({source} images)", "", ""]
            cells += [f"{ceiling[s][source]['top5']:.3f}" for s in SPLITS]
            cells.append(f"{sum(ceiling[s][source]['top5'] for s in SPLITS) / len(SPLITS):.3f}")
            fd = [ceiling[s][source]["frechet_clip"] for s in SPLITS]
            cells.append("0 by definition" if None in fd else f"{sum(fd) / len(fd):.3f}")
            psnr = ceiling["train"][source]["psnr"]
            cells.append("–" if psnr is None else f"{psnr:.2f}")
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    curve_header = ["arm"] + [f"step {step}" for step in sorted(first["checkpoints"], key=int)]
    curve = ["| " + " | ".join(curve_header) + " |", "|" + "---|" * len(curve_header)]
    for arm, arm_runs in by_arm.items():
        cells = [arm]
        for step in sorted(first["checkpoints"], key=int):
            top5 = _cell([_split_mean(r, step, design.sampler_steps, "top5") for r in arm_runs])
            fd = _cell([_split_mean(r, step, design.sampler_steps, "frechet_clip") for r in arm_runs])
            cells.append(f"{top5} / {fd}")
        curve.append("| " + " | ".join(cells) + " |")

    cost = ["| arm | training s per run | samples/s | evaluation s per run | final loss |", "|---|---|---|---|---|"]
    for arm, arm_runs in by_arm.items():
        cost.append(
            f"| {arm} | {_cell([r['train_seconds'] for r in arm_runs], 0)}"
            f" | {_cell([r['samples_per_s'] for r in arm_runs], 1)}"
            f" | {_cell([r['eval_seconds'] for r in arm_runs], 0)} | {_cell([r['final_loss'] for r in arm_runs])} |"
        )
    prompts_end = first["checkpoints"][last]["train"]["20"]["prompts"]
    prompts_mid = first["checkpoints"][min(first["checkpoints"], key=int)]["train"]["20"]["prompts"]
    flags = "\n".join(f"| {arm} | `{' '.join(runs[0]['flags'])}` |" for arm, runs in by_arm.items())
    return f"""# Objectives study

Which training objective gives the best small latent-diffusion model at equal compute? Every run trains the shipped
model's U-Net configuration (7.2M parameters, 8×8×4 latents) for {first["steps"]} steps of batch 64 from the same
initialisation and data order (fixed by the seed), on emoji32 v1's frozen VAE and text encoder (the shipped model up
to commit 6ad70cb) with cached latents, with the same learning rate, schedule and EMA; only the objective differs.
Two runs trained at a time, one thread each
(`python training/study.py run`; this file comes from `python training/study.py report`).

Metrics are emoji-bench's, judged by the shipped `emoji32-judge`: top-5 is the share of generated images whose prompt
is among the judge's five best captions of the whole split, the Fréchet distance is on the judge's image embeddings
(lower is better), PSNR is against the true emoji. Each arm samples with its own sampler (ε and v: DPM-Solver++ 2M;
EDM: diffusers' EDM DPM-Solver++ 2M; flow matching: Euler), guidance 4. End points use {prompts_end} prompts per split,
the 1/3 and 2/3 points {prompts_mid}. Figures are the mean over seeds, then (max − min over seeds).

**Verdict: {sentence}.**

{chr(10).join(comparisons)}

## End of training, 20 sampler steps

{end_table(20)}

## End of training, 10 sampler steps

{end_table(10)}

## Learning curves (20 steps): mean top-5 / mean Fréchet distance

{chr(10).join(curve)}

![learning curves](study.png)

## Cost

Training seconds are the optimizer steps' wall time (steps × batch / samples/s, the assignment of immiscible noise
included; caching the latents, the same for every arm, is not). The runs shared the machine two at a time, and for
part of the study with development and test work as well: these seconds show the order of the cost, not a benchmark.

{chr(10).join(cost)}

## Flags of each arm (besides the shared recipe in `training/study.py`)

| arm | flags |
|---|---|
{flags}
"""


def plot(results: dict, path: Path, design: StudyDesign) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = _by_arm(results, design)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, arm_runs in by_arm.items():
        steps = sorted(arm_runs[0]["checkpoints"], key=int)
        x = [int(step) for step in steps]
        for axis, metric in zip(axes, ("top5", "frechet_clip")):
            per_seed = [[_split_mean(run, step, design.sampler_steps, metric) for step in steps] for run in arm_runs]
            mean = [sum(values) / len(values) for values in zip(*per_seed)]
            (line,) = axis.plot(x, mean, marker="o", label=f"{arm}: {design.arms[arm]}")
            if len(per_seed) > 1:
                axis.fill_between(x, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                                  color=line.get_color(), alpha=0.15)  # fmt: skip
    axes[0].set(xlabel="training step", ylabel="judge top-5 (mean of 3 splits)", title="higher is better")
    axes[1].set(xlabel="training step", ylabel="Fréchet distance, CLIP (mean of 3 splits)", title="lower is better")
    axes[0].legend(fontsize=7)
    figure.suptitle(
        "Objectives at equal compute (20 sampler steps; band: min–max over seeds; "
        "the last point on 128 prompts per split, the others on 64)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results_path: Path, markdown_path: Path, plot_path: Path, design: StudyDesign) -> None:
    results = json.loads(results_path.read_text())
    markdown_path.write_text(markdown(results, design))
    if results["runs"]:
        plot(results, plot_path, design)
