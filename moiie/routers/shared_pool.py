"""Inter-only arm (SPEC section 8): per-modality routers over the shared pool only.

It is MoIIE routing on a topology without intra-modality groups; the separate kind makes the arm
explicit in configs and rejects a topology whose intra experts nobody could reach.
"""

from __future__ import annotations

from typing import Literal

from moiie.registry import ROUTERS
from moiie.routers.base import LearnedRouterConfig
from moiie.routers.modality_guided import ModalityGuidedRouter
from moiie.topology import ExpertTopology


class SharedPoolRouterConfig(LearnedRouterConfig):
    """Vision and text each get their own router, both over the `shared` group only."""

    kind: Literal["shared_pool"] = "shared_pool"

    def topology_problems(self, topology: ExpertTopology) -> list[str]:
        if topology.vision or topology.text:
            return [
                "router `shared_pool` routes only over the shared group, so intra-modality experts would be "
                f"unreachable; set vision=0 and text=0 (got vision={topology.vision}, text={topology.text})"
            ]
        return []

    def example_topology(self) -> ExpertTopology:
        return ExpertTopology(vision=0, shared=4, text=0)


@ROUTERS.register("shared_pool", SharedPoolRouterConfig)
def build_shared_pool_router(
    config: SharedPoolRouterConfig, *, d_model: int, topology: ExpertTopology
) -> ModalityGuidedRouter:
    return ModalityGuidedRouter(
        d_model=d_model,
        topology=topology,
        top_k=config.top_k,
        jitter=config.jitter,
        init_std=config.init_std,
        renormalize=config.renormalize,
    )
