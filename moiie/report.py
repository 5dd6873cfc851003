"""Ablation report: markdown + CSV table, loss curves, expert-load heatmaps, significance notes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MODALITIES = ("text", "vision")
ROUTER_GROUPS = ("vision", "text", "joint")


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def significance(a: list[float], b: list[float]) -> str:
    """Welch's t-test of mean accuracy a vs b, phrased honestly for a handful of seeds."""
    if len(a) < 2 or len(b) < 2:
        return "n/a (needs >= 2 seeds each)"
    from scipy import stats

    if np.std(a) == 0 and np.std(b) == 0:
        return (
            "identical"
            if np.mean(a) == np.mean(b)
            else ("higher" if np.mean(a) > np.mean(b) else "lower") + " (no variance)"
        )
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    diff = 100 * (np.mean(a) - np.mean(b))
    if p >= 0.05:
        return f"{diff:+.1f} pt, within seed noise (p={p:.2f})"
    return f"{diff:+.1f} pt, {'higher' if diff > 0 else 'lower'} (p={p:.3f})"


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_report(grid, out: Path, failures: dict[str, str]) -> dict[str, Any]:
    from moiie.ablate import load_results

    results = load_results(out, grid)
    qtypes = sorted(
        {
            q
            for runs in results.values()
            for r in runs
            if r.get("evaluation")
            for q in r["evaluation"]["per_qtype"]
        }
    )
    ref_arm = next((a for a in ("vanilla_moe", "moiie") if results.get(a)), None)
    ref_active = results[ref_arm][0]["params"]["activated_text"] if ref_arm else None
    rows = []
    for name, runs in results.items():
        acc = [r["evaluation"]["accuracy"] for r in runs if r.get("evaluation")]
        m, s = _mean_std(acc)
        row: dict[str, Any] = {"arm": name, "seeds": len(runs), "accuracy_mean": m, "accuracy_std": s}
        for q in qtypes:
            row[f"acc_{q}"] = _mean_std(
                [r["evaluation"]["per_qtype"].get(q, math.nan) for r in runs if r.get("evaluation")]
            )[0]
        row["lm_loss"] = _mean_std([r["final"].get("lm_loss", math.nan) for r in runs if r.get("final")])[0]
        for group in ROUTER_GROUPS:
            row[f"balance_{group}"] = _mean_std(
                [
                    r["final"][f"balance/{group}"]
                    for r in runs
                    if r.get("final") and f"balance/{group}" in r["final"]
                ]
            )[0]
        params = runs[0]["params"] if runs else {}
        row.update(
            params_total=params.get("total"),
            activated_text=params.get("activated_text"),
            activated_vision=params.get("activated_vision"),
        )
        tps = [
            np.mean(
                [
                    x["tokens_per_s"]
                    for x in _metrics(out / "runs" / f"{name}-seed{r['seed']}")
                    if x.get("stage") == 2 and "tokens_per_s" in x
                ]
                or [math.nan]
            )
            for r in runs
        ]
        row["tokens_per_s"] = _mean_std(tps)[0]
        row["collapsed_runs"] = sum(bool(r.get("collapsed")) for r in runs)
        for ref in grid.reference_arms:
            if ref != name and ref in results:
                ref_acc = [r["evaluation"]["accuracy"] for r in results[ref] if r.get("evaluation")]
                row[f"vs_{ref}"] = significance(acc, ref_acc)
        flag = ""
        if ref_active and params and abs(params["activated_text"] - ref_active) > 0.01 * ref_active:
            flag = f"activated params differ from {ref_arm} ({params['activated_text']:,} vs {ref_active:,})"
        row["flag"] = flag
        rows.append(row)
    _write_csv(out / "summary.csv", rows)
    markdown = _markdown(rows, qtypes, grid, failures)
    (out / "summary.md").write_text(markdown + "\n")
    _loss_curves(out, results)
    _heatmaps(out, results, grid)
    return {"rows": rows, "markdown": markdown, "failures": failures}


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _markdown(rows: list[dict], qtypes: list[str], grid, failures: dict[str, str]) -> str:
    head = [
        "arm",
        "held-out acc % (mean ± std)",
        *[f"{q} %" for q in qtypes],
        "LM loss",
        "balance loss vision / text / joint",
        "params total",
        "activated text / vision",
        "tokens/s",
        "collapsed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = f"{_pct(r['accuracy_mean'])} ± {_pct(r['accuracy_std'])} (n={r['seeds']})"
        cells = [
            r["arm"],
            acc,
            *[_pct(r[f"acc_{q}"]) for q in qtypes],
            _num(r["lm_loss"], 3),
            " / ".join(_num(r[f"balance_{g}"], 2) for g in ROUTER_GROUPS),
            _int(r["params_total"]),
            f"{_int(r['activated_text'])} / {_int(r['activated_vision'])}" + (" (!)" if r["flag"] else ""),
            _num(r["tokens_per_s"], 0),
            f"{r['collapsed_runs']}/{r['seeds']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Significance (Welch's t-test over seeds, held-out accuracy):"]
    for r in rows:
        comps = [f"vs {ref}: {r[f'vs_{ref}']}" for ref in grid.reference_arms if f"vs_{ref}" in r]
        if comps:
            notes.append(f"- {r['arm']}: " + "; ".join(comps))
    flagged = [f"- {r['arm']}: {r['flag']}" for r in rows if r["flag"]]
    if flagged:
        notes += ["", "(!) Not compute-matched:", *flagged]
    notes += [
        "",
        "Collapsed: in some MoE layer one modality's top-k busiest experts took >= 95% of its assignments.",
    ]
    if failures:
        notes += ["", "Failed runs:", *[f"- {k}: {v}" for k, v in failures.items()]]
    return "\n".join(lines + notes)


def _num(x, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _int(x) -> str:
    return "-" if x is None else f"{x:,}"


def _loss_curves(out: Path, results: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in results.items():
        curves = []
        for r in runs:
            pts = [
                (x["step"], x["lm_loss"])
                for x in _metrics(out / "runs" / f"{name}-seed{r['seed']}")
                if x.get("stage") == 2 and "lm_loss" in x
            ]
            if pts:
                curves.append(pts)
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [p[0] for p in curves[0][:n]]
        mean = np.mean([[p[1] for p in c[:n]] for c in curves], axis=0)
        ax.plot(steps, mean, label=f"{name} (n={len(curves)})")
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("LM loss (answer tokens), mean over seeds")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(out / "loss_curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _heatmaps(out: Path, results: dict[str, list[dict]], grid) -> None:
    from moiie.diagnostics import plot_load

    (out / "heatmaps").mkdir(exist_ok=True)
    for name, runs in results.items():
        routed = [r["routing"] for r in runs if r.get("routing")]
        if not routed:
            continue
        load = np.mean([[[layer[m]["load"] for m in MODALITIES] for layer in rt] for rt in routed], axis=0)
        topology = getattr(grid.arms.get(name), "topology", None)
        names = [f"{topology.group_of(e)[0]}{e}" for e in range(topology.num_experts)] if topology else None
        plot_load(
            load,
            out / "heatmaps" / f"{name}.png",
            title=f"{name}: expert load share (mean over {len(routed)} seeds)",
            names=names,
        )
