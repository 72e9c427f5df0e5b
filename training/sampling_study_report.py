"""docs/sampling_study.md and docs/sampling_study.png from the sampling study's results (`sampling_study.py report`).

A cell's figure is the mean over sampling seeds with its spread (min to max). A method beats another at the same NFE
only when its worst seed is better than the other's best seed, on every split: `compare` says "better", "worse" or
"within the spread".
"""

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

FIGURES = (("kid_x1e3", "KID ×10³"), ("fd", "Fréchet distance"))


def seeds_of(cells: dict, method: str, nfe: int, split: str, figure: str = "kid_x1e3") -> list[float]:
    return [
        cell[figure]
        for cell in cells.values()
        if (cell["method"], cell["nfe_target"], cell["split"]) == (method, nfe, split)
    ]


def cost_of(cells: dict, method: str, nfe: int) -> dict:
    """NFE, U-Net sample-evaluations and seconds per image of one method at one NFE target (means over cells)."""
    chosen = [cell for cell in cells.values() if (cell["method"], cell["nfe_target"]) == (method, nfe)]
    return {
        name: float(np.mean([cell[name] for cell in chosen]))
        for name in ("nfe", "unet_evaluations_per_image", "seconds_per_image")
    }


def compare_cells(cells: dict, method: str, nfe: int, other: str, other_nfe: int, splits: list[str]) -> str | None:
    """The verdict on KID of (method, NFE) against (other, other NFE): "better", "worse" or "within the spread";
    None where a cell is missing."""
    verdicts = set()
    for split in splits:
        ours, theirs = seeds_of(cells, method, nfe, split), seeds_of(cells, other, other_nfe, split)
        if not ours or not theirs:
            return None
        verdicts.add("better" if max(ours) < min(theirs) else "worse" if min(ours) > max(theirs) else "within")
    return verdicts.pop() if len(verdicts) == 1 and "within" not in verdicts else "within the spread"


def compare(cells: dict, method: str, baseline: str, nfe: int, splits: list[str]) -> str | None:
    """`compare_cells` against `baseline` at the same NFE."""
    return compare_cells(cells, method, nfe, baseline, nfe, splits)


def summary(cells: dict, methods: list[str], baseline: str, today: tuple[str, int] | None, splits: list[str]) -> list:
    """The best method at each NFE (mean KID over splits and seeds) with its verdict against plain CFG, and the
    (method, NFE) cells at or below today's default's U-Net evaluations that beat it beyond the spread."""
    lines = ["## Verdict", ""]
    nfes = sorted({cell["nfe_target"] for cell in cells.values()})

    def mean_kid(method: str, nfe: int) -> float | None:
        values = [v for split in splits for v in seeds_of(cells, method, nfe, split)]
        complete = all(seeds_of(cells, method, nfe, split) for split in splits)
        return float(np.mean(values)) if complete else None

    for nfe in nfes:
        scored = [(mean_kid(name, nfe), name) for name in methods]
        scored = sorted((kid, name) for kid, name in scored if kid is not None)
        if not scored:
            continue
        kid, best = scored[0]
        against = compare(cells, best, baseline, nfe, splits)
        verdict = f" ({against} against plain CFG)" if against else " (plain CFG has no cell at this NFE)"
        verdict = "" if best == baseline else verdict
        lines.append(f"- NFE {nfe}: best **{best}**, KID ×10³ {kid:.2f}{verdict}.")
    if today and mean_kid(*today) is not None:
        budget = cost_of(cells, *today)["unet_evaluations_per_image"]
        winners = []
        for name in methods:
            for nfe in nfes:
                kid = mean_kid(name, nfe)
                if kid is None or cost_of(cells, name, nfe)["unet_evaluations_per_image"] > budget:
                    continue
                if compare_cells(cells, name, nfe, *today, splits) == "better":
                    winners.append((kid, name, nfe))
        lines.append(
            f"- Today's default, {today[0]} at NFE {today[1]} ({budget:.0f} U-Net sample-evaluations per image): "
            f"KID ×10³ {mean_kid(*today):.2f}. Beating it beyond the spread at no more evaluations: "
            + (", ".join(f"{name} at NFE {nfe} ({kid:.2f})" for kid, name, nfe in sorted(winners)) or "nothing")
            + "."
        )
    return lines + [""]


