"""Tracking: faces followed across frames (Tracker), smoothed with a One Euro filter.

The tracker lags the detector by at most ``max_gap`` frames: a face the detector misses
for a few frames inside a track is filled in by linear interpolation (``Face.interpolated``),
because a single exposed frame defeats the purpose. The caller keeps the images of the
frames not yet returned; the tracker only buffers detections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..options import TrackOptions
from .detect import WEAK_MIN, Detections, box_iou


def _box_size(boxes: np.ndarray) -> np.ndarray:
    """Geometric mean of width and height of (..., 4) boxes, at least 1 pixel."""
    wh = np.clip(boxes[..., 2:] - boxes[..., :2], 1.0, None)
    return np.sqrt(wh[..., 0] * wh[..., 1])


# --------------------------------------------------------------------------------------
# Smoothing


class OneEuroFilter:
    """One-Euro filter (Casiez, Roussel & Vogel, CHI 2012) on a vector of coordinates.

    A first-order low-pass whose cutoff rises with speed: still points are smoothed hard
    (cutoff `min_cutoff` Hz), moving ones follow with little lag (cutoff grows by `beta`
    Hz per unit of speed). Speed is measured in face sizes per second (the pixel speed
    divided by `scale`, given with each sample), so the same parameters hold for small
    and large faces; one cutoff is shared by all coordinates of a face so that its
    landmarks keep their shape.

    rate: samples per second.
    """

    def __init__(self, rate: float, min_cutoff: float, beta: float, d_cutoff: float = 1.0):
        assert rate > 0 and min_cutoff > 0 and beta >= 0 and d_cutoff > 0
        self.rate = float(rate)
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.d_cutoff = float(d_cutoff)
        self._x: Optional[np.ndarray] = None  # last output
        self._dx: Optional[np.ndarray] = None  # filtered speed, scale units per second; None until the second sample

    def _alpha(self, cutoff: float) -> float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * self.rate)

    def __call__(self, x: np.ndarray, scale: float) -> np.ndarray:
        """Filter one sample: x any-shape float array in pixels, scale > 0 pixels."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None:
            self._x = x.copy()
            return self._x.copy()
        dx = (x - self._x) * self.rate / max(float(scale), 1e-6)
        if self._dx is None:
            # The speed estimate starts at the first step's speed, not at rest: a face whose track
            # starts in motion is followed from its second frame. Started at rest, the estimate
            # took ~5 frames to catch up: at 14 face sizes a second (a 56 px face of the stress
            # set's crowd_1080, whose track restarted in mid-motion) the second frame lagged 9% of
            # the face's size, the third 5% (tests/test_faces.py, the same filter on a straight
            # path; 2-3% now). A face's crop shifted by 9% of its size is a different input to the
            # generator and to the identity check.
            self._dx = dx
        else:
            a_d = self._alpha(self.d_cutoff)
            self._dx = self._dx + a_d * (dx - self._dx)
        speed = float(np.sqrt(np.mean(self._dx**2)))
        a = self._alpha(self.min_cutoff + self.beta * speed)
        self._x = self._x + a * (x - self._x)
        return self._x.copy()


# Smoothing parameters at TrackOptions.smooth == 1. Chosen on SCRFD-2.5G landmarks of five
# tracks in four clips of ../shared/videos (faces 120-440 px): the frame-to-frame jitter
# (std of second differences) drops 2.2-3x while the RMS distance to a zero-phase
# (Savitzky-Golay, 15 frames) reference stays at the raw detections' level (0.7-1.6 px);
# a lower beta smooths more but lags more (beta 4: 3-4x less jitter, up to 1.6x the error).
SMOOTH_MIN_CUTOFF_HZ = 1.0  # cutoff of a still face; divided by `smooth`
SMOOTH_BETA = 8.0  # Hz of cutoff added per face size per second of motion
SMOOTH_D_CUTOFF_HZ = 1.0  # cutoff of the speed estimate
DEFAULT_FPS = 30.0  # frame rate assumed when the caller gives none
#: Tracker padding (TrackOptions.pad): faces under PAD_BELOW px high, or within PAD_EDGE of their
#: size from the frame's border, at a track's first or last detection. The stress set's crowd_lfw
#: had faces of 18-60 px exposed on the frames just before and after their tracks, at the frame's
#: edges and at crossings: the detector loses such faces a frame or two before they are gone.
PAD_BELOW = 64
PAD_EDGE = 0.1

