"""Everything `moe_layer.py` times, built from one set of weights.

- the limit: one expert's dense SwiGLU over k*T tokens with plain matmuls (no routing);
- moiie's MoE layer: the MoIIE arm (`modality_guided`, vision/shared/text groups) and the vanilla
  arm (`top_k` over shared experts only);
- HF transformers' `MixtralSparseMoeBlock` with its experts implementation set explicitly;
- the official MoIIE dispatch, re-implemented plainly: two routers, one module per expert, a
  Python loop over experts with boolean masks, one pass per modality.

Every method is a :class:`Method`: ``forward(x, modality)`` returns (T, d) for T input tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moiie import MoEConfig, build_ffn
from moiie.modality import TEXT, VISION


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration of the layer."""

    d_model: int = 1024
    d_ff: int = 2816
    vision: int = 2
    shared: int = 4
    text: int = 2
    top_k: int = 2

    @property
    def num_experts(self) -> int:
        return self.vision + self.shared + self.text


@dataclass
class Weights:
    """One draw of every weight, in fp32; each method copies what it needs."""

    gate_up: torch.Tensor
    """(E, 2*d_ff, d) = [gate; up] per expert."""
    down: torch.Tensor
    """(E, d, d_ff)."""
    router: torch.Tensor
    """(E, d): the modality-blind router of the vanilla arm and HF."""
    vision_router: torch.Tensor
    """(vision + shared, d)."""
    text_router: torch.Tensor
    """(shared + text, d)."""

    @classmethod
    def draw(cls, shape: Shape, seed: int = 0) -> Weights:
        g = torch.Generator().manual_seed(seed)
        E, d, f = shape.num_experts, shape.d_model, shape.d_ff

        def normal(*size: int, std: float) -> torch.Tensor:
            return torch.randn(*size, generator=g) * std

        return cls(
            gate_up=normal(E, 2 * f, d, std=0.02),
            down=normal(E, d, f, std=0.02),
            router=normal(E, d, std=0.05),
            vision_router=normal(shape.vision + shape.shared, d, std=0.05),
            text_router=normal(shape.shared + shape.text, d, std=0.05),
        )


