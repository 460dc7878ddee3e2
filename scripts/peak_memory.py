"""Two ways to measure the peak memory of a code region on a CPU, for the benchmarks.

- `tensor_peak`: peak bytes of live tensors (the profiler's allocation events) — what CUDA's
  ``max_memory_allocated`` counts on a GPU, and what the memory model (`scripts/memory_model.py`) predicts.
- `RSSPeak`: the process's resident set, sampled — what the machine pays, allocator caching included.
"""

from __future__ import annotations

import os
import threading


def tensor_peak(fn) -> int:
    """Peak bytes of live tensors while ``fn()`` runs, over those live before: CUDA's ``max_memory_allocated``
    minus its start, measured on any device from the profiler's allocation events summed in time order.
    Deterministic, unlike a CPU's resident set (allocator caching, other work on the machine)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


class RSSPeak:
    """Samples this process's resident set every 2 ms in a thread: the peak RSS of a code region on a CPU
    (ru_maxrss is a process-lifetime high-water mark, which model building would dominate)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.current()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> RSSPeak:
        self.base = self.current()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
