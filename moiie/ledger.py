"""Parameter ledger: total parameters and parameters activated per token for each modality.

Computed from a config on the meta device (no weights allocated), so the paper-size layout can be
counted here. A token of modality m activates everything outside the FFN slots (vision encoder
and projector included), and inside each slot: a dense FFN whole; in an MoE layer, its own
router's parameters, the experts it runs through (k for token choice; the expected number for
expert choice) and the always-on experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moiie.layer import DenseFFN, MoELayer
from moiie.modality import MODALITY_NAMES, TEXT, VISION


@dataclass
class ParameterLedger:
    total: int
    vision_encoder: int
    projector: int
    llm: int
    """All LLM parameters, FFN slots included."""
    ffn_slots: int
    """Parameters inside the FFN slots (experts, routers, always-on experts)."""
    activated: dict[str, int] = field(default_factory=dict)
    """Parameters one token activates, by modality name ("text", "vision")."""

    def summary(self) -> str:
        def m(n: int) -> str:
            return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"

        return (
            f"total {m(self.total)} | activated per text token {m(self.activated['text'])}, "
            f"per vision token {m(self.activated['vision'])} | vision encoder {m(self.vision_encoder)}, "
            f"projector {m(self.projector)}, LLM {m(self.llm)} (FFN slots {m(self.ffn_slots)})"
        )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _slot_activated(slot: nn.Module, modality: int) -> float:
    if isinstance(slot, DenseFFN):
        return _count(slot)
    if isinstance(slot, MoELayer):
        per_expert = _count(slot.experts) / slot.experts.num_experts
        always_on = 0 if slot.always_on is None else _count(slot.always_on)
        return (
            slot.router.parameters_for(modality)
            + slot.router.activated_experts(modality) * per_expert
            + always_on
        )
    raise TypeError(f"unknown FFN slot module {type(slot).__name__}")


def ledger_of(model: nn.Module) -> ParameterLedger:
    """The ledger of a built :class:`moiie.model.MoIIEForCausalLM` (real or meta tensors)."""
    from moiie.backbones.llm import FFNAdapter

    slots = [m.ffn for m in model.llm.modules() if isinstance(m, FFNAdapter)]
    total = _count(model)
    in_slots = sum(_count(s) for s in slots)
    activated = {
        MODALITY_NAMES[m]: round(total - in_slots + sum(_slot_activated(s, m) for s in slots))
        for m in (TEXT, VISION)
    }
    return ParameterLedger(
        total=total,
        vision_encoder=_count(model.vision),
        projector=_count(model.projector),
        llm=_count(model.llm),
        ffn_slots=in_slots,
        activated=activated,
    )


def parameter_ledger(config) -> ParameterLedger:
    """The ledger of the model ``config`` describes, built on the meta device (nothing allocated)."""
    from moiie.model import MoIIEForCausalLM, reload_config

    with torch.device("meta"):
        model = MoIIEForCausalLM.from_config(reload_config(config))
    return ledger_of(model)
