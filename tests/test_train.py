"""Two-stage training: outputs, exact resume, atomic checkpoints, non-finite handling, CLI, LLaVA data."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from moiie.model import MoIIEForCausalLM
from moiie.presets import digits_train_config
from moiie.train import checkpoint as ckpt
from moiie.train.config import LlavaDataConfig, StageConfig, TrainConfig
from moiie.train.loop import NonFiniteError, run_training

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "llava_digits"


def tiny(arm="moiie", s1=4, s2=8, **kw) -> TrainConfig:
    return tiny_train_config(arm, s1=s1, s2=s2, batch_size=16, eval_limit=24, checkpoint_every=3, **kw)


def losses(run: Path) -> list[tuple[int, int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "loss" in r]


def test_run_writes_everything(tmp_path):
    results = run_training(tiny(), tmp_path, progress=False)
    assert set(results["evaluation"]["per_qtype"]) == {"digit", "parity", "plus", "greater"}
    assert results["evaluation"]["n"] == 24
    assert results["params"]["activated_text"] < results["params"]["total"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r for r in rows if r["stage"] == 2]
    assert [r["step"] for r in stage2] == list(range(1, 9))
    assert {"loss", "lm_loss", "balance/vision", "balance/text", "tokens_per_s", "lr"} <= set(stage2[0])
    # routing diagnostics are logged during training, per MoE layer (1 and 3) and modality
    assert {
        "route/1/mi_bits",
        "route/3/vision/shared",
        "route/1/text/entropy",
        "route/3/text/max_load",
    } <= set(stage2[0])
    assert all("balance/vision" not in r for r in rows if r["stage"] == 1)  # stage 1 is dense
    assert (tmp_path / "routing.txt").read_text().count("MI(expert; modality)") == 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [
        "ckpt-2-0000006",
        "ckpt-2-0000008",
    ]
    model = MoIIEForCausalLM.from_pretrained(tmp_path / "model")
    assert model.moe_layer_indices == [1, 3]


def test_stage1_trains_only_the_projector_and_stage2_upcycles(tmp_path):
    cfg = tiny(s1=3, s2=0)
    run_training(cfg, tmp_path, progress=False)
    torch.manual_seed(cfg.seed)
    fresh = MoIIEForCausalLM.from_config(cfg.model.model_copy(update={"moe_layers": "none"}))
    trained = MoIIEForCausalLM.from_pretrained(tmp_path / "model")
    changed = {
        n.split(".")[0]
        for n, p in trained.named_parameters()
        if n in dict(fresh.named_parameters()) and not torch.equal(p, dict(fresh.named_parameters())[n])
    }
    assert changed == {"projector"}


def test_resume_is_exact(tmp_path):
    cfg = tiny(s1=4, s2=9)
    full = tmp_path / "full"
    run_training(cfg, full, progress=False)

    cut = tmp_path / "cut"
    real_write = ckpt.write_checkpoint
    calls = {"n": 0}

    def crash_after_second_stage2_checkpoint(root, stage, step, model, state, keep=2):
        out = real_write(root, stage, step, model, state, keep)
        if stage == 2:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated crash")
        return out

    ckpt.write_checkpoint = crash_after_second_stage2_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, cut, progress=False)
    finally:
        ckpt.write_checkpoint = real_write
    assert ckpt.stage_step(ckpt.latest_checkpoint(cut / "checkpoints")) == (2, 6)
    run_training(cfg, cut, resume=True, progress=False)
    a, b = losses(full), losses(cut)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in a] == [x[2] for x in b]  # bit-identical per-step losses


def test_temp_folders_are_never_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".tmp-ckpt-abc").mkdir()
    (root / "ckpt-2-0000005").mkdir()  # no COMPLETE marker: half-written
    assert ckpt.latest_checkpoint(root) is None


def test_pickled_trainer_state_is_refused(tmp_path):
    folder = tmp_path / "ckpt-2-0000001"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Payload()}, folder / ckpt.STATE_NAME)
    with pytest.raises(ValueError, match="refused to load"):
        ckpt.read_state(folder)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny(s1=3, s2=6)
    from moiie.train import loop

    real = loop.train_stage

    def poisoned(model, *args, stage, **kw):
        if stage == 2:
            with torch.no_grad():
                model.projector[0].weight.fill_(float("nan"))
        return real(model, *args, stage=stage, **kw)

    loop.train_stage = poisoned
    try:
        with pytest.raises(NonFiniteError, match="stage 2 step 0: loss is nan"):
            run_training(cfg, tmp_path, progress=False)
        assert ckpt.stage_step(ckpt.latest_checkpoint(tmp_path / "checkpoints")) == (1, 3)
        skip = cfg.model_copy(update={"nonfinite": "skip"})
        run_training(skip, tmp_path / "skip", progress=False)  # every stage-2 step is skipped, the run ends
    finally:
        loop.train_stage = real
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert sum("nonfinite" in r for r in rows) == 6


def test_trains_on_llava_jsonl(tmp_path):
    cfg = tiny(s1=2, s2=3).model_copy(
        update={
            "data": LlavaDataConfig(
                train=str(EXAMPLES / "data.jsonl"), eval=str(EXAMPLES / "data.jsonl"), eval_limit=5
            )
        }
    )
    results = run_training(cfg, tmp_path, progress=False)
    assert results["evaluation"]["n"] == 5


def test_yaml_with_unknown_key_is_rejected_before_training(tmp_path):
    from moiie.cli import main

    cfg = tiny()
    text = cfg.to_yaml().replace("stage2:\n", "stage2:\n  learning_rate: 0.1\n", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=r"stage2\.learning_rate: unknown field"):
        main(["train", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_cli_train_and_inspect(tmp_path, capsys):
    from moiie.cli import main

    path = tmp_path / "run.yaml"
    tiny(s1=2, s2=4).save(path)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "held-out exact match" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "run"), "--limit", "32"]) == 0
    out = capsys.readouterr().out
    assert (
        "MI(expert; modality)" in out
        and (tmp_path / "run" / "model" / "inspect" / "expert_load.png").exists()
    )


def test_stage_config_rules():
    from moiie.config_base import ConfigError

    base = digits_train_config("moiie")
    with pytest.raises(ConfigError, match="stage1.trainable"):
        TrainConfig.parse(
            {**base.model_dump(), "stage1": StageConfig(trainable="all_but_vision").model_dump()}
        )


def test_shipped_configs_load_and_match_the_presets():
    from moiie.ablate import GridConfig
    from moiie.presets import default_grid

    root = Path(__file__).resolve().parents[1] / "configs"
    assert TrainConfig.load(root / "digits_moiie.yaml") == digits_train_config("moiie")
    ep2 = TrainConfig.load(root / "digits_moiie_ep2.yaml")
    assert ep2.parallel.expert == 2 and ep2.model_copy(update={"parallel": None}) == digits_train_config(
        "moiie"
    )
    assert GridConfig.load(root / "ablation.yaml") == default_grid()


def test_bf16_and_gradient_checkpointing_train(tmp_path):
    cfg = tiny(s1=2, s2=3, bf16=True, gradient_checkpointing=True)
    results = run_training(cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] and r["loss"] < 20 for r in rows)
    assert results["routing"] is not None and len(results["routing"]) == 2
