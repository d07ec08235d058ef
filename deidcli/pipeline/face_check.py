"""The face checks: is a generated face still a face to the detector, is it free of blotches, and
which generated faces another face's paste or cover can reach (:func:`overlapping_faces`)?

A generated face under LOST_BELOW px high that the detector found in the input at
LOST_INPUT_SCORE or more and no longer finds (at LOST_FOUND, box IoU >= LOST_IOU) once pasted
gets the fallback, and its track with it for --pass-hold faces, as after a failed identity check
(routing.Router.failed_check, path "lost"). When the hold runs out and the track is generated again,
its faces must be found at LOST_FOUND_AGAIN, a wider margin. These are the sizes where the generator draws masks:
dark sockets and brows on 39-47 px faces of the stress set's crowd_lfw, which deid evaluate-video
counted as garish ("lost", 14 faces). No lower bound: a generated track goes on down to 36 px
(--min-generate less the router's hysteresis).

The blotch guard (:func:`blotched_faces`) gives the fallback, the same way (path "blotch"), to a
generated face with black or white patches the input face has not (faces/blotch.py).

LOST_INPUT_SCORE: with 0.5 (the start threshold, the audit's) 3 of those faces stayed: input faces
the pipeline's int8 look scored 0.45-0.5 and the audit's fp32 look 0.5 or more; with 0.4 none.

Array contract: frames (H, W, 3) uint8 RGB as Pipeline.finish left them; face boxes (4,) float
pixels x0, y0, x1, y1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..faces.detect import rects_meet

LOST_BELOW, LOST_IOU, LOST_INPUT_SCORE = 96, 0.3, 0.4
#: The score at which the pasted face counts as found: the audit's 0.3 (deid evaluate-video, fp32, on
#: the encoded output) and a margin for the int8 look before the encode. At 0.3 a 47 px face of the
#: stress set's crowd_lfw the check found at 0.32 came out garish ("lost") in 2 runs of 3, at 0.35
#: in none of 4 (tests/test_in_the_wild.py::test_generated_faces_the_detector_loses_get_the_fallback).
LOST_FOUND = 0.35
#: The same for a track the check already found lost once (its generated face the detector no
#: longer found): when its --pass-hold on the fallback runs out, the generator draws the same face
#: again, and it is taken for a face only with this margin. On crowd_lfw (commit 381d5d0) a 23x46 px
#: face lost in frames 22-23 came back generated in 54-57; the look found it at 0.41-0.42 in 54-55,
#: the audit's (fp32, after the encode) at 0.27-0.30 (garish, "lost"): the encode took 0.14 from
#: it, and a JPEG stand-in for the encode (encode_loss.py) took nothing. Of the 88 faces of such
#: tracks the look kept, 29 more go to the fallback at 0.45 (the 2 garish ones among them).
LOST_FOUND_AGAIN = 0.45


def blotched_faces(crops: np.ndarray, raw: np.ndarray, masks: Sequence[np.ndarray], todo: np.ndarray) -> set:
    """The blotch guard: the faces of ``todo`` (indices) whose generator crop as it will be pasted
    (``raw`` blended into ``crops`` by ``masks``: (N, S, S, 3) uint8, (N, S, S, 3) uint8, N (S, S)
    float32) has black or white patches the input face has not, over faces.blotch.GUARD_SHARE of
    the face (faces/blotch.py). They get the fallback instead, and their track with them for
    --pass-hold faces (routing.Router.failed_check, path "blotch"): escalation and colour matching
    keep most faces clear of them, this catches what they let through (stress set crowd_1080: a
    40-50 px dark-skinned face drawn with black eye sockets)."""
    from ..faces.align import blend_crops
    from ..faces.blotch import GUARD_SHARE, blotchy

    if not len(todo):
        return set()
    pasted = blend_crops(crops[todo], raw[todo], [masks[j] for j in todo])
    return {int(j) for j, p in zip(todo, pasted) if blotchy(crops[j], p) > GUARD_SHARE}


def lost_faces(detector, items: Sequence[tuple[np.ndarray, Sequence]], jobs: Sequence, again=frozenset()) -> list:
    """The indices into ``jobs`` ((item index into ``items``, M, face) each, generated and pasted)
    of the faces ``detector`` (faces.detect.Detector) no longer finds in their frame. One look at
    each frame with such a face, as the frame-sized look (Detector.look) sees them, but only
    around them (Detector.look_around: the search's own input cut around the faces; the frame
    whole where that costs as much). A look around each face alone, zoomed (Detector.detect_near),
    scored these faces, near the detector's threshold, 0.1-0.2 apart from the frame's look, with
    other surroundings in its square (stress set crowd_lfw). Only faces the detector found in this
    frame at LOST_INPUT_SCORE or more are looked at (a face filled in by the tracker has score 0).
    A face of a track in ``again`` (one found lost before) must be found at LOST_FOUND_AGAIN."""
    from .routing import face_height

    by_item: dict = {}
    for k, (i, _, f) in enumerate(jobs):
        if f.score >= LOST_INPUT_SCORE and face_height(f.box) < LOST_BELOW:
            by_item.setdefault(i, []).append(k)
    lost = []
    for i, ks in by_item.items():
        boxes = np.stack([np.asarray(jobs[k][2].box[:4], np.float32) for k in ks])
        best = found_scores(detector.look_around(items[i][0], boxes), boxes)
        need = [LOST_FOUND_AGAIN if jobs[k][2].track_id in again else LOST_FOUND for k in ks]
        lost.extend(k for k, b, n in zip(ks, best, need) if b < n)
    return lost


def found_scores(look, boxes: np.ndarray) -> np.ndarray:
    """(T,) float: for each of ``boxes`` (T, 4), the best score of a face of ``look``
    (faces.detect.Detections) whose box meets it at LOST_IOU or more; 0 where none does."""
    from ..faces.detect import box_iou

    iou = box_iou(boxes, look.boxes) if len(look.boxes) else np.zeros((len(boxes), 0))
    return np.where(iou >= LOST_IOU, look.scores[None, :], 0.0).max(1, initial=0.0)


def overlapping_faces(jobs: Sequence, pasted: Sequence[int], covered: Sequence = ()) -> list:
    """The faces of ``pasted`` (indices into ``jobs``, (item, M, face) each) whose paste can overlap
    another's in the same frame, or the cover of a face of ``covered`` ((item, face) each): their
    face boxes, grown by a fifth, meet. Pipeline.finish checks them once more on the frame as the
    pastes and covers left it:

    - the paste that comes later writes its own rendering of the other face's pixels (stress set
      crowd_lfw: a small face passing in front of a large one came out under the large face's
      paste at cosine 0.76);
    - a cover drawn over a generated face can take away what made it another person (crowd_1080:
      a "face" found inside an 82 px one, on the fallback, blurred his eye and nose after his
      check, and the audit matched him at 0.34-0.37).
    """
    def grown(box) -> tuple:
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        gx, gy = (x1 - x0) / 10, (y1 - y0) / 10
        return x0 - gx, y0 - gy, x1 + gx, y1 + gy

    by_frame: dict = {}
    for j in pasted:
        by_frame.setdefault(jobs[j][0], []).append((j, grown(jobs[j][2].box)))
    covers: dict = {}
    for i, f in covered:
        covers.setdefault(i, []).append(grown(f.box))
    return sorted(j for i, faces in by_frame.items() for j, a in faces
                  if any(k != j and rects_meet(a, b) for k, b in faces)
                  or any(rects_meet(a, b) for b in covers.get(i, ())))
