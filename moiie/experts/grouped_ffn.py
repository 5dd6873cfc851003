"""Every expert's two-layer FFN over expert-sorted rows, as one custom operator with its own backward.

Gated (SwiGLU): y = (act(x W_gate[e].T + b_gate[e]) * (x W_up[e].T + b_up[e])) W2[e].T + b2[e],
with W1 = [W_gate; W_up] stacked along dim 1. Plain: y = act(x W1[e].T + b1[e]) W2[e].T + b2[e].

Why one operator: autograd never sees per-expert work (no per-expert nodes, no ``W[e]`` indexing
that would allocate full-size zero gradients), ``torch.compile`` treats it as one opaque node (no
graph break, no recompilation when the routing changes), and backward skips the products whose
gradient nobody needs. The forward saves only the pre-activations (gate and up, each contiguous so
the element-wise kernels run at full speed) and recomputes the activation in backward; a call no
gradient flows through saves nothing. With the loop engine all element-wise work runs one expert at
a time, so its temporaries are the size of one expert's rows and live in the reused
:data:`WORKSPACE`: the operator's peak memory is its inputs, saved activations and outputs, and a
call page-faults nothing but those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moiie.experts.grouped import WORKSPACE, ExpertRows, GroupedImpl, compute_dtype, resolve_impl


@dataclass(frozen=True)
class Activation:
    """An element-wise activation and its backward, one aten kernel each."""

    name: str

    def __call__(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """act(h), written into out."""
        if self.name == "silu":
            return torch.ops.aten.silu.out(h, out=out)
        if self.name == "relu":
            return torch.clamp(h, min=0, out=out)
        approximate = "tanh" if self.name == "gelu_tanh" else "none"
        return torch.ops.aten.gelu.out(h, approximate=approximate, out=out)

    def backward(self, grad: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """grad * act'(h), written into out (which may be grad)."""
        aten = torch.ops.aten
        if self.name == "silu":
            return aten.silu_backward.grad_input(grad, h, grad_input=out)
        if self.name == "relu":
            return torch.mul(grad, h > 0, out=out)
        approximate = "tanh" if self.name == "gelu_tanh" else "none"
        return aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=out)


