"""Expert parallelism for one MoE layer: each rank holds a contiguous slice of the global expert ids.

The global id space ``[vision-intra | shared | text-intra]`` (SPEC section 2) is cut into equal
contiguous slices, one per rank of the expert-parallel group, whatever the groups: with the
released 1/2/1 layout on two ranks, rank 0 holds the vision expert and the first shared expert,
rank 1 the second shared expert and the text expert. Per token the layer computes exactly what
:class:`moiie.layer.MoELayer` computes (SPEC section 3), dropless:

1. the router (replicated) routes this rank's tokens; ids are global;
2. the sort-based dispatch (:func:`moiie.dispatch.dispatch`) orders the (token, slot) rows by
   global expert, so the rows for each rank are one contiguous block;
3. the per-expert row counts are exchanged, then the rows (uneven all-to-all);
4. each rank runs its experts on what it received, regrouped by expert;
5. the outputs travel back by the reverse all-to-all and the dispatch combines them on the
   source rank with the combine weights (so weights and their gradients never leave the rank).

Always-on experts are replicated. Routing statistics are summed over ``stats_group`` before the
balancing loss sees them (:mod:`moiie.parallel.stats`). Token-choice routers (modality_guided,
top_k, shared_pool, modality_hard) decide per token, so an expert-parallel run on a split batch
routes exactly like one process on the whole batch. Expert choice and capacity factors pick or drop
tokens within each rank's own batch (capacity is per rank), as in every expert-parallel system.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from moiie.layer import MoELayer, moe_forward
from moiie.parallel.collectives import all_to_all_rows, exchange_counts
from moiie.parallel.stats import reduce_group_stats
from moiie.routers.base import Router, Routing


def expert_slice(num_experts: int, rank: int, size: int) -> range:
    """Global ids of the experts rank ``rank`` of an expert-parallel group of ``size`` ranks holds."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in an expert-parallel group of size {size}")
    if num_experts % size:
        raise ValueError(
            f"{num_experts} experts cannot be split evenly over an expert-parallel size of {size}; "
            f"choose an expert-parallel size that divides {num_experts}"
        )
    n = num_experts // size
    return range(rank * n, (rank + 1) * n)


