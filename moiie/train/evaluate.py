"""Evaluation by generation (exact match, overall and per question type) and routing diagnostics."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from moiie.diagnostics import RoutingStats
from moiie.processor import LVLMProcessor
from moiie.topology import ExpertTopology
from moiie.train.data import Example, encode_examples, to_device


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split()).strip(" .!?")


@torch.no_grad()
def evaluate_generation(
    model,
    examples: list[Example],
    tokenizer: Any,
    processor: LVLMProcessor,
    *,
    batch_size: int = 128,
    max_new_tokens: int = 4,
) -> dict[str, Any]:
    """Greedy answers (KV cache) for held-out examples; exact match after light normalisation."""
    was_training = model.training
    model.eval()
    prompts = encode_examples(examples, tokenizer, processor, prompt_only=True)
    device = next(model.parameters()).device
    correct: dict[str, list[int]] = defaultdict(list)
    predictions = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        batch = to_device(processor.batch([prompts[i] for i in chunk], padding_side="left"), device)
        out = model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch["image_mask"],
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=processor.pad_token_id,
        )
        for row, i in zip(out.tolist(), chunk):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            ok = int(normalise(text) == normalise(examples[i].answer or ""))
            correct[examples[i].qtype].append(ok)
            predictions.append(text)
    model.train(was_training)
    every = [v for vs in correct.values() for v in vs]
    return {
        "accuracy": sum(every) / max(1, len(every)),
        "per_qtype": {k: sum(v) / len(v) for k, v in sorted(correct.items())},
        "n": len(every),
        "examples": [
            {"answer": examples[i].answer, "prediction": predictions[i]} for i in range(min(5, len(examples)))
        ],
    }


@torch.no_grad()
def routing_diagnostics(
    model,
    samples: list[dict],
    processor: LVLMProcessor,
    topology: ExpertTopology | None,
    batch_size: int = 128,
) -> RoutingStats | None:
    """Teacher-forced forwards over samples; routing statistics of every FFN-slot layer."""
    if topology is None or not model.moe_layer_indices:
        return None
    was_training = model.training
    model.eval()
    stats = RoutingStats(topology, len(model.moe_layer_indices))
    device = next(model.parameters()).device
    for start in range(0, len(samples), batch_size):
        batch = to_device(processor.batch(samples[start : start + batch_size]), device)
        batch.pop("labels", None)
        stats.update(model(**batch).routings)
    model.train(was_training)
    return stats
