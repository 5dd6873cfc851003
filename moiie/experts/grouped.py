"""Grouped matmuls over rows sorted by expert, and the two-layer expert FFN built on them.

Rows arrive sorted by expert, ``split_sizes[e]`` rows for expert e, and weights are stacked in the
``nn.Linear`` layout ``(num_experts, d_out, d_in)``. Two engines run the per-expert products:

- ``grouped_mm``: ``torch.nn.functional.grouped_mm``, one kernel for all experts on CUDA.
- ``loop``: one BLAS call per non-empty expert, written straight into its slice of one output
  buffer (no per-expert temporaries, no concatenation).

The FFN is one autograd node (:class:`GroupedFFN`), so autograd never sees per-expert work:
backward writes each expert's weight gradient into its slot of one stacked buffer, skips the
products whose gradient nobody needs, and recomputes the activation from the saved pre-activation
instead of keeping both around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

GroupedImpl = Literal["auto", "grouped_mm", "loop"]

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(t: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls should run in: the autocast dtype inside an autocast region, else the weights'."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return param_dtype


def resolve_impl(impl: GroupedImpl, x: torch.Tensor, *widths: int) -> str:
    """The engine to run: `auto` takes grouped_mm on CUDA and the loop elsewhere (on CPU grouped_mm is a
    loop of the same BLAS calls plus a copy). grouped_mm falls back to the loop for what its kernel lacks:
    other dtypes (float64) and rows whose byte stride is not a multiple of 16."""
    if impl == "auto":
        impl = "grouped_mm" if x.device.type == "cuda" else "loop"
    if impl == "grouped_mm" and (
        not hasattr(F, "grouped_mm")
        or x.dtype not in _GROUPED_MM_DTYPES
        or any(w * x.element_size() % 16 for w in widths)
    ):
        return "loop"
    return impl


class GroupedGemm:
    """The products of a grouped linear layer and its backward, for one expert-sorted row layout.

    counts: (E,) int64 on the rows' device; split_sizes: ``counts.tolist()``.
    """

    def __init__(self, impl: str, counts: torch.Tensor, split_sizes: list[int]):
        self.impl = impl
        self.counts, self.split_sizes = counts, split_sizes
        self.rows = sum(split_sizes)
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32) if impl == "grouped_mm" else None
        bounds, start = [], 0
        for e, n in enumerate(split_sizes):
            if n:
                bounds.append((e, start, start + n))
            start += n
        self.bounds = bounds
        """(expert, first row, end row) of every non-empty expert."""

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """out[rows of e] = x[rows of e] @ w[e].T (+ bias[e]). x: (N, d_in), w: (E, d_out, d_in) -> (N, d_out)."""
        if self.impl == "grouped_mm":
            out = F.grouped_mm(x, w.transpose(-2, -1), offs=self.offsets)
            if bias is not None:
                out += bias.repeat_interleave(self.counts, dim=0, output_size=self.rows)
            return out
        out = x.new_empty(self.rows, w.shape[1])
        for e, a, b in self.bounds:
            if bias is None:
                torch.mm(x[a:b], w[e].t(), out=out[a:b])
            else:
                torch.addmm(bias[e], x[a:b], w[e].t(), out=out[a:b])
        return out

    def linear_input_grad(self, dy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """out[rows of e] = dy[rows of e] @ w[e]. dy: (N, d_out), w: (E, d_out, d_in) -> (N, d_in)."""
        if self.impl == "grouped_mm":
            return F.grouped_mm(dy, w, offs=self.offsets)
        out = dy.new_empty(self.rows, w.shape[2])
        for e, a, b in self.bounds:
            torch.mm(dy[a:b], w[e], out=out[a:b])
        return out

    def linear_weight_grad(self, dy: torch.Tensor, x: torch.Tensor, num_experts: int) -> torch.Tensor:
        """out[e] = dy[rows of e].T @ x[rows of e], zero for experts without rows. -> (E, d_out, d_in)."""
        if self.impl == "grouped_mm":
            return F.grouped_mm(dy.t(), x, offs=self.offsets)
        out = dy.new_empty(num_experts, dy.shape[1], x.shape[1])
        if len(self.bounds) < num_experts:
            out.zero_()
        for e, a, b in self.bounds:
            torch.mm(dy[a:b].t(), x[a:b], out=out[e])
        return out

    def bias_grad(self, dy: torch.Tensor, num_experts: int) -> torch.Tensor:
        """out[e] = sum of dy over the rows of e. dy: (N, d_out) -> (E, d_out)."""
        out = dy.new_zeros(num_experts, dy.shape[1])
        for e, a, b in self.bounds:
            torch.sum(dy[a:b], dim=0, out=out[e])
        return out


@dataclass(frozen=True)
class Activation:
    """An element-wise activation with its backward as one aten kernel (no autograd graph)."""

    name: str

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return F.silu(h)
        if self.name == "relu":
            return F.relu(h)
        return F.gelu(h, approximate="tanh" if self.name == "gelu_tanh" else "none")

    def backward(self, grad: torch.Tensor, h: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        """out = grad * act'(h); ``out`` may be ``grad`` itself."""
        aten = torch.ops.aten
        if self.name == "silu":
            return aten.silu_backward.grad_input(grad, h, grad_input=out)
        if self.name == "relu":
            return torch.mul(grad, h > 0, out=out)
        approximate = "tanh" if self.name == "gelu_tanh" else "none"
        return aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=out)


