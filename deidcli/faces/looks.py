"""Which frames the detector searches whole, and which it looks at only around the faces it follows.

Searching a 1280x720 frame costs the int8 detector about 24 ms on one core; looking again at a
followed face in a 128 px square around where the tracker expects it costs about 3.6 ms
(faces/detect.py, ``Detector.detect_near``). So with ``search_every`` N > 1 a frame is searched
whole (``Detector.detect``) when:

- N frames have passed since the last search (new faces are found at that rate),
- the picture cut (the mean absolute difference of 64x36 grey thumbnails of consecutive frames is
  CUT_MAD or more),
- a followed face was not found again around its predicted box (it moved fast, was hidden, or
  left: the frame is searched at once, in place of the near look),
- the near looks would cost as much as the search (many faces: Detector.near_cost), or
- it is the file's last frame (``last``: a face that came in after the last search is found there);

and otherwise only around the followed faces (the tracker's live tracks). Weak detections that do
not yet make a track (tentative ones) are looked at on the searches only, as with every frame
searched (a near look is a zoomed look, and would start tracks the search's zoomed second look at
weak detections, ``Detector.zoom_score``, turns down: a face cut by the frame's edge in the
left half of ghost_2person scored 0.38-0.42 searched, under 0.5 zoomed, and 0.5 or more near). The frames
between two searches are kept by the tracker (``Tracker.push(searched=False)``) until the next
search; a face that search finds new is then looked for backwards, frame by frame, around where
it was found (``history``), so a face that walks in is covered where it was, from its first frame
the detector can see it on, not just from the search that found it.

A cut also ends every track (``Tracker.push(cut=True)``): a face at the same place after a cut is
another person, and a track carried over would give the new face the old one's descriptor (the
stress set's ``cuts`` clip had one such face verified as its person at a cosine of 0.56).

    looks = Looks(detector, search_every=4)
    for index, image in enumerate(frames):
        dets, searched, history, cut = looks.look(index, image, tracker, earlier)
        tracker.push(index, dets, searched=searched, history=history, cut=cut)

``earlier(index)`` gives the image of a frame the caller still holds (the frames the tracker has
not returned yet), or None.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .detect import Detections, Detector, box_iou

#: Mean absolute difference (grey levels, 64x36 thumbnails) between consecutive frames that counts
#: as a cut. On the stress set's `cuts` clip the cuts measure 39.8-60.4 and everything else at most
#: 1.8; the fastest motion in ../shared/videos (lp_d12, a shaking camera) reaches 20.2.
CUT_MAD = 25.0
THUMB = (64, 36)
#: Looking back for a new face: the detection in the square around its box in the next frame
#: that overlaps that box most, at this IoU or more.
BACK_IOU = 0.3


class Cuts:
    """Tells, frame by frame, whether the picture cut since the previous frame (the mean absolute
    difference of THUMB grey thumbnails is CUT_MAD or more). Shared by the pipeline (Looks) and the
    evaluation's own tracking, so that neither carries a face's track, landmarks or descriptor over
    a cut to another person."""

    def __init__(self):
        self._thumb: Optional[np.ndarray] = None
        self.n_cuts = 0

    def __call__(self, image: np.ndarray) -> bool:
        """image (H, W, 3) uint8 RGB, the next frame."""
        import cv2

        step = max(1, image.shape[1] // (4 * THUMB[0]))  # every 5th pixel of 1280: 0.05 ms, not 0.6
        grey = cv2.cvtColor(cv2.resize(image[::step, ::step], THUMB, interpolation=cv2.INTER_AREA),
                            cv2.COLOR_RGB2GRAY).astype(np.float32)
        cut = self._thumb is not None and float(np.abs(grey - self._thumb).mean()) >= CUT_MAD
        self._thumb = grey
        self.n_cuts += int(cut)
        return cut


class Looks:
    """Decides, frame by frame, between a search and near looks; counts what it did."""

    def __init__(self, detector: Detector, search_every: int):
        if search_every < 1:
            raise ValueError(f"search_every must be >= 1, not {search_every}")
        self.detector = detector
        self.every = int(search_every)
        self._last_search: Optional[int] = None
        self._cuts = Cuts()
        self.n_searched = 0  # frames searched whole
        self.n_near = 0  # frames looked at only around followed faces
        self.n_lost = 0  # searches made because a followed face was not found near its box
        self.n_cuts = 0  # searches made at a cut
        self.n_crowded = 0  # searches made because near looks would cost as much
        self.n_near_faces = 0  # faces the near looks found

    def look(self, index: int, image: np.ndarray, tracker,
             earlier: Callable[[int], Optional[np.ndarray]],
             last: bool = False) -> tuple[Detections, bool, Optional[dict], bool]:
        """(detections, searched, history, cut) for frame ``index``; image (H, W, 3) uint8 RGB. The
        arguments of ``tracker.push`` for this frame (``faces.track.Tracker``). ``last``: the
        stream's last frame, always searched (a face that came in after the last search would
        otherwise never be found)."""
        cut = self._cuts(image)
        if self.every == 1:  # every frame searched
            self.n_searched += 1
            return self.detector.detect(image, tracker.predicted_boxes(index)), True, None, cut
        boxes = tracker.predicted_boxes(index)
        near_cost, full_cost = self.detector.near_cost(boxes, image.shape)
        cheap = near_cost < full_cost and not cut
        near = None
        if cheap and len(boxes):
            near = self.detector.detect_near(image, boxes)
        if (self._last_search is not None and index - self._last_search < self.every and (cheap or cut)
                and not last):
            if cut:
                self.n_cuts += 1
            elif near is None or not tracker.match(index, near)[0]:
                self.n_near += 1
                self.n_near_faces += len(near) if near is not None else 0
                return near if near is not None else Detections.empty(), False, None, False
            else:
                self.n_lost += 1
        elif not cheap and not cut:
            self.n_crowded += int(self._last_search is not None and index - self._last_search < self.every)
        dets = self.detector.detect(image, boxes)
        if near is not None and len(near):
            # The followed faces keep their near look (the same scale as on the frames between, so
            # their landmarks do not jump at every search); the search adds the faces it alone saw.
            alone = box_iou(dets.boxes, near.boxes).max(axis=1) < 0.5 if len(dets) else np.zeros(0, bool)
            dets = Detections(np.concatenate([near.boxes, dets.boxes[alone]]),
                              np.concatenate([near.scores, dets.scores[alone]]),
                              np.concatenate([near.kps, dets.kps[alone]]))
        history = None
        if self._last_search is not None and not cut and index - self._last_search > 1:
            _, new = tracker.match(index, dets)
            history = {j: back for j in new
                       if (back := self._back(dets.boxes[j], index, self._last_search, earlier))}
        self._last_search = index
        self.n_searched += 1
        return dets, True, history or None, cut

    def _back(self, box: np.ndarray, index: int, last_search: int, earlier) -> list:
        """A new face found in frame ``index`` at ``box``, looked for in the frames before it back
        to (not including) the last search, around where it was a frame later, at the search's
        scale (``Detector.detect_around``: the boxes and landmarks a search would have given; an
        enlarged or shrunk look gives a blurred face a box of another size): [(frame, box, kps,
        score), ...] oldest first, up to the first frame it is not found in."""
        found = []
        for f in range(index - 1, last_search, -1):
            image = earlier(f)
            if image is None:
                break
            dets = self.detector.detect_around(image, box)
            if not len(dets):
                break
            iou = box_iou(box[None], dets.boxes)[0]
            j = int(iou.argmax())
            if iou[j] < BACK_IOU:
                break
            box = dets.boxes[j]
            found.append((f, box.copy(), dets.kps[j].copy(), float(dets.scores[j])))
        return found[::-1]

    @property
    def stats(self) -> dict:
        return {"cuts": self._cuts.n_cuts, "frames_searched": self.n_searched, "frames_near": self.n_near,
                "searches_lost": self.n_lost, "searches_cut": self.n_cuts,
                "searches_crowded": self.n_crowded, "faces_near": self.n_near_faces}
