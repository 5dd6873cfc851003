"""Two-stage training (SPEC section 7): projector alignment on the dense model, upcycling, then stage 2.

Writes ``metrics.jsonl`` (one line per logged step), checkpoints ``ckpt-<stage>-<step>/`` (atomic),
and ``results.json`` (held-out accuracy, losses, parameter ledger, throughput, routing diagnostics).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from moiie.diagnostics import RoutingStats
from moiie.ledger import ledger_of
from moiie.model import MoIIEForCausalLM
from moiie.processor import LVLMProcessor
from moiie.train import checkpoint as ckpt
from moiie.train.config import StageConfig, TrainConfig
from moiie.train.data import BatchOrder, collate, encode_examples, load_task
from moiie.train.evaluate import evaluate_generation, routing_diagnostics
from moiie.train.faults import locate_nonfinite
from moiie.train.runtime import Runtime, SingleProcess, make_runtime

UPCYCLE_STREAM = 3
"""Offset of the random stream new routers are drawn from (stages use 1 and 2 for their batch order)."""


class NonFiniteError(RuntimeError):
    """A NaN or Inf appeared in the loss or a gradient."""


def set_trainable(model: MoIIEForCausalLM, mode: str) -> int:
    """Freeze everything, then unfreeze per ``mode``; returns the number of trainable parameters."""
    from moiie.backbones.llm import FFNAdapter

    for p in model.parameters():
        p.requires_grad_(False)
    parts = [model.projector]
    if mode in ("all_but_vision", "all"):
        parts.append(model.llm)
    if mode == "all":
        parts.append(model.vision)
    elif mode == "experts_only":
        parts += [m for m in model.llm.modules() if isinstance(m, FFNAdapter)]
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def warmup_cosine(steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, round(steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class NullLog:
    """The metrics log of ranks other than 0: writes nothing."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog:
    """Append-only JSONL; on resume, lines past the resumed position are dropped.

    The trimmed file replaces the old one atomically, and a last line cut short by a crash is
    dropped, so a crash at any moment loses at most the lines after the last checkpoint.
    """

    def __init__(self, path: Path, resume_at: tuple[int, int] | None):
        self.path = path
        keep = []
        if resume_at is not None and path.exists():
            for line in path.read_text().split("\n")[:-1]:  # the part after the last newline is unfinished
                row = json.loads(line)
                if (row["stage"], row["step"]) <= resume_at:
                    keep.append(line)
        _write_text(path, "".join(k + "\n" for k in keep))
        self.file = open(path, "a")  # noqa: SIM115  (held open for the whole run, closed by close())

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))


