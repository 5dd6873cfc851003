"""Expert-choice routing within each modality (MoMa, arXiv 2407.21770; Zhou et al. 2022).

For each modality m separately, every expert in C_m picks the ``capacity`` tokens of modality m
with the highest router logit (an independent sigmoid gate per expert, as in MoMa, ranks tokens
the same way), capacity = ceil(capacity_factor * top_k * T_m / |C_m|). Ranking by logits rather
than by softmax probabilities avoids a degenerate tie when a modality has a single candidate.
A token's combine weights are its softmax probabilities for the experts that picked it
(renormalised by default). Balanced by construction: no Switch loss. Not causal: whether a token is picked
depends on the other tokens of the batch, including later ones.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from moiie.modality import PAD, TEXT, VISION
from moiie.registry import ROUTERS
from moiie.routers.base import (
    LearnedRouterConfig,
    Router,
    RouterGroupStats,
    Routing,
    jitter,
    place,
    router_logits,
)
from moiie.topology import ExpertTopology


class ExpertChoiceRouterConfig(LearnedRouterConfig):
    """Experts choose tokens within each modality; top_k sets the average experts per token."""

    kind: Literal["expert_choice"] = "expert_choice"
    capacity_factor: float = Field(1.0, gt=0.0, le=64.0)
    """Scales each expert's token budget: capacity = ceil(factor * top_k * T_m / |C_m|)."""

    token_choice: ClassVar[bool] = False

    def slots(self, topology: ExpertTopology) -> int:
        return topology.num_experts


class ExpertChoiceRouter(Router):
    """Per-modality linear routers as in MoIIE; selection runs over tokens instead of experts."""

    token_choice: ClassVar[bool] = False
    causal: ClassVar[bool] = False

    def __init__(
        self,
        *,
        d_model: int,
        topology: ExpertTopology,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        jitter: float = 0.0,
        init_std: float = 0.02,
        renormalize: bool = True,
    ):
        super().__init__(topology=topology, top_k=top_k)
        self.capacity_factor, self.jitter, self.renormalize = capacity_factor, jitter, renormalize
        self.candidates = {VISION: topology.candidates(VISION), TEXT: topology.candidates(TEXT)}
        self.vision = nn.Parameter(torch.empty(len(self.candidates[VISION]), d_model).normal_(0.0, init_std))
        self.text = nn.Parameter(torch.empty(len(self.candidates[TEXT]), d_model).normal_(0.0, init_std))

    def activated_experts(self, modality: int) -> float:
        """Expected experts per token: each expert takes capacity_factor * top_k * T_m / |C_m| tokens."""
        return min(self.capacity_factor * self.top_k, float(len(self.candidates[modality])))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> Routing:
        x = jitter(x, self.jitter, self.training)
        T, E = x.shape[0], self.num_experts
        probs = torch.zeros(T, E, device=x.device)
        selected = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        capacity = torch.zeros(E, dtype=torch.long, device=x.device)
        groups = []
        for m, weight, name in ((VISION, self.vision, "vision"), (TEXT, self.text, "text")):
            mask = modality == m
            logits = place(router_logits(x, weight), self.candidates[m], E)
            p = torch.softmax(logits, dim=-1) * mask[:, None]
            probs = probs + p
            n_tokens = int(mask.sum())
            cand = self.candidates[m]
            cap = min(n_tokens, math.ceil(self.capacity_factor * self.top_k * n_tokens / len(cand)))
            capacity[cand.start : cand.stop] += cap
            if cap > 0:
                scores = logits[:, cand.start : cand.stop].masked_fill(~mask[:, None], -math.inf)
                chosen = torch.topk(scores, cap, dim=0).indices  # (cap, |C_m|) token indices
                sel = torch.zeros(T, len(cand), dtype=torch.bool, device=x.device)
                sel.scatter_(0, chosen, True)
                selected[:, cand.start : cand.stop] |= sel & mask[:, None]
            m_f = mask.float()
            groups.append(
                RouterGroupStats(
                    name=name,
                    n_candidates=len(cand),
                    top_k=self.top_k,
                    tokens=m_f.sum(),
                    load=(selected & mask[:, None]).float().sum(0),
                    prob_sum=p.sum(0),
                    z_sum=(torch.logsumexp(logits, -1).square() * m_f).sum(),
                    balance=False,
                )
            )
        weights = probs * selected
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        ids = torch.where(
            selected, torch.arange(E, device=x.device).expand(T, E), torch.full((T, E), -1, device=x.device)
        )
        real = modality != PAD
        return Routing(
            expert_ids=ids,
            weights=weights * real[:, None],
            modality=modality,
            num_experts=E,
            probs=probs,
            groups=groups,
            capacity=capacity,
        )


@ROUTERS.register("expert_choice", ExpertChoiceRouterConfig)
def build_expert_choice_router(
    config: ExpertChoiceRouterConfig, *, d_model: int, topology: ExpertTopology
) -> ExpertChoiceRouter:
    return ExpertChoiceRouter(
        d_model=d_model,
        topology=topology,
        top_k=config.top_k,
        capacity_factor=config.capacity_factor,
        jitter=config.jitter,
        init_std=config.init_std,
        renormalize=config.renormalize,
    )
