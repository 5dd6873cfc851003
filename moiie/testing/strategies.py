"""Hypothesis strategies for routing tests: topologies, router configs, token batches."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from moiie.layer import check_topology
from moiie.modality import PAD, TEXT, VISION
from moiie.registry import ROUTERS
from moiie.routers.base import RouterConfig
from moiie.topology import ExpertTopology


@st.composite
def topologies(draw, max_per_group: int = 4) -> ExpertTopology:
    """Any topology with at least one expert (not necessarily routable by a given router)."""
    v, s, t = (draw(st.integers(0, max_per_group)) for _ in range(3))
    if v + s + t == 0:
        s = 1
    return ExpertTopology(vision=v, shared=s, text=t)


@st.composite
def routable_topologies(draw, router: RouterConfig, max_per_group: int = 4) -> ExpertTopology:
    """Topologies the given router config accepts (every expert reachable, enough candidates)."""
    topo = draw(topologies(max_per_group))
    if check_topology(router, topo):
        return router.example_topology()
    return topo


@st.composite
def router_configs(
    draw, kinds: list[str] | None = None, max_top_k: int = 3
) -> tuple[RouterConfig, ExpertTopology]:
    """A (router config, topology) pair that validates, over the registered router kinds."""
    kind = draw(st.sampled_from(sorted(kinds or ROUTERS.names())))
    cls = ROUTERS.config_class(kind)
    fields = {}
    if "top_k" in cls.model_fields:
        fields["top_k"] = draw(st.integers(1, max_top_k))
    if "capacity_factor" in cls.model_fields:
        fields["capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    config = cls(**fields)
    return config, draw(routable_topologies(config))


@st.composite
def token_batches(
    draw, d_model: int = 8, max_tokens: int = 48, pad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x: (T, d_model) float32, modality: (T,) int64) with text, vision and (optionally) padding tokens."""
    T = draw(st.integers(1, max_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    choices = [TEXT, VISION, PAD] if pad else [TEXT, VISION]
    pattern = draw(st.sampled_from(["mixed", "blocks", "one_modality"]))
    g = torch.Generator().manual_seed(seed)
    if pattern == "one_modality":
        modality = torch.full((T,), draw(st.sampled_from([TEXT, VISION])))
    elif pattern == "blocks":  # an image block inside text, as an LVLM sequence looks
        a = draw(st.integers(0, T))
        b = draw(st.integers(a, T))
        modality = torch.full((T,), TEXT)
        modality[a:b] = VISION
        if pad:
            modality[T - draw(st.integers(0, T // 3)) :] = PAD
    else:
        modality = torch.tensor(choices)[torch.randint(len(choices), (T,), generator=g)]
    x = torch.randn(T, d_model, generator=g) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    return x, modality.long()
