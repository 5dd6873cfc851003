"""What every vision encoder offers, and the image preprocessing they share (SPEC section 1).

An LVLM turns each image into a sequence of feature vectors: ``encoder(pixels)`` maps
``(B, C, H, W)`` to ``(B, n_tokens, d_vision)``. Each registered kind in ``moiie.VISION_ENCODERS``
builds a :class:`VisionEncoder`; ``encoder.preprocess`` turns raw images into the pixels it expects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

_ACCEPTED = "a PIL image, an (H, W) or (H, W, C) numpy array, or a (C, H, W) torch tensor"


@dataclass(frozen=True)
class ImagePreprocess:
    """Raw images -> normalised pixels ``(B, channels, image_size, image_size)`` float32.

    Each image is scaled to [0, 1], resized so its shorter side is ``image_size`` (bilinear,
    antialiased; skipped when it already has that size), centre-cropped to a square, then
    normalised with ``(x - mean) / std`` per channel.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    max_value: float | None = None
    """Raw value of a white pixel in numpy arrays and tensors; None: 255 for integer data, 1.0 for
    floating data. PIL images are 8-bit, so always use 255."""

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.channels}), got {self.mean} and {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.max_value is not None and self.max_value <= 0:
            raise ValueError(f"max_value must be positive, got {self.max_value}")

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """images: a list of PIL images, numpy arrays or tensors (sizes may differ) -> (B, C, S, S)."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"expected a list of images ({_ACCEPTED} each), got {type(images).__name__}")
        if not images:
            raise ValueError("expected at least one image, got an empty list")
        batch = [self._square(self._to_unit_chw(image, i)) for i, image in enumerate(images)]
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (torch.stack(batch) - mean) / std

    def _to_unit_chw(self, image: Any, index: int) -> torch.Tensor:
        """One image -> (C, H, W) float32 with white at 1.0."""
        where = f"image {index}"
        if _is_pil(image):
            image = image.convert("L" if self.channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.float32) / 255.0
            return _hwc_to_chw(torch.from_numpy(array.copy()), self.channels, where)
        if isinstance(image, np.ndarray):
            if image.dtype.kind not in "biuf":
                raise TypeError(f"{where}: expected a numeric numpy array, got dtype {image.dtype}")
            tensor = torch.from_numpy(np.array(image, copy=True))  # writable, contiguous
            return self._scale(_hwc_to_chw(tensor, self.channels, where), where)
        if isinstance(image, torch.Tensor):
            if image.dtype.is_complex:
                raise TypeError(f"{where}: expected a real tensor, got dtype {image.dtype}")
            if image.ndim == 2 and self.channels == 1:
                image = image.unsqueeze(0)
            if image.ndim != 3 or image.shape[0] != self.channels:
                raise ValueError(
                    f"{where}: expected a ({self.channels}, H, W) tensor, got shape {tuple(image.shape)}"
                )
            return self._scale(image.detach().cpu(), where)
        raise TypeError(f"{where}: expected {_ACCEPTED}, got {type(image).__name__}")

    def _scale(self, chw: torch.Tensor, where: str) -> torch.Tensor:
        integer = not (chw.dtype.is_floating_point or chw.dtype == torch.bool)
        white = self.max_value if self.max_value is not None else (255.0 if integer else 1.0)
        if chw.shape[-1] == 0 or chw.shape[-2] == 0:
            raise ValueError(f"{where}: empty image of shape {tuple(chw.shape)}")
        return chw.to(torch.float32) / white

    def _square(self, chw: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        height, width = chw.shape[-2:]
        if (height, width) == (size, size):
            return chw
        if min(height, width) != size:
            scale = size / min(height, width)
            new = (max(size, round(height * scale)), max(size, round(width * scale)))
            chw = F.interpolate(chw[None], size=new, mode="bilinear", antialias=True, align_corners=False)[0]
            height, width = new
        top, left = (height - size) // 2, (width - size) // 2
        return chw[:, top : top + size, left : left + size]


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(image, Image.Image)


def _hwc_to_chw(tensor: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    if tensor.ndim == 2:
        if channels != 1:
            raise ValueError(
                f"{where}: expected an (H, W, {channels}) array, got a single-channel (H, W) array "
                f"of shape {tuple(tensor.shape)} (stack it {channels} times for a colour encoder)"
            )
        return tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[-1] != channels:
        expected = "(H, W) or (H, W, 1)" if channels == 1 else f"(H, W, {channels})"
        raise ValueError(f"{where}: expected an {expected} array, got shape {tuple(tensor.shape)}")
    return tensor.permute(2, 0, 1)


def resolve_feature_layer(feature_layer: int, num_blocks: int, *, allow_embeddings: bool = True) -> int:
    """How many blocks to run so that the last one's output is ``feature_layer``.

    ``feature_layer`` counts like HF ``hidden_states``: 0 is the embeddings, k the output of block
    k, and negative values count from the end (-1 the last block, -2 the penultimate one).
    """
    keep = feature_layer if feature_layer >= 0 else num_blocks + 1 + feature_layer
    lowest = 0 if allow_embeddings else 1
    if not lowest <= keep <= num_blocks:
        raise ValueError(
            f"feature_layer {feature_layer} is out of range for a tower with {num_blocks} blocks: "
            f"expected {lowest}..{num_blocks} or {lowest - num_blocks - 1}..-1"
        )
    return keep


class VisionEncoder(nn.Module, ABC):
    """Images -> token features: ``forward(pixels (B, C, H, W)) -> (B, n_tokens, d_vision)``.

    Subclasses set ``d_vision`` and ``preprocess`` and say which image sizes they take
    (:meth:`size_problem`); ``forward`` must call :meth:`check_pixels` first so that a wrong input
    fails with a message instead of a shape error deep inside the tower.
    """

    d_vision: int
    """Channel width of the returned features."""
    preprocess: ImagePreprocess
    """Turns raw images into the pixels ``forward`` takes."""

    @abstractmethod
    def n_tokens(self, image_size: int | None = None) -> int:
        """Number of tokens returned for a square image of ``image_size`` (default: preprocess size)."""

    @abstractmethod
    def size_problem(self, height: int, width: int) -> str | None:
        """Why this encoder cannot take an image of ``height`` x ``width``, or None if it can."""

    @property
    def channels(self) -> int:
        return self.preprocess.channels

    def _resolve_size(self, image_size: int | None) -> int:
        size = self.preprocess.image_size if image_size is None else image_size
        problem = self.size_problem(size, size)
        if problem:
            raise ValueError(f"{type(self).__name__}: {problem}")
        return size

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise ValueError/TypeError naming what was expected when ``pixel_values`` can't be encoded."""
        name = type(self).__name__
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"{name}: expected a (B, C, H, W) tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"{name}: expected floating-point pixels (run encoder.preprocess on raw images), "
                f"got dtype {pixel_values.dtype}"
            )
        if pixel_values.ndim != 4:
            raise ValueError(
                f"{name}: expected pixels of shape (B, {self.channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != self.channels:
            raise ValueError(
                f"{name}: expected {self.channels} channels, got pixels of shape {tuple(pixel_values.shape)}"
            )
        problem = self.size_problem(*pixel_values.shape[-2:])
        if problem:
            raise ValueError(f"{name}: {problem}")


def patch_size_problem(height: int, width: int, patch_size: int) -> str | None:
    """Size check shared by towers that interpolate position embeddings: any multiple of the patch."""
    if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
        near = patch_size * max(1, round(height / patch_size))
        return (
            f"expected an image size that is a multiple of the patch size {patch_size} "
            f"(e.g. {near}x{near}), got {height}x{width}"
        )
    return None


def fixed_size_problem(height: int, width: int, size: tuple[int, int]) -> str | None:
    """Size check for towers built for exactly one image size."""
    if (height, width) != tuple(size):
        return f"expected images of {size[0]}x{size[1]} (the tower's fixed size), got {height}x{width}"
    return None
