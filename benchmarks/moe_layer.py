"""Speed and peak memory of moiie's MoE layer next to the limit, HF transformers and the official loop.

The limit is one expert's dense SwiGLU over k*T tokens with plain matmuls: the FFN arithmetic an MoE
layer does, without routing. Every method runs with the same weights; outputs (and input gradients)
are checked against each other before anything is timed. Methods run interleaved (A B C A B C ...)
and every ratio is a ratio of medians from the same run.

    .venv/bin/python benchmarks/moe_layer.py --quick      # < 1 min: T=1024, fp32 + bf16
    .venv/bin/python benchmarks/moe_layer.py              # T = 256, 1024, 4096, fp32 + bf16
    .venv/bin/python benchmarks/moe_layer.py --memory     # peak memory, one fresh process per method
    .venv/bin/python benchmarks/moe_layer.py --sweep      # E = 4, 8, 16, 64 at fixed compute, T=4096

The last lines printed are the ratios of moiie's arms and one JSON record (``--json`` also writes it
to a file; ``benchmarks/report.py`` turns records into markdown tables).

glibc returns large freed buffers to the OS and page-faults them back in on the next call, which
costs as much as some of the arithmetic. ``--malloc tuned`` (the default) re-runs the script with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<64 GiB>`` so freed memory stays in the process;
``--malloc default`` keeps glibc's defaults. The settings used are printed with the results.

On a shared machine, a round (one call of every method) during which other processes used more
than ``--max-background`` of the CPUs is redone (default 10%; ``--quick`` never redoes rounds), and
the other processes' share during the kept rounds is printed next to every table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch
from machine import LoadMeter, wait_until_idle
from peers import METHODS, REFERENCE, Method, Shape, Weights, build_method

from moiie.modality import TEXT, VISION

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
# Memory children map every block >= 64 KiB and unmap it on free, so that RSS tracks live memory
# instead of what the allocator keeps cached.
MEMORY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10), "MALLOC_TRIM_THRESHOLD_": "0"}
MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
TIMED = ("limit", "moiie", "moiie-vanilla", "moiie-compiled", "hf-eager", "hf-grouped_mm", "official-loop")
PEERS = ("limit", "hf-grouped_mm", "official-loop")
"""Methods every other one is compared with, when present."""


def malloc_settings() -> str:
    found = [f"{k}={os.environ[k]}" for k in MALLOC_VARS if k in os.environ]
    return " ".join(found) if found else "glibc defaults"


def ensure_malloc(choice: str) -> None:
    """Re-run this script with the requested allocator environment unless it is already in place."""
    wanted = TUNED_MALLOC if choice == "tuned" else {}
    current = {k: os.environ[k] for k in MALLOC_VARS if k in os.environ}
    if current == wanted:
        return
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS} | wanted
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def make_inputs(shape: Shape, T: int, dtype: torch.dtype, seed: int = 1):
    """x (T, d), modality (T,) with an image block of T/2 tokens between text, and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, shape.d_model, generator=g).to(dtype)
    grad = torch.randn(T, shape.d_model, generator=g).to(dtype)
    modality = torch.full((T,), TEXT, dtype=torch.long)
    modality[T // 8 : T // 8 + T // 2] = VISION
    return x, modality, grad


def run_once(m: Method, x, modality, grad, train: bool):
    """One forward (no grad) or one forward+backward; returns (y, dx or None)."""
    if m.tokens > 1:
        x, grad = x.repeat(m.tokens, 1), grad.repeat(m.tokens, 1)
    if not train:
        with torch.no_grad():
            return m.forward(x, modality), None
    x = x.detach().requires_grad_(True)
    y = m.forward(x, modality)
    y.backward(grad)
    m.zero_grad()
    return y.detach(), x.grad


def row_mismatch(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    """Fraction of rows whose relative error exceeds tol."""
    a, b = a.float(), b.float()
    err = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
    return (err > tol).float().mean().item()


def check_outputs(results: dict[str, tuple], dtype: torch.dtype) -> list[str]:
    """Each method's output and input gradient must match its reference's row by row.

    In bf16 a token whose second and third router scores are within rounding of each other can be
    routed differently by two correct implementations, so up to 2% of rows may differ there.
    """
    tol, allowed = (1e-4, 0.0) if dtype == torch.float32 else (3e-2, 0.02)
    lines = []
    for name, (y, dx) in results.items():
        ref = REFERENCE.get(name)
        if ref not in results:
            continue
        y_ref, dx_ref = results[ref]
        bad_y = row_mismatch(y, y_ref, tol)
        bad_dx = row_mismatch(dx, dx_ref, tol) if dx is not None and dx_ref is not None else 0.0
        ok = max(bad_y, bad_dx) <= allowed
        lines.append(
            f"  check {name} vs {ref}: rows off by > {tol:g}: output {bad_y:.2%}, input grad {bad_dx:.2%}"
            f" -> {'ok' if ok else 'MISMATCH'}"
        )
        if not ok:
            raise SystemExit("\n".join(lines))
    return lines


@dataclass
class Gate:
    """Rounds (one call of every method) during which other processes used more than ``threshold``
    of the CPUs are redone, up to ``max_redo`` times per configuration; before each round the
    benchmark waits up to ``patience`` seconds for the machine to go idle."""

    threshold: float = 1.0
    patience: float = 120.0
    max_redo: int = 20


def time_methods(methods: list[Method], inputs, train: bool, repeats: int, gate: Gate):
    """Interleaved rounds A B C A B C ...; returns per-method seconds and the rounds' background load."""
    x, modality, grad = inputs
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for m in methods:  # warm-up (and compilation) outside the timed rounds
        run_once(m, x, modality, grad, train)
    loads, redone = [], 0
    while len(loads) < repeats:
        if gate.threshold < 1:
            wait_until_idle(gate.threshold, gate.patience)
        round_times = {}
        with LoadMeter() as meter:
            for m in methods:
                start = time.perf_counter()
                run_once(m, x, modality, grad, train)
                round_times[m.name] = time.perf_counter() - start
        if meter.window.background > gate.threshold and redone < gate.max_redo:
            redone += 1
            continue
        loads.append(meter.window.background)
        for name, t in round_times.items():
            times[name].append(t)
    return times, {"background": round(statistics.median(loads), 3), "redone": redone}


def ratios(medians: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        name: {peer: t / medians[peer] for peer in PEERS if peer in medians and peer != name}
        for name, t in medians.items()
    }


def bench_config(
    shape: Shape, T: int, dtype_name: str, names: list[str], repeats: int, modes, gate, label=""
):
    """Build every method, check outputs, time each mode; returns result records and printed lines."""
    dtype = DTYPES[dtype_name]
    w = Weights.draw(shape)
    methods = [build_method(n, w, shape, dtype) for n in names]
    inputs = make_inputs(shape, T, dtype)
    lines = [f"{dtype_name}  T={T}{label}"]
    lines += check_outputs({m.name: run_once(m, *inputs, train=True) for m in methods}, dtype)
    records = []
    for mode in modes:
        times, load = time_methods(methods, inputs, mode == "fwd+bwd", repeats, gate)
        medians = {n: statistics.median(t) for n, t in times.items()}
        rel = ratios(medians)
        lines.append(
            f"  {mode:8s} {'median ms':>10s} "
            + " ".join(f"{'/' + p:>15s}" for p in PEERS)
            + f"   (others' CPU share {load['background']:.0%}, rounds redone {load['redone']})"
        )
        for name, t in medians.items():
            cells = " ".join(f"{rel[name][p]:15.2f}" if p in rel[name] else f"{'':15s}" for p in PEERS)
            lines.append(f"  {name:16s} {t * 1e3:10.1f} {cells}")
            records.append(
                {
                    "dtype": dtype_name,
                    "T": T,
                    "mode": mode,
                    "method": name,
                    "median_ms": round(t * 1e3, 2),
                    "min_ms": round(min(times[name]) * 1e3, 2),
                    "repeats": repeats,
                    "ratio": {p: round(v, 3) for p, v in rel[name].items()},
                    **load,
                    **(
                        {"experts": shape.num_experts, "d_ff": shape.d_ff, "top_k": shape.top_k}
                        if label
                        else {}
                    ),
                }
            )
        print("\n".join(lines), flush=True)
        lines = []
    return records


# --- peak memory -------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(method: str, dtype_name: str, T: int, train: bool) -> None:
    """Runs in a fresh process: peak RSS of one call above the post-setup baseline, as one JSON line."""
    shape, dtype = Shape(), DTYPES[dtype_name]
    m = build_method(method, Weights.draw(shape), shape, dtype)
    run_once(m, *make_inputs(shape, 64, dtype), train=train)  # lazy library set-up, not the call
    inputs = make_inputs(shape, T, dtype)
    gc.collect()
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    run_once(m, *inputs, train=train)
    peak = _status_kib("VmHWM") - baseline
    print(
        json.dumps({"method": method, "dtype": dtype_name, "T": T, "train": train, "peak_mib": peak / 1024})
    )


def measure_memory(names: list[str], dtypes: list[str], T: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS} | MEMORY_MALLOC
    records = []
    print(f"peak memory above the post-setup baseline, T={T}, one fresh process each ({malloc_text(env)})")
    print(
        f"  {'method':16s} "
        + " ".join(f"{d + ' ' + mode:>16s}" for d in dtypes for mode in ("fwd", "fwd+bwd"))
    )
    for name in names:
        cells = []
        for d in dtypes:
            for train in (False, True):
                out = subprocess.run(
                    [sys.executable, __file__, "--memory-child", name, d, str(T), str(int(train))],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                records.append(rec)
                cells.append(f"{rec['peak_mib']:13.0f} MiB")
        print(f"  {name:16s} " + " ".join(cells), flush=True)
    return records


def malloc_text(env: dict[str, str]) -> str:
    return " ".join(f"{k}={env[k]}" for k in MALLOC_VARS if k in env) or "glibc defaults"


# --- sweep -------------------------------------------------------------------------------------


def sweep_shapes() -> list[Shape]:
    """E = 4, 8, 16, 64 with E * d_ff and k * d_ff fixed (k = E/4): same parameters, same FLOPs per token."""
    base = Shape()
    return [
        replace(base, d_ff=base.d_ff * 8 // E, vision=E // 4, shared=E // 2, text=E // 4, top_k=E // 4)
        for E in (4, 8, 16, 64)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T=1024 only, 3 repeats, no torch.compile (< 1 min)")
    p.add_argument("--tokens", type=int, nargs="+", help="T values (default 256 1024 4096)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: {' '.join(TIMED)}")
    p.add_argument("--modes", nargs="+", choices=["fwd+bwd", "fwd"], default=["fwd+bwd", "fwd"])
    p.add_argument("--repeats", type=int, help="timed repeats per method (default 5, quick 3)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the layer")
    p.add_argument("--memory", action="store_true", help="peak memory per method, fresh process each")
    p.add_argument("--sweep", action="store_true", help="expert-count sweep at T=4096")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    p.add_argument(
        "--max-background",
        type=float,
        help="redo rounds in which other processes used more than this share of the CPUs "
        "(default 0.1; quick: 1, i.e. never)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, the core count)")
    p.add_argument("--json", help="also write the JSON record to this file")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.memory_child:
        method, d, T, train = args.memory_child
        memory_child(method, d, int(T), bool(int(train)))
        return
    ensure_malloc(args.malloc)

    if args.threads:
        torch.set_num_threads(args.threads)
    default_background = 1.0 if args.quick else 0.1
    gate = Gate(threshold=default_background if args.max_background is None else args.max_background)
    started = time.perf_counter()
    skip_compile = args.quick or args.no_compile
    names = args.methods or [n for n in TIMED if not (skip_compile and n == "moiie-compiled")]
    if "moiie-compiled" in names:
        # MoELayer.forward breaks the graph once, at the data-dependent input check of
        # moiie.modality.check_modality; router + dispatch + experts compile as one graph.
        torch._logging.set_logs(dynamo=logging.ERROR)
    repeats = args.repeats or (3 if args.quick else 5)
    header = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "malloc": malloc_settings(),
        "max_background": gate.threshold,
        "command": " ".join(["python", *sys.argv]),
    }
    print(
        f"moe_layer  {header['date']}  torch {header['torch']}  {header['threads']} threads  "
        f"malloc: {header['malloc']}  rounds redone above {gate.threshold:.0%} background CPU"
    )
    record: dict = {"kind": "moe_layer", **header, "results": []}

    if args.memory:
        record["memory"] = measure_memory(names, args.dtypes, (args.tokens or [4096])[0])
        record["memory_malloc"] = malloc_text(MEMORY_MALLOC)
    elif args.sweep:
        for shape in sweep_shapes():
            for d in args.dtypes:
                label = f"  E={shape.num_experts} d_ff={shape.d_ff} top_k={shape.top_k}"
                sweep_names = args.methods or ["limit", "moiie", "hf-grouped_mm"]
                record["results"] += bench_config(
                    shape, 4096, d, sweep_names, repeats, ["fwd+bwd"], gate, label
                )
    else:
        tokens = args.tokens or ([1024] if args.quick else [256, 1024, 4096])
        for d in args.dtypes:
            for T in tokens:
                record["results"] += bench_config(Shape(), T, d, names, repeats, args.modes, gate)
        summary(record["results"])
    record["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
    print(json.dumps(record, separators=(",", ":")))


def summary(results: list[dict]) -> None:
    """The ratios of moiie's arms, one line per configuration."""
    print("ratios (median / median, same run; lower is better):")
    for r in results:
        if r["method"].startswith("moiie"):
            cells = "  ".join(f"/{peer} {v:.2f}" for peer, v in r["ratio"].items())
            print(f"  {r['dtype']} T={r['T']} {r['mode']:8s} {r['method']:16s} {cells}")


if __name__ == "__main__":
    main()
