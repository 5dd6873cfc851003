"""moiie: modality-aware mixture-of-experts layers for vision-language models (MoIIE, arXiv 2508.09779)."""

from moiie import backbones, experts, projectors, routers  # noqa: F401  (register built-in kinds)
from moiie.config_base import Config, ConfigError
from moiie.dispatch import dispatch
from moiie.layer import DenseFFN, DenseFFNConfig, FFNConfig, MoEConfig, MoELayer, build_ffn, check_topology
from moiie.losses import AuxLossConfig, aux_losses, balance_loss
from moiie.modality import PAD, TEXT, VISION
from moiie.registry import (
    EXPERTS,
    FFNS,
    LLM_BACKBONES,
    PROJECTORS,
    ROUTERS,
    VISION_ENCODERS,
    Registry,
    RegistryError,
)
from moiie.routers import LearnedRouterConfig, Router, RouterConfig, Routing
from moiie.topology import ExpertTopology
from moiie.upcycle import upcycle

__version__ = "0.1.0"

__all__ = [
    "EXPERTS",
    "FFNS",
    "LLM_BACKBONES",
    "PAD",
    "PROJECTORS",
    "ROUTERS",
    "TEXT",
    "VISION",
    "VISION_ENCODERS",
    "AuxLossConfig",
    "Config",
    "ConfigError",
    "DenseFFN",
    "DenseFFNConfig",
    "ExpertTopology",
    "FFNConfig",
    "LearnedRouterConfig",
    "MoEConfig",
    "MoELayer",
    "Registry",
    "RegistryError",
    "Router",
    "RouterConfig",
    "Routing",
    "aux_losses",
    "balance_loss",
    "build_ffn",
    "check_topology",
    "dispatch",
    "upcycle",
]