# Association gates besides IoU (TrackOptions.iou_thresh): a detection whose centre is
# within CENTRE_GATE face sizes of a track's predicted centre, and whose size is within
# SIZE_GATE times of it, may continue the track when the boxes barely overlap (fast motion).
CENTRE_GATE = 0.75
SIZE_GATE = 1.5
#: The centre gate of a track or tentative track seen once, whose speed is not known yet (it is
#: predicted where it was). The stress set's crowd_4k has a 26 px face moving 0.88 face sizes a
#: frame: at CENTRE_GATE every frame of it started a new track, and the frames between those
#: one-detection tracks went out as they were. It also has a 53 px woman running 1.6-1.7 face
#: sizes a frame: at 1.5 (until 2026-12-07) each of her detections started a track again, the
#: ones under the start threshold (0.32-0.42 in 5 of her first 15 frames) none, and those frames
#: went out as they were.
YOUNG_GATE = 2.0
_INFEASIBLE = 1e6


# --------------------------------------------------------------------------------------
# Tracking


@dataclass
class Face:
    """One face in one frame, as the tracker outputs it.

    track_id: the face's track, stable within a video, numbered from 0 in order of
    appearance. box: (4,) float32 x0, y0, x1, y1 pixels, smoothed. kps: (5, 2) float32
    pixels, smoothed. score: detector score (0.0 where interpolated). interpolated: the
    detector missed this face in this frame and the tracker filled it in. held: of those, a face
    held past its track's first or last detection (``TrackOptions.pad``, or frames the detector
    did not look at): where the face may be, not where it was seen.
    """

    track_id: int
    box: np.ndarray
    kps: np.ndarray
    score: float
    interpolated: bool
    held: bool = False


@dataclass
class _Obs:
    """A face in the buffer, before smoothing: raw detector (or interpolated) values."""

    track_id: int
    box: np.ndarray  # (4,) float64
    kps: np.ndarray  # (5, 2) float64
    score: float
    interpolated: bool
    held: bool = False


@dataclass(eq=False)
class _Track:
    track_id: int
    last: int  # frame of the last detection
    box: np.ndarray  # (4,) float64 box at `last`
    kps: np.ndarray  # (5, 2) float64 landmarks at `last`
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # box change per frame
    moving: bool = False  # velocity measured (detected twice or more)
    lead: list = field(default_factory=list)  # (frame, _Obs) held before the first detection

    def predict(self, index: int) -> np.ndarray:
        return self.box + self.velocity * (index - self.last)


def _held_box(box: np.ndarray, velocity: np.ndarray, steps: float) -> np.ndarray:
    """Where a held face is ``steps`` frames from ``box`` (negative: before it), at ``velocity`` (the
    box's change per frame): its centre moves at the box centre's speed, and its size follows the
    box's only where that grows. A box's size change at a track's end is mostly the border cutting
    the face, or the detector's estimate settling: carried on, it shrinks the box to nothing and
    then turns it inside out (stress set crowd_1080: a face coming in through the left border
    grew from 46 to 73 px in a frame as more of it showed, and the frames before were held at 18
    px, then at x0 9, x1 -12)."""
    centre = (box[:2] + box[2:]) / 2 + (velocity[:2] + velocity[2:]) / 2 * steps
    size = box[2:] - box[:2]
    size = np.maximum(size + (velocity[2:] - velocity[:2]) * steps, size)
    return np.concatenate([centre - size / 2, centre + size / 2])


def _moved_kps(track: _Track, box: np.ndarray) -> np.ndarray:
    """``track``'s last landmarks moved with its last box's centre to ``box``'s (a held face)."""
    return track.kps + (box[:2] + box[2:] - track.box[:2] - track.box[2:]) / 2


