"""Task data for training: examples, the tokenizer, tokenised + preprocessed samples, resumable batch order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moiie.data import template
from moiie.processor import LVLMProcessor


@dataclass
class Example:
    """One conversation with its images; ``answer`` and ``qtype`` are set for held-out evaluation."""

    conversations: list[dict[str, str]]
    images: list[Any]
    answer: str | None = None
    qtype: str = "all"


def load_task(data_config, tokenizer_config) -> tuple[list[Example], list[Example], Any]:
    """(train examples, held-out examples, tokenizer) for a training config's data + tokenizer sections."""
    if data_config.kind == "digits_vqa":
        from moiie.data.digits import DigitsVQAConfig, build_digits_vqa

        train, held = build_digits_vqa(DigitsVQAConfig(**data_config.task))
        to_example = _digits_example
    else:
        from moiie.data.llava import load_llava

        train = load_llava(data_config.train, image_folder=data_config.image_folder)
        held = load_llava(data_config.eval, image_folder=data_config.image_folder) if data_config.eval else []
        to_example = _llava_example
    train_x = [to_example(s) for s in train]
    held_x = [to_example(s) for s in held]
    if data_config.eval_limit is not None:
        held_x = held_x[: data_config.eval_limit]
    return train_x, held_x, _tokenizer(tokenizer_config)


def _tokenizer(config) -> Any:
    if config.kind == "task":
        from moiie.data.tokenizer import digits_tokenizer

        return digits_tokenizer()
    if config.kind == "smollm2":
        from moiie.backbones.smollm2 import smollm2_tokenizer

        return smollm2_tokenizer()
    from transformers import AutoTokenizer

    if config.path is None:
        raise ValueError("tokenizer.path: an `hf` tokenizer needs a local folder")
    tok = AutoTokenizer.from_pretrained(config.path, local_files_only=True)
    if template.IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [template.IMAGE_TOKEN]})
    return tok


def _digits_example(sample) -> Example:
    from PIL import Image

    from moiie.data.digits import to_uint8

    conv = [
        {"from": template.HUMAN, "value": sample.question},
        {"from": template.GPT, "value": sample.answer},
    ]
    # an 8-bit grayscale image, as a file on disk would be: every encoder's preprocess takes it (RGB ones convert)
    image = Image.fromarray(to_uint8(sample.image))
    return Example(conversations=conv, images=[image], answer=sample.answer, qtype=sample.qtype)


def _llava_example(sample) -> Example:
    conv = list(sample.conversations)
    answer = conv[-1]["value"] if conv and conv[-1]["from"] == template.GPT else None
    return Example(conversations=conv, images=list(sample.images), answer=answer)


def encode_examples(
    examples: list[Example], tokenizer: Any, processor: LVLMProcessor, *, prompt_only: bool = False
):
    """Tokenise (template) and preprocess (encoder) every example once: a list of processor samples."""
    out = []
    for i, ex in enumerate(examples):
        if prompt_only:
            ids, labels = template.render_prompt(ex.conversations[:-1], tokenizer), None
        else:
            ids, labels = template.render(ex.conversations, tokenizer)
        pixels = processor.preprocess(ex.images) if ex.images else None
        if pixels is not None and pixels.shape[0] != len(ex.images):
            raise ValueError(
                f"example {i}: preprocessing returned {pixels.shape[0]} images for {len(ex.images)}"
            )
        out.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return out


class BatchOrder:
    """Epoch-wise shuffled order with a resumable position: the same seed gives the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> list[int]:
        idx = []
        while len(idx) < self.batch_size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(self.batch_size - len(idx), self.n - self.pos)
            idx += self._perm[self.pos : self.pos + take].tolist()
            self.pos += take
        return idx

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "n": self.n,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["n"], state["seed"]) != (self.n, self.seed):
            raise ValueError(
                f"resume: the checkpoint's data order was for {state['n']} samples with seed {state['seed']}, "
                f"this run has {self.n} samples with seed {self.seed}"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


def collate(processor: LVLMProcessor, samples: list[dict], indices: list[int], padding_side: str = "right"):
    return processor.batch([samples[i] for i in indices], padding_side=padding_side)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
