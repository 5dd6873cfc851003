"""HF transformers vision towers (CLIP, SigLIP, DINOv2), LLaVA-style features (SPEC section 1).

A tower comes from a local folder (``from_pretrained(path, local_files_only=True)``; nothing is
fetched from a hub) or from an inline config with random weights. Features are one entry of the
tower's ``hidden_states``; the blocks after it and the post-norm/pooling head are removed, so
every remaining parameter shapes the features. Position embeddings are interpolated, so any image
size that is a multiple of the patch size works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import JsonValue, model_validator
from torch import nn

from moiie.backbones.vision import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    VisionEncoder,
    patch_size_problem,
    resolve_feature_layer,
)
from moiie.config_base import Config
from moiie.registry import VISION_ENCODERS
from moiie.safe_load import refusing_pickled_code

HFFamily = Literal["clip", "siglip", "dinov2"]


@dataclass(frozen=True)
class _Family:
    config_class: str
    model_class: str
    blocks: str
    """Attribute of the tower's ``encoder`` holding its blocks."""
    heads: tuple[str, ...]
    """Modules after the blocks that the features never pass through."""
    has_cls: bool
    interpolate_flag: bool
    """Whether forward needs ``interpolate_pos_encoding=True`` for a size other than the native one."""
    mean: tuple[float, ...]
    std: tuple[float, ...]


_FAMILIES: dict[str, _Family] = {
    "clip": _Family(
        config_class="CLIPVisionConfig",
        model_class="CLIPVisionModel",
        blocks="layers",
        heads=("post_layernorm",),
        has_cls=True,
        interpolate_flag=True,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
    ),
    "siglip": _Family(
        config_class="SiglipVisionConfig",
        model_class="SiglipVisionModel",
        blocks="layers",
        heads=("post_layernorm", "head"),
        has_cls=False,
        interpolate_flag=True,
        mean=HALF,
        std=HALF,
    ),
    "dinov2": _Family(
        config_class="Dinov2Config",
        model_class="Dinov2Model",
        blocks="layer",
        heads=("layernorm",),
        has_cls=True,
        interpolate_flag=False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
}
# `model_type` values found in config.json files, whole-model and vision-only
_MODEL_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
}


class HFVisionConfig(Config):
    """An HF vision tower from a local folder (``path``) or an inline config (``model_type`` + ``config``)."""

    kind: Literal["hf"] = "hf"
    path: str | None = None
    """Local folder holding config.json and weights (a whole CLIP/SigLIP model or a vision tower)."""
    model_type: HFFamily | None = None
    """Tower family; needed with ``config``, read from config.json with ``path``."""
    config: dict[str, JsonValue] | None = None
    """Keyword arguments of the family's vision config class (random weights); exclusive with ``path``."""
    feature_layer: int = -2
    """Entry of ``hidden_states``: 0 embeddings, k the k-th block, -1 last, -2 penultimate (LLaVA/MoIIE)."""
    drop_cls: bool = True
    """Drop the class token (CLIP, DINOv2); SigLIP has none."""
    image_size: int | None = None
    """Side of the square images preprocess produces; None: the tower's own; a multiple of the patch."""
    mean: tuple[float, float, float] | None = None
    """Per-channel normalisation mean; None: the family's (CLIP: OpenAI, SigLIP: 0.5, DINOv2: ImageNet)."""
    std: tuple[float, float, float] | None = None
    """Per-channel normalisation std; None: the family's."""

    @model_validator(mode="after")
    def _check_source(self) -> HFVisionConfig:
        if (self.path is None) == (self.config is None):
            raise ValueError(
                "path: give exactly one of `path` (a local folder) or `config` (with `model_type`)"
            )
        if self.config is not None and self.model_type is None:
            raise ValueError("model_type: needed with an inline `config` (one of clip, siglip, dinov2)")
        return self


