"""The library entry point: ``anonymize(src, dst, options)`` for a file or a folder.

One frame's walk: video.py decodes -> faces.py detects and tracks -> align.py crops ->
engine.py runs the generator in batches (or methods.py blurs) -> align.py pastes back ->
video.py encodes and muxes. This module only wires those stages together and keeps score.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import DeidError, InputError, ModelError, OutputError
from .options import AnonymizeOptions
from .stages import NULL, QUEUE_FRAMES, Stages, prefetch

log = logging.getLogger(__name__)

#: Most frames held waiting for a generator batch to fill (bounds latency and memory).
MAX_PENDING_FRAMES = 64
#: Faces of a new track averaged into its fixed identity descriptor.
DESCRIPTOR_FACES = 5


class Progress:
    """Progress sink; the CLI passes one that draws a bar. All methods are optional no-ops."""

    def start_file(self, path: Path, total: Optional[int]) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def end_file(self) -> None: ...


@dataclass
class FileResult:
    input: str
    output: str
    status: str = "ok"  # ok | skipped | failed
    error: Optional[str] = None
    kind: Optional[str] = None  # video | image
    frames: int = 0
    faces_detected: int = 0  # detector hits that were anonymized
    faces_anonymized: int = 0  # faces anonymized, including those filled by interpolation
    faces_below_min_size: int = 0  # detections ignored because of --min-face
    faces_kept_low_score: int = 0  # detections below --det-thresh (>= --keep-thresh) that continued a track
    tracks: int = 0
    frames_interpolated: int = 0  # frames in which at least one face was filled by interpolation
    faces_interpolated: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    stages: dict = field(default_factory=dict)  # seconds each stage kept a thread busy (they overlap)
    exit_code: int = 0


class Pipeline:
    """Models loaded once and reused across the files of a run."""

    def __init__(self, options: AnonymizeOptions):
        from . import engine, weights
        from .faces import Detector

        self.options = options
        self.runtime = engine.resolve_runtime(options.device, options.fp16)
        for w in self.runtime.warnings:
            log.warning(w)
        providers = engine.onnx_providers(self.runtime)
        d = options.detect
        # The detector reports faces down to keep_thresh; only those >= det_thresh start a track
        # (see faces.Tracker): real faces whose score sags between frames stay anonymized.
        self.detector = Detector(weights.model_path(d.detector, options.models_dir),
                                 det_thresh=min(d.det_thresh, options.track.keep_thresh),
                                 det_size=d.det_size, min_face=d.min_face, providers=providers)
        self.runner = None
        self.embedder = None
        if options.method == "generate":
            ckpt = weights.generator_path(options.weights)  # clear ModelError before importing torch models
            from .model import load_generator

            gen = load_generator(ckpt, device="cpu")
            self.runner = engine.GeneratorRunner(gen, self.runtime, options.batch_size)
            self.embedder = engine.IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", options.models_dir),
                                                    providers)

    # -- rendering -------------------------------------------------------------------------
    def render(self, items: Sequence[tuple[np.ndarray, Sequence]], descriptors: dict,
               stages: Stages = NULL) -> list[list]:
        """Anonymize a batch of frames in place.

        items: (image (H, W, 3) uint8 RGB, faces) pairs; faces have track_id, box, kps, interpolated.
        descriptors: track_id -> (D,) float32, filled in here for tracks seen for the first time.
        Returns, per item, the list of touched rectangles.
        """
        from .methods import apply_classic

        o = self.options
        if o.method != "generate":
            with stages("blend"):
                return [apply_classic(img, faces, o.method, o.margin) for img, faces in items]
        from .align import estimate_transform, feather, paste, warp_crop

        with stages("identity"):
            self._describe_new_tracks(items, descriptors)
        S, margin = self.runner.size, self.runner.margin
        jobs, crops, desc = [], [], []
        with stages("align"):
            for i, (img, faces) in enumerate(items):
                for f in faces:
                    M = estimate_transform(f.kps, S, margin)
                    jobs.append((i, M))
                    crops.append(warp_crop(img, M, S))
                    desc.append(descriptors[f.track_id])
        rects: list[list] = [[] for _ in items]
        if not jobs:
            return rects
        with stages("generate"):
            raw, mask = self.runner.run(np.stack(crops), np.stack(desc).astype(np.float32))
        with stages("blend"):
            for (i, M), r, m in zip(jobs, raw, mask):
                box = paste(items[i][0], r, feather(m, S), M)
                if box is not None:
                    rects[i].append(box)
        return rects

    def _describe_new_tracks(self, items, descriptors: dict) -> None:
        """Fixed identity descriptor per track: mean embedding of its first (up to 5) detected faces
        in the batch where it first appears, held for the whole track."""
        from .align import arcface_crop

        todo: dict[int, list] = {}
        for img, faces in items:
            for f in faces:
                if f.track_id in descriptors:
                    continue
                lst = todo.setdefault(f.track_id, [])
                if len(lst) < DESCRIPTOR_FACES and (not f.interpolated or not lst):
                    lst.append(arcface_crop(img, f.kps))
        if not todo:
            return
        ids = list(todo)
        flat = [c for t in ids for c in todo[t]]
        emb = self.embedder.embed(flat)
        k = 0
        for t in ids:
            e = emb[k:k + len(todo[t])].mean(0)
            k += len(todo[t])
            descriptors[t] = e / max(float(np.linalg.norm(e)), 1e-12)

    # -- one video ---------------------------------------------------------------------------
    def detect_and_track(self, frames: Iterator, result: FileResult, fps: Optional[float],
                         stages: Stages = NULL) -> Iterator:
        """(frame, faces) for every decoded frame, in order, once its faces are final (the tracker
        looks up to ``max_gap`` frames ahead to fill detector misses)."""
        from .faces import Tracker

        tracker = Tracker(self.options.track, fps=fps, start_thresh=self.options.detect.det_thresh)
        pending: deque = deque()  # decoded frames whose faces are not final yet
        small0 = self.detector.n_small

        def take(final):
            for idx, faces in final:
                vf = pending.popleft()
                assert vf.index == idx, (vf.index, idx)
                yield vf, faces

        for vf in frames:
            with stages("detect"):
                dets = self.detector.detect(vf.image)
            pending.append(vf)
            with stages("track"):
                final = tracker.push(vf.index, dets)
            yield from take(final)
        with stages("track"):
            final = tracker.flush()
        yield from take(final)
        assert not pending, f"{len(pending)} frames left untracked"
        result.tracks = tracker.n_tracks
        result.faces_detected = tracker.n_detections - tracker.n_weak_dropped
        result.faces_kept_low_score = tracker.n_weak_kept
        result.faces_below_min_size = self.detector.n_small - small0

    def process_frames(self, frames: Iterator, result: FileResult, fps: Optional[float],
                       stages: Stages = NULL, threads: bool = True) -> Iterator:
        """Transform decoded frames into (frame, image, rects), in order (see video.transcode_video).

        Detection and tracking run in their own thread (``threads``), a few frames ahead of
        rendering, which batches faces across frames for the generator.
        """
        tracked = self.detect_and_track(frames, result, fps, stages)
        if threads:
            tracked = prefetch(tracked, QUEUE_FRAMES, "deid-detect")
        descriptors: dict = {}
        batch_faces = self.options.batch_size if self.options.method == "generate" else 1

        def emit(batch):
            # Rendered in place: nothing reads a frame's decoded picture afterwards (the writer
            # takes the pixels outside the touched rectangles from the decoded planes).
            imgs = [(vf.image, faces) for vf, faces in batch]
            rects = self.render(imgs, descriptors, stages)
            for (vf, faces), (img, _), r in zip(batch, imgs, rects):
                result.frames += 1
                result.faces_anonymized += len(faces)
                n_interp = sum(1 for f in faces if f.interpolated)
                result.faces_interpolated += n_interp
                result.frames_interpolated += n_interp > 0
                yield vf, img, r

        ready: list = []  # (frame, faces) waiting for a full generator batch
        n_faces = 0
        try:
            for vf, faces in tracked:
                ready.append((vf, faces))
                n_faces += len(faces)
                if n_faces >= batch_faces or len(ready) >= MAX_PENDING_FRAMES:
                    batch, ready, n_faces = ready, [], 0
                    yield from emit(batch)
            yield from emit(ready)
        finally:
            if hasattr(tracked, "close"):
                tracked.close()

    def image(self, img: np.ndarray, result: FileResult) -> np.ndarray:
        from .faces import Tracker

        dets = self.detector.detect(img)
        tracker = Tracker(self.options.track, start_thresh=self.options.detect.det_thresh)
        final = tracker.push(0, dets) + tracker.flush()
        result.faces_detected = tracker.n_detections - tracker.n_weak_dropped
        faces = final[0][1] if final else []
        out = img.copy()
        self.render([(out, faces)], {})
        result.frames = 1
        result.faces_anonymized = len(faces)
        result.tracks = len({f.track_id for f in faces})
        return out


# --- files and folders -------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"deid": __version__}
    for pkg in ("torch", "av", "insightface", "onnxruntime", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def plan_jobs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: one for a file, every media file below a folder mirrored into dst.

    The output folder is never read as input, even when it lies inside the input folder.
    """
    from .video import media_kind

    if src.is_file():
        if dst.is_dir():
            dst = dst / src.name
        return [(src, dst)]
    if not src.is_dir():
        raise InputError(f"{src}: no such file or directory")
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"{dst}: input is a folder, so the output must be a folder too")
    dst_res = dst.resolve()
    jobs = []
    for root, dirs, files in os.walk(src):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if (rootp / d).resolve() != dst_res and not d.startswith("."))
        for name in sorted(files):
            p = rootp / name
            if name.startswith(".") or media_kind(p) is None:
                continue
            jobs.append((p, dst / p.relative_to(src)))
    return jobs


