"""Vanilla token-choice top-k over one pool, blind to modality (MoE-LLaVA / Mixtral arm, SPEC section 8)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from moiie.modality import PAD, TEXT, VISION
from moiie.registry import ROUTERS
from moiie.routers.base import LearnedRouterConfig, Router, Routing, jitter, router_logits, top_k_routing
from moiie.topology import ExpertTopology


class TopKRouterConfig(LearnedRouterConfig):
    """One router over every expert for every token; put all experts in the `shared` group."""

    kind: Literal["top_k"] = "top_k"

    def reachable(self, topology: ExpertTopology) -> dict[int, range]:
        everything = range(topology.num_experts)
        return {VISION: everything, TEXT: everything}

    def topology_problems(self, topology: ExpertTopology) -> list[str]:
        if topology.vision or topology.text:
            return [
                "router `top_k` is modality-blind, so intra-modality groups would be reached by the other "
                f"modality; put all experts in `shared` (got vision={topology.vision}, text={topology.text})"
            ]
        return []

    def example_topology(self) -> ExpertTopology:
        return ExpertTopology(vision=0, shared=4, text=0)


class TopKRouter(Router):
    """logits = W x (W: (E, d)), fp32 softmax over all experts, top-k, renormalised."""

    def __init__(
        self,
        *,
        d_model: int,
        topology: ExpertTopology,
        top_k: int = 2,
        jitter: float = 0.0,
        init_std: float = 0.02,
        renormalize: bool = True,
    ):
        super().__init__(topology=topology, top_k=top_k)
        self.jitter, self.renormalize = jitter, renormalize
        self.weight = nn.Parameter(torch.empty(topology.num_experts, d_model).normal_(0.0, init_std))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> Routing:
        logits = router_logits(jitter(x, self.jitter, self.training), self.weight)
        return top_k_routing(
            logits,
            modality,
            top_k=self.top_k,
            renormalize=self.renormalize,
            groups=[("joint", modality != PAD, self.num_experts)],
        )


@ROUTERS.register("top_k", TopKRouterConfig, example=lambda: TopKRouterConfig(top_k=2))
def build_top_k_router(config: TopKRouterConfig, *, d_model: int, topology: ExpertTopology) -> TopKRouter:
    return TopKRouter(
        d_model=d_model,
        topology=topology,
        top_k=config.top_k,
        jitter=config.jitter,
        init_std=config.init_std,
        renormalize=config.renormalize,
    )
