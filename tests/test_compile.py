"""torch.compile of the MoE layer matches eager, and routing changes never trigger recompilation."""

import pytest
import torch
from conftest import make_batch

from moiie import MoEConfig, build_ffn
from moiie.dispatch import dispatch

pytestmark = pytest.mark.slow  # each case compiles forward and backward graphs (~10-30 s on 2 cores)

D = 16


def layer_for(expert_kind):
    expert = {"kind": expert_kind, "d_ff": 24}
    if expert_kind == "gelu_mlp":
        expert["activation"] = "gelu"
    layer = build_ffn(MoEConfig(expert=expert, topology={"vision": 1, "shared": 2, "text": 1}), d_model=D)
    if expert_kind == "gelu_mlp":
        with torch.no_grad():
            layer.experts.fc_bias.normal_(), layer.experts.proj_bias.normal_()
    return layer


def grads(layer, x, y):
    g = torch.linspace(-1, 1, y.numel()).view_as(y)
    return torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("expert_kind", ["swiglu", "gelu_mlp"])
def test_routing_and_dispatch_compile_whole_without_recompiling(expert_kind):
    """Router + dispatch + experts trace as one graph (fullgraph) and new routings reuse it."""
    torch._dynamo.reset()  # this test's closure shares its code object with the other parametrisation's
    layer = layer_for(expert_kind)

    def routed(x, modality):
        return dispatch(x, layer.router(x, modality), layer.experts)

    compiled = torch.compile(routed, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):  # different inputs route differently; padding leaves slots empty
            x, modality = make_batch(T=24, d=D, seed=seed)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_eager, y_compiled = routed(x1, modality), compiled(x2, modality)
            torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
            for a, b in zip(grads(layer, x2, y_compiled), grads(layer, x1, y_eager)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_layer_matches_eager():
    layer = layer_for("swiglu")
    compiled = torch.compile(layer)
    x, modality = make_batch(T=24, d=D, seed=5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (y_eager, r_eager), (y_compiled, r_compiled) = layer(x1, modality), compiled(x2, modality)
    torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(r_compiled.expert_ids, r_eager.expert_ids)
    for a, b in zip(grads(layer, x2, y_compiled), grads(layer, x1, y_eager)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
