"""Each router against its defining equations, computed independently by hand."""

import math

import pytest
import torch
from conftest import make_batch

from moiie import ROUTERS, MoEConfig, build_ffn
from moiie.routers.base import apply_capacity
from moiie.topology import ExpertTopology


def test_modality_guided_matches_spec_equations():
    topo = ExpertTopology(vision=2, shared=3, text=1)
    router = ROUTERS.build(ROUTERS.config_class("modality_guided")(top_k=2), d_model=16, topology=topo)
    x, modality = make_batch(T=30, d=16)
    r = router(x, modality)
    for t in range(30):
        m = modality[t].item()
        if m == -1:
            assert (r.expert_ids[t] == -1).all() and (r.weights[t] == 0).all()
            continue
        W, cand = (router.vision, list(range(0, 5))) if m == 1 else (router.text, list(range(2, 6)))
        g = torch.softmax((W.double() @ x[t].double()), dim=0)
        top = torch.topk(g, 2)
        ids = [cand[i] for i in top.indices.tolist()]
        w = top.values / top.values.sum()
        assert r.expert_ids[t].tolist() == ids
        torch.testing.assert_close(r.weights[t].double(), w, atol=1e-6, rtol=1e-5)
        full = torch.zeros(6, dtype=torch.float64)
        full[cand] = g
        torch.testing.assert_close(r.probs[t].double(), full, atol=1e-6, rtol=1e-5)


def test_modality_guided_routers_only_learn_from_their_modality():
    topo = ExpertTopology(vision=1, shared=2, text=1)
    router = ROUTERS.build(ROUTERS.config_class("modality_guided")(), d_model=8, topology=topo)
    x = torch.randn(6, 8)
    r = router(x, torch.tensor([0, 0, 0, -1, 0, 0]))  # text only
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    assert router.vision.grad is None or router.vision.grad.abs().sum() == 0
    assert router.text.grad.abs().sum() > 0


def test_router_logits_are_fp32_under_bf16_autocast():
    router = ROUTERS.build(ROUTERS.config_class("modality_guided")(), d_model=8, topology=ExpertTopology())
    x, modality = make_batch(T=10, d=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x.bfloat16(), modality)
    assert r.weights.dtype == torch.float32 and r.probs.dtype == torch.float32


@pytest.mark.parametrize(
    "x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_router_logits_in_low_precision_match_a_float32_reference(x_dtype, w_dtype):
    """The float32 product keeps no float32 copy of x, and its values and gradients are the plain
    float32 product's, returned in each input's dtype."""
    from moiie.routers.base import router_logits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).to(x_dtype).requires_grad_(True)
    w = torch.randn(6, 32, generator=g).to(w_dtype).requires_grad_(True)
    d = torch.randn(64, 6, generator=g)
    logits = router_logits(x, w)
    assert logits.dtype == torch.float32
    logits.backward(d)
    x_ref = x.detach().float().requires_grad_(True)
    w_ref = w.detach().float().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref, w_ref)
    ref.backward(d)
    torch.testing.assert_close(logits, ref)
    assert x.grad.dtype == x_dtype and w.grad.dtype == w_dtype
    torch.testing.assert_close(x.grad, x_ref.grad.to(x_dtype))
    torch.testing.assert_close(w.grad, w_ref.grad.to(w_dtype))


def test_jitter_only_in_training():
    cfg = ROUTERS.config_class("modality_guided")(jitter=0.5)
    router = ROUTERS.build(cfg, d_model=8, topology=ExpertTopology(vision=2, shared=4, text=2))
    x, modality = make_batch(T=40, d=8, pad=False)
    router.eval()
    a, b = router(x, modality), router(x, modality)
    assert torch.equal(a.weights, b.weights)
    router.train()
    c = router(x, modality)
    assert not torch.equal(a.weights, c.weights)


