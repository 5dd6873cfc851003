"""MoIIE routing (SPEC section 3): one router per modality over its intra experts plus the shared pool.

g_t = softmax(W_m(t) x_t) in float32 over C_m(t) only; K_t = top-k(g_t); w = g / sum_{K_t} g.
With an empty shared group this is the "intra-only" arm (routed modality pools).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from moiie.modality import TEXT, VISION
from moiie.registry import ROUTERS
from moiie.routers.base import (
    LearnedRouterConfig,
    Router,
    Routing,
    jitter,
    place,
    router_logits,
    top_k_routing,
)
from moiie.topology import ExpertTopology


class ModalityGuidedRouterConfig(LearnedRouterConfig):
    """Per-modality routers over C_vision = I_v ∪ S and C_text = S ∪ I_t."""

    kind: Literal["modality_guided"] = "modality_guided"


class ModalityGuidedRouter(Router):
    """Two bias-free linear routers, W_vision: d -> |C_vision| and W_text: d -> |C_text|."""

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
        self.vision_candidates = topology.candidates(VISION)
        self.text_candidates = topology.candidates(TEXT)
        self.vision = nn.Parameter(torch.empty(len(self.vision_candidates), d_model).normal_(0.0, init_std))
        self.text = nn.Parameter(torch.empty(len(self.text_candidates), d_model).normal_(0.0, init_std))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> Routing:
        x = jitter(x, self.jitter, self.training)
        E = self.num_experts
        # Both routers run on every token (a few kFLOPs each) so the routing has no data-dependent
        # shapes; torch.where keeps each router's gradient to its own modality's tokens.
        # one product for both routers: x is read (and, in backward, its gradient written) once
        both = router_logits(x, torch.cat([self.vision, self.text]))
        vision_logits, text_logits = both.split([len(self.vision_candidates), len(self.text_candidates)], 1)
        vision_logits = place(vision_logits, self.vision_candidates, E)
        text_logits = place(text_logits, self.text_candidates, E)
        is_vision = modality == VISION
        logits = torch.where(is_vision[:, None], vision_logits, text_logits)
        return top_k_routing(
            logits,
            modality,
            top_k=self.top_k,
            renormalize=self.renormalize,
            groups=[
                ("vision", is_vision, len(self.vision_candidates)),
                ("text", modality == TEXT, len(self.text_candidates)),
            ],
        )


@ROUTERS.register("modality_guided", ModalityGuidedRouterConfig)
def build_modality_guided_router(
    config: ModalityGuidedRouterConfig, *, d_model: int, topology: ExpertTopology
) -> ModalityGuidedRouter:
    return ModalityGuidedRouter(
        d_model=d_model,
        topology=topology,
        top_k=config.top_k,
        jitter=config.jitter,
        init_std=config.init_std,
        renormalize=config.renormalize,
    )
