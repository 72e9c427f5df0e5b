"""hf_scratch.fast.attention: the bfloat16 attention kernel against attention computed in float64, its processor's
fall-backs, and where `use_bf16_attention` and `use_fastest_dtypes` install it.

The kernel runs only where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX); its tests skip elsewhere, since
it cannot be built or run there. The refusal on such a CPU is tested everywhere.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import UNET_CONFIG
from diffusers.models.attention_processor import AttnProcessor
from test_precision import fake_cpu

from hf_scratch.fast import attention, compute_in, freeze_for_inference, use_bf16_attention, use_fastest_dtypes
from hf_scratch.fast.attention import BF16AttnProcessor, attention_bf16, kernel_applies
from hf_scratch.fast.kernels import machine_tag
from hf_scratch.fast.precision import cpu_computes_bf16
from hf_scratch.models.layers import ScratchAttnProcessor
from hf_scratch.models.unet import ScratchUNet2DConditionModel

native = pytest.mark.skipif(not cpu_computes_bf16(), reason="the kernel needs a CPU with AVX-512 BF16 or AMX")


def attention_float64(query, key, value):
    """softmax(QKᵀ / √d) V written out in float64: the reference, independent of any attention kernel."""
    q, k, v = query.double(), key.double(), value.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ v


def relative(x, reference):
    return ((x.double() - reference).norm() / reference.norm()).item()


def qkv(batch, heads, length, keys, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = 2 * torch.randn(batch, heads, length, dim, generator=generator)  # peaked softmax rows, as in a U-Net
    key = torch.randn(batch, heads, keys, dim, generator=generator)
    value = torch.randn(batch, heads, keys, dim, generator=generator)
    return query.bfloat16(), key.bfloat16(), value.bfloat16()


@native
@pytest.mark.parametrize(
    "batch, heads, length, keys, dim",
    [
        (2, 8, 1024, 1024, 40),  # SD 1.5 self-attention, one level down (4096 at 512 px, same code path)
        (2, 8, 1000, 77, 40),  # cross-attention on 77 text tokens: an odd key count and a last block of 8 rows
        (1, 4, 256, 256, 160),
        (1, 1, 33, 5, 8),
        (2, 1, 64, 64, 512),  # the VAE's mid-block attention: one head of 512
    ],
)
def test_the_kernel_equals_float64_attention_to_bfloat16_rounding(batch, heads, length, keys, dim):
    """The output is rounded to bfloat16 (relative 2^-9 = 2e-3 per value) and so are the probabilities: the error
    stays within 4e-3 and within 1.3x that of PyTorch's SDPA on the same inputs."""
    query, key, value = qkv(batch, heads, length, keys, dim)
    reference = attention_float64(query, key, value)
    ours = attention_bf16(query, key, value)
    assert ours.shape == query.shape and ours.dtype == torch.bfloat16
    pytorch = F.scaled_dot_product_attention(query, key, value)
    assert relative(ours, reference) <= 4e-3
    assert relative(ours, reference) <= 1.3 * relative(pytorch, reference)


@native
def test_the_kernel_reads_strided_projections_without_changing_the_result():
    """Fused projections hand over Q, K and V as slices of one (B, L, 3·heads·d) tensor."""
    batch, length, heads, dim = 2, 70, 4, 16
    fused = torch.randn(batch, length, 3 * heads * dim).bfloat16()
    query, key, value = (t.unflatten(-1, (heads, dim)).transpose(1, 2) for t in fused.chunk(3, dim=-1))
    assert not query.is_contiguous()
    expected = attention_bf16(query.contiguous(), key.contiguous(), value.contiguous())
    assert torch.equal(attention_bf16(query, key, value), expected)


def test_the_processor_falls_back_to_pytorch_where_the_kernel_does_not_apply():
    query, key, value = (t.float() for t in qkv(1, 2, 16, 16, 8))
    assert not kernel_applies(query, key, value)  # float32
    assert torch.equal(BF16AttnProcessor.attend(query, key, value), F.scaled_dot_product_attention(query, key, value))
    odd = [t[..., :7].bfloat16() for t in (query, key, value)]
    assert not kernel_applies(*odd)  # an odd head size
    assert torch.equal(BF16AttnProcessor.attend(*odd), F.scaled_dot_product_attention(*odd))
    no_keys = [query.bfloat16(), key[:, :, :0].bfloat16(), value[:, :, :0].bfloat16()]
    assert not kernel_applies(*no_keys)  # an empty softmax: left to PyTorch
    trained = [t.bfloat16().requires_grad_() for t in (query, key, value)]
    assert not kernel_applies(*trained)  # gradients: the kernel has no backward
    BF16AttnProcessor.attend(*trained).float().sum().backward()
    assert all(t.grad is not None for t in trained)
    with torch.no_grad():
        assert kernel_applies(*trained)


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return ScratchUNet2DConditionModel(**UNET_CONFIG).eval()


def unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10.0, 900.0]), context


@native
def test_use_bf16_attention_installs_the_kernel_and_keeps_other_processors(unet):
    first = next(iter(unet.attn_processors))
    unet.set_attn_processor(
        {name: AttnProcessor() if name == first else ScratchAttnProcessor() for name in unet.attn_processors}
    )
    float32 = copy.deepcopy(unet)
    pytorch = compute_in(copy.deepcopy(unet), torch.bfloat16)
    ours = use_bf16_attention(compute_in(unet, torch.bfloat16))
    processors = ours.attn_processors
    assert isinstance(processors.pop(first), AttnProcessor)  # a user's processor is left alone
    assert processors and all(type(p) is BF16AttnProcessor for p in processors.values())
    inputs = unet_inputs(ours)
    with torch.no_grad():
        reference = float32(*inputs).sample.double()
        with_kernel, with_pytorch = ours(*inputs).sample, pytorch(*inputs).sample
        frozen = freeze_for_inference(copy.deepcopy(ours))(*inputs).sample
    # The whole bfloat16 U-Net is off by about 1e-2 relative (bfloat16 weights and activations); the kernel adds
    # nothing measurable to that.
    assert relative(with_kernel, reference) <= 1.2 * relative(with_pytorch, reference)
    assert relative(with_kernel, reference) <= 3e-2
    assert torch.equal(frozen, with_kernel)  # the kernel is a dispatcher operator, so a trace records the call


def test_use_bf16_attention_refuses_a_cpu_without_native_bfloat16(monkeypatch, unet):
    fake_cpu(monkeypatch, avx512_f=True, avx512_bf16=False)
    with pytest.raises(ValueError, match="computes bfloat16 natively"):
        use_bf16_attention(unet)
    assert all(type(p) is ScratchAttnProcessor for p in unet.attn_processors.values())


class Pipe:
    """What `use_fastest_dtypes` reads of a pipeline."""

    def __init__(self, unet):
        self.unet, self.vae, self.device = unet, torch.nn.Identity(), torch.device("cpu")


def test_use_fastest_dtypes_warns_and_keeps_pytorch_attention_when_the_kernel_cannot_be_built(monkeypatch, unet):
    fake_cpu(monkeypatch, avx512_bf16=True)

    def no_compiler():
        raise RuntimeError("hf_scratch.fast builds a small C++ kernel on first use and needs a C++ compiler")

    monkeypatch.setattr(attention, "_operator", no_compiler)
    with pytest.warns(UserWarning, match="keeps PyTorch's bfloat16 attention.*C\\+\\+ compiler"):
        pipe = use_fastest_dtypes(Pipe(unet), min_parameters=0)
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())
    assert all(type(p) is ScratchAttnProcessor for p in pipe.unet.attn_processors.values())


@native
def test_use_fastest_dtypes_gives_a_bf16_unet_the_kernel(unet):
    pipe = use_fastest_dtypes(Pipe(unet), min_parameters=0)
    assert all(type(p) is BF16AttnProcessor for p in pipe.unet.attn_processors.values())


@native
def test_the_operator_passes_torch_library_opcheck():
    """Schema, fake (meta) implementation for torch.compile, and dispatch, by PyTorch's own operator checker."""
    query, key, value = (t.transpose(1, 2).contiguous() for t in qkv(1, 2, 40, 24, 8))
    torch.library.opcheck(attention._operator().default, (query, key, value, 8**-0.5))


def test_kernel_builds_are_named_after_the_cpu_kind(monkeypatch):
    """Built with -march=native, a kernel belongs to its CPU kind: the build's name carries a digest of the flags."""
    fake_cpu(monkeypatch, avx512_f=True, avx512_bf16=True)
    with_bf16 = machine_tag()
    fake_cpu(monkeypatch, avx512_f=True, avx512_bf16=False)
    assert machine_tag() != with_bf16 and len(with_bf16) == 8
    assert machine_tag() == machine_tag()
