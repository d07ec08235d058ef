"""deid live: anonymize a camera or a stream as it happens, ``live(src, dst, options, live_options)``.

Threads: the reader (media.live_io.LiveSource.run) decodes each frame and stamps it with its
arrival; a :class:`FrameGate` hands frames to the detector of Pipeline.process_frames (detection
and tracking in one thread, the generator in another, the identity check and pasting in the
calling thread, which then encodes and writes: media.live_io.LiveSink).

Fail closed, bounded latency (``LiveOptions.max_latency``, the budget):

* A frame leaves deid only through the pipeline, its faces anonymized. Nothing else writes video.
* The gate drops, before any processing, a frame that is already too old to make it through the
  pipeline within the budget (its age plus the recent time from the detector to the output).
* A frame whose faces could not be generated in time (its age plus the recent time from the
  generator to the output exceeds the budget) gets the fallback (``--fallback``, blur) on its
  tracked faces instead: it is *covered*, and counted. The first frame generated after covered ones
  is a probe: the frames behind it are covered until it is out, and while probes leave late the
  generator is tried less often (``MAX_BACKOFF``, :meth:`_State.cover`).
* A frame that would still leave past the budget (its age plus the recent time to encode and
  write one) is dropped at the output (*late*).
* The tracker's lookahead (``--max-gap``, ``reach_back``, ``pad``: frames held back to fill
  detector misses, reach back over weak detections, pad small faces) is cut to a third of the
  budget at the source's frame rate (:func:`live_track_options`). To keep the coverage that costs,
  a track that ends keeps its last box (grown by :data:`HOLD_GROW`) covered with the fallback for
  the ``--max-gap`` frames a file run would have filled (*held over*), and a weak detection
  (``--keep-thresh`` to ``--det-thresh``) that no track holds is covered at once (*weak*).

Stopping: the first SIGINT/SIGTERM stops reading; the frames in flight finish, the output is
finalized (a file renamed into place, a stream closed cleanly), the report written, and
:class:`~deidcli.errors.Interrupted` raised (exit 130/143). A second signal stops at once (the
output is still finalized when it can be). A camera or network source that stops or disconnects
ends the session with :class:`~deidcli.errors.SourceLost` (exit 4) after the output is finalized.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import DeidError, InputError, Interrupted, OutputError, SourceLost
from ..options import AnonymizeOptions, EncodeOptions, LiveOptions, TrackOptions
from ..stages import NULL, Stages
from .pipeline import Pipeline
from .report import FileResult

log = logging.getLogger(__name__)

#: deid live's encoder defaults: x264 veryfast (with tune zerolatency, media/live_io.py) keeps up
#: with 720p30 on one core; crf 23 (x264's default) suits a stream's bitrate.
LIVE_ENCODE = EncodeOptions(crf=23, preset="veryfast")
#: Share of the budget the tracker's lookahead may hold frames back for.
TRACK_SHARE = 1 / 3
#: Frames detection may run ahead of rendering, and frames per generator batch (latency first).
QUEUE_FRAMES = 1
BATCH_FRAMES = 1
#: The gate lets a frame wait for the detector at most this many frame intervals (and never
#: longer than the budget leaves after the recent detector-to-output time): enough to absorb a
#: hiccup, and when deid is slower than the source it works on the freshest frames (latency is
#: then the processing time, not the budget) rather than on the oldest ones still allowed.
MAX_WAIT_FRAMES = 2
#: ... and at least this share of the budget when the recent time to the output takes it all.
MIN_WAIT_SHARE = 0.1
#: Smoothing of the recent times (exponential moving average weight of the newest frame).
EMA = 0.1
#: After a covered batch the generator-to-output estimate shrinks by this factor, so that
#: generation is tried again once the pipeline has caught up.
COVER_DECAY = 0.8
#: ... by its ``backoff``-th root instead while generated frames keep leaving late: each generated
#: frame that leaves (or is dropped) late doubles ``backoff`` up to this, each one on time resets it
#: to 1. The first batch generated after covered ones is a probe: until it is out, the batches
#: behind it are covered too. A crowd this machine cannot generate within the budget then comes
#: out covered, with one probe now and then, where before, every 4th frame and the ones behind it
#: were generated and held up the rest until nearly all were dropped (a 12 s crowd of 15-20 faces
#: on 2 cores: 7 of 360 frames out; docs/live.md).
MAX_BACKOFF = 16
#: A held-over box (a track that ended) is grown by this share of its size on each side.
HOLD_GROW = 0.25
#: Seconds between progress lines (INFO, -v).
PROGRESS_EVERY = 10.0


def live_track_options(track: TrackOptions, fps: float, budget: float, detect_every: int = 1) -> TrackOptions:
    """The tracker of a live session: the frames it may hold back (``max_gap`` when a face is
    missed, ``reach_back`` for weak detections, ``pad`` always) cut to :data:`TRACK_SHARE` of the
    budget at ``fps``: ``pad`` gets what is left after 2 frames of gap, the gap at least 1 frame
    (and enough for ``--detect-every``)."""
    frames = int(budget * fps * TRACK_SHARE)
    pad = min(track.pad, max(frames - 2, 0))
    gap = max(1, detect_every - 1, min(track.max_gap, frames - pad))
    return replace(track, max_gap=gap, reach_back=min(track.reach_back, gap), pad=pad)


class _State:
    """What the gate, the generator thread and the writer share (one session)."""

    def __init__(self, budget: float):
        self.budget = budget
        self.to_output = 0.0  # recent seconds from the detector taking a frame to its output
        self.gen_to_output = 0.0  # recent seconds from the generator starting a frame to its output
        self.write = 0.0  # recent seconds to encode and write a frame
        self.backoff = 1  # covered batches count 1 / backoff towards trying the generator again
        self.covering = False  # the last batch with faces was covered
        self.probe = False  # a batch generated after covered ones is on its way: cover until it is out
        self.frames: dict[int, object] = {}  # id(frame image) -> LiveFrame, while in the pipeline

    def cover(self, ages: list, has_faces: bool, live_router: bool = True) -> tuple[bool, bool]:
        """For the batch the generator takes next (its frames ``ages`` s old): ``(late, probe)``,
        whether its faces get the fallback instead (too late to generate them, or a probe still
        on its way) and whether it is a probe (the first batch generated after covered ones). Keeps
        the state (``live_router`` False: only says)."""
        late = has_faces and bool(ages) and (max(ages) + self.gen_to_output > self.budget or self.probe)
        probe = has_faces and not late and self.covering
        if has_faces and live_router:
            self.covering, self.probe = late, self.probe or probe
            if late:
                self.gen_to_output *= COVER_DECAY ** (1.0 / self.backoff)
        return late, probe

    def out(self, gen_seconds: float, generated: bool, probe: bool, late: bool) -> None:
        """A batch left (or was dropped ``late``), ``gen_seconds`` after the generator took it;
        ``generated``: its faces were generated (not covered)."""
        if generated:
            self.gen_to_output += EMA * (gen_seconds - self.gen_to_output)
            self.backoff = min(2 * self.backoff, MAX_BACKOFF) if late else 1
        if probe:  # fresh evidence: a late probe sets the estimate, not a tenth of it
            self.probe = False
            if generated:
                self.gen_to_output = max(self.gen_to_output, gen_seconds)


class FrameGate:
    """Between the reader thread and the detector. Holds the frames that arrived and hands them
    over in order, dropping (before any processing) each one that waited too long: longer than
    ``MAX_WAIT_FRAMES`` frame intervals (``interval`` s), or than the budget leaves after the
    recent detector-to-output time (at least ``MIN_WAIT_SHARE`` of it). Holds at most ``cap``
    frames (older ones are dropped). Counts everything."""

    def __init__(self, state: _State, stop: threading.Event, cap: int, interval: float):
        self.state, self.stop, self.cap = state, stop, max(2, cap)
        self.max_wait = MAX_WAIT_FRAMES * interval
        self._q: deque = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._ready = False
        self.skipped = 0  # frames that arrived before the pipeline was ready (models loading)
        self.received = 0  # frames the source delivered once it was ready
        self.first = self.last = None  # arrival of the first and the last of them
        self.dropped_old = 0  # dropped before processing: too old
        self.released = 0  # handed to the detector (the others are dropped, or waited when it stopped)

    def ready(self) -> None:
        """From now on frames are kept and counted (before: skipped)."""
        with self._cv:
            self._ready = True

    def put(self, lf) -> None:
        with self._cv:
            if not self._ready:
                self.skipped += 1
                return
            self.received += 1
            self.first = self.first if self.first is not None else lf.arrival
            self.last = lf.arrival
            self._q.append(lf)
            while len(self._q) > self.cap:
                self._q.popleft()
                self.dropped_old += 1
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def frames(self) -> Iterator:
        """The frames to process, in order, with their RGB image loaded (in the detector's thread)."""
        import av

        st = self.state
        rgb = av.video.reformatter.VideoReformatter()  # this thread's
        while True:
            with self._cv:
                while not self._q and not self._closed and not self.stop.is_set():
                    self._cv.wait(0.1)
                if self.stop.is_set() or not self._q:
                    self._q.clear()
                    return
                lf = self._q.popleft()
                now = time.monotonic()
                if now - lf.arrival > min(self.max_wait, max(st.budget - st.to_output, MIN_WAIT_SHARE * st.budget)):
                    self.dropped_old += 1
                    continue
                lf.index, lf.pulled = self.released, now
                self.released += 1
            lf.load(rgb)
            st.frames[id(lf.image)] = lf
            yield lf


class _LiveRouter:
    """routing.Router plus the live paths: "late" (while :attr:`late` is set: the frame would
    leave past the budget if its faces were generated) and "weak" (a weak detection no track
    holds). Held-over boxes are Face.held: the pipeline gives them the fallback ("held") itself."""

    def __init__(self, inner):
        self._inner = inner
        self.late = False

    def decide(self, track, *args, **kwargs) -> str:
        if isinstance(track, tuple):
            return track[0]
        if self.late:
            return "late"
        return self._inner.decide(track, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Remember:
    """The detector, remembering each image's detections (id(image) -> Detections)."""

    def __init__(self, detector):
        self.detector = detector
        self.last: dict = {}

    def detect(self, image, tracked=None):
        dets = self.detector.detect(image, tracked)
        self.last[id(image)] = dets
        return dets

    def __getattr__(self, name):
        return getattr(self.detector, name)


def _grow(box: np.ndarray) -> np.ndarray:
    """(4,) box grown by HOLD_GROW of its size on each side, float32."""
    x0, y0, x1, y1 = (float(v) for v in box)
    gx, gy = HOLD_GROW * (x1 - x0), HOLD_GROW * (y1 - y0)
    return np.array([x0 - gx, y0 - gy, x1 + gx, y1 + gy], np.float32)


def _overlaps(box: np.ndarray, boxes: np.ndarray, box_iou) -> bool:
    """Whether ``box`` overlaps one of ``boxes`` (IoU > 0.3, or its centre inside one)."""
    if not len(boxes):
        return False
    b = np.asarray(box, np.float64)[None]
    cx, cy = (b[0, 0] + b[0, 2]) / 2, (b[0, 1] + b[0, 3]) / 2
    inside = (boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])
    return bool(inside.any() or box_iou(b, boxes).max() > 0.3)


class LivePipeline(Pipeline):
    """The Pipeline with the live rules: held-over boxes after a track ends, and faces covered
    instead of generated when generating them would be too late (see the module docstring)."""

    SEARCH_LAST = False  # no frame waits for the next to know whether the stream ends

    def __init__(self, options: AnonymizeOptions, state: _State, hold_over: int):
        super().__init__(options)
        self.state = state
        self.hold_over = hold_over

    def warm_up(self, image: np.ndarray) -> None:
        """Run every model once, on ``image`` (H, W, 3) uint8 RGB (the source's first frame, not
        changed): their first runs are several times slower and must not fall on live frames."""
        res = FileResult(input="", output="")
        self.image(image.copy(), res)
        if self.runner is not None and not res.faces_anonymized:
            S = self.runner.size
            desc = self.embedder.embed([np.zeros((112, 112, 3), np.uint8)])
            self.runner.run(np.zeros((1, S, S, 3), np.uint8), desc, 1)
            self.embedder.embed_check([np.zeros((112, 112, 3), np.uint8)])

    def new_router(self):
        inner = super().new_router()
        return None if inner is None else _LiveRouter(inner)

    def detect_and_track(self, frames: Iterator, result: FileResult, fps: Optional[float],
                         stages: Stages = NULL) -> Iterator:
        """Pipeline.detect_and_track, plus (faces with a tuple track id, which the router sends to
        the fallback) the held-over boxes of ended tracks and the weak detections no track holds."""
        from ..faces.detect import WEAK_MIN, box_iou
        from ..faces.track import Face

        seen = _Remember(self.detector)
        self.detector = seen
        recent: dict = {}  # track id -> (its last face, grown; frames it may still be held over)
        try:
            for vf, faces in super().detect_and_track(frames, result, fps, stages):
                boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
                ids = {f.track_id for f in faces}
                extra = []
                for tid, (face, left) in list(recent.items()):
                    if tid in ids:
                        continue
                    if left <= 0 or _overlaps(face.box, boxes, box_iou):
                        del recent[tid]  # done, or a track follows that face again
                        continue
                    recent[tid] = (face, left - 1)
                    extra.append(face)
                for f in faces:
                    recent[f.track_id] = (Face(("held", f.track_id), _grow(f.box), f.kps, 0.0, True, held=True),
                                          self.hold_over)
                dets = seen.last.pop(id(vf.image), None)
                if dets is not None:
                    weak = [k for k in range(len(dets)) if WEAK_MIN <= dets.scores[k] < self.options.detect.det_thresh
                            and not _overlaps(dets.boxes[k], boxes, box_iou)]
                    extra += [Face(("weak", k), _grow(dets.boxes[k]), dets.kps[k], float(dets.scores[k]), True)
                              for k in weak]
                vf.faces = faces + extra
                yield vf, vf.faces
        finally:
            self.detector = seen.detector

    def generate(self, items, descriptors: dict, stages: Stages = NULL, passes=None, router=None):
        st = self.state
        now = time.monotonic()
        frames = [st.frames.get(id(img)) for img, _ in items]
        ages = [now - f.arrival for f in frames if f is not None]
        has_faces = any(not isinstance(f.track_id, tuple) for _, faces in items for f in faces)
        late, probe = st.cover(ages, has_faces, isinstance(router, _LiveRouter))
        for f in frames:
            if f is not None:
                f.generating = now
                f.covered = late and any(not isinstance(x.track_id, tuple) for x in f.faces)
                f.probe = probe
        if not (late and isinstance(router, _LiveRouter)):
            return super().generate(items, descriptors, stages, passes, router)
        router.late = True
        try:
            return super().generate(items, descriptors, stages, passes, router)
        finally:
            router.late = False


class _Latency:
    """Emit-minus-arrival times in 1 ms bins (bounded memory for a session of any length)."""

    MAX_MS = 60_000

    def __init__(self):
        self.counts = np.zeros(self.MAX_MS + 1, np.int64)
        self.n, self.total, self.max = 0, 0.0, 0.0

    def add(self, seconds: float) -> None:
        ms = max(seconds, 0.0) * 1000
        self.counts[min(int(ms), self.MAX_MS)] += 1
        self.n += 1
        self.total += ms
        self.max = max(self.max, ms)

    def pct(self, q: float) -> Optional[float]:
        if not self.n:
            return None
        k = int(np.searchsorted(np.cumsum(self.counts), q * self.n))
        return round(min(k + 1.0, self.max), 1)  # the bin's upper edge, at most the true max

    def as_dict(self) -> dict:
        return {"p50": self.pct(0.5), "p95": self.pct(0.95), "max": round(self.max, 1) if self.n else None,
                "mean": round(self.total / self.n, 1) if self.n else None}


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, seen: list) -> Iterator[None]:
    """While inside (main thread only): the first SIGINT/SIGTERM sets ``stop`` (the session winds
    down: in-flight frames finish, the output is finalized); a second one raises
    :class:`Interrupted` at once. The handlers in place before are restored on the way out."""
    prev = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            if seen:
                raise Interrupted(signum)
            seen.append(signum)
            stop.set()
            with contextlib.suppress(OSError):
                os.write(2, f"deid: {signal.Signals(signum).name}: stopping, finishing the output "
                            f"(again to stop at once)\n".encode())

        for sig in (signal.SIGINT, signal.SIGTERM):
            prev[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h)


