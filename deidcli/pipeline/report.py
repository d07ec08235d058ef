"""What a run reports: per-file results (FileResult), pass levels, progress callbacks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..stages import Stages


def new_check_stats() -> dict:
    """Counters of the identity check for one file (see Pipeline._check_identity)."""
    return {"checked": 0, "regenerated": 0, "fallback": 0, "skipped": 0, "faint": 0, "cos_max": -1.0,
            "overlap_checked": 0, "overlap_failed": 0, "redescribed": 0, "fallback_closer": 0,
            "lost": 0, "blotch": 0}


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
        self.calm_turn: dict = {}  # track -> faces of it seen while calm, checked or not (pipeline.calm_skips)

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
    # --search-every (faces/looks.py): frames searched whole and frames looked at only around the
    # followed faces; searches made early (a followed face not found near its box, a cut, near
    # looks as costly as a search); faces the near looks found; faces of new tracks found looking back
    cuts: int = 0  # cuts seen (every track ends at a cut)
    frames_searched: int = 0
    frames_near: int = 0
    searches_lost: int = 0
    searches_cut: int = 0
    searches_crowded: int = 0
    faces_near: int = 0
    faces_found_back: int = 0
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
    faces_fallback_closer: int = 0  # failed at their most passes, left generated: the fallback left more of the person
    faces_lost_fallback: int = 0  # generated, then given the fallback: the detector no longer found them (face check)
    faces_blotch_fallback: int = 0  # generated, then given the fallback: black or white patches (blotch guard, faces/blotch.py)
    faces_overlap_checked: int = 0  # generated faces whose paste meets another's, checked again after both
    faces_overlap_failed: int = 0  # of those, the ones that failed then and got the fallback
    tracks_redescribed: int = 0  # track descriptors revised from sharper faces (pipeline/descriptors.py)
    faces_held_passes: int = 0  # faces generated above --passes because their track was raised (--pass-hold)
    check_cos_max: Optional[float] = None
    track_passes: dict = field(default_factory=dict)  # track -> highest passes it was raised to, where above --passes
    # generate: the path each face took (routing.py): "generated", or the fallback's reason (small,
    # turned, dark, check), and the same by face height ("<48", "48-96", "96-192", ">=192" px)
    face_paths: dict = field(default_factory=dict)
    faces_by_size: dict = field(default_factory=dict)
    # --keep / --only (pipeline/people.py): faces left untouched, and every track with its
    # decision ("kept": left as decoded, "anonymized"), similarity to the nearest reference person
    # and the reason; empty without --keep / --only
    faces_kept: int = 0
    track_decisions: list = field(default_factory=list)
    # --target: each track the generator drew, with the target it was steered towards
    # (people.target_of); empty without --target
    track_targets: list = field(default_factory=list)

    def add_track_decisions(self, chooser) -> None:
        if chooser is None:
            return
        self.track_decisions = chooser.report()
        self.faces_kept = sum(t["faces_kept"] for t in self.track_decisions)

    def add_track_targets(self, targets: list, descriptors: dict) -> None:
        """``targets``: the loaded people.Person targets; ``descriptors``: track -> descriptor of
        the tracks the generator drew (Pipeline.generate)."""
        if not targets:
            return
        from .people import target_of

        self.track_targets = [{"track": t, "target": target_of(t, targets).name}
                              for t in sorted(k for k in descriptors if isinstance(k, int))]

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
        self.faces_blurred_fallback += stats["fallback"] + stats["overlap_failed"]
        self.faces_overlap_checked += stats["overlap_checked"]
        self.faces_overlap_failed += stats["overlap_failed"]
        self.tracks_redescribed += stats["redescribed"]
        self.faces_fallback_closer += stats["fallback_closer"]
        self.faces_lost_fallback += stats["lost"]
        self.faces_blotch_fallback += stats["blotch"]
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
