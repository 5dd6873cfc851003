"""Auxiliary router losses (SPEC section 5).

Switch load balancing per router, over that router's non-padding tokens, all layers pooled:
    f_e = (1/T_m) sum_t sum_{j<k} [j-th choice of t is e]      (sums to k)
    P_e = (1/T_m) sum_t g_{t,e}
    L_m = |C_m| * sum_e f_e P_e                                  (= k under uniform routing)
Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field

from moiie.config_base import Config
from moiie.routers.base import RouterGroupStats, Routing


class AuxLossConfig(Config):
    """Coefficients of the router losses; each router's loss is weighted by its modality's coefficient."""

    kind: Literal["aux_loss"] = "aux_loss"
    vision: float = Field(1e-3, ge=0.0)
    """Weight of the vision router's balancing loss (paper: 0.001)."""
    text: float = Field(1e-3, ge=0.0)
    """Weight of the text router's balancing loss (paper: 0.001)."""
    joint: float = Field(1e-3, ge=0.0)
    """Weight of a modality-blind router's balancing loss (vanilla MoE arm)."""
    z_loss: float = Field(0.0, ge=0.0)
    """Weight of the router z-loss (0 = off, as in the paper; ~1e-3 is common)."""

    def balance_coef(self, group: str) -> float:
        return {"vision": self.vision, "text": self.text, "joint": self.joint}[group]


def pooled_stats(routings: Iterable[Routing | None]) -> dict[str, RouterGroupStats]:
    """Sum each router's statistics over layers (same as concatenating the layers' router outputs)."""
    pooled: dict[str, RouterGroupStats] = {}
    for routing in routings:
        if routing is None:
            continue
        for g in routing.groups:
            if g.name not in pooled:
                pooled[g.name] = g
                continue
            p = pooled[g.name]
            if (p.n_candidates, p.top_k, p.load.shape) != (g.n_candidates, g.top_k, g.load.shape):
                raise ValueError(
                    f"router {g.name!r} has different candidate sets across layers "
                    f"({p.n_candidates} vs {g.n_candidates} candidates); pooled balancing needs equal layers"
                )
            pooled[g.name] = RouterGroupStats(
                name=g.name,
                n_candidates=g.n_candidates,
                top_k=g.top_k,
                tokens=p.tokens + g.tokens,
                load=p.load + g.load,
                prob_sum=p.prob_sum + g.prob_sum,
                z_sum=p.z_sum + g.z_sum,
                balance=p.balance and g.balance,
            )
    return pooled


def balance_loss(stats: RouterGroupStats) -> torch.Tensor:
    """|C_m| * sum_e f_e P_e for one router's pooled statistics; 0 when it routed no tokens."""
    n = stats.tokens.clamp(min=1.0)
    return stats.n_candidates * (stats.load / n * stats.prob_sum / n).sum()


def z_loss(stats: RouterGroupStats) -> torch.Tensor:
    return stats.z_sum / stats.tokens.clamp(min=1.0)


def aux_losses(routings: Iterable[Routing | None], config: AuxLossConfig) -> dict[str, torch.Tensor]:
    """Unweighted losses by name (``balance/vision``, ``z/text``, ...) and their weighted sum under ``total``."""
    out: dict[str, torch.Tensor] = {}
    total = None
    for name, stats in pooled_stats(routings).items():
        terms = []
        if stats.balance:
            out[f"balance/{name}"] = balance_loss(stats)
            terms.append(config.balance_coef(name) * out[f"balance/{name}"])
        if config.z_loss > 0:
            out[f"z/{name}"] = z_loss(stats)
            terms.append(config.z_loss * out[f"z/{name}"])
        for t in terms:
            total = t if total is None else total + t
    out["total"] = total if total is not None else torch.zeros(())
    return out
