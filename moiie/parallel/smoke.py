"""A parallel training smoke run: the tiny LVLM on the digits task under any (data x expert) layout.

Checks a node or a cluster end to end (process group, mesh, all-to-all, FSDP2 / DDP, checkpoint)
in a minute, before a real run::

    torchrun --nproc-per-node 4 -m moiie.parallel.smoke --expert 4 --steps 20 --out runs/smoke

Every rank trains on its own slice of each global batch; rank 0 prints the global figures.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from moiie.parallel.checkpoint import save_pretrained
from moiie.parallel.grad_norm import clip_grad_norm_
from moiie.parallel.mesh import ParallelConfig, build_mesh, init_distributed
from moiie.parallel.parallelize import parallelize, unwrap


def main(argv: list[str] | None = None) -> list[float]:
    """Run the smoke training; returns the global loss of every step (on every rank)."""
    from moiie.data.tokenizer import digits_tokenizer
    from moiie.model import MoIIEForCausalLM
    from moiie.presets import ARMS, tiny_lvlm
    from moiie.processor import LVLMProcessor
    from moiie.train.config import DigitsDataConfig, TokenizerConfig
    from moiie.train.data import BatchOrder, collate, encode_examples, load_task

    parser = argparse.ArgumentParser(prog="python -m moiie.parallel.smoke", description=__doc__)
    parser.add_argument("--expert", type=int, default=1, help="expert-parallel size (divides 4)")
    parser.add_argument("--data-parallel", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--arm", default="moiie", choices=sorted(ARMS), help="ablation arm of the MoE layers")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--samples", type=int, help="use only the first N training samples (default: all)")
    parser.add_argument("--out", help="write the final model here (single-process layout)")
    args = parser.parse_args(argv)

    init_distributed()
    config = ParallelConfig(expert=args.expert, data_parallel=args.data_parallel)
    mesh = build_mesh(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if mesh.device_type == "cuda"
        else torch.device("cpu")
    )

    torch.manual_seed(0)
    model = MoIIEForCausalLM.from_config(tiny_lvlm(args.arm, vocab_size=len(digits_tokenizer())))
    model = parallelize(model.to(device), mesh, config)
    train, _, tokenizer = load_task(DigitsDataConfig(), TokenizerConfig())
    inner = unwrap(model)
    processor = LVLMProcessor(tokenizer, inner.vision.preprocess, inner.n_image_tokens)
    samples = encode_examples(train[: args.samples], tokenizer, processor)
    order = BatchOrder(len(samples), args.batch * world, seed=0)  # the same global batches on every rank
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    losses = []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        indices = order.next()[rank * args.batch : (rank + 1) * args.batch]
        batch = {k: v.to(device) for k, v in collate(processor, samples, indices).items()}
        out = model(**batch)
        out.loss.backward()
        norm = clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        figures = torch.stack([out.loss.detach(), out.aux_loss.detach()]).float()
        dist.all_reduce(figures)
        loss, aux = (figures / world).tolist()
        losses.append(loss)
        if rank == 0:
            print(
                f"step {step}: loss {loss:.4f} (balance + z {aux:.4f}) grad norm {norm.item():.3f} "
                f"{time.perf_counter() - start:.3f}s",
                flush=True,
            )
    if args.out:
        save_pretrained(model, args.out)
        if rank == 0:
            print(f"model written to {args.out} (loads with MoIIEForCausalLM.from_pretrained)", flush=True)
    return losses


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
