"""Routers; importing this package registers every built-in kind in ``moiie.ROUTERS``."""

from moiie.routers import expert_choice, modality_guided, modality_hard, shared_pool, top_k  # noqa: F401
from moiie.routers.base import (
    LearnedRouterConfig,
    Router,
    RouterConfig,
    RouterGroupStats,
    Routing,
    apply_capacity,
    top_k_routing,
)

__all__ = [
    "LearnedRouterConfig",
    "Router",
    "RouterConfig",
    "RouterGroupStats",
    "Routing",
    "apply_capacity",
    "top_k_routing",
]
