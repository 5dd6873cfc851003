"""What every router returns, the router base class and config base, and shared top-k machinery.

All routers share one output structure (:class:`Routing`): per token, the chosen experts as ids in
the layer's global id space (``[vision-intra | shared | text-intra]``, see :mod:`moiie.topology`),
their combine weights, and per learned router the sums the balancing losses need (SPEC section 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moiie.config_base import Config
from moiie.modality import PAD, TEXT, VISION
from moiie.topology import ExpertTopology


@dataclass
class RouterGroupStats:
    """Sums over the tokens one learned router routed (padding excluded), for the losses.

    Summing these over layers and then forming the loss equals the SPEC's "all layers' router
    outputs concatenated" formulation, without keeping per-token tensors around.
    """

    name: str
    """Which router: "vision", "text" (per-modality routers) or "joint" (modality-blind)."""
    n_candidates: int
    """|C_m|: how many experts this router chooses among."""
    top_k: int
    tokens: torch.Tensor
    """() float: number of tokens this router routed."""
    load: torch.Tensor
    """(num_experts,) float: number of (token, slot) selections of each expert; sums to top_k * tokens."""
    prob_sum: torch.Tensor
    """(num_experts,) float32: sum over tokens of the router probabilities (differentiable)."""
    z_sum: torch.Tensor
    """() float32: sum over tokens of logsumexp(logits)^2 (differentiable)."""
    balance: bool = True
    """False for routers balanced by construction (expert choice): no Switch loss for them."""


@dataclass
class Routing:
    """One layer's routing decision for T tokens with S slots per token.

    Empty slots (padding, dropped by capacity, or unused) have id -1 and weight 0.
    """

    expert_ids: torch.Tensor
    """(T, S) int64 global expert ids, -1 for an empty slot."""
    weights: torch.Tensor
    """(T, S) float32 combine weights, 0 for an empty slot."""
    modality: torch.Tensor
    """(T,) int64: 0 text, 1 vision, -1 padding."""
    num_experts: int
    probs: torch.Tensor | None = None
    """(T, num_experts) float32 router probabilities (0 outside a token's candidates and for padding)."""
    groups: list[RouterGroupStats] = field(default_factory=list)
    capacity: torch.Tensor | None = None
    """(num_experts,) int64 maximum number of tokens each expert may take, or None when dropless."""
    dropped: torch.Tensor | None = None
    """(2,) int64 (token, slot) assignments dropped by capacity, indexed by modality (0 text, 1 vision)."""

    def with_(self, **changes) -> Routing:
        return replace(self, **changes)

    def expert_load(self) -> torch.Tensor:
        """(num_experts,) int64 number of tokens placed on each expert."""
        ids = self.expert_ids.reshape(-1)
        valid = ids >= 0
        return torch.zeros(self.num_experts, dtype=torch.long, device=ids.device).index_add_(
            0, ids.clamp(min=0), valid.long()
        )


class RouterConfig(Config):
    """Base of router configs: how a router reaches the topology's experts."""

    token_choice: ClassVar[bool] = True

    def reachable(self, topology: ExpertTopology) -> dict[int, range]:
        """Global expert ids each modality's tokens may reach under this router."""
        return {VISION: topology.candidates(VISION), TEXT: topology.candidates(TEXT)}

    def slots(self, topology: ExpertTopology) -> int:
        """Number of slots per token in the routing this router produces."""
        raise NotImplementedError

    def topology_problems(self, topology: ExpertTopology) -> list[str]:
        """Router-specific topology rules, as readable reasons (empty when fine)."""
        return []

    def example_topology(self) -> ExpertTopology:
        """A small topology this router accepts (contract tests, property kit, demo)."""
        return ExpertTopology(vision=1, shared=2, text=1)


class LearnedRouterConfig(RouterConfig):
    """Fields every learned router shares."""

    top_k: int = Field(2, ge=1, le=64)
    """Experts chosen per token (k)."""
    jitter: float = Field(0.0, ge=0.0, lt=1.0)
    """Router input jitter during training: x <- x * U[1-eps, 1+eps] (SPEC section 3; 0 disables)."""
    init_std: float = Field(0.02, gt=0.0)
    """Std of the N(0, std) router weight init (SPEC section 6)."""
    renormalize: bool = True
    """Renormalise the top-k probabilities to sum to 1 (SPEC section 3)."""

    def slots(self, topology: ExpertTopology) -> int:
        return self.top_k


class Router(nn.Module):
    """Base of all routers. ``forward(x: (T, d), modality: (T,)) -> Routing``."""

    token_choice: ClassVar[bool] = True
    """Each token picks its experts (False for expert choice, which is exempt from equivariance)."""
    causal: ClassVar[bool] = True
    """A token's routing depends only on itself (and earlier tokens); expert choice is not causal."""

    def __init__(self, *, topology: ExpertTopology, top_k: int):
        super().__init__()
        self.topology = topology
        self.num_experts = topology.num_experts
        self.top_k = top_k

    def activated_experts(self, modality: int) -> float:
        """Experts one token of ``modality`` runs through (on average, for expert choice); for the ledger."""
        return float(self.top_k)

    def parameters_for(self, modality: int) -> int:
        """Router parameters one token of ``modality`` uses (a per-modality router uses only its own)."""
        other = {VISION: "text", TEXT: "vision"}[modality]
        return sum(p.numel() for n, p in self.named_parameters() if n.split(".")[-1] != other)


def jitter(x: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    if not training or eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


class _Float32Linear(torch.autograd.Function):
    """x @ w.T computed in float32 for any input dtype; saves x in its own dtype and casts it again in
    backward, so a bf16 layer keeps no float32 copy of its hidden states alive for the router."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, d_logits):
        x, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (d_logits @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (d_logits.t() @ x.float()).to(weight.dtype)
        return dx, dw


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in float32 (SPEC: softmax in float32), or float64 for a float64 model,
    independent of any autocast region."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype == dtype and weight.dtype == dtype:
            return F.linear(x, weight)
        if dtype == torch.float32:
            return _Float32Linear.apply(x, weight)
        return F.linear(x.to(dtype), weight.to(dtype))


def place(logits: torch.Tensor, ids: range, num_experts: int) -> torch.Tensor:
    """Put candidate logits (T, |ids|) at their global columns of a (T, num_experts) tensor, -inf elsewhere."""
    return F.pad(logits, (ids.start, num_experts - ids.stop), value=-math.inf)


def top_k_routing(
    logits: torch.Tensor,
    modality: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    groups: list[tuple[str, torch.Tensor, int]],
) -> Routing:
    """Token-choice top-k over masked global logits.

    logits: (T, E) float32, -inf outside each token's candidates (padding rows must be finite somewhere).
    groups: (name, token mask (T,) bool, n_candidates) for each learned router, masks disjoint.
    """
    num_experts = logits.shape[-1]
    real = modality != PAD
    probs = torch.softmax(logits, dim=-1)
    top_p, top_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    weights = torch.where(real[:, None], top_p, torch.zeros_like(top_p))
    ids = torch.where(real[:, None], top_ids, torch.full_like(top_ids, -1))
    probs = probs * real[:, None]
    lse = torch.logsumexp(logits, dim=-1)
    stats = []
    for name, mask, n_candidates in groups:
        m = mask.to(probs.dtype)
        load = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device).index_add_(
            0, top_ids.reshape(-1), m.repeat_interleave(top_k)
        )
        stats.append(
            RouterGroupStats(
                name=name,
                n_candidates=n_candidates,
                top_k=top_k,
                tokens=m.sum(),
                load=load,
                prob_sum=(probs * m[:, None]).sum(0),
                z_sum=(lse.square() * m).sum(),
            )
        )
    return Routing(
        expert_ids=ids, weights=weights, modality=modality, num_experts=num_experts, probs=probs, groups=stats
    )


def apply_capacity(routing: Routing, capacity_factor: float) -> Routing:
    """Drop (token, slot) assignments past each expert's capacity (Switch / GShard style).

    capacity = ceil(capacity_factor * assigned slots / num_experts). Priority goes to first choices,
    then to earlier tokens. Dropped slots get id -1 and weight 0 and are counted per modality.
    """
    ids = routing.expert_ids
    T, S = ids.shape
    E = routing.num_experts
    flat = ids.t().reshape(-1)  # slot-major: every token's first choice outranks any second choice
    valid = flat >= 0
    n_assigned = valid.sum()
    cap = torch.ceil(n_assigned.float() * capacity_factor / E).long()
    key = torch.where(valid, flat, torch.full_like(flat, E))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    keep = valid & (rank < cap)
    keep = keep.reshape(S, T).t()
    slot_modality = routing.modality[:, None].expand(T, S)
    lost = (ids >= 0) & ~keep
    dropped = torch.zeros(2, dtype=torch.long, device=ids.device).index_add_(
        0, slot_modality.clamp(min=0).reshape(-1), lost.reshape(-1).long()
    )
    return routing.with_(
        expert_ids=torch.where(keep, ids, torch.full_like(ids, -1)),
        weights=torch.where(keep, routing.weights, torch.zeros_like(routing.weights)),
        capacity=cap.expand(E).clone(),
        dropped=dropped,
    )
