"""hf_scratch.fast.precision: knowing whether the CPU computes bfloat16 natively, running a component in bfloat16
behind float32 inputs and outputs, and the accuracy of the bfloat16 path against float32."""

import numpy as np
import pytest
import torch
from torch import nn

from hf_scratch.fast import precision
from hf_scratch.fast.precision import compute_in, cpu_computes_bf16, fastest_dtype, use_fastest_dtypes

PROMPTS = ["red heart, twemoji style", "grinning face, noto style", "rocket, openmoji style", "pizza, twemoji style"]


def fake_cpu(monkeypatch: pytest.MonkeyPatch, **flags: bool) -> None:
    """Makes `torch.cpu.get_capabilities` report only `flags` (x86 names such as avx512_bf16)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", **flags})


@pytest.mark.parametrize(
    "flags, native",
    [
        ({"avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),  # the Intel Xeon of BENCHMARKS.md
        ({"avx512_f": True, "avx512_bf16": True}, True),  # AMD EPYC (Zen 4)
        ({"amx_bf16": True, "amx_tile": True}, True),  # Intel Sapphire Rapids
        ({"avx2": True}, False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, flags, native):
    fake_cpu(monkeypatch, **flags)
    assert cpu_computes_bf16() is native
    assert fastest_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert fastest_dtype("cuda") == torch.float16


def test_the_detector_agrees_with_proc_cpuinfo():
    """Independent of torch's cpuinfo: the kernel's own flag list."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert cpu_computes_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


class Recorder(nn.Module):
    """A linear layer that records the dtypes it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> tuple:
        self.seen = {"sample": sample.dtype, "timestep": timestep.dtype, "context": context.dtype}
        return (self.linear(sample) + context, timestep)


def test_compute_in_casts_weights_and_inputs_but_keeps_the_timestep_and_returns_the_callers_dtype():
    module = compute_in(Recorder(), torch.bfloat16)
    sample, timestep, context = torch.randn(2, 4), torch.tensor([999.0, 1.5]), torch.randn(2, 4)
    output, timestep_out = module(sample, timestep, context=context)
    assert module.linear.weight.dtype == torch.bfloat16
    assert module.seen == {"sample": torch.bfloat16, "timestep": torch.float32, "context": torch.bfloat16}
    assert output.dtype == torch.float32 and torch.equal(timestep_out, timestep)
    # Against an independent float32 computation: bfloat16 keeps 8 significant bits (relative rounding 2^-9 per
    # operand), so a 4-term dot product stays within a few 1e-2 of its magnitude.
    weight, bias = module.linear.weight.float(), module.linear.bias.float()
    expected = sample @ weight.T + bias + context
    assert torch.allclose(output, expected, rtol=3e-2, atol=3e-2)
    compute_in(module, torch.float32)  # wraps again rather than twice
    assert len(module._forward_pre_hooks) == 1 and module(sample, timestep, context)[0].dtype == torch.float32


def test_compute_in_rejects_an_integer_dtype():
    with pytest.raises(ValueError, match="floating-point dtype"):
        compute_in(nn.Linear(2, 2), torch.int8)


@pytest.fixture(scope="module")
def shipped_pipeline():
    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
    from hf_scratch.pretrained import default_model_path

    pipe = ScratchStableDiffusionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> np.ndarray:
    """The shipped model's default sampling of PROMPTS, prompt i from seed i, on the 0-255 scale."""
    from hf_scratch.pretrained import default_model_path
    from hf_scratch.sampling import sampling_kwargs

    kwargs = sampling_kwargs(default_model_path())
    with torch.no_grad():
        return 255 * np.concatenate([
            pipe(prompt, generator=torch.Generator().manual_seed(i), output_type="np", **kwargs).images
            for i, prompt in enumerate(PROMPTS)
        ])  # fmt: skip


def test_without_native_bf16_the_fastest_dtypes_leave_the_pipeline_in_float32(monkeypatch, shipped_pipeline):
    import copy

    fake_cpu(monkeypatch, avx512_f=True, avx512_bf16=False)
    monkeypatch.setattr(precision, "BF16_MIN_PARAMETERS", 0)
    pipe = use_fastest_dtypes(copy.deepcopy(shipped_pipeline))
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.dtype == torch.float32 for p in getattr(pipe, name).parameters()), name
        assert not getattr(pipe, name)._forward_pre_hooks, name


def test_bf16_unet_images_stay_close_to_float32(monkeypatch, shipped_pipeline):
    """The bfloat16 path of `use_fastest_dtypes` on the shipped model (forced: its U-Net is below the size where
    bfloat16 pays), against the float32 pipeline's images.

    The bound: a bfloat16 U-Net output is off by about 1e-2 relative (8 significant bits), and 16 steps of the flow
    ODE carry that into the latents; decoded, that is about one level of 255 on average. A few pixels differ by
    more where the trajectory crosses an edge, so the bound is on the mean (<= 1.5 levels) and on the 99th percentile
    (<= 8 levels), not on the maximum.
    """
    import copy

    fake_cpu(monkeypatch, avx512_bf16=True)
    expected = images(shipped_pipeline)
    pipe = use_fastest_dtypes(copy.deepcopy(shipped_pipeline), min_parameters=0)
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())
    assert all(p.dtype == torch.float32 for p in [*pipe.vae.parameters(), *pipe.text_encoder.parameters()])
    difference = np.abs(images(pipe) - expected)
    assert difference.mean() <= 1.5
    assert np.percentile(difference, 99) <= 8


def test_a_small_unet_stays_float32_by_default(monkeypatch, shipped_pipeline):
    """The shipped 7M-parameter U-Net is bound by per-op cost, where bfloat16 gains nothing."""
    import copy

    fake_cpu(monkeypatch, avx512_bf16=True)
    pipe = use_fastest_dtypes(copy.deepcopy(shipped_pipeline))
    assert sum(p.numel() for p in pipe.unet.parameters()) < precision.BF16_MIN_PARAMETERS
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())


def test_a_frozen_bf16_unet_matches_the_eager_one(monkeypatch, shipped_pipeline):
    """freeze_for_inference traces the U-Net in the dtype compute_in gives it (and keeps oneDNN for bfloat16)."""
    import copy

    from hf_scratch.fast import freeze_for_inference

    unet = compute_in(copy.deepcopy(shipped_pipeline.unet), torch.bfloat16)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = unet(sample, torch.tensor([700.0, 700.0]), context).sample
        frozen = freeze_for_inference(unet)(sample, torch.tensor([700.0, 700.0]), context).sample
    assert frozen.dtype == torch.float32
    torch.testing.assert_close(frozen, eager, rtol=1e-2, atol=1e-2)  # bfloat16 rounding, should graph fusion differ
