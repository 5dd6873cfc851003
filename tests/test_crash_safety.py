"""Training killed with SIGKILL at random points, then resumed: nothing is lost, nothing is wrong.

The reference run and the final resume are real ``python -m moiie train`` processes. The dozens of
runs in between are forked from a server process that imported moiie once, so that each kill costs
a fraction of a second instead of an interpreter start; each one runs ``moiie.cli.main`` (what
``python -m moiie`` runs) with ``--resume`` and dies by a real SIGKILL. Some kills are at a random
time; others fire a few milliseconds after a checkpoint's temp folder appears, so that some land
in the middle of writing a checkpoint. After every kill: every complete checkpoint loads
(safetensors weights + weights-only trainer state) and matches its name, no temp folder is taken
for a checkpoint, and the logged losses up to the latest checkpoint equal the reference run's.
Each run is taken to completion, and its per-step losses must equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from moiie.model import MoIIEForCausalLM
from moiie.train import checkpoint as ckpt

MAX_KILLS = 40
BUDGET_S = 60.0  # for the kill loop; the two real CLI runs and the server start come on top

SERVER = r"""
import json, os, signal, sys, time, traceback
import torch
torch.set_num_threads(1)
from moiie.cli import main
from moiie.model import MoIIEForCausalLM
from moiie.train.config import TrainConfig
from moiie.train.data import load_task

cfg = TrainConfig.load(sys.argv[1])
load_task(cfg.data, cfg.tokenizer)  # the caches every run would fill again
MoIIEForCausalLM.from_config(cfg.model)  # the modeling imports
print("ready", flush=True)


