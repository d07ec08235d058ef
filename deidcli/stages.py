"""Per-stage wall-time accounting (decode, detect, track, align, identity, generate, blend, encode).

Stages may run in different threads at once, so their times can add up to more than the
wall time of the run: each figure is the time that stage kept one thread busy.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class Stages:
    def __init__(self) -> None:
        self._t: dict[str, float] = defaultdict(float)
        self._n: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self._t[name] += dt
                self._n[name] += 1

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._t[name] += seconds
            self._n[name] += 1

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 4) for k, v in self._t.items()}


#: A sink that measures nothing, used when the caller does not ask for timings.
class _Null(Stages):
    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        yield

    def add(self, name: str, seconds: float) -> None:
        pass


NULL = _Null()
