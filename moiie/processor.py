"""Turns text with image placeholders plus images into model inputs (SPEC sections 1 and 4).

Each placeholder token expands into one position per vision feature. The output carries an
``image_mask`` marking those positions; the model derives routing modality from it (exact rule
by default, the official code's rule as an option) and from the attention mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

IGNORE_INDEX = -100


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
        rows, images, pixels = [], [], []
        for i, s in enumerate(samples):
            if s.get("pixel_values") is not None:  # already preprocessed: (n_images, C, H, W)
                pixels.append(s["pixel_values"])
                n_images = s["pixel_values"].shape[0]
            else:
                imgs = list(s.get("images") or [])
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
        if images is None:
            images = [[] for _ in texts]
        if len(images) != len(texts):
            raise ValueError(f"images: got image lists for {len(images)} samples but {len(texts)} texts")
        samples = [{"input_ids": self.encode(t), "images": list(imgs)} for t, imgs in zip(texts, images)]
        return self.batch(samples, padding_side=padding_side)
