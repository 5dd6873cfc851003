"""The routing property kit: every built-in router passes; a deliberately broken router is caught by each invariant."""

import dataclasses

import pytest
import torch
from conftest import make_batch
from hypothesis import given, settings

from moiie import ROUTERS
from moiie.routers.base import Router
from moiie.testing import (
    INVARIANTS,
    RouterInvariantError,
    assert_router_properties,
    check_router,
    router_configs,
)
from moiie.testing.strategies import token_batches
from moiie.topology import ExpertTopology


@pytest.mark.parametrize("kind", ROUTERS.names())
def test_builtin_router_satisfies_invariants(kind):
    assert_router_properties(ROUTERS.example(kind), max_examples=40)


@settings(max_examples=60, deadline=None)
@given(pair=router_configs(), batch=token_batches(d_model=8))
def test_random_router_configs_satisfy_invariants(pair, batch):
    config, topology = pair
    x, modality = batch
    check_router(ROUTERS.build(config, d_model=8, topology=topology), x, modality, topology=topology)


def test_capacity_routing_satisfies_invariants():
    from moiie import MoEConfig, build_ffn

    layer = build_ffn(
        MoEConfig(
            router={"kind": "top_k"},
            topology={"vision": 0, "shared": 4, "text": 0},
            expert={"kind": "swiglu", "d_ff": 8},
            capacity_factor=0.75,
        ),
        d_model=8,
    )

    class Capped(torch.nn.Module):
        topology = layer.router.topology

        def forward(self, x, modality):
            from moiie.routers.base import apply_capacity

            return apply_capacity(layer.router(x, modality), 0.75)

    x, modality = make_batch(T=40, d=8)
    check_router(Capped(), x, modality, topology=Capped.topology)


class Broken(Router):
    """Wraps a good router and corrupts its output in one way."""

    def __init__(self, inner, corrupt, token_choice=True):
        super().__init__(topology=inner.topology, top_k=inner.top_k)
        self.inner, self.corrupt = inner, corrupt
        self.token_choice = token_choice

    def forward(self, x, modality):
        return self.corrupt(self.inner(x, modality), x, modality)


TOPO = ExpertTopology(vision=1, shared=2, text=1)


def _mg(topology=TOPO):
    return ROUTERS.build(ROUTERS.example("modality_guided"), d_model=8, topology=topology)


def negative_weights(r, x, m):
    return r.with_(weights=torch.where(r.expert_ids >= 0, -r.weights, r.weights))


def unnormalised(r, x, m):
    return r.with_(weights=r.weights * 0.7)


def duplicate_ids(r, x, m):
    ids = r.expert_ids.clone()
    ids[:, 1] = ids[:, 0]
    return r.with_(expert_ids=ids)


def crosses_modality(r, x, m):
    ids = r.expert_ids.clone()
    vision = m == 1
    ids[vision, 0] = 3  # the text-intra expert of topology (1, 2, 1)
    bad = ids[:, 0] == ids[:, 1]
    ids[bad & vision, 1] = 1
    return r.with_(expert_ids=ids)


def routes_padding(r, x, m):
    pad = (m == -1)[:, None]
    ids = torch.where(pad, torch.tensor([1, 2]), r.expert_ids)
    return r.with_(expert_ids=ids, weights=torch.where(pad, torch.full_like(r.weights, 0.5), r.weights))


def counts_padding(r, x, m):
    groups = [
        dataclasses.replace(g, tokens=g.tokens + (m == -1).sum()) if g.name == "text" else g for g in r.groups
    ]
    return r.with_(groups=groups)


def position_dependent(r, x, m):
    ids = r.expert_ids.clone()
    swap = torch.arange(len(m)) % 3 == 0
    ids[swap] = ids[swap].flip(-1)
    w = r.weights.clone()
    w[swap & (m >= 0)] = torch.tensor([0.9, 0.1])
    return r.with_(expert_ids=ids, weights=w)


def drops_tokens(r, x, m):
    ids, w = r.expert_ids.clone(), r.weights.clone()
    if not (m >= 0).any():
        return r
    first_real = (m >= 0).nonzero()[0]
    ids[first_real], w[first_real] = -1, 0.0
    return r.with_(expert_ids=ids, weights=w)


def exceeds_capacity(r, x, m):
    return r.with_(capacity=torch.ones(r.num_experts, dtype=torch.long))


def wrong_candidate_count(r, x, m):
    return r.with_(groups=[dataclasses.replace(g, n_candidates=g.n_candidates + 1) for g in r.groups])


BROKEN = {
    "weights": [negative_weights, unnormalised],
    "distinct_ids": [duplicate_ids],
    "modality_isolation": [crosses_modality],
    "padding": [routes_padding, counts_padding],
    "permutation_equivariance": [position_dependent],
    "dropless": [drops_tokens],
    "capacity": [exceeds_capacity],
    "uniform_balance": [wrong_candidate_count],
}


def test_every_invariant_has_a_broken_router():
    assert set(BROKEN) == set(INVARIANTS)


@pytest.mark.parametrize(
    "invariant, corrupt",
    [(k, f) for k, fs in BROKEN.items() for f in fs],
    ids=[f"{k}-{f.__name__}" for k, fs in BROKEN.items() for f in fs],
)
def test_broken_router_is_caught(invariant, corrupt):
    x, modality = make_batch(T=24, d=8)
    router = Broken(_mg(), corrupt)
    with pytest.raises(RouterInvariantError) as info:
        check_router(router, x, modality)
    assert invariant in info.value.failures, info.value
    # the kit runs through hypothesis too
    with pytest.raises(RouterInvariantError):
        assert_router_properties(lambda topo: Broken(_mg(), corrupt), max_examples=20, d_model=8)


def test_good_wrapper_is_not_flagged():
    x, modality = make_batch(T=24, d=8)
    check_router(Broken(_mg(), lambda r, x, m: r), x, modality)
