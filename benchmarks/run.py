"""The command line: `python -m benchmarks [--cases ...] [--size tiny|full] [--repeats N] [--out ...] [--json ...]`.

`--size tiny` runs every case on tiny configs in seconds (the test suite does this); `--size full` uses the Stable
Diffusion v1.5 architecture and takes tens of minutes on a 2-core CPU. `--device cuda --dtype float16` runs the same
cases on a GPU (see `benchmarks/gpu.sh`).
"""

import argparse
import gc
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .cases import CASES, FAST_PATHS
from .report import write
from .rows import Row, Settings
from .sizes import get_size
from .timing import cpu_kind, machine_info

logger = logging.getLogger("benchmarks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Times hf-scratch's models against diffusers' side by side."
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"cases to run (default: all): {', '.join(CASES)}")  # fmt: skip
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the cores this process may use)")  # fmt: skip
    parser.add_argument("--fast", nargs="*", choices=list(FAST_PATHS), default=list(FAST_PATHS), metavar="PATH",
                        help=f"hf_scratch.fast paths to time (default: all): {', '.join(FAST_PATHS)}")  # fmt: skip
    parser.add_argument("--no-fast", dest="fast", action="store_const", const=[], help="skip the hf_scratch.fast paths")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="skip the peers: diffusers in bfloat16, OpenVINO and ONNX Runtime")  # fmt: skip
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time ours and the peers computing in bfloat16 (default: on a CPU that computes it "
                        "natively, for --dtype float32)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="Markdown report to write, e.g. BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="JSON results to write, e.g. benchmarks/results.json")
    parser.add_argument(
        "--update", action="store_true", help="keep the rows of the --json file that this run does not measure again"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch.cuda.is_available() is False")
    if args.device == "cpu" and args.dtype == "float16":
        parser.error("--dtype float16 is a GPU setting; use float32 (or bfloat16) on the CPU")
    if args.bf16 is None:
        from hf_scratch.fast import cpu_computes_bf16

        args.bf16 = args.device == "cpu" and args.dtype == "float32" and cpu_computes_bf16()
    if args.bf16 and (args.device != "cpu" or args.dtype != "float32"):
        parser.error(f"--bf16 adds bfloat16 variants to a float32 CPU run; got --device {args.device} --dtype "
                     f"{args.dtype}")  # fmt: skip
    return args


def _add_eager_phase_ratios(rows: list[Row]) -> None:
    """Each variant's figure over diffusers' median in the eager phase of the same run of its case, in `extra`.

    A variant's own ratio uses the diffusers repeats interleaved with it. On this VM diffusers ran slower while a
    memory-hungry variant was alive (by 10-25%), which flatters that ratio; the target check takes the worse of the
    two ratios.
    """

    def phase(row: Row) -> tuple:
        return row.extra.get("cpu_kind"), row.case, row.extra.get("date")

    eager = {phase(row): row for row in rows if row.variant == "ours"}
    for row in rows:
        baseline = eager.get(phase(row))
        if row.variant != "ours" and baseline is not None and row.unit == baseline.unit:
            row.extra["ratio_vs_eager_phase"] = row.value / baseline.reference


def _merge(previous: list[dict], rows: list[Row]) -> list[Row]:
    """`rows`, plus each row of `previous` that they do not measure again (same CPU kind, case and variant), in case
    order."""

    def key(row: Row) -> tuple:
        return row.extra["cpu_kind"], row.case, row.variant

    kept = [Row(**{key: value for key, value in row.items() if key != "ratio"}) for row in previous]
    measured = {key(row) for row in rows}
    order = list(CASES)
    return sorted([row for row in kept if key(row) not in measured] + rows,
                  key=lambda row: order.index(row.extra["run_case"]))  # fmt: skip


def _previous_machines(kept: dict) -> dict[str, dict]:
    """The machines of a previous results file by CPU kind, with the settings of their runs; each of its rows gets
    its kind in `extra` (a file from before CPU kinds were recorded holds one machine and its rows)."""
    machines = dict(kept.get("machines", {}))
    if not machines and "machine" in kept:
        machines = {cpu_kind(kept["machine"]): {**kept["machine"], "settings": kept.get("settings", {})}}
        for row in kept.get("rows", []):
            row["extra"].setdefault("cpu_kind", cpu_kind(kept["machine"]))
    return machines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)  # our progress lines, without the exporters' INFO chatter
    torch.set_num_threads(args.threads)
    settings = Settings(
        size=get_size(args.size), device=args.device, dtype=getattr(torch, args.dtype), warmup=args.warmup,
        repeats=args.repeats, fast=tuple(args.fast), peers=args.peers, bf16=args.bf16,
    )  # fmt: skip
    machine = machine_info(args.device)
    recorded = {**asdict(settings), "size": args.size, "dtype": args.dtype, "threads": args.threads}
    kept = json.loads(args.json.read_text()) if args.update and args.json and args.json.exists() else {}
    machines = _previous_machines(kept)
    previous = kept.get("rows", [])
    kind = cpu_kind(machine)
    # Kept rows of this CPU kind may come from packages this run lacks (the peers): their versions stay in the header.
    for package, version in machines.get(kind, {}).get("versions", {}).items():
        if machine["versions"].get(package) is None:
            machine["versions"][package] = version
    machines[kind] = {**machine, "settings": recorded}
    rows: list[Row] = []
    for index, name in enumerate(args.cases):
        logger.info("case %s (load average %.1f)", name, os.getloadavg()[0])
        case_rows = CASES[name](settings)
        for row in case_rows:
            row.extra.update(run_case=name, loadavg=os.getloadavg()[0], date=time.strftime("%Y-%m-%d %H:%M"),
                             cpu_kind=kind)  # fmt: skip
            logger.info("  %s / %s: %.4g %s vs %.4g (ratio %.3f)", row.case, row.variant, row.value, row.unit,
                        row.reference, row.ratio)  # fmt: skip
        rows += case_rows
        torch._dynamo.reset()  # compiled graphs hold their own weight copies
        gc.collect()
        machine["loadavg_end"] = machines[kind]["loadavg_end"] = list(os.getloadavg())
        # Written after every case, so an interrupted run keeps what it measured.
        merged = _merge(previous, rows)
        _add_eager_phase_ratios(merged)  # pairs each variant with the eager row of its own phase (CPU, case, date)
        write(machine, machines, recorded, merged, args.out, args.json)
    return 0
