"""Balancing and z losses: closed forms on hand-made routings, padding invariance, HF equality."""

import pytest
import torch
from conftest import make_batch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moiie import ROUTERS, MoEConfig, build_ffn
from moiie.losses import AuxLossConfig, aux_losses, balance_loss, pooled_stats
from moiie.routers.base import top_k_routing
from moiie.topology import ExpertTopology


def test_closed_form_on_hand_made_routing():
    # 4 tokens, 3 experts, k=1: logits chosen so the probabilities are exact.
    p = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    r = top_k_routing(
        p.log(),
        torch.zeros(4, dtype=torch.long),
        top_k=1,
        renormalize=True,
        groups=[("joint", torch.ones(4, dtype=torch.bool), 3)],
    )
    # f = [2, 1, 1] / 4; P = [1.5, 1.25, 1.25] / 4; L = 3 * sum f P
    expected = 3 * (2 * 1.5 + 1 * 1.25 + 1 * 1.25) / 16
    assert balance_loss(r.groups[0]).item() == pytest.approx(expected, rel=1e-6)
    # z-loss: mean of logsumexp(log p)^2 = 0 since each row sums to one
    assert aux_losses([r], AuxLossConfig(z_loss=1.0))["z/joint"].item() == pytest.approx(0.0, abs=1e-6)


def test_fully_collapsed_routing_gives_num_candidates():
    # every token's mass on expert 0, top-1 -> f = [1, 0, 0, 0], P = [1, 0, 0, 0], L = |C| = 4
    logits = torch.tensor([[50.0, 0, 0, 0]]).expand(8, 4)
    r = top_k_routing(
        logits,
        torch.zeros(8, dtype=torch.long),
        top_k=1,
        renormalize=True,
        groups=[("joint", torch.ones(8, dtype=torch.bool), 4)],
    )
    assert balance_loss(r.groups[0]).item() == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_uniform_routing_gives_k(k):
    topo = ExpertTopology(vision=2, shared=3, text=1)
    router = ROUTERS.build(ROUTERS.config_class("modality_guided")(top_k=k), d_model=8, topology=topo)
    with torch.no_grad():
        router.vision.zero_(), router.text.zero_()
    x, modality = make_batch(T=30, d=8)
    losses = aux_losses([router(x, modality)], AuxLossConfig())
    assert losses["balance/vision"].item() == pytest.approx(k, rel=1e-6)
    assert losses["balance/text"].item() == pytest.approx(k, rel=1e-6)


def test_losses_are_per_modality_and_weighted():
    cfg = MoEConfig(
        expert={"kind": "swiglu", "d_ff": 8}, aux_loss={"vision": 0.5, "text": 0.25, "z_loss": 0.1}
    )
    layer = build_ffn(cfg, d_model=8)
    x, modality = make_batch(T=30, d=8)
    _, r = layer(x, modality)
    out = aux_losses([r], cfg.aux_loss)
    expected = (
        0.5 * out["balance/vision"] + 0.25 * out["balance/text"] + 0.1 * (out["z/vision"] + out["z/text"])
    )
    assert out["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # each router's loss uses only its own tokens: recompute the vision one from vision tokens alone
    v = modality == 1
    rv = layer.router(x[v], modality[v])
    assert aux_losses([rv], cfg.aux_loss)["balance/vision"].item() == pytest.approx(
        out["balance/vision"].item(), rel=1e-5
    )


def test_empty_modality_contributes_zero():
    layer = build_ffn(MoEConfig(expert={"kind": "swiglu", "d_ff": 8}), d_model=8)
    _, r = layer(torch.randn(5, 8), torch.zeros(5, dtype=torch.long))
    out = aux_losses([r], AuxLossConfig())
    assert out["balance/vision"].item() == 0.0 and out["balance/text"].item() > 0


def test_padding_invariance():
    layer = build_ffn(MoEConfig(expert={"kind": "swiglu", "d_ff": 8}, aux_loss={"z_loss": 1e-3}), d_model=8)
    x, modality = make_batch(T=20, d=8, pad=False)
    _, r1 = layer(x, modality)
    xp = torch.cat([torch.randn(7, 8) * 100, x, torch.randn(5, 8)])
    mp = torch.cat([torch.full((7,), -1), modality, torch.full((5,), -1)])
    _, r2 = layer(xp, mp)
    a, b = aux_losses([r1], AuxLossConfig(z_loss=1e-3)), aux_losses([r2], AuxLossConfig(z_loss=1e-3))
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6), key


def test_layers_are_pooled_like_concatenation():
    layer = build_ffn(MoEConfig(expert={"kind": "swiglu", "d_ff": 8}), d_model=8)
    x1, m1 = make_batch(T=20, d=8, seed=1)
    x2, m2 = make_batch(T=14, d=8, seed=2)
    _, r1 = layer(x1, m1)
    _, r2 = layer(x2, m2)
    _, rc = layer(torch.cat([x1, x2]), torch.cat([m1, m2]))
    pooled, concat = pooled_stats([r1, r2]), pooled_stats([rc])
    for name in ("vision", "text"):
        assert balance_loss(pooled[name]).item() == pytest.approx(balance_loss(concat[name]).item(), rel=1e-6)


def test_top_k_arm_equals_hf_load_balancing_loss():
    E, k, d = 8, 2, 16
    cfg = MoEConfig(
        router={"kind": "top_k", "top_k": k},
        topology={"vision": 0, "shared": E, "text": 0},
        expert={"kind": "swiglu", "d_ff": 8},
    )
    layers = [build_ffn(cfg, d_model=d) for _ in range(3)]
    xs = [torch.randn(2 * 11, d) for _ in layers]
    modality = torch.randint(0, 2, (22,))
    routings = [layer(x, modality)[1] for layer, x in zip(layers, xs)]
    ours = aux_losses(routings, cfg.aux_loss)["balance/joint"]
    gate_logits = tuple(x @ layer.router.weight.T for layer, x in zip(layers, xs))
    theirs = load_balancing_loss_func(gate_logits, num_experts=E, top_k=k)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    # and its gradient w.r.t. the router weights agrees
    g_ours = torch.autograd.grad(ours, [layer.router.weight for layer in layers])
    theirs = load_balancing_loss_func(tuple(x @ layer.router.weight.T for layer, x in zip(layers, xs)), E, k)
    g_theirs = torch.autograd.grad(theirs, [layer.router.weight for layer in layers])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