def live(src, dst, options: Optional[AnonymizeOptions] = None, live_options: Optional[LiveOptions] = None) -> dict:
    """Anonymize the live source ``src`` into ``dst`` until the source ends or a signal stops it.

    src: a camera (``/dev/videoN`` or ``N``), a network URL (rtsp, rtmp, udp, srt, http(s)...), a
    file (only with ``live_options.realtime``: played at its own frame rate; ``deid anonymize``
    processes every frame of a file) or ``-`` (stdin). dst: a file (written under a temporary name
    and renamed when finalized), ``-`` (stdout, MPEG-TS or ``options.encode.format``), a network
    URL (udp/srt/tcp: MPEG-TS, rtmp: FLV, rtsp) or a v4l2loopback device ``/dev/videoN``.

    Returns the report (docs/live.md) when the source ends (a file, stdin) or
    ``live_options.duration`` is reached. Raises, with the report as ``.report``:
    :class:`Interrupted` (SIGINT/SIGTERM; the output finalized), :class:`SourceLost` (a camera or
    network source stopped or disconnected; the output finalized), InputError/OutputError for
    unusable arguments (nothing written) or a failure (an output that failed is removed), ValueError
    for options that do not apply, ModelError when the models cannot be loaded.
    """
    from ..media.live_io import LiveSink, LiveSource, parse_sink, parse_source

    options = options or AnonymizeOptions(encode=LIVE_ENCODE)
    lo = live_options or LiveOptions()
    if options.dry_run or options.shard is not None:
        raise ValueError("--dry-run and --shard do not apply to deid live")
    sep = parse_source(src, lo.input_format)
    dep = parse_sink(dst, options.encode.format, options.overwrite)
    if sep.kind == "file" and not lo.realtime:
        raise ValueError(f"{src}: a file is not a live source; `deid anonymize {src} OUT` processes every frame, "
                         f"`deid live --realtime` plays it at its own frame rate")
    if sep.kind == "file" and dep.kind == "file" and Path(src).resolve() == Path(dst).resolve():
        raise OutputError(f"{dst}: output would overwrite the input")
    if lo.realtime and sep.kind in ("camera", "network"):
        log.warning("--realtime paces files and stdin; %s delivers frames at its own rate already", sep.name)
        lo = replace(lo, realtime=False)
    if lo.reconnect and sep.kind != "network":
        log.warning("--reconnect applies to network sources only")

    stop, seen = threading.Event(), []
    session = _Session(sep, dep, options, lo, stop)
    with _stop_on_signals(stop, seen):
        return session.run(LiveSource, LiveSink, seen)


