"""Global gradient-norm clipping for a parallel model, equal to single-process clipping.

``torch.nn.utils.clip_grad_norm_`` sees only this rank's tensors: under expert parallelism each
rank holds different experts, under FSDP2 different shards, and the shards live on two meshes
(experts over their data group, the rest over the world). Here every rank adds the squared norm
of what it holds, each element weighted by 1 / (number of ranks holding a copy of it), and one
all-reduce over the world gives the norm of the full gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moiie.parallel.parallelize import expert_parallel_layers, unwrap


def _copies(p: torch.Tensor, expert_copies: dict[int, int], world: int) -> int:
    """How many ranks hold the same elements as this rank's piece of ``p``."""
    if isinstance(p, DTensor):
        return math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements) if pl.is_replicate())
    return expert_copies.get(id(p), world)


def clip_grad_norm_(model: nn.Module, max_norm: float | None = None) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (every rank gets the same value); when ``max_norm`` is
    given, gradients are scaled in place so that it is at most ``max_norm``. A collective."""
    inner = unwrap(model)
    world = dist.get_world_size()
    expert_copies = {
        id(p): world // layer.size
        for _, layer in expert_parallel_layers(inner)
        for p in layer.experts.parameters()
    }
    pieces, square = [], None
    for p in inner.parameters():
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        pieces.append(local)
        wide = local.detach().to(torch.promote_types(local.dtype, torch.float32))  # bf16 up, fp64 kept
        term = wide.square().sum() / _copies(p, expert_copies, world)
        square = term if square is None else square + term
    if square is None:
        square = torch.zeros((), device=next(inner.parameters()).device)
    square = square.to(torch.float64)  # one dtype on every rank, whatever its pieces were
    dist.all_reduce(square)
    total = square.sqrt()
    if max_norm is not None:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in pieces:
            g.mul_(scale.to(g.dtype))
    return total
