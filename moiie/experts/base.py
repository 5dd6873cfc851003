"""Stacked expert weights and the grouped products the dispatch runs them with.

Weights use the ``nn.Linear`` layout per expert, stacked: ``(num_experts, d_out, d_in)``, so
upcycling copies an HF MLP's weights straight in. Rows of the input arrive sorted by expert,
``counts[e]`` rows for expert e, so each expert works on one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moiie.experts.grouped import ExpertRows, GroupedImpl, GroupedLinear, compute_dtype, resolve_impl


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    impl: GroupedImpl = "auto",
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ weight[e].T (+ bias[e]), zero for rows past counts.sum().

    x: (N, d_in) sorted by expert; weight: (E, d_out, d_in); counts: (E,) int64 on x's device, summing
    to at most N. Returns (N, d_out) in the compute dtype.
    """
    dtype = compute_dtype(x, weight.dtype)
    with torch.autocast(x.device.type, enabled=False):
        x, weight = x.contiguous().to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        rows = ExpertRows(resolve_impl(impl, x, *weight.shape[1:]), counts, x.shape[0])
        return GroupedLinear.apply(x, weight, bias, rows)


def all_experts_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Every expert on every row, as one matmul. x: (T, d_in) -> (T, E, d_out)."""
    E, d_out, d_in = weight.shape
    dtype = compute_dtype(x, weight.dtype)
    y = F.linear(
        x.to(dtype),
        weight.to(dtype).reshape(E * d_out, d_in),
        None if bias is None else bias.to(dtype).reshape(-1),
    )
    return y.view(*x.shape[:-1], E, d_out)


def all_experts_sum_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum over experts of h[:, e] @ weight[e].T, as one matmul. h: (T, E, d_in), weight: (E, d_out, d_in) -> (T, d_out)."""
    E, d_out, d_in = weight.shape
    dtype = compute_dtype(h, weight.dtype)
    w = weight.to(dtype).permute(1, 0, 2).reshape(d_out, E * d_in)
    return F.linear(h.to(dtype).reshape(*h.shape[:-2], E * d_in), w)


@dataclass
class DenseFFNWeights:
    """One dense FFN's weights in ``nn.Linear`` layout, as read from a backbone for upcycling."""

    up: torch.Tensor
    """(d_ff, d_model) (for SwiGLU: the up projection)."""
    down: torch.Tensor
    """(d_model, d_ff)."""
    gate: torch.Tensor | None = None
    """(d_ff, d_model) SwiGLU gate projection, None for plain MLPs."""
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: str = "silu"
    """Activation name as the backbone applies it (e.g. silu, gelu, gelu_tanh)."""

    @property
    def d_ff(self) -> int:
        return self.up.shape[0]

    @property
    def d_model(self) -> int:
        return self.up.shape[1]
