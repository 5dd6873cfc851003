"""The `moiie` command: train, ablate, inspect, layer-demo, schema."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(cls, path: str):
    from moiie.config_base import ConfigError

    try:
        return cls.load(path)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    except FileNotFoundError:
        raise SystemExit(f"config file not found: {path}") from None


def train(args: argparse.Namespace) -> int:
    """Two-stage training from a YAML config."""
    from moiie.train.config import TrainConfig
    from moiie.train.loop import run_training

    cfg = _load(TrainConfig, args.config)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    results = run_training(cfg, out, resume=args.resume, progress=not args.no_progress)
    if not results:  # a torchrun rank other than 0: rank 0 reports
        return 0
    ev = results.get("evaluation")
    if ev:
        print(
            f"held-out exact match {100 * ev['accuracy']:.1f}% over {ev['n']} questions; per type: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in ev["per_qtype"].items())
        )
    print(f"results in {out.resolve()} (results.json, metrics.jsonl, routing.txt, checkpoints/, model/)")
    return 0


def ablate(args: argparse.Namespace) -> int:
    """Run an ablation grid (default: the six arms of SPEC section 8 x 3 seeds on the digits task)."""
    from moiie.ablate import GridConfig, run_grid
    from moiie.presets import default_grid

    grid = _load(GridConfig, args.grid) if args.grid else default_grid()
    if args.workers:
        grid = grid.model_copy(update={"workers": args.workers})
    run_grid(grid, args.out)
    return 0


def inspect(args: argparse.Namespace) -> int:
    """Routing diagnostics of a saved model: table + PNG heatmaps."""
    from moiie.inspect import inspect_checkpoint

    print(inspect_checkpoint(args.checkpoint, out=args.out, limit=args.limit))
    return 0


def layer_demo(args: argparse.Namespace) -> int:
    """Build a tiny MoIIE layer, route a text + image + padding batch, print its routing."""
    from moiie.demo import layer_demo as run

    run(seed=args.seed)
    return 0


def schema(args: argparse.Namespace) -> int:
    """Print the JSON schema of a top-level config (train, grid, model)."""
    from moiie.ablate import GridConfig
    from moiie.model import LVLMConfig
    from moiie.train.config import TrainConfig

    cls = {"train": TrainConfig, "grid": GridConfig, "model": LVLMConfig}[args.which]
    json.dump(cls.model_json_schema(), sys.stdout, indent=2)
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moiie", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help=train.__doc__)
    p.add_argument("config", help="training YAML (see configs/)")
    p.add_argument("--out", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train)
    p = sub.add_parser("ablate", help=ablate.__doc__)
    p.add_argument("grid", nargs="?", help="grid YAML (default: the built-in study)")
    p.add_argument("--out", default="runs/ablation", help="output folder (default runs/ablation)")
    p.add_argument("--workers", type=int, help="override the number of worker processes")
    p.set_defaults(func=ablate)
    p = sub.add_parser("inspect", help=inspect.__doc__)
    p.add_argument("checkpoint", help="a run folder, its model/ folder, or a checkpoints/ckpt-* folder")
    p.add_argument("--out", help="folder for the PNG heatmaps (default: <checkpoint>/inspect)")
    p.add_argument("--limit", type=int, default=512, help="held-out samples to route (default 512)")
    p.set_defaults(func=inspect)
    p = sub.add_parser("layer-demo", help=layer_demo.__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=layer_demo)
    p = sub.add_parser("schema", help=schema.__doc__)
    p.add_argument("which", nargs="?", default="train", choices=["train", "grid", "model"])
    p.set_defaults(func=schema)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
