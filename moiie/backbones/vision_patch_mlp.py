"""A tiny trainable vision encoder for small grayscale images (8x8 handwritten digits).

Each non-overlapping ``patch_size`` patch, and optionally the whole image, is flattened and sent
through a two-layer MLP, then a learned position embedding per token is added. It stands in for a
pretrained tower where a real one would be overkill (tests, the digits question-answering task).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from moiie.backbones.vision import ImagePreprocess, VisionEncoder, fixed_size_problem
from moiie.config_base import Config
from moiie.registry import VISION_ENCODERS


class PatchMLPVisionConfig(Config):
    """Patches (plus one whole-image token) -> MLP -> + position embedding."""

    kind: Literal["patch_mlp"] = "patch_mlp"
    image_size: int = Field(8, ge=1, le=4096)
    """Side of the (square) input image in pixels; the encoder takes only this size."""
    patch_size: int = Field(4, ge=1, le=4096)
    """Side of each non-overlapping patch; must divide image_size."""
    channels: Literal[1, 3] = 1
    """Colour channels of the input (1 for grayscale, 3 for RGB)."""
    global_token: bool = True
    """Add one token computed from the whole image, placed before the patch tokens."""
    hidden: int = Field(64, ge=1, le=65536)
    """Hidden width of the MLPs."""
    d_vision: int = Field(64, ge=1, le=65536)
    """Width of the output features."""
    max_value: float = Field(16.0, gt=0)
    """Raw pixel value of white in numpy arrays and tensors (16 for scikit-learn's digits)."""

    @model_validator(mode="after")
    def _check(self) -> PatchMLPVisionConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        return self


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class PatchMLPVisionEncoder(VisionEncoder):
    """pixels (B, C, S, S) -> (B, [1 +] (S / p)^2, d_vision)."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        channels: int,
        global_token: bool,
        hidden: int,
        d_vision: int,
        preprocess: ImagePreprocess,
    ):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.d_vision = d_vision
        self.preprocess = preprocess
        self.patch_mlp = _mlp(channels * patch_size**2, hidden, d_vision)
        self.global_mlp = _mlp(channels * image_size**2, hidden, d_vision) if global_token else None
        n_tokens = self.grid**2 + int(global_token)
        self.position = nn.Parameter(torch.empty(n_tokens, d_vision).normal_(0.0, 0.02))

    def size_problem(self, height: int, width: int) -> str | None:
        return fixed_size_problem(height, width, (self.image_size, self.image_size))

    def n_tokens(self, image_size: int | None = None) -> int:
        self._resolve_size(image_size)
        return self.position.shape[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixel_values)
        x = pixel_values.to(self.position.dtype)
        b, c, g, p = x.shape[0], x.shape[1], self.grid, self.patch_size
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        tokens = self.patch_mlp(patches)
        if self.global_mlp is not None:
            tokens = torch.cat([self.global_mlp(x.reshape(b, 1, -1)), tokens], dim=1)
        return tokens + self.position


@VISION_ENCODERS.register(
    "patch_mlp", PatchMLPVisionConfig, example=lambda: PatchMLPVisionConfig(hidden=16, d_vision=8)
)
def build_patch_mlp_vision(config: PatchMLPVisionConfig) -> PatchMLPVisionEncoder:
    preprocess = ImagePreprocess(
        image_size=config.image_size,
        mean=(0.0,) * config.channels,
        std=(1.0,) * config.channels,
        channels=config.channels,
        max_value=config.max_value,
    )
    return PatchMLPVisionEncoder(
        image_size=config.image_size,
        patch_size=config.patch_size,
        channels=config.channels,
        global_token=config.global_token,
        hidden=config.hidden,
        d_vision=config.d_vision,
        preprocess=preprocess,
    )
