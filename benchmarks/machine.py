"""How busy the rest of the machine is while a benchmark runs (Linux: /proc/stat).

On a shared machine another job that takes a core for a few seconds stretches every method that
synchronises threads often far more than one that runs a few long kernels, so a round of timings
taken while something else ran says little. The benchmark measures the other processes' share of
the CPUs during each round and redoes rounds where it was too high.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")
_CPUS = os.cpu_count() or 1


def _busy_seconds() -> float:
    """CPU seconds spent on anything but idle/iowait since boot, over all CPUs (steal counts as busy)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICK


@dataclass
class Window:
    """What one timed stretch cost: wall seconds and the share of all CPUs used by other processes."""

    wall: float
    background: float


class LoadMeter:
    """``with meter: ...`` then ``meter.window``."""

    def __enter__(self) -> LoadMeter:
        self._wall, self._busy, self._own = time.perf_counter(), _busy_seconds(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        others = (_busy_seconds() - self._busy) - (time.process_time() - self._own)
        self.window = Window(wall, max(0.0, others) / (wall * _CPUS))


def background_now(seconds: float = 1.0) -> float:
    """Share of all CPUs other processes use over the next ``seconds`` (this process sleeps)."""
    with LoadMeter() as meter:
        time.sleep(seconds)
    return meter.window.background


def wait_until_idle(threshold: float, patience: float) -> float:
    """Sleep until other processes use less than ``threshold`` of the CPUs (at most ``patience`` s);
    returns the last reading."""
    deadline = time.monotonic() + patience
    load = background_now()
    while load > threshold and time.monotonic() < deadline:
        load = background_now(2.0)
    return load
