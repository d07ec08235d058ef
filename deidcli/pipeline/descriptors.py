"""Each track's identity descriptor: what the generator is conditioned on and what the identity
check compares its output with.

A track's descriptor is the mean embedding of its first DESCRIPTOR_FACES faces (in the batch where
the track first has a face to generate), held while the track lasts: the generated face stays one
person. Those first faces can be poor ones: a face that fades in from a blur or from the dark,
walks in from far away, or was found back over frames the detector barely saw it in. Their
embedding then describes the blur more than the person (stress set ``fadein``: the descriptor of
its first faces, blurred by 25-40 px, is at a cosine of 0.13-0.19 from the same face once it is
sharp, where the sharp faces agree with each other at 0.8-0.96). The generator, told to move away
from that, does not move away from the person, and the check sends the track to the fallback.

So the check's embeddings of the input faces (``observe``) also revise the descriptor: when
REVISE_FACES checked faces in a row are further than REVISE_BELOW from it, agree with each other
(every two at REVISE_AGREE or more) and were seen better than the faces it was made
from (a higher mean detector score by SCORE_GAIN, or HEIGHT_GAIN times as high), it becomes their
mean. The generated face changes person once there, at most MAX_REVISIONS times a track.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Faces of a new track averaged into its descriptor.
DESCRIPTOR_FACES = 5
#: A checked input face further than this from its track's descriptor (cosine, the check's network)
#: counts toward a revision. A person's own faces come under it for 1 face in 178 of lp_d12 (a
#: shaking camera, lowest 0.30) and 1 in 850 of the stress set's mosaic3_dark, none on the other
#: shared clips and mosaics (lowest 0.28-0.79; research/descriptor_spread.py). Under it: 3.9% of
#: crowd_lfw's faces (20-80 px faces, and tracks that swap people where faces cross) and 93% of
#: fadein's (its sharp faces against the descriptor of its blurred first ones).
REVISE_BELOW = 0.3
REVISE_FACES = 3
REVISE_AGREE = 0.5
SCORE_GAIN = 0.1
HEIGHT_GAIN = 1.5
MAX_REVISIONS = 1


class Descriptors(dict):
    """track id -> (D,) float32 L2-normalised descriptor, with what each was made from."""

    def __init__(self):
        super().__init__()
        self.made_from: dict = {}  # track -> (mean detector score, mean face height) of its faces
        self.revisions: dict = {}  # track -> times revised
        self._far: dict = {}  # track -> [(embedding, score, height)]: checked faces in a row far from it

    def observe(self, track, own: np.ndarray, score: float, height: float) -> bool:
        """The check's embedding ``own`` (D,) (L2-normalised) of an input face of ``track`` (its
        detector ``score``, 0.0 where interpolated, and box ``height``), in frame order. Returns
        whether the descriptor was revised (the module docstring)."""
        desc = self.get(track)
        if desc is None or self.revisions.get(track, 0) >= MAX_REVISIONS:
            return False
        far = self._far.setdefault(track, [])
        if score <= 0.0 or float(np.dot(own, desc)) >= REVISE_BELOW:
            far.clear()
            return False
        far.append((own, score, height))
        if len(far) < REVISE_FACES:
            return False
        del far[:-REVISE_FACES]
        e = np.stack([x for x, _, _ in far])
        mean = e.mean(0)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        s, h = float(np.mean([x for _, x, _ in far])), float(np.mean([x for _, _, x in far]))
        s0, h0 = self.made_from[track]
        if (e @ e.T).min() < REVISE_AGREE or not (s >= s0 + SCORE_GAIN or h >= HEIGHT_GAIN * h0):
            return False
        self[track] = mean.astype(np.float32)
        self.made_from[track] = (s, h)
        self.revisions[track] = self.revisions.get(track, 0) + 1
        far.clear()
        return True

    @property
    def n_revised(self) -> int:
        return sum(self.revisions.values())


def describe_new(descriptors: dict, embedder, items: Sequence[tuple[np.ndarray, Sequence]]) -> None:
    """Describe the tracks of ``items`` ((image (H, W, 3) uint8 RGB, faces) pairs) that have no
    descriptor in ``descriptors`` (a Descriptors, or a plain dict: then never revised) yet, from
    their first DESCRIPTOR_FACES faces there (interpolated ones only where the track has no other),
    embedded by ``embedder.embed``."""
    from ..faces.align import arcface_crop
    from .routing import face_height

    todo: dict = {}
    for img, faces in items:
        for f in faces:
            if f.track_id in descriptors:
                continue
            lst = todo.setdefault(f.track_id, [])
            if len(lst) < DESCRIPTOR_FACES and (not f.interpolated or not lst):
                lst.append((arcface_crop(img, f.kps), float(f.score), face_height(f.box)))
    if not todo:
        return
    ids = list(todo)
    emb = embedder.embed([c for t in ids for c, _, _ in todo[t]])
    k = 0
    for t in ids:
        n = len(todo[t])
        e = emb[k:k + n].mean(0)
        k += n
        descriptors[t] = (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)
        if isinstance(descriptors, Descriptors):
            descriptors.made_from[t] = (float(np.mean([s for _, s, _ in todo[t]])),
                                        float(np.mean([h for _, _, h in todo[t]])))
