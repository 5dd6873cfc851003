"""Injected NaN/Inf in the loss, in router outputs and weights, and in gradients.

Each fault is armed on one stage-2 batch (it comes back if that batch is replayed, as a real
data-dependent fault would). With ``nonfinite: stop`` the run stops with a message naming the
step, the layer and the tensor, and the last checkpoint is left exactly as it was; with ``skip``
the step is skipped and training goes on with finite weights.
"""

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from moiie.model import MoIIEForCausalLM
from moiie.presets import tiny_lvlm
from moiie.train import checkpoint as ckpt
from moiie.train import loop
from moiie.train.faults import locate_nonfinite
from moiie.train.loop import NonFiniteError, run_training

NAN = float("nan")
FAULT_STEP = 2  # 0-based stage-2 step that meets the fault


def tiny_cfg(nonfinite: str):
    return tiny_train_config(
        s1=2, s2=5, batch_size=8, eval_limit=8, checkpoint_every=1, eval_batch_size=8, nonfinite=nonfinite
    )


class Trigger:
    """Active during every forward on the batch the stage's ``at``-th training forward saw."""

    def __init__(self, at: int, on_arm=None):
        self.at, self.seen, self.key, self.active, self.on_arm = at, 0, None, False, on_arm

    def __call__(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.key is None and module.training:
            if self.seen == self.at:
                self.key = ids.clone()
                if self.on_arm is not None:
                    self.on_arm()
            self.seen += 1
        self.active = self.key is not None and ids.shape == self.key.shape and torch.equal(ids, self.key)


def _router(model, layer: int):
    return model.llm.model.layers[layer].mlp.ffn.router


def inject_loss(model, trigger):
    def hook(module, args, kwargs, out):
        if trigger.active:
            out["loss"] = out.loss * NAN

    model.register_forward_hook(hook, with_kwargs=True)


def inject_router_output(model, trigger):
    def hook(module, args, out):
        return out.with_(weights=out.weights * NAN) if trigger.active else out

    _router(model, 1).register_forward_hook(hook)


def inject_router_weights(model, trigger):
    with torch.no_grad():
        next(_router(model, 3).parameters()).fill_(float("inf"))


def inject_gradient(model, trigger):
    def hook(module, grad_input, grad_output):
        if trigger.active:
            return tuple(None if g is None else g * NAN for g in grad_input)
        return None

    model.llm.model.layers[3].mlp.register_full_backward_hook(hook)


FAULTS = {
    # name: (installer, phrases the stop message must hold)
    "loss": (inject_loss, ["loss is nan", "`loss` of the model's output"]),
    "router_output": (
        inject_router_output,
        ["router logits of decoder layer 1", "`weights` in the output of llm.model.layers.1.mlp.ffn.router"],
    ),
    "router_weights": (
        inject_router_weights,
        ["parameter llm.model.layers.3.mlp.ffn.router.", "router logits of decoder layer 3"],
    ),
    "gradient": (
        inject_gradient,
        ["gradients of", "are not finite", "decoder layer 3: gradient of llm.model.layers.3."],
    ),
}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@contextmanager
def faulty_stage2(install, out: Path):
    """Run with ``install(model, trigger)`` applied to the stage-2 model; records the latest
    checkpoint's digest at the moment the fault is armed."""
    seen = {}
    real = loop.train_stage

    def arm():
        latest = ckpt.latest_checkpoint(out / "checkpoints")
        seen["armed_at"] = (latest, _digest(latest))

    def wrapped(model, *args, stage, **kw):
        if stage == 2:
            trigger = Trigger(FAULT_STEP, on_arm=arm)
            model.register_forward_pre_hook(trigger, with_kwargs=True)
            install(model, trigger)
        return real(model, *args, stage=stage, **kw)

    loop.train_stage = wrapped
    try:
        yield seen
    finally:
        loop.train_stage = real


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_stop_names_step_layer_tensor_and_keeps_the_last_checkpoint(tmp_path, fault):
    install, phrases = FAULTS[fault]
    with faulty_stage2(install, tmp_path) as seen, pytest.raises(NonFiniteError) as info:
        run_training(tiny_cfg("stop"), tmp_path, progress=False)
    message = str(info.value)
    step = 0 if fault == "router_weights" else FAULT_STEP  # poisoned weights fail from the first step
    assert f"stage 2 step {step}:" in message
    for phrase in phrases:
        assert phrase in message, message
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.stage_step(latest) == ((1, 2) if step == 0 else (2, step))
    if "armed_at" in seen:  # the checkpoint present when the fault struck is untouched
        assert seen["armed_at"] == (latest, _digest(latest))
    model = MoIIEForCausalLM.from_pretrained(latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ckpt.read_state(latest)["step"] == ckpt.stage_step(latest)[1]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "model").exists()
    assert _rows(tmp_path)[-1]["nonfinite"] in message


@pytest.mark.parametrize("fault", ["gradient", "loss", "router_output"])
def test_skip_skips_only_the_faulty_step(tmp_path, fault):
    install, _ = FAULTS[fault]
    with faulty_stage2(install, tmp_path):
        run_training(tiny_cfg("skip"), tmp_path, progress=False)
    stage2 = [r for r in _rows(tmp_path) if r["stage"] == 2]
    skipped = [r["step"] for r in stage2 if "nonfinite" in r]
    trained = [r["step"] for r in stage2 if "loss" in r]
    assert skipped == [FAULT_STEP + 1]
    assert trained == [s for s in range(1, 6) if s != FAULT_STEP + 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in stage2 if "loss" in r)
    model = MoIIEForCausalLM.from_pretrained(tmp_path / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((tmp_path / "results.json").read_text())["evaluation"]["n"] == 8


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = MoIIEForCausalLM.from_config(tiny_lvlm("moiie", vocab_size=40, hidden=16, layers=4, ffn=32))
    n = model.n_image_tokens
    ids = torch.randint(3, 40, (2, n + 4))
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[:, 1 : 1 + n] = True
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 1, 8, 8),
        "image_mask": image_mask,
        "labels": ids,
    }
    return model.train(), batch


def test_replay_of_a_healthy_step_finds_nothing_and_changes_nothing(model_and_batch):
    model, batch = model_and_batch
    rng = torch.get_rng_state()
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert "did not reappear" in locate_nonfinite(model, [batch], backward=True)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_replay_names_the_first_faulty_layer_not_the_ones_after_it(model_and_batch):
    model, batch = model_and_batch
    _router(model, 3).register_forward_hook(lambda m, a, out: out.with_(weights=out.weights * NAN))
    where = locate_nonfinite(model, [batch], backward=False)
    assert "router logits of decoder layer 3" in where and "layers.1" not in where


def test_replay_blames_the_batch_for_non_finite_pixels(model_and_batch):
    model, batch = model_and_batch
    batch["pixel_values"][0, 0, 0, 0] = NAN
    where = locate_nonfinite(model, [batch], backward=False)
    assert where.startswith("the batch's pixel_values (micro-batch 0) holds NaN/Inf")
    assert "vision encoder" in where