def child(argv, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        code = main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def temp_folders(root):
    try:
        return {n for n in os.listdir(root) if n.startswith(".tmp-ckpt-") and not n.startswith(".tmp-ckpt-old-")}
    except FileNotFoundError:
        return set()


for line in sys.stdin:
    job = json.loads(line)
    watch = job["watch"]
    stale = temp_folders(watch["root"]) if watch else set()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(job["argv"], job["log"])
    deadline = None if job["kill_after"] is None else t0 + job["kill_after"]
    seen = set()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if watch and deadline is None:
            seen |= temp_folders(watch["root"]) - stale
            if len(seen) >= watch["nth"]:
                deadline = now + watch["offset"]
        if deadline is not None and now >= deadline:
            os.kill(pid, signal.SIGKILL)  # our own child: a zombie at worst, never another process
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
    print(json.dumps({"status": status, "seconds": time.monotonic() - t0}), flush=True)
"""


def crash_config():
    return tiny_train_config(
        s1=4, s2=8, batch_size=8, eval_limit=4, checkpoint_every=1, eval_batch_size=4, max_new_tokens=2
    )


def losses(run: Path) -> list[tuple[int, int, float]]:
    text = (run / "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in text.split("\n")[:-1]]  # the part after the last newline is unfinished
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "loss" in r]


class ForkServer:
    def __init__(self, config: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], log: Path, *, kill_after=None, watch=None) -> dict:
        job = {"argv": argv, "log": str(log), "kill_after": kill_after, "watch": watch}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def folder_names(run: Path) -> set[str]:
    root = run / "checkpoints"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def check_after_kill(run: Path, before: set[str], expected: list, stats: Counter) -> None:
    """Every complete checkpoint loads and matches its name; leftovers are only temp folders; the
    losses logged up to the latest checkpoint are the reference run's. ``before``: the folder
    names before the killed process started (leftovers of earlier kills are not counted again)."""
    root = run / "checkpoints"
    names = folder_names(run)
    new_temp = [n for n in names - before if n.startswith(".tmp-ckpt-")]
    complete = ckpt.list_checkpoints(root)
    assert [p.name for p in complete] == sorted(n for n in names if not n.startswith(".")), names
    if any(not n.startswith(".tmp-ckpt-old-") for n in new_temp):
        stats["mid-write"] += 1
    if any(n.startswith(".tmp-ckpt-old-") for n in new_temp):
        stats["mid-delete"] += 1
    for folder in complete:
        MoIIEForCausalLM.from_pretrained(folder)
        state = ckpt.read_state(folder)
        assert (state["stage"], state["step"]) == ckpt.stage_step(folder)
        stats["checkpoints verified"] += 1
    if not complete:
        stats["killed before the first checkpoint"] += 1
        return
    at = ckpt.stage_step(complete[-1])
    stats[f"killed in stage {at[0]}" if at != (2, 8) else "killed after training"] += 1
    logged = [x for x in losses(run) if x[:2] <= at]
    assert logged == [x for x in expected if x[:2] <= at]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill server forks")
def test_sigkill_at_random_points_loses_nothing(tmp_path):
    torch.set_num_threads(1)
    rng = random.Random(20240607)
    config = tmp_path / "run.yaml"
    crash_config().save(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = [sys.executable, "-m", "moiie", "train", str(config), "--no-progress"]

    reference = tmp_path / "reference"
    subprocess.run([*cli, "--out", str(reference)], check=True, env=env, capture_output=True, timeout=300)
    expected = losses(reference)
    assert [x[:2] for x in expected] == [(1, s) for s in range(1, 5)] + [(2, s) for s in range(1, 9)]

    server = ForkServer(config, env)
    try:
        whole = tmp_path / "whole"
        result = server.run(
            ["train", str(config), "--out", str(whole), "--no-progress"], tmp_path / "whole.log"
        )
        assert result["status"] == 0 and losses(whole) == expected  # a forked run is the CLI run
        full_s = result["seconds"]

        stats: Counter[str] = Counter()
        chain = tmp_path / "run-0"
        start = time.monotonic()
        while stats["kills"] < MAX_KILLS and time.monotonic() - start < BUDGET_S:
            argv = ["train", str(config), "--out", str(chain), "--no-progress", "--resume"]
            before = folder_names(chain)
            if rng.random() < 0.4:  # kill a few ms after a checkpoint's temp folder appears
                watch = {
                    "root": str(chain / "checkpoints"),
                    "nth": rng.randint(1, 3),
                    "offset": rng.uniform(0, 0.02),
                }
                result = server.run(argv, chain.with_suffix(".log"), watch=watch)
            else:
                result = server.run(argv, chain.with_suffix(".log"), kill_after=rng.uniform(0.0, full_s))
            status = result["status"]
            if os.WIFSIGNALED(status):
                stats["kills"] += 1
                check_after_kill(chain, before, expected, stats)
                continue
            log = chain.with_suffix(".log").read_text() if chain.with_suffix(".log").exists() else ""
            assert os.WEXITSTATUS(status) == 0, log[-3000:]
            assert losses(chain) == expected  # per-step losses of a run killed many times
            assert json.loads((chain / "results.json").read_text())["evaluation"]["n"] == 4
            stats["runs completed after kills"] += 1
            chain = tmp_path / f"run-{stats['runs completed after kills']}"
        stats["kill loop seconds"] = round(time.monotonic() - start)
    finally:
        server.close()

    # the last run is finished by a fresh `python -m moiie train --resume` process
    subprocess.run(
        [*cli, "--out", str(chain), "--resume"], check=True, env=env, capture_output=True, timeout=300
    )
    assert losses(chain) == expected
    stats["runs completed after kills"] += 1

    report = ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()))
    print(f"\ncrash safety: {report}")
    (tmp_path / "crash_report.json").write_text(json.dumps(stats, indent=2))
    assert stats["kills"] >= 20, report
    assert stats["mid-write"] >= 3, report


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that have not exited (zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def checkpoints(out: Path) -> set[Path]:
    return set(out.glob("*/checkpoints/ckpt-*")) | set(out.glob("runs/*/checkpoints/ckpt-*"))


def finished_runs(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """run folder -> (results.json mtime, metrics.jsonl mtime, results.json bytes), finished runs only."""
    found = {}
    for results in sorted(out.glob("runs/*/results.json")):
        data = results.read_bytes()
        json.loads(data)  # never half-written
        metrics = results.with_name("metrics.jsonl")
        found[results.parent.name] = (results.stat().st_mtime_ns, metrics.stat().st_mtime_ns, data)
    return found


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; workers die with the runner on Linux"
)
def test_killed_ablation_rerun_finishes_without_redoing_or_losing_runs(tmp_path):
    from moiie.ablate import GridConfig
    from moiie.presets import arm

    base = crash_config()
    base = base.model_copy(
        update={
            "stage1": base.stage1.model_copy(update={"steps": 2}),
            "stage2": base.stage2.model_copy(update={"steps": 3}),
        }
    )
    grid = GridConfig(base=base, arms={"dense": arm("dense"), "moiie": arm("moiie")}, seeds=[0, 1], workers=2)
    config, out = tmp_path / "grid.yaml", tmp_path / "ablation"
    grid.save(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "moiie", "ablate", str(config), "--out", str(out)]
    rng = random.Random(7)
    finished: dict[str, tuple] = {}
    kills = 0
    # first kill: the moment a run has finished (others are under way); then at a random moment
    # after the workers have written a new checkpoint
    for plan in ("first result", rng.uniform(0.0, 2.0), rng.uniform(0.0, 2.0)):
        with open(tmp_path / "ablate.log", "a") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        start, seen, kill_at = time.monotonic(), checkpoints(out), None
        while proc.poll() is None and time.monotonic() - start < 120:
            if plan == "first result" and len(finished_runs(out)) > len(finished):
                break
            if plan != "first result" and kill_at is None and checkpoints(out) - seen:
                kill_at = time.monotonic() + plan
            if kill_at is not None and time.monotonic() >= kill_at:
                break
            time.sleep(0.02)
        if proc.poll() is not None:  # the grid finished before this kill
            break
        os.kill(proc.pid, signal.SIGKILL)  # the runner only: its workers must not outlive it
        proc.wait()
        kills += 1
        deadline = (
            time.monotonic() + 1.0
        )  # the kernel kills them at once; a live orphan goes on for its job's length
        while live_group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = live_group_members(proc.pid)
        if orphans:
            os.killpg(proc.pid, signal.SIGKILL)
        assert not orphans, f"workers {orphans} outlived the killed runner"
        now = finished_runs(out)
        assert {k: now[k] for k in finished} == finished  # nothing finished was redone or lost
        finished = now
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    final = finished_runs(out)
    assert {k: final[k] for k in finished} == finished
    assert sorted(final) == ["dense-seed0", "dense-seed1", "moiie-seed0", "moiie-seed1"]
    assert not list(out.glob("runs/*/error.txt")) and (out / "summary.md").exists()
    print(f"\nablation: {kills} kills, {len(finished)} of 4 runs finished before the last rerun, none redone")
    assert kills >= 1 and finished


def test_metrics_log_drops_a_line_cut_short_by_a_crash(tmp_path):
    from moiie.train.loop import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"stage": 1, "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": 1, "st')
    log = MetricsLog(path, (1, 2))
    log.write({"stage": 1, "step": 3, "loss": 0.5})
    log.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        *rows[:2],
        {"stage": 1, "step": 3, "loss": 0.5},
    ]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_crash_while_deleting_an_old_checkpoint_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model = MoIIEForCausalLM.from_config(crash_config().model.model_copy(update={"moe_layers": "none"}))
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.write_checkpoint(root, 1, step, model, {"stage": 1, "step": step})

    def crash(path, *args, **kwargs):
        if (Path(path) / "model.safetensors").exists():
            (Path(path) / "model.safetensors").unlink()  # half deleted
            raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(root, 1, 3, model, {"stage": 1, "step": 3})  # keep=2 deletes step 1
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["ckpt-1-0000002", "ckpt-1-0000003"]
    for folder in ckpt.list_checkpoints(root):
        MoIIEForCausalLM.from_pretrained(folder)
    ckpt.write_checkpoint(root, 1, 4, model, {"stage": 1, "step": 4})  # the next write clears the leftover
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-1-0000003", "ckpt-1-0000004"]
