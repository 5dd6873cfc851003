"""Routing invariants any router (moiie's or a user's) must satisfy, checked on one batch.

Each invariant is a function ``(ctx) -> list[str]`` returning violations; :func:`check_router`
runs them all and raises :class:`RouterInvariantError` naming every one that failed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moiie.losses import balance_loss
from moiie.modality import PAD, TEXT, VISION
from moiie.routers.base import Routing
from moiie.topology import ExpertTopology

TOL = 1e-5


class RouterInvariantError(AssertionError):
    """A router broke one or more routing invariants; ``failures`` maps invariant name -> reasons."""

    def __init__(self, failures: dict[str, list[str]]):
        self.failures = failures
        lines = ["router broke routing invariants:"]
        for name, reasons in failures.items():
            lines += [f"  [{name}] {r}" for r in reasons[:5]]
        super().__init__("\n".join(lines))


@dataclass
class Context:
    router: nn.Module
    topology: ExpertTopology
    x: torch.Tensor
    modality: torch.Tensor
    routing: Routing
    generator: torch.Generator
    normalized: bool


def _run(router: nn.Module, x: torch.Tensor, modality: torch.Tensor) -> Routing:
    with torch.no_grad():
        return router(x, modality)


def _slots(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, w = routing.expert_ids, routing.weights
    return ids, w, ids >= 0


def weights_valid(c: Context) -> list[str]:
    """Combine weights are finite, >= 0, and sum to 1 for every routed token (unless capacity dropped slots)."""
    _ids, w, valid = _slots(c.routing)
    out = []
    if not torch.isfinite(w).all():
        out.append("combine weights contain NaN or Inf")
    if (w < 0).any():
        out.append(f"negative combine weight {w.min().item():.4g}")
    if (w[~valid] != 0).any():
        out.append("an empty slot (id -1) carries a non-zero weight")
    routed = valid.any(-1)
    sums = w.sum(-1)
    dropping = c.routing.dropped is not None and bool(c.routing.dropped.sum() > 0)
    if c.normalized and not dropping and routed.any():
        err = (sums[routed] - 1).abs().max().item()
        if err > TOL:
            out.append(f"weights of a routed token sum to {1 + err:.6g} instead of 1")
    return out


def ids_distinct(c: Context) -> list[str]:
    """A token never holds the same expert in two slots; ids are -1 or in [0, num_experts)."""
    ids, _, _valid = _slots(c.routing)
    out = []
    if ((ids < -1) | (ids >= c.topology.num_experts)).any():
        out.append(
            f"expert id outside -1..{c.topology.num_experts - 1}: {ids.min().item()}..{ids.max().item()}"
        )
    srt = ids.sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        t = int(dup.any(-1).nonzero()[0])
        out.append(f"token {t} holds expert {srt[t][1:][dup[t]][0].item()} twice: {ids[t].tolist()}")
    return out


def modality_isolation(c: Context) -> list[str]:
    """A token never reaches the other modality's intra-modality experts."""
    ids, _, valid = _slots(c.routing)
    out = []
    for m, other, name in ((VISION, "text", "vision"), (TEXT, "vision", "text")):
        forbidden = c.topology.group(other)
        hit = valid & (ids >= forbidden.start) & (ids < forbidden.stop) & (c.modality == m)[:, None]
        if hit.any():
            out.append(
                f"{hit.any(-1).sum().item()} {name} token(s) reached {other}-intra experts {list(forbidden)}"
            )
    return out


def padding_ignored(c: Context) -> list[str]:
    """Padding gets no slot, no weight, no probability and no load; adding padding changes nothing."""
    _ids, w, valid = _slots(c.routing)
    pad = c.modality == PAD
    out = []
    if (valid & pad[:, None]).any() or (w[pad] != 0).any():
        out.append("a padding token was routed to an expert")
    if c.routing.probs is not None and (c.routing.probs[pad] != 0).any():
        out.append("a padding token has non-zero router probabilities")
    counts = {"vision": (c.modality == VISION).sum().item(), "text": (c.modality == TEXT).sum().item()}
    counts["joint"] = counts["vision"] + counts["text"]
    for g in c.routing.groups:
        if g.name in counts and abs(g.tokens.item() - counts[g.name]) > 0.5:
            out.append(
                f"router {g.name!r} counted {g.tokens.item():g} tokens, expected {counts[g.name]} (padding counted?)"
            )
    # Insert padding rows at random places: the real tokens' routing and the statistics must not move.
    T, d = c.x.shape
    n_pad = max(1, T // 2)
    total = T + n_pad
    perm = torch.randperm(total, generator=c.generator)
    real_pos = perm[:T].sort().values
    x2 = torch.randn(total, d, generator=c.generator, dtype=c.x.dtype) * 10
    m2 = torch.full((total,), PAD, dtype=c.modality.dtype)
    x2[real_pos], m2[real_pos] = c.x, c.modality
    r2 = _run(c.router, x2, m2)
    a = _canonical(c.routing)
    b = _canonical(r2, rows=real_pos)
    if not (torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=TOL)):
        out.append("adding padding tokens changed the routing of real tokens")
    if (r2.expert_ids[m2 == PAD] >= 0).any():
        out.append("inserted padding tokens were routed")
    g1 = {g.name: g for g in c.routing.groups}
    for g in r2.groups:
        ref = g1.get(g.name)
        if ref is None:
            continue
        if not (
            torch.allclose(g.load, ref.load, atol=1e-4)
            and torch.allclose(g.prob_sum, ref.prob_sum, atol=1e-4)
            and abs(g.tokens.item() - ref.tokens.item()) < 0.5
        ):
            out.append(f"adding padding changed router {g.name!r}'s balancing statistics")
    return out