def _process_file(pipeline_factory: Callable[[], Pipeline], src: Path, dst: Path, options: AnonymizeOptions,
                  progress: Progress) -> FileResult:
    from . import video

    res = FileResult(input=str(src), output=str(dst))
    kind = video.media_kind(src)
    res.kind = kind
    out_kind = video.media_kind(dst)
    if kind is None:
        raise InputError(f"{src}: not a supported image or video file (by extension)")
    if out_kind != kind:
        raise OutputError(f"{dst}: output must be a{'n' if kind == 'image' else ''} {kind} file like the input "
                          f"(got extension {dst.suffix or 'none'!r})")
    if src.resolve() == dst.resolve():
        raise OutputError(f"{dst}: output would overwrite the input")
    if kind == "video":
        info = video.probe(src)  # fail fast on unreadable input, before loading models
    else:
        img = video.read_image(src)
    pipe = pipeline_factory()
    t0 = time.perf_counter()  # models are loaded once per run: not counted per file
    dst.parent.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    if kind == "video":
        fps = float(info.average_rate) if info.average_rate else None
        progress.start_file(src, info.frames or None)
        try:
            with video.atomic_output(dst) as tmp:
                video.transcode_video(src, tmp, lambda frames: pipe.process_frames(frames, res, fps, stages),
                                      options.encode, on_frame=lambda n: progress.advance(1), stages=stages)
        finally:
            progress.end_file()
    else:
        out = pipe.image(img, res)
        with video.atomic_output(dst) as tmp:
            video.write_image(tmp, out)
    res.stages = stages.as_dict()
    res.seconds = round(time.perf_counter() - t0, 3)
    res.fps = round(res.frames / res.seconds, 2) if res.seconds > 0 else 0.0
    return res


