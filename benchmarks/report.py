"""Markdown tables from the JSON records `moe_layer.py --json` writes.

    .venv/bin/python benchmarks/report.py speed.json [more.json ...]

Speed records give one table per mode (ratio of each method's median to the limit's, plus moiie's
ratios to HF grouped_mm and to the official loop); memory records (--memory) give peak MiB per
method; sweep records (--sweep) give the expert-count sweep.
"""

from __future__ import annotations

import json
import sys


def methods_in(results: list[dict]) -> list[str]:
    """Every method of the records but the limit, in the order the benchmark ran them."""
    return list(dict.fromkeys(r["method"] for r in results if r["method"] != "limit"))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def speed_tables(record: dict) -> str:
    results = [r for r in record["results"] if "experts" not in r]
    out = []
    for mode in ("fwd+bwd", "fwd"):
        rows_by_config: dict[tuple, dict] = {}
        for r in results:
            if r["mode"] == mode:
                rows_by_config.setdefault((r["dtype"], r["T"]), {})[r["method"]] = r
        if not rows_by_config:
            continue
        methods = methods_in([r for r in results if r["mode"] == mode])
        header = [
            "dtype",
            "T",
            "limit ms",
            *methods,
            "moiie / hf-grouped_mm",
            "moiie / official-loop",
            "others' CPU",
        ]
        rows = []
        for (dtype, T), by_method in rows_by_config.items():
            limit = by_method["limit"]
            cells = [f"{by_method[m]['ratio']['limit']:.2f}" if m in by_method else "" for m in methods]
            moiie = by_method.get("moiie", {}).get("ratio", {})
            peers = [f"{moiie[p]:.2f}" if p in moiie else "" for p in ("hf-grouped_mm", "official-loop")]
            rows.append(
                [dtype, str(T), f"{limit['median_ms']:.1f}", *cells, *peers, f"{limit['background']:.0%}"]
            )
        out.append(f"**{mode}**, median time / limit's median time (same run):\n\n" + table(header, rows))
    return "\n\n".join(out)


def memory_table(record: dict) -> str:
    columns = [(d, train) for d in ("fp32", "bf16") for train in (False, True)]
    peaks: dict[str, dict] = {}
    for r in record["memory"]:
        peaks.setdefault(r["method"], {})[(r["dtype"], r["train"])] = r["peak_mib"]
    header = ["method"] + [f"{d} {'fwd+bwd' if train else 'fwd'}" for d, train in columns]
    rows = [[m] + [f"{by.get(c, float('nan')):.0f}" for c in columns] for m, by in peaks.items()]
    T, malloc = record["memory"][0]["T"], record.get("memory_malloc", "")
    intro = f"Peak RSS above the post-setup baseline, MiB, T={T}, one fresh process per cell ({malloc}):"
    return intro + "\n\n" + table(header, rows)


def sweep_table(record: dict) -> str:
    by_config: dict[tuple, dict] = {}
    for r in record["results"]:
        if "experts" in r:
            by_config.setdefault((r["dtype"], r["experts"], r["d_ff"], r["top_k"]), {})[r["method"]] = r
    methods = methods_in([r for r in record["results"] if "experts" in r])
    header = ["dtype", "E", "d_ff", "top_k", "limit ms", *(f"{m} / limit" for m in methods)]
    rows = []
    for (dtype, E, d_ff, k), by_method in sorted(by_config.items()):
        cells = [f"{by_method[m]['ratio']['limit']:.2f}" if m in by_method else "" for m in methods]
        rows.append([dtype, str(E), str(d_ff), str(k), f"{by_method['limit']['median_ms']:.1f}", *cells])
    return "fwd+bwd at T=4096, median time / limit's median time:\n\n" + table(header, rows)


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as fh:
            record = json.load(fh)
        command = record["command"].split()
        if "--json" in command:  # where the record went is not part of how it was made
            del command[command.index("--json") : command.index("--json") + 2]
        print(f"`.venv/bin/{' '.join(command)}`\n")
        print(
            f"{record['date']}, torch {record['torch']}, {record['threads']} threads, malloc: {record['malloc']}\n"
        )
        if "memory" in record:
            print(memory_table(record))
        elif any("experts" in r for r in record["results"]):
            print(sweep_table(record))
        else:
            print(speed_tables(record))
        print()


if __name__ == "__main__":
    main()