class _Session:
    """One live run: its endpoints, counters and the report."""

    def __init__(self, sep, dep, options: AnonymizeOptions, lo: LiveOptions, stop: threading.Event):
        self.sep, self.dep, self.options, self.lo, self.stop = sep, dep, options, lo, stop
        self.state = _State(lo.max_latency)
        self.res = FileResult(input=sep.name, output=dep.name, kind="video")
        self.stages = Stages()
        self.latency = _Latency()
        self.pipeline: Optional[LivePipeline] = None
        self.source = self.sink = self.gate = self.reader = None
        self.load_seconds = 0.0
        self.track: Optional[TrackOptions] = None
        self.late = self.lost_in_flight = 0
        self.faces = self.faces_covered = self.faces_held = self.faces_weak = self.frames_covered = 0
        self.t_end: Optional[float] = None

    def run(self, LiveSource, LiveSink, seen: list) -> dict:
        from ..media.files import tmp_path_for
        from ..media.pipes import stdout_stream

        dep, lo = self.dep, self.lo
        tmp: Optional[Path] = None
        hard: Optional[BaseException] = None
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(stdout_stream()) if dep.kind == "stdout" else None  # first: guards stdout
            self.source = source = LiveSource(self.sep, lo, self.stop, audio=self.options.encode.audio != "none")
            source.open()  # fail fast: the source, then the output, then the models
            stack.callback(source.close)  # unless the reader thread took it over
            fps = float(source.rate)
            self.track = live_track_options(self.options.track, fps, lo.max_latency,
                                            self.options.detect.detect_every)
            if dep.kind == "file":
                try:
                    tmp = tmp_path_for(Path(dep.url))
                except OSError as e:
                    raise OutputError(f"{dep.url}: cannot create output ({e.strerror or e})") from e
            self.sink = sink = LiveSink(dep, str(tmp) if tmp else out if dep.kind == "stdout" else dep.url,
                                        self.options.encode)
            try:
                sink.open(source)
                first = source.first_image()
                # A camera or a stream goes on while the models load: read it meanwhile (what arrives
                # before the pipeline is ready is skipped, and counted), so that no backlog piles up
                # in FFmpeg's buffers to come out later as frames that look fresh. A file (or stdin)
                # with --realtime starts its clock when the pipeline is ready.
                if not lo.realtime:
                    self._start_reader()
                if not self.stop.is_set():
                    t = time.perf_counter()
                    self.pipeline = LivePipeline(replace(self.options, track=self.track), self.state,
                                                 hold_over=self.options.track.max_gap)
                    self.pipeline.warm_up(first)
                    self.load_seconds = round(time.perf_counter() - t, 3)
            except BaseException:
                self._stop_reader()
                sink.abort()
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
            if self.stop.is_set():  # a signal while opening or loading: nothing written
                self._stop_reader()
                sink.abort()
                if tmp is not None:
                    os.unlink(tmp)
            else:
                hard = self._stream(tmp)
        if hard is not None or seen:
            signum = getattr(hard, "signum", None) or seen[0]
            report = self.report("interrupted", f"stopped by {signal.Signals(signum).name}", 128 + signum)
            raise Interrupted(signum, report)
        if source.ended == "failed" or (source.error is not None and not isinstance(source.error, SourceLost)):
            self._raise(source.error or InputError(f"{self.sep.name}: reading failed"), "failed")
        if source.error is not None:
            self._raise(source.error, "source_lost")
        why = f"--duration {lo.duration:g} s reached" if source.ended == "duration" else "end of source"
        return self.report("ok", why, 0)

    def _stream(self, tmp: Optional[Path]) -> Optional[BaseException]:
        """Read, process and write until the source ends or ``stop`` is set; finalize the output
        (a file renamed into place). Returns the KeyboardInterrupt of a second signal, or None;
        raises (the output removed) when processing or writing failed."""
        source, sink = self.source, self.sink
        fps = float(source.rate)
        log.info("ready: models loaded, processing from the next frame")
        if self.gate is not None:
            self.gate.ready()
        gate = self._start_reader(ready=True)
        failure: Optional[BaseException] = None
        hard: Optional[BaseException] = None
        try:
            try:
                self._write(self.pipeline.process_frames(gate.frames(), self.res, fps, self.stages,
                                                         queue_frames=QUEUE_FRAMES, max_pending=BATCH_FRAMES))
            except KeyboardInterrupt as e:  # a second signal: stop at once, still finalize
                hard = e
            except BaseException as e:
                failure = e
            finally:
                self._stop_reader()
                self.t_end = time.monotonic()
            if failure is None:
                try:
                    sink.close()
                except OutputError as e:
                    failure = e
        except KeyboardInterrupt as e:  # a signal after the second one, while finishing
            failure = e
        if failure is not None:
            sink.abort()
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(failure, KeyboardInterrupt):
                raise failure
            self._raise(failure, "failed")
        if tmp is not None:
            if sink.frames:
                os.replace(tmp, self.dep.url)
            else:
                os.unlink(tmp)
                log.warning("%s: no frame was written; no output file", self.dep.name)
        return hard

    def _start_reader(self, ready: bool = False) -> FrameGate:
        """The gate and the reader thread (once); ``ready``: the gate keeps frames from the first."""
        if self.gate is None:
            source, sink, fps = self.source, self.sink, float(self.source.rate)
            self.gate = gate = FrameGate(self.state, self.stop, cap=int(np.ceil(2 * self.lo.max_latency * fps)) + 2,
                                         interval=1.0 / fps)
            if ready:
                gate.ready()

            def read():
                try:
                    source.run(gate.put, sink.queue_audio)
                finally:
                    gate.close()

            self.reader = threading.Thread(target=read, name="deid-live-read", daemon=True)
            source.taken = True
            self.reader.start()
        return self.gate

    def _stop_reader(self) -> None:
        self.stop.set()
        if self.reader is not None:
            self.reader.join(timeout=2.0)  # a read blocked in FFmpeg ends at --timeout; it is a daemon

    def _raise(self, e: BaseException, status: str):
        code = e.exit_code if isinstance(e, DeidError) else 1
        msg = str(e) if isinstance(e, DeidError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, DeidError):
            log.debug("unexpected error", exc_info=(type(e), e, e.__traceback__))
        e.report = self.report(status, msg, code, error=msg)
        raise e

    def _write(self, results) -> None:
        st, sink, lat = self.state, self.sink, self.latency
        last_log = time.monotonic()
        try:
            for vf, image, rects in results:
                st.frames.pop(id(vf.image), None)
                t = time.monotonic()
                late = t - vf.arrival + st.write > st.budget  # it would leave past the budget
                if not late:
                    with self.stages("encode"):
                        sink.write(vf, image, rects)
                    t, t0 = time.monotonic(), t
                    st.write += EMA * ((t - t0) - st.write)
                # what the gate and the generator's cover decision go by (late frames too)
                st.to_output += EMA * ((t - vf.pulled) - st.to_output)
                st.out(t - vf.generating, bool(vf.generating and not vf.covered and vf.faces), vf.probe, late)
                if late:
                    self.late += 1
                    continue
                lat.add(t - vf.arrival)
                held = sum(isinstance(f.track_id, tuple) and f.track_id[0] == "held" for f in vf.faces)
                weak = sum(isinstance(f.track_id, tuple) and f.track_id[0] == "weak" for f in vf.faces)
                self.faces += len(vf.faces) - held - weak
                self.faces_held += held
                self.faces_weak += weak
                if vf.covered:
                    self.frames_covered += 1
                    self.faces_covered += len(vf.faces) - held - weak
                if t - last_log >= PROGRESS_EVERY:
                    last_log = t
                    g = self.gate
                    log.info("live: %d in, %d out, %d dropped, %d covered; latency p95 %s ms", g.received,
                             sink.frames, g.received - g.released + self.late, self.frames_covered, lat.pct(0.95))
        finally:
            results.close()
            self.lost_in_flight = self.gate.released - sink.frames - self.late

    def report(self, status: str, reason: str, code: int, error: Optional[str] = None) -> dict:
        """The session's report (docs/live.md, "The report")."""
        from .anonymize import _versions

        g, sink, src, pipe = self.gate, self.sink, self.source, self.pipeline
        received = g.received if g else 0
        out = sink.frames if sink else 0
        old = g.dropped_old if g else 0
        at_stop = (received - g.released - old if g else 0) + max(self.lost_in_flight, 0)
        dropped = old + self.late + at_stop
        t0, t1 = (g.first, g.last) if g and g.first is not None else (0.0, 0.0)
        span = t1 - t0 + (t1 - t0) / max(received - 1, 1)  # n frames span n intervals
        seconds = round((self.t_end or time.monotonic()) - t0, 3) if g and g.first is not None else 0.0
        res = self.res
        return {
            "source": self.sep.name,
            "source_kind": self.sep.kind,  # camera | network | file | stdin
            "destination": self.dep.name,
            "destination_kind": self.dep.kind,  # file | stdout | network | device
            "status": status,  # ok | interrupted | source_lost | failed
            "exit_reason": reason,
            "exit_code": code,
            "error": error,
            "frames_before_ready": g.skipped if g else 0,  # delivered while the models loaded: skipped
            "frames_in": received,  # decoded frames the source delivered once deid was ready
            "frames_out": out,  # frames written, every face anonymized
            "frames_dropped": dropped,  # frames_in - frames_out: never written
            "frames_dropped_old": old,  # before any processing: too old to make it in time
            "frames_dropped_late": self.late,  # processed, but past --max-latency at the output
            "frames_dropped_at_stop": at_stop,  # waiting or in flight when the session stopped
            "dropped_percent": round(100.0 * dropped / received, 2) if received else 0.0,
            "frames_covered": self.frames_covered,  # written with the fallback instead of generated faces
            "faces": self.faces,  # tracked faces in the frames written
            "faces_covered": self.faces_covered,  # of those, covered with the fallback to be in time
            "faces_held_over": self.faces_held,  # boxes of ended tracks kept covered (docs/live.md)
            "faces_weak_covered": self.faces_weak,  # weak detections no track holds, covered (docs/live.md)
            "latency_ms": self.latency.as_dict(),  # output time minus arrival, frames written
            "max_latency_ms": round(self.lo.max_latency * 1000, 1),
            "fps_in": round(received / span, 2) if received > 1 and span > 0 else 0.0,  # over the arrivals
            "fps_out": round(out / span, 2) if received > 1 and span > 0 else 0.0,  # over the same span
            "seconds": seconds,  # from the first frame's arrival to the end of the session
            "source_fps": round(float(src.rate), 3) if src else None,
            "size": list(src.size) if src and src.size else None,
            "reconnects": src.reconnects if src else 0,
            "decode_errors": src.decode_errors if src else 0,
            "pts_fixed": src.pts_fixed if src else 0,
            "tracker": {"max_gap": self.track.max_gap, "reach_back": self.track.reach_back, "pad": self.track.pad,
                        "hold_over": self.options.track.max_gap} if self.track else None,
            "audio": {"mode": sink.audio_mode, "packets": sink.audio_packets, "dropped": sink.audio_dropped}
            if sink else None,
            "tracks": res.tracks,
            "faces_detected": res.faces_detected,
            "face_paths": res.face_paths,  # generate: faces by path (live: "late", "held", "weak")
            "faces_checked": res.faces_checked,
            "faces_regenerated": res.faces_regenerated,
            "stages": self.stages.as_dict(),
            "device": pipe.runtime.device if pipe else None,
            "dtype": pipe.runtime.dtype if pipe else None,
            "detector_precision": pipe.detector.precision if pipe else None,
            "load_seconds": self.load_seconds,
            "versions": _versions(),
            "options": self.options.to_dict(),
            "live_options": self.lo.to_dict(),
        }
