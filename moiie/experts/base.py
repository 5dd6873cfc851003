"""Stacked expert weights and the grouped matmul the dispatch runs them with.

Weights use the ``nn.Linear`` layout per expert, stacked: ``(num_experts, d_out, d_in)``, so
upcycling copies an HF MLP's weights straight in. Rows of the input arrive sorted by expert,
``counts[e]`` rows for expert e, so each expert works on one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

GroupedImpl = Literal["auto", "grouped_mm", "loop"]


def compute_dtype(t: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls should run in: the autocast dtype inside an autocast region, else the weights'."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return param_dtype


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: GroupedImpl, x: torch.Tensor) -> str:
    """`auto` picks grouped_mm on CUDA; grouped_mm falls back to the loop for dtypes it lacks (float64)."""
    if impl == "auto":
        impl = "grouped_mm" if x.device.type == "cuda" else "loop"
    if impl == "grouped_mm" and (not hasattr(F, "grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES):
        return "loop"
    return impl


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    split_sizes: list[int],
    *,
    bias: torch.Tensor | None = None,
    impl: GroupedImpl = "auto",
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ weight[e].T (+ bias[e]).

    x: (N, d_in) sorted by expert; weight: (E, d_out, d_in); counts: (E,) int64 on x's device, summing to N;
    split_sizes: ``counts.tolist()``. Returns (N, d_out).
    """
    dtype = compute_dtype(x, weight.dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    if resolve_impl(impl, x) == "grouped_mm":
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        y = F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    else:
        # unbind once: indexing weight[e] per expert would make backward allocate a full-size
        # zero gradient for every expert.
        y = torch.cat([F.linear(xe, we) for xe, we in zip(x.split(split_sizes), weight.unbind(0))])
    if bias is not None:
        y = y + bias.to(dtype).repeat_interleave(counts, dim=0, output_size=x.shape[0])
    return y


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
