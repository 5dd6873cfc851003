"""Dropless dispatch against a per-token reference, for every expert kind and grouped-matmul implementation."""

import pytest
import torch
import torch.nn.functional as F

from moiie import EXPERTS, MoEConfig, build_ffn
from moiie.dispatch import dispatch
from moiie.routers.base import Routing


def reference(x, routing, experts):
    """y_t = sum_j w_tj * FFN_{e_tj}(x_t), one token and one expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(routing.expert_ids[t].tolist(), routing.weights[t]):
            if e < 0:
                continue
            if hasattr(experts, "gate_up"):
                gate, up = (experts.gate_up[e] @ x[t]).chunk(2)
                y = experts.down[e] @ (F.silu(gate) * up)
            else:
                h = experts.act(experts.fc[e] @ x[t] + experts.fc_bias[e])
                y = experts.proj[e] @ h + experts.proj_bias[e]
            out[t] += w * y
    return out


def random_routing(T, S, E, seed=0, empty=0.2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:S] for _ in range(T)])
    ids[torch.rand(T, S, generator=g) < empty] = -1
    ids[0] = -1  # a token with no slot at all
    w = torch.rand(T, S, generator=g) * (ids >= 0)
    return Routing(expert_ids=ids, weights=w, modality=torch.zeros(T, dtype=torch.long), num_experts=E)


@pytest.mark.parametrize("kind", ["swiglu", "gelu_mlp"])
@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_dispatch_matches_reference(kind, impl):
    """float32: grouped_mm has no float64 kernel."""
    cls = EXPERTS.config_class(kind)
    experts = EXPERTS.build(cls(d_ff=24, impl=impl), num_experts=5, d_model=16)
    if kind == "gelu_mlp":
        with torch.no_grad():
            experts.fc_bias.normal_(), experts.proj_bias.normal_()
    x = torch.randn(30, 16)
    routing = random_routing(30, 3, 5)
    torch.testing.assert_close(
        dispatch(x, routing, experts), reference(x, routing, experts), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_dispatch_gradients_match_reference(impl):
    experts = EXPERTS.build(EXPERTS.config_class("swiglu")(d_ff=12, impl=impl), num_experts=4, d_model=8)
    routing = random_routing(20, 2, 4, seed=3)
    routing.weights.requires_grad_(True)
    x = torch.randn(20, 8, requires_grad=True)
    target = torch.randn(20, 8)
    params = [x, routing.weights, *experts.parameters()]
    g1 = torch.autograd.grad((dispatch(x, routing, experts) * target).sum(), params)
    g2 = torch.autograd.grad((reference(x, routing, experts) * target).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_all_slots_empty_and_unused_experts():
    experts = EXPERTS.build(EXPERTS.config_class("swiglu")(d_ff=8), num_experts=3, d_model=4)
    ids = torch.full((5, 2), -1)
    r = Routing(expert_ids=ids, weights=torch.zeros(5, 2), modality=torch.full((5,), -1), num_experts=3)
    x = torch.randn(5, 4, requires_grad=True)
    y = dispatch(x, r, experts)
    assert torch.equal(y, torch.zeros(5, 4))
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 4))


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_bf16_autocast_close_to_fp32(impl):
    layer = build_ffn(MoEConfig(expert={"kind": "swiglu", "d_ff": 64, "impl": impl}), d_model=32)
    x = torch.randn(50, 32)
    modality = torch.randint(-1, 2, (50,))
    y32, _ = layer(x, modality)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _r16 = layer(x, modality)
    assert y16.dtype == torch.float32  # the layer returns the input dtype; matmuls ran in bf16
    assert (y16 - y32).abs().max() < 0.05 * y32.abs().max()


def test_layer_keeps_leading_shape_and_padding_is_zero():
    layer = build_ffn(MoEConfig(expert={"kind": "gelu_mlp", "d_ff": 16}), d_model=8)
    x = torch.randn(3, 7, 8)
    modality = torch.randint(0, 2, (3, 7))
    modality[:, -2:] = -1
    y, routing = layer(x, modality)
    assert y.shape == x.shape and routing.expert_ids.shape == (21, 2)
    assert torch.equal(y[:, -2:], torch.zeros(3, 2, 8))


def test_always_on_experts_are_mixed_in():
    cfg = MoEConfig(expert={"kind": "swiglu", "d_ff": 16}, always_on=2)
    layer = build_ffn(cfg, d_model=8)
    x = torch.randn(10, 8)
    modality = torch.randint(0, 2, (10,))
    y, routing = layer(x, modality)
    routed = dispatch(x, routing, layer.experts)
    shared = sum(build_single(layer.always_on, e)(x) for e in range(2))
    torch.testing.assert_close(y, (routed + shared) / 3, atol=1e-6, rtol=1e-5)


def build_single(experts, e):
    def f(x):
        gate, up = (x @ experts.gate_up[e].T).chunk(2, -1)
        return (F.silu(gate) * up) @ experts.down[e].T

    return f


def test_float64_falls_back_to_loop_for_grouped_mm():
    experts = EXPERTS.build(
        EXPERTS.config_class("swiglu")(d_ff=12, impl="grouped_mm"), num_experts=4, d_model=8
    ).double()
    routing = random_routing(10, 2, 4)
    routing.weights = routing.weights.double()
    x = torch.randn(10, 8, dtype=torch.float64)
    torch.testing.assert_close(dispatch(x, routing, experts), reference(x, routing, experts))
