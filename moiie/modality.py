"""Per-token modality ids (SPEC section 4): 0 text, 1 vision, -1 padding."""

from __future__ import annotations

import torch

TEXT = 0
VISION = 1
PAD = -1
MODALITY_NAMES = {TEXT: "text", VISION: "vision"}


def check_modality(
    modality: torch.Tensor, leading_shape: torch.Size | tuple[int, ...], *, name: str = "modality"
) -> None:
    """Raise ``ValueError`` unless ``modality`` is an integer tensor of ``leading_shape`` with values in {-1, 0, 1}."""
    if not isinstance(modality, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of ints (0 text, 1 vision, -1 padding), got {type(modality).__name__}"
        )
    if modality.dtype.is_floating_point or modality.dtype.is_complex or modality.dtype == torch.bool:
        raise TypeError(
            f"{name} must have an integer dtype (0 text, 1 vision, -1 padding), got {modality.dtype}"
        )
    if tuple(modality.shape) != tuple(leading_shape):
        raise ValueError(
            f"{name} has shape {tuple(modality.shape)} but the hidden states need {tuple(leading_shape)} "
            "(one id per token)"
        )
    wide = modality.long()  # unsigned dtypes cannot hold -1; compare as int64
    if modality.numel() and bool(((wide < PAD) | (wide > VISION)).any()):
        bad = sorted(set(wide[(wide < PAD) | (wide > VISION)].tolist()))[:5]
        raise ValueError(f"{name} holds {bad}; expected only 0 (text), 1 (vision) or -1 (padding)")


def apply_attention_mask(modality: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mark positions where ``attention_mask == 0`` as padding."""
    if attention_mask is None:
        return modality
    if attention_mask.shape != modality.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(modality.shape)} like modality"
        )
    return torch.where(attention_mask.bool(), modality, torch.full_like(modality, PAD))


def official_vision_rule(is_image: torch.Tensor) -> torch.Tensor:
    """The official code's rule (inherited from CogVLM): position i is vision only if i and i+1 are both image.

    is_image: (batch, seq) bool. Returns (batch, seq) bool; the last token of each image block becomes text.
    """
    nxt = torch.zeros_like(is_image)
    nxt[..., :-1] = is_image[..., 1:]
    return is_image & nxt


def modality_ids(
    image_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    shape: tuple[int, ...],
    *,
    rule: str = "exact",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per-position modality for an LVLM sequence (SPEC section 4).

    image_mask: (B, L) bool, True where an image feature sits. rule "exact": those positions are
    vision; rule "official": only image positions followed by an image position (the official
    code's rule). Positions with attention_mask == 0 are padding. Returns (B, L) int64.
    """
    if rule not in ("exact", "official"):
        raise ValueError(f"modality_rule must be 'exact' or 'official', got {rule!r}")
    modality = torch.full(shape, TEXT, dtype=torch.long, device=device)
    if image_mask is not None:
        vision = image_mask.bool() if rule == "exact" else official_vision_rule(image_mask.bool())
        modality = torch.where(vision, torch.full_like(modality, VISION), modality)
    return apply_attention_mask(modality, attention_mask)
