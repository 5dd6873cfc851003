"""Turns text with image placeholders plus images into model inputs (SPEC sections 1 and 4).

Each placeholder token expands into one position per vision feature. The output carries an
``image_mask`` marking those positions; the model derives routing modality from it (exact rule
by default, the official code's rule as an option) and from the attention mask.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from moiie.batch_checks import is_integer

IGNORE_INDEX = -100


_INT64 = (-(2**63), 2**63 - 1)


def _short(value: Any, item: type | tuple[type, ...] | None = None) -> str:
    """A short description of ``value``; with ``item``, also the type of its first element that is not one."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    if item is not None and isinstance(value, (list, tuple)):
        bad = [type(v).__name__ for v in value if not isinstance(v, item)]
        if bad:
            return f"a {type(value).__name__} holding {bad[0]}"
    return type(value).__name__


def token_list(value: Any, what: str) -> list[int]:
    """``value`` (a list of ints, or a 1-D integer tensor or array) as a list of Python ints."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        integer = value.dtype.kind in "iu" if isinstance(value, np.ndarray) else is_integer(value)
        if value.ndim != 1 or not integer:
            raise TypeError(f"{what} must be a 1-D integer tensor or a list of ints, got {_short(value)}")
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of int token ids, got {_short(value)}")
    if not all(type(t) is int for t in value):
        bad = [t for t in value if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if bad:
            raise TypeError(f"{what} must hold int token ids, found {bad[0]!r} ({type(bad[0]).__name__})")
        value = [int(t) for t in value]
    if value and (min(value) < _INT64[0] or max(value) > _INT64[1]):
        raise ValueError(f"{what} holds ids outside the int64 range")
    return list(value)


class LVLMProcessor:
    """tokenizer + image preprocessing + placeholder expansion + batching.

    tokenizer: an HF tokenizer that knows ``image_token`` as a single token.
    preprocess: callable turning a list of images into (N, C, H, W) pixels (a vision encoder's ``preprocess``).
    n_image_tokens: vision features per image (the encoder's ``n_tokens()``).
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocess: Callable[[list[Any]], torch.Tensor],
        n_image_tokens: int,
        *,
        image_token: str = "<image>",
        padding_side: Literal["left", "right"] = "right",
        max_length: int | None = None,
    ):
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.n_image_tokens = n_image_tokens
        self.image_token = image_token
        ids = tokenizer.convert_tokens_to_ids(image_token)
        if (
            ids is None
            or ids == tokenizer.unk_token_id
            or tokenizer.convert_ids_to_tokens(ids) != image_token
        ):
            raise ValueError(
                f"tokenizer has no single token for the image placeholder {image_token!r}; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})"
            )
        self.image_token_id = int(ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.padding_side, self.max_length = padding_side, max_length

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; each placeholder stays one id (expanded in :meth:`expand`)."""
        pieces = text.split(self.image_token)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids.append(self.image_token_id)
            if piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def expand(
        self, ids: Sequence[int], labels: Sequence[int] | None, n_images: int, *, where: str = "sample"
    ):
        """Expand each placeholder id into n_image_tokens positions. Returns (ids, labels, image_mask) lists."""
        ids = token_list(ids, f"{where}: input_ids")
        if labels is not None:
            labels = token_list(labels, f"{where}: labels")
        n_placeholders = sum(1 for t in ids if t == self.image_token_id)
        if n_placeholders != n_images:
            raise ValueError(
                f"{where}: {n_placeholders} image placeholder(s) {self.image_token!r} in the text but {n_images} image(s) given"
            )
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"{where}: labels has length {len(labels)} but input ids has {len(ids)}")
        out_ids, out_labels, mask = [], [], []
        for j, t in enumerate(ids):
            if t == self.image_token_id:
                out_ids += [t] * self.n_image_tokens
                out_labels += [IGNORE_INDEX] * self.n_image_tokens
                mask += [True] * self.n_image_tokens
            else:
                out_ids.append(t)
                out_labels.append(IGNORE_INDEX if labels is None else labels[j])
                mask.append(False)
        return out_ids, out_labels, mask

    def batch(
        self,
        samples: Sequence[dict[str, Any]],
        *,
        padding_side: Literal["left", "right"] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Collate samples ``{"input_ids": [...], "labels": [...] (optional), "images": [...]}``
        (or ``"pixel_values": (n_images, C, H, W)`` already preprocessed instead of ``images``).

        Returns input_ids, attention_mask, image_mask (B, L), labels (B, L) when any sample has
        labels, and pixel_values (N_images, C, H, W) in sample order when there are images.
        """
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)):
            raise TypeError(f"samples must be a list of dicts, got {type(samples).__name__}")
        rows, images, pixels = [], [], []
        for i, s in enumerate(samples):
            if not isinstance(s, dict) or "input_ids" not in s:
                raise TypeError(f"sample {i}: expected a dict with `input_ids`, got {_short(s)}")
            if s.get("pixel_values") is not None:  # already preprocessed: (n_images, C, H, W)
                pv = s["pixel_values"]
                if not isinstance(pv, torch.Tensor) or pv.dim() != 4 or not pv.is_floating_point():
                    raise ValueError(
                        f"sample {i}: pixel_values must be a float (n_images, C, H, W) tensor, got {_short(pv)}"
                    )
                if pixels and pv.shape[1:] != pixels[0].shape[1:]:
                    raise ValueError(
                        f"sample {i}: pixel_values has images of shape {tuple(pv.shape[1:])}, "
                        f"earlier samples {tuple(pixels[0].shape[1:])}"
                    )
                pixels.append(pv)
                n_images = pv.shape[0]
            else:
                imgs = s.get("images") or []
                if not isinstance(imgs, (list, tuple)):
                    raise TypeError(f"sample {i}: images must be a list of images, got {_short(imgs)}")
                images += imgs
                n_images = len(imgs)
            ids, labels, mask = self.expand(s["input_ids"], s.get("labels"), n_images, where=f"sample {i}")
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(
                    f"sample {i}: {len(ids)} tokens after image expansion exceed max_length={self.max_length}"
                )
            rows.append((ids, labels, mask))
        L = max((len(r[0]) for r in rows), default=0)
        B = len(rows)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros(B, L, dtype=torch.long)
        image_mask = torch.zeros(B, L, dtype=torch.bool)
        for b, (ids, lab, mask) in enumerate(rows):
            n = len(ids)
            sl = slice(L - n, L) if side == "left" else slice(0, n)
            input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
            labels[b, sl] = torch.tensor(lab, dtype=torch.long)
            attention[b, sl] = 1
            image_mask[b, sl] = torch.tensor(mask, dtype=torch.bool)
        out = {"input_ids": input_ids, "attention_mask": attention, "image_mask": image_mask}
        if any(s.get("labels") is not None for s in samples):
            out["labels"] = labels
        if images and pixels:
            raise ValueError(
                "samples: mix of preprocessed `pixel_values` and raw `images`; give one kind per batch"
            )
        if images:
            out["pixel_values"] = self.preprocess(images)
        elif pixels:
            out["pixel_values"] = torch.cat(pixels)
        return out

    def __call__(
        self,
        texts: str | Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        padding_side: Literal["left", "right"] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize texts with placeholders; ``images[i]`` are sample i's images, in placeholder order."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a list of str, got {_short(texts, str)}")
        if images is None:
            images = [[] for _ in texts]
        if not isinstance(images, (list, tuple)) or not all(isinstance(i, (list, tuple)) for i in images):
            raise TypeError(
                f"images must be a list holding one list of images per text, got {_short(images, (list, tuple))}"
            )
        if len(images) != len(texts):
            raise ValueError(f"images: got image lists for {len(images)} samples but {len(texts)} texts")
        samples = [{"input_ids": self.encode(t), "images": list(imgs)} for t, imgs in zip(texts, images)]
        return self.batch(samples, padding_side=padding_side)
