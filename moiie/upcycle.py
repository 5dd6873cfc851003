"""Upcycling (SPEC section 6): a dense FFN's weights copied into every expert; routers N(0, 0.02).

Reading a backbone's FFN is keyed by the module's class (never guessed from which attributes
exist); :func:`register_ffn_layout` adds a class moiie does not know yet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moiie.experts.base import DenseFFNWeights
from moiie.layer import DenseFFN, DenseFFNConfig, MoEConfig, MoELayer, build_ffn

_ACTIVATION_NAMES = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "ReLU": "relu",
}

FFNReader = Callable[[nn.Module], DenseFFNWeights]
FFN_LAYOUTS: dict[str, FFNReader] = {}


def register_ffn_layout(class_name: str, reader: FFNReader) -> None:
    """Teach upcycling to read FFN modules of class ``class_name``; registering a name twice is an error."""
    if class_name in FFN_LAYOUTS:
        raise ValueError(f"an FFN layout for {class_name!r} is already registered")
    FFN_LAYOUTS[class_name] = reader


def activation_name(act: nn.Module) -> str:
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name not in _ACTIVATION_NAMES:
        raise ValueError(f"cannot upcycle an FFN with activation {name}; known: {sorted(_ACTIVATION_NAMES)}")
    return _ACTIVATION_NAMES[name]


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def read_gated(module: nn.Module) -> DenseFFNWeights:
    """Llama / Mistral / Qwen2 / Qwen3 layout: gate_proj, up_proj, down_proj, act_fn."""
    if (
        module.gate_proj.bias is not None
        or module.up_proj.bias is not None
        or module.down_proj.bias is not None
    ):
        raise ValueError(f"{type(module).__name__} has biased projections; swiglu experts are bias-free")
    return DenseFFNWeights(
        gate=module.gate_proj.weight.detach(),
        up=module.up_proj.weight.detach(),
        down=module.down_proj.weight.detach(),
        activation=activation_name(module.act_fn),
    )


def read_phi3(module: nn.Module) -> DenseFFNWeights:
    """Phi-3 layout: one fused gate_up_proj (gate first), down_proj, activation_fn."""
    gate, up = module.gate_up_proj.weight.detach().chunk(2, dim=0)
    return DenseFFNWeights(
        gate=gate,
        up=up,
        down=module.down_proj.weight.detach(),
        activation=activation_name(module.activation_fn),
    )


def read_gpt2(module: nn.Module) -> DenseFFNWeights:
    """GPT-2 layout: Conv1D c_fc / c_proj with (in, out) weights, act."""
    return DenseFFNWeights(
        up=module.c_fc.weight.detach().t(),
        up_bias=module.c_fc.bias.detach(),
        down=module.c_proj.weight.detach().t(),
        down_bias=module.c_proj.bias.detach(),
        activation=activation_name(module.act),
    )


def read_fc(module: nn.Module) -> DenseFFNWeights:
    """CLIP / SigLIP / Phi-2 layout: fc1, fc2 (nn.Linear), activation_fn."""
    return DenseFFNWeights(
        up=module.fc1.weight.detach(),
        up_bias=_bias(module.fc1),
        down=module.fc2.weight.detach(),
        down_bias=_bias(module.fc2),
        activation=activation_name(module.activation_fn),
    )


for _name in (
    "LlamaMLP",
    "MistralMLP",
    "Qwen2MLP",
    "Qwen3MLP",
    "Qwen2MoeMLP",
    "OlmoMLP",
    "Olmo2MLP",
    "GemmaMLP",
):
    register_ffn_layout(_name, read_gated)
register_ffn_layout("Phi3MLP", read_phi3)
register_ffn_layout("GPT2MLP", read_gpt2)
for _name in ("CLIPMLP", "SiglipMLP", "PhiMLP"):
    register_ffn_layout(_name, read_fc)


def read_dense_ffn(module: nn.Module) -> DenseFFNWeights:
    """The weights of a backbone FFN module, in ``nn.Linear`` layout."""
    if isinstance(module, DenseFFN):
        return module.ffn.export_dense() if hasattr(module.ffn, "export_dense") else _from_moiie_dense(module)
    reader = FFN_LAYOUTS.get(type(module).__name__)
    if reader is None:
        raise ValueError(
            f"cannot upcycle FFN module {type(module).__name__}: moiie reads {sorted(FFN_LAYOUTS)}; "
            "teach it yours with moiie.upcycle.register_ffn_layout(class_name, reader)"
        )
    return reader(module)


def _from_moiie_dense(module: DenseFFN) -> DenseFFNWeights:
    ffn = module.ffn
    if hasattr(ffn, "gate_up"):
        gate, up = ffn.gate_up[0].detach().chunk(2, dim=0)
        return DenseFFNWeights(gate=gate, up=up, down=ffn.down[0].detach(), activation="silu")
    return DenseFFNWeights(
        up=ffn.fc[0].detach(),
        down=ffn.proj[0].detach(),
        up_bias=None if ffn.fc_bias is None else ffn.fc_bias[0].detach(),
        down_bias=None if ffn.proj_bias is None else ffn.proj_bias[0].detach(),
        activation=ffn.activation,
    )


def upcycle(dense: nn.Module, config: MoEConfig | DenseFFNConfig) -> MoELayer | DenseFFN:
    """Build the FFN slot ``config`` describes, with every expert a copy of ``dense``'s weights.

    The result computes what ``dense`` did (up to float error) for every routed kind whose
    combine weights sum to 1 per token; the upcycling tests check this rather than assume it.
    """
    weights = read_dense_ffn(dense)
    layer = build_ffn(config, d_model=weights.d_model, d_ff=weights.d_ff)
    experts = [layer.ffn] if isinstance(layer, DenseFFN) else [layer.experts, layer.always_on]
    for e in experts:
        if e is not None:
            e.load_dense(weights)
    return layer.to(weights.up.dtype)
