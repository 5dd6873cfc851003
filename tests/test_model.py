"""The composed LVLM: processor, forward/loss, generation with KV cache, save/load, ledger, presets, Trainer."""

import numpy as np
import pytest
import torch

from moiie.data.tokenizer import digits_tokenizer
from moiie.ledger import ledger_of, parameter_ledger
from moiie.model import MoIIEForCausalLM, causal_lm_loss, reload_config
from moiie.presets import ARMS, paper_phi3_siglip, tiny_lvlm
from moiie.processor import IGNORE_INDEX, LVLMProcessor


@pytest.fixture(scope="module")
def tokenizer():
    return digits_tokenizer()


def build(arm="moiie", vocab=None, tokenizer=None, **kw):
    torch.manual_seed(0)
    cfg = tiny_lvlm(arm, vocab_size=vocab or len(tokenizer), **kw)
    return MoIIEForCausalLM.from_config(cfg)


def processor_for(model, tokenizer, side="right"):
    return LVLMProcessor(tokenizer, model.vision.preprocess, model.n_image_tokens, padding_side=side)


def digit(seed):
    return np.random.default_rng(seed).integers(0, 17, (8, 8)).astype(np.float32)


def test_processor_expands_placeholders_anywhere(tokenizer):
    model = build(tokenizer=tokenizer)
    proc = processor_for(model, tokenizer)
    texts = ["what digit is <image> ?", "<image> and <image> : is it even", "no image here"]
    images = [[digit(0)], [digit(1), digit(2)], []]
    for side in ("left", "right"):
        b = proc(texts, images, padding_side=side)
        n = model.n_image_tokens
        assert b["image_mask"].sum(1).tolist() == [n, 2 * n, 0]
        assert b["pixel_values"].shape == (3, 1, 8, 8)
        lengths = b["attention_mask"].sum(1)
        for row, L in enumerate(lengths.tolist()):
            real = b["attention_mask"][row].bool()
            assert (
                (real[-L:].all() and not real[:-L].any())
                if side == "left"
                else (real[:L].all() and not real[L:].any())
            )
        # image positions are contiguous runs of n per placeholder, inside the real tokens
        assert not (b["image_mask"] & ~b["attention_mask"].bool()).any()


def test_processor_rejects_count_mismatch(tokenizer):
    model = build(tokenizer=tokenizer)
    proc = processor_for(model, tokenizer)
    with pytest.raises(
        ValueError, match=r"sample 0: 2 image placeholder\(s\) '<image>' in the text but 1 image\(s\) given"
    ):
        proc(["<image> <image>"], [[digit(0)]])
    with pytest.raises(ValueError, match="images: got image lists for 1 samples but 2 texts"):
        proc(["a", "b"], [[]])


def test_processor_needs_single_image_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(ValueError, match="no single token for the image placeholder"):
        LVLMProcessor(hf, lambda x: x, 5)


def test_loss_is_lm_on_answers_plus_weighted_aux(tokenizer):
    model = build(tokenizer=tokenizer)
    proc = processor_for(model, tokenizer)
    from moiie.data import template

    conv = [{"from": "human", "value": "<image>\nWhat digit is this?"}, {"from": "gpt", "value": "seven"}]
    ids, labels = template.render(conv, tokenizer)
    batch = proc.batch([{"input_ids": ids, "labels": labels, "images": [digit(3)]}] * 2)
    out = model(**batch)
    # labels: only answer tokens (and eos) carry a label; image and prompt positions are masked
    assert (batch["labels"][batch["image_mask"]] == IGNORE_INDEX).all()
    n_answer = sum(1 for t in labels if t != IGNORE_INDEX)
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == 2 * n_answer
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    torch.testing.assert_close(out.lm_loss, manual)
    aux = model.moiie_config.ffn.aux_loss
    expected = (
        out.lm_loss
        + aux.vision * out.aux_losses["balance/vision"]
        + aux.text * out.aux_losses["balance/text"]
    )
    torch.testing.assert_close(out.loss, expected)
    assert len(out.routings) == len(model.moe_layer_indices) == 2
    assert causal_lm_loss(out.logits, torch.full_like(batch["labels"], IGNORE_INDEX)).item() == 0.0


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_preserves_the_dense_function_at_upcycling(arm, tokenizer):
    torch.manual_seed(0)
    cfg = tiny_lvlm(arm, vocab_size=len(tokenizer))
    dense = MoIIEForCausalLM.from_config(cfg.model_copy(update={"moe_layers": "none"})).eval()
    proc = processor_for(dense, tokenizer)
    batch = proc(["<image> what digit is this", "is <image> even"], [[digit(0)], [digit(1)]])
    with torch.no_grad():
        before = dense(**batch).logits
        dense.upcycle(cfg.ffn, cfg.moe_layers)
        after = dense(**batch).logits
    assert dense.moe_layer_indices == [1, 3]
    if arm == "expert_choice":  # expert choice may leave tokens unpicked: not function preserving by design
        return
    real = batch["attention_mask"].bool()  # padding positions are not routed (their FFN output is 0)
    assert (after - before)[real].abs().max().item() < 1e-5


