"""The ablation runner: parallel workers, shared stage 1, skip finished runs, report failures, summary files."""

import json

import pytest

from moiie.ablate import GridConfig, run_grid
from moiie.config_base import ConfigError
from moiie.layer import MoEConfig
from moiie.presets import arm, digits_train_config
from moiie.train.config import DigitsDataConfig


def tiny_grid(arms, seeds=(0, 1)):
    base = digits_train_config("moiie")
    base = base.model_copy(
        update={
            "stage1": base.stage1.model_copy(update={"steps": 3, "batch_size": 8}),
            "stage2": base.stage2.model_copy(update={"steps": 4, "batch_size": 8}),
            "data": DigitsDataConfig(
                task={"samples_per_image_train": 1, "samples_per_image_eval": 1}, eval_limit=16
            ),
            "log_every": 1,
        }
    )
    return GridConfig(base=base, arms=arms, seeds=list(seeds), workers=2)


@pytest.mark.slow
def test_grid_runs_skips_and_reports_failures(tmp_path):
    broken = MoEConfig.parse(
        {**arm("moiie").model_dump(), "expert": {"kind": "swiglu", "d_ff": 7}}
    )  # backbone d_ff is 128
    grid = tiny_grid(
        {"dense": arm("dense"), "moiie": arm("moiie"), "vanilla_moe": arm("vanilla_moe"), "broken": broken}
    )
    logs = []
    summary = run_grid(grid, tmp_path, log=logs.append)
    rows = {r["arm"]: r for r in summary["rows"]}
    assert rows["moiie"]["seeds"] == 2 and rows["dense"]["seeds"] == 2
    assert set(summary["failures"]) == {"broken, seed 0", "broken, seed 1"}
    assert "set expert.d_ff to 128" in summary["failures"]["broken, seed 0"]
    for f in ("summary.md", "summary.csv", "loss_curves.png", "heatmaps/moiie.png"):
        assert (tmp_path / f).exists(), f
    md = (tmp_path / "summary.md").read_text()
    assert "vs dense" in md and "vs vanilla_moe" in md and "Not compute-matched" in md
    # both arms upcycled from the same stage-1 model of their seed
    for seed in (0, 1):
        assert (tmp_path / f"stage1-seed{seed}" / "stage1.json").exists()
    # rerun: finished runs are skipped, the broken ones are tried again and fail again
    before = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")}
    logs.clear()
    run_grid(grid, tmp_path, log=logs.append)
    assert "6 already finished" in logs[0]
    assert {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/results.json")} == before
    result = json.loads((tmp_path / "runs" / "moiie-seed0" / "results.json").read_text())
    assert result["params"]["activated_text"] == rows["moiie"]["activated_text"]


def test_grid_config_is_validated():
    with pytest.raises(ConfigError, match=r"arms\.x\.router"):
        GridConfig.parse(
            {
                "base": digits_train_config("moiie").model_dump(),
                "arms": {"x": {"kind": "moe", "router": {"kind": "nope"}}},
            }
        )
    with pytest.raises(ConfigError, match="seeds"):
        GridConfig.parse({"base": digits_train_config("moiie").model_dump(), "seeds": []})
