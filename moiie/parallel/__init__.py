"""Scale out on torch.distributed: expert parallelism, FSDP2 / DDP data parallelism, global balancing
statistics and world-size-independent checkpoints. Launch with ``torchrun``; see docs/scale_out.md.
"""

from moiie.parallel.checkpoint import full_state_dict, load_full_state_dict, load_pretrained, save_pretrained
from moiie.parallel.collectives import all_reduce_sum, all_to_all_rows, check_same_across_ranks
from moiie.parallel.expert_parallel import ExpertParallelMoE, expert_slice, slice_experts
from moiie.parallel.grad_norm import clip_grad_norm_
from moiie.parallel.mesh import ParallelConfig, build_mesh, init_distributed
from moiie.parallel.parallelize import expert_parallel_layers, parallelize, unwrap
from moiie.parallel.stats import reduce_group_stats

__all__ = [
    "ExpertParallelMoE",
    "ParallelConfig",
    "all_reduce_sum",
    "all_to_all_rows",
    "build_mesh",
    "check_same_across_ranks",
    "clip_grad_norm_",
    "expert_parallel_layers",
    "expert_slice",
    "full_state_dict",
    "init_distributed",
    "load_full_state_dict",
    "load_pretrained",
    "parallelize",
    "reduce_group_stats",
    "save_pretrained",
    "slice_experts",
    "unwrap",
]
