"""Vision encoders and LLM backbones (registered in ``moiie.VISION_ENCODERS`` / ``moiie.LLM_BACKBONES``).

Heavy libraries (open_clip, transformers, onnx) are imported only when a kind that needs them is
validated or built, so ``import moiie`` stays fast.
"""

from moiie.backbones import llm, smollm2, vision_dinov2_offline, vision_hf, vision_open_clip, vision_patch_mlp  # noqa: F401
from moiie.backbones.vision import ImagePreprocess, VisionEncoder
from moiie.backbones.vision_dinov2_offline import (
    Dinov2OfflineVisionConfig,
    build_dinov2_offline_vision,
    converted_dinov2_small,
    load_dinov2_small,
)
from moiie.backbones.vision_hf import HFVisionConfig, HFVisionEncoder, build_hf_vision
from moiie.backbones.vision_open_clip import (
    OpenClipVisionConfig,
    OpenClipVisionEncoder,
    build_open_clip_vision,
)
from moiie.backbones.vision_patch_mlp import (
    PatchMLPVisionConfig,
    PatchMLPVisionEncoder,
    build_patch_mlp_vision,
)

__all__ = [
    "Dinov2OfflineVisionConfig",
    "HFVisionConfig",
    "HFVisionEncoder",
    "ImagePreprocess",
    "OpenClipVisionConfig",
    "OpenClipVisionEncoder",
    "PatchMLPVisionConfig",
    "PatchMLPVisionEncoder",
    "VisionEncoder",
    "build_dinov2_offline_vision",
    "build_hf_vision",
    "build_open_clip_vision",
    "build_patch_mlp_vision",
    "converted_dinov2_small",
    "load_dinov2_small",
]