def _nonfinite_grads(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


def routing_figures(model, routings) -> dict[str, float]:
    """Compact routing diagnostics of one batch for the metrics log: per MoE layer and modality, the share
    of traffic to shared experts, the busiest expert's share and the routing entropy; per layer the
    mutual information between expert choice and modality."""
    topology = getattr(model.moiie_config.ffn, "topology", None)
    if topology is None or not routings or all(r is None for r in routings):
        return {}
    stats = RoutingStats(topology, len(routings))
    stats.update(routings)
    out: dict[str, float] = {}
    for layer in stats.summary():
        i = model.moe_layer_indices[layer["layer"]]
        out[f"route/{i}/mi_bits"] = round(layer["mutual_information_bits"], 4)
        for mod in ("text", "vision"):
            d = layer[mod]
            if not d["tokens"]:
                continue
            out[f"route/{i}/{mod}/shared"] = round(d["shared_share"], 4)
            out[f"route/{i}/{mod}/max_load"] = round(max(d["load"]), 4)
            if d["entropy"] is not None:
                out[f"route/{i}/{mod}/entropy"] = round(d["entropy"], 4)
            if d["dropped"]:
                out[f"route/{i}/{mod}/dropped"] = d["dropped"]
    return out


def train_stage(
    model,
    cfg: TrainConfig,
    stage_cfg: StageConfig,
    *,
    stage: int,
    samples: list[dict],
    processor: LVLMProcessor,
    out_dir: Path,
    metrics: MetricsLog | NullLog,
    resume_state: dict | None,
    progress: bool,
    on_eval=None,
    rt: Runtime | None = None,
):
    """Train one stage; returns (the last logged figures, the trained module).

    ``model`` is a single-process model; under ``torchrun`` the runtime splits it over the ranks and
    the trained module returned is the parallel one (``rt.single_model`` gathers it back).
    """
    from tqdm.auto import tqdm

    rt = rt or SingleProcess()
    rt.check_batch(f"stage{stage}", stage_cfg.batch_size)
    n_trainable = set_trainable(model, stage_cfg.trainable)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    single = model
    model = rt.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    o = stage_cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(stage_cfg.steps, o.warmup_ratio, o.min_lr_ratio)
    )
    order = BatchOrder(len(samples), stage_cfg.batch_size, seed=cfg.seed * 1009 + stage)
    start = 0
    if resume_state is not None:
        rt.load_optimizer(opt, resume_state)
        sched.load_state_dict(resume_state["scheduler"])
        order.load_state_dict(resume_state["order"])
        _set_rng_state(resume_state["rng"])
        start = resume_state["step"]
    model.train()
    device = rt.device

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    bar = tqdm(
        total=stage_cfg.steps,
        initial=start,
        desc=f"stage {stage}",
        disable=not (progress and rt.is_main),
        leave=False,
        dynamic_ncols=True,
    )
    last: dict[str, float] = {}
    tokens, t_window = 0, time.perf_counter()
    for step in range(start, stage_cfg.steps):
        figures: dict[str, float] = {}
        bad = None
        step_batches = []
        for _ in range(stage_cfg.grad_accum):
            batch = collate(processor, samples, rt.local(order.next()))
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            step_batches.append(batch)
            with autocast():
                out = model(**batch)
            lm_loss, loss = out.lm_loss, out.loss
            if rt.distributed:  # this rank's share of the global micro-batch's mean
                lm_loss = lm_loss * rt.lm_scale(batch["labels"]).to(lm_loss.dtype)
                loss = lm_loss + out.aux_loss
            if rt.any(not bool(torch.isfinite(loss))):
                bad = f"loss is {loss.item()} (lm {lm_loss.item():.4g}, aux {out.aux_loss.item():.4g})" + (
                    f" on rank {rt.rank}" if rt.distributed else ""
                )
                break
            (loss / stage_cfg.grad_accum).backward()
            for k, v in {"loss": loss, "lm_loss": lm_loss, **out.aux_losses}.items():
                figures[k] = figures.get(k, 0.0) + v.item() / stage_cfg.grad_accum
        in_backward = False
        if bad is None and rt.any(bool(names := _nonfinite_grads(model))):
            bad, in_backward = f"gradients of {len(names)} parameter tensors are not finite", True
        if bad is not None:
            opt.zero_grad(set_to_none=True)
            out = loss = lm_loss = None  # frees the failed step's graph before the replay
            if rt.distributed:
                where = "rerun the batch in one process to locate the first non-finite tensor"
            else:
                where = locate_nonfinite(
                    model,
                    step_batches,
                    backward=in_backward,
                    autocast=autocast,
                    grad_accum=stage_cfg.grad_accum,
                )
            msg = f"stage {stage} step {step}: {bad}; {where}"
            metrics.write({"stage": stage, "step": step + 1, "nonfinite": msg})
            if cfg.nonfinite == "stop":
                bar.close()
                raise NonFiniteError(
                    msg + " (the last good checkpoint is kept; set nonfinite: skip to skip such steps)"
                )
            sched.step()  # the skipped step's batch is consumed and its schedule slot passes
            bar.update(1)
            continue
        grad_norm = None
        if o.grad_clip is not None:
            grad_norm = rt.clip_grad_norm(model, params, o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == stage_cfg.steps:
            figures = rt.mean(figures)
            elapsed = time.perf_counter() - t_window
            figures.update(
                lr=sched.get_last_lr()[0],
                tokens_per_s=rt.total(tokens) / max(elapsed, 1e-9),
                trainable=n_trainable,
            )
            if grad_norm is not None:
                figures["grad_norm"] = grad_norm
            metrics.write({"stage": stage, "step": done, **figures, **routing_figures(single, out.routings)})
            tokens, t_window = 0, time.perf_counter()
            last = figures
            bar.set_postfix(
                {
                    k: f"{figures[k]:.3g}"
                    for k in ("loss", "balance/vision", "balance/text", "tokens_per_s")
                    if k in figures
                }
            )
        if on_eval is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < stage_cfg.steps:
            figures = on_eval(model)
            if figures is not None:
                metrics.write({"stage": stage, "step": done, **figures})
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == stage_cfg.steps:
            state = {
                "stage": stage,
                "step": done,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "order": order.state_dict(),
                "rng": _rng_state(),
            }
            rt.write_checkpoint(out_dir / "checkpoints", stage, done, model, state)
    bar.close()
    if cfg.gradient_checkpointing:
        single.llm.gradient_checkpointing_disable()
    return last, model


def _start(cfg: TrainConfig, out_dir: str | os.PathLike, rt: Runtime):
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    return (out_dir, *load_task(cfg.data, cfg.tokenizer))


def _check_vocab(model: MoIIEForCausalLM, tokenizer) -> None:
    if len(tokenizer) > model.vocab_size:
        raise ValueError(
            f"model.llm: vocab_size {model.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2))


def _dense(cfg: TrainConfig) -> MoIIEForCausalLM:
    """The stage-1 model: the configured LVLM with dense FFNs everywhere."""
    return MoIIEForCausalLM.from_config(cfg.model.model_copy(update={"moe_layers": "none"}))


def _metrics(rt: Runtime, out_dir: Path, resume_at: tuple[int, int] | None) -> MetricsLog | NullLog:
    return MetricsLog(out_dir / "metrics.jsonl", resume_at) if rt.is_main else NullLog()


def run_stage1(cfg: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = False) -> dict[str, Any]:
    """Stage 1 only: train the projector of the dense model; writes model/ and stage1.json (last)."""
    rt = make_runtime(cfg.parallel)
    try:
        out_dir, train_x, _, tokenizer = _start(cfg, out_dir, rt)
        model = _dense(cfg)
        _check_vocab(model, tokenizer)
        processor = LVLMProcessor(tokenizer, model.vision.preprocess, model.n_image_tokens)
        samples = encode_examples(train_x, tokenizer, processor)
        metrics = _metrics(rt, out_dir, None)
        common = dict(
            samples=samples, processor=processor, out_dir=out_dir, metrics=metrics, progress=progress, rt=rt
        )
        try:
            last, trained = train_stage(model, cfg, cfg.stage1, stage=1, **common, resume_state=None)
        finally:
            metrics.close()
        model = rt.single_model(trained)
        result = {"final": last}
        if rt.is_main:
            model.save_pretrained(out_dir / "model")
            _write_json(out_dir / "stage1.json", result)
        return result
    finally:
        rt.close()


def run_training(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    stage1_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run both stages (or stage 2 from a finished stage-1 model folder); returns and writes results.json.

    Under ``torchrun`` every rank must call it; rank 0 evaluates, writes the files and returns the
    results, other ranks return an empty dict (see :mod:`moiie.train.runtime`)."""
    rt = make_runtime(cfg.parallel)
    try:
        return _run_training(cfg, out_dir, rt, resume=resume, progress=progress, stage1_from=stage1_from)
    finally:
        rt.close()


def _run_training(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    rt: Runtime,
    *,
    resume: bool,
    progress: bool,
    stage1_from: str | os.PathLike | None,
) -> dict[str, Any]:
    out_dir, train_x, held_x, tokenizer = _start(cfg, out_dir, rt)

    latest = ckpt.latest_checkpoint(out_dir / "checkpoints") if resume else None
    resume_state = None
    if latest is not None:
        model = MoIIEForCausalLM.from_pretrained(latest)
        resume_state = rt.read_checkpoint_state(latest)
    elif stage1_from is not None:
        model = MoIIEForCausalLM.from_pretrained(stage1_from)
    else:
        model = _dense(cfg)
    _check_vocab(model, tokenizer)
    processor = LVLMProcessor(tokenizer, model.vision.preprocess, model.n_image_tokens)
    samples = encode_examples(train_x, tokenizer, processor)
    metrics = _metrics(rt, out_dir, (resume_state["stage"], resume_state["step"]) if resume_state else None)
    common = dict(
        samples=samples, processor=processor, out_dir=out_dir, metrics=metrics, progress=progress, rt=rt
    )

    def generation(single: MoIIEForCausalLM) -> dict[str, Any]:
        return evaluate_generation(
            single,
            held_x,
            tokenizer,
            processor,
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
        )

    def on_eval(trained) -> dict[str, float] | None:
        """Held-out generation on rank 0's single-process copy (a collective under torchrun)."""
        single = rt.single_model(trained)
        if single is None:
            return None
        r = generation(single)
        return {"eval_accuracy": r["accuracy"], **{f"eval/{k}": v for k, v in r["per_qtype"].items()}}

    t0 = time.perf_counter()
    try:
        at_stage = resume_state["stage"] if resume_state else (2 if stage1_from is not None else 1)
        if at_stage == 1:
            _, trained = train_stage(model, cfg, cfg.stage1, stage=1, **common, resume_state=resume_state)
            resume_state = None
            model = rt.single_model(trained, every_rank=True)  # to upcycle, then split again
            del trained
        if not model.moe_layer_indices and cfg.model.moe_layers != "none":
            # new routers are drawn from a generator of their own, so they do not depend on how many
            # random numbers stage 1 consumed (resumed runs, parallel runs and one-process runs agree)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed * 1009 + UPCYCLE_STREAM)
                model.upcycle(cfg.model.ffn, cfg.model.moe_layers)
        if (
            resume_state is not None
            and resume_state["stage"] == 2
            and resume_state["step"] >= cfg.stage2.steps
        ):
            last, trained = {}, rt.prepare(model) if rt.distributed else model
        else:
            last, trained = train_stage(
                model,
                cfg,
                cfg.stage2,
                stage=2,
                **common,
                resume_state=resume_state if resume_state and resume_state["stage"] == 2 else None,
                on_eval=on_eval if held_x else None,
            )
        train_seconds = time.perf_counter() - t0
        model = rt.single_model(trained)
        del trained
        if not rt.is_main:
            return {}
        evaluation = generation(model) if held_x else None
        topology = getattr(cfg.model.ffn, "topology", None)
        stats = routing_diagnostics(
            model, encode_examples(held_x[:512], tokenizer, processor), processor, topology
        )
        ledger = ledger_of(model)
        results = {
            "evaluation": evaluation,
            "final": last,
            "params": {
                "total": ledger.total,
                "activated_text": ledger.activated["text"],
                "activated_vision": ledger.activated["vision"],
            },
            "train_seconds": train_seconds,
            "world_size": rt.world,
            "routing": stats.summary() if stats else None,
            "collapsed": bool(stats.collapsed(getattr(cfg.model.ffn.router, "top_k", 1))) if stats else False,
        }
        if stats is not None:
            (out_dir / "routing.txt").write_text(stats.table() + "\n")
    finally:
        metrics.close()
    model.save_pretrained(out_dir / "model")
    _write_json(out_dir / "results.json", results)
    return results
