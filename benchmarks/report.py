"""Writing the results: a JSON file with every raw timing, and BENCHMARKS.md with a section per CPU kind (the machine,
one table, the targets); rows of different CPU kinds are never compared.

BENCHMARKS.md is regenerated on each run, except the hand-written part between `<!-- notes -->` and
`<!-- /notes -->` (what was tried and why), which is carried over from the previous file.
"""

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .rows import Row

NOTES_PATTERN = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.DOTALL)
PEERS = ("diffusers bf16", "diffusers + bf16 autocast", "OpenVINO fp32", "OpenVINO bf16", "ONNX Runtime fp32")
CPUS = ("any", "native_bf16", "no_native_bf16")


@dataclass(frozen=True)
class Target:
    """A goal on the ratio ours / diffusers of one case (or, when `absolute`, on our figure itself, in the row's
    unit), met by the best of our variants, and ahead of each of `peers` measured; for the CPUs `cpus` names."""

    case: str
    goal: str
    bound: float
    higher_is_better: bool = False
    peers: tuple[str, ...] = ()
    absolute: bool = False
    cpus: str = "any"  # one of CPUS: a CPU that computes bfloat16 natively, one that does not, or both


TARGETS = (
    Target(
        "unet_512",
        "U-Net step at 512 px <= 0.75x diffusers, ahead of OpenVINO and ONNX Runtime",
        0.75,
        peers=("OpenVINO fp32", "ONNX Runtime fp32"),
        cpus="no_native_bf16",
    ),  # fmt: skip
    Target(
        "unet_512",
        "U-Net step at 512 px <= 0.55x diffusers fp32, no slower than diffusers bf16",
        0.55,
        peers=("diffusers bf16",),
        cpus="native_bf16",
    ),  # fmt: skip
    Target("vae_decode_512", "VAE decode at 512 px <= 0.9x diffusers", 0.9),
    Target("generate_512_memory", "peak RSS of a 512 px generation <= 1.0x diffusers", 1.0),
    Target("train_step", "training throughput >= 1.2x diffusers", 1.2, True),
    Target("train_step_emoji32", "training throughput at the emoji32 recipe's config >= 1.2x diffusers", 1.2, True),
    Target("generate_emoji32", "one 20-step emoji32 image <= 0.25 s", 0.25, absolute=True),
)


def targets_for(native_bf16: bool) -> list[Target]:
    """The targets of a CPU kind."""
    return [t for t in TARGETS if t.cpus in ("any", "native_bf16" if native_bf16 else "no_native_bf16")]


def row_dict(row: Row) -> dict[str, Any]:
    return {**asdict(row), "ratio": row.ratio}


def _cautious_ratio(row: Row, target: Target) -> float:
    """The worse of the row's interleaved ratio and its ratio against diffusers' eager-phase median, when recorded;
    the row's own figure for an absolute target."""
    if target.absolute:
        return row.value
    ratios = [row.ratio, row.extra.get("ratio_vs_eager_phase", row.ratio)]
    return min(ratios) if target.higher_is_better else max(ratios)


def check_targets(rows: list[Row], native_bf16: bool = False) -> list[dict[str, Any]]:
    """Each target of the CPU kind of `rows` with the best ratio of our variants, the variant that reached it, the
    ratios of the case's peers, and whether it was met."""
    checks = []
    for target in targets_for(native_bf16):
        ours = [row for row in rows if row.case == target.case and row.variant not in PEERS]
        if not ours:  # a target stays in the table, unmeasured, until a run measures it
            checks.append({"case": target.case, "goal": target.goal, "best_variant": None, "ratio": None,
                           "peer_ratios": {}, "met": None})  # fmt: skip
            continue
        pick = max if target.higher_is_better else min
        best = pick(ours, key=lambda row: _cautious_ratio(row, target))
        ratio = _cautious_ratio(best, target)
        met = ratio >= target.bound if target.higher_is_better else ratio <= target.bound
        peers = {
            row.variant: _cautious_ratio(row, target)
            for row in rows
            if row.case == target.case and row.variant in PEERS
        }
        beaten = [peers[name] for name in target.peers if name in peers]
        met = met and all(ratio >= r if target.higher_is_better else ratio <= r for r in beaten)
        checks.append(
            {"case": target.case, "goal": target.goal, "best_variant": best.variant, "ratio": ratio,
             "peer_ratios": peers, "met": met, "absolute": target.absolute}
        )  # fmt: skip
    return checks


def _format(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.2f} {unit}"


def _notes(row: Row) -> str:
    parts = []
    if "setup_s" in row.extra:
        parts.append(f"set-up + first call {row.extra['setup_s']:.0f} s")
    if "compile_s" in row.extra:
        parts.append(f"compile + first call {row.extra['compile_s']:.0f} s")
    if "convert_and_first_run_s" in row.extra:
        parts.append(f"convert + first call {row.extra['convert_and_first_run_s']:.0f} s")
    if "ratio_vs_eager_phase" in row.extra:
        parts.append(f"{row.extra['ratio_vs_eager_phase']:.3f} against diffusers' eager-phase median")
    for key, label in (("rel_err_vs_eager", "rel. err vs eager"), ("rel_err_vs_diffusers", "rel. err vs diffusers")):
        if key in row.extra:
            parts.append(f"{label} {row.extra[key]:.1e}")
    if "loadavg" in row.extra:
        parts.append(f"load {row.extra['loadavg']:.1f}")
    return "; ".join(parts)