class HFVisionEncoder(VisionEncoder):
    """pixels (B, 3, H, W), H and W multiples of the patch -> (B, [1 +] (H/p)(W/p), d_vision)."""

    def __init__(
        self,
        *,
        tower: nn.Module,
        patch_size: int,
        native_size: int,
        has_cls: bool,
        drop_cls: bool,
        interpolate_flag: bool,
        preprocess: ImagePreprocess,
    ):
        super().__init__()
        self.tower = tower
        self.patch_size, self.native_size = patch_size, native_size
        self.cls_tokens = int(has_cls)
        self.drop_cls = drop_cls
        self.interpolate_flag = interpolate_flag
        self.d_vision = tower.config.hidden_size
        self.preprocess = preprocess

    def size_problem(self, height: int, width: int) -> str | None:
        return patch_size_problem(height, width, self.patch_size)

    def n_tokens(self, image_size: int | None = None) -> int:
        size = self._resolve_size(image_size)
        return (size // self.patch_size) ** 2 + (0 if self.drop_cls else self.cls_tokens)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixel_values)
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self.interpolate_flag and tuple(pixel_values.shape[-2:]) != (self.native_size, self.native_size):
            kwargs["interpolate_pos_encoding"] = True
        dtype = next(self.tower.parameters()).dtype
        hidden = self.tower(pixel_values=pixel_values.to(dtype), **kwargs).hidden_states[-1]
        return hidden[:, self.cls_tokens :] if self.drop_cls else hidden


def hf_family(model_type: str) -> str:
    """Family name ("clip", "siglip", "dinov2") of a config.json ``model_type``."""
    try:
        return _MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported HF vision model_type {model_type!r}; supported: {sorted(_MODEL_TYPES)}"
        ) from None


def _load_tower(config: HFVisionConfig) -> tuple[str, nn.Module]:
    import transformers

    if config.path is not None:
        folder = Path(config.path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a local HF model folder (no config.json)")
        family = hf_family(json.loads((folder / "config.json").read_text()).get("model_type", ""))
        if config.model_type is not None and config.model_type != family:
            raise ValueError(f"model_type {config.model_type!r} does not match {folder}'s {family!r}")
        model_class = getattr(transformers, _FAMILIES[family].model_class)
        with refusing_pickled_code(f"vision.path {str(folder)!r}"):
            tower = model_class.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        return family, tower
    family = config.model_type
    spec = _FAMILIES[family]
    try:
        hf_config = getattr(transformers, spec.config_class)(**config.config)
    except Exception as err:  # HF raises its own (non-ValueError) validation errors
        raise ValueError(f"invalid {spec.config_class} arguments {config.config}: {err}") from None
    return family, getattr(transformers, spec.model_class)(hf_config)


def _truncate(tower: nn.Module, spec: _Family, feature_layer: int) -> None:
    """Keep the blocks up to the wanted hidden state; drop heads the features skip."""
    core = getattr(tower, "vision_model", tower)
    blocks = getattr(core.encoder, spec.blocks)
    keep = resolve_feature_layer(feature_layer, len(blocks))
    setattr(core.encoder, spec.blocks, blocks[:keep])
    tower.config.num_hidden_layers = keep
    for name in spec.heads:
        if isinstance(getattr(core, name, None), nn.Module):
            setattr(core, name, nn.Identity())
    mask_token = getattr(core.embeddings, "mask_token", None)
    if isinstance(mask_token, nn.Parameter):  # only used for masked-image pretraining
        mask_token.requires_grad_(False)


def hf_vision_encoder(
    tower: nn.Module,
    family: str,
    *,
    feature_layer: int,
    drop_cls: bool,
    image_size: int | None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> HFVisionEncoder:
    """Wrap an already-loaded HF tower of ``family`` (shared with kinds that make their own towers)."""
    spec = _FAMILIES[family]
    _truncate(tower, spec, feature_layer)
    patch = tower.config.patch_size
    native = tower.config.image_size
    size = native if image_size is None else image_size
    problem = patch_size_problem(size, size, patch)
    if problem:
        raise ValueError(f"image_size: {problem}")
    preprocess = ImagePreprocess(image_size=size, mean=mean or spec.mean, std=std or spec.std, channels=3)
    return HFVisionEncoder(
        tower=tower,
        patch_size=patch,
        native_size=native,
        has_cls=spec.has_cls,
        drop_cls=drop_cls,
        interpolate_flag=spec.interpolate_flag,
        preprocess=preprocess,
    )


def _tiny_hf_example() -> HFVisionConfig:
    return HFVisionConfig(
        model_type="clip",
        config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        },
    )


@VISION_ENCODERS.register("hf", HFVisionConfig, example=_tiny_hf_example)
def build_hf_vision(config: HFVisionConfig) -> HFVisionEncoder:
    family, tower = _load_tower(config)
    return hf_vision_encoder(
        tower,
        family,
        feature_layer=config.feature_layer,
        drop_cls=config.drop_cls,
        image_size=config.image_size,
        mean=config.mean,
        std=config.std,
    )
