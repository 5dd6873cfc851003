"""Dropless sort-based dispatch: one sort, one gather, contiguous expert slices, one scatter-add.

Every group of a MoIIE layer lives in one global id space, so a single dispatch serves vision and
text tokens together (no per-modality passes, no per-expert boolean masks).
"""

from __future__ import annotations

import torch
from torch import nn

from moiie.routers.base import Routing


def dispatch(x: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
    """y_t = sum_j weights[t, j] * expert_{ids[t, j]}(x_t) for every non-empty slot.

    x: (T, d). routing.expert_ids / weights: (T, S). Returns (T, d) in x's dtype; tokens with no
    slot (padding, fully dropped) get zeros.
    """
    T, S = routing.expert_ids.shape
    E = routing.num_experts
    flat = routing.expert_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, E))  # empty slots sort last, into bin E
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)
    split_sizes = counts.tolist()  # the only host sync: expert slice sizes
    n_routed = T * S - split_sizes[E]
    order = order[:n_routed]
    token = order // S
    y = experts(x.index_select(0, token), counts[:E], split_sizes[:E])
    w = routing.weights.reshape(-1).index_select(0, order)
    y = y * w.to(y.dtype)[:, None]
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
