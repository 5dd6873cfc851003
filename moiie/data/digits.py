"""A visual question-answering task on real handwritten digits that ships offline.

Images are scikit-learn's ``load_digits`` (1,797 scans of 8x8 pixels, values 0..16, labels 0..9).
Every question needs the image and the text together: the same question text gets different
answers for different images, and the same image gets different answers for different questions.
Answers are one word: a numeral (``"7"``, ``"12"``; digits are answered as numerals, not words,
so "which digit" and "plus N" share one answer vocabulary) or ``"yes"``/``"no"``.

Question types (the text follows ``"<image>\\n"``):

- ``digit``: "What digit is this?" -> the digit.
- ``parity``: "Is this digit even?" or "Is this digit odd?" (a fair coin picks) -> yes/no.
- ``plus``: "What is this digit plus N?", N uniform in 1..9 -> the sum (1..18).
- ``greater``: "Is this digit greater than N?", N uniform in 0..8 -> yes/no. Over uniform digits
  exactly half the (digit, N) pairs are "yes" (45 of 90), so both answers are common.
- ``equals``: "Is this digit N?", N the digit itself with probability 1/2, else another digit
  -> yes/no.

The split is by image: a permutation from ``default_rng(split_seed)`` puts ``n_eval_images`` images
in the held-out set and the rest in training, so no held-out image is ever seen in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import Field, model_validator

from moiie.config_base import Config
from moiie.data.template import GPT, HUMAN, IMAGE_TOKEN

QuestionType = Literal["digit", "parity", "plus", "greater", "equals"]
QUESTION_TYPES: tuple[str, ...] = get_args(QuestionType)
N_IMAGES = 1797
"""Images in scikit-learn's digits data set."""
PIXEL_MAX = 16
"""Largest raw pixel value."""


@dataclass(frozen=True, eq=False)
class DigitsSample:
    """One question about one digit image."""

    id: str
    """Unique over both splits: ``digits-{image_index:04d}-{k}``, k counting questions per image."""
    image: np.ndarray
    """(8, 8) float32, raw values 0..16, read-only (shared by the image's samples)."""
    question: str
    """Human turn with exactly one ``<image>`` placeholder, e.g. ``"<image>\\nWhat digit is this?"``."""
    answer: str
    """One word: a numeral or yes/no."""
    qtype: str
    """Question type, one of :data:`QUESTION_TYPES`."""
    image_index: int
    """Index of the image in ``sklearn.datasets.load_digits``."""
    label: int
    """The digit shown (for per-digit analysis)."""

    @property
    def images(self) -> list[np.ndarray]:
        """``[image]``: the sample's images in placeholder order, as LLaVA samples have them."""
        return [self.image]

    @property
    def conversations(self) -> list[dict[str, str]]:
        """The sample as a LLaVA conversation (what :func:`moiie.data.template.render` reads)."""
        return [{"from": HUMAN, "value": self.question}, {"from": GPT, "value": self.answer}]


