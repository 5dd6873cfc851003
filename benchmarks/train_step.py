"""One training step of the tiny LVLM per ablation arm, next to each arm's activated FLOPs per token.

    python benchmarks/train_step.py [--threads 1] [--repeats 15] [--batch 64]

Arms are timed interleaved (A B C ... A B C ...) in one process; medians are reported. The
"overhead" column is (arm step time / dense step time) / (arm FLOPs / dense FLOPs): 1.0 means the
arm costs exactly its extra arithmetic, anything above is routing and dispatch overhead.
FLOPs per token = 6 x activated parameters (forward + backward of every matmul weight a token
touches), from the parameter ledger; attention-score FLOPs are the same for every arm and ignored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moiie.ledger import ledger_of
from moiie.model import MoIIEForCausalLM
from moiie.presets import ARMS, tiny_lvlm
from moiie.processor import LVLMProcessor
from moiie.train.config import DigitsDataConfig, TokenizerConfig
from moiie.train.data import BatchOrder, collate, encode_examples, load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--arms", nargs="*", default=sorted(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, _, tok = load_task(DigitsDataConfig(), TokenizerConfig())
    setups = {}
    for name in args.arms:
        torch.manual_seed(0)
        model = MoIIEForCausalLM.from_config(tiny_lvlm(name, vocab_size=len(tok)))
        proc = LVLMProcessor(tok, model.vision.preprocess, model.n_image_tokens)
        samples = encode_examples(train[:1024], tok, proc)
        batch = collate(proc, samples, BatchOrder(len(samples), args.batch, 0).next())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        setups[name] = (model, batch, opt)

    def step(name: str) -> float:
        model, batch, opt = setups[name]
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in setups:  # warm-up
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {n: [] for n in setups}
    for _ in range(args.repeats):
        for name in setups:
            times[name].append(step(name))
    base_t = statistics.median(times["dense"]) if "dense" in times else None
    flops = {n: 6 * ledger_of(setups[n][0]).activated["text"] for n in setups}
    base_f = flops.get("dense")
    rows = []
    print(
        f"tiny LVLM train step, batch {args.batch}, {args.threads} thread(s), median of {args.repeats} interleaved"
    )
    print(
        f"{'arm':<16}{'ms/step':>9}{'MFLOP/token':>13}{'time/dense':>12}{'FLOPs/dense':>13}{'overhead':>10}"
    )
    for name in setups:
        t = statistics.median(times[name])
        row = {"arm": name, "ms_per_step": 1000 * t, "mflop_per_token": flops[name] / 1e6}
        if base_t:
            row.update(
                time_ratio=t / base_t,
                flop_ratio=flops[name] / base_f,
                overhead=(t / base_t) / (flops[name] / base_f),
            )
        rows.append(row)
        print(
            f"{name:<16}{1000 * t:>9.1f}{flops[name] / 1e6:>13.2f}{row.get('time_ratio', 0):>12.2f}"
            f"{row.get('flop_ratio', 0):>13.2f}{row.get('overhead', 0):>10.2f}"
        )
    print(json.dumps({"train_step": rows}))


if __name__ == "__main__":
    main()
