"""SwiGLU experts (Llama / Phi-3 / Qwen / Mistral FFN): down(silu(gate x) * up x), no biases."""

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
from moiie.registry import EXPERTS

MAX_D_FF = 1 << 20
"""Upper bound of an expert's hidden width (4x the widest FFN of today's LLMs): larger values are
typos that would try to allocate terabytes."""


class SwiGLUExpertConfig(Config):
    """Each expert is a SwiGLU FFN of width d_ff."""

    kind: Literal["swiglu"] = "swiglu"
    d_ff: int | None = Field(None, ge=1, le=MAX_D_FF)
    """Hidden width of each expert; None takes the backbone's FFN width (required without a backbone)."""
    impl: GroupedImpl = "auto"
    """Grouped matmul: `grouped_mm` (torch.nn.functional.grouped_mm), `loop` (one matmul per expert slice),
    or `auto` (grouped_mm on CUDA, the loop elsewhere: on CPU grouped_mm is itself a loop, and a slower one)."""
    init_std: float = Field(0.02, gt=0.0)
    """Std of the N(0, std) init of freshly built (not upcycled) experts."""


class SwiGLUExperts(nn.Module):
    """gate_up: (E, 2*d_ff, d_model) = [gate; up] per expert, down: (E, d_model, d_ff)."""

    activation = "silu"

    def __init__(
        self, *, num_experts: int, d_model: int, d_ff: int, impl: GroupedImpl = "auto", init_std: float = 0.02
    ):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.impl = num_experts, d_model, d_ff, impl
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * d_ff, d_model).normal_(0.0, init_std))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, d_ff).normal_(0.0, init_std))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (N, d_model) sorted by expert, counts (E,) -> (N, d_model); rows past counts.sum() give zeros."""
        return grouped_ffn(x, self.gate_up, self.down, counts, activation="silu", gated=True, impl=self.impl)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of all experts applied to every row. x: (T, d_model) -> (T, d_model)."""
        h = all_experts_linear(x, self.gate_up)
        gate, up = h.chunk(2, dim=-1)
        return all_experts_sum_linear(F.silu(gate) * up, self.down)

    @torch.no_grad()
    def load_dense(self, weights: DenseFFNWeights) -> None:
        """Copy one dense SwiGLU FFN into every expert (upcycling, SPEC section 6)."""
        if weights.gate is None or weights.activation != "silu":
            raise ValueError(
                f"swiglu experts need a gated SiLU FFN; this FFN has "
                f"{'no gate projection' if weights.gate is None else f'activation {weights.activation!r}'}"
            )
        if weights.up_bias is not None or weights.down_bias is not None:
            raise ValueError(
                "swiglu experts have no biases but the dense FFN has them; use gelu_mlp or drop biases"
            )
        _check_shape(weights, self.d_model, self.d_ff)
        self.gate_up.copy_(torch.cat([weights.gate, weights.up]).expand_as(self.gate_up))
        self.down.copy_(weights.down.expand_as(self.down))


def _check_shape(weights: DenseFFNWeights, d_model: int, d_ff: int) -> None:
    if (weights.d_model, weights.d_ff) != (d_model, d_ff):
        raise ValueError(
            f"dense FFN has d_model={weights.d_model}, d_ff={weights.d_ff} but the experts were built with "
            f"d_model={d_model}, d_ff={d_ff}; set expert.d_ff to {weights.d_ff} or leave it None"
        )


@EXPERTS.register("swiglu", SwiGLUExpertConfig, example=lambda: SwiGLUExpertConfig(d_ff=16))
def build_swiglu_experts(
    config: SwiGLUExpertConfig, *, num_experts: int, d_model: int, d_ff: int | None = None
) -> SwiGLUExperts:
    width = config.d_ff or d_ff
    if width is None:
        raise ValueError("expert.d_ff is required when no backbone FFN gives the width")
    return SwiGLUExperts(
        num_experts=num_experts, d_model=d_model, d_ff=width, impl=config.impl, init_std=config.init_std
    )
