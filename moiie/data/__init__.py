"""Data: the digits visual question-answering task, a LLaVA-format loader, a task tokenizer and the
prompt template.

Samples from both sources expose ``id``, ``images`` and ``conversations`` (LLaVA turns), which is
all :func:`render` needs besides a tokenizer.
"""

from moiie.data.digits import (
    QUESTION_TYPES,
    DigitsSample,
    DigitsVQAConfig,
    build_digits_vqa,
    export_llava,
    load_digit_images,
)
from moiie.data.llava import LlavaDataError, LlavaSample, load_llava
from moiie.data.template import IGNORE_INDEX, IMAGE_TOKEN, TEMPLATE, image_token_id, render, render_prompt
from moiie.data.tokenizer import SPECIAL_TOKENS, digits_tokenizer, load_tokenizer, train_task_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "QUESTION_TYPES",
    "SPECIAL_TOKENS",
    "TEMPLATE",
    "DigitsSample",
    "DigitsVQAConfig",
    "LlavaDataError",
    "LlavaSample",
    "build_digits_vqa",
    "digits_tokenizer",
    "export_llava",
    "image_token_id",
    "load_digit_images",
    "load_llava",
    "load_tokenizer",
    "render",
    "render_prompt",
    "train_task_tokenizer",
]
