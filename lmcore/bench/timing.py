"""Timing for the GPU benchmarks: interleaved rounds, and CUDA-graph replays for short calls.

Two effects make a single timing of GPU code unreliable on a shared machine:

- **drift**: clocks, temperature and neighbours change over seconds, so implementations timed one
  after the other are compared under different conditions. :func:`rounds` times every
  implementation in turn, several times over and in a rotating order; each one's median is its
  time, the range over rounds its spread, and a ratio of two implementations can be taken round
  by round (:func:`ratio_spread`).
- **launch gaps**: when the host side of a call (Python, argument checks, the autotuner's
  lookup, the guards of a compiled function) takes longer than its kernels, the GPU waits, and
  events around the call time the host. :class:`Replay` captures the call as a CUDA graph when it
  can and times replays back to back: the GPU time of the kernels alone. A call that cannot be
  captured (one that reads a value back to the host, say) is timed as plain calls back to back,
  and says so (``mode``).
"""

from __future__ import annotations

import statistics
from typing import Callable


def rounds(timers: dict[str, Callable[[], float]], n: int) -> dict[str, list[float]]:
    """Call every timer ``n`` times, interleaved: round ``r`` starts at the ``r``-th name."""
    if n < 1:
        raise ValueError(f"rounds={n}; expected at least 1")
    names = list(timers)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(n):
        s = r % max(1, len(names))
        for name in names[s:] + names[:s]:
            out[name].append(float(timers[name]()))
    return out


def spread(times: list[float]) -> dict[str, float]:
    """Median, minimum and maximum of one implementation's times over the rounds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def ratio_spread(theirs: list[float], ours: list[float]) -> dict[str, float]:
    """``theirs / ours`` per round (above 1: ours is faster), as median, minimum and maximum."""
    if len(theirs) != len(ours) or not ours:
        raise ValueError(f"need paired rounds, got {len(theirs)} and {len(ours)} times")
    return spread([a / b for a, b in zip(theirs, ours)])


def _syncs(torch, fn) -> bool:
    """True when ``fn`` makes a synchronizing CUDA call (reads a value back, say).

    Checked before capturing, because a capture that fails part-way can leave the allocator
    routing later allocations into the abandoned graph's memory pool."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as err:
        if "synchroniz" in str(err):
            return True
        raise
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False


class Replay:
    """Times ``fn`` (already warmed up: compiled, autotuned) as CUDA-graph replays when possible.

    ``mode`` is ``"graph"`` when the capture worked, else ``"eager"`` (plain calls back to back,
    host time included where it exceeds the kernels'), with the capture error in ``error``.
    Each call of the object returns milliseconds per ``fn`` over about ``target_ms`` of work.
    """

    def __init__(self, fn: Callable[[], object], target_ms: float = 10.0, graph: bool = True):
        import torch

        self.torch, self.fn = torch, fn
        self.graph, self.mode, self.error = None, "eager", None
        if graph and not _syncs(torch, fn):  # a call that waits on the GPU cannot be captured
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # a warm-up on a side stream, as capture requires
                    fn()
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                torch.cuda.synchronize()
                g.replay()
                torch.cuda.synchronize()
                self.graph, self.mode = g, "graph"
            except Exception as err:  # noqa: BLE001 - any capture failure: fall back to plain calls
                self.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                torch.cuda.synchronize()
        elif graph:
            self.error = "the call synchronizes with the host"
        per_call = self._time(2)
        self.reps = int(min(500, max(1, target_ms / max(per_call, 1e-3))))

    def _time(self, n: int) -> float:
        cuda = self.torch.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        run = self.graph.replay if self.graph is not None else self.fn
        start.record()
        for _ in range(n):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    def __call__(self) -> float:
        return self._time(self.reps)

    def close(self) -> None:
        """Free the graph's memory pool."""
        self.graph = self.fn = None
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