def _halves(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[gate; up] stacked along dim 1 -> (gate, up) views."""
    return (None, None) if t is None else t.chunk(2, dim=1)


def _forward(x, w1, w2, b1, b2, counts, activation: str, gated: bool, impl: str, keep: bool):
    """y, and the pre-activations [gate, up] / [h] when ``keep`` (else they live per block in the
    workspace and are not returned)."""
    rows, act = ExpertRows(impl, counts, x.shape[0]), Activation(activation)
    w_in, b_in = (_halves(w1), _halves(b1)) if gated else ((w1,), (b1,))
    hidden = [rows.new(x, w.shape[1]) if keep else None for w in w_in]
    y = rows.new(x, w2.shape[1])
    for block in rows.blocks:
        xb, n = block.of(x), block.stop - block.start
        hb = [
            rows.linear(block, xb, w, b, out=block.of(h) if keep else WORKSPACE.take(1 + i, n, w.shape[1], x))
            for i, (w, b, h) in enumerate(zip(w_in, b_in, hidden))
        ]
        ab = act(hb[0], out=WORKSPACE.take(0, *hb[0].shape, x))
        if gated:
            ab.mul_(hb[1])
        yb = rows.linear(block, ab, w2, b2, out=block.of(y))
    if rows.grouped:  # its single block returned whole tensors
        hidden, y = hb, yb
    return rows.zero_tail(y), [rows.zero_tail(h) for h in hidden] if keep else []


@torch.library.custom_op("moiie::grouped_ffn", mutates_args=())
def _ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    counts: torch.Tensor,
    activation: str,
    gated: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y and what backward needs: (gate, up) when gated, (pre-activation, empty) otherwise."""
    y, hidden = _forward(x, w1, w2, b1, b2, counts, activation, gated, impl, keep=True)
    return y, hidden[0], hidden[1] if gated else x.new_empty(0)


@_ffn.register_fake
def _ffn_fake(x, w1, w2, b1, b2, counts, activation, gated, impl):
    rows, d_ff = x.shape[0], w2.shape[2]
    up = x.new_empty(rows, d_ff) if gated else x.new_empty(0)
    return x.new_empty(rows, w2.shape[1]), x.new_empty(rows, d_ff), up


@torch.library.custom_op("moiie::grouped_ffn_inference", mutates_args=())
def _ffn_inference(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    counts: torch.Tensor,
    activation: str,
    gated: bool,
    impl: str,
) -> torch.Tensor:
    """y alone, for calls no gradient will flow through: nothing is kept for a backward."""
    return _forward(x, w1, w2, b1, b2, counts, activation, gated, impl, keep=False)[0]


@_ffn_inference.register_fake
def _ffn_inference_fake(x, w1, w2, b1, b2, counts, activation, gated, impl):
    return x.new_empty(x.shape[0], w2.shape[1])


@torch.library.custom_op("moiie::grouped_ffn_backward", mutates_args=())
def _ffn_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h1: torch.Tensor,
    h2: torch.Tensor,
    counts: torch.Tensor,
    activation: str,
    gated: bool,
    impl: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, w1, w2, b1, b2); an empty tensor where ``needs`` says no one wants it."""
    rows, act = ExpertRows(impl, counts, x.shape[0]), Activation(activation)
    need_x, need_w1, need_w2, need_b1, need_b2 = needs
    dy = dy.contiguous()  # grouped_mm rejects stride-0 gradients such as the one .sum() sends
    d_ff = h1.shape[1]
    dx = rows.new(x, x.shape[1]) if need_x else None
    dw1 = rows.new_weight_grad(w1, w1.shape) if need_w1 else None
    dw2 = rows.new_weight_grad(w2, w2.shape) if need_w2 else None
    db1 = rows.new_weight_grad(w1, w1.shape[:2]) if need_b1 else None
    db2 = rows.new_weight_grad(w2, w2.shape[:2]) if need_b2 else None
    w_gate, w_up = _halves(w1)
    for block in rows.blocks:
        dyb, xb, n = block.of(dy), block.of(x), block.stop - block.start
        if gated:
            gate, up = block.of(h1), block.of(h2)
            s = act(gate, out=WORKSPACE.take(0, n, d_ff, x))
            hidden = torch.mul(s, up, out=WORKSPACE.take(1, n, d_ff, x))
        else:
            h = block.of(h1)
            hidden = act(h, out=WORKSPACE.take(1, n, d_ff, x))
        if need_w2:
            rows.linear_weight_grad(block, dyb, hidden, dw2)
        da = rows.linear_input_grad(block, dyb, w2, out=hidden)
        if gated:  # d_up = act(gate) * da, then d_gate = da * act'(gate) * up, each in place
            d_up = s.mul_(da)
            d_h, w_in = [act.backward(da, gate, out=da).mul_(up), d_up], (w_gate, w_up)
        else:
            d_h, w_in = [act.backward(da, h, out=da)], (w1,)
        if need_x:
            dxb = rows.linear_input_grad(block, d_h[0], w_in[0], out=block.of(dx))
            if gated:
                rows.linear_input_grad(block, d_h[1], w_in[1], out=dxb, accumulate=True)
        for i, dhb in enumerate(d_h):
            part = slice(i * d_ff, (i + 1) * d_ff)
            if need_w1:
                rows.linear_weight_grad(block, dhb, xb, dw1[:, part])
            if need_b1:
                rows.bias_grad(block, dhb, db1[:, part])
        if need_b2:
            rows.bias_grad(block, dyb, db2)
    if need_x:
        dx = rows.zero_tail(dxb if dx is None else dx)
    return tuple(dy.new_empty(0) if t is None else t for t in (dx, dw1, dw2, db1, db2))


@_ffn_backward.register_fake
def _ffn_backward_fake(dy, x, w1, w2, h1, h2, counts, activation, gated, impl, needs):
    shapes = (x.shape, w1.shape, w2.shape, w1.shape[:2], w2.shape[:2])
    return tuple(dy.new_empty(s if need else (0,)) for s, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, w1, w2, _, _, counts, activation, gated, impl = inputs
    _, h1, h2 = output
    ctx.mark_non_differentiable(h1, h2)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for h1, h2
    ctx.save_for_backward(x, w1, w2, h1, h2, counts)
    ctx.args = (activation, gated, impl)


def _grad(ctx, dy, _dh1, _dh2):
    if dy is None:  # y took no part in the loss
        return (None,) * 9
    x, w1, w2, h1, h2, counts = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.moiie.grouped_ffn_backward(dy, x, w1, w2, h1, h2, counts, *ctx.args, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


_ffn.register_autograd(_grad, setup_context=_setup_context)


def grouped_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    counts: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    impl: GroupedImpl = "auto",
) -> torch.Tensor:
    """Every expert's FFN on its slice of expert-sorted rows, as one autograd node.

    x: (N, d) sorted by expert, N >= counts.sum(); w1: (E, h, d) with h = 2 * d_ff when gated
    ([gate; up]), else d_ff; w2: (E, d, d_ff); b1: (E, h), b2: (E, d) or None; activation: silu,
    gelu, gelu_tanh or relu. Weights are cast to the compute dtype once per call. Returns (N, d) in the
    compute dtype, zero past counts.sum().
    """
    dtype = compute_dtype(x, w1.dtype)
    with torch.autocast(x.device.type, enabled=False):
        x, w1, w2 = x.contiguous().to(dtype), w1.to(dtype), w2.to(dtype)
        b1 = None if b1 is None else b1.to(dtype)
        b2 = None if b2 is None else b2.to(dtype)
        args = (x, w1, w2, b1, b2, counts, activation, gated)
        engine = resolve_impl(impl, x, *w1.shape[1:], *w2.shape[1:])
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
            return torch.ops.moiie.grouped_ffn(*args, engine)[0]
        return torch.ops.moiie.grouped_ffn_inference(*args, engine)
