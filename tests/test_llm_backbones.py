"""HF causal LMs with injected FFN slots: function preservation per family, layer choice, modality plumbing."""

import pytest
import torch

from moiie import ROUTERS, MoEConfig
from moiie.backbones.llm import (
    FFNAdapter,
    HFCausalLMConfig,
    RoutingContext,
    build_hf_causal_lm,
    inject_ffns,
    select_layers,
)
from moiie.config_base import ConfigError
from moiie.experts.gelu_mlp import GeluMLPExpertConfig

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
}
FAMILIES = {
    "llama": {"model_type": "llama", **SMALL},
    "qwen2": {"model_type": "qwen2", **SMALL},
    "mistral": {"model_type": "mistral", **SMALL},
    "phi3": {"model_type": "phi3", **SMALL, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 4,
        "n_head": 4,
        "vocab_size": 96,
        "n_positions": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def ffn_configs(family):
    expert = GeluMLPExpertConfig(activation="gelu_tanh") if family == "gpt2" else None
    for kind in ROUTERS.names():
        router = ROUTERS.example(kind)
        if kind == "expert_choice":
            router = router.model_copy(update={"capacity_factor": 2.0})
        cfg = {"router": router, "topology": router.example_topology()}
        if expert is not None:
            cfg["expert"] = expert
        yield kind, MoEConfig(**cfg)


CASES = [(fam, kind, cfg) for fam in FAMILIES for kind, cfg in ffn_configs(fam)]


@pytest.mark.parametrize("family, kind, ffn", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_upcycled_lm_matches_dense_logits(family, kind, ffn):
    torch.manual_seed(0)
    lm = build_hf_causal_lm(HFCausalLMConfig(config=FAMILIES[family])).eval()
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        dense = lm(input_ids=ids).logits
    ctx = RoutingContext()
    chosen = inject_ffns(lm, ffn, "odd", ctx)
    assert chosen == [1, 3]
    modality = torch.randint(0, 2, (2, 12))
    ctx.start(modality)
    with torch.no_grad():
        moe = lm(input_ids=ids).logits
    assert (moe - dense).abs().max().item() < 1e-5
    records = ctx.routings()
    assert len(records) == 2 and all(r is not None for r in records)
    # modality reached the layers: no vision token went to the text-intra group and vice versa
    for r in records:
        topo = ffn.topology
        for m, other in ((1, "text"), (0, "vision")):
            g = topo.group(other)
            sel = r.expert_ids[r.modality == m]
            assert not ((sel >= g.start) & (sel < g.stop)).any()


def test_layer_choices():
    assert select_layers("odd", 5) == [1, 3]
    assert select_layers("even", 5) == [0, 2, 4]
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers("none", 3) == []
    assert select_layers([3, 0], 4) == [0, 3]
    with pytest.raises(ValueError, match="moe_layers"):
        select_layers([4], 4)
    with pytest.raises(ValueError, match="moe_layers"):
        select_layers([1, 1], 4)


def test_injection_uses_plain_submodules():
    lm = build_hf_causal_lm(HFCausalLMConfig(config=FAMILIES["llama"]))
    inject_ffns(lm, MoEConfig(), "all", RoutingContext())
    adapters = [m for m in lm.modules() if isinstance(m, FFNAdapter)]
    assert len(adapters) == 4
    assert all("context" not in k for k in lm.state_dict())
    with pytest.raises(ValueError, match="already holds"):
        inject_ffns(lm, MoEConfig(), [0], RoutingContext())


def test_cached_decoding_positions_are_text():
    ctx = RoutingContext()
    ctx.start(torch.ones(2, 7, dtype=torch.long))
    m = ctx.modality_for(torch.zeros(2, 1, 8))
    assert m.shape == (2, 1) and (m == 0).all()


def test_llm_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        HFCausalLMConfig.parse({})
    with pytest.raises(ConfigError, match="model_type"):
        HFCausalLMConfig.parse({"config": {"hidden_size": 8}})
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_hf_causal_lm(HFCausalLMConfig(path="/nonexistent/folder"))


def test_local_folder_and_truncation(tmp_path):
    lm = build_hf_causal_lm(HFCausalLMConfig(config=FAMILIES["qwen2"]))
    lm.save_pretrained(tmp_path)
    again = build_hf_causal_lm(HFCausalLMConfig(path=str(tmp_path)))
    ids = torch.randint(0, 96, (1, 5))
    torch.testing.assert_close(again(input_ids=ids).logits, lm(input_ids=ids).logits)
    short = build_hf_causal_lm(HFCausalLMConfig(path=str(tmp_path), num_hidden_layers=2))
    assert short.config.num_hidden_layers == 2