def test_generate_with_cache_equals_cache_free_greedy(tokenizer):
    model = build(tokenizer=tokenizer).eval()
    proc = processor_for(model, tokenizer, side="left")
    batch = proc(
        ["<image> what digit", "is it even <image> or <image> ?", "plain text"],
        [[digit(0)], [digit(1), digit(2)], []],
    )
    a = model.generate(**batch, max_new_tokens=6, use_cache=True)
    b = model.generate(**batch, max_new_tokens=6, use_cache=False)
    assert torch.equal(a, b)
    assert a.shape == (3, 6)
    # generated tokens route as text
    model.generate(**batch, max_new_tokens=2)
    assert (model.context.routings()[0].modality == 0).all()


def test_official_modality_rule(tokenizer):
    cfg = tiny_lvlm("moiie", vocab_size=len(tokenizer)).model_copy(update={"modality_rule": "official"})
    model = MoIIEForCausalLM.from_config(cfg)
    proc = processor_for(model, tokenizer)
    batch = proc(["a <image> b"], [[digit(0)]])
    out = model(**batch)
    img = batch["image_mask"][0]
    vision = out.modality[0] == 1
    assert vision.sum().item() == img.sum().item() - 1  # the last image token routes as text
    last = img.nonzero().max()
    assert not vision[last] and vision[img.nonzero().min()]


def test_save_and_load_give_identical_logits(tokenizer, tmp_path):
    model = build(tokenizer=tokenizer).eval()
    proc = processor_for(model, tokenizer)
    batch = proc(["<image> what digit is this"], [[digit(5)]])
    model.save_pretrained(tmp_path)
    again = MoIIEForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert again.moiie_config == reload_config(
        model.moiie_config
    )  # same architecture; weights come from the checkpoint
    assert again.moiie_config.ffn == model.moiie_config.ffn
    # a mismatched config is refused with the keys listed
    other = tiny_lvlm("vanilla_moe", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="does not match the config") as info:
        MoIIEForCausalLM.from_pretrained(tmp_path, config=other)
    assert "router.weight" in str(info.value) and "router.vision" in str(info.value)
    wider = tiny_lvlm("moiie", vocab_size=len(tokenizer), ffn=96)
    with pytest.raises(ValueError, match="shape mismatch"):
        MoIIEForCausalLM.from_pretrained(tmp_path, config=wider)


def test_bad_inputs_are_named(tokenizer):
    model = build(tokenizer=tokenizer)
    proc = processor_for(model, tokenizer)
    batch = proc(["<image> hi"], [[digit(0)]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(**{**batch, "input_ids": batch["input_ids"] + 10_000})
    with pytest.raises(ValueError, match=r"marks 5 positions but 2 image\(s\) x 5 tokens"):
        model(**{**batch, "pixel_values": torch.cat([batch["pixel_values"]] * 2)})
    with pytest.raises(ValueError, match="no pixel_values"):
        model(**{k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(ValueError):
        model(**{**batch, "pixel_values": torch.rand(1, 1, 9, 9)})


def test_ledger_from_meta_matches_built_model(tokenizer):
    for arm in ("dense", "vanilla_moe", "moiie", "modality_moe", "expert_choice"):
        cfg = tiny_lvlm(arm, vocab_size=len(tokenizer))
        meta = parameter_ledger(cfg)
        built = MoIIEForCausalLM.from_config(cfg)
        assert meta == ledger_of(built)
        assert meta.total == sum(p.numel() for p in built.parameters())
    # hand formula for the MoIIE arm: 4 experts top-2 at 2 layers; each token skips 2 experts and the other router
    cfg = tiny_lvlm("moiie", vocab_size=len(tokenizer))
    built = MoIIEForCausalLM.from_config(cfg)
    led = ledger_of(built)
    moe = built.llm.model.layers[1].mlp.ffn
    per_expert = sum(p.numel() for p in moe.experts.parameters()) // 4
    assert led.activated["vision"] == led.total - 2 * (2 * per_expert + moe.router.text.numel())
    assert led.activated["text"] == led.total - 2 * (2 * per_expert + moe.router.vision.numel())
    # vanilla MoE and MoIIE activate the same expert compute; modality MoE one expert
    van = parameter_ledger(tiny_lvlm("vanilla_moe", vocab_size=len(tokenizer)))
    hard = parameter_ledger(tiny_lvlm("modality_moe", vocab_size=len(tokenizer)))
    dense = parameter_ledger(tiny_lvlm("dense", vocab_size=len(tokenizer)))
    d = moe.experts.d_model  # same experts; only router sizes differ (4 vs 3 candidates per text token)
    assert van.activated["text"] - led.activated["text"] == 2 * (4 * d - moe.router.text.numel())
    assert hard.activated["text"] == dense.activated["text"]


def test_paper_layout_on_meta():
    led = parameter_ledger(paper_phi3_siglip("moiie"))
    # Phi-3-mini (3.8B) + SigLIP-so400m (0.4B) + 16 MoE layers of 4 experts: ~5.5B activated in the paper
    assert 5.0e9 < led.activated["text"] < 6.0e9, led.summary()
    assert led.total > led.activated["text"]


def test_trains_inside_hf_trainer(tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    from moiie.data import template

    model = build(tokenizer=tokenizer)
    proc = processor_for(model, tokenizer)
    rows = []
    for i in range(16):
        conv = [{"from": "human", "value": "<image>\nWhat digit is this?"}, {"from": "gpt", "value": "seven"}]
        ids, labels = template.render(conv, tokenizer)
        rows.append({"input_ids": ids, "labels": labels, "images": [digit(i)]})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=proc.batch)
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed > 0
