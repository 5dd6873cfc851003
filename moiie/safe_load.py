"""Loading weights and trainer state without executing code.

Weights are read from safetensors files (a header plus raw tensor bytes) or, for ``.pt``/``.bin``
files, with ``torch.load(weights_only=True)``, whose unpickler accepts only tensors and plain
data. A file that needs anything else (a pickled object whose loading could run code) is refused
with :class:`UnsafeCheckpointError`, which names the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A weights or state file holds pickled objects other than tensors and plain data."""


def _refusal(what: str, err: BaseException) -> UnsafeCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return UnsafeCheckpointError(
        f"{what}: refused to load: it holds something other than tensors and plain data (unpickling "
        "arbitrary objects could run code); save weights as safetensors or torch.save plain tensors"
        + (f" (it references {found[1]})" if found else "")
    )


@contextlib.contextmanager
def refusing_pickled_code(what: str) -> Iterator[None]:
    """Turn the unpickling error of a ``weights_only`` load inside the block into UnsafeCheckpointError."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise _refusal(what, err) from None


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """A ``torch.save``'d dict of tensors and plain data, loaded with ``weights_only=True``."""
    path = Path(path)
    with refusing_pickled_code(str(path)):
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except (RuntimeError, EOFError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a readable torch.save file: {err}") from None


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors from a ``.safetensors`` file, or from any other file with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return load_trainer_state(path)


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a file in any other format gets a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file's header; a file in any other format gets a ValueError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
