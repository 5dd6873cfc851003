"""Grouped matmuls over rows sorted by expert.

Rows arrive sorted by expert, ``counts[e]`` rows for expert e, and weights are stacked in the
``nn.Linear`` layout ``(num_experts, d_out, d_in)``. Rows past ``counts.sum()`` belong to no expert
(the dispatch keeps a static ``tokens * slots`` layout and sorts empty slots last): they cost no
arithmetic and the callers zero their outputs. Two engines run the products:

- ``grouped_mm``: ``torch.nn.functional.grouped_mm``, one kernel for all experts on CUDA, with the
  expert boundaries kept on the device (no host synchronisation). All rows form one block.
- ``loop``: one BLAS call per non-empty expert, written straight into that expert's rows of one
  output buffer. Each expert's rows form a block, so callers can finish the element-wise work of
  one expert while its rows are still in cache, with temporaries the size of one expert's rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

GroupedImpl = Literal["auto", "grouped_mm", "loop"]

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(t: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls should run in: the autocast dtype inside an autocast region, else the weights'."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return param_dtype


def resolve_impl(impl: GroupedImpl, x: torch.Tensor, *widths: int) -> str:
    """The engine to run. `auto` takes grouped_mm on CUDA and the loop elsewhere: on CPU grouped_mm is
    itself a loop of the same BLAS calls, plus an output allocation per call. grouped_mm falls back to
    the loop for what its kernel lacks: other dtypes (float64) and rows whose byte length is not a
    multiple of 16."""
    if impl == "auto":
        impl = "grouped_mm" if x.device.type == "cuda" else "loop"
    if impl == "grouped_mm" and (
        not hasattr(F, "grouped_mm")
        or x.dtype not in _GROUPED_MM_DTYPES
        or any(w * x.element_size() % 16 for w in widths)
    ):
        return "loop"
    return impl


class Workspace(threading.local):
    """Per-thread CPU buffers for temporaries that never outlive one operator call.

    glibc serves blocks above its mmap threshold (at most 32 MiB by default) with fresh pages and
    unmaps them on free, so every call would page-fault its temporaries back in, which costs 5-10% of
    a training step on a 2-core CPU. Each slot keeps its largest buffer until :meth:`release`. CUDA's
    caching allocator already reuses memory, so other devices get fresh tensors.
    """

    def __init__(self):
        self.buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def take(self, slot: int, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised (rows, cols) tensor of like's dtype; on CPU the memory of this slot."""
        if like.device.type != "cpu":
            return like.new_empty(rows, cols)
        key, size = (slot, like.dtype), rows * cols
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[key] = like.new_empty(size)
        return buffer[:size].view(rows, cols)

    def release(self) -> None:
        """Free this thread's buffers."""
        self.buffers.clear()


WORKSPACE = Workspace()


ROW_CHUNK = 256
"""Rows per matmul call for reduced-precision dtypes on CPU (see :func:`_row_chunks`)."""