class DigitsVQAConfig(Config):
    """Questions about scikit-learn's handwritten digits, split by image."""

    kind: Literal["digits_vqa"] = "digits_vqa"
    split_seed: int = Field(0, ge=0)
    """Seed of the image permutation that picks the held-out images; keep it fixed to compare runs."""
    n_eval_images: int = Field(360, ge=1, le=N_IMAGES - 1)
    """Held-out images; the other images are for training (1,437 with the default)."""
    seed: int = Field(0, ge=0)
    """Seed of the question sampling (question types per image, the N in questions)."""
    question_types: list[QuestionType] = Field(default_factory=lambda: ["digit", "parity", "plus", "greater"])
    """Question types to ask, each asked equally often (see the module docstring)."""
    samples_per_image_train: int = Field(4, ge=1, le=1000)
    """Questions per training image; types are dealt round-robin, so with as many as there are
    types every image gets each type once."""
    samples_per_image_eval: int = Field(4, ge=1, le=1000)
    """Questions per held-out image, dealt like the training ones."""

    @model_validator(mode="after")
    def _distinct_types(self) -> DigitsVQAConfig:
        if not self.question_types:
            raise ValueError("question_types: give at least one question type")
        if len(set(self.question_types)) != len(self.question_types):
            raise ValueError(f"question_types: each type once, got {self.question_types}")
        return self


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All digits as read-only arrays: images (1797, 8, 8) float32 0..16 and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.ascontiguousarray(data.images, dtype=np.float32)
    labels = np.asarray(data.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def split_images(config: DigitsVQAConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sorted image indices of the training and the held-out split."""
    order = np.random.default_rng(config.split_seed).permutation(N_IMAGES)
    return np.sort(order[config.n_eval_images :]), np.sort(order[: config.n_eval_images])


def draw_parameter(qtype: str, digit: int, rng: np.random.Generator) -> int:
    """The random part of a question: N (``plus``, ``greater``, ``equals``), 1 for "even" / 0 for
    "odd" (``parity``), 0 for ``digit`` (nothing to draw)."""
    if qtype == "digit":
        return 0
    if qtype == "parity":
        return int(rng.random() < 0.5)
    if qtype == "plus":
        return int(rng.integers(1, 10))
    if qtype == "greater":
        return int(rng.integers(0, 9))
    if qtype == "equals":
        return digit if rng.random() < 0.5 else int(rng.choice([d for d in range(10) if d != digit]))
    raise ValueError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


def ask(qtype: str, digit: int, n: int) -> tuple[str, str]:
    """Question of type ``qtype`` with parameter ``n`` about an image of ``digit`` (the text after
    ``<image>\\n``), and its answer."""
    if qtype == "digit":
        return "What digit is this?", str(digit)
    if qtype == "parity":
        return f"Is this digit {'even' if n else 'odd'}?", _yes_no((digit % 2 == 0) == bool(n))
    if qtype == "plus":
        return f"What is this digit plus {n}?", str(digit + n)
    if qtype == "greater":
        return f"Is this digit greater than {n}?", _yes_no(digit > n)
    if qtype == "equals":
        return f"Is this digit {n}?", _yes_no(n == digit)
    raise ValueError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


_PARAMETERS = {
    "digit": range(1),
    "parity": range(2),
    "plus": range(1, 10),
    "greater": range(9),
    "equals": range(10),
}
"""Every value :func:`draw_parameter` can return, per question type."""


def build_digits_vqa(config: DigitsVQAConfig) -> tuple[list[DigitsSample], list[DigitsSample]]:
    """The training and held-out samples, each list ordered by image index, then question."""
    train_images, eval_images = split_images(config)
    # separate streams: the held-out questions stay the same when training settings change
    train = _ask_about(train_images, config.samples_per_image_train, config, stream=0)
    held_out = _ask_about(eval_images, config.samples_per_image_eval, config, stream=1)
    return train, held_out


def _ask_about(
    image_indices: np.ndarray, per_image: int, config: DigitsVQAConfig, *, stream: int
) -> list[DigitsSample]:
    images, labels = load_digit_images()
    rng = np.random.default_rng([config.seed, stream])
    types = config.question_types
    # Types are dealt round-robin over a shuffled image order: the digits data set lists labels
    # almost cyclically, so dealing in index order would tie question types to digits.
    dealing_order = rng.permutation(image_indices)
    samples = []
    for rank, index in enumerate(dealing_order):
        index = int(index)
        digit = int(labels[index])
        for k in range(per_image):
            qtype = types[(rank * per_image + k) % len(types)]
            text, answer = ask(qtype, digit, draw_parameter(qtype, digit, rng))
            samples.append(
                DigitsSample(
                    id=f"digits-{index:04d}-{k}",
                    image=images[index],
                    question=f"{IMAGE_TOKEN}\n{text}",
                    answer=answer,
                    qtype=qtype,
                    image_index=index,
                    label=digit,
                )
            )
    samples.sort(key=lambda s: (s.image_index, s.id))
    return samples


def all_question_answers(question_types: tuple[str, ...] = QUESTION_TYPES) -> list[tuple[str, str]]:
    """Every (question, answer) pair the task can produce, sorted (e.g. to train a tokenizer on)."""
    pairs = set()
    for qtype in question_types:
        for digit in range(10):
            for n in _PARAMETERS[qtype]:
                text, answer = ask(qtype, digit, n)
                pairs.add((f"{IMAGE_TOKEN}\n{text}", answer))
    return sorted(pairs)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Raw 0..16 pixels scaled to 8-bit grayscale 0..255 (exactly invertible: see :func:`from_uint8`)."""
    return np.rint(np.asarray(image, dtype=np.float64) * (255 / PIXEL_MAX)).astype(np.uint8)


def from_uint8(pixels: Any) -> np.ndarray:
    """8-bit grayscale (array or PIL image) back to raw float32 0..16 values."""
    return np.rint(np.asarray(pixels, dtype=np.float64) * (PIXEL_MAX / 255)).astype(np.float32)


def export_llava(
    samples: list[DigitsSample],
    folder: str | Path,
    *,
    filename: str = "data.jsonl",
    image_dir: str = "images",
) -> Path:
    """Write ``samples`` as a LLaVA data set: one 8x8 grayscale PNG per image, one record per sample.

    ``filename`` ending in ``.jsonl`` writes one record per line, ``.json`` a JSON list. Records
    hold ``id``, ``image`` (path relative to ``folder``), ``conversations`` and ``qtype``. Returns
    the path of the written data file.
    """
    from PIL import Image

    if not filename.endswith((".json", ".jsonl")):
        raise ValueError(f"filename must end in .json or .jsonl, got {filename!r}")
    folder = Path(folder)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    records = []
    written: set[int] = set()
    for s in samples:
        relative = f"{image_dir}/digit_{s.image_index:04d}.png"
        if s.image_index not in written:
            Image.fromarray(to_uint8(s.image)).save(folder / relative)
            written.add(s.image_index)
        records.append({"id": s.id, "image": relative, "conversations": s.conversations, "qtype": s.qtype})
    path = folder / filename
    if filename.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"
