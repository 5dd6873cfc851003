"""Expert topology (SPEC section 2): vision-intra, shared and text-intra groups in one global id space.

Global ids are laid out ``[vision-intra | shared | text-intra]``, so the MoIIE candidate sets
``C_vision = I_v ∪ S`` and ``C_text = S ∪ I_t`` are both contiguous ranges, and one sort serves
both modalities during dispatch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moiie.config_base import Config
from moiie.modality import TEXT, VISION


class ExpertTopology(Config):
    """Sizes of the three expert groups of one MoE layer."""

    kind: Literal["topology"] = "topology"
    vision: int = Field(1, ge=0, le=4096)
    """Number of intra-modality vision experts (reachable only by image tokens)."""
    shared: int = Field(2, ge=0, le=4096)
    """Number of inter-modality (shared) experts (reachable by both modalities)."""
    text: int = Field(1, ge=0, le=4096)
    """Number of intra-modality text experts (reachable only by text tokens)."""

    @property
    def num_experts(self) -> int:
        return self.vision + self.shared + self.text

    def group(self, name: str) -> range:
        """Global ids of group ``name`` in {"vision", "shared", "text"}."""
        starts = {"vision": 0, "shared": self.vision, "text": self.vision + self.shared}
        sizes = {"vision": self.vision, "shared": self.shared, "text": self.text}
        return range(starts[name], starts[name] + sizes[name])

    def intra(self, modality: int) -> range:
        return self.group("vision" if modality == VISION else "text")

    def candidates(self, modality: int) -> range:
        """MoIIE candidates of ``modality``: its intra experts plus the shared pool (contiguous)."""
        if modality == VISION:
            return range(0, self.vision + self.shared)
        if modality == TEXT:
            return range(self.vision, self.num_experts)
        raise ValueError(f"modality must be 0 (text) or 1 (vision), got {modality}")

    def group_of(self, expert: int) -> str:
        for name in ("vision", "shared", "text"):
            if expert in self.group(name):
                return name
        raise ValueError(f"expert id {expert} outside 0..{self.num_experts - 1}")