def _cell_text(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def write_report(
    results: dict,
    methods: dict,
    baseline: str,
    out_stem: Path,
    today: tuple[str, int] | None = None,
    shipped: str | None = None,
) -> None:
    cells = results["cells"]
    splits = sorted({cell["split"] for cell in cells.values()}, key=lambda s: ("validation", "train").index(s))
    present = [name for name in methods if any(cell["method"] == name for cell in cells.values())]
    nfes = sorted({cell["nfe_target"] for cell in cells.values()})
    seeds = sorted({cell["seed"] for cell in cells.values()})
    lines = [
        "# Sampling study: solvers, guidance and schedules for the shipped flow model",
        "",
        "Written by `python training/sampling_study.py report` from [sampling_study.json](sampling_study.json), which",
        "`tune` and `run` filled (see the script's docstring for the design). Model `hf_scratch/pretrained/emoji32`;",
        f"splits {', '.join(splits)}, sampling seeds {', '.join(map(str, seeds))}; KID ×10³ is the unbiased squared",
        "MMD over all pairs of EfficientNet-lite0 features of the generated and the true images of the same prompts",
        "(lower is better); each cell is the mean over seeds (min–max).",
        "",
    ]
    if results.get("floor"):
        floor = ", ".join(
            f"{split} {results['floor'][split]['kid_x1e3']:.2f}" for split in splits if split in results["floor"]
        )
        lines += [f"Floor (true images against true images, two disjoint halves): KID ×10³ {floor}.", ""]
    lines += summary(cells, present, baseline, today, splits)
    if shipped:
        lines += ["## What ships", ""]
        for paragraph in shipped.split("\n\n"):
            lines += [*textwrap.wrap(paragraph, width=118), ""]
    for figure, title in FIGURES:
        for split in splits:
            lines += [
                f"## {title}, {split}",
                "",
                "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                "|---" * (len(nfes) + 1) + "|",
            ]
            for name in present:
                row = [_cell_text(seeds_of(cells, name, n, split, figure)) for n in nfes]
                lines.append(f"| {name} | " + " | ".join(row) + " |")
            lines.append("")
    lines += [
        "## Against plain CFG (Euler, tuned scale) at the same NFE",
        "",
        "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---" * (len(nfes) + 1) + "|",
    ]
    for name in present:
        if name == baseline:
            continue
        lines.append(f"| {name} | " + " | ".join(compare(cells, name, baseline, n, splits) or "–" for n in nfes) + " |")
    lines += [
        "",
        "## Cost per image",
        "",
        "| method | NFE target | U-Net calls | U-Net sample-evaluations | seconds |",
        "|---|---|---|---|---|",
    ]
    for name in present:
        for n in nfes:
            if seeds_of(cells, name, n, splits[0]):
                cost = cost_of(cells, name, n)
                lines.append(
                    f"| {name} | {n} | {cost['nfe']:.0f} | {cost['unet_evaluations_per_image']:.0f} "
                    f"| {cost['seconds_per_image']:.3f} |"
                )
    if results.get("adherence"):
        lines += [
            "",
            "## Prompt adherence (sampling seed 0)",
            "",
            *textwrap.wrap(
                "KID compares sets of images, so a sampler can come closer to the true images as a whole while "
                "drawing each prompt's own emoji less often. Here, per image: the emoji32 judge CLIP's retrieval of "
                "its caption among all captions of the split (top-1 / top-5), and, independently of the model "
                "family, whether its nearest true images on the EfficientNet-lite0 features include its own "
                "prompt's (top-1 / top-5, among the true images of all the prompts; chance k / N). One seed: a "
                "rate's binomial standard error is about 0.03.",
                width=118,
            ),
            "",
            "| method | NFE | "
            + " | ".join(f"{split}: judge top-1 / top-5 | {split}: own image top-1 / top-5" for split in splits)
            + " |",
            "|---|---" + "|---|---" * len(splits) + "|",
        ]
        pairs = {tuple(key.split(" | ")[:2]) for key in results["adherence"]}
        keys = [f"{name} | {nfe}" for name, nfe in sorted(pairs, key=lambda p: (list(methods).index(p[0]), int(p[1])))]
        for key in keys:
            name, nfe = key.split(" | ")
            row = []
            for split in splits:
                entry = results["adherence"].get(f"{key} | {split}")
                row += (
                    ["–", "–"]
                    if entry is None
                    else [
                        f"{entry['judge_top1']:.3f} / {entry['judge_top5']:.3f}",
                        f"{entry['own_top1']:.3f} / {entry['own_top5']:.3f}",
                    ]
                )
            lines.append(f"| {name} | {nfe} | " + " | ".join(row) + " |")
    if results.get("tune"):
        lines += [
            "",
            "## Tuning (Euler, NFE 8, seed 0, prompts disjoint from the study's)",
            "",
            "| kind | options | KID ×10³ (mean of splits) |",
            "|---|---|---|",
        ]
        for entry in sorted(results["tune"].values(), key=lambda e: (e["kind"], e["kid_x1e3"])):
            lines.append(
                f"| {entry['kind']} | `{json.dumps(entry['options'], sort_keys=True)}` | {entry['kid_x1e3']:.2f} |"
            )
    out_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(cells, present, splits, nfes, out_stem.with_suffix(".png"))


def plot(cells: dict, methods: list[str], splits: list[str], nfes: list[int], path: Path) -> None:
    """KID and FD against NFE, one line per method, the band spanning the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(FIGURES), len(splits), figsize=(6 * len(splits), 4.5 * len(FIGURES)), squeeze=False)
    palette = plt.get_cmap("tab20")
    colours: dict[str, Any] = {method: palette(index % 20) for index, method in enumerate(methods)}
    for row, (name, title) in enumerate(FIGURES):
        for column, split in enumerate(splits):
            axis = axes[row][column]
            for method in methods:
                points = [(n, seeds_of(cells, method, n, split, name)) for n in nfes]
                points = [(n, values) for n, values in points if values]
                if not points:
                    continue
                x = [n for n, _ in points]
                line = axis.plot(
                    x, [np.mean(v) for _, v in points], marker="o", label=method, color=colours.get(method)
                )[0]
                axis.fill_between(
                    x, [min(v) for _, v in points], [max(v) for _, v in points], alpha=0.2, color=line.get_color()
                )
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(nfes, [str(n) for n in nfes])
            axis.set_xlabel("network evaluations (NFE)")
            axis.set_ylabel(title)
            axis.set_title(f"{title}, {split}")
            axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
