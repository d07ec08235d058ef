"""The library entry point: ``anonymize(src, dst, options)`` for a file or a folder.

One frame's walk: video.py decodes -> faces.py detects and tracks -> align.py crops ->
engine.py runs the generator in batches (or methods.py blurs) -> align.py pastes back ->
video.py encodes and muxes. This module only wires those stages together and keeps score.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import DeidError, InputError, Interrupted, ModelError, OutputError
from .jobs import (clean_stale, counts, dest_reason, lock_owner, lock_path, owner_text, read_owner, select_shard,
                   try_lock)
from .options import AnonymizeOptions
from .stages import NULL, QUEUE_FRAMES, Stages, prefetch

log = logging.getLogger(__name__)

#: Most frames held waiting for a generator batch to fill (bounds latency and memory).
MAX_PENDING_FRAMES = 64
#: The first generator batch of a video holds batch_size // FIRST_BATCH_DIVISOR faces, each next
#: one twice as many, up to batch_size (Pipeline.process_frames).
FIRST_BATCH_DIVISOR = 4
#: Faces of a new track averaged into its fixed identity descriptor.
DESCRIPTOR_FACES = 5
#: A track whose last CALM_FACES checked faces all came out at least CALM_MARGIN under
#: --check-thresh is checked on every other face only (until a check comes out closer): most of
#: the check's cost goes to tracks the generator handles with room to spare.
CALM_FACES = 8
CALM_MARGIN = 0.1
#: The identity check also fails a face whose output ArcFace crop differs from the input's by less
#: than this mean absolute difference (0-255): a generated face so faint that the paste left the
#: face nearly as it was (flat, hazy faces under tone matching), which deid evaluate-video counts
#: as unchanged below 2.0.
CHECK_MIN_CHANGE = 2.2
#: --keep-detail pastes the generated face's change at this many times the generator's crop size
#: (256 px for the 128 px generator): the frame keeps only what is finer than that. The ArcFace
#: square an identity network sees at 112 px spans 183 px of a 256 crop, so what is kept lies
#: above what such a network resolves. Measured on sadtalker_WDA and lp_d13, one pass, identity
#: network on the frame's ArcFace crop: keeping everything finer than the 128 crop raised the
#: mean cosine to the person by 0.09 and 0.06; at 256, by 0.03 and 0.02, with 87% and 99% of
#: the input's fine detail (mean |Laplacian|) where the mask is full (plain paste: 31% and 26%).
DETAIL_SCALE = 2


def new_check_stats() -> dict:
    """Counters of the identity check for one file (see Pipeline._check_identity)."""
    return {"checked": 0, "regenerated": 0, "fallback": 0, "skipped": 0, "faint": 0, "cos_max": -1.0}


class PassLevels:
    """Generator passes per track for one file: ``base`` (``--passes``) unless the identity check
    raised the track (:meth:`raise_to`). A raised track keeps its count for ``hold`` more of its
    faces after the last raise, then steps down one pass per ``hold`` faces back to ``base`` (the
    check raises it again, face by face, where it must); ``hold`` 0 keeps it raised for the rest
    of the track. One step at a time: a track that needs its count most of the time pays one
    regeneration per ``hold`` faces to find out, not a climb from ``base``.

    Why a hold and not "raised for good": one stubborn face used to put its whole track at up to
    four passes, and every pass compounds the generator's colour and shape artifacts (lp_d12: 4
    faces regenerated out of 183 put all later frames at 4 passes; weights/MODEL_CARD.md). The
    hold keeps the look from switching back and forth frame by frame around a hard pose.
    """

    def __init__(self, base: int = 1, hold: int = 0):
        import threading

        self.base, self.hold = int(base), int(hold)
        self._lock = threading.Lock()  # generate (take) and the check (raise_to) run in two threads
        self._level: dict = {}  # track -> raised count
        self._left: dict = {}  # track -> faces it may still be generated at the raised count
        self.peak: dict = {}  # track -> highest count it was raised to
        self.faces_raised = 0  # faces generated above base by the hold (regenerations not counted)
        self.calm: dict = {}  # track -> checked faces in a row at least CALM_MARGIN under the threshold

    def get(self, track) -> int:
        """Current count of ``track`` (no face is counted)."""
        return self._level.get(track, self.base)

    def take(self, track) -> int:
        """Count for the next face of ``track`` to be generated; counts it against the hold."""
        with self._lock:
            lv = self._level.get(track)
            if lv is None:
                return self.base
            if self.hold:
                if self._left[track] <= 0:
                    lv -= 1
                    if lv <= self.base:
                        del self._level[track], self._left[track]
                        return self.base
                    self._level[track], self._left[track] = lv, self.hold
                self._left[track] -= 1
            self.faces_raised += 1
            return lv

    def raise_to(self, track, level: int) -> None:
        """The check regenerated a face of ``track`` at ``level``: the track goes (at least) there
        and its hold starts again."""
        level = int(level)
        if level <= self.base:
            return
        with self._lock:
            self._level[track] = max(self._level.get(track, self.base), level)
            self._left[track] = self.hold
            self.peak[track] = max(self.peak.get(track, self.base), level)


class Progress:
    """Progress sink; the CLI passes one that draws a bar. All methods are optional no-ops."""

    def start_file(self, path: Path, total: Optional[int]) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def end_file(self) -> None: ...


@dataclass
class FileResult:
    input: str
    output: str
    status: str = "ok"  # ok | skipped | failed | interrupted (partial output removed) | pending (not started)
    error: Optional[str] = None
    kind: Optional[str] = None  # video | image
    frames: int = 0
    faces_detected: int = 0  # detector hits that were anonymized
    faces_anonymized: int = 0  # faces anonymized, including those filled by interpolation
    faces_below_min_size: int = 0  # detections ignored because of --min-face
    faces_kept_low_score: int = 0  # detections below --det-thresh (>= --keep-thresh) that continued a track
    faces_raised_zoomed: int = 0  # detections below --det-thresh that scored above it zoomed (faces.Detector.zoom_score)
    tracks: int = 0
    frames_interpolated: int = 0  # frames in which at least one face was filled by interpolation
    faces_interpolated: int = 0
    frames_not_detected: int = 0  # frames the detector skipped (--detect-every); their faces come from tracks
    faces_predicted: int = 0  # faces held over skipped frames at a track's start or end (--detect-every)
    decode_errors: int = 0  # damaged video: errors the decoder reported (rejected packets, concealed frames)
    frames_lost: int = 0  # input frames the decoder could not output (the others are all in the output)
    decode_error_times: list = field(default_factory=list)  # input times (s) of the lost and concealed frames
    # identity check (--identity-check, generate only): faces embedded after generation, faces
    # generated again with more passes because they were still too close to their identity, faces
    # blurred because --max-passes was not enough, and the highest cosine seen by the check
    faces_checked: int = 0
    faces_check_skipped: int = 0  # faces of calm tracks not checked (every other one; CALM_FACES)
    faces_check_faint: int = 0  # checked faces that failed for changing too little (CHECK_MIN_CHANGE)
    faces_regenerated: int = 0
    faces_blurred_fallback: int = 0
    faces_held_passes: int = 0  # faces generated above --passes because their track was raised (--pass-hold)
    check_cos_max: Optional[float] = None
    track_passes: dict = field(default_factory=dict)  # track -> highest passes it was raised to, where above --passes
    # generate: the path each face took (routing.py): "generated", or the fallback's reason (small,
    # turned, dark, check), and the same by face height ("<48", "48-96", "96-192", ">=192" px)
    face_paths: dict = field(default_factory=dict)
    faces_by_size: dict = field(default_factory=dict)

    def add_route_stats(self, router) -> None:
        if router is None:
            return
        self.face_paths = {p: n for p, n in sorted(router.totals().items())}
        from .routing import SIZE_BINS, size_bin

        by: dict = {size_bin(h): {} for h in (0, *SIZE_BINS)}  # in order of size
        for path, bins in router.counts.items():
            for b, n in bins.items():
                by[b][path] = n
        self.faces_by_size = {b: dict(sorted(v.items())) for b, v in by.items() if v}

    def add_check_stats(self, stats: dict, passes: "PassLevels") -> None:
        self.faces_checked += stats["checked"]
        self.faces_check_skipped += stats["skipped"]
        self.faces_check_faint += stats["faint"]
        self.faces_regenerated += stats["regenerated"]
        self.faces_blurred_fallback += stats["fallback"]
        self.faces_held_passes += passes.faces_raised
        if stats["checked"]:
            self.check_cos_max = round(max(stats["cos_max"], self.check_cos_max or -1.0), 4)
        self.track_passes.update({str(t): k for t, k in passes.peak.items()})

    def add_transcode_stats(self, st: dict) -> None:
        """Take the per-file figures of video.transcode_video's result that the report carries."""
        self.decode_errors, self.frames_lost = st["decode_errors"], st["frames_lost"]
        self.decode_error_times = st["decode_error_times"]

    def finish(self, stages: Stages, t0: float) -> None:
        """Stage times, and wall time / frame rate since ``t0`` (perf_counter, after model loading)."""
        self.stages = stages.as_dict()
        self.seconds = round(time.perf_counter() - t0, 3)
        self.fps = round(self.frames / self.seconds, 2) if self.seconds > 0 else 0.0
    seconds: float = 0.0
    fps: float = 0.0
    stages: dict = field(default_factory=dict)  # seconds each stage kept a thread busy (they overlap)
    exit_code: int = 0


