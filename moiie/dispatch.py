"""Dropless sort-based dispatch: one sort, one gather, contiguous expert slices, one weighted combine.

Every group of a MoIIE layer lives in one global id space, so a single dispatch serves vision and
text tokens together (no per-modality passes, no per-expert boolean masks).

Shapes are static: all ``T * S`` (token, slot) pairs are sorted, empty slots last, and the experts
leave those trailing rows at zero without computing them. So the dispatch has no data-dependent
shape, ``torch.compile`` traces it whole, and it never synchronises with the host: experts that
need per-expert row counts on the host (the CPU loop engine, the all-to-all of expert parallelism)
read ``counts`` themselves, and CUDA's grouped_mm engine keeps them on the device.

The gather and the combine are autograd nodes of their own. The combine sums each token's weighted
expert outputs in one fused kernel (``embedding_bag`` with per-row weights) instead of materialising
the weighted rows and scatter-adding them into zeros; its backward gathers the output gradient once
and scales it in place. The gather's backward is the same fused sum, unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moiie.routers.base import Routing


@dataclass
class SortedSlots:
    """The (token, slot) pairs of one routing, sorted by expert (empty slots last).

    order: (T*S,) flat slot ids ``t * S + j`` in sorted order; token: (T*S,) their tokens;
    rank: (T, S) the sorted row of each slot (the inverse permutation of ``order``).
    """

    order: torch.Tensor
    token: torch.Tensor
    rank: torch.Tensor

    @classmethod
    def sort(cls, key: torch.Tensor) -> SortedSlots:
        """key: (T, S) expert id of each slot, empty slots holding a value above every expert."""
        T, S = key.shape
        order = torch.argsort(key.reshape(-1), stable=True)
        positions = torch.arange(T * S, device=key.device)
        rank = torch.empty_like(order).scatter_(0, order, positions).view(T, S)
        return cls(order, torch.div(order, S, rounding_mode="floor"), rank)

    def token_sum(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] = sum_j (weights[t, j] *) rows[rank[t, j]]. rows: (T*S, d) -> (T, d)."""
        return F.embedding_bag(self.rank, rows, mode="sum", per_sample_weights=weights)


class _Gather(torch.autograd.Function):
    """x_sorted[i] = x[token[i]]; backward sums each token's rows."""

    @staticmethod
    def forward(ctx, x, slots: SortedSlots):
        ctx.slots = slots
        return x.index_select(0, slots.token)

    @staticmethod
    def backward(ctx, d_sorted):
        return ctx.slots.token_sum(d_sorted.contiguous()), None


class _Combine(torch.autograd.Function):
    """out[t] = sum_j weights[t, j] * y[rank[t, j]]."""

    @staticmethod
    def forward(ctx, y, weights, slots: SortedSlots):
        ctx.slots = slots
        ctx.save_for_backward(y, weights)
        return slots.token_sum(y, weights.to(y.dtype))

    @staticmethod
    def backward(ctx, d_out):
        y, weights = ctx.saved_tensors
        slots = ctx.slots
        d_rows = d_out.index_select(0, slots.token)
        d_weights = None
        if ctx.needs_input_grad[1]:
            d_sorted = torch.linalg.vecdot(d_rows, y)
            d_weights = d_sorted.index_select(0, slots.rank.reshape(-1)).view_as(weights).to(weights.dtype)
        w_sorted = weights.reshape(-1).index_select(0, slots.order).to(d_rows.dtype)
        return d_rows.mul_(w_sorted[:, None]), d_weights, None


def dispatch(x: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
    """y_t = sum_j weights[t, j] * expert_{ids[t, j]}(x_t) for every non-empty slot.

    x: (T, d). routing.expert_ids / weights: (T, S). Returns (T, d) in x's dtype; tokens with no
    slot (padding, fully dropped) get zeros.

    ``experts(x_sorted, counts)`` gets all T*S rows sorted by expert, ``counts[e]`` rows for expert e
    (on the device) and the empty slots' rows last (their outputs must be zero).
    """
    E = routing.num_experts
    ids = routing.expert_ids
    key = torch.where(ids >= 0, ids, E)  # empty slots sort last, into bin E
    counts = torch.zeros(E + 1, dtype=torch.long, device=ids.device)
    counts = counts.index_add_(0, key.reshape(-1), torch.ones_like(key.reshape(-1)))[:E]
    slots = SortedSlots.sort(key)
    y = experts(_Gather.apply(x, slots), counts)
    return _Combine.apply(y, routing.weights, slots).to(x.dtype)
