"""The parallel layout: a 2-D device mesh (data x expert) and the checks that run before any collective.

Every rank of the world processes its own slice of the global batch. Ranks are arranged as a
``data x expert`` grid: the ranks of one row (an expert-parallel group) split each MoE layer's
experts between them and exchange tokens by all-to-all; the ranks of one column (a data group)
hold the same experts. Everything outside the routed experts is replicated over the whole world
and trained data-parallel (FSDP2 or DDP over all ranks). ``expert`` is the fastest-varying mesh
dimension, so an expert-parallel group is made of consecutive ranks (one node, when it fits),
which keeps the all-to-all on NVLink.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moiie.config_base import Config
from moiie.parallel.collectives import check_same_across_ranks

DATA, EXPERT = "data", "expert"


class ParallelConfig(Config):
    """How a run spreads over ``torchrun``'s processes."""

    kind: Literal["parallel"] = "parallel"
    expert: int = Field(1, ge=1)
    """Expert-parallel size: ranks that split each MoE layer's experts (must divide the expert count)."""
    data: int | None = Field(None, ge=1)
    """Data-parallel replicas of each expert slice; None = world size / expert."""
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    """How replicated parameters are trained: FSDP2 (`fully_shard`, sharded) or DDP (replicated)."""
    timeout_s: float = Field(1800.0, gt=0.0, le=86400.0)
    """How long a collective may wait before the job fails (e.g. ranks waiting while rank 0 evaluates)."""
    broadcast_weights: bool = True
    """Copy rank 0's weights to every rank before splitting (ranks need not share a seed or a file)."""

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        """(data, expert) for a world of ``world_size`` processes; raises ``ValueError`` when it cannot fit."""
        problems = self.problems(world_size)
        if problems:
            raise ValueError("\n".join(problems))
        return (self.data or world_size // self.expert, self.expert)

    def problems(self, world_size: int, num_experts: list[int] | None = None) -> list[str]:
        """Every reason this layout cannot run on ``world_size`` processes with MoE layers of ``num_experts``."""
        problems = []
        data = self.data if self.data is not None else max(world_size // self.expert, 1)
        if data * self.expert > world_size:
            problems.append(
                f"parallel: the mesh data x expert = {data} x {self.expert} = {data * self.expert} ranks "
                f"is larger than the world ({world_size} processes; launch with torchrun --nproc-per-node)"
            )
        elif data * self.expert != world_size:
            problems.append(
                f"parallel: the mesh data x expert = {data} x {self.expert} = {data * self.expert} ranks "
                f"does not cover the world of {world_size} processes"
            )
        for n in sorted(set(num_experts or [])):
            if n % self.expert:
                problems.append(
                    f"parallel.expert: {n} experts per MoE layer cannot be split over {self.expert} "
                    f"expert-parallel ranks; choose a divisor of {n}"
                )
        return problems


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the ``torchrun`` job (no-op when already joined): NCCL when GPUs are visible, else gloo.

    Each process takes the GPU numbered by its ``LOCAL_RANK``.
    """
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def device_type() -> str:
    """``cuda`` when the process group runs NCCL, else ``cpu`` (gloo)."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def build_mesh(config: ParallelConfig) -> DeviceMesh:
    """The (data, expert) mesh over the initialised default process group.

    Ranks first compare a digest of their configs (a fixed-size exchange that cannot hang), then
    check the layout against the world size; both happen before any process group is created, so
    a layout that does not fit, or differs between ranks, fails on every rank with one message.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: launch with torchrun and call "
            "torch.distributed.init_process_group first"
        )
    check_same_across_ranks(config.to_json(), what="parallel config")
    shape = config.mesh_shape(dist.get_world_size())
    kind = device_type()
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    return init_device_mesh(kind, shape, mesh_dim_names=(DATA, EXPERT))
