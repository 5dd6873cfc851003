"""Any open_clip vision tower by architecture name, LLaVA-style features (SPEC section 1).

The tower (a native ViT, a timm trunk such as SigLIP/EVA/ConvNeXt, or a ModifiedResNet) is built by
``open_clip.create_model(name, pretrained=None)`` with random weights, optionally filled from a
local checkpoint. Only the visual tower is kept: its blocks after the chosen feature layer and its
pooling head are removed, so every remaining parameter shapes the features. The text tower is
replaced by a one-layer stub while building so that no text model is built (or fetched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, JsonValue, field_validator
from torch import nn

from moiie.backbones.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    VisionEncoder,
    fixed_size_problem,
    resolve_feature_layer,
)
from moiie.config_base import Config
from moiie.registry import VISION_ENCODERS

# smallest text tower open_clip accepts; it is dropped right after building
_TEXT_STUB = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}
_RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class OpenClipVisionConfig(Config):
    """An open_clip architecture's visual tower (see ``open_clip.list_models()``)."""

    kind: Literal["open_clip"] = "open_clip"
    model: str = "ViT-L-14-336"
    """open_clip architecture name, e.g. "ViT-L-14-336", "ViT-SO400M-14-SigLIP-384", "RN50"."""
    checkpoint: str | None = None
    """Local open_clip state dict (.pt/.pth/.bin via torch.load, or .safetensors); None: random init."""
    feature_layer: int = -2
    """Block whose output is returned: -1 last, -2 penultimate (LLaVA/MoIIE), k >= 1 the k-th block."""
    drop_cls: bool = True
    """Drop the class token (towers without one, e.g. SigLIP and ResNets, return patch tokens only)."""
    vision_overrides: dict[str, JsonValue] = Field(default_factory=dict)
    """Entries replacing those of the architecture's ``vision_cfg`` (e.g. width/layers for a tiny tower)."""
    mean: tuple[float, float, float] | None = None
    """Per-channel normalisation mean; None: the one open_clip lists for this architecture's weights."""
    std: tuple[float, float, float] | None = None
    """Per-channel normalisation std; None: the one open_clip lists for this architecture's weights."""

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        import open_clip

        names = open_clip.list_models()
        if name not in names:
            close = [n for n in names if n.lower() == name.lower()]
            close += [n for n in difflib.get_close_matches(name, names, n=6, cutoff=0.6) if n not in close]
            hint = f"close matches: {close}" if close else "see open_clip.list_models()"
            raise ValueError(f"unknown open_clip model {name!r}; {hint}")
        return name

    @field_validator("vision_overrides")
    @classmethod
    def _known_overrides(cls, overrides: dict[str, JsonValue]) -> dict[str, JsonValue]:
        import open_clip

        known = {f.name for f in dataclasses.fields(open_clip.CLIPVisionCfg)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown open_clip vision_cfg keys {unknown}; known keys: {sorted(known)}")
        return overrides


@dataclasses.dataclass(frozen=True)
class _TowerLayout:
    take_index: int
    """Index of the wanted block in ``forward_intermediates``' list."""
    prefix_tokens: int
    """Class (and other prefix) tokens the tower puts before the patch tokens."""
    output_fmt: Literal["NLC", "NCHW"]


class OpenClipVisionEncoder(VisionEncoder):
    """pixels (B, 3, H, W) at the tower's fixed size -> (B, [prefix +] patches, d_vision)."""

    def __init__(
        self,
        *,
        tower: nn.Module,
        layout: _TowerLayout,
        drop_cls: bool,
        image_size: tuple[int, int],
        preprocess: ImagePreprocess,
    ):
        super().__init__()
        self.tower = tower
        self.layout = layout
        self.keep_prefix = layout.prefix_tokens > 0 and not drop_cls
        self.image_size = image_size
        self.preprocess = preprocess
        # one probe pass gives the output shape for every tower type; eval mode so that patch
        # dropout (a training-time option of some towers) does not shrink the count
        training = tower.training
        tower.eval()
        with torch.no_grad():
            probe = self._features(torch.zeros(1, 3, *image_size, dtype=self._dtype()))
        tower.train(training)
        self._n_tokens, self.d_vision = probe.shape[1], probe.shape[2]

    def _dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def size_problem(self, height: int, width: int) -> str | None:
        return fixed_size_problem(height, width, self.image_size)

    def n_tokens(self, image_size: int | None = None) -> int:
        self._resolve_size(image_size)
        return self._n_tokens

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower.forward_intermediates(
            pixel_values,
            indices=[self.layout.take_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt=self.layout.output_fmt,
            output_extra_tokens=self.keep_prefix,
        )
        x = out["image_intermediates"][0]
        if x.ndim == 4:  # (B, C, h, w) feature map -> tokens in raster order
            x = x.flatten(2).transpose(1, 2)
        if self.keep_prefix:
            x = torch.cat([out["image_intermediates_prefix"][0], x], dim=1)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixel_values)
        return self._features(pixel_values.to(self._dtype()))


def load_open_clip_visual_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The visual tower's entries of an open_clip checkpoint (whole-model or visual-only)."""
    from moiie.safe_load import load_tensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip checkpoint {str(path)!r} does not exist")
    state = load_tensors(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def _prune_tower(visual: nn.Module, feature_layer: int) -> _TowerLayout:
    """Remove what comes after the wanted block; say how to read its output."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        keep = resolve_feature_layer(feature_layer, len(visual.transformer.resblocks), allow_embeddings=False)
        visual.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
        visual.attn_pool = None
        if hasattr(visual, "attn_pool_contrastive"):
            visual.attn_pool_contrastive = None
        return _TowerLayout(keep - 1, prefix_tokens=1, output_fmt="NLC")
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        keep = resolve_feature_layer(feature_layer, len(trunk.feature_info), allow_embeddings=False)
        if hasattr(trunk, "prune_intermediate_layers"):
            trunk.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
        visual.head = nn.Identity()
        tokens = hasattr(trunk, "num_prefix_tokens")  # ViT-like trunks return tokens, CNNs feature maps
        prefix = getattr(trunk, "num_prefix_tokens", 0)
        return _TowerLayout(keep - 1, prefix_tokens=prefix, output_fmt="NLC" if tokens else "NCHW")
    if isinstance(visual, ModifiedResNet):
        keep = resolve_feature_layer(feature_layer, len(_RESNET_STAGES), allow_embeddings=False)
        for name in _RESNET_STAGES[keep:]:
            setattr(visual, name, nn.Identity())
        visual.attnpool = nn.Identity()
        return _TowerLayout(keep - 1, prefix_tokens=0, output_fmt="NCHW")
    raise ValueError(f"unsupported open_clip vision tower type {type(visual).__name__}")


def open_clip_normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std open_clip lists for this architecture's released weights, when they all agree."""
    import open_clip

    seen = set()
    for tag in open_clip.list_pretrained_tags_by_model(model):
        cfg = open_clip.get_pretrained_cfg(model, tag)
        seen.add((tuple(cfg.get("mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("std", OPENAI_CLIP_STD))))
    return seen.pop() if len(seen) == 1 else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip warns "initialized randomly" through the root logger even when we load weights next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _tiny_open_clip_example() -> OpenClipVisionConfig:
    return OpenClipVisionConfig(
        model="ViT-B-32",
        vision_overrides={"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
    )


@VISION_ENCODERS.register("open_clip", OpenClipVisionConfig, example=_tiny_open_clip_example)
def build_open_clip_vision(config: OpenClipVisionConfig) -> OpenClipVisionEncoder:
    import open_clip

    arch = open_clip.get_model_config(config.model)
    vision_cfg = {**arch["vision_cfg"], **config.vision_overrides}
    try:
        with _quiet_root_logger():
            clip = open_clip.create_model(
                config.model, pretrained=None, vision_cfg=vision_cfg, text_cfg=dict(_TEXT_STUB)
            )
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(
            f"open_clip could not build {config.model!r} with vision_cfg {vision_cfg}: {err}"
        ) from err
    visual = clip.visual
    del clip
    if config.checkpoint is not None:
        state = load_open_clip_visual_state_dict(config.checkpoint)
        try:
            missing, unexpected = visual.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"checkpoint {config.checkpoint!r} does not fit {config.model!r}: {err}"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {config.checkpoint!r} does not fit the visual tower of {config.model!r}: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
    layout = _prune_tower(visual, config.feature_layer)
    size = visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise ValueError(
            f"open_clip model {config.model!r} takes non-square {size} images; only square ones are supported"
        )
    mean, std = open_clip_normalisation(config.model)
    preprocess = ImagePreprocess(
        image_size=size[0], mean=config.mean or mean, std=config.std or std, channels=3
    )
    return OpenClipVisionEncoder(
        tower=visual, layout=layout, drop_cls=config.drop_cls, image_size=size, preprocess=preprocess
    )
