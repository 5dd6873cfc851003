"""One contract test over every registered kind of every registry: build tiny, forward, backward,
every parameter gets a gradient, the config round-trips through JSON and YAML."""

import pytest
import torch
from conftest import make_batch

import moiie
from moiie import EXPERTS, FFNS, LLM_BACKBONES, PROJECTORS, ROUTERS, VISION_ENCODERS
from moiie.losses import AuxLossConfig, aux_losses

D = 8


def run_router(config):
    router = ROUTERS.build(config, d_model=D, topology=config.example_topology())
    x, modality = make_batch(T=20, d=D)
    x.requires_grad_(True)
    routing = router(x, modality)
    assert routing.expert_ids.shape[0] == 20
    target = torch.randn_like(routing.weights)
    loss = (routing.weights * target).sum() + aux_losses([routing], AuxLossConfig(z_loss=1e-3))["total"]
    return router, loss


def run_experts(config):
    experts = EXPERTS.build(config, num_experts=3, d_model=D)
    counts = torch.tensor([4, 0, 5])
    x = torch.randn(9, D)
    y = experts(x, counts) + experts.dense(x)
    return experts, (y * torch.randn_like(y)).sum()


def run_projector(config):
    proj = PROJECTORS.build(config, d_in=D, d_out=D)
    y = proj(torch.randn(2, 5, D))
    assert y.shape == (2, 5, D)
    return proj, (y * torch.randn_like(y)).sum()


def run_ffn(config):
    layer = FFNS.build(config, d_model=D)
    x, modality = make_batch(T=20, d=D)
    y, routing = layer(x.view(2, 10, D), modality.view(2, 10))
    assert y.shape == (2, 10, D)
    return layer, (y * torch.randn_like(y)).sum() + aux_losses([routing], AuxLossConfig())["total"]


def run_vision(config):
    encoder = VISION_ENCODERS.build(config)
    size = encoder.preprocess.image_size
    pixels = torch.rand(2, encoder.preprocess.channels, size, size)
    y = encoder(pixels)
    assert y.shape == (2, encoder.n_tokens(), encoder.d_vision)
    return encoder, (y * torch.randn_like(y)).sum()


def run_llm(config):
    lm = LLM_BACKBONES.build(config)
    ids = torch.randint(0, lm.config.vocab_size, (2, 7))
    logits = lm(input_ids=ids).logits
    return lm, (logits * torch.randn_like(logits)).sum()


RUNNERS = {
    ROUTERS.slot: run_router,
    EXPERTS.slot: run_experts,
    PROJECTORS.slot: run_projector,
    FFNS.slot: run_ffn,
    VISION_ENCODERS.slot: run_vision,
    LLM_BACKBONES.slot: run_llm,
}
CASES = [
    (reg, kind)
    for reg in (ROUTERS, EXPERTS, PROJECTORS, FFNS, VISION_ENCODERS, LLM_BACKBONES)
    for kind in reg.names()
]


@pytest.mark.parametrize("registry, kind", CASES, ids=[f"{r.slot}:{k}" for r, k in CASES])
def test_contract(registry, kind):
    config = registry.example(kind)
    assert registry.slot in RUNNERS, f"no contract runner for slot {registry.slot!r}"
    module, loss = RUNNERS[registry.slot](config)
    if loss.requires_grad:  # a parameter-free module (e.g. modality_hard routing) has nothing to train
        loss.backward()
    else:
        assert not list(module.parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{kind}: parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{kind}: parameter {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{kind}: parameter {name} got an all-zero gradient"
    cls = registry.config_class(kind)
    assert cls.from_json(config.to_json()) == config
    assert cls.from_yaml(config.to_yaml()) == config


def test_every_registered_config_class_declares_its_kind():
    for reg in (ROUTERS, EXPERTS, PROJECTORS, FFNS, VISION_ENCODERS, LLM_BACKBONES):
        for entry in reg.entries():
            assert entry.config_class.model_fields["kind"].default == entry.kind
            assert isinstance(entry.example(), entry.config_class)


def test_every_config_field_is_documented():
    missing = []
    for reg in (ROUTERS, EXPERTS, PROJECTORS, FFNS, VISION_ENCODERS, LLM_BACKBONES):
        for entry in reg.entries():
            for name, field in entry.config_class.model_fields.items():
                if name != "kind" and not field.description:
                    missing.append(f"{entry.config_class.__name__}.{name}")
    assert not missing, f"config fields without a docstring: {missing}"


def test_public_api_exports():
    for name in moiie.__all__:
        assert hasattr(moiie, name), name