@dataclass
class Method:
    """A callable layer plus what a training step needs to know about it."""

    name: str
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(x (T, d), modality (T,)) -> (T, d)."""
    params: list[torch.Tensor]
    tokens: int = 1
    """Rows the forward reads per input row (the limit takes k*T rows, so it is fed k copies)."""

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# --- the limit ---------------------------------------------------------------------------------


def build_limit(w: Weights, shape: Shape, dtype: torch.dtype) -> Method:
    """Expert 0's SwiGLU as one dense FFN over k*T rows: three plain F.linear (the fastest plain form
    here; one fused gate_up matmul plus slicing or chunking costs 2-4% more in backward)."""
    f = shape.d_ff
    gate = nn.Parameter(w.gate_up[0, :f].to(dtype).clone())
    up = nn.Parameter(w.gate_up[0, f:].to(dtype).clone())
    down = nn.Parameter(w.down[0].to(dtype).clone())

    def forward(x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    return Method("limit", forward, [gate, up, down], tokens=shape.top_k)


def build_split_limit(w: Weights, shape: Shape, dtype: torch.dtype) -> Method:
    """Every expert's SwiGLU over an equal slice of the k*T rows, plain F.linear, no routing: what
    splitting the arithmetic over E experts' weights costs by itself (not timed by default)."""
    f, E = shape.d_ff, shape.num_experts
    experts = [
        [nn.Parameter(t.to(dtype).clone()) for t in (w.gate_up[e, :f], w.gate_up[e, f:], w.down[e])]
        for e in range(E)
    ]

    def forward(x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(E)
        return torch.cat([F.linear(F.silu(F.linear(p, g)) * F.linear(p, u), d) for p, (g, u, d) in zip(parts, experts)])

    return Method("split-limit", forward, [p for e in experts for p in e], tokens=shape.top_k)


# --- moiie -------------------------------------------------------------------------------------


def build_moiie(
    w: Weights, shape: Shape, dtype: torch.dtype, *, vanilla: bool, impl: str = "auto"
) -> nn.Module:
    E = shape.num_experts
    if vanilla:
        topology = {"vision": 0, "shared": E, "text": 0}
        router = {"kind": "top_k", "top_k": shape.top_k}
    else:
        topology = {"vision": shape.vision, "shared": shape.shared, "text": shape.text}
        router = {"kind": "modality_guided", "top_k": shape.top_k}
    config = MoEConfig(
        topology=topology, router=router, expert={"kind": "swiglu", "d_ff": shape.d_ff, "impl": impl}
    )
    layer = build_ffn(config, d_model=shape.d_model)
    with torch.no_grad():
        layer.experts.gate_up.copy_(w.gate_up)
        layer.experts.down.copy_(w.down)
        if vanilla:
            layer.router.weight.copy_(w.router)
        else:
            layer.router.vision.copy_(w.vision_router)
            layer.router.text.copy_(w.text_router)
    return layer.to(dtype)


def moiie_method(name: str, layer: nn.Module, *, compiled: bool = False) -> Method:
    run = torch.compile(layer) if compiled else layer

    def forward(x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return run(x, modality)[0]

    return Method(name, forward, list(layer.parameters()))


# --- HF transformers ---------------------------------------------------------------------------


def build_hf(w: Weights, shape: Shape, dtype: torch.dtype, *, experts_implementation: str) -> Method:
    """Mixtral's sparse MoE block (top-k over E experts, renormalised: the vanilla arm's routing).

    A block built from a bare config runs whatever ``config._experts_implementation`` says (None means
    the eager per-expert loop); a ``PreTrainedModel`` defaults it to grouped_mm. Set it explicitly.
    """
    config = MixtralConfig(
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=1,
    )
    config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(w.router)
        block.experts.gate_up_proj.copy_(w.gate_up)
        block.experts.down_proj.copy_(w.down)
    block = block.to(dtype)

    def forward(x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return block(x[None])[0]

    return Method(f"hf-{experts_implementation}", forward, list(block.parameters()))


# --- the official MoIIE dispatch, re-implemented --------------------------------------------------


class SwiGLUExpert(nn.Module):
    """One expert as its own module (Llama MLP layout)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LoopMoIIE(nn.Module):
    """MoIIE as the official code runs it: per modality, route with that modality's router, then loop
    over its candidate experts and run each on the tokens whose top-k picked it (boolean masks)."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.top_k = shape.top_k
        self.experts = nn.ModuleList(
            SwiGLUExpert(shape.d_model, shape.d_ff) for _ in range(shape.num_experts)
        )
        self.vision_router = nn.Linear(shape.d_model, shape.vision + shape.shared, bias=False)
        self.text_router = nn.Linear(shape.d_model, shape.shared + shape.text, bias=False)
        self.candidates = {
            VISION: list(range(shape.vision + shape.shared)),
            TEXT: list(range(shape.vision, shape.num_experts)),
        }

    def route_and_mix(self, x: torch.Tensor, router: nn.Linear, candidates: list[int]) -> torch.Tensor:
        probs = torch.softmax(router(x).float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for j, e in enumerate(candidates):
            picked = top_i == j
            rows = picked.any(dim=-1)
            if not rows.any():
                continue
            weight = (top_p * picked).sum(dim=-1)[rows]
            out[rows] += weight[:, None].to(x.dtype) * self.experts[e](x[rows])
        return out

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        for m, router in ((VISION, self.vision_router), (TEXT, self.text_router)):
            mask = modality == m
            if mask.any():
                y[mask] = self.route_and_mix(x[mask], router, self.candidates[m])
        return y


def build_official_loop(w: Weights, shape: Shape, dtype: torch.dtype) -> Method:
    layer = LoopMoIIE(shape)
    f = shape.d_ff
    with torch.no_grad():
        for e, expert in enumerate(layer.experts):
            expert.gate_proj.weight.copy_(w.gate_up[e, :f])
            expert.up_proj.weight.copy_(w.gate_up[e, f:])
            expert.down_proj.weight.copy_(w.down[e])
        layer.vision_router.weight.copy_(w.vision_router)
        layer.text_router.weight.copy_(w.text_router)
    layer = layer.to(dtype)
    return Method("official-loop", layer, list(layer.parameters()))


def build_method(name: str, w: Weights, shape: Shape, dtype: torch.dtype) -> Method:
    """Build one method by name (see :data:`METHODS`)."""
    if name == "limit":
        return build_limit(w, shape, dtype)
    if name == "split-limit":
        return build_split_limit(w, shape, dtype)
    if name in ("moiie", "moiie-compiled"):
        return moiie_method(
            name, build_moiie(w, shape, dtype, vanilla=False), compiled=name.endswith("compiled")
        )
    if name == "moiie-vanilla":
        return moiie_method(name, build_moiie(w, shape, dtype, vanilla=True))
    if name.startswith("moiie-"):  # moiie-loop, moiie-grouped_mm: the MoIIE arm with one engine forced
        return moiie_method(name, build_moiie(w, shape, dtype, vanilla=False, impl=name.split("-", 1)[1]))
    if name.startswith("hf-"):
        return build_hf(w, shape, dtype, experts_implementation=name[3:])
    if name == "official-loop":
        return build_official_loop(w, shape, dtype)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


METHODS = (
    "limit",
    "split-limit",
    "moiie",
    "moiie-vanilla",
    "moiie-compiled",
    "moiie-loop",
    "moiie-grouped_mm",
    "hf-eager",
    "hf-grouped_mm",
    "official-loop",
)
REFERENCE = {
    "moiie-vanilla": "hf-grouped_mm",
    "hf-eager": "hf-grouped_mm",
    "official-loop": "moiie",
    "moiie-compiled": "moiie",
    "moiie-loop": "moiie",
    "moiie-grouped_mm": "moiie",
}
"""Which method's output each method must reproduce (same routing, same weights)."""
