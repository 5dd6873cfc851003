import json
from typing import Literal

import pytest
import torch
import yaml

import moiie
from moiie import (
    EXPERTS,
    LLM_BACKBONES,
    PROJECTORS,
    ROUTERS,
    VISION_ENCODERS,
    ConfigError,
    MoEConfig,
    RegistryError,
)
from moiie.routers.base import LearnedRouterConfig
from moiie.routers.modality_guided import ModalityGuidedRouter

ALL_REGISTRIES = [ROUTERS, EXPERTS, PROJECTORS, VISION_ENCODERS, LLM_BACKBONES]


def test_registries_exported_and_listed():
    assert set(ROUTERS.names()) >= {
        "top_k",
        "modality_guided",
        "shared_pool",
        "modality_hard",
        "expert_choice",
    }
    assert set(EXPERTS.names()) >= {"swiglu", "gelu_mlp"}
    assert set(PROJECTORS.names()) >= {"linear", "mlp", "identity"}
    for reg in ALL_REGISTRIES:
        assert reg.names() == sorted(reg.names())


def test_registering_twice_is_an_error():
    with pytest.raises(RegistryError, match="already registered"):
        ROUTERS.register("top_k", ROUTERS.config_class("top_k"))


def test_registering_with_mismatched_kind_literal_is_an_error():
    class Wrong(LearnedRouterConfig):
        kind: Literal["wrong"] = "wrong"

    with pytest.raises(RegistryError, match="must declare"):
        ROUTERS.register("other_name", Wrong)


def test_unknown_kind_build_names_registered_kinds():
    with pytest.raises(RegistryError, match="registered kinds"):
        ROUTERS.config_class("nope")


class MyRouterConfig(LearnedRouterConfig):
    """A user's router: MoIIE routing with a temperature."""

    kind: Literal["my_router"] = "my_router"
    temperature: float = 1.0


def test_user_router_plugs_in_without_editing_moiie():
    @ROUTERS.register("my_router", MyRouterConfig)
    def build(config, *, d_model, topology):
        return ModalityGuidedRouter(d_model=d_model, topology=topology, top_k=config.top_k)

    try:
        cfg = MoEConfig.parse(
            {"router": {"kind": "my_router", "temperature": 2.0}, "expert": {"kind": "swiglu", "d_ff": 8}}
        )
        assert isinstance(cfg.router, MyRouterConfig) and cfg.router.temperature == 2.0
        assert MoEConfig.from_json(cfg.to_json()) == cfg
        layer = moiie.build_ffn(cfg, d_model=8)
        y, _ = layer(torch.randn(5, 8), torch.tensor([0, 1, 1, 0, -1]))
        assert y.shape == (5, 8)
        schema = json.dumps(MoEConfig.model_json_schema())
        assert "my_router" in schema
        with pytest.raises(ConfigError, match=r"router\.temperature"):
            MoEConfig.parse({"router": {"kind": "my_router", "temperature": "hot"}})
    finally:
        ROUTERS.unregister("my_router")
    with pytest.raises(ConfigError, match="unknown router kind 'my_router'"):
        MoEConfig.parse({"router": {"kind": "my_router"}})


@pytest.mark.parametrize("kind", ROUTERS.names())
def test_moe_config_round_trips_json_and_yaml_for_every_router(kind):
    router = ROUTERS.example(kind)
    cfg = MoEConfig(
        router=router,
        topology=router.example_topology(),
        expert=EXPERTS.example("gelu_mlp"),
        capacity_factor=1.5 if router.token_choice else None,
    )
    assert MoEConfig.from_json(cfg.to_json()) == cfg
    assert MoEConfig.from_yaml(cfg.to_yaml()) == cfg
    assert cfg.to_json() == MoEConfig.from_json(cfg.to_json()).to_json()
    assert MoEConfig.from_yaml(cfg.to_yaml()).to_yaml() == cfg.to_yaml()


def test_file_round_trip(tmp_path):
    cfg = MoEConfig(expert={"kind": "swiglu", "d_ff": 64})
    for name in ("c.json", "c.yaml"):
        cfg.save(tmp_path / name)
        assert MoEConfig.load(tmp_path / name) == cfg


@pytest.mark.parametrize(
    "data, path, fragment",
    [
        ({"router": {"kind": "modality_guided", "top_k": "two"}}, "router.top_k", "integer"),
        ({"router": {"kind": "modality_guided", "topk": 2}}, "router.topk", "unknown field"),
        ({"router": {"kind": "mystery"}}, "router", "unknown router kind"),
        ({"expert": {"kind": "swiglu", "d_ff": 0}}, "expert.d_ff", "greater than"),
        ({"topology": {"vision": -1}}, "topology.vision", "greater than"),
        ({"bogus": 1}, "bogus", "unknown field"),
        ({"router": {"kind": "modality_guided", "top_k": 4}}, "router.top_k", "at least top_k"),
        ({"router": {"kind": "top_k"}}, "topology", "modality-blind"),
        ({"router": {"kind": "shared_pool"}}, "topology", "unreachable"),
        ({"router": {"kind": "modality_hard"}}, "topology", "shared=0"),
        ({"topology": {"vision": 0, "shared": 0, "text": 0}}, "topology", "no experts"),
        ({"router": {"kind": "expert_choice"}, "capacity_factor": 2.0}, "capacity_factor", "token-choice"),
    ],
)
def test_bad_configs_name_the_path(data, path, fragment):
    with pytest.raises(ConfigError) as info:
        moiie.Config  # noqa: B018
        from pydantic import BaseModel

        class Top(BaseModel):
            model_config = {"extra": "forbid"}
            moe: moiie.FFNConfig

        try:
            Top.model_validate({"moe": {"kind": "moe", **data}})
        except Exception as err:
            raise ConfigError.from_validation_error(err) from None
    paths = [p for p, _ in info.value.errors]
    assert f"moe.{path}" in paths, info.value
    assert fragment in str(info.value)


def test_unreachable_experts_rule_is_named():
    from moiie.layer import check_topology
    from moiie.routers.modality_hard import ModalityHardRouterConfig
    from moiie.topology import ExpertTopology

    problems = check_topology(ModalityHardRouterConfig(), ExpertTopology(vision=1, shared=2, text=1))
    assert any("shared=0" in p for p in problems)


def test_ffn_union_round_trips_dense_and_moe():
    from pydantic import TypeAdapter

    ta = TypeAdapter(moiie.FFNConfig)
    for cfg in (
        moiie.DenseFFNConfig(),
        MoEConfig(),
        MoEConfig(router={"kind": "top_k"}, topology={"vision": 0, "shared": 8, "text": 0}),
    ):
        assert ta.validate_json(ta.dump_json(cfg)) == cfg
        assert ta.validate_python(yaml.safe_load(yaml.safe_dump(ta.dump_python(cfg, mode="json")))) == cfg


def test_json_schema_lists_every_registered_kind():
    schema = json.dumps(MoEConfig.model_json_schema())
    for kind in ROUTERS.names() + EXPERTS.names():
        assert f'"const": "{kind}"' in schema
    assert "Experts chosen per token" in schema  # field docstrings are carried into the schema


def test_configs_are_frozen():
    cfg = MoEConfig()
    with pytest.raises(Exception, match="frozen"):
        cfg.always_on = 3
