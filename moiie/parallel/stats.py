"""Balancing-loss statistics over the global batch (SPEC section 5 under data parallelism).

The Switch loss of a router is formed from sums over tokens (:class:`RouterGroupStats`: tokens,
load, prob_sum, z_sum). Summing those sums over the ranks before forming the loss makes every
rank's balancing loss equal to the single-process loss on the concatenated global batch, instead
of an average of per-rank losses (which rewards balance within each micro-batch, a stronger and
noisier constraint, and differs from the paper's formulation whenever ranks see different mixes
of image and text tokens).

Gradients: the sum is differentiable and its backward is again a sum over the ranks. Each rank
adds the (identical) global loss to its own loss and data parallelism averages the ranks'
gradients, so the router receives exactly the gradient of the global balancing loss: the factor
of world size the backward sum introduces is cancelled by the average.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed import ProcessGroup

from moiie.parallel.collectives import all_reduce_sum
from moiie.routers.base import RouterGroupStats


def reduce_group_stats(groups: list[RouterGroupStats], group: ProcessGroup) -> list[RouterGroupStats]:
    """Every router's sums, summed over the ranks of ``group`` with one all-reduce.

    ``tokens`` and ``load`` are counts (no gradient); ``prob_sum`` and ``z_sum`` keep their gradients.
    Every rank must hold the same routers in the same order (true for replicated routers).
    """
    if not groups:
        return groups
    parts = []
    for g in groups:
        parts += [g.tokens.reshape(1), g.load, g.prob_sum, g.z_sum.reshape(1)]
    dtype = torch.float32  # counts are exact in float32 up to 2**24 tokens; sums keep a wider dtype
    for g in groups:
        dtype = torch.promote_types(dtype, g.prob_sum.dtype)
    flat = torch.cat([p.to(dtype) for p in parts])
    total = all_reduce_sum(flat, group)
    out, at = [], 0
    for g in groups:
        E = g.load.numel()
        tokens, load, prob_sum, z_sum = total[at : at + 2 * E + 2].split([1, E, E, 1])
        at += 2 * E + 2
        out.append(
            replace(
                g,
                tokens=tokens.reshape(()).detach().to(g.tokens.dtype),
                load=load.detach().to(g.load.dtype),
                prob_sum=prob_sum.to(g.prob_sum.dtype),
                z_sum=z_sum.reshape(()).to(g.z_sum.dtype),
            )
        )
    return out