def _row_chunks(x: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges for the matmuls of one expert's rows.

    On CPU, oneDNN's bf16/fp16 (AMX) GEMMs run some row counts up to 1.7x slower per row than their
    neighbours (1363 rows: 13.4 ms, 1362: 9.0 ms for a 1024 -> 2816 product), so rows of those
    dtypes go in chunks of :data:`ROW_CHUNK`, which measured ~9% faster over a sweep of row counts.
    float32 GEMMs lose 3-16% when chunked, so they take all rows at once. Weight gradients are never
    chunked (that would re-read and re-write the gradient once per chunk)."""
    n = x.shape[0]
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or n <= ROW_CHUNK:
        return [(0, n)]
    return [(a, min(a + ROW_CHUNK, n)) for a in range(0, n, ROW_CHUNK)]


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of one expert (expert None: all rows, every expert)."""

    expert: int | None
    start: int
    stop: int

    def of(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[self.start : self.stop]


class ExpertRows:
    """One expert-sorted row layout and the products of a grouped linear layer over it, per block.

    counts: (E,) int64 rows per expert; rows: total rows N >= counts.sum(). The loop engine reads
    counts on the host once per layout; grouped_mm keeps them on the device. Block methods take the block's rows (``block.of(t)``).
    Outputs go into ``out`` for the loop engine (a view of a buffer from :meth:`new`); the grouped_mm
    engine's single block returns fresh tensors and takes ``out=None``.
    """

    def __init__(self, impl: str, counts: torch.Tensor, rows: int):
        self.counts, self.rows, self.num_experts = counts, rows, counts.numel()
        self.grouped = impl == "grouped_mm"
        if self.grouped:
            self.offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            self.blocks, self.routed = [Block(None, 0, rows)], None  # expert boundaries stay on the device
            return
        self.blocks, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                self.blocks.append(Block(e, start, start + n))
            start += n
        self.routed = start

    def new(self, like: torch.Tensor, cols: int) -> torch.Tensor | None:
        """The (rows, cols) buffer loop blocks write into; None for grouped_mm (its block returns one)."""
        return None if self.grouped else like.new_empty(self.rows, cols)

    def new_weight_grad(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A gradient buffer of ``shape`` = (E, ...) in like's dtype; experts without rows hold zeros."""
        out = like.new_empty(shape)
        if not self.grouped and len(self.blocks) < self.num_experts:
            out.zero_()
        return out

    def zero_tail(self, t: torch.Tensor) -> torch.Tensor:
        """Zero the rows of t (rows x ...) past counts.sum(), in place."""
        if self.routed is not None:
            t[self.routed :].zero_()
        elif self.num_experts == 0:
            t.zero_()
        else:
            tail = torch.arange(self.rows, device=t.device) >= self.offsets[-1]
            t.masked_fill_(tail[:, None], 0)
        return t

    def _row_expert(self) -> torch.Tensor:
        """(rows,) expert of each row, num_experts past counts.sum() (grouped_mm engine)."""
        rows = torch.arange(self.rows, device=self.counts.device, dtype=torch.int32)
        return torch.searchsorted(self.offsets, rows, right=True)

    def linear(self, block: Block, x, w, bias=None, out=None) -> torch.Tensor:
        """x @ w[e].T (+ bias[e]) for the block's rows. x: (n, d_in), w: (E, d_out, d_in) -> (n, d_out)."""
        if self.grouped:
            y = F.grouped_mm(x, w.transpose(-2, -1), offs=self.offsets)
            if bias is not None:
                y += torch.cat([bias, bias.new_zeros(1, bias.shape[1])])[self._row_expert()]
            return y
        wt = w[block.expert].t()
        for a, b in _row_chunks(x):
            if bias is None:
                torch.mm(x[a:b], wt, out=out[a:b])
            else:
                torch.addmm(bias[block.expert], x[a:b], wt, out=out[a:b])
        return out

    def linear_input_grad(self, block: Block, dy, w, out=None, *, accumulate: bool = False) -> torch.Tensor:
        """dy @ w[e] for the block's rows, added to out when accumulating. dy: (n, d_out) -> (n, d_in)."""
        if self.grouped:
            dx = F.grouped_mm(dy, w, offs=self.offsets)
            return out.add_(dx) if accumulate else dx
        we = w[block.expert]
        for a, b in _row_chunks(dy):
            if accumulate:
                out[a:b].addmm_(dy[a:b], we)
            else:
                torch.mm(dy[a:b], we, out=out[a:b])
        return out

    def linear_weight_grad(self, block: Block, dy, x, out: torch.Tensor) -> None:
        """out[e] = dy.T @ x over the block's rows (every expert at once for grouped_mm)."""
        if self.grouped:
            out.copy_(F.grouped_mm(dy.t(), x, offs=self.offsets))
        else:
            torch.mm(dy.t(), x, out=out[block.expert])

    def bias_grad(self, block: Block, dy, out: torch.Tensor) -> None:
        """out[e] = sum of dy over the block's rows (every expert at once for grouped_mm)."""
        if self.grouped:
            sums = dy.new_zeros(self.num_experts + 1, dy.shape[1]).index_add_(0, self._row_expert(), dy)
            out.copy_(sums[: self.num_experts])
        else:
            torch.sum(dy, dim=0, out=out[block.expert])


class GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T (+ b[e]), zero past counts.sum(); one autograd node."""

    @staticmethod
    def forward(ctx, x, w, b, rows: ExpertRows):
        ctx.rows = rows
        ctx.save_for_backward(x, w)
        y = rows.new(x, w.shape[1])
        for block in rows.blocks:
            yb = rows.linear(block, block.of(x), w, b, out=block.of(y))
        return rows.zero_tail(yb if y is None else y)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        rows = ctx.rows
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = dy.contiguous()  # grouped_mm rejects stride-0 gradients such as the one .sum() sends
        dx = rows.new(x, x.shape[1]) if need_x else None
        dw = rows.new_weight_grad(w, w.shape) if need_w else None
        db = rows.new_weight_grad(w, w.shape[:2]) if need_b else None
        for block in rows.blocks:
            dyb = block.of(dy)
            if need_x:
                dxb = rows.linear_input_grad(block, dyb, w, out=block.of(dx))
            if need_w:
                rows.linear_weight_grad(block, dyb, block.of(x), dw)
            if need_b:
                rows.bias_grad(block, dyb, db)
        if need_x:
            dx = rows.zero_tail(dxb if dx is None else dx)
        return dx, dw, db, None
