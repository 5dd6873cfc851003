"""Loader for LLaVA-style instruction data: a JSON list or JSONL file of conversations with images.

A record::

    {"id": "0001", "image": "images/a.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

``image`` is one path, a list of paths (one ``<image>`` placeholder per path, in order), or absent
for a text-only record. Relative paths resolve against ``image_folder`` (default: the data file's
folder). Other keys are kept in :attr:`LlavaSample.meta`.

Everything is checked while loading, and every error names the data file and the record: the
line number (1-based) in a JSONL file, the record index (0-based) in a JSON list. Images are
checked to exist at load time; their pixels are read when first asked for (``eager=False``,
the default, so large data sets load quickly) or all at load time (``eager=True``, which also
catches unreadable images up front).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moiie.data.template import IMAGE_TOKEN, conversation_error, count_images


class LlavaDataError(ValueError):
    """A LLaVA data file is malformed; the message names the file and the line or record."""

    def __init__(self, path: Path, message: str, *, line: int | None = None, record: int | None = None):
        self.path = path
        self.line = line
        self.record = record
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if record is not None:
            where += f", record {record} (0-based)"
        super().__init__(f"{where}: {message}")


@dataclass(eq=False)
class LlavaSample:
    """One record: its images (as paths, read on demand) and its conversation."""

    id: str
    """The record's ``id`` (``"{file name}:{line or record}"`` when it has none)."""
    image_paths: list[Path]
    """Absolute paths, in placeholder order; empty for a text-only record."""
    conversations: list[dict[str, str]]
    """Turns ``{"from": "human" | "gpt", "value": str}``, alternating, human first, gpt last."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The record's other keys."""
    source: Path | None = None
    """The data file the record came from."""
    line: int | None = None
    """1-based line of the record in a JSONL file."""
    record: int | None = None
    """0-based index of the record in a JSON list."""
    _images: list[Any] | None = field(default=None, init=False, repr=False)

    @property
    def images(self) -> list[Any]:
        """The images as PIL images in the file's mode (digits PNGs are "L", 8-bit grayscale)."""
        if self._images is not None:
            return self._images
        return [self._open(p) for p in self.image_paths]

    def load_images(self) -> None:
        """Read the images now and keep them in memory."""
        self._images = [self._open(p) for p in self.image_paths]

    def _open(self, image_path: Path) -> Any:
        from PIL import Image

        try:
            with Image.open(image_path) as image:
                image.load()
                return image.copy()
        except OSError as err:  # PIL's UnidentifiedImageError is one
            raise LlavaDataError(
                self.source or Path("<memory>"),
                f"cannot read image {image_path}: {err}",
                line=self.line,
                record=self.record,
            ) from None


def load_llava(
    path: str | Path, image_folder: str | Path | None = None, *, eager: bool = False
) -> list[LlavaSample]:
    """Read a ``.json`` (a list of records) or ``.jsonl`` (one record per line) LLaVA data file.

    Other suffixes are read as JSON when the text starts with ``[``, else as JSONL. Raises
    :class:`LlavaDataError` naming the file and line/record on any malformed record or missing
    image. ``eager`` reads all images at load time (see the module docstring).
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    text = path.read_text(encoding="utf-8")
    as_list = path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("["))
    samples = [
        _sample(data, folder, path, **location)
        for data, location in (_json_records(text, path) if as_list else _jsonl_records(text, path))
    ]
    if not samples:
        raise LlavaDataError(path, "no records")
    if eager:
        for s in samples:
            s.load_images()
    return samples


def _json_records(text: str, path: Path) -> list[tuple[Any, dict[str, int]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlavaDataError(path, f"not valid JSON: {err.msg}", line=err.lineno) from None
    if not isinstance(data, list):
        raise LlavaDataError(
            path, f"expected a JSON list of records (or a .jsonl file), got a {type(data).__name__}"
        )
    return [(record, {"record": i}) for i, record in enumerate(data)]


def _jsonl_records(text: str, path: Path) -> list[tuple[Any, dict[str, int]]]:
    records = []
    # split on "\n" only: str.splitlines also splits on characters JSON strings may hold raw (U+2028)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), {"line": number}))
        except json.JSONDecodeError as err:
            raise LlavaDataError(path, f"not valid JSON: {err.msg}", line=number) from None
    return records


def _sample(data: Any, folder: Path, path: Path, **location: int) -> LlavaSample:
    def fail(message: str) -> LlavaDataError:
        return LlavaDataError(path, message, **location)

    if not isinstance(data, dict):
        raise fail(f"expected an object with 'conversations', got a {type(data).__name__}")
    conversations = data.get("conversations")
    problem = conversation_error(conversations, ends_with_answer=True)
    if problem is not None:
        raise fail(problem)
    names = data.get("image")
    if names is None:
        names = []
    elif isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise fail(f"'image' must be a path or a list of paths, got {data.get('image')!r:.80}")
    placeholders = count_images(conversations)
    if placeholders != len(names):
        raise fail(
            f"the human turns hold {placeholders} {IMAGE_TOKEN} placeholder(s) but 'image' lists "
            f"{len(names)} image(s); expected one placeholder per image"
        )
    image_paths = []
    for name in names:
        image_path = Path(name) if Path(name).is_absolute() else folder / name
        if not image_path.is_file():
            raise fail(f"image file not found: {name!r} (looked for {image_path})")
        image_paths.append(image_path.resolve())
    ident = data.get("id")
    if ident is None:
        ident = f"{path.name}:{next(iter(location.values()))}"
    meta = {k: v for k, v in data.items() if k not in ("id", "image", "conversations")}
    return LlavaSample(str(ident), image_paths, conversations, meta, path, **location)
