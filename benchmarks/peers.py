"""Peers on the U-Net row: diffusers' own U-Net in bfloat16, and other inference engines on diffusers' U-Net,
OpenVINO (fp32, and bf16 where the CPU computes it natively) and ONNX Runtime (fp32).

Each engine converts diffusers' U-Net once and then holds its own copy of the weights, so the engines run one after
another and each is freed before the next is built. An engine that is not installed, or fails to convert, is skipped
with a note rather than failing the run.
"""

import copy
import gc
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .rows import Row, Settings, relative_error
from .timing import interleaved, median

logger = logging.getLogger(__name__)


class _UNetTensorOutput(nn.Module):
    """diffusers' U-Net returning a plain tensor, the form that exporters trace."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, context, return_dict=False)[0]


def _openvino(
    unet: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, precision: str = "f32"
) -> Callable[[], np.ndarray]:
    import openvino as ov

    model = ov.convert_model(_UNetTensorOutput(unet), example_input=inputs)
    # The CPU plugin's INFERENCE_PRECISION_HINT: "bf16" runs the matrix products in bfloat16, inputs stay float32.
    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
    )
    del model
    request = compiled.create_infer_request()
    arrays = [tensor.numpy() for tensor in inputs]
    return lambda: request.infer(arrays)[0]


def _onnxruntime(unet: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int) -> Callable[[], np.ndarray]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "unet.onnx")
        program = torch.onnx.export(_UNetTensorOutput(unet), inputs, dynamo=True)
        program.save(path, external_data=True)  # the weights exceed protobuf's 2 GiB limit
        del program
        gc.collect()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)[0]


ENGINES = {
    "OpenVINO fp32": _openvino,
    "OpenVINO bf16": lambda unet, inputs, threads: _openvino(unet, inputs, threads, "bf16"),
    "ONNX Runtime fp32": _onnxruntime,
}


def diffusers_bf16_row(
    case: str,
    description: str,
    unet: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    run_reference: Callable[[], torch.Tensor],
    settings: Settings,
) -> Row:
    """diffusers' U-Net as a diffusers user runs it in bfloat16 (`unet.to(torch.bfloat16)`, bfloat16 inputs), timed
    interleaved with its float32 self; on a copy, since `unet` shares its weights with ours."""
    bf16_unet = copy.deepcopy(unet).to(torch.bfloat16)
    bf16_inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs)

    def run() -> torch.Tensor:
        return bf16_unet(*bf16_inputs).sample

    row = _timed_row(case, description, "diffusers bf16", run, run_reference, settings, settings.device)
    row.extra["rel_err_vs_diffusers"] = relative_error(run(), run_reference())
    return row


def _timed_row(
    case: str,
    description: str,
    variant: str,
    run: Callable[[], Any],
    run_reference: Callable[[], torch.Tensor],
    settings: Settings,
    device: str,
) -> Row:
    """A peer's row: `run` timed interleaved with diffusers' eager `run_reference`, medians in seconds."""
    times = interleaved({"peer": run, "reference": run_reference}, settings.warmup, settings.repeats, device)
    return Row(
        case, description, variant, "s", median(times["peer"]), median(times["reference"]),
        times=times["peer"], reference_times=times["reference"],
    )  # fmt: skip


def unet_rows(
    case: str,
    description: str,
    unet: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    run_reference: Callable[[], torch.Tensor],
    settings: Settings,
) -> list[Row]:
    """One row per installed engine, each timed interleaved with diffusers' eager U-Net."""
    expected = run_reference()
    rows = []
    for name, make in ENGINES.items():
        if "bf16" in name and not settings.bf16:
            continue
        start = time.perf_counter()
        try:
            engine = make(unet, inputs, torch.get_num_threads())
            output = torch.from_numpy(engine())
        except Exception as error:  # noqa: BLE001  an optional peer must not sink the run
            logger.warning("%s skipped: %s", name, error)
            continue
        convert_s = time.perf_counter() - start
        row = _timed_row(case, description, name, engine, run_reference, settings, "cpu")
        row.extra.update(convert_and_first_run_s=convert_s, rel_err_vs_diffusers=relative_error(output, expected))
        rows.append(row)
        del engine
        gc.collect()
    return rows
