"""Where a training run executes: one process, or every process of a ``torchrun`` job.

The trainer talks to a :class:`Runtime` for everything that differs between the two: which slice of
each global batch this process trains on, how the loss is normalised, how the model is wrapped,
how gradients are clipped, who writes files, and how a single-process copy of the model is made for
evaluation and upcycling. :class:`SingleProcess` is the identity; :class:`Distributed` runs the
layout of ``TrainConfig.parallel`` on a (data x expert) mesh (:mod:`moiie.parallel`).

Semantics under ``torchrun`` (chosen so that a run matches the single-process run on the same
global batch, up to float summation order):

- ``batch_size`` is the global micro-batch: every rank takes ``batch_size / world`` consecutive
  samples of the same global order.
- The language-model loss is the mean over the global micro-batch's target tokens (each rank's
  token sum divided by the global token count, times the world size, since data parallelism averages
  the ranks' gradients). The balancing losses are formed from statistics summed over the world.
- Logged figures are global: losses and token counts are reduced over the world. The ``route/*``
  figures of the metrics log describe rank 0's slice of the batch.
- Checkpoints hold the model in the single-process layout (they load anywhere) plus one optimizer
  file per rank; resuming needs the same world size and layout.
- Evaluation by generation runs on rank 0 on a gathered single-process copy of the model while the
  other ranks wait (``parallel.timeout_s`` bounds the wait).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moiie.train import checkpoint as ckpt

OPTIM_NAME = "optimizer-rank{rank}-of-{world}.pt"


def launched_world_size() -> int:
    """The number of processes ``torchrun`` launched (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def make_runtime(parallel) -> Runtime:
    """The runtime for this process: distributed when launched by ``torchrun`` with more than one
    process (``parallel`` None means plain FSDP2 data parallelism), else single-process.

    A layout that needs several processes (``parallel.expert > 1`` or ``parallel.data > 1``) in a
    process that was not launched that way raises before anything starts."""
    world = launched_world_size()
    if world > 1:
        from moiie.parallel import ParallelConfig

        return Distributed(parallel if parallel is not None else ParallelConfig())
    if parallel is not None and (parallel.expert > 1 or (parallel.data or 1) > 1):
        raise ValueError(
            f"parallel: the layout data={parallel.data} x expert={parallel.expert} needs several processes; "
            "launch with `torchrun --nproc-per-node N -m moiie train CONFIG.yaml` (or drop the parallel section)"
        )
    return SingleProcess()


class Runtime:
    """Single-process behaviour; :class:`Distributed` overrides what differs."""

    rank, world, distributed = 0, 1, False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def check_batch(self, name: str, batch_size: int) -> None:
        """Raise when ``batch_size`` (a stage's global micro-batch) cannot be split over the ranks."""

    def local(self, indices: list[int]) -> list[int]:
        """This rank's part of a global micro-batch."""
        return indices

    def target_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """The global micro-batch's number of next-token targets (labels not -100 after the shift)."""
        return (labels[:, 1:] != -100).sum()

    def lm_scale(self, labels: torch.Tensor) -> torch.Tensor:
        """Factor turning this rank's mean LM loss into its share of the global mean, times the world
        size (data parallelism averages the ranks' gradients). A collective."""
        return torch.ones((), device=labels.device)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module to train (parameters' ``requires_grad`` must already be final)."""
        return model

    def inner(self, model: nn.Module) -> nn.Module:
        """The model inside any wrapper."""
        return model

    def clip_grad_norm(self, model: nn.Module, params: list[torch.Tensor], max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    def mean(self, figures: dict[str, float]) -> dict[str, float]:
        """Figures averaged over the ranks (same keys on every rank)."""
        return figures

    def total(self, value: int) -> int:
        """A count summed over the ranks."""
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return flag

    def single_model(self, model: nn.Module, *, every_rank: bool = False) -> nn.Module | None:
        """A single-process model with the trained weights: on rank 0 (None elsewhere), or a fresh one on
        every rank with ``every_rank`` (to keep training it, e.g. upcycled). A collective."""
        return model

    def write_checkpoint(self, root: Path, stage: int, step: int, model: nn.Module, state: dict) -> None:
        """An atomic checkpoint; ``state`` holds ``optimizer`` (this rank's) and the shared trainer state."""
        ckpt.write_checkpoint(root, stage, step, model, state)

    def read_checkpoint_state(self, folder: Path) -> dict[str, Any]:
        state = ckpt.read_state(folder)
        if "layout" in state:
            raise ValueError(
                f"resume: {folder} was written by a torchrun job with layout {state['layout']}; resume it under "
                f"torchrun with that layout, or start a new run from its weights (stage1_from / "
                f"MoIIEForCausalLM.from_pretrained({folder}))"
            )
        return state

    def load_optimizer(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(state["optimizer"])

    def close(self) -> None:
        """Leave the process group (no-op in one process)."""


class SingleProcess(Runtime):
    """Everything in this process."""


class Distributed(Runtime):
    """Every process of a ``torchrun`` job, arranged as the (data x expert) mesh of ``parallel``."""

    distributed = True

    def __init__(self, parallel):
        import torch.distributed as dist

        from moiie.parallel import build_mesh, init_distributed

        self.parallel = parallel
        init_distributed(parallel.timeout_s)
        self.mesh = build_mesh(parallel)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._eval_model: nn.Module | None = None
        # the trainer only reads the model's outputs (no in-place op on the logits view FSDP2 warns about)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    @property
    def device(self) -> torch.device:
        if self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def check_batch(self, name: str, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(
                f"{name}.batch_size: {batch_size} samples per global micro-batch cannot be split evenly "
                f"over {self.world} ranks; use a multiple of {self.world}"
            )

    def local(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.world
        return indices[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.to(self.device).clone()
        dist.all_reduce(t)
        return t

    def lm_scale(self, labels: torch.Tensor) -> torch.Tensor:
        local = self.target_tokens(labels).to(torch.float64)
        total = self._sum(local.reshape(1)).reshape(())
        if float(total) == 0:
            return torch.zeros((), dtype=torch.float64, device=labels.device)
        return (local.to(self.device) * self.world / total).to(labels.device)

    def prepare(self, model: nn.Module) -> nn.Module:
        from moiie.parallel import parallelize

        return parallelize(model.to(self.device), self.mesh, self.parallel)

    def inner(self, model: nn.Module) -> nn.Module:
        from moiie.parallel import unwrap

        return unwrap(model)

    def clip_grad_norm(self, model: nn.Module, params: list[torch.Tensor], max_norm: float) -> float:
        from moiie.parallel import clip_grad_norm_

        return clip_grad_norm_(model, max_norm).item()

    def mean(self, figures: dict[str, float]) -> dict[str, float]:
        keys = sorted(figures)
        values = self._sum(torch.tensor([figures[k] for k in keys], dtype=torch.float64)) / self.world
        return dict(zip(keys, values.tolist(), strict=True))

    def total(self, value: int) -> int:
        return int(self._sum(torch.tensor([value], dtype=torch.float64)).item())

    def any(self, flag: bool) -> bool:
        return bool(self._sum(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)

    def single_model(self, model: nn.Module, *, every_rank: bool = False) -> nn.Module | None:
        from moiie.model import MoIIEForCausalLM, reload_config
        from moiie.parallel import full_state_dict

        state = {k: v.cpu() for k, v in full_state_dict(model).items()}
        if not (every_rank or self.is_main):
            return None
        config = reload_config(self.inner(model).moiie_config)
        if every_rank:  # a model of its own: the caller trains it (and splits it over the ranks again)
            fresh = MoIIEForCausalLM.from_config(config)
            fresh.load_state_dict(state)
            return fresh
        if self._eval_model is None or self._eval_model.moiie_config != config:
            self._eval_model = MoIIEForCausalLM.from_config(config)  # kept for the next evaluation
        self._eval_model.load_state_dict(state)
        return self._eval_model.to(self.device)

    def write_checkpoint(self, root: Path, stage: int, step: int, model: nn.Module, state: dict) -> None:
        import torch.distributed as dist

        from moiie.parallel import full_state_dict

        full = full_state_dict(model)
        tmp = [None]
        if self.is_main:
            tmp = [str(ckpt.begin_checkpoint(root))]
        dist.broadcast_object_list(tmp, src=0)
        tmp = Path(tmp[0])
        rank_state = {
            "optimizer": _local_tensors(state["optimizer"]),
            "rng": state["rng"],
            "layout": self._layout(),
        }
        ckpt.write_torch(tmp / OPTIM_NAME.format(rank=self.rank, world=self.world), rank_state)
        if self.is_main:
            from moiie.model import save_model_files

            shared = {k: v for k, v in state.items() if k != "optimizer"}
            shared["layout"] = self._layout()
            ckpt.write_torch(tmp / ckpt.STATE_NAME, shared)
            save_model_files(tmp, self.inner(model).moiie_config, {k: v.cpu() for k, v in full.items()})
        dist.barrier()
        if self.is_main:
            ckpt.finish_checkpoint(root, tmp, stage, step)
        dist.barrier()

    def _layout(self) -> dict[str, Any]:
        """What the optimizer shards depend on (not timeouts)."""
        p = self.parallel
        return {"world": self.world, "expert": p.expert, "data_parallel": p.data_parallel}

    def read_checkpoint_state(self, folder: Path) -> dict[str, Any]:
        from moiie.safe_load import load_trainer_state

        state = ckpt.read_state(folder)
        path = folder / OPTIM_NAME.format(rank=self.rank, world=self.world)
        saved = state.get("layout")
        if saved != self._layout() or not path.is_file():
            raise ValueError(
                f"resume: {folder} was written by a run with layout {saved or 'one process'}, this run is "
                f"{self._layout()}; resume with the same torchrun world size and parallel section, or start "
                f"a new run from its weights (stage1_from / MoIIEForCausalLM.from_pretrained({folder}))"
            )
        own = load_trainer_state(path)
        return {**state, "optimizer": own["optimizer"], "rng": own["rng"]}

    def load_optimizer(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(_to_params(opt, state["optimizer"]))

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _local_tensors(value):
    """Optimizer state with every DTensor replaced by this rank's shard (loads without executing code)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().cpu()
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _local_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local_tensors(v) for v in value)
    return value


def _to_params(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Wrap each saved shard back as a DTensor like its parameter (FSDP2), on the parameter's device."""
    from torch.distributed.tensor import DTensor

    params = [p for group in opt.param_groups for p in group["params"]]
    out = {}
    for idx, per_param in state["state"].items():
        p = params[int(idx)]
        fixed = {}
        for name, t in per_param.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and isinstance(p, DTensor):
                t = DTensor.from_local(
                    t.to(p.device),
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
            elif isinstance(t, torch.Tensor) and t.dim() > 0:
                t = t.to(p.device)
            fixed[name] = t
        out[idx] = fixed
    return {**state, "state": out}