@dataclass(eq=False)
class _Tentative:
    """Detections below the start threshold linked over frames: not a track (yet). Its frames are
    held back so that, if one of its detections reaches the threshold, the new track covers them
    all (a face fading in, or sharpening, is anonymized from its first detection on). Compared by
    identity (it holds arrays): list.remove compares by value, which raised."""

    obs: list  # (frame, box (4,) float64, kps (5, 2) float64, score), oldest first
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    found_back: int = 0  # of obs, the first ones given as Tracker.push's history, not detected

    @property
    def last(self) -> int:
        return self.obs[-1][0]

    @property
    def moving(self) -> bool:
        """Velocity measured (two detections or more)."""
        return len(self.obs) > 1

    def predict(self, index: int) -> np.ndarray:
        return self.obs[-1][1] + self.velocity * (index - self.last)

    def add(self, index: int, box: np.ndarray, kps: np.ndarray, score: float) -> None:
        self.velocity = (box - self.obs[-1][1]) / (index - self.last)
        self.obs.append((index, box, kps, score))


class Tracker:
    """Links per-frame detections into tracks, fills short gaps, smooths landmarks.

    options: iou_thresh (minimum IoU between a track's predicted box and a detection),
    max_gap (frames a track may miss and still be filled), smooth (One-Euro strength,
    0 = off). fps: frame rate, for the smoothing filter (DEFAULT_FPS when None).

    Two thresholds (``start_thresh``): a detection below it only continues a track, or links up
    with other weak detections of the frames before into a tentative track; when a tentative
    track meets a detection at ``start_thresh`` it becomes a track that reaches back over all its
    weak detections (``options.reach_back`` frames at most), so a face that fades in, comes into
    focus or turns towards the camera is covered from its first detection, the first frame of a
    video included. A tentative track that never reaches the threshold covers nothing.

    Association: each live track predicts its box at the new frame (constant velocity);
    scipy's linear_sum_assignment pairs tracks and detections on cost 1 - IoU, or, for
    pairs below iou_thresh whose centres are within CENTRE_GATE face sizes (YOUNG_GATE for a track
    seen once, whose speed is unknown) and sizes
    within SIZE_GATE, on 1 + centre distance (so any IoU match is preferred). Unmatched
    detections start new tracks; a track unseen for more than max_gap frames ends, and
    nothing is invented after its last detection.

    Padding (``options.pad``): a face that is small (under PAD_BELOW px high) or cut by the frame's
    border (``frame_size``, within PAD_EDGE of its size) at its track's first or last detection is
    held over ``pad`` frames more before and after (its first box moved back, and its last box
    moved on, at the track's speed, never smaller than that box: :func:`_held_box`; before its
    second detection, where the speed is not known, at its first box), and so is a face whose
    first box moved back one step is cut by the border (it came in through it): the detector loses
    such faces a frame or two before they are gone. Held faces are marked ``held`` (the pipeline
    gives them the fallback) and counted in n_predicted. The output then lags the input by ``pad``
    frames more.

    Memory: the buffer holds at most max(max_gap, reach_back) + pad + 1 frames of detections.
    """

    def __init__(self, options: TrackOptions, fps: Optional[float] = None, start_thresh: float = 0.0):
        """start_thresh: score a detection needs to START a track; weaker detections (down to
        the detector's own threshold, options.keep_thresh in the pipeline) only continue a
        track they match, so a face whose score sags for a while stays covered."""
        if options.max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, not {options.max_gap}")
        if not 0.0 <= options.iou_thresh <= 1.0:
            raise ValueError(f"iou_thresh must be in [0, 1], not {options.iou_thresh}")
        if options.smooth < 0:
            raise ValueError(f"smooth must be >= 0, not {options.smooth}")
        if options.reach_back < 0:
            raise ValueError(f"reach_back must be >= 0, not {options.reach_back}")
        if options.pad < 0:
            raise ValueError(f"pad must be >= 0, not {options.pad}")
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0, not {fps}")
        self.options = options
        self.start_thresh = float(start_thresh)
        self.fps = float(fps) if fps else DEFAULT_FPS
        self._live: list[_Track] = []  # tracks that may still be continued
        self._tentative: list[_Tentative] = []  # weak detections that may still start a track
        self._frames: dict[int, list[_Obs]] = {}  # pushed, not yet final
        self._filters: dict[int, OneEuroFilter] = {}
        self._ended: dict[int, int] = {}  # track id -> last frame, for ended tracks
        self._next = 0  # index expected by push
        self._next_final = 0  # first frame not yet returned
        self.n_tracks = 0  # tracks started
        self.n_detections = 0  # faces detected
        self.n_interpolated = 0  # faces filled in
        self.n_frames = 0  # frames returned
        self.n_faces = 0  # faces returned
        self.max_buffered = 0  # most frames held at once
        self.n_weak_dropped = 0  # detections below start_thresh that ended in no track
        self.n_weak_kept = 0  # detections below start_thresh that continued or started a track
        self.n_reached_back = 0  # of those, faces covered by a track that reached back to them
        self.n_predicted = 0  # faces held over undetected frames at a track's start or end
        self._undetected: set[int] = set()  # buffered frames the detector did not look at
        self._unsearched: set[int] = set()  # buffered frames it looked at only around followed faces
        self._last_searched = -1  # the last frame searched for new faces
        self.n_found_back = 0  # faces of new tracks on frames not searched, from ``history``
        self._cut = 0  # the last cut (push(cut=True)): no track reaches back before it
        self.frame_size: Optional[tuple[int, int]] = None  # (width, height), for padding at the border

    # -- public ------------------------------------------------------------------------

    def predicted_boxes(self, index: int) -> np.ndarray:
        """(T, 4) float64: where the live tracks expect their faces in frame ``index`` (the next
        one pushed), for a detector that wants to know which faces are already followed."""
        return np.array([t.predict(index) for t in self._live], np.float64).reshape(-1, 4)

    def match(self, index: int, dets: Detections) -> tuple[list[int], list[int]]:
        """What :meth:`push` of ``dets`` at frame ``index`` would pair, without pushing: (the live
        tracks' positions in :meth:`predicted_boxes` that no detection continues, the indices of the
        detections that continue no live or tentative track, i.e. would start one)."""
        matches, unmatched = self._associate(index, dets, self._live, range(len(dets)))
        paired = {id(t) for t, _ in matches}
        _, new = self._associate(index, dets, self._tentative, unmatched)
        return [k for k, t in enumerate(self._live) if id(t) not in paired], new

    def push(self, index: int, dets: Optional[Detections], searched: bool = True,
             history: Optional[dict] = None, cut: bool = False) -> list[tuple[int, list[Face]]]:
        """Feed the detections of frame `index` (consecutive, from 0), or None for a frame the
        detector did not look at (``--detect-every``).

        ``searched`` False: the detector looked only around the faces already followed
        (Detector.detect_near), not for new ones. Such frames are kept back until a frame is
        searched again, and a track that starts there is extended back over them like over frames
        nobody looked at, except where ``history`` says where its face was: {detection index:
        [(frame, box (4,), kps (5, 2), score), ...] oldest first}, consecutive frames ending just
        before ``index``, all of them frames not searched (the caller looked back for a new face in
        the frames it kept, Detector.detect_near). The new face counts at the best score of its
        detection and its history: seen back at ``start_thresh`` it is a track, seen back at WEAK_MIN
        a tentative one, whatever the search itself scored it (a face that pops in between two
        searches can be clearer in its first frames than in the search's).

        ``cut``: the picture cut at this frame (faces/looks.py). Every track and tentative track
        ends before it, and no track is extended over it either way (held or padded): a face at
        the same place after a cut is another face, with its own track and descriptor.

        Returns the frames that are now final, in order, each as (index, faces sorted
        by track_id). A frame is final once no track can still be filled in it, so the
        output lags the input by at most max_gap frames.

        Frames without detection are covered by prediction: a track detected on both sides
        is interpolated through them; a track that starts at a detected frame is extended
        back over the undetected frames just before it (held at its first box), and one that
        ends is extended forward over the undetected frames just after its last detection
        (held at its last box). So every face seen at a detected frame is covered up to the
        neighbouring detected frames; only a face that appears and leaves between two
        detected frames is never seen.
        """
        assert index == self._next, f"frames must be pushed in order: expected {self._next}"
        self._next += 1
        if cut:
            for track in list(self._live):
                self._end(track)  # before this frame is buffered: nothing is held over into it
            self.n_weak_dropped += sum(len(t.obs) - t.found_back for t in self._tentative)
            self._tentative.clear()
            self._cut = index
        if dets is None:
            self._frames[index] = []
            self._undetected.add(index)
            self.max_buffered = max(self.max_buffered, len(self._frames))
            return []  # nothing can become final before the next detected frame
        assert isinstance(dets, Detections)
        self.n_detections += len(dets)
        obs: list[_Obs] = []
        self._frames[index] = obs
        self.max_buffered = max(self.max_buffered, len(self._frames))
        if searched:
            self._last_searched = index
        else:
            self._unsearched.add(index)

        matches, unmatched = self._associate(index, dets, self._live, range(len(dets)))
        for track, j in matches:
            self._continue(track, index, dets.boxes[j], dets.kps[j], float(dets.scores[j]))
            self.n_weak_kept += int(dets.scores[j] < self.start_thresh)
        # under WEAK_MIN a detection only continues a track (above), unless the frames looked at
        # back for it (``history``) saw it at WEAK_MIN or more: its score is the best of them
        history = history or {}
        best = {j: max([float(dets.scores[j])] + [float(o[3]) for o in history.get(j) or []]) for j in unmatched}
        n_unmatched = len(unmatched)
        unmatched = [j for j in unmatched if best[j] >= min(WEAK_MIN, self.start_thresh)]
        self.n_weak_dropped += n_unmatched - len(unmatched)
        grown, unmatched = self._associate(index, dets, self._tentative, unmatched)
        for tent, j in grown:
            box, kps = dets.boxes[j].astype(np.float64), dets.kps[j].astype(np.float64)
            tent.add(index, box, kps, float(dets.scores[j]))
            if dets.scores[j] >= self.start_thresh:  # the face is confirmed: a track from its first sighting
                self._tentative.remove(tent)
                self._promote(tent)
        for j in unmatched:
            box, kps = dets.boxes[j].astype(np.float64), dets.kps[j].astype(np.float64)
            back = history.get(j) or []
            assert not back or (back[-1][0] == index - 1 and all(f in self._unsearched for f, *_ in back)), \
                "history must run up to the frame before, over frames not searched"
            obs = [(f, np.asarray(b, np.float64), np.asarray(k, np.float64), float(sc)) for f, b, k, sc in back]
            obs.append((index, box, kps, float(dets.scores[j])))
            tent = _Tentative(obs[:1], found_back=len(back))
            for o in obs[1:]:
                tent.add(*o)
            self.n_found_back += len(back)
            if best[j] < self.start_thresh:  # seen at start_thresh back in a frame not searched: a track
                self._tentative.append(tent)
            else:
                self._promote(tent)

        # Tracks that can no longer be continued at index + 1 (gap > max_gap) end here; so do
        # tentative ones, and the weak detections older than reach_back are let go.
        for track in [t for t in self._live if index - t.last >= self.options.max_gap + 1]:
            self._end(track)
        for tent in list(self._tentative):
            if index - tent.last >= self.options.max_gap + 1:
                self._tentative.remove(tent)
                self.n_weak_dropped += len(tent.obs) - tent.found_back
                continue
            old = sum(1 for o in tent.obs if o[0] <= index - self.options.reach_back)
            if old:
                back = min(old, tent.found_back)
                tent.found_back -= back
                self.n_weak_dropped += old - back
                del tent.obs[:old]
                if not tent.obs:
                    self._tentative.remove(tent)
        # Frames up to the oldest live track's last detection, and before the oldest tentative
        # detection, can no longer change.
        # Nor can frames after the last searched one: a face found at the next may reach back.
        horizon = min([index - self.options.pad, self._last_searched] + [t.last for t in self._live]
                      + [t.obs[0][0] - 1 for t in self._tentative])
        return self._finalize(horizon)

    def _promote(self, tent: _Tentative) -> None:
        """Start a track from ``tent``'s detections (the last at start_thresh or above)."""
        first, box, kps, score = tent.obs[0]
        track = _Track(self.n_tracks, first, box.copy(), kps.copy())
        self.n_tracks += 1
        self._live.append(track)
        f = first - 1
        while f >= self._cut and (f in self._undetected or f in self._unsearched):  # back over frames nobody searched
            self._lead(track, f)
            f -= 1
        if self._padded(track.box):
            for f in range(f, f - self.options.pad, -1):
                if f < max(self._next_final, self._cut) or f not in self._frames:
                    break
                self._lead(track, f)
        self._add(first, track, score, interpolated=False)
        for f, box, kps, score in tent.obs[1:]:
            self._continue(track, f, box, kps, score)
        weak = len(tent.obs) - 1 - tent.found_back
        self.n_weak_kept += weak
        self.n_reached_back += weak

    def flush(self) -> list[tuple[int, list[Face]]]:
        """End of stream: every frame not yet returned, in order. Tracks end here."""
        for track in list(self._live):
            self._end(track)
        self.n_weak_dropped += sum(len(t.obs) - t.found_back for t in self._tentative)
        self._tentative.clear()
        return self._finalize(self._next - 1)

    def _end(self, track: _Track) -> None:
        self._live.remove(track)
        f = track.last + 1
        while f in self._undetected:  # extend forward over the frames nobody looked at
            self._frames[f].append(_Obs(track.track_id, track.box.copy(), track.kps.copy(), 0.0, True, True))
            self.n_predicted += 1
            f += 1
        if self._padded(track.box):
            for _ in range(self.options.pad):
                if f not in self._frames:
                    break
                box = _held_box(track.box, track.velocity, f - track.last)
                kps = _moved_kps(track, box)
                self._frames[f].append(_Obs(track.track_id, box, kps, 0.0, True, True))
                self.n_predicted += 1
                f += 1
        self._ended[track.track_id] = max(f - 1, track.last)

    def _padded(self, box: np.ndarray) -> bool:
        """Whether a track whose first or last box is ``box`` is padded (``options.pad``)."""
        if self.options.pad <= 0:
            return False
        return bool(box[3] - box[1] < PAD_BELOW) or self._cut_by_border(box)

    def _cut_by_border(self, box: np.ndarray) -> bool:
        """Whether ``box`` reaches within PAD_EDGE of its size of the frame's border."""
        if self.frame_size is None:
            return False
        W, H = self.frame_size
        m = PAD_EDGE * max(box[2] - box[0], box[3] - box[1])
        return bool(box[0] <= m or box[1] <= m or box[2] >= W - m or box[3] >= H - m)

    @property
    def stats(self) -> dict:
        return {
            "tracks": self.n_tracks,
            "detections": self.n_detections,
            "interpolated": self.n_interpolated,
            "frames": self.n_frames,
            "faces": self.n_faces,
        }

    # -- internals ---------------------------------------------------------------------

    def _associate(self, index: int, dets: Detections, tracks: Sequence, among: Sequence[int]):
        """Pairs (track, detection index) of ``tracks`` (live or tentative) and the detections
        ``among`` (indices into ``dets``), and the indices of ``among`` left unmatched."""
        among = list(among)
        n = len(among)
        if not tracks or n == 0:
            return [], among
        pred = np.stack([t.predict(index) for t in tracks])  # (T, 4)
        boxes = dets.boxes[among].astype(np.float64)
        iou = box_iou(pred, boxes)  # (T, N)
        size_p = _box_size(pred)[:, None]
        size_d = _box_size(boxes)[None, :]
        centre_p = (pred[:, None, :2] + pred[:, None, 2:]) / 2
        centre_d = (boxes[None, :, :2] + boxes[None, :, 2:]) / 2
        dist = np.linalg.norm(centre_p - centre_d, axis=2) / np.sqrt(size_p * size_d)
        ratio = np.maximum(size_p, size_d) / np.minimum(size_p, size_d)
        iou_ok = iou >= max(self.options.iou_thresh, 1e-6)
        gate = np.array([CENTRE_GATE if t.moving else YOUNG_GATE for t in tracks])[:, None]
        centre_ok = (dist <= gate) & (ratio <= SIZE_GATE)
        cost = np.where(iou_ok, 1.0 - iou, np.where(centre_ok, 1.0 + dist, _INFEASIBLE))

        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
        matches = [(tracks[r], among[c]) for r, c in zip(rows, cols) if cost[r, c] < _INFEASIBLE]
        matched = {c for _, c in matches}
        return matches, [j for j in among if j not in matched]

    def _lead(self, track: _Track, f: int, box: Optional[np.ndarray] = None) -> None:
        """Hold ``track``'s face at frame ``f``, before its first detection: at ``box`` (its first
        box when None; the landmarks moved with the box's centre)."""
        box = track.box.copy() if box is None else box
        kps = _moved_kps(track, box)
        o = _Obs(track.track_id, box, kps, 0.0, True, True)
        self._frames[f].append(o)
        track.lead.append((f, o))
        self.n_predicted += 1

    def _lead_back(self, track: _Track, velocity: np.ndarray) -> None:
        """At a track's second detection, when its speed is first known: the faces held before its
        first detection (at its first box) move back along that speed where they are not yet
        returned, and a track whose face came in through the frame's border (its first box moved
        back one step is cut by it) is held there now, as one cut by it at the first detection
        would have been. Stress set crowd_4k: a 129 px face coming in at 0.7 face sizes a frame was
        first found 28 px inside the border, and went out as it was the frame before."""
        first = track.last
        for f, o in track.lead:
            if f >= self._next_final:
                o.box = _held_box(track.box, velocity, f - first)
                o.kps = _moved_kps(track, o.box)
        if track.lead or self.options.pad <= 0 or not self._cut_by_border(_held_box(track.box, velocity, -1)):
            return
        for f in range(first - 1, first - 1 - self.options.pad, -1):
            if f < max(self._next_final, self._cut) or f not in self._frames:
                break
            self._lead(track, f, _held_box(track.box, velocity, f - first))

    def _continue(self, track: _Track, index: int, box, kps, score: float):
        box = np.asarray(box, dtype=np.float64)
        kps = np.asarray(kps, dtype=np.float64)
        step = index - track.last
        assert 1 <= step <= self.options.max_gap + 1
        if not track.moving:
            self._lead_back(track, (box - track.box) / step)
        # Fill the missed frames (still in the buffer: the track held them back).
        for f in range(track.last + 1, index):
            w = (f - track.last) / step
            assert f in self._frames, f"frame {f} was finalised while track could fill it"
            self._frames[f].append(
                _Obs(
                    track.track_id,
                    (1 - w) * track.box + w * box,
                    (1 - w) * track.kps + w * kps,
                    0.0,
                    True,
                )
            )
            self.n_interpolated += 1
        track.velocity = (box - track.box) / step
        track.moving = True
        track.box, track.kps, track.last = box, kps, index
        self._add(index, track, score, interpolated=False)

    def _add(self, index: int, track: _Track, score: float, interpolated: bool):
        self._frames[index].append(
            _Obs(track.track_id, track.box.copy(), track.kps.copy(), score, interpolated)
        )

    def _smooth(self, o: _Obs) -> tuple[np.ndarray, np.ndarray]:
        if self.options.smooth <= 0:
            return o.box, o.kps
        filt = self._filters.get(o.track_id)
        if filt is None:
            filt = self._filters[o.track_id] = OneEuroFilter(
                self.fps,
                SMOOTH_MIN_CUTOFF_HZ / self.options.smooth,
                SMOOTH_BETA,
                SMOOTH_D_CUTOFF_HZ,
            )
        x = filt(np.concatenate([o.box, o.kps.reshape(-1)]), float(_box_size(o.box)))
        return x[:4], x[4:].reshape(5, 2)

    def _finalize(self, horizon: int) -> list[tuple[int, list[Face]]]:
        out = []
        for f in range(self._next_final, horizon + 1):
            self._undetected.discard(f)
            self._unsearched.discard(f)
            faces = []
            for o in sorted(self._frames.pop(f), key=lambda o: o.track_id):
                box, kps = self._smooth(o)
                faces.append(
                    Face(
                        o.track_id,
                        box.astype(np.float32),
                        kps.astype(np.float32),
                        float(o.score),
                        o.interpolated,
                        o.held,
                    )
                )
            for tid in [t for t, last in self._ended.items() if last <= f]:
                del self._ended[tid]
                self._filters.pop(tid, None)
            out.append((f, faces))
            self.n_frames += 1
            self.n_faces += len(faces)
        self._next_final = max(self._next_final, horizon + 1)
        return out
