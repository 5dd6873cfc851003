"""Property kit for routers: strategies plus one call that checks a router against the invariants.

Check your own registered router in a test::

    from moiie.testing import assert_router_properties
    def test_my_router():
        assert_router_properties(MyRouterConfig(top_k=2), max_examples=50)
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moiie.registry import ROUTERS
from moiie.routers.base import Router, RouterConfig
from moiie.testing.invariants import INVARIANTS, RouterInvariantError, check_router
from moiie.testing.strategies import routable_topologies, router_configs, token_batches, topologies
from moiie.topology import ExpertTopology

__all__ = [
    "INVARIANTS",
    "RouterInvariantError",
    "assert_router_properties",
    "check_router",
    "routable_topologies",
    "router_configs",
    "token_batches",
    "topologies",
]


def assert_router_properties(
    router: RouterConfig | Callable[[ExpertTopology], Router],
    *,
    d_model: int = 8,
    max_examples: int = 40,
    topology: ExpertTopology | None = None,
    normalized: bool = True,
    only: list[str] | None = None,
) -> None:
    """Property-test a router over random topologies and token batches (text, vision, padding).

    router: a config of a registered kind (built through ``moiie.ROUTERS``), or a function
    ``topology -> router module``. topology: fix one instead of drawing routable ones.
    Raises :class:`RouterInvariantError` (with hypothesis' minimal failing example) on a violation.
    """
    if isinstance(router, RouterConfig):
        config = router

        def build(topo: ExpertTopology) -> Router:
            return ROUTERS.build(config, d_model=d_model, topology=topo)

        topo_strategy = st.just(topology) if topology is not None else routable_topologies(config)
    else:
        build = router
        topo_strategy = st.just(topology or ExpertTopology())

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(topo=topo_strategy, batch=token_batches(d_model=d_model), seed=st.integers(0, 1000))
    def run(topo: ExpertTopology, batch, seed: int) -> None:
        x, modality = batch
        check_router(build(topo), x, modality, topology=topo, normalized=normalized, only=only, seed=seed)

    run()
