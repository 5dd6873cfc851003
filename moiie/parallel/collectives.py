"""The collectives expert parallelism needs, differentiable where gradients flow through them.

- :func:`all_to_all_rows`: uneven row exchange (tokens to their experts' ranks and back). It wraps
  ``torch.distributed._functional_collectives.all_to_all_single_autograd``, whose backward is the
  reverse exchange; it works on NCCL and on gloo (CPU).
- :func:`all_reduce_sum`: a sum over a group whose backward is again a sum over the group, so that
  every rank's loss term reaches every rank's inputs (used for routing statistics).
- :func:`exchange_counts`: the per-expert row counts each rank will receive (no gradient).
- :func:`check_same_across_ranks`: a fixed-size digest exchange that turns mismatched configs into an
  error on every rank instead of a hang in a later collective.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor


def all_to_all_rows(
    x: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """Send ``x[rows for rank r]`` to rank r; returns the rows received, ordered by source rank.

    x: (sum(send_splits), d) with the rows for rank 0 first, then rank 1, ...;
    returns (sum(recv_splits), d). Backward sends the gradients back the way the rows came.
    """
    if dist.get_world_size(group) == 1:
        return x
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group))


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d(sum_r x_r)/dx_s = 1 on every rank s, and rank s's output feeds rank s's loss: the gradient
        # reaching x_s is the sum of every rank's output gradient
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``; differentiable (its backward sums the gradients too)."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def exchange_counts(counts: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """counts: (P * E_local,) rows this rank sends to each expert, experts of rank r at r*E_local.. .

    Returns (P, E_local): row p = the rows rank p sends to each of this rank's experts.
    """
    size = dist.get_world_size(group)
    if size == 1:
        return counts.view(1, -1)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out.view(size, -1)


def collective_device(group: ProcessGroup | None = None) -> torch.device:
    """Where tensors for a collective on ``group`` must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_across_ranks(text: str, group: ProcessGroup | None = None, *, what: str = "config") -> None:
    """Raise ``ValueError`` on every rank unless every rank passed the same ``text``.

    Exchanges a 32-byte digest (a fixed-size all-gather, so it cannot hang on differing inputs) and
    names the ranks that disagree with rank 0.
    """
    digest = torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.int64)
    digest = digest.to(collective_device(group))
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(digest) for _ in range(size)]
    dist.all_gather(gathered, digest, group=group)
    differ = [r for r in range(size) if not torch.equal(gathered[r], gathered[0])]
    if differ:
        raise ValueError(
            f"the {what} differs across ranks: ranks {differ} disagree with rank 0 (every rank must be "
            f"launched with the same {what}; compare the YAML or JSON each rank read)"
        )