def _section(kind: str, machine: dict[str, Any], rows: list[Row]) -> list[str]:
    """One CPU kind: its machine and run, the table of its rows, and its targets."""
    settings = machine.get("settings", {})
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    load = " / ".join(f"{value:.1f}" for value in machine["loadavg_start"])
    flags = ", ".join(machine["cpu_flags"]) if "cpu_flags" in machine else "not recorded"
    native = machine.get("native_bf16", False)
    lines = [
        f"## {kind}", "",
        f"- **Machine**: {machine['cpu']}, {machine['cores']} cores ({machine['threads']} torch threads), "
        f"{machine['ram_gib']} GiB RAM, torch CPU capability {machine['cpu_capability']}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else ""),
        f"- **bfloat16**: {'computed natively' if native else 'not native (emulated through float32)'}; "
        f"flags: {flags}",
        f"- **Run**: {machine['date']}, size `{settings.get('size')}`, device `{settings.get('device')}`, dtype "
        f"`{settings.get('dtype')}`, {settings.get('warmup')} warm-up + {settings.get('repeats')} timed repeats",
        f"- **Load average** (1/5/15 min) at start: {load}; at end: "
        + " / ".join(f"{value:.1f}" for value in machine["loadavg_end"]),
        f"- **Versions**: Python {machine['python']}, {versions}",
        "",
        "| case | what | variant | ours | diffusers | ours / diffusers | notes |",
        "|---|---|---|---:|---:|---:|---|",
    ]  # fmt: skip
    for row in rows:
        lines.append(
            f"| `{row.case}` | {row.description} | {row.variant} | {_format(row.value, row.unit)} | "
            f"{_format(row.reference, row.unit)} | {row.ratio:.3f} | {_notes(row)} |"
        )
    lines += [
        "", "### Targets", "",
        "Each ratio is the worse of the variant's interleaved one and the one against diffusers' eager-phase median.",
        "", "| target | best variant | ratio | met |", "|---|---|---:|---|",
    ]  # fmt: skip
    for check in check_targets(rows, native):
        if check["ratio"] is None:
            lines.append(f"| {check['goal']} | – | – | not measured yet |")
            continue
        peers = "".join(f"; {name} {ratio:.3f}" for name, ratio in check["peer_ratios"].items())
        ratio = f"{check['ratio']:.3f}" + (" (absolute)" if check["absolute"] else "")
        lines.append(
            f"| {check['goal']} | {check['best_variant']} | {ratio}{peers} | {'yes' if check['met'] else 'no'} |"
        )
    return lines + [""]


def markdown(machines: dict[str, dict[str, Any]], rows: list[Row], notes: str) -> str:
    """BENCHMARKS.md: the method, then a section per CPU kind of `machines` (in their order), then the notes."""
    lines = [
        "# Benchmarks: hf-scratch against diffusers, side by side",
        "",
        "Generated by `python -m benchmarks` (see `python -m benchmarks --help`); rerun it to refresh this file.",
        "Ours and diffusers' run in the same process on the same weights and inputs, repeats interleaved",
        "(ours, diffusers, ours, ...), after warm-up; each figure is a median. Memory rows run each side in a fresh",
        "process. Ratios are ours / diffusers: below 1 is better for seconds and GiB, above 1 for samples/s.",
        "Each CPU kind has its own section; rows of different CPUs are never compared. A bf16 variant is timed against",
        "diffusers in float32 (the run's dtype); `diffusers bf16` is diffusers' U-Net cast to bfloat16, as its users",
        "do it.",
        "",
    ]
    for kind, machine in machines.items():
        lines += _section(kind, machine, [row for row in rows if row.extra.get("cpu_kind") == kind])
    lines += [notes, ""]
    return "\n".join(lines)


def write(machine: dict[str, Any], machines: dict[str, dict[str, Any]], settings: dict[str, Any], rows: list[Row],
          markdown_path: Path | None, json_path: Path | None) -> None:  # fmt: skip
    """Writes the JSON results and BENCHMARKS.md (keeping its hand-written notes). `machine` and `settings` are this
    run's; `machines` holds every CPU kind of `rows`, each with the settings of its run."""
    for row in rows:
        if not (row.value > 0 and row.reference > 0 and math.isfinite(row.ratio)):
            raise ValueError(f"row {row.case} / {row.variant} has a non-positive or non-finite figure: {row}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        targets = [
            {**check, "cpu_kind": kind}
            for kind, info in machines.items()
            for check in check_targets([row for row in rows if row.extra.get("cpu_kind") == kind],
                                       info.get("native_bf16", False))
        ]  # fmt: skip
        payload = {"machine": machine, "settings": settings, "machines": machines,
                   "rows": [row_dict(row) for row in rows], "targets": targets}  # fmt: skip
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
    if markdown_path is not None:
        previous = markdown_path.read_text() if markdown_path.exists() else ""
        found = NOTES_PATTERN.search(previous)
        notes = found.group(0) if found else "<!-- notes -->\n<!-- /notes -->"
        markdown_path.write_text(markdown(machines, rows, notes))
