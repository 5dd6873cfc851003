"""Where a NaN or Inf came from: replays a step whose loss or gradients were not finite, with hooks.

The trainer checks each step's loss and gradients. Only when one is not finite does it call
:func:`locate_nonfinite`, which replays the step's micro-batches once and reports, in order:
non-finite values in the batch itself, in the parameters, the first module whose output holds a
non-finite tensor (for a router, its routing probabilities, the softmax of its logits), and, when
the forward pass is clean, the first parameter whose gradient turns non-finite in backward order.
Healthy steps pay nothing; the replay leaves the RNG state and the gradients as it found them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _nonfinite_field(value: Any, where: str = "", depth: int = 0) -> str | None:
    """Path of the first floating tensor holding NaN/Inf inside a module output (tensors, tuples,
    mappings, dataclasses such as Routing), or None."""
    if depth > 4:
        return None
    if isinstance(value, torch.Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return where or "output"
        return None
    if isinstance(value, Mapping):
        items: Iterable[tuple[str, Any]] = ((str(k), v) for k, v in value.items())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        sub = f"{where}.{key}" if where and not key.startswith("[") else f"{where}{key}"
        found = _nonfinite_field(item, sub, depth + 1)
        if found is not None:
            return found
    return None


def describe_module(name: str, module: nn.Module | None = None) -> str:
    """Where ``name`` sits in an LVLM, in words: "decoder layer 3", "vision encoder", "projector"."""
    from moiie.routers.base import Router

    m = _LAYER.search(name)
    if m is not None:
        where = f"decoder layer {m[1]}"
    elif name.startswith("vision"):
        where = "vision encoder"
    elif name.startswith("projector"):
        where = "projector"
    else:
        where = "language model"
    if isinstance(module, Router):
        return f"router logits of {where}"
    return where


def _first_nonfinite_batch_tensor(batches: list[dict[str, torch.Tensor]]) -> str | None:
    for i, batch in enumerate(batches):
        for key, value in batch.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"the batch's {key} (micro-batch {i}) holds NaN/Inf"
    return None


def _nonfinite_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def locate_nonfinite(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    backward: bool,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    grad_accum: int = 1,
) -> str:
    """Replay ``batches`` (one step's micro-batches) and say where the first non-finite value appears.

    backward: also run backward (the forward was finite but a gradient was not).
    autocast: returns the autocast context the step ran under.
    """
    findings = []
    if (bad := _first_nonfinite_batch_tensor(batches)) is not None:
        findings.append(bad)
    if params := _nonfinite_parameters(model):
        more = f" (and {len(params) - 1} more)" if len(params) > 1 else ""
        findings.append(f"parameter {params[0]} ({describe_module(params[0])}) holds NaN/Inf{more}")
    first: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
        if first:
            return
        field = _nonfinite_field(output)
        if field is None:
            return
        name = names.get(id(module), "?")
        if name:
            first.append(f"{describe_module(name, module)}: `{field}` in the output of {name}")
        else:
            first.append(f"`{field}` of the model's output (every layer's output was finite)")

    def grad_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not first and not bool(torch.isfinite(grad).all()):
                first.append(
                    f"{describe_module(name)}: gradient of {name} (first non-finite in backward order)"
                )

        return hook

    handles = [m.register_forward_hook(forward_hook) for m in model.modules()]
    if backward:
        handles += [p.register_hook(grad_hook(n)) for n, p in model.named_parameters() if p.requires_grad]
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in batches:
                with torch.set_grad_enabled(backward), autocast():
                    out = model(**batch)
                if first:
                    break
                if backward:
                    (out.loss / grad_accum).backward()
                    if first:
                        break
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    if first:
        findings.append(f"first non-finite tensor: {first[0]}")
    elif not findings:
        findings.append("the non-finite value did not reappear when the step was replayed")
    return "; ".join(findings)
