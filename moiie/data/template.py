"""The prompt template used for training and evaluation, and the conversation format it reads.

A conversation is LLaVA's list of turns ``[{"from": "human", "value": ...}, {"from": "gpt",
"value": ...}, ...]``: turns alternate, starting with ``human``. One question/answer exchange
renders as::

    <bos>user: {question}\\nassistant: {answer}<eos>

and further exchanges follow directly after the ``<eos>`` (``...<eos>user: ...``). The role
markers are plain text, so any HF tokenizer works as long as ``<image>`` is a single token in it
(GPT-2 style tokenizers without a distinct bos token are fine: ``<bos>`` stands for the
tokenizer's ``bos_token`` and is left out when it has none; ``<eos>`` is its ``eos_token``).

Each piece is encoded on its own and the ids concatenated: the prompt piece
``"user: {question}\\nassistant:"`` and the answer piece ``" {answer}"``. Generation therefore
starts from exactly the ids that preceded the answer in training. ``<image>`` stays one id in the
output; a later processor expands it into the vision tokens (SPEC section 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
"""Label of positions the loss skips (PyTorch's cross-entropy default ``ignore_index``)."""
IMAGE_TOKEN = "<image>"
"""Placeholder of one image in a human turn."""
HUMAN, GPT = "human", "gpt"
"""LLaVA's role names."""
USER_PREFIX = "user: "
ASSISTANT_PREFIX = "\nassistant:"
TEMPLATE = "<bos>" + USER_PREFIX + "{question}" + ASSISTANT_PREFIX + " {answer}<eos>"
"""One exchange as text (for documentation and display; :func:`render` produces the ids)."""

Conversation = Sequence[dict[str, Any]]


def conversation_error(conversations: Any, *, ends_with_answer: bool = True) -> str | None:
    """Why ``conversations`` is not a valid conversation, or None when it is.

    Valid: a non-empty list of ``{"from", "value"}`` turns alternating human/gpt from a human turn;
    ending with a gpt turn when ``ends_with_answer`` (training data), with a human turn otherwise (a
    prompt). ``<image>`` may appear in human turns only.
    """
    if not isinstance(conversations, list) or not conversations:
        return "expected 'conversations': a non-empty list of {'from': ..., 'value': ...} turns"
    for i, turn in enumerate(conversations):
        expected = HUMAN if i % 2 == 0 else GPT
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {i}: expected an object with 'from' and a string 'value', got {turn!r:.80}"
        if turn.get("from") != expected:
            return (
                f"turn {i}: expected from={expected!r} (turns alternate {HUMAN!r}, {GPT!r}, ... starting "
                f"with {HUMAN!r}), got from={turn.get('from')!r}"
            )
        if expected == GPT and IMAGE_TOKEN in turn["value"]:
            return f"turn {i}: {IMAGE_TOKEN} may appear in {HUMAN!r} turns only"
    last = conversations[-1]["from"]
    if ends_with_answer and last != GPT:
        return f"the last turn is from {last!r}; every {HUMAN!r} turn needs a {GPT!r} answer after it"
    if not ends_with_answer and last != HUMAN:
        return f"a prompt must end with a {HUMAN!r} turn (the question to answer), got {last!r}"
    return None


def count_images(conversations: Conversation) -> int:
    """Number of ``<image>`` placeholders in the human turns."""
    return sum(t["value"].count(IMAGE_TOKEN) for t in conversations if t.get("from") == HUMAN)


def image_token_id(tokenizer: Any) -> int:
    """The id of ``<image>``; raises ValueError when the tokenizer splits it into several tokens."""
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the tokenizer encodes {IMAGE_TOKEN} as {len(ids)} tokens, it must be one; add it with "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': [{IMAGE_TOKEN!r}]}}) and resize "
            "the model's embeddings"
        )
    return ids[0]


def conversation_text(conversations: Conversation) -> str:
    """The template's text without bos/eos, e.g. to train a tokenizer on what :func:`render` encodes."""
    parts = []
    for i in range(0, len(conversations), 2):
        parts.append(USER_PREFIX + conversations[i]["value"] + ASSISTANT_PREFIX)
        if i + 1 < len(conversations):
            parts.append(_answer_text(conversations[i + 1]["value"]))
    return "".join(parts)


def render(conversations: Conversation, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation, and labels that keep only the answers.

    Returns ``(input_ids, labels)``, equally long; ``labels`` is :data:`IGNORE_INDEX` everywhere
    except on each answer's tokens and the eos after it, where it equals ``input_ids``.
    """
    return _render(conversations, tokenizer, ends_with_answer=True)


def render_prompt(conversations: Conversation, tokenizer: Any) -> list[int]:
    """Token ids up to where the last question's answer starts, for generation.

    ``conversations`` ends with the human turn to answer (earlier exchanges, answers included, may
    precede it). The result is a prefix of :func:`render`'s ``input_ids`` for the same conversation
    with the answer appended.
    """
    return _render(conversations, tokenizer, ends_with_answer=False)[0]


def _answer_text(answer: str) -> str:
    # The space belongs to the answer piece: byte-level BPE tokenizers (GPT-2 style) keep a word's
    # leading space in the word's token, so " 7" is one token there.
    return " " + answer.strip()


def _render(
    conversations: Conversation, tokenizer: Any, *, ends_with_answer: bool
) -> tuple[list[int], list[int]]:
    problem = conversation_error(list(conversations), ends_with_answer=ends_with_answer)
    if problem is not None:
        raise ValueError(f"invalid conversation: {problem}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; the template ends every answer with it")
    image_id = image_token_id(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for i in range(0, len(conversations), 2):
        prompt = encode(USER_PREFIX + conversations[i]["value"] + ASSISTANT_PREFIX)
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        if i + 1 < len(conversations):
            answer = [*encode(_answer_text(conversations[i + 1]["value"])), eos]
            ids += answer
            labels += answer
    expected = count_images(conversations)
    if ids.count(image_id) != expected:
        raise ValueError(
            f"the conversation has {expected} {IMAGE_TOKEN} placeholders but its ids hold "
            f"{ids.count(image_id)} {IMAGE_TOKEN} tokens (does the tokenizer merge it with neighbours?)"
        )
    return ids, labels
