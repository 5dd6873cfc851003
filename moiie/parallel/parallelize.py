"""Turn a single-process model into its expert- and data-parallel version on a (data x expert) mesh.

Gradient convention (the one DDP and FSDP use): each rank's loss is its own batch's loss (plus the
global balancing loss, :mod:`moiie.parallel.stats`), and the training objective is the mean of the
ranks' losses. Replicated parameters get the mean of the ranks' gradients (DDP / FSDP2 over the
whole world). An expert's gradient arrives on its owning rank already summed over every rank of
the expert-parallel group (the all-to-all's backward brings it home); the layer scales it by
1 / expert-parallel size and the data group averages it, which divides the sum by the world size:
every layout then follows the gradient of the same objective. (The scaling happens inside the
layer's graph rather than through FSDP2's gradient divide factor, which gloo cannot apply.)
"""

from __future__ import annotations

import json
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from moiie.layer import MoELayer
from moiie.parallel.collectives import check_same_across_ranks
from moiie.parallel.expert_parallel import ExpertParallelMoE
from moiie.parallel.mesh import DATA, EXPERT, ParallelConfig


def moe_layers(model: nn.Module) -> list[tuple[nn.Module, str, MoELayer]]:
    """(parent, attribute name, layer) for every single-process MoE layer inside ``model``."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, MoELayer)
    ]


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    """(qualified name, layer) of every expert-parallel layer, in module order (DDP wrappers included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so its model is already the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def fingerprint(model: nn.Module, config: ParallelConfig) -> str:
    """What every rank must agree on: the parallel config, the model config and every tensor's shape."""
    model_config = getattr(model, "moiie_config", None)
    return json.dumps(
        {
            "parallel": config.model_dump(mode="json"),
            "model": None if model_config is None else model_config.model_dump(mode="json"),
            "tensors": [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()],
        }
    )


def parallelize(model: nn.Module, mesh: DeviceMesh, config: ParallelConfig) -> nn.Module:
    """Split every MoE layer's experts over the mesh's expert dimension, train the rest data-parallel.

    ``model``: a single-process model (``MoIIEForCausalLM`` or any module holding ``MoELayer``s),
    identical on every rank once ``config.broadcast_weights`` copies rank 0's weights, already on
    this rank's device. Returns the module to train: ``model`` itself sharded in place (FSDP2), or a
    ``DistributedDataParallel`` wrapper (DDP). Before anything that could hang, ranks compare a
    digest of their model config, parallel config and tensor shapes (a fixed-size exchange), so a
    mismatch raises on every rank; then a layout that does not fit the world or the expert counts
    raises, on every rank alike.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised (launch with torchrun)")
    check_same_across_ranks(fingerprint(model, config), what="model and parallel config")
    world = dist.get_world_size()
    layers = moe_layers(model)
    problems = config.problems(world, [layer.experts.num_experts for _, _, layer in layers])
    expected = (config.data or world // config.expert, config.expert)
    if not problems and (mesh.mesh_dim_names != (DATA, EXPERT) or tuple(mesh.shape) != expected):
        problems.append(
            f"parallel: the mesh has dims {mesh.mesh_dim_names} of shape {tuple(mesh.shape)} but the config "
            f"asks for ({DATA!r}, {EXPERT!r}) of shape {expected}; build it with moiie.parallel.build_mesh"
        )
    if problems:
        raise ValueError("\n".join(problems))
    if config.broadcast_weights:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
    expert_group, world_group = mesh.get_group(EXPERT), dist.group.WORLD
    for parent, name, layer in layers:
        # statistics over the whole world: every rank holds a distinct slice of the global batch
        ep = ExpertParallelMoE.from_layer(
            layer, group=expert_group, stats_group=world_group, expert_grad_scale=1.0 / config.expert
        )
        setattr(parent, name, ep)
    if config.data_parallel == "fsdp":
        return _fully_shard(model, mesh)
    return _ddp(model, mesh)


def _fully_shard(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2: experts sharded over their data group, decoder layers and the root over the whole world."""
    from torch.distributed.fsdp import fully_shard

    world_mesh = init_device_mesh(mesh.device_type, (dist.get_world_size(),), mesh_dim_names=("world",))
    for _, layer in expert_parallel_layers(model):
        fully_shard(layer.experts, mesh=mesh[DATA])
    for block in _decoder_layers(model):
        fully_shard(block, mesh=world_mesh)
    fully_shard(model, mesh=world_mesh)
    return model


def _ddp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """DDP over the world for replicated parameters; expert gradients averaged over the data group by hooks."""
    data_group = mesh.get_group(DATA)
    ignored = []
    for name, layer in expert_parallel_layers(model):
        for pname, p in layer.experts.named_parameters():
            ignored.append(f"{name}.experts.{pname}")
            if p.requires_grad:
                p.register_hook(partial(_average_expert_grad, group=data_group))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    # batches without images leave the vision tower and projector out of the graph
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def _average_expert_grad(grad: torch.Tensor, *, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return grad
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad.div_(size)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    llm = getattr(model, "llm", None)
    if llm is None:
        return []
    from moiie.backbones.llm import decoder_layers

    return decoder_layers(llm)
