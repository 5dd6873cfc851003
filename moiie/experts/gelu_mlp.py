"""Plain two-layer MLP experts (GPT-2 / CLIP style): proj(act(fc x + b1)) + b2."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moiie.config_base import Config
from moiie.experts.base import (
    DenseFFNWeights,
    GroupedImpl,
    all_experts_linear,
    all_experts_sum_linear,
)
from moiie.experts.grouped_ffn import grouped_ffn
from moiie.experts.swiglu import MAX_D_FF, _check_shape
from moiie.registry import EXPERTS

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class GeluMLPExpertConfig(Config):
    """Each expert is fc (d_model -> d_ff), activation, proj (d_ff -> d_model), with biases."""

    kind: Literal["gelu_mlp"] = "gelu_mlp"
    d_ff: int | None = Field(None, ge=1, le=MAX_D_FF)
    """Hidden width of each expert; None takes the backbone's FFN width (required without a backbone)."""
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu_tanh"
    """Activation; GPT-2's `gelu_new` is `gelu_tanh`."""
    bias: bool = True
    """Whether fc and proj carry biases (GPT-2 does)."""
    impl: GroupedImpl = "auto"
    """Grouped matmul implementation (see swiglu)."""
    init_std: float = Field(0.02, gt=0.0)
    """Std of the N(0, std) init of freshly built (not upcycled) experts."""


class GeluMLPExperts(nn.Module):
    """fc: (E, d_ff, d_model), proj: (E, d_model, d_ff), optional fc_bias (E, d_ff), proj_bias (E, d_model)."""

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu_tanh",
        bias: bool = True,
        impl: GroupedImpl = "auto",
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.impl = num_experts, d_model, d_ff, impl
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.fc = nn.Parameter(torch.empty(num_experts, d_ff, d_model).normal_(0.0, init_std))
        self.proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff).normal_(0.0, init_std))
        self.fc_bias = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.proj_bias = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (N, d_model) sorted by expert, counts (E,) -> (N, d_model) (see SwiGLUExperts.forward)."""
        return grouped_ffn(
            x,
            self.fc,
            self.proj,
            counts,
            activation=self.activation,
            gated=False,
            b1=self.fc_bias,
            b2=self.proj_bias,
            impl=self.impl,
        )

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(all_experts_linear(x, self.fc, self.fc_bias))
        y = all_experts_sum_linear(h, self.proj)
        if self.proj_bias is not None:
            y = y + self.proj_bias.sum(0).to(y.dtype)
        return y

    @torch.no_grad()
    def load_dense(self, weights: DenseFFNWeights) -> None:
        if weights.gate is not None:
            raise ValueError("gelu_mlp experts cannot hold a gated FFN; use swiglu experts")
        if weights.activation != self.activation:
            raise ValueError(
                f"dense FFN uses activation {weights.activation!r} but expert.activation is {self.activation!r}"
            )
        if (weights.up_bias is not None) != (self.fc_bias is not None):
            raise ValueError(
                f"dense FFN {'has' if weights.up_bias is not None else 'has no'} biases; "
                f"set expert.bias to {weights.up_bias is not None}"
            )
        _check_shape(weights, self.d_model, self.d_ff)
        self.fc.copy_(weights.up.expand_as(self.fc))
        self.proj.copy_(weights.down.expand_as(self.proj))
        if self.fc_bias is not None:
            self.fc_bias.copy_(weights.up_bias.expand_as(self.fc_bias))
            self.proj_bias.copy_(weights.down_bias.expand_as(self.proj_bias))


@EXPERTS.register("gelu_mlp", GeluMLPExpertConfig, example=lambda: GeluMLPExpertConfig(d_ff=16))
def build_gelu_mlp_experts(
    config: GeluMLPExpertConfig, *, num_experts: int, d_model: int, d_ff: int | None = None
) -> GeluMLPExperts:
    width = config.d_ff or d_ff
    if width is None:
        raise ValueError("expert.d_ff is required when no backbone FFN gives the width")
    return GeluMLPExperts(
        num_experts=num_experts,
        d_model=d_model,
        d_ff=width,
        activation=config.activation,
        bias=config.bias,
        impl=config.impl,
        init_std=config.init_std,
    )
