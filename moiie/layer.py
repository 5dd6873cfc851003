"""The FFN slot of a decoder layer: the dense FFN or a routed MoE layer (SPEC sections 3 and 8).

Which one, and with which router, experts and topology, is a config choice: an ablation arm is a
config diff, never a branch in model code.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

import moiie.experts
import moiie.routers  # noqa: F401  (registers the router kinds)
from moiie.config_base import Config
from moiie.dispatch import dispatch
from moiie.experts.swiglu import SwiGLUExpertConfig
from moiie.losses import AuxLossConfig
from moiie.modality import MODALITY_NAMES, check_modality
from moiie.registry import EXPERTS, FFNS, ROUTERS, Slot
from moiie.routers.base import Router, RouterConfig, Routing, apply_capacity
from moiie.topology import ExpertTopology

ExpertConfig = Slot(EXPERTS)
RouterConfigField = Slot(ROUTERS)


class DenseFFNConfig(Config):
    """The `dense` arm: the backbone's original FFN, no routing."""

    kind: Literal["dense"] = "dense"
    expert: ExpertConfig = Field(default_factory=SwiGLUExpertConfig)
    """The FFN's kind and width (width None = the backbone's)."""


class MoEConfig(Config):
    """A routed MoE layer: topology x router x experts (+ optional always-on experts and capacity)."""

    kind: Literal["moe"] = "moe"
    topology: ExpertTopology = ExpertTopology()
    """Sizes of the vision-intra, shared and text-intra groups (SPEC section 2)."""
    router: RouterConfigField = Field(default_factory=lambda: ROUTERS.example("modality_guided"))
    """How tokens choose experts; any kind registered in moiie.ROUTERS."""
    expert: ExpertConfig = Field(default_factory=SwiGLUExpertConfig)
    """Kind and width of every routed expert; any kind registered in moiie.EXPERTS."""
    always_on: int = Field(0, ge=0, le=64)
    """DeepSeekMoE-style shared experts every token passes through (added to the routed output,
    the sum divided by 1 + always_on so that upcycling preserves the dense function)."""
    capacity_factor: float | None = Field(None, gt=0.0, le=64.0)
    """Token-choice capacity: each expert takes at most ceil(factor * assigned slots / E) tokens and the rest
    are dropped and counted. None = dropless (MoIIE)."""
    aux_loss: AuxLossConfig = AuxLossConfig()
    """Coefficients of the balancing and z losses."""

    @model_validator(mode="after")
    def _check_topology(self) -> MoEConfig:
        problems = check_topology(self.router, self.topology)
        if self.capacity_factor is not None and not self.router.token_choice:
            problems.append(
                f"capacity_factor: applies to token-choice routers; router {self.router.kind!r} sets its own capacity"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def check_topology(router: RouterConfig, topology: ExpertTopology) -> list[str]:
    """Every rule a (router, topology) pair must satisfy, as readable reasons; empty when routable."""
    problems = [f"topology: {p}" for p in router.topology_problems(topology)]
    if topology.num_experts == 0:
        return [*problems, "topology: no experts (vision + shared + text = 0)"]
    reachable = router.reachable(topology)
    reached = set().union(*(set(r) for r in reachable.values()))
    unreached = sorted(set(range(topology.num_experts)) - reached)
    if unreached and not problems:
        groups = sorted({topology.group_of(e) for e in unreached})
        problems.append(f"topology: experts {unreached} ({', '.join(groups)}) are reachable by no modality")
    need = getattr(router, "top_k", 1) if router.token_choice else 1
    for modality, ids in reachable.items():
        if len(ids) < need:
            problems.append(
                f"router.top_k: {MODALITY_NAMES[modality]} tokens have {len(ids)} candidate experts "
                f"but top_k={need} (rule: each modality needs at least top_k candidates)"
            )
    return problems


FFNConfig = Slot(FFNS)
"""Config field type for the FFN slot: `dense` or `moe` (or a user-registered kind)."""


class DenseFFN(nn.Module):
    """The dense arm. ``forward(x: (..., d), modality) -> (y, None)``."""

    def __init__(self, *, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        shape = x.shape
        return self.ffn.dense(x.reshape(-1, shape[-1])).reshape(shape).to(x.dtype), None


class MoELayer(nn.Module):
    """Router + experts + dropless dispatch (+ optional capacity and always-on experts).

    ``forward(x: (..., d_model), modality: (...) int) -> (y: (..., d_model), Routing)``.
    """

    def __init__(
        self,
        *,
        router: Router,
        experts: nn.Module,
        always_on: nn.Module | None = None,
        capacity_factor: float | None = None,
    ):
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router routes over {router.num_experts} experts but experts holds {experts.num_experts}"
            )
        self.router, self.experts, self.always_on = router, experts, always_on
        self.capacity_factor = capacity_factor

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        return moe_forward(self, x, modality, self.experts)


def moe_forward(layer, x: torch.Tensor, modality: torch.Tensor, experts) -> tuple[torch.Tensor, Routing]:
    """The forward of an MoE layer (``layer``: router, experts, always_on, capacity_factor) with the
    routed rows sent to ``experts(x_sorted, counts)`` (local experts, or the all-to-all of
    an expert-parallel layer). Validates x and modality; returns (y, routing)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point torch.Tensor of hidden states, got {got}")
    if x.dim() < 1 or x.shape[-1] != layer.experts.d_model:
        raise ValueError(f"x must have shape (..., {layer.experts.d_model}), got {tuple(x.shape)}")
    check_modality(modality, x.shape[:-1])
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    modality = modality.reshape(-1).long()
    routing = layer.router(x, modality)
    if layer.capacity_factor is not None:
        routing = apply_capacity(routing, layer.capacity_factor)
    y = dispatch(x, routing, experts)
    if layer.always_on is not None:
        real = (modality >= 0)[:, None].to(y.dtype)
        y = (y + layer.always_on.dense(x).to(y.dtype) * real) / (1 + layer.always_on.num_experts)
    return y.reshape(shape), routing


@FFNS.register("dense", DenseFFNConfig, example=lambda: DenseFFNConfig(expert=SwiGLUExpertConfig(d_ff=16)))
def build_dense_ffn(config: DenseFFNConfig, *, d_model: int, d_ff: int | None = None) -> DenseFFN:
    return DenseFFN(ffn=_build_experts(config.expert, num_experts=1, d_model=d_model, d_ff=d_ff))


def _build_experts(config: Config, **sizes: int | None) -> nn.Module:
    try:
        return EXPERTS.build(config, **sizes)
    except (RuntimeError, OverflowError, TypeError) as err:  # torch's errors for sizes it cannot allocate
        raise ValueError(
            f"expert: cannot build {config.kind} experts with {sizes} (expert.d_ff {getattr(config, 'd_ff', None)}): {err}"
        ) from err


@FFNS.register("moe", MoEConfig, example=lambda: MoEConfig(expert=SwiGLUExpertConfig(d_ff=16)))
def build_moe_layer(config: MoEConfig, *, d_model: int, d_ff: int | None = None) -> MoELayer:
    router = ROUTERS.build(config.router, d_model=d_model, topology=config.topology)
    experts = _build_experts(
        config.expert, num_experts=config.topology.num_experts, d_model=d_model, d_ff=d_ff
    )
    always_on = None
    if config.always_on:
        always_on = _build_experts(config.expert, num_experts=config.always_on, d_model=d_model, d_ff=d_ff)
    return MoELayer(
        router=router, experts=experts, always_on=always_on, capacity_factor=config.capacity_factor
    )


def build_ffn(config: Config, *, d_model: int, d_ff: int | None = None) -> nn.Module:
    """Build the FFN slot from its config. ``d_ff`` is the backbone's FFN width (used when expert.d_ff is None)."""
    return FFNS.build(config, d_model=d_model, d_ff=d_ff)
