"""The records the harness passes around: the run's settings and one report row per measured variant."""

from dataclasses import dataclass, field
from typing import Any

import torch

from .sizes import Size


@dataclass
class Settings:
    """What the command line chose: size, device, dtype, repeat counts, and which optional variants to run."""

    size: Size
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    warmup: int = 1
    repeats: int = 3
    fast: tuple[str, ...] = ("winograd", "compile")  # the hf_scratch.fast paths to time, in order
    peers: bool = True
    bf16: bool = False  # also time ours and the peers computing in bfloat16 (default: where the CPU does it natively)


@dataclass
class Row:
    """One line of the report: a variant of ours (or a peer engine) against diffusers, timed in the same phase."""

    case: str
    description: str
    variant: str
    unit: str  # "s", "samples/s" or "GiB"
    value: float  # median of the variant
    reference: float  # median of diffusers, interleaved with the variant
    higher_is_better: bool = False
    times: list[float] = field(default_factory=list)
    reference_times: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """ours / diffusers: below 1 is better for times and memory, above 1 for throughput."""
        return self.value / self.reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm())
