"""The grouped expert FFN operator: gradients, engines, rows past the experts, reused CPU buffers."""

import pytest
import torch

from moiie.experts.grouped import WORKSPACE
from moiie.experts.grouped_ffn import grouped_ffn

COUNTS = torch.tensor([3, 0, 4, 2])  # an expert without rows; 11 rows below leave 2 rows to no expert
ROWS = 11


def make(gated, bias, d=6, f=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, h = COUNTS.numel(), (2 * f if gated else f)
    tensors = [
        torch.randn(ROWS, d, generator=g),
        torch.randn(E, h, d, generator=g),
        torch.randn(E, d, f, generator=g),
    ]
    if bias:
        tensors += [torch.randn(E, h, generator=g), torch.randn(E, d, generator=g)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def ffn(activation, gated, impl="loop"):
    def run(x, w1, w2, b1=None, b2=None):
        return grouped_ffn(x, w1, w2, COUNTS, activation=activation, gated=gated, b1=b1, b2=b2, impl=impl)

    return run


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_finite_differences(activation, gated, bias):
    inputs = make(gated, bias)
    assert torch.autograd.gradcheck(ffn(activation, gated), inputs)
    y = ffn(activation, gated)(*inputs)
    assert torch.equal(y[COUNTS.sum() :], torch.zeros_like(y[COUNTS.sum() :]))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_mm_engine_matches_loop(gated, bias):
    """The CUDA engine's code path (F.grouped_mm, device-side expert boundaries) run on CPU."""
    results = []
    for impl in ("loop", "grouped_mm"):
        inputs = make(gated, bias, d=16, f=8, dtype=torch.float32)
        y = ffn("silu", gated, impl)(*inputs)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y, *(t.grad for t in inputs)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch.equal(results[1][1][COUNTS.sum() :], torch.zeros(ROWS - COUNTS.sum(), 16))


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("gated", [True, False])
def test_operator_registration(impl, gated):
    """Schema, fake tensor and autograd registrations agree with the kernel (what torch.compile relies on)."""
    x, w1, w2, b1, _ = make(gated, True, d=16, f=8, dtype=torch.float32)
    args = (x, w1, w2, b1, None, COUNTS, "silu", gated, impl)
    torch.library.opcheck(torch.ops.moiie.grouped_ffn.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.moiie.grouped_ffn_inference.default, detached)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("gated", [True, False])
def test_inference_path_matches_training_path(impl, gated):
    inputs = make(gated, True, d=16, f=8, dtype=torch.float32)
    y_train = ffn("gelu", gated, impl)(*inputs)
    with torch.no_grad():
        y_infer = ffn("gelu", gated, impl)(*inputs)
    torch.testing.assert_close(y_infer, y_train)


def test_retained_graph_gives_the_same_gradients_twice():
    x, w1, w2 = make(True, False)
    y = ffn("silu", True)(x, w1, w2)
    first = torch.autograd.grad(y.square().sum(), [x, w1, w2], retain_graph=True)
    second = torch.autograd.grad(y.square().sum(), [x, w1, w2])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_frozen_parts_get_no_gradient():
    x, w1, w2 = make(True, False)
    w1.requires_grad_(False)
    ffn("silu", True)(x, w1, w2).sum().backward()
    assert w1.grad is None and x.grad is not None and w2.grad is not None


def test_interleaved_calls_do_not_share_buffers():
    """Two layers' forwards, then their backwards in reverse order, as in a model: equal to running each alone."""
    WORKSPACE.release()
    a, b = make(True, False, seed=1), make(True, False, seed=2)
    alone = []
    for inputs in (a, b):
        fresh = [t.detach().clone().requires_grad_() for t in inputs]
        y = ffn("silu", True)(*fresh)
        y.square().sum().backward()
        alone.append([y, *(t.grad for t in fresh)])
    ya, yb = ffn("silu", True)(*a), ffn("silu", True)(*b)
    (yb.square().sum() + ya.square().sum()).backward()
    for got, want in zip([[ya, *(t.grad for t in a)], [yb, *(t.grad for t in b)]], alone):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_rows_in_chunks_match_one_product_per_expert(bias):
    """bf16 experts with more than ROW_CHUNK rows run their matmuls in row chunks: outputs and every
    gradient equal a float32 per-expert reference computed without chunks (up to bf16 rounding)."""
    from moiie.experts.grouped import ROW_CHUNK

    counts = torch.tensor([ROW_CHUNK * 2 + 37, 5, 0, ROW_CHUNK + 1])
    rows, d, f = int(counts.sum()) + 3, 32, 24
    g = torch.Generator().manual_seed(0)
    E = counts.numel()
    base = [
        torch.randn(rows, d, generator=g),
        torch.randn(E, 2 * f, d, generator=g) * 0.2,
        torch.randn(E, d, f, generator=g) * 0.2,
    ]
    if bias:
        base += [torch.randn(E, 2 * f, generator=g), torch.randn(E, d, generator=g)]
    dy = torch.randn(rows, d, generator=g)

    def run(dtype, fn):
        ts = [t.to(dtype).requires_grad_() for t in base]
        y = fn(*ts)
        y.backward(dy.to(dtype))
        return [y.float(), *(t.grad.float() for t in ts)]

    def reference(x, w1, w2, b1=None, b2=None):
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            xe = x[start : start + n]
            h = xe @ w1[e].t() + (0 if b1 is None else b1[e])
            gate, up = h.chunk(2, dim=1)
            out.append((torch.nn.functional.silu(gate) * up) @ w2[e].t() + (0 if b2 is None else b2[e]))
            start += n
        return torch.cat([*out, x.new_zeros(rows - start, d)])

    def chunked(x, w1, w2, b1=None, b2=None):
        return grouped_ffn(x, w1, w2, counts, activation="silu", gated=True, b1=b1, b2=b2, impl="loop")

    got, want = run(torch.bfloat16, chunked), run(torch.float32, reference)
    for a, b in zip(got, want):
        scale = b.abs().max().clamp(min=1)
        assert (a - b).abs().max() / scale < 3e-2