def anonymize(src, dst, options: Optional[AnonymizeOptions] = None, progress: Optional[Progress] = None) -> dict:
    """Anonymize every face in ``src`` (a video, an image, or a folder of them) into ``dst``.

    Never raises for a failed input file: each file's status is in the report, and the run
    goes on. Raises ModelError when a model cannot be loaded (nothing can be done then),
    InputError/OutputError when the arguments themselves are unusable, KeyboardInterrupt on
    Ctrl-C (after removing any partial output). Returns the report dict (see README).
    """
    options = options or AnonymizeOptions()
    progress = progress or Progress()
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    jobs = plan_jobs(src, dst)
    pipeline: Optional[Pipeline] = None
    load_seconds = 0.0

    def factory() -> Pipeline:
        nonlocal pipeline, load_seconds
        if pipeline is None:
            t = time.perf_counter()
            pipeline = Pipeline(options)
            load_seconds = round(time.perf_counter() - t, 3)
        return pipeline

    results: list[FileResult] = []
    for s, d in jobs:
        if d.exists() and not options.overwrite:
            results.append(FileResult(input=str(s), output=str(d), status="skipped",
                                      error="output exists (use --overwrite to replace it)"))
            log.info("skip %s: %s exists", s, d)
            continue
        try:
            results.append(_process_file(factory, s, d, options, progress))
            log.info("done %s -> %s", s, d)
        except ModelError:
            raise
        except DeidError as e:
            results.append(FileResult(input=str(s), output=str(d), status="failed", error=str(e), exit_code=e.exit_code))
            log.error("%s: %s", s, e)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # a bug or an unexpected library error: report it, go on
            log.debug("unexpected error", exc_info=True)
            results.append(FileResult(input=str(s), output=str(d), status="failed", error=f"{type(e).__name__}: {e}",
                                      exit_code=1))
            log.error("%s: %s: %s", s, type(e).__name__, e)
    report = {
        "files": [r.__dict__ for r in results],
        "ok": sum(r.status == "ok" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "device": pipeline.runtime.device if pipeline else None,
        "dtype": pipeline.runtime.dtype if pipeline else None,
        "generator_backend": pipeline.runner.backend if pipeline and pipeline.runner else None,
        "load_seconds": load_seconds,  # loading the models, once per run
        "versions": _versions(),
        "options": options.to_dict(),
    }
    return report
