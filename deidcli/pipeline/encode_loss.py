"""What the video encoder will leave of a pasted face, for the identity check.

The check embeds each generated face before the frame is encoded. A lossy encode takes part of
the generator's change away again, most on small faces, whose change is fine detail, and most in
strongly coloured light, where a face's contrast sits in the chroma the encoder quantizes harder.
On the stress set's blue-lit 3x3 mosaic (faces under 64 px, commit 349104f), x264's encode moved the
audit's cosine to the person up by 0.06 on average at crf 18 (7 faces exposed), 0.14 at crf 23,
0.23 at crf 28 (48 exposed) and 0.28 at crf 35; faces of 64 px and more moved by 0.01 or less up to
crf 28. On the clean mosaic the same faces moved by 0.003 at crf 18 and 0.07 at crf 28.

So the check embeds the pasted region after a JPEG round trip (4:2:0, like the encode) whose
quality stands for the encoder's quantization at the run's ``--crf``: JPEG, too, takes more from
fine detail and from chroma, so the light and the size decide how much it moves a face, as they
do for the encoder. The quality per crf (:data:`QUALITY_AT_CRF`) makes JPEG move the blue mosaic's
small faces at least as far as x264 does at that crf, on average: x264 0.063 / 0.139 / 0.227 at
crf 18 / 23 / 28, JPEG 0.083 at quality 70, 0.132 at 40, 0.173 at 30, 0.250 at 10
(docs/in_the_wild.md, eighth pass). Face by face the two move differently (their moves correlate
at 0.1): the check's 0.085 of margin under the audit's 0.335 covers the rest. Above crf 28 JPEG
falls short of x264 (crf 35: 0.275).
What is written is the pasted region itself; only the check's view of it goes through JPEG.
Image outputs are checked at the run's ``--crf`` too (default 18), though written as JPEG at
quality 95 or as PNG: a slightly stricter check there.

Array contract: regions are (H, W, 3) uint8 RGB frame pixels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: Faces this high (px) or more are checked as pasted: the encode moved the 128 px and larger blue
#: mosaic faces by 0.05 or less on average at every crf up to 35, and JPEG did not move them at all,
#: while a round trip of a face region that large costs 1.5-6 ms.
BELOW = 128

#: (crf, JPEG quality) pairs, interpolated linearly in between; under the first crf the check sees
#: the region as pasted (the encode is close to lossless), above the last the last quality holds.
QUALITY_AT_CRF = ((10, 95), (18, 70), (23, 35), (28, 10), (35, 5))


def jpeg_quality(crf: Optional[int]) -> Optional[int]:
    """The JPEG quality standing for an encode at ``crf`` (x264's scale), or None for none."""
    if crf is None or crf < QUALITY_AT_CRF[0][0]:
        return None
    c, q = zip(*QUALITY_AT_CRF)
    return int(round(float(np.interp(crf, c, q))))


def through_encoder(pixels: np.ndarray, quality: Optional[int]) -> np.ndarray:
    """``pixels`` (H, W, 3) uint8 RGB after a JPEG round trip at ``quality`` (4:2:0); unchanged for
    None."""
    if quality is None:
        return pixels
    import cv2

    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8, (pixels.shape, pixels.dtype)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])
    if not ok:
        return pixels
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def quality_for(crf: Optional[int], height: float) -> Optional[int]:
    """The JPEG quality the check sees a face ``height`` px high through at ``crf``, or None."""
    return None if height >= BELOW else jpeg_quality(crf)


def encoded_region(region, quality: Optional[int]):
    """A pasted region (align.pasted_region: ``(box, pixels)``, or None) as the check should see it."""
    if region is None or quality is None:
        return region
    return region[0], through_encoder(region[1], quality)
