"""Grouped matmuls over rows sorted by expert, and the two-layer expert FFN built on them.

Rows arrive sorted by expert, ``split_sizes[e]`` rows for expert e, and weights are stacked in the
``nn.Linear`` layout ``(num_experts, d_out, d_in)``. Two engines run the per-expert products:

- ``grouped_mm``: ``torch.nn.functional.grouped_mm``, one kernel for all experts on CUDA.
- ``loop``: one BLAS call per non-empty expert, written straight into its slice of one output
  buffer (no per-expert temporaries, no concatenation).

The FFN is one autograd node (:class:`GroupedFFN`), so autograd never sees per-expert work:
backward writes each expert's weight gradient into its slot of one stacked buffer, skips the
products whose gradient nobody needs, and recomputes the activation from the saved
pre-activation instead of keeping both. A gated FFN keeps gate and up in two contiguous buffers
(element-wise kernels run about twice as fast on contiguous tensors as on the halves of one).
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
    """The engine to run. `auto` takes grouped_mm on CUDA and the loop elsewhere (on CPU grouped_mm is
    itself a loop of the same BLAS calls). grouped_mm falls back to the loop for what its kernel lacks:
    other dtypes (float64) and rows whose byte length is not a multiple of 16."""
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
    """The products of a grouped linear layer and of its backward, for one expert-sorted row layout.

    counts: (E,) int64 on the rows' device; split_sizes: ``counts.tolist()``. Every method writes into
    ``out`` when given one (any tensor of the right shape whose per-expert blocks are contiguous).
    """

    def __init__(self, impl: str, counts: torch.Tensor, split_sizes: list[int]):
        self.impl = impl
        self.counts, self.num_experts = counts, len(split_sizes)
        self.rows = sum(split_sizes)
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32) if impl == "grouped_mm" else None
        bounds, start = [], 0
        for e, n in enumerate(split_sizes):
            if n:
                bounds.append((e, start, start + n))
            start += n
        self.bounds = bounds
        """(expert, first row, end row) of every non-empty expert."""

    def linear(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out[rows of e] = x[rows of e] @ w[e].T (+ bias[e]). x: (N, d_in), w: (E, d_out, d_in) -> (N, d_out)."""
        if self.impl == "grouped_mm":
            y = F.grouped_mm(x, w.transpose(-2, -1), offs=self.offsets)
            if bias is not None:
                y += bias.repeat_interleave(self.counts, dim=0, output_size=self.rows)
            return y if out is None else out.copy_(y)
        if out is None:
            out = x.new_empty(self.rows, w.shape[1])
        for e, a, b in self.bounds:
            if bias is None:
                torch.mm(x[a:b], w[e].t(), out=out[a:b])
            else:
                torch.addmm(bias[e], x[a:b], w[e].t(), out=out[a:b])
        return out

    def linear_input_grad(
        self, dy: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, *, accumulate: bool = False
    ) -> torch.Tensor:
        """out[rows of e] (+)= dy[rows of e] @ w[e]. dy: (N, d_out), w: (E, d_out, d_in) -> (N, d_in)."""
        if self.impl == "grouped_mm":
            dx = F.grouped_mm(dy, w, offs=self.offsets)
            if out is None:
                return dx
            return out.add_(dx) if accumulate else out.copy_(dx)
        if out is None:
            out = dy.new_empty(self.rows, w.shape[2])
        for e, a, b in self.bounds:
            if accumulate:
                out[a:b].addmm_(dy[a:b], w[e])
            else:
                torch.mm(dy[a:b], w[e], out=out[a:b])
        return out

    def linear_weight_grad(
        self, dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """out[e] = dy[rows of e].T @ x[rows of e], zero for experts without rows. -> (E, d_out, d_in)."""
        if self.impl == "grouped_mm":
            dw = F.grouped_mm(dy.t(), x, offs=self.offsets)
            return dw if out is None else out.copy_(dw)
        if out is None:
            out = dy.new_empty(self.num_experts, dy.shape[1], x.shape[1])
        if len(self.bounds) < self.num_experts:
            out.zero_()
        for e, a, b in self.bounds:
            torch.mm(dy[a:b].t(), x[a:b], out=out[e])
        return out

    def bias_grad(self, dy: torch.Tensor) -> torch.Tensor:
        """out[e] = sum of dy over the rows of e. dy: (N, d_out) -> (E, d_out)."""
        out = dy.new_zeros(self.num_experts, dy.shape[1])
        for e, a, b in self.bounds:
            torch.sum(dy[a:b], dim=0, out=out[e])
        return out


@dataclass(frozen=True)
class Activation:
    """An element-wise activation and its backward, each one aten kernel (no autograd graph)."""

    name: str

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return F.silu(h)
        if self.name == "relu":
            return F.relu(h)
        return F.gelu(h, approximate="tanh" if self.name == "gelu_tanh" else "none")

    def backward(self, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """grad * act'(h), written into ``grad``."""
        aten = torch.ops.aten
        if self.name == "silu":
            return aten.silu_backward.grad_input(grad, h, grad_input=grad)
        if self.name == "relu":
            return grad.masked_fill_(h <= 0, 0)
        approximate = "tanh" if self.name == "gelu_tanh" else "none"
        return aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=grad)


def _halves(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[gate; up] stacked along dim 1 -> (gate, up) views."""
    return (None, None) if t is None else t.chunk(2, dim=1)


class GroupedFFN(torch.autograd.Function):
    """y = act(x W1[e].T + b1[e]) W2[e].T + b2[e] per expert slice; gated: (act(gate) * up) W2[e].T + b2[e]
    with W1 = [W_gate; W_up] and b1 = [b_gate; b_up]."""

    @staticmethod
    def forward(ctx, x, w1, w2, b1, b2, gemm: GroupedGemm, act: Activation, gated: bool):
        if gated:
            (w_gate, w_up), (b_gate, b_up) = _halves(w1), _halves(b1)
            gate, up = gemm.linear(x, w_gate, b_gate), gemm.linear(x, w_up, b_up)
            y = gemm.linear(act(gate).mul_(up), w2, b2)
            ctx.save_for_backward(x, w1, w2, gate, up)
        else:
            h = gemm.linear(x, w1, b1)
            y = gemm.linear(act(h), w2, b2)
            ctx.save_for_backward(x, w1, w2, h)
        ctx.gemm, ctx.act, ctx.gated = gemm, act, gated
        return y

    @staticmethod
    def backward(ctx, dy):
        gemm, act = ctx.gemm, ctx.act
        need_x, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:5]
        dy = dy.contiguous()  # grouped_mm rejects stride-0 gradients such as the one .sum() sends
        if ctx.gated:
            x, w1, w2, gate, up = ctx.saved_tensors
            da = gemm.linear_input_grad(dy, w2)
            s = act(gate)
            dup = torch.mul(da, s)
            dw2 = gemm.linear_weight_grad(dy, s.mul_(up)) if need_w2 else None
            del s
            dgate = act.backward(da.mul_(up), gate)
            dx = dw1 = None
            if need_x:
                w_gate, w_up = _halves(w1)
                dx = gemm.linear_input_grad(dgate, w_gate)
                gemm.linear_input_grad(dup, w_up, dx, accumulate=True)
            if need_w1:
                dw1 = torch.empty_like(w1)
                gemm.linear_weight_grad(dgate, x, out=dw1[:, : gate.shape[1]])
                gemm.linear_weight_grad(dup, x, out=dw1[:, gate.shape[1] :])
            db1 = torch.cat([gemm.bias_grad(dgate), gemm.bias_grad(dup)], dim=1) if need_b1 else None
        else:
            x, w1, w2, h = ctx.saved_tensors
            da = gemm.linear_input_grad(dy, w2)
            dw2 = gemm.linear_weight_grad(dy, act(h)) if need_w2 else None
            dh = act.backward(da, h)
            dx = gemm.linear_input_grad(dh, w1) if need_x else None
            dw1 = gemm.linear_weight_grad(dh, x) if need_w1 else None
            db1 = gemm.bias_grad(dh) if need_b1 else None
        db2 = gemm.bias_grad(dy) if need_b2 else None
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
        dw = gemm.linear_weight_grad(dy, x) if need_w else None
        db = gemm.bias_grad(dy) if need_b else None
        return dx, dw, db, None