def _canonical(routing: Routing, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, slots sorted by expert id (slot order carries no meaning)."""
    ids, w = routing.expert_ids, routing.weights
    if rows is not None:
        ids, w = ids[rows], w[rows]
    key = torch.where(ids >= 0, ids, torch.full_like(ids, 1 << 30))
    order = key.argsort(-1)
    return ids.gather(-1, order), w.gather(-1, order)


def permutation_equivariant(c: Context) -> list[str]:
    """Dropless token-choice routing of a token does not depend on where the token sits in the batch."""
    if not getattr(c.router, "token_choice", True) or c.routing.capacity is not None:
        return []  # declared exemption (expert choice), or capacity dropping, which ranks tokens by position
    perm = torch.randperm(c.x.shape[0], generator=c.generator)
    r2 = _run(c.router, c.x[perm], c.modality[perm])
    a_ids, a_w = _canonical(c.routing, rows=perm)
    b_ids, b_w = _canonical(r2)
    if not torch.equal(a_ids, b_ids) or not torch.allclose(a_w, b_w, atol=TOL):
        return ["permuting the tokens changed their routing (the router depends on token position)"]
    return []


def dropless(c: Context) -> list[str]:
    """Without capacity, every real token is placed on at least one expert with positive weight."""
    if c.routing.capacity is not None:
        return []
    _, w, valid = _slots(c.routing)
    real = c.modality != PAD
    placed = (valid & (w > 0)).any(-1)
    missing = (real & ~placed).sum().item()
    return [f"{missing} real token(s) reached no expert in a dropless router"] if missing else []


def capacity_respected(c: Context) -> list[str]:
    """With a capacity, no expert takes more tokens than its capacity."""
    if c.routing.capacity is None:
        return []
    load = c.routing.expert_load()
    over = (load > c.routing.capacity).nonzero().flatten().tolist()
    return (
        [
            f"experts {over} took {load[over].tolist()} tokens, over capacity {c.routing.capacity[over].tolist()}"
        ]
        if over
        else []
    )


def uniform_balance(c: Context) -> list[str]:
    """Under uniform router probabilities each router's balancing loss equals its top_k.

    The router's parameters are zeroed (on a copy); routers for which that does not give uniform
    probabilities over their candidates are skipped.
    """
    params = list(c.router.parameters())
    if not params:
        return []
    router = copy.deepcopy(c.router)
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
    r = _run(router, c.x, c.modality)
    out = []
    for g in r.groups:
        if not g.balance or g.tokens.item() == 0:
            continue
        p_mean = g.prob_sum / g.tokens
        cand = p_mean[p_mean > 0]
        if cand.numel() == 0 or (cand.max() - cand.min()).item() > 1e-6:
            continue  # zeroed parameters did not give uniform probabilities: cannot judge
        loss = balance_loss(g).item()
        if abs(loss - g.top_k) > 1e-4:
            out.append(
                f"router {g.name!r}: balancing loss {loss:.6g} under uniform routing, expected top_k={g.top_k}"
            )
    return out


INVARIANTS: dict[str, Callable[[Context], list[str]]] = {
    "weights": weights_valid,
    "distinct_ids": ids_distinct,
    "modality_isolation": modality_isolation,
    "padding": padding_ignored,
    "permutation_equivariance": permutation_equivariant,
    "dropless": dropless,
    "capacity": capacity_respected,
    "uniform_balance": uniform_balance,
}


def check_router(
    router: nn.Module,
    x: torch.Tensor,
    modality: torch.Tensor,
    *,
    topology: ExpertTopology | None = None,
    normalized: bool = True,
    only: list[str] | None = None,
    seed: int = 0,
) -> None:
    """Check ``router`` on one batch against every invariant in :data:`INVARIANTS` (or ``only`` those).

    router: a module ``(x: (T, d), modality: (T,)) -> Routing`` (evaluated in eval mode, no grad);
    topology: defaults to ``router.topology``; normalized: whether combine weights should sum to 1.
    Raises :class:`RouterInvariantError` naming each violated invariant.
    """
    topology = topology if topology is not None else router.topology
    was_training = router.training
    router.eval()
    try:
        ctx = Context(
            router,
            topology,
            x,
            modality.long(),
            _run(router, x, modality.long()),
            torch.Generator().manual_seed(seed),
            normalized,
        )
        failures = {}
        for name in only or list(INVARIANTS):
            reasons = INVARIANTS[name](ctx)
            if reasons:
                failures[name] = reasons
    finally:
        router.train(was_training)
    if failures:
        raise RouterInvariantError(failures)
