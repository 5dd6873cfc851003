"""Atomic checkpoints: written into a hidden temp folder, completed by a marker, then renamed into place.

A folder counts as a checkpoint only if its name is ``ckpt-<stage>-<step>`` and it holds the
``COMPLETE`` marker, which is written last; a crash at any moment leaves at most a temp folder,
which is never mistaken for a checkpoint and is cleaned up by the next write. Old checkpoints are
renamed to a temp name before they are deleted, so a crash mid-delete leaves no partial checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from moiie.safe_load import load_trainer_state

MARKER = "COMPLETE"
STATE_NAME = "trainer_state.pt"
_NAME = re.compile(r"^ckpt-(?P<stage>\d)-(?P<step>\d{7})$")


def checkpoint_name(stage: int, step: int) -> str:
    return f"ckpt-{stage}-{step:07d}"


def write_checkpoint(root: Path, stage: int, step: int, model, state: dict[str, Any], keep: int = 2) -> Path:
    """Save ``model`` (safetensors) and the trainer ``state`` (tensors and plain data) atomically."""
    tmp = begin_checkpoint(root)
    model.save_pretrained(tmp)
    write_torch(tmp / STATE_NAME, state)
    return finish_checkpoint(root, tmp, stage, step, keep)


def begin_checkpoint(root: Path) -> Path:
    """A fresh hidden temp folder under ``root`` to write a checkpoint's files into (stale ones removed)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-ckpt-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=".tmp-ckpt-"))


def write_torch(path: Path, data: Any) -> None:
    """``torch.save`` flushed to disk (tensors and plain data only, so it loads with ``weights_only``)."""
    with open(path, "wb") as f:
        torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())


def finish_checkpoint(root: Path, tmp: Path, stage: int, step: int, keep: int = 2) -> Path:
    """Mark ``tmp`` complete, rename it to ``ckpt-<stage>-<step>`` and drop all but the ``keep`` newest."""
    with open(tmp / MARKER, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    final = root / checkpoint_name(stage, step)
    if final.exists():
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        _discard(old)
    return final


def _discard(folder: Path) -> None:
    """Delete a checkpoint: first renamed out of the checkpoint names (atomic), then removed."""
    trash = folder.with_name(f".tmp-ckpt-old-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(folder: Path) -> dict[str, Any]:
    """The trainer state, loaded without executing code (``weights_only=True``)."""
    return load_trainer_state(folder / STATE_NAME)


def stage_step(folder: Path) -> tuple[int, int]:
    m = _NAME.match(folder.name)
    if m is None:
        raise ValueError(f"{folder} is not a checkpoint folder (expected ckpt-<stage>-<step>)")
    return int(m["stage"]), int(m["step"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
