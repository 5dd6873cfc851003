"""Ablation studies: arms x seeds, each arm a diff of the FFN-slot config (SPEC section 8).

Per seed, stage 1 (projector alignment on the dense model) runs once and every arm upcycles from
that same stage-1 model, so all arms start from the same function. Runs execute in worker
processes (single-threaded each by default); a finished run's ``results.json`` is written
atomically and rerunning skips it; an unfinished run resumes from its last checkpoint; a failing
run is reported and the rest go on. Workers die with the runner (Linux), even when it is killed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from moiie.config_base import Config
from moiie.layer import FFNConfig
from moiie.presets import DEFAULT_ARMS, arm
from moiie.report import write_report
from moiie.train.config import TrainConfig

_ARM_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")


def _default_arms() -> dict[str, Any]:
    return {name: arm(name) for name in DEFAULT_ARMS}


class GridConfig(Config):
    """An ablation grid: a base training config, named arms (FFN-slot configs) and seeds."""

    kind: Literal["grid"] = "grid"
    base: TrainConfig
    """The training run every arm shares (its model.ffn is replaced by each arm's)."""
    arms: dict[str, FFNConfig] = Field(default_factory=_default_arms)
    """Arm name -> FFN-slot config (dense, or moe with a router/topology)."""
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1
    )
    """Seeds; each (arm, seed) is one run."""
    workers: int = Field(2, ge=1, le=64)
    """Worker processes running in parallel."""
    threads_per_worker: int = Field(1, ge=1, le=4096)
    """torch threads per worker (on 2 cores, two single-threaded workers beat one two-threaded run)."""
    reference_arms: list[str] = Field(default_factory=lambda: ["dense", "vanilla_moe"])
    """Arms every other arm is compared against in the significance notes."""

    @model_validator(mode="after")
    def _check(self) -> GridConfig:
        if not self.arms:
            raise ValueError("arms: at least one arm is needed")
        bad = [name for name in self.arms if not _ARM_NAME.fullmatch(name)]
        if bad:
            raise ValueError(
                f"arms: names {bad} cannot name run folders; use letters, digits, '_', '-', '+' and '.'"
            )
        return self

    def run_config(self, arm_name: str, seed: int) -> TrainConfig:
        model = self.base.model.model_copy(update={"ffn": self.arms[arm_name]})
        return self.base.model_copy(update={"model": model, "seed": seed, "threads": self.threads_per_worker})


def _job(args: tuple[str, str, str | None, str, str | None]) -> tuple[str, str | None, float]:
    """Run one job in a worker: ('stage1' | 'arm', config JSON, stage-1 folder, out dir, label)."""
    kind, cfg_json, stage1, out, label = args
    t0 = time.perf_counter()
    out_dir = Path(out)
    try:
        from moiie.train.loop import run_stage1, run_training

        cfg = TrainConfig.from_json(cfg_json)
        if kind == "stage1":
            run_stage1(cfg, out_dir)
        else:
            run_training(cfg, out_dir, stage1_from=stage1, resume=True, progress=False)
        (out_dir / "error.txt").unlink(missing_ok=True)
        return label, None, time.perf_counter() - t0
    except Exception:
        out_dir.mkdir(parents=True, exist_ok=True)
        err = traceback.format_exc()
        (out_dir / "error.txt").write_text(err)
        return label, err.strip().splitlines()[-1], time.perf_counter() - t0


def run_grid(grid: GridConfig, out_dir: str | os.PathLike, *, log=print) -> dict[str, Any]:
    """Run every unfinished (arm, seed); then write summary.md/.csv, plots, and return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(grid.to_yaml())
    stage1_jobs, arm_jobs = [], []
    for seed in grid.seeds:
        s1 = out / f"stage1-seed{seed}"
        cfg = grid.run_config(next(iter(grid.arms)), seed)
        if not (s1 / "stage1.json").exists():
            stage1_jobs.append(("stage1", cfg.to_json(), None, str(s1), f"stage 1, seed {seed}"))
        for name in grid.arms:
            run_dir = out / "runs" / f"{name}-seed{seed}"
            if not (run_dir / "results.json").exists():
                arm_jobs.append(
                    (
                        "arm",
                        grid.run_config(name, seed).to_json(),
                        str(s1 / "model"),
                        str(run_dir),
                        f"{name}, seed {seed}",
                    )
                )
    total = len(grid.arms) * len(grid.seeds)
    log(
        f"ablation: {len(grid.arms)} arms x {len(grid.seeds)} seeds = {total} runs; "
        f"{total - len(arm_jobs)} already finished; {grid.workers} workers x {grid.threads_per_worker} thread(s)"
    )
    failures = {}
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(
        grid.workers, initializer=_init_worker, initargs=(grid.threads_per_worker, os.getpid())
    ) as pool:
        for phase in (stage1_jobs, arm_jobs):
            ready = []
            for job in phase:
                if job[0] == "arm" and not (Path(job[2]).parent / "stage1.json").exists():
                    failures[job[4]] = "stage 1 of this seed failed; see its error.txt"
                else:
                    ready.append(job)
            for label, err, seconds in pool.imap_unordered(_job, ready):
                status = "FAILED: " + err if err else "done"
                log(f"  [{time.perf_counter() - t0:6.0f}s] {label}: {status} ({seconds:.0f}s)")
                if err:
                    failures[label] = err
    summary = write_report(grid, out, failures)
    log("")
    log(summary["markdown"])
    log(f"\nresults in {out.resolve()} (summary.md, summary.csv, loss_curves.png, heatmaps/)")
    return summary


def _init_worker(threads: int, runner: int) -> None:
    import torch

    _die_with(runner)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _die_with(runner: int) -> None:
    """On Linux, have the kernel kill this worker when the runner dies, even by SIGKILL: an orphaned
    worker would otherwise go on writing into a run folder that a rerun is also writing into."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != runner:  # the runner died before the request took effect
        os._exit(1)


def load_results(out: Path, grid: GridConfig) -> dict[str, list[dict]]:
    """arm -> list of per-seed results (finished runs only)."""
    found: dict[str, list[dict]] = {name: [] for name in grid.arms}
    for name in grid.arms:
        for seed in grid.seeds:
            path = out / "runs" / f"{name}-seed{seed}" / "results.json"
            if path.exists():
                found[name].append({"seed": seed, **json.loads(path.read_text())})
    return found
