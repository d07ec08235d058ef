"""Blotches: black or white patches a generated face has where the input face has none.

The generator sometimes paints dark eye sockets, a black nose or white smears on small, dark or
hazy faces. :func:`blotch_shares` measures them on two aligned crops of the same face, input and
output: the share of the face covered by pixels much darker (lighter) than the input at the same
place and than (nearly) anything on the input face, or black (white) where the input is mid-grey,
in patches that survive a small opening. ``deid evaluate-video`` calls a face with more than
BLOTCH_SHARE of them garish (deidcli/research/garish.py, on ArcFace crops); the anonymizer asks
the same of each face it is about to paste (:func:`blotchy`, on its generator crop) and gives a
blotchy one the fallback instead (pipeline/pipeline.py, path "blotch").

Arrays: crops (S, S, 3) uint8 RGB, aligned alike; L* planes (S, S) float32, 0-100; masks (S, S)
bool.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Dark pixel: output L* below both the input's L* there - BLOTCH_DROP and the input face's 2nd
#: percentile of L* (darker than the input face ever is, which catches dark patches on hazy,
#: low-contrast faces), or below DARK_L where the input's L* is within MID_L. Bright pixel: the
#: same upwards (input + BLOTCH_DROP and 98th percentile, or above BRIGHT_L). The pixels are opened
#: by a BLOTCH_OPEN px square (patches, not specks; at 112 px, scaled with the crop). Chosen with
#: the garish measure's thresholds (deidcli/research/garish.py).
BLOTCH_DROP = 15.0
DARK_L = 15.0
BRIGHT_L = 92.0
MID_L = (25.0, 80.0)
BLOTCH_OPEN = 3
#: The crop size BLOTCH_OPEN is given at (the ArcFace crop).
OPEN_AT = 112
#: The audit's garish line (deidcli/research/garish.py): more than this share of the face ellipse
#: in dark or in bright blotches. 2% of the ellipse is a 10 x 10 px patch of the 112 crop.
BLOTCH_SHARE = 0.02
#: The anonymizer's line (:func:`blotchy`), on the generator crop's face ellipse, which reaches
#: further out to the cheeks and chin than the audit's: see docs/in_the_wild.md, twelfth pass.
GUARD_SHARE = 0.015


def lightness(rgb: np.ndarray) -> np.ndarray:
    """(S, S) float32 CIELAB L* (0-100) of an RGB uint8 crop."""
    return cv2.cvtColor(rgb.astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2LAB)[..., 0]


def blotch_shares(l_in: np.ndarray, l_out: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(dark, bright): shares of ``mask`` covered by dark / bright blotches (see BLOTCH_DROP), after
    an opening by BLOTCH_OPEN px (scaled from OPEN_AT to the crop's size). ``l_in``, ``l_out``: the
    L* planes (0-100) of the input and output crops."""
    li, lo = l_in, l_out
    p2, p98 = np.percentile(li[mask], [2, 98])
    mid = (li >= MID_L[0]) & (li <= MID_L[1])
    dark = (lo < np.minimum(li - BLOTCH_DROP, p2)) | ((lo < DARK_L) & mid)
    bright = (lo > np.maximum(li + BLOTCH_DROP, p98)) | ((lo > BRIGHT_L) & mid)
    side = max(1, int(round(BLOTCH_OPEN * li.shape[0] / OPEN_AT)))
    k = np.ones((side, side), np.uint8)
    n = max(int(mask.sum()), 1)
    return tuple(float(cv2.morphologyEx((sel & mask).astype(np.uint8), cv2.MORPH_OPEN, k).sum()) / n
                 for sel in (dark, bright))


def blotchy(crop: np.ndarray, pasted: np.ndarray) -> float:
    """The larger blotch share (:func:`blotch_shares`) of a generator crop as it will be pasted
    (``pasted``, the generated face blended into ``crop`` by its mask; both (S, S, 3) uint8 RGB)
    against the input ``crop``, on the generator crop's face ellipse."""
    from .colour import face_ellipse_mask

    return max(blotch_shares(lightness(crop), lightness(pasted), face_ellipse_mask(crop.shape[0])))
