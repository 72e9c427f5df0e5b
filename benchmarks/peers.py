"""Other inference engines on diffusers' U-Net, as peers on the U-Net row: OpenVINO and ONNX Runtime, both fp32.

Each engine converts diffusers' U-Net once and then holds its own copy of the weights, so the engines run one after
another and each is freed before the next is built. An engine that is not installed, or fails to convert, is skipped
with a note rather than failing the run.
"""

import gc
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def _openvino(unet: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int) -> Callable[[], np.ndarray]:
    import openvino as ov

    model = ov.convert_model(_UNetTensorOutput(unet), example_input=inputs)
    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
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


ENGINES = {"OpenVINO fp32": _openvino, "ONNX Runtime fp32": _onnxruntime}


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
        start = time.perf_counter()
        try:
            engine = make(unet, inputs, torch.get_num_threads())
            output = torch.from_numpy(engine())
        except Exception as error:  # noqa: BLE001  an optional peer must not sink the run
            logger.warning("%s skipped: %s", name, error)
            continue
        convert_s = time.perf_counter() - start
        times = interleaved({"engine": engine, "reference": run_reference}, settings.warmup, settings.repeats, "cpu")
        row = Row(
            case, description, name, "s", median(times["engine"]), median(times["reference"]),
            times=times["engine"], reference_times=times["reference"],
        )  # fmt: skip
        row.extra.update(convert_and_first_run_s=convert_s, rel_err_vs_diffusers=relative_error(output, expected))
        rows.append(row)
        del engine
        gc.collect()
    return rows
