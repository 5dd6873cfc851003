"""Projectors from vision features to the LLM's embedding space (SPEC section 1: `mlp2x_gelu`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from moiie.config_base import Config
from moiie.registry import PROJECTORS

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


class LinearProjectorConfig(Config):
    """One linear map d_vision -> d_llm."""

    kind: Literal["linear"] = "linear"
    bias: bool = True
    """Whether the linear map has a bias."""


class MLPProjectorConfig(Config):
    """`depth` linear layers with an activation between them; depth 2 + gelu is LLaVA's `mlp2x_gelu`."""

    kind: Literal["mlp"] = "mlp"
    depth: int = Field(2, ge=1, le=16)
    """Number of linear layers (the first maps d_vision -> d_llm, the rest d_llm -> d_llm)."""
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
    """Activation between linear layers."""


class IdentityProjectorConfig(Config):
    """No projection; needs d_vision == d_llm."""

    kind: Literal["identity"] = "identity"


@PROJECTORS.register("linear", LinearProjectorConfig)
def build_linear_projector(config: LinearProjectorConfig, *, d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out, bias=config.bias)


@PROJECTORS.register("mlp", MLPProjectorConfig)
def build_mlp_projector(config: MLPProjectorConfig, *, d_in: int, d_out: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(config.depth - 1):
        layers += [_ACTIVATIONS[config.activation](), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


@PROJECTORS.register("identity", IdentityProjectorConfig)
def build_identity_projector(config: IdentityProjectorConfig, *, d_in: int, d_out: int) -> nn.Module:
    if d_in != d_out:
        raise ValueError(f"projector kind 'identity' needs d_vision == d_llm, got {d_in} and {d_out}")
    return nn.Identity()
