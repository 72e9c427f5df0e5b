"""Interleaved wall-clock timing, per-process peak memory, and a description of the machine.

On a shared machine the load drifts over a run, so the harness never times one implementation's repeats in a block:
it runs warm-ups, then alternates `ours, reference, ours, reference, ...` and compares medians. The ratio of two
medians taken that way stays meaningful when the absolute figures do not.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch


def synchronize(device: str) -> None:
    """Waits for queued kernels, so a timer read after it covers the work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call of `fn` takes."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Times each of `fns` `repeats` times, alternating between them, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_gib() -> float:
    """This process's peak resident set size so far, in GiB (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(task: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Runs `benchmarks.child` on `task` in a fresh interpreter and returns the JSON it prints last.

    A fresh process is the only clean way to read one workload's peak memory: `ru_maxrss` never goes down, and freed
    memory is not always returned to the system.
    """
    task = {"threads": torch.get_num_threads(), **task}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", json.dumps(task)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark child {task} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# The instruction-set flags that decide which dtype is fast, recorded with every run (torch.cpu.get_capabilities names).
RECORDED_CPU_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_kind(machine: dict[str, Any]) -> str:
    """The CPU kind a run's rows belong to: the model name and whether it computes bfloat16 natively. Rows of
    different kinds are never compared. A machine recorded before the flags were (the Intel Xeon rows of the first
    runs) has no `native_bf16`, and had none."""
    return f"{machine['cpu']}, {'native' if machine.get('native_bf16') else 'no native'} bfloat16"


def machine_info(device: str) -> dict[str, Any]:
    """CPU (model, flags, whether bfloat16 is native), cores, RAM, accelerator, library versions, date and load
    average, for the report header."""
    from hf_scratch.fast import cpu_computes_bf16

    capabilities = torch.cpu.get_capabilities()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "native_bf16": cpu_computes_bf16(),
        "cpu_flags": [flag for flag in RECORDED_CPU_FLAGS if capabilities.get(flag, False)],
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "ram_gib": round(_total_ram_gib(), 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": list(os.getloadavg()),
        "versions": {
            name: _version(name)
            for name in ("torch", "diffusers", "transformers", "hf-scratch", "openvino", "onnxruntime", "onnxscript")
        },
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