def _reason(e: BaseException, src: Path) -> str:
    """The error message without a leading "<input name>: " (the log line names the input already)."""
    msg = str(e)
    for prefix in (f"{src}: ", f"{src.name}: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


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
        # (see faces.Tracker): real faces whose score sags between frames stay anonymized. Those
        # under det_thresh are looked at again zoomed (Detector.zoom_score): small faces the
        # frame-sized look scores low in every frame start tracks too.
        self.detector = Detector(weights.model_path(d.detector, options.models_dir),
                                 det_thresh=min(d.det_thresh, options.track.keep_thresh),
                                 det_size=d.det_size, min_face=d.min_face, providers=providers,
                                 precision=d.precision, rescore_below=d.det_thresh if d.zoom_weak else 0.0)
        self.runner = None
        self.embedder = None
        self.detail = 0  # align.paste(detail=): DETAIL_SCALE x the generator's crop with --keep-detail
        if options.method == "generate":
            ckpt = weights.generator_path(options.weights)  # clear ModelError before importing torch models
            from .model import load_generator

            gen = load_generator(ckpt, device="cpu")
            self.runner = engine.GeneratorRunner(gen, self.runtime, options.batch_size,
                                                 colour_match=options.colour_match,
                                                 first_pass_mouth=options.first_pass_mouth,
                                                 eye_pass=options.eye_pass)
            self.detail = DETAIL_SCALE * self.runner.size if options.keep_detail else 0
            self.embedder = engine.IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", options.models_dir),
                                                    providers, options.check_precision if options.identity_check
                                                    else "fp32")

    # -- rendering -------------------------------------------------------------------------
    def render(self, items: Sequence[tuple[np.ndarray, Sequence]], descriptors: dict,
               stages: Stages = NULL, passes: Optional[PassLevels] = None, stats: Optional[dict] = None,
               router=None) -> list[list]:
        """Anonymize a batch of frames in place.

        items: (image (H, W, 3) uint8 RGB, faces) pairs; faces have track_id, box, kps, interpolated.
        descriptors: track_id -> (D,) float32, filled in here for tracks seen for the first time.
        passes: generator passes per track, raised here by the identity check (one per video).
        stats: identity-check counters (see new_check_stats), updated here.
        router: which faces are generated and which get the fallback (routing.Router, one per video).
        Returns, per item, the list of touched rectangles.

        With ``generate`` this is :meth:`generate` then :meth:`finish`, which process_frames runs
        in two threads (the next batch is generated while this one is checked and pasted).
        """
        from .methods import apply_classic

        o = self.options
        if o.method != "generate":
            with stages("blend"):
                return [apply_classic(img, faces, o.method, o.margin) for img, faces in items]
        passes = self.new_pass_levels() if passes is None else passes
        router = self.new_router() if router is None else router
        return self.finish(items, self.generate(items, descriptors, stages, passes, router), stages, passes, stats,
                           router)

    def generate(self, items: Sequence[tuple[np.ndarray, Sequence]], descriptors: dict, stages: Stages = NULL,
                 passes: Optional[PassLevels] = None, router=None) -> Optional["_Generated"]:
        """First half of :meth:`render` (method generate): align every face of ``items``, decide
        which the generator draws (``router``, routing.py; the others get the fallback in
        :meth:`finish`), describe their new tracks and run the generator at each face's pass
        count. Reads the images, changes nothing in them. None when there is no face."""
        from .align import estimate_transform, feather, warp_crop
        from .routing import face_height, measure, yaw

        passes = self.new_pass_levels() if passes is None else passes
        router = self.new_router() if router is None else router
        S, margin = self.runner.size, self.runner.margin
        jobs, crops, held = [], [], []
        with stages("align"):
            for i, (img, faces) in enumerate(items):
                for f in faces:
                    M = estimate_transform(f.kps, S, margin)
                    crop = warp_crop(img, M, S)
                    light, sharp = measure(crop, sharpness=router.soft_fraction > 0)
                    path = router.decide(f.track_id, face_height(f.box), yaw(f.kps), light, sharp)
                    if path != "generated":
                        held.append((i, f, path))
                        continue
                    jobs.append((i, M, f))
                    crops.append(crop)
        if not jobs and not held:
            return None
        drawn: list[list] = [[] for _ in items]  # per item, the faces the generator draws
        for i, _, f in jobs:
            drawn[i].append(f)
        with stages("identity"):  # only the tracks the generator draws need a descriptor
            self._describe_new_tracks([(img, fs) for (img, _), fs in zip(items, drawn)], descriptors)
        tracks = [f.track_id for _, _, f in jobs]
        desc = np.stack([descriptors[t] for t in tracks]).astype(np.float32) if jobs else np.zeros((0, 128), np.float32)
        crops = np.stack(crops) if jobs else np.zeros((0, S, S, 3), np.uint8)
        levels = np.array([min(passes.take(t), router.passes_for(face_height(f.box)))
                           for t, (_, _, f) in zip(tracks, jobs)], np.int64)
        with stages("generate"):
            raw, mask = self.runner.run(crops, desc, levels)
        return _Generated(jobs, crops, desc, tracks, levels, raw, [feather(m, S) for m in mask], [None] * len(jobs),
                          held)

    def finish(self, items: Sequence[tuple[np.ndarray, Sequence]], gen: Optional["_Generated"],
               stages: Stages = NULL, passes: Optional[PassLevels] = None, stats: Optional[dict] = None,
               router=None) -> list[list]:
        """Second half of :meth:`render`: the identity check (``--identity-check``) on ``gen``
        (from :meth:`generate` on the same ``items``), then paste every generated face into its
        image, then give the others the fallback (last, so that nothing is pasted over it).
        Returns, per item, the list of touched rectangles."""
        from .align import paste, put_region
        from .methods import apply_classic
        from .routing import face_height

        o = self.options
        passes = self.new_pass_levels() if passes is None else passes
        stats = new_check_stats() if stats is None else stats
        router = self.new_router() if router is None else router
        rects: list[list] = [[] for _ in items]
        if gen is None:
            return rects
        fallback = np.zeros(len(gen.jobs), bool)
        if o.identity_check and len(gen.jobs):
            fallback = self._check_identity(gen, passes, stats, stages, items, router)
        covered = list(gen.held) + [(i, f, "check") for j, (i, _, f) in enumerate(gen.jobs) if fallback[j]]
        with stages("blend"):
            for j, ((i, M, f), r, m) in enumerate(zip(gen.jobs, gen.raw, gen.masks)):
                if fallback[j]:
                    continue
                router.count("generated", face_height(f.box))
                region = gen.regions[j]
                if region is not None and not any(_overlap(region[0], b) for b in rects[i]):
                    # what the check embedded, computed on this frame as it still is here
                    box = put_region(items[i][0], region)
                else:  # no check, or a face already pasted in this frame overlaps it
                    box = paste(items[i][0], r, m, M, self.detail)
                if box is not None:
                    rects[i].append(box)
            for i, f, path in covered:
                router.count(path, face_height(f.box))
                rects[i].extend(apply_classic(items[i][0], [f], o.fallback, o.margin))
        return rects

    def new_router(self):
        """Per-file routing state (routing.Router): which faces are generated, which get the fallback."""
        from .routing import new_router

        return new_router(self.options)

    def new_pass_levels(self) -> PassLevels:
        """Per-file pass counts: ``--passes``, raised by the identity check for ``--pass-hold`` faces."""
        return PassLevels(self.options.passes, self.options.pass_hold)

    def _check_identity(self, gen: "_Generated", passes: PassLevels, stats: dict, stages: Stages,
                        items: Sequence[tuple[np.ndarray, Sequence]], router) -> np.ndarray:
        """The identity check (``--identity-check``): embed every generated face as it will be
        pasted (feathered mask; with ``--keep-detail``, the ArcFace crop of the frame as the paste
        will leave it, align.pasted_region + region_arcface, since the frame's own finer detail stays) and compare
        it with its track's descriptor and with the input face of the same frame (a pose far from
        the track's first faces can be closer to the input than to the descriptor). A face whose
        higher cosine is >= ``check_thresh``, or whose ArcFace crop differs from the input's by less
        than :data:`CHECK_MIN_CHANGE` (a faint face), is generated again with one more pass, up to
        ``max_passes`` (``small_max_passes`` for a face under routing.LARGE_FACE px), and its track
        keeps the higher count for the next ``pass_hold`` of its faces (0: for good; see
        PassLevels). A face still too close after its most passes gets the fallback (blur), and so
        do its track's next ``pass_hold`` faces (routing.Router.failed_check): more passes are what
        draw masks on a face. A face generated with fewer passes than its track has
        reached meanwhile (the batch was generated while an earlier one was checked) is generated
        again at the track's count first. Updates ``gen`` in place; returns the faces to blur
        (bool per face)."""
        from .align import feather

        from .routing import face_height

        o = self.options
        S = self.runner.size
        crops, desc, tracks, levels, raw, masks = gen.crops, gen.desc, gen.tracks, gen.levels, gen.raw, gen.masks
        most = np.array([router.passes_for(face_height(f.box)) for _, _, f in gen.jobs], np.int64)
        fallback = np.zeros(len(crops), bool)
        behind = np.flatnonzero([min(passes.get(t), m) > lv for t, lv, m in zip(tracks, levels, most)])
        if len(behind):
            levels[behind] = [min(passes.get(tracks[j]), most[j]) for j in behind]  # not counted: no check asked
            with stages("generate"):
                r, m = self.runner.run(crops[behind], desc[behind], levels[behind])
            for j, rj, mj in zip(behind, r, m):
                masks[j] = feather(mj, S)
                raw[j] = rj
        todo = np.arange(len(crops))
        calm = np.array([passes.calm.get(t, 0) >= CALM_FACES for t in tracks])
        if calm.any():  # every other face of a calm track (in the batch's order, which is frame order)
            skip = np.zeros(len(crops), bool)
            seen_t: dict = {}
            for j in np.flatnonzero(calm):
                if j in behind:
                    continue
                seen_t[tracks[j]] = k = seen_t.get(tracks[j], passes.calm[tracks[j]]) + 1
                skip[j] = k % 2 == 1
            todo = np.flatnonzero(~skip)
            stats["skipped"] += int(skip.sum())
        if self.detail:
            from .align import arcface_crop, pasted_region, region_arcface

            frames = [items[i][0] for i, _, _ in gen.jobs]

            def seen(idx):  # as the output frame will show them; finish writes the same pixels
                for j in idx:
                    gen.regions[j] = pasted_region(frames[j], raw[j], masks[j], gen.jobs[j][1], self.detail)
                c112 = [region_arcface(frames[j], gen.regions[j], gen.jobs[j][2].kps) for j in idx]
                return self.embedder.embed_check(c112), np.stack(c112)
            with stages("identity"):
                own, own112 = self._own_embeddings(gen, todo, lambda j: arcface_crop(frames[j], gen.jobs[j][2].kps))
        else:
            from .align import arcface_squares

            def seen(idx):
                squares = arcface_squares(_blend_crops(crops[idx], raw[idx], [masks[j] for j in idx]), S,
                                          self.runner.margin)
                return self.embedder.embed_check(squares), np.stack(squares)
            with stages("identity"):
                own, own112 = self._own_embeddings(gen, todo, None)
        while len(todo):
            with stages("identity"):
                emb, out112 = seen(todo)
                cos = np.maximum(np.einsum("nd,nd->n", emb, desc[todo]), np.einsum("nd,nd->n", emb, own[todo]))
                change = np.abs(out112.astype(np.int16) - own112[todo].astype(np.int16)).mean((1, 2, 3))
            stats["checked"] += len(todo)
            stats["cos_max"] = max(stats["cos_max"], float(cos.max()))
            faint = change < CHECK_MIN_CHANGE
            stats["faint"] += int(faint.sum())
            for j, c, f in zip(todo, cos, faint):
                t = tracks[j]
                passes.calm[t] = passes.calm.get(t, 0) + 1 if c < o.check_thresh - CALM_MARGIN and not f else 0
            todo = todo[(cos >= o.check_thresh) | faint]
            if not len(todo):
                break
            top = levels[todo] >= most[todo]
            fallback[todo[top]] = True
            for j in todo[top]:
                router.failed_check(tracks[j])
            up = todo[~top]
            levels[up] += 1
            stats["regenerated"] += len(up)
            for j in up:
                passes.raise_to(tracks[j], int(levels[j]))
            todo = up
            if not len(todo):
                break
            with stages("generate"):
                r, m = self.runner.run(crops[todo], desc[todo], levels[todo])
            for j, rj, mj in zip(todo, r, m):
                masks[j] = feather(mj, S)
                raw[j] = rj
        stats["fallback"] += int(fallback.sum())
        return fallback

    def _own_embeddings(self, gen: "_Generated", idx: np.ndarray, crop112) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) embeddings of the input faces of ``gen`` for the identity check and their (N, 112,
        112, 3) uint8 ArcFace crops, filled in for the faces ``idx`` (the others stay 0). Each face's own frame: reusing a track's embedding of a
        few frames before let faces through where the expression changes fast (stress set, lp_d6
        in a 3x3 mosaic: frames 1-3 compared with frame 0's face, verified at cosine 0.34-0.52).
        ``crop112(j)``: face j's 112 px input crop, or None for the generator crops' squares
        (align.arcface_squares, as in training)."""
        from .align import arcface_squares

        out = np.zeros((len(gen.jobs), gen.desc.shape[1]), np.float32)
        c112 = np.zeros((len(gen.jobs), 112, 112, 3), np.uint8)
        if len(idx):
            c112[idx] = np.stack([crop112(j) for j in idx] if crop112 is not None
                                 else arcface_squares(gen.crops[idx], self.runner.size, self.runner.margin))
            out[idx] = self.embedder.embed_check(list(c112[idx]))
        return out, c112

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
        small0, raised0 = self.detector.n_small, self.detector.n_raised
        every = self.options.detect.detect_every

        def take(final):
            for idx, faces in final:
                vf = pending.popleft()
                assert vf.index == idx, (vf.index, idx)
                yield vf, faces

        for vf in frames:
            dets = None
            if vf.index % every == 0:
                with stages("detect"):
                    dets = self.detector.detect(vf.image)
            else:
                result.frames_not_detected += 1
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
        result.faces_predicted = tracker.n_predicted
        result.faces_below_min_size = self.detector.n_small - small0
        result.faces_raised_zoomed = self.detector.n_raised - raised0

    def process_frames(self, frames: Iterator, result: FileResult, fps: Optional[float],
                       stages: Stages = NULL, threads: bool = True) -> Iterator:
        """Transform decoded frames into (frame, image, rects), in order (see video.transcode_video).

        Detection and tracking run in their own thread (``threads``), a few frames ahead of
        rendering, which batches faces across frames for the generator. With ``generate`` the
        generator runs in a thread of its own too, one batch ahead of the identity check and the
        pasting (Pipeline.generate / Pipeline.finish).
        """
        tracked = self.detect_and_track(frames, result, fps, stages)
        if threads:
            tracked = prefetch(tracked, QUEUE_FRAMES, "deid-detect")
        descriptors: dict = {}
        passes = self.new_pass_levels()
        router = self.new_router()
        check = new_check_stats()
        generate = self.options.method == "generate"
        batch_faces = self.options.batch_size if generate else 1

        def batches() -> Iterator[list]:
            ready: list = []  # (frame, faces) waiting for a full generator batch
            n_faces = 0
            # The first batches are smaller (a quarter of --batch-size, doubling), so that the
            # generator, the check and the encoder start while the detector is still alone
            # (1280x720, 2 cores: the first full batch of 32 faces waits on 16 detected frames).
            target = max(1, batch_faces // FIRST_BATCH_DIVISOR)
            for vf, faces in tracked:
                ready.append((vf, faces))
                n_faces += len(faces)
                if n_faces >= target or len(ready) >= MAX_PENDING_FRAMES:
                    yield ready
                    ready, n_faces = [], 0
                    target = min(batch_faces, 2 * target)
            if ready:
                yield ready

        def generated() -> Iterator[tuple[list, list, Optional[_Generated]]]:
            for batch in batches():
                imgs = [(vf.image, faces) for vf, faces in batch]
                yield batch, imgs, self.generate(imgs, descriptors, stages, passes, router)

        if generate:
            work = prefetch(generated(), 1, "deid-generate") if threads else generated()
        else:
            work = ((batch, None, None) for batch in batches())
        try:
            for batch, imgs, gen in work:
                # Rendered in place: nothing reads a frame's decoded picture afterwards (the writer
                # takes the pixels outside the touched rectangles from the decoded planes).
                if generate:
                    rects = self.finish(imgs, gen, stages, passes, check, router)
                else:
                    rects = self.render([(vf.image, faces) for vf, faces in batch], descriptors, stages)
                for (vf, faces), r in zip(batch, rects):
                    result.frames += 1
                    result.faces_anonymized += len(faces)
                    n_interp = sum(1 for f in faces if f.interpolated)
                    result.faces_interpolated += n_interp
                    result.frames_interpolated += n_interp > 0
                    yield vf, vf.image, r
            result.add_check_stats(check, passes)
            result.add_route_stats(router)
        finally:
            for it in (work, tracked):
                if hasattr(it, "close"):
                    it.close()

    def image(self, img: np.ndarray, result: FileResult) -> np.ndarray:
        from .faces import Tracker

        dets = self.detector.detect(img)
        tracker = Tracker(self.options.track, start_thresh=self.options.detect.det_thresh)
        final = tracker.push(0, dets) + tracker.flush()
        result.faces_detected = tracker.n_detections - tracker.n_weak_dropped
        faces = final[0][1] if final else []
        out = img.copy()
        passes = self.new_pass_levels()
        check = new_check_stats()
        router = self.new_router()
        self.render([(out, faces)], {}, NULL, passes, check, router)
        result.add_check_stats(check, passes)
        result.add_route_stats(router)
        result.frames = 1
        result.faces_anonymized = len(faces)
        result.tracks = len({f.track_id for f in faces})
        return out


@dataclass
class _Generated:
    """The generator's output for one batch (Pipeline.generate), per face j:
    jobs[j] = (item index, M (2, 3) frame -> crop, face); crops (N, S, S, 3) uint8 RGB input
    crops; desc (N, D) float32 track descriptors; tracks[j] track id; levels (N,) int64 passes
    run; raw (N, S, S, 3) uint8 RGB; masks[j] (S, S) float32 in [0, 1], feathered; regions[j]
    None or align.pasted_region of the face's current raw and mask on its frame as it was before
    any face of the batch was pasted (set by the identity check, which embeds that). held: the
    faces not generated, (item index, face, reason) each (routing.py), given the fallback."""

    jobs: list
    crops: np.ndarray
    desc: np.ndarray
    tracks: list
    levels: np.ndarray
    raw: np.ndarray
    masks: list
    regions: list
    held: list = field(default_factory=list)


def _overlap(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether rectangles (x0, y0, x1, y1) share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _blend_crops(crops: np.ndarray, raw: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """The crops (N, S, S, 3) uint8 as they will be pasted: ``mask * raw + (1 - mask) * crop``."""
    m = np.stack(masks)[..., None]
    return np.rint(m * raw + (1 - m) * crops.astype(np.float32)).clip(0, 255).astype(np.uint8)


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
    if not jobs:
        # A folder is always a folder run, even when named like a video ("x.mp4/"); such a folder
        # with nothing to process is almost certainly a mistake, a plain empty folder is not.
        kind = media_kind(src)
        if kind is not None:
            raise InputError(f"{src}: is a folder, not a{'n' if kind == 'image' else ''} {kind} file, "
                             f"and holds no image or video files")
        log.warning("%s: no image or video files in this folder; nothing to do", src)
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
                st = video.transcode_video(src, tmp, lambda frames: pipe.process_frames(frames, res, fps, stages),
                                           options.encode, on_frame=lambda n: progress.advance(1), stages=stages)
            res.add_transcode_stats(st)
        finally:
            progress.end_file()
    else:
        out = pipe.image(img, res)
        with video.atomic_output(dst) as tmp:
            video.write_image(tmp, out)
    res.finish(stages, t0)
    return res


def anonymize(src, dst, options: Optional[AnonymizeOptions] = None, progress: Optional[Progress] = None) -> dict:
    """Anonymize every face in ``src`` (a video, an image, or a folder of them) into ``dst``.

    Never raises for a failed input file: each file's status is in the report, and the run
    goes on. Raises ModelError when a model cannot be loaded (nothing can be done then),
    InputError/OutputError when the arguments themselves are unusable, and on KeyboardInterrupt
    (Ctrl-C, or the CLI's SIGTERM handler) :class:`~deidcli.errors.Interrupted` carrying the report
    so far, after removing the partial output. Returns the report dict (see README).

    Safe to run several times at once over the same folder: each output is worked on under a lock
    (see jobs.py), an output another run is writing is skipped, and temporary files left by killed
    runs are removed first. ``options.shard`` keeps one shard of the inputs; ``options.dry_run``
    returns the plan instead (see :func:`_dry_run`).
    """
    options = options or AnonymizeOptions()
    progress = progress or Progress()
    if PIPE in (str(src), str(dst)):  # stdin and/or stdout: one stream, its own rules
        return _anonymize_pipe(src, dst, options, progress)
    if options.encode.format:
        raise ValueError("--format applies to DST - (stdout) only; a file's container follows its extension")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    jobs = plan_jobs(src, dst)
    if options.shard is not None:
        jobs = select_shard(jobs, src, options.shard)
    if options.dry_run:
        return _dry_run(jobs, options)
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
    stale: list[Path] = []
    started = time.time()

    def make_report() -> dict:
        return _report(results, pipeline, load_seconds, options, stale)

    try:
        if src.is_dir():
            stale = clean_stale(dst, recursive=True)
        else:
            for _, d in jobs:
                stale += clean_stale(d, recursive=False)
        for q in stale:
            log.warning("removed %s, left by a deid run that was killed", q)
        for s, d in jobs:
            results.append(_run_job(factory, s, d, options, progress, started))
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        n = len(results)  # jobs[n] was in progress (its output removed on the way out)
        if n < len(jobs):
            s, d = jobs[n]
            results.append(FileResult(input=str(s), output=str(d), status="interrupted",
                                      error="interrupted; partial output removed", exit_code=128 + signum))
        results.extend(FileResult(input=str(s), output=str(d), status="pending", error="not started (interrupted)")
                       for s, d in jobs[n + 1:])
        report = make_report()
        report["interrupted_by"] = signal.Signals(signum).name
        raise Interrupted(signum, report) from None
    return make_report()


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, deepest first."""
    made = []
    p = folder
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _run_job(factory: Callable[[], Pipeline], src: Path, dst: Path, options: AnonymizeOptions, progress: Progress,
             started: float) -> FileResult:
    """One input of a run: skipped when its output exists or another run holds its lock, else
    processed while holding that lock. A failure is returned as a "failed" result (ModelError,
    KeyboardInterrupt and SystemExit go through)."""

    def skipped(why: str) -> FileResult:
        log.info("skip %s: %s", src, why)
        return FileResult(input=str(src), output=str(dst), status="skipped", error=why)

    def failed(e: BaseException, reason: Optional[str] = None) -> FileResult:
        reason = reason or (dest_reason(e) if isinstance(e, (OutputError, OSError)) else None)
        if reason:  # disk full, read-only, permission: name the output, not the temporary file
            msg = f"{dst}: {reason}"
            log.error("%s", msg)
        elif isinstance(e, DeidError):
            msg = str(e)
            log.error("%s: %s", src, _reason(e, src))
        else:  # a bug or an unexpected library error: report it, go on
            msg = f"{type(e).__name__}: {e}"
            log.debug("unexpected error", exc_info=True)
            log.error("%s: %s", src, msg)
        return FileResult(input=str(src), output=str(dst), status="failed", error=msg,
                          exit_code=getattr(e, "exit_code", 1) if isinstance(e, DeidError) else 1)

    if dst.exists() and not options.overwrite:
        return skipped("output exists (use --overwrite to replace it)")
    made: list[Path] = []
    try:
        made = _make_dirs(dst.parent)
        lock = try_lock(dst)
    except OSError as e:  # the output's folder or lock file cannot be created
        return failed(e, dest_reason(e) or f"cannot create {e.filename or dst} ({e.strerror or e})")
    try:
        if lock is None:
            return skipped(owner_text(read_owner(lock_path(dst))))
        with lock:
            if dst.exists() and (not options.overwrite or dst.stat().st_mtime >= started):
                return skipped("output written by another deid run meanwhile")
            try:
                res = _process_file(factory, src, dst, options, progress)
            except ModelError:
                raise
            except Exception as e:
                return failed(e)
            log.info("done %s -> %s", src, dst)
            return res
    finally:
        for folder in made:  # created for this output, left empty by a failure
            try:
                folder.rmdir()
            except OSError:
                break


def _dry_run(jobs: Sequence[tuple[Path, Path]], options: AnonymizeOptions) -> dict:
    """What a run would do with each input (process, overwrite, skip), with the same rules as a run.
    Loads no model, opens no input, writes nothing."""
    files = []
    for s, d in jobs:
        exists = d.exists()
        owner = None if exists and not options.overwrite else lock_owner(d)
        if exists and not options.overwrite:
            action, reason = "skip", "output exists"
        elif owner is not None:
            action, reason = "skip", owner_text(owner)
        elif exists:
            action, reason = "overwrite", "output exists"
        else:
            action, reason = "process", None
        files.append({"input": str(s), "output": str(d), "action": action, "reason": reason})
    return {"dry_run": True, "files": files,
            **counts((f["action"] for f in files), ("process", "overwrite", "skip")),
            "options": options.to_dict()}


# --- pipes: "-" as SRC (stdin) and/or DST (stdout) --------------------------------------------

#: The name that stands for stdin (as SRC) or stdout (as DST).
PIPE = "-"


@contextlib.contextmanager
def _set_on_signals(event: threading.Event, seen: list) -> Iterator[None]:
    """While inside (main thread only): SIGINT and SIGTERM also set ``event`` and are appended to
    ``seen``, then the handler in place runs (the CLI's, or Python's Ctrl-C). ``seen`` matters
    when that handler's exception was raised inside FFmpeg's read callback, which drops it."""
    prev = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if callable(handler):
                def chained(signum, frame, handler=handler):
                    seen.append(signum)
                    event.set()
                    handler(signum, frame)

                prev[sig] = handler
                signal.signal(sig, chained)
    try:
        yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)


def _report(results: Sequence[FileResult], pipeline: Optional[Pipeline], load_seconds: float,
            options: AnonymizeOptions, stale: Sequence[Path]) -> dict:
    """The run's report (README, "JSON report"), for file/folder runs and pipes alike."""
    return {
        "files": [r.__dict__ for r in results],
        **counts((r.status for r in results), ("ok", "skipped", "failed", "interrupted", "pending")),
        "device": pipeline.runtime.device if pipeline else None,
        "dtype": pipeline.runtime.dtype if pipeline else None,
        "generator_backend": pipeline.runner.backend if pipeline and pipeline.runner else None,
        "detector_precision": pipeline.detector.precision if pipeline else None,  # int8 | fp32, as run
        "check_precision": (pipeline.embedder.check_precision  # identity check: int8 | fp32, as run; None: no check
                            if pipeline and pipeline.embedder and options.identity_check else None),
        "load_seconds": load_seconds,  # loading the models, once per run
        "versions": _versions(),
        "options": options.to_dict(),
        "stale_files_removed": [str(q) for q in stale],  # temporary files of killed runs
    }


def _anonymize_pipe(src, dst, options: AnonymizeOptions, progress: Progress) -> dict:
    """One video from stdin (SRC ``-``) and/or to stdout (DST ``-``); the other side may be a file.

    stdin is opened once (a pipe cannot be read twice) and checked before the models load.
    stdout carries only the video stream, in ``options.encode.format`` (default matroska),
    written as it is encoded: there is no atomic rename on a pipe, so on a failure the stream is
    cut and the file's status is "failed" (the CLI then exits non-zero). While the stream is
    open, file descriptor 1 points at stderr (see video.stdout_stream). A file DST is written
    atomically and skipped if it exists, as usual; there is no folder, shard, lock or dry run.
    """
    from . import video
    from .options import PIPE_FORMATS

    src_pipe, dst_pipe = str(src) == PIPE, str(dst) == PIPE
    src, dst = Path(src), Path(dst)
    if options.encode.format and not dst_pipe:
        raise ValueError("--format applies to DST - (stdout) only; a file's container follows its extension")
    if options.dry_run or options.shard is not None:
        raise ValueError("--dry-run and --shard do not apply to - (stdin/stdout)")
    if not src_pipe:
        if not src.is_file():
            raise InputError(f"{src}: no such file" if not src.exists() else
                             f"{src}: only one video file can be written to stdout, not a folder")
        if video.media_kind(src) != "video":
            raise InputError(f"{src}: only a video can be written to stdout (by extension: .mp4, .mkv, ...)")
    if not dst_pipe:
        if dst.is_dir():
            raise OutputError(f"{dst}: is a folder; give the output file's name when reading stdin")
        if video.media_kind(dst) != "video":
            raise OutputError(f"{dst}: the output of a stream read from stdin must be a video file "
                              f"(.mp4, .mkv, ...; got {dst.suffix or 'no extension'!r})")
    res = FileResult(input=str(src), output=str(dst), kind="video")
    pipeline: Optional[Pipeline] = None
    load_seconds = 0.0

    def report() -> dict:
        return _report([res], pipeline, load_seconds, options, [])

    if not dst_pipe and dst.exists() and not options.overwrite:
        res.status, res.error = "skipped", "output exists (use --overwrite to replace it)"
        log.info("skip %s: %s exists", src, dst)
        return report()
    name = "stdin" if src_pipe else src.name
    stages = Stages()
    signals: list = []  # SIGINT/SIGTERM received while stdin was open
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(video.stdout_stream()) if dst_pipe else None  # first: guards stdout
            inp = None
            if src_pipe:
                abort = threading.Event()  # a signal while upstream is silent: stdin then reads as ended
                stack.enter_context(_set_on_signals(abort, signals))
                inp = video.open_stream(name=name, abort=abort)
                stack.callback(inp.close)  # transcode_video closes it too; closing twice is harmless
                rate, total = video.stream_rate(inp), None
            else:
                info = video.probe(src)
                rate, total = info.average_rate, info.frames or None
            fps = float(rate) if rate else None
            t = time.perf_counter()
            pipeline = Pipeline(options)
            load_seconds = round(time.perf_counter() - t, 3)
            t0 = time.perf_counter()
            if not dst_pipe:
                dst.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(video.atomic_output(dst))
            progress.start_file(Path(name), total)
            try:
                st = video.transcode_video(name if src_pipe else src, out,
                                           lambda frames: pipeline.process_frames(frames, res, fps, stages),
                                           options.encode, on_frame=lambda n: progress.advance(1), stages=stages,
                                           input_container=inp,
                                           output_format=(options.encode.format or PIPE_FORMATS[0]) if dst_pipe
                                           else None)
                res.add_transcode_stats(st)
            finally:
                progress.end_file()
        if signals:  # its exception was lost in a read callback; the stream was ended early
            raise Interrupted(signals[0])
        res.finish(stages, t0)
        log.info("done %s -> %s", src, dst)
    except ModelError:
        raise
    except (KeyboardInterrupt, Exception) as e:
        if not (isinstance(e, KeyboardInterrupt) or signals):
            return _pipe_failed(e, res, report, before_models=pipeline is None)
        signum = getattr(e, "signum", None) or (signals[0] if signals else signal.SIGINT)
        res.status, res.exit_code = "interrupted", 128 + signum
        res.error = "interrupted; " + ("the stream was cut" if dst_pipe else "partial output removed")
        rep = report()
        rep["interrupted_by"] = signal.Signals(signum).name
        raise Interrupted(signum, rep) from None
    return report()


def _pipe_failed(e: Exception, res: FileResult, report: Callable[[], dict], before_models: bool) -> dict:
    """The stream is cut (or the output file not written): one line on stderr, status failed."""
    if isinstance(e, ValueError) and before_models:
        raise e  # an unusable --device and similar: a usage error, as for files
    msg = str(e) if isinstance(e, DeidError) else f"{type(e).__name__}: {e}"
    if not isinstance(e, DeidError):
        log.debug("unexpected error", exc_info=(type(e), e, e.__traceback__))
    res.status, res.error = "failed", msg
    res.exit_code = e.exit_code if isinstance(e, DeidError) else 1
    log.error("%s", msg)
    return report()