def slice_experts(experts: nn.Module, ids: range) -> nn.Module:
    """A copy of a stacked-experts module that holds only experts ``ids`` (every tensor sliced on dim 0).

    Every parameter and buffer of an experts module stacks its experts on dim 0 (moiie.experts);
    the full weights are not copied, only the slice.
    """
    E = experts.num_experts
    memo: dict[int, object] = {}
    for name, t in [*experts.named_parameters(), *experts.named_buffers()]:
        if t.dim() == 0 or t.shape[0] != E:
            raise ValueError(
                f"{type(experts).__name__}.{name} has shape {tuple(t.shape)}: expert tensors must stack "
                f"the {E} experts on dim 0 to be split across ranks"
            )
        part = t.detach()[ids.start : ids.stop].clone()
        memo[id(t)] = (
            nn.Parameter(part, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else part
        )
    local = copy.deepcopy(experts, memo)
    local.num_experts = len(ids)
    return local


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ExpertParallelMoE(nn.Module):
    """An MoE layer whose routed experts are split across ``group``.

    ``forward(x: (..., d_model), modality: (...) int) -> (y: (..., d_model), Routing)``, like
    :class:`moiie.layer.MoELayer`. Submodule names match MoELayer's, so state-dict keys match too;
    ``experts`` holds (num_experts / group size) experts, global ids ``self.expert_ids``.
    ``stats_group``: the ranks whose routing statistics are summed, i.e. the ranks that share one
    global batch (default ``group``; the whole world under data x expert parallelism).
    ``expert_grad_scale`` multiplies the gradient of the expert weights, not the one that flows back
    to the tokens. At 1 (default) each expert's gradient is the gradient of the sum of the group's
    losses; :func:`moiie.parallel.parallelize` sets 1 / group size, so that with the data-parallel
    average experts train on the mean of the ranks' losses like every replicated parameter.
    Every rank of ``group`` must call forward (and backward) the same number of times.
    """

    def __init__(
        self,
        *,
        router: Router,
        experts: nn.Module,
        num_experts: int,
        group: ProcessGroup,
        always_on: nn.Module | None = None,
        capacity_factor: float | None = None,
        stats_group: ProcessGroup | None = None,
        expert_grad_scale: float = 1.0,
    ):
        super().__init__()
        self.group = group
        self.stats_group = group if stats_group is None else stats_group
        self.expert_grad_scale = expert_grad_scale
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.expert_ids = expert_slice(num_experts, self.rank, self.size)
        if router.num_experts != num_experts:
            raise ValueError(f"router routes over {router.num_experts} experts, not {num_experts}")
        if experts.num_experts != len(self.expert_ids):
            raise ValueError(
                f"rank {self.rank} of {self.size} must hold {len(self.expert_ids)} experts, "
                f"but the experts module holds {experts.num_experts}"
            )
        self.num_experts = num_experts
        self.router, self.experts, self.always_on = router, experts, always_on
        self.capacity_factor = capacity_factor

    @classmethod
    def from_layer(
        cls,
        layer: MoELayer,
        *,
        group: ProcessGroup,
        stats_group: ProcessGroup | None = None,
        expert_grad_scale: float = 1.0,
    ) -> ExpertParallelMoE:
        """This rank's part of a built single-process layer: its expert slice, everything else shared."""
        E = layer.experts.num_experts
        ids = expert_slice(E, dist.get_rank(group), dist.get_world_size(group))
        return cls(
            router=layer.router,
            experts=slice_experts(layer.experts, ids),
            num_experts=E,
            group=group,
            always_on=layer.always_on,
            capacity_factor=layer.capacity_factor,
            stats_group=stats_group,
            expert_grad_scale=expert_grad_scale,
        )

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        y, routing = moe_forward(self, x, modality, self._remote_experts)
        return y, routing.with_(groups=reduce_group_stats(routing.groups, self.stats_group))

    def _remote_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts interface dispatch calls, with the experts on their owning ranks.

        x_sorted: (N, d) rows sorted by global expert, ``counts[e]`` of them for expert e, then any
        rows of empty slots (their outputs are zeros).
        Returns (N, d): each row's expert output, in the same order.
        """
        P, n_local = self.size, len(self.expert_ids)
        split_sizes = counts.tolist()
        routed = sum(split_sizes)
        empty = x_sorted.shape[0] - routed
        send = [sum(split_sizes[r * n_local : (r + 1) * n_local]) for r in range(P)]
        from_rank = exchange_counts(counts, self.group)  # (P, n_local)
        table = from_rank.tolist()
        recv = [sum(row) for row in table]
        rows = all_to_all_rows(x_sorted[:routed] if empty else x_sorted, recv, send, self.group)
        # received rows are grouped by source rank, then expert; the experts need them by expert
        order = None
        if P > 1 and n_local > 1:
            expert_of_row = torch.arange(n_local, device=rows.device).repeat(P)
            expert_of_row = expert_of_row.repeat_interleave(from_rank.reshape(-1), output_size=sum(recv))
            order = torch.argsort(expert_of_row, stable=True)
            rows = rows.index_select(0, order)
        local_counts = from_rank.sum(0)
        scale = self.expert_grad_scale
        if scale != 1.0:  # scale the output gradient the experts see, undo it on their input gradient
            rows = _ScaleGrad.apply(rows, 1.0 / scale)
        y = self.experts(rows, local_counts)
        if scale != 1.0:
            y = _ScaleGrad.apply(y, scale)
        if order is not None:
            inverse = torch.empty_like(order).scatter_(
                0, order, torch.arange(order.numel(), device=order.device)
            )
            y = y.index_select(0, inverse)
        y = all_to_all_rows(y, send, recv, self.group)
        return F.pad(y, (0, 0, 0, empty)) if empty else y
