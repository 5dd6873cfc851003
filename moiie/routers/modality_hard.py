"""Hard modality experts (CogVLM / VLMo arm, SPEC section 8): no learned router, no auxiliary loss.

Each token goes to its own modality's intra experts, with equal weights when a group has several.
"""

from __future__ import annotations

from typing import Literal

import torch

from moiie.modality import TEXT, VISION
from moiie.registry import ROUTERS
from moiie.routers.base import Router, RouterConfig, Routing
from moiie.topology import ExpertTopology


class ModalityHardRouterConfig(RouterConfig):
    """Route by modality alone: vision tokens to the vision group, text tokens to the text group."""

    kind: Literal["modality_hard"] = "modality_hard"

    def reachable(self, topology: ExpertTopology) -> dict[int, range]:
        return {VISION: topology.group("vision"), TEXT: topology.group("text")}

    def slots(self, topology: ExpertTopology) -> int:
        return max(topology.vision, topology.text, 1)

    def topology_problems(self, topology: ExpertTopology) -> list[str]:
        problems = []
        if topology.shared:
            problems.append(
                f"router `modality_hard` never uses shared experts; set shared=0 (got {topology.shared})"
            )
        for name in ("vision", "text"):
            if getattr(topology, name) == 0:
                problems.append(f"router `modality_hard` needs at least one {name} expert (got {name}=0)")
        return problems

    def example_topology(self) -> ExpertTopology:
        return ExpertTopology(vision=1, shared=0, text=1)


class ModalityHardRouter(Router):
    """Fixed assignment; slots = max(|I_v|, |I_t|), unused slots empty."""

    def __init__(self, *, topology: ExpertTopology):
        slots = max(topology.vision, topology.text)
        super().__init__(topology=topology, top_k=slots)
        ids, weights = torch.full((2, slots), -1), torch.zeros(2, slots)
        for modality in (TEXT, VISION):
            group = topology.intra(modality)
            ids[modality, : len(group)] = torch.tensor(list(group))
            weights[modality, : len(group)] = 1.0 / len(group)
        self.register_buffer("table_ids", ids, persistent=False)
        self.register_buffer("table_weights", weights, persistent=False)

    def activated_experts(self, modality: int) -> float:
        return float(len(self.topology.intra(modality)))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> Routing:
        row = modality.clamp(min=0)
        real = (modality >= 0)[:, None]
        ids = torch.where(real, self.table_ids[row], torch.full_like(self.table_ids[row], -1))
        weights = torch.where(real, self.table_weights[row], torch.zeros_like(self.table_weights[row]))
        return Routing(expert_ids=ids, weights=weights, modality=modality, num_experts=self.num_experts)


@ROUTERS.register("modality_hard", ModalityHardRouterConfig)
def build_modality_hard_router(
    config: ModalityHardRouterConfig, *, d_model: int, topology: ExpertTopology
) -> ModalityHardRouter:
    return ModalityHardRouter(topology=topology)
