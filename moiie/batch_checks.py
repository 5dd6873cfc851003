"""Checks on an LVLM batch before it reaches torch (SPEC section 1's inputs).

A malformed input gets a ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or
values) that names the argument and says what was expected, instead of an index or shape error
from deep inside the language model.
"""

from __future__ import annotations

import torch


def check_tensor(name: str, value: object, expected: str) -> torch.Tensor:
    """``value`` itself when it is a tensor; else a TypeError naming ``name`` and what it should be."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({expected}), got {type(value).__name__}")
    return value


def is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_binary(name: str, t: torch.Tensor, meaning: str) -> None:
    """``t`` (bool, integer or floating) must hold only 0 and 1."""
    if t.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor ({meaning}), got {t.dtype}")
    if t.dtype != torch.bool and t.numel() and bool(((t != 0) & (t != 1)).any()):
        found = sorted({float(v) for v in t[(t != 0) & (t != 1)].unique()[:5].tolist()})
        raise ValueError(f"{name} must hold only 0 and 1 ({meaning}), found {found}")


def check_lvlm_batch(
    *,
    input_ids: object,
    attention_mask: object,
    pixel_values: object,
    image_mask: object,
    position_ids: object,
) -> None:
    """Type, dtype, rank and value checks of :meth:`MoIIEForCausalLM.forward`'s tensor arguments.

    input_ids (B, L) int; attention_mask (B, L [+ cached]) 0/1; pixel_values (N, C, H, W) float;
    image_mask (B, L) 0/1; position_ids (B or 1, L) int. Labels are checked by the loss.
    """
    ids = check_tensor("input_ids", input_ids, "(batch, seq) integer token ids")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a (batch, seq) int64 or int32 tensor, got {ids.dtype} {tuple(ids.shape)}"
        )
    if ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)}); give at least one token per sample")
    if attention_mask is not None:
        mask = check_tensor("attention_mask", attention_mask, "(batch, seq) of 1 (token) and 0 (padding)")
        check_binary("attention_mask", mask, "1 for a real token, 0 for padding")
    if image_mask is not None:
        img = check_tensor("image_mask", image_mask, "(batch, seq) bool, True at image positions")
        if tuple(img.shape) != tuple(ids.shape):
            raise ValueError(
                f"image_mask has shape {tuple(img.shape)}, expected {tuple(ids.shape)} like input_ids"
            )
        check_binary("image_mask", img, "True at image positions")
    if pixel_values is not None:
        pixels = check_tensor("pixel_values", pixel_values, "(n_images, C, H, W) preprocessed images")
        if not pixels.is_floating_point():
            raise TypeError(
                f"pixel_values must be floating point (images preprocessed by the processor), got {pixels.dtype}"
            )
        if pixels.dim() != 4:
            raise ValueError(f"pixel_values must have shape (n_images, C, H, W), got {tuple(pixels.shape)}")
    if position_ids is not None:
        pos = check_tensor("position_ids", position_ids, "(batch, seq) integer positions")
        if (
            not is_integer(pos)
            or pos.dim() != 2
            or pos.shape[-1] != ids.shape[-1]
            or pos.shape[0] not in (1, ids.shape[0])
        ):
            raise ValueError(
                f"position_ids must be a ({ids.shape[0]} or 1, {ids.shape[-1]}) integer tensor, "
                f"got {pos.dtype} {tuple(pos.shape)}"
            )
