"""Upcycling preserves the dense function (SPEC section 6) for every routed kind and HF FFN layout."""

import pytest
import torch
from conftest import make_batch
from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from moiie import ROUTERS, DenseFFNConfig, MoEConfig, upcycle
from moiie.experts.gelu_mlp import GeluMLPExpertConfig
from moiie.experts.swiglu import SwiGLUExpertConfig
from moiie.layer import MoELayer
from moiie.upcycle import register_ffn_layout

D, F_ = 32, 64
SMALL = dict(
    hidden_size=D, intermediate_size=F_, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1
)


def dense_modules():
    yield "llama", LlamaMLP(LlamaConfig(**SMALL)), SwiGLUExpertConfig()
    yield "mistral", MistralMLP(MistralConfig(**SMALL)), SwiGLUExpertConfig()
    yield "qwen2", Qwen2MLP(Qwen2Config(**SMALL)), SwiGLUExpertConfig()
    yield "phi3", Phi3MLP(Phi3Config(**SMALL)), SwiGLUExpertConfig()
    yield "gpt2", GPT2MLP(F_, GPT2Config(n_embd=D, n_head=4)), GeluMLPExpertConfig(activation="gelu_tanh")


def routed_configs(expert):
    for kind in ROUTERS.names():
        router = ROUTERS.example(kind)
        if kind == "expert_choice":  # every expert takes every token of its modality: no token is dropped
            router = router.model_copy(update={"capacity_factor": 2.0})
        yield kind, MoEConfig(router=router, topology=router.example_topology(), expert=expert)
    yield "always_on", MoEConfig(expert=expert, always_on=1)
    yield "capacity_large", MoEConfig(expert=expert, capacity_factor=4.0)


CASES = [(fam, mod, kind, cfg) for fam, mod, exp in dense_modules() for kind, cfg in routed_configs(exp)]


@pytest.mark.parametrize("family, dense, kind, config", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_upcycled_layer_computes_the_dense_ffn(family, dense, kind, config):
    torch.manual_seed(0)
    for p in dense.parameters():  # HF inits biases to zero; make them matter
        torch.nn.init.normal_(p, std=0.1)
    dense.eval()  # GPT-2's MLP carries dropout
    layer = upcycle(dense, config)
    assert isinstance(layer, MoELayer)
    x, modality = make_batch(T=40, d=D, pad=False)
    with torch.no_grad():
        y_dense = dense(x)
        y_moe, _routing = layer(x, modality)
    assert (y_moe - y_dense).abs().max().item() < 1e-5
    # routers are fresh N(0, 0.02)
    for p in layer.router.parameters():
        assert 0.01 < p.std().item() < 0.03


def test_upcycle_to_dense_arm_copies_weights():
    dense = LlamaMLP(LlamaConfig(**SMALL))
    layer = upcycle(dense, DenseFFNConfig())
    x = torch.randn(5, D)
    torch.testing.assert_close(layer(x)[0], dense(x), atol=1e-6, rtol=1e-5)


def test_upcycle_rejects_mismatches_clearly():
    dense = LlamaMLP(LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="gated FFN"):
        upcycle(dense, MoEConfig(expert=GeluMLPExpertConfig()))
    with pytest.raises(ValueError, match="set expert.d_ff to 64"):
        upcycle(dense, MoEConfig(expert=SwiGLUExpertConfig(d_ff=32)))
    gpt2 = GPT2MLP(F_, GPT2Config(n_embd=D, n_head=4))
    with pytest.raises(ValueError, match="activation"):
        upcycle(gpt2, MoEConfig(expert=GeluMLPExpertConfig(activation="relu")))
    with pytest.raises(ValueError, match="gated SiLU"):
        upcycle(gpt2, MoEConfig(expert=SwiGLUExpertConfig()))
    with pytest.raises(ValueError, match="cannot upcycle FFN module Linear"):
        upcycle(torch.nn.Linear(4, 4), MoEConfig())


def test_register_ffn_layout_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_ffn_layout("LlamaMLP", lambda m: None)
