"""Which faces the generator draws and which get the calm fallback (``--fallback``, blur) instead.

Decided per face from measurements of the input, with hysteresis per track so that a face does
not flicker between the two paths from one frame to the next:

small
    the face box is under ``min_generate`` pixels high. Below that the generator's 128 px crop is
    an upscale of a few dozen pixels: it draws strokes the frame cannot hold (on the stress set's
    4x4 mosaic, dark lids and brows painted on a soft face), and a recognizer has little to go on
    once the face is blurred.
turned
    the face is turned away (:func:`yaw` above ``max_yaw``): the generator was trained on
    near-frontal LFW photos and draws a frontal face's features onto a profile.
soft
    (off unless ``soft_fraction`` > 0) the face is much softer than a sharp face of its size
    (:func:`measure`'s sharpness under ``soft_fraction`` times :func:`expected_sharpness`):
    motion blur, defocus. Measured and left off by default: on the stress set's motion-blurred
    3x3 mosaic an independent recognizer (dlib) matched 8-9% of the faces to the person whether
    they were generated or, at 0.5, half of them blurred, and a blurred face of a blurred input
    still looks like that input to the identity network (99 faces "verified" against none).
dark
    the face's mean lightness (CIELAB L*, 0-255) is under ``min_light``: there is nothing left to
    draw a face from, and what the generator draws is noise lifted into blotches.
check
    the identity check still found the person after the most passes this face may have
    (``max_passes``; ``small_max_passes`` for faces under :data:`LARGE_FACE` px: repeated passes
    are what draw masks on small faces). The track then stays on the fallback for ``hold`` faces.
lost
    the face check: the detector no longer finds a generated face under 96 px that it found in the
    input at 0.4 or more (pipeline/face_check.py). The track then stays on the fallback for ``hold``
    faces, as after a failed check.
blotch
    the blotch guard: the generated face, as it would be pasted, has black or white patches where
    the input face has none (faces/blotch.py). The track then stays on the fallback for ``hold``
    faces, as after a failed check.
held
    (not decided here) a face the tracker holds past its track's first or last detection
    (faces.Face.held, TrackOptions.pad): where the face may still be, not where it was seen.

Array contract: crops are (S, S, 3) uint8 RGB generator crops (align.warp_crop); landmarks (5, 2)
float pixels in SCRFD order (left eye, right eye, nose, left and right mouth corner).
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

#: Faces at least this high (px) may use every pass up to --max-passes; smaller ones at most
#: --small-max-passes.
LARGE_FACE = 96
#: Faces at least this high (px) get at least --large-passes passes; smaller ones start at
#: --passes. Not from LARGE_FACE: at two passes a 97 px face of the stress set's green-lit mosaic,
#: eyes closed, came out with black slashes for brows (garish, 2 faces), and the faces the
#: independent recognizer still matched at one pass were 135 px and more (docs/in_the_wild.md,
#: eighth pass).
TWO_PASS_FACE = 128
#: Report bins of face height (px): "<48", "48-96", "96-192", ">=192".
SIZE_BINS = (48, 96, 192)
#: Hysteresis: a track leaves the path it is on only when a measurement is this far (as a factor)
#: beyond the threshold; a new track takes the plain threshold.
HYSTERESIS = 0.1
PATHS = ("generated", "small", "turned", "soft", "dark", "check", "lost", "blotch", "held")
#: expected_sharpness: a sharp face of height h px has sharpness about SHARP_AT_45 + SHARP_SLOPE *
#: (h - 45) in its 128 px crop, at most SHARP_MAX (fitted by eye to the upper half of the stress
#: set's clean 3x3 and 4x4 mosaic faces, 32-175 px: small faces are upscaled into the crop and so
#: softer; larger ones are scaled down to it, and a soft source stays soft: ghost_2person's
#: 135-245 px faces measure 5.3-7.1, lp_d13's 516-541 px ones 15-17).
SHARP_AT_45 = 4.0
SHARP_SLOPE = 0.06
SHARP_MAX = 9.0


def size_bin(height: float) -> str:
    lo = 0
    for b in SIZE_BINS:
        if height < b:
            return f"<{b}" if lo == 0 else f"{lo}-{b}"
        lo = b
    return f">={SIZE_BINS[-1]}"


def face_height(box: np.ndarray) -> float:
    return float(box[3] - box[1])


def yaw(kps: np.ndarray) -> float:
    """How far the face is turned: the nose's offset from the middle of the eyes along the eye
    line, in inter-ocular distances (0 frontal, about 0.3 at 30 degrees, 1 and more in profile)."""
    le, re, nose = (np.asarray(kps[k], np.float64) for k in (0, 1, 2))
    d = re - le
    iod = float(np.hypot(*d))
    if iod < 1e-6:
        return float("inf")
    return abs(float(np.dot(nose - (le + re) / 2, d / iod))) / iod


def measure(crop: np.ndarray, sharpness: bool = True) -> tuple[float, float]:
    """(lightness, sharpness) of a generator crop's face ellipse: mean CIELAB L* (0-255), and
    10 x mean |Laplacian| of L* (align.detail) over its standard deviation (contrast-free: haze
    and low light change it little, blur a lot; at the 128 px crop a clean 45 px face is about 4,
    a clean 170 px one 11-16, the same faces with 13 px of motion blur 1.7 and 5-5.5). Without
    ``sharpness`` (the soft path off) the second value is inf and not computed."""
    import cv2

    from ..faces.colour import _face_u8, detail

    size = crop.shape[0]
    L = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB)[..., 0].astype(np.float32)
    mean, std = cv2.meanStdDev(L, mask=_face_u8(size))
    if not sharpness:
        return float(mean[0, 0]), float("inf")
    return float(mean[0, 0]), 10.0 * detail(L, size) / max(float(std[0, 0]), 1.0)


def expected_sharpness(height: float) -> float:
    """Sharpness (:func:`measure`) of a sharp face of this height (px)."""
    return min(SHARP_AT_45 + SHARP_SLOPE * max(float(height) - 45.0, 0.0), SHARP_MAX)


class Router:
    """The per-file state of the decision (thread-safe: the generator and the check run in two
    threads): each track's current path, the check's holds, and the counts by path and size."""

    def __init__(self, min_generate: float = 0, max_yaw: float = float("inf"), min_light: float = 0,
                 max_passes: int = 4, small_max_passes: int = 4, hold: int = 25, soft_fraction: float = 0.0,
                 large_passes: int = 1):
        self.min_generate, self.max_yaw, self.min_light = float(min_generate), float(max_yaw), float(min_light)
        self.soft_fraction = float(soft_fraction)
        self.max_passes, self.small_max_passes, self.hold = int(max_passes), int(small_max_passes), int(hold)
        self.large_passes = int(large_passes)
        self._lock = threading.Lock()
        self._on: dict = {}  # track -> path it is on ("generated" or a fallback reason)
        self._held: dict = {}  # track -> faces it stays on the fallback after a failed check
        self._failed: dict = {}  # path -> the tracks that have failed a check that way
        self.counts: dict = {}  # path -> size bin -> faces

    def passes_for(self, height: float) -> int:
        """The most passes a face of this height may get before the check gives it the fallback."""
        return self.max_passes if height >= LARGE_FACE else min(self.max_passes, self.small_max_passes)

    def least_passes(self, height: float) -> int:
        """The fewest passes a face of this height gets, whatever its track's count (1: none)."""
        return min(self.large_passes, self.max_passes) if height >= TWO_PASS_FACE else 1

    def level(self, track_count: int, height: float) -> int:
        """The passes of a face of this height whose track is at ``track_count`` (PassLevels)."""
        return min(max(int(track_count), self.least_passes(height)), self.passes_for(height))

    def decide(self, track, height: float, turned: float, light: float, sharp: float = float("inf")) -> str:
        """The path of the next face of ``track``: "generated", or the fallback's reason."""
        h = HYSTERESIS
        with self._lock:
            left = self._held.get(track, 0)
            if left > 0:
                self._held[track] = left - 1
                return self._on.get(track, "check")
            was = self._on.get(track)
            # the side of each threshold the track must cross to change path
            k = 1.0 if was is None else (1.0 - h if was == "generated" else 1.0 + h)
            ky = 1.0 if was is None else (1.0 + h if was == "generated" else 1.0 - h)
            if height < self.min_generate * k:
                path = "small"
            elif turned > self.max_yaw * ky:
                path = "turned"
            elif sharp < self.soft_fraction * expected_sharpness(height) * k:
                path = "soft"
            elif light < self.min_light * k:
                path = "dark"
            else:
                path = "generated"
            self._on[track] = path
            return path

    def failed_check(self, track, path: str = "check") -> None:
        """The check (``path`` "check") or the face check ("lost") gave a face of ``track`` the
        fallback: the track stays there ``hold`` faces."""
        with self._lock:
            self._held[track] = self.hold
            self._on[track] = path
            self._failed.setdefault(path, set()).add(track)

    def failed_on(self, path: str) -> frozenset:
        """The tracks that have failed a check with ``path`` ("check", "lost", "blotch") so far."""
        with self._lock:
            return frozenset(self._failed.get(path, ()))

    def count(self, path: str, height: float) -> None:
        with self._lock:
            b = self.counts.setdefault(path, {})
            k = size_bin(height)
            b[k] = b.get(k, 0) + 1

    def totals(self) -> dict:
        return {p: sum(v.values()) for p, v in self.counts.items()}


def new_router(options) -> Optional[Router]:
    """The Router of an AnonymizeOptions (method generate), or None."""
    if options.method != "generate":
        return None
    return Router(options.min_generate, options.max_yaw, options.min_light, options.max_passes,
                  options.small_max_passes, options.pass_hold or 25, options.soft_fraction, options.large_passes)
