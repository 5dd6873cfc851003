"""Dropless sort-based dispatch: one sort, one gather, contiguous expert slices, one weighted combine.

Every group of a MoIIE layer lives in one global id space, so a single dispatch serves vision and
text tokens together (no per-modality passes, no per-expert boolean masks).

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
    """Where every routed (token, slot) pair sits once sorted by expert.

    order: (N,) flat slot ids ``t * S + j`` in expert order (N = routed slots); token: (N,) their tokens;
    bag_rows / bag_offsets: for every token in order, the sorted rows of its routed slots, in the
    ``input`` / ``offsets`` form ``F.embedding_bag`` takes; bag_slots: the flat slot ids of bag_rows
    (None when every slot is routed: then they are simply 0 .. T*S-1).
    """

    order: torch.Tensor
    token: torch.Tensor
    bag_rows: torch.Tensor
    bag_offsets: torch.Tensor
    bag_slots: torch.Tensor | None

    @classmethod
    def build(cls, key: torch.Tensor, n_routed: int, num_slots: int) -> SortedSlots:
        """key: (T*S,) expert id per flat slot, empty slots holding a value above every expert."""
        order = torch.argsort(key, stable=True)
        # rank[i]: the sorted row of flat slot i; routed slots come first, so they get ranks < n_routed
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        order = order[:n_routed]
        token = torch.div(order, num_slots, rounding_mode="floor")
        if n_routed == key.numel():
            offsets = torch.arange(0, n_routed, num_slots, device=key.device)
            return cls(order, token, rank, offsets, None)
        routed = rank < n_routed
        per_token = routed.view(-1, num_slots).sum(1)
        bag_slots = routed.nonzero().squeeze(1)
        return cls(order, token, rank[bag_slots], torch.cumsum(per_token, 0) - per_token, bag_slots)

    def bag_sum(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] = sum over t's routed slots of (weight *) rows[sorted row]. rows: (N, d) -> (T, d)."""
        return F.embedding_bag(self.bag_rows, rows, self.bag_offsets, mode="sum", per_sample_weights=weights)


class _Gather(torch.autograd.Function):
    """x_sorted = x[token]; backward sums each token's rows."""

    @staticmethod
    def forward(ctx, x, slots: SortedSlots):
        ctx.slots = slots
        return x.index_select(0, slots.token)

    @staticmethod
    def backward(ctx, d_sorted):
        return ctx.slots.bag_sum(d_sorted.contiguous()), None


class _Combine(torch.autograd.Function):
    """out[t] = sum over t's routed slots j of weights[t, j] * y[row of (t, j)]."""

    @staticmethod
    def forward(ctx, y, weights, slots: SortedSlots):
        w = weights.reshape(-1)
        if slots.bag_slots is not None:
            w = w.index_select(0, slots.bag_slots)
        ctx.slots = slots
        ctx.save_for_backward(y, weights)
        return slots.bag_sum(y, w.to(y.dtype))

    @staticmethod
    def backward(ctx, d_out):
        y, weights = ctx.saved_tensors
        slots = ctx.slots
        d_rows = d_out.index_select(0, slots.token)
        d_weights = None
        if ctx.needs_input_grad[1]:
            d_sorted_w = torch.linalg.vecdot(d_rows, y).to(weights.dtype)
            d_weights = torch.zeros_like(weights).view(-1).index_copy_(0, slots.order, d_sorted_w)
            d_weights = d_weights.view_as(weights)
        w_sorted = weights.reshape(-1).index_select(0, slots.order).to(d_rows.dtype)
        return d_rows.mul_(w_sorted[:, None]), d_weights, None


def dispatch(x: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
    """y_t = sum_j weights[t, j] * expert_{ids[t, j]}(x_t) for every non-empty slot.

    x: (T, d). routing.expert_ids / weights: (T, S). Returns (T, d) in x's dtype; tokens with no
    slot (padding, fully dropped) get zeros.
    """
    T, S = routing.expert_ids.shape
    E = routing.num_experts
    flat = routing.expert_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, E)  # empty slots sort last, into bin E
    counts = torch.bincount(key, minlength=E + 1)
    split_sizes = counts.tolist()  # the only host sync: expert slice sizes
    slots = SortedSlots.build(key, T * S - split_sizes[E], S)
    y = experts(_Gather.apply(x, slots), counts[:E], split_sizes[:E])
    return _Combine.apply(y, routing.weights, slots).to(x.dtype)