def test_modality_hard_routes_by_modality_only():
    topo = ExpertTopology(vision=2, shared=0, text=1)
    router = ROUTERS.build(ROUTERS.example("modality_hard"), d_model=8, topology=topo)
    x, modality = make_batch(T=12, d=8)
    r = router(x, modality)
    for t, m in enumerate(modality.tolist()):
        ids = [i for i in r.expert_ids[t].tolist() if i >= 0]
        assert ids == {1: [0, 1], 0: [2], -1: []}[m]
        assert math.isclose(r.weights[t].sum().item(), 0.0 if m == -1 else 1.0, abs_tol=1e-7)
    assert r.groups == [] and list(router.parameters()) == []


def test_expert_choice_capacity_and_selection():
    cfg = ROUTERS.config_class("expert_choice")(top_k=1, capacity_factor=1.0)
    topo = ExpertTopology(vision=1, shared=2, text=1)
    router = ROUTERS.build(cfg, d_model=8, topology=topo)
    assert router.causal is False and router.token_choice is False
    x, modality = make_batch(T=24, d=8)
    r = router(x, modality)
    n_v, n_t = (modality == 1).sum().item(), (modality == 0).sum().item()
    cap_v, cap_t = math.ceil(n_v / 3), math.ceil(n_t / 3)
    assert r.capacity.tolist() == [cap_v, cap_v + cap_t, cap_v + cap_t, cap_t]
    load = r.expert_load()
    assert load.tolist() == r.capacity.tolist()  # every expert fills its budget exactly
    # each expert picked the tokens of its modality with the highest router logit
    for m, W, cand, cap in ((1, router.vision, range(0, 3), cap_v), (0, router.text, range(1, 4), cap_t)):
        for j, e in enumerate(cand):
            picked = ((r.expert_ids == e).any(-1) & (modality == m)).nonzero().flatten()
            scores = torch.where(modality == m, x @ W[j], torch.tensor(-torch.inf))
            assert set(picked.tolist()) == set(torch.topk(scores, cap).indices.tolist())


def test_capacity_drops_and_counts_per_modality():
    cfg = MoEConfig(
        router={"kind": "top_k", "top_k": 2},
        topology={"vision": 0, "shared": 4, "text": 0},
        expert={"kind": "swiglu", "d_ff": 8},
        capacity_factor=0.5,
    )
    layer = build_ffn(cfg, d_model=8)
    x, modality = make_batch(T=40, d=8)
    _y, r = layer(x, modality)
    assigned = 2 * (modality >= 0).sum().item()
    cap = math.ceil(assigned * 0.5 / 4)
    assert (r.capacity == cap).all()
    assert (r.expert_load() <= cap).all()
    assert r.dropped.sum().item() == assigned - r.expert_load().sum().item() > 0
    # dropped assignments are attributed to the modality of their token
    unrouted = layer.router(x, modality)
    lost = (unrouted.expert_ids >= 0) & (r.expert_ids < 0)
    for m in (0, 1):
        assert r.dropped[m].item() == (lost & (modality == m)[:, None]).sum().item()


def test_capacity_prefers_first_choices():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0]])
    from moiie.routers.base import Routing

    r = Routing(
        expert_ids=ids,
        weights=torch.full((4, 2), 0.5),
        modality=torch.zeros(4, dtype=torch.long),
        num_experts=2,
    )
    out = apply_capacity(r, capacity_factor=0.5)  # cap = ceil(8 * 0.5 / 2) = 2
    assert out.expert_ids.tolist() == [[0, -1], [0, -1], [1, -1], [1, -1]]


@pytest.mark.parametrize("kind", ["top_k", "modality_guided", "shared_pool", "expert_choice"])
def test_learned_routers_get_gradients_through_weights(kind):
    cfg = ROUTERS.example(kind)
    router = ROUTERS.build(cfg, d_model=8, topology=cfg.example_topology())
    x, modality = make_batch(T=16, d=8)
    r = router(x, modality)
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
