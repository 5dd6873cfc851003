"""A small tokenizer trained offline on a task's own text, wrapped as an HF fast tokenizer.

Byte-level BPE (GPT-2's pre-tokenization): any text encodes and decodes back exactly, nothing is
ever unknown, and on a small task vocabulary every frequent word ends up as one token. Special
tokens take the first ids, in this order: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3,
``<image>`` 4 (``<unk>`` exists for tools that expect one; byte-level BPE never emits it). The
chat template's role markers are plain text (:mod:`moiie.data.template`). ``encode`` adds no
special tokens by itself; the template places ``<bos>`` and ``<eos>``.

Training is deterministic: the same texts and settings give the same vocabulary and merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moiie.data.template import IMAGE_TOKEN, conversation_text

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)
"""Special tokens, in id order."""
_DIGITS_SETTINGS = {"vocab_size": 1000, "min_frequency": 1}


def train_task_tokenizer(texts: Iterable[str], *, vocab_size: int = 1000, min_frequency: int = 1) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``vocab_size`` caps the vocabulary (special tokens and the 256 byte tokens included); a small
    corpus may run out of merges first, giving a smaller one. ``min_frequency`` is how often a pair
    must occur to be merged. Include the template's text (``conversation_text``) so role markers
    become whole tokens. Special tokens inside ``texts`` (e.g. ``<image>``) are cut out before
    training, as encoding cuts them out before applying merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if vocab_size < len(SPECIAL_TOKENS) + len(byte_level.alphabet()):
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_without_specials(texts), trainer)
    return _wrap(tokenizer)


def digits_tokenizer(cache_dir: str | Path | None = None) -> Any:
    """The tokenizer of the digits task (:mod:`moiie.data.digits`), trained on every question and
    answer it can produce, rendered through the template.

    With ``cache_dir`` the tokenizer is saved there (``save_pretrained``) under a name that
    fingerprints its training text and settings, and loaded from there next time.
    """
    from moiie.data.digits import all_question_answers
    from moiie.data.template import GPT, HUMAN

    texts = [
        conversation_text([{"from": HUMAN, "value": q}, {"from": GPT, "value": a}])
        for q, a in all_question_answers()
    ]
    if cache_dir is None:
        return train_task_tokenizer(texts, **_DIGITS_SETTINGS)
    import tokenizers

    settings = {"texts": texts, **_DIGITS_SETTINGS, "tokenizers": tokenizers.__version__}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"digits-tokenizer-{digest}"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
        train_task_tokenizer(texts, **_DIGITS_SETTINGS).save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process cached it first
            shutil.rmtree(staging, ignore_errors=True)
    return load_tokenizer(folder)


def load_tokenizer(folder: str | Path) -> Any:
    """Load a tokenizer saved with ``save_pretrained`` (offline, no hub access)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def _without_specials(texts: Iterable[str]) -> list[str]:
    pieces = list(texts)
    for special in SPECIAL_TOKENS:
        pieces = [part for text in pieces for part in text.split(special)]
    return [p for p in pieces if p]


def _wrap(tokenizer: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # transformers 5 reads this under its new name `extra_special_tokens`; 4.x under this one
        additional_special_tokens=[IMAGE_TOKEN],
    )
