"""The `top_k` arm with SwiGLU experts equals HF transformers' Mixtral sparse MoE block."""

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moiie import MoEConfig, build_ffn


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_arm_matches_mixtral_block(impl, top_k):
    E, d, f = 8, 32, 48
    hf_cfg = MixtralConfig(
        hidden_size=d,
        intermediate_size=f,
        num_local_experts=E,
        num_experts_per_tok=top_k,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
    )
    hf = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
    ours = build_ffn(
        MoEConfig(
            router={"kind": "top_k", "top_k": top_k},
            topology={"vision": 0, "shared": E, "text": 0},
            expert={"kind": "swiglu", "d_ff": f, "impl": impl},
        ),
        d_model=d,
    )
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up.copy_(hf.experts.gate_up_proj)  # same (E, 2f, d) = [gate; up] layout
        ours.experts.down.copy_(hf.experts.down_proj)
    x = torch.randn(2, 13, d)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    modality = torch.randint(0, 2, (2, 13))  # the modality-blind arm must ignore it
    y_hf = hf(x1)
    y_ours, _ = ours(x2, modality)
    torch.testing.assert_close(y_ours, y_hf, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y_hf)
    (y_hf * g).sum().backward()
    (y_ours * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.experts.gate_up.grad, hf.experts.gate_up_proj.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.router.weight.grad, hf.gate.weight.grad, atol=1e-6, rtol=1e-5)
