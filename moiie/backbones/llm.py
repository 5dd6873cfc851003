"""HF causal LMs as LVLM backbones, with chosen FFNs replaced by moiie FFN slots (SPEC sections 1 and 6).

The chosen decoder layers' ``mlp`` modules are swapped for :class:`FFNAdapter`, which upcycles
the dense weights into the configured FFN slot and reads each position's modality from a
:class:`RoutingContext` shared by the model. No HF modeling code is forked or patched: the
adapter is an ordinary submodule with the ``mlp`` call signature ``(B, L, d) -> (B, L, d)``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from moiie.config_base import Config
from moiie.modality import TEXT
from moiie.registry import LLM_BACKBONES
from moiie.routers.base import Routing
from moiie.upcycle import upcycle

LayerChoice = Literal["odd", "even", "all", "none"] | list[int]


class RoutingContext:
    """Per-forward state shared by all FFN adapters of one model: modality ids in, routing records out.

    ``modality`` is (B, L) for the positions of the current forward. During cached decoding the LM
    sees only the new positions; those are generated tokens, which are text (SPEC section 4).
    Records are keyed by layer so that a recomputation (gradient checkpointing) replaces, not appends.
    """

    def __init__(self) -> None:
        self.modality: torch.Tensor | None = None
        self.records: dict[int, Routing | None] = {}

    def start(self, modality: torch.Tensor | None) -> None:
        self.modality = modality
        self.records = {}

    def modality_for(self, hidden: torch.Tensor) -> torch.Tensor:
        lead = hidden.shape[:-1]
        if self.modality is not None and tuple(self.modality.shape) == tuple(lead):
            return self.modality
        return torch.full(lead, TEXT, dtype=torch.long, device=hidden.device)

    def routings(self) -> list[Routing | None]:
        return [self.records[k] for k in sorted(self.records)]


class FFNAdapter(nn.Module):
    """Stands in for a decoder layer's ``mlp``: hidden (B, L, d) -> (B, L, d), routing recorded in the context."""

    def __init__(self, ffn: nn.Module, context: RoutingContext, layer_index: int):
        super().__init__()
        self.ffn = ffn
        self.layer_index = layer_index
        self._context = [context]  # a list hides it from nn.Module attribute registration and state dicts

    @property
    def context(self) -> RoutingContext:
        return self._context[0]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y, routing = self.ffn(hidden_states, self.context.modality_for(hidden_states))
        self.context.records[self.layer_index] = routing
        return y


# sizes of an inline HF config; larger values are typos that would exhaust memory or never finish building
_SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "vocab_size": 2**22,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 2**14,
    "max_position_embeddings": 2**24,
}


class HFCausalLMConfig(Config):
    """Any HF causal LM, from a local folder or an inline config (random init)."""

    kind: Literal["hf_causal_lm"] = "hf_causal_lm"
    path: str | None = None
    """Local folder with config.json and weights (loaded offline); exclusive with `config`."""
    config: dict[str, Any] | None = None
    """Inline HF config (must include `model_type`), randomly initialised; exclusive with `path`."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the LM."""
    num_hidden_layers: int | None = Field(None, ge=1, le=1024)
    """Keep only the first N decoder layers (truncated copies for fast experiments)."""

    @model_validator(mode="after")
    def _one_source(self) -> HFCausalLMConfig:
        if (self.path is None) == (self.config is None):
            raise ValueError(
                "path: give exactly one of `path` (a local folder) or `config` (an inline HF config)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError(
                "config.model_type: an inline HF config needs `model_type` (e.g. llama, qwen2, phi3)"
            )
        for key, top in _SIZE_LIMITS.items():
            value = (self.config or {}).get(key)
            if value is not None and (type(value) is not int or not 1 <= value <= top):
                raise ValueError(f"config.{key}: expected an int in 1..{top}, got {value!r}")
        return self

    def hf_config(self):
        from transformers import AutoConfig

        overrides = {} if self.num_hidden_layers is None else {"num_hidden_layers": self.num_hidden_layers}
        if self.path is not None:
            if not os.path.isdir(self.path):
                raise FileNotFoundError(
                    f"llm.path: {self.path!r} is not a local folder (moiie never downloads weights)"
                )
            return AutoConfig.from_pretrained(self.path, local_files_only=True, **overrides)
        data = {k: v for k, v in self.config.items() if k != "model_type"}
        return AutoConfig.for_model(self.config["model_type"], **{**data, **overrides})

    def architecture_only(self) -> HFCausalLMConfig:
        """The same architecture as an inline config, so a saved model rebuilds without the original weights."""
        cfg = self.hf_config().to_dict()
        drop = {
            "transformers_version",
            "architectures",
            "_name_or_path",
            "quantization_config",
            "torch_dtype",
            "dtype",
        }
        return HFCausalLMConfig(config={k: v for k, v in cfg.items() if k not in drop}, dtype=self.dtype)


def build_hf_causal_lm(config: HFCausalLMConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from moiie.safe_load import refusing_pickled_code

    dtype = getattr(torch, config.dtype)
    if config.path is not None:
        with refusing_pickled_code(f"llm.path {config.path!r}"):
            return AutoModelForCausalLM.from_pretrained(
                config.path, config=config.hf_config(), local_files_only=True, dtype=dtype
            )
    try:
        hf_config = config.hf_config()
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as err:  # HF and torch reject bad sizes with errors of their own types
        raise ValueError(f"llm.config: transformers cannot build this inline config: {err}") from err


LLM_BACKBONES.register(
    "hf_causal_lm",
    HFCausalLMConfig,
    example=lambda: HFCausalLMConfig(
        config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 128,
        }
    ),
)(build_hf_causal_lm)


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The LM's decoder layers in order, found by the class names HF declares in ``_no_split_modules``."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot find decoder layers in {type(lm).__name__}: it declares no `_no_split_modules` matching its modules"
        )
    return layers


def select_layers(choice: LayerChoice, n_layers: int) -> list[int]:
    """Indices of the layers whose FFN becomes an FFN slot: odd (SPEC default), even, all, none, or a list."""
    if isinstance(choice, list):
        bad = [i for i in choice if not 0 <= i < n_layers]
        if bad or len(set(choice)) != len(choice):
            raise ValueError(f"moe_layers: {choice} must be distinct layer indices in 0..{n_layers - 1}")
        return sorted(choice)
    return {
        "odd": list(range(1, n_layers, 2)),
        "even": list(range(0, n_layers, 2)),
        "all": list(range(n_layers)),
        "none": [],
    }[choice]


def inject_ffns(lm: nn.Module, ffn_config: Config, layers: LayerChoice, context: RoutingContext) -> list[int]:
    """Replace the FFN of the chosen decoder layers by upcycled FFN slots; returns the layer indices."""
    blocks = decoder_layers(lm)
    chosen = select_layers(layers, len(blocks))
    for i in chosen:
        mlp = getattr(blocks[i], "mlp", None)
        if mlp is None:
            raise ValueError(f"decoder layer {i} ({type(blocks[i]).__name__}) has no `mlp` module to replace")
        if isinstance(mlp, FFNAdapter):
            raise ValueError(f"decoder layer {i} already holds a moiie FFN")
        blocks[i].mlp = FFNAdapter(upcycle(mlp, ffn_config), context, i)
    return chosen
