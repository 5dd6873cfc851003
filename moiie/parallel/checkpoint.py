"""Checkpoints that move between world sizes: always in the single-process layout.

Saving from a parallel run gathers every tensor to its single-process shape (FSDP2 shards over
their mesh, expert slices over the expert-parallel group, in global expert order) and writes what
:meth:`MoIIEForCausalLM.save_pretrained` writes: same files, same keys, same shapes. Such a folder
loads in one process with :meth:`MoIIEForCausalLM.from_pretrained`, and into any parallel layout
either before splitting (``from_pretrained`` then :func:`moiie.parallel.parallelize`) or after
(:func:`load_pretrained`), where each rank keeps its own slice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moiie.model import WEIGHTS_NAME, save_model_files
from moiie.parallel.expert_parallel import ExpertParallelMoE
from moiie.parallel.parallelize import expert_parallel_layers, unwrap


def _expert_tensors(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    """State-dict key -> owning layer for every expert-sliced tensor."""
    return {
        f"{name}.experts.{key}": layer
        for name, layer in expert_parallel_layers(model)
        for key in layer.experts.state_dict()
    }


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict, assembled on every rank (a collective: every rank must call it).

    Tensors shared between keys (tied embeddings) stay shared, so the saved file keeps the tie.
    """
    inner = unwrap(model)
    experts = _expert_tensors(inner)
    done: dict[int, torch.Tensor] = {}
    out = {}
    for key, t in inner.state_dict(keep_vars=True).items():
        if id(t) not in done:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            full = full.detach()
            if key in experts:
                group = experts[key].group
                parts = [torch.empty_like(full) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, full.contiguous(), group=group)
                full = torch.cat(parts)
            done[id(t)] = full
        out[key] = done[id(t)]
    return out


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write a single-process ``MoIIEForCausalLM`` checkpoint from a parallel run (rank 0 writes).

    Every rank must call it; it returns once the folder is complete.
    """
    inner = unwrap(model)
    state = full_state_dict(inner)
    if dist.get_rank() == 0:
        save_model_files(folder, inner.moiie_config, {k: v.cpu() for k, v in state.items()})
    dist.barrier()


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a single-process state dict into a parallel model: each rank keeps its slice of each tensor.

    Raises ``ValueError`` (on every rank, before copying anything) when keys or shapes do not match.
    """
    inner = unwrap(model)
    experts = _expert_tensors(inner)
    targets = inner.state_dict(keep_vars=True)
    problems = [f"missing from the checkpoint: {k}" for k in targets if k not in state]
    problems += [f"not in the model: {k}" for k in state if k not in targets]
    for key, t in targets.items():
        if key not in state:
            continue
        shape = list(t.shape)
        if key in experts:
            shape[0] = experts[key].num_experts
        if list(state[key].shape) != shape:
            problems.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(shape)}")
    if problems:
        raise ValueError("the checkpoint does not match the model:\n  " + "\n  ".join(problems[:20]))
    with torch.no_grad():
        for key, t in targets.items():
            src = state[key]
            if key in experts:
                ids = experts[key].expert_ids
                src = src[ids.start : ids.stop]
            if isinstance(t, DTensor):
                local = distribute_tensor(src.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(local.to_local())
            else:
                t.copy_(src)


def load_pretrained(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a ``save_pretrained`` folder (written by one process or by any parallel layout) into ``model``."""
    from moiie.safe_load import load_safetensors, safetensors_metadata

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (not a moiie checkpoint folder)")
    tied = json.loads(safetensors_metadata(path).get("tied", "{}"))
    state = load_safetensors(path)
    for alias, source in tied.items():
        state[alias] = state[source]
    load_full_state_dict(model, state)
