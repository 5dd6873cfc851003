"""Regenerate this folder's example LLaVA data set from the digits task.

    python examples/llava_digits/make.py

Writes ``data.jsonl`` (20 records: the first four held-out images, each asked all five question
types) and ``images/digit_NNNN.png`` (8x8 grayscale). The output is the same on every run.
"""

from __future__ import annotations

from pathlib import Path

from moiie.data.digits import QUESTION_TYPES, DigitsVQAConfig, build_digits_vqa, export_llava

N_IMAGES = 4


def make(folder: str | Path) -> Path:
    """Write the example into ``folder``; returns the path of ``data.jsonl``."""
    config = DigitsVQAConfig(question_types=list(QUESTION_TYPES), samples_per_image_eval=len(QUESTION_TYPES))
    _, held_out = build_digits_vqa(config)
    return export_llava(held_out[: N_IMAGES * len(QUESTION_TYPES)], folder, filename="data.jsonl")


if __name__ == "__main__":
    print(make(Path(__file__).resolve().parent))
