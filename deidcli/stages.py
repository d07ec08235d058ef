"""Per-stage wall-time accounting (decode, detect, track, align, identity, generate, blend, encode).

Stages may run in different threads at once, so their times can add up to more than the
wall time of the run: each figure is the time that stage kept one thread busy.

Also the threads a heavy CPU stage may use (stage_threads) and the ONNX Runtime session options
the detector and the identity embedder share (ort_session_options).
"""

from __future__ import annotations

import os
import queue
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


#: Frames each inter-thread queue holds (decoded frames wait here: keep it small).
QUEUE_FRAMES = 8


def timed(it: Iterator, stages: Stages, name: str) -> Iterator:
    """Yield from ``it``, adding the time spent producing each item to ``stages[name]``."""
    it = iter(it)
    while True:
        with stages(name):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


_DONE = object()


def prefetch(it: Iterator, maxsize: int, name: str) -> Iterator:
    """Run ``it`` in a daemon thread, ``maxsize`` items ahead of the consumer.

    Exceptions (and the end) of ``it`` are re-raised in the consumer; if the consumer stops
    early (an error downstream, Ctrl-C), the producer is told to stop and its iterator is closed.
    The consumer waits in short slices so KeyboardInterrupt is delivered promptly.
    """
    q: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def produce():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            else:
                q.put((_DONE, None))
        except BaseException as e:  # forwarded to the consumer
            q.put((_DONE, e))
        finally:
            if stop.is_set() and hasattr(it, "close"):
                try:
                    it.close()
                except Exception:
                    pass

    th = threading.Thread(target=produce, name=name, daemon=True)
    th.start()
    try:
        while True:
            try:
                item, err = q.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        # unblock a producer waiting on a full queue, then let it wind down
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)


def ort_session_options():
    """ONNX Runtime options for a session that shares the CPU with the other pipeline stages
    (decoder, generator, encoder run in their own threads at the same time): half the cores
    (stage_threads) and worker threads that sleep instead of spinning while they wait.
    On 2 cores this took `--method generate` on a 720p two-person clip from 12.0 to 15.1 frames/s."""
    import onnxruntime

    from .stages import stage_threads

    so = onnxruntime.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = stage_threads("DEID_ORT_THREADS")
    return so


#: Detector.zoom_score: the zoomed look's input side (px) and the face's height in it.


def stage_threads(env: str) -> int:
    """Intra-op threads for one heavy CPU stage (detector, generator): half the cores, at least
    one, since decoding, detection, generation and encoding run concurrently in their own
    threads. The environment variable ``env`` overrides it."""
    n = os.environ.get(env)
    if n:
        return max(1, int(n))
    return max(1, (os.cpu_count() or 2) // 2)