def _hidden(h: torch.Tensor, act: Activation, gated: bool) -> torch.Tensor:
    """act(h) for a plain FFN, act(gate) * up for a gated one (h = [gate | up])."""
    if not gated:
        return act(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate).mul_(up)


class GroupedFFN(torch.autograd.Function):
    """y = act(x W1[e].T + b1[e]) W2[e].T + b2[e] per expert slice, gated: (act(gate) * up) W2[e].T."""

    @staticmethod
    def forward(ctx, x, w1, w2, b1, b2, gemm: GroupedGemm, act: Activation, gated: bool):
        h = gemm.linear(x, w1, b1)
        y = gemm.linear(_hidden(h, act, gated), w2, b2)
        ctx.gemm, ctx.act, ctx.gated = gemm, act, gated
        ctx.save_for_backward(x, w1, w2, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        gemm, act, gated = ctx.gemm, ctx.act, ctx.gated
        need_x, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:5]
        E = w1.shape[0]
        dy = dy.contiguous()  # grouped_mm rejects stride-0 gradients such as the one .sum() sends
        da = gemm.linear_input_grad(dy, w2)
        dh = torch.empty_like(h)
        if gated:
            gate, up = h.chunk(2, dim=-1)
            dgate, dup = dh.chunk(2, dim=-1)
            a = act(gate)
            torch.mul(da, a, out=dup)
            act.backward(torch.mul(da, up, out=dgate), gate, out=dgate)
            a.mul_(up)
        else:
            act.backward(da, h, out=dh)
            a = act(h)
        del da
        dw2 = gemm.linear_weight_grad(dy, a, E) if need_w2 else None
        del a
        db2 = gemm.bias_grad(dy, E) if need_b2 else None
        dx = gemm.linear_input_grad(dh, w1) if need_x else None
        dw1 = gemm.linear_weight_grad(dh, x, E) if need_w1 else None
        db1 = gemm.bias_grad(dh, E) if need_b1 else None
        return dx, dw1, dw2, db1, db2, None, None, None


class GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T (+ b[e]), one autograd node for all experts."""

    @staticmethod
    def forward(ctx, x, w, b, gemm: GroupedGemm):
        ctx.gemm = gemm
        ctx.save_for_backward(x, w)
        return gemm.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        gemm = ctx.gemm
        dy = dy.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = gemm.linear_input_grad(dy, w) if need_x else None
        dw = gemm.linear_weight_grad(dy, x, w.shape[0]) if need_w else None
        db = gemm.bias_grad(dy, w.shape[0]) if need_b else None
        return dx, dw, db, None
