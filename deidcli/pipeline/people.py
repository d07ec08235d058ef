"""--keep / --only: reference people and the per-track decision (docs/keep_only.md).

A reference is a photo (exactly one face), a folder of photos of one person, or a folder of
``name/`` subfolders, one per person; 112x112 images are taken for the ArcFace-aligned crops
``deid faces`` writes (``track_NNN.png``) and embedded as they are. Each person's descriptor is
the normalised mean of the normalised embeddings of their photos (MobileFaceNet, fp32).

A track is compared with the people by the cosine of its own descriptor (the normalised mean
of its first :data:`DECIDE_FACES` detected faces' embeddings) with each person's, the highest
wins. :class:`Chooser` decides once per track, before any of its frames is rendered, and
re-checks the tracks it leaves untouched on every later detected face.

--target references (:func:`list_targets`: in a folder each photo is its own target) are loaded
the same way; :func:`target_of` assigns them to tracks and :func:`steer_descriptor` makes the
descriptor the generator is conditioned on (docs/target.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import EXIT_USAGE, InputError
from ..media.probe import IMAGE_EXTS

log = logging.getLogger(__name__)

#: MobileFaceNet fp32's verification threshold at FAR 0.1% on LFW, one photo per side (all 6000
#: pairs of pairs.txt; TAR 98.2% there): deidcli/research/measures.py VERIFY_THRESHOLD, whose
#: comment says how it was measured (the product does not import deidcli.research).
LFW_FAR_THRESHOLD = 0.33514
#: --keep leaves a track untouched when its cosine to a kept person is at least this: the LFW FAR
#: 0.1% threshold plus a margin, because a track's descriptor (a mean of several faces) is less
#: noisy than one photo, which pushes strangers' cosines out as well as the same person's: on LFW
#: DevTest a photo against a "track" of up to 5 photos of a stranger reaches 0.33514 in 0.175% of
#: 73,712 pairs. The threshold at which 0.1% of strangers do on DevTrain (identity-disjoint from
#: DevTest; 395,012 photo-vs-track pairs) is 0.35975, rounded up here. Its rates on DevTest:
#: docs/keep_only.md (python -m deidcli.research.keep_rates; --calibrate gives the DevTrain figure).
KEEP_THRESHOLD = 0.36
#: "Plausibly the person": --only anonymizes a track at this cosine or above (Chooser). 99.5% of
#: LFW DevTrain's 1,100 same-person photo pairs reach it (its 0.5% quantile: 0.22068); DevTest
#: rates in docs/keep_only.md.
ONLY_THRESHOLD = 0.22
#: Detected faces of a new track whose descriptor decides it (those of the batch where it first appears).
DECIDE_FACES = 5
#: Faces whose mean embedding re-checks an untouched track (a window sliding face by face).
RECHECK_FACES = 5
#: Side of the ArcFace crops deid faces writes: such images are embedded without detection.
CROP_SIDE = 112
#: --target: the generator is conditioned on normalise(own - TARGET_WEIGHT * target) (see
#: steer_descriptor), not on the target's descriptor alone.
TARGET_WEIGHT = 1.0

IMAGE_SUFFIXES = IMAGE_EXTS | {".bmp"}  # the images deid anonymizes, and BMP photos


class BadReference(InputError):
    """A --keep / --only reference that cannot be used: nothing is opened or written then."""

    exit_code = EXIT_USAGE


@dataclass
class Person:
    name: str  # the photo's stem, the folder's name, or the subfolder's
    files: list  # the photos (Path)
    descriptor: Optional[np.ndarray] = None  # (128,) float32, L2-normalised (None until loaded)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_people(paths: Sequence[Path]) -> list[Person]:
    """The people the references name, without reading a photo: a file is one person (its
    stem), a folder's photos one person (the folder's name), each subfolder with photos one more
    person (its name). BadReference for a missing path or a folder without photos."""
    people: list[Person] = []
    for p in map(Path, paths):
        if p.is_file():
            people.append(Person(p.stem, [p]))
        elif p.is_dir():
            found = []
            if _images(p):
                found.append(Person(p.name, _images(p)))
            found += [Person(d.name, _images(d)) for d in sorted(p.iterdir()) if d.is_dir() and _images(d)]
            if not found:
                raise BadReference(f"{p}: no photos in this folder (.jpg, .png, .webp, .bmp; or name/ subfolders)")
            people += found
        else:
            raise BadReference(f"{p}: no such file or folder")
    return people


def list_targets(paths: Sequence[Path]) -> list[Person]:
    """The --target identities the references name, in order, without reading a photo: a file is
    one target (its stem); in a folder each photo is one target (its stem, in name order), then
    each subfolder with photos one more (its name, from all its photos). BadReference as
    :func:`list_people`."""
    targets: list[Person] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [Person(f.stem, [f]) for f in _images(p)]
            found += [Person(d.name, _images(d)) for d in sorted(p.iterdir()) if d.is_dir() and _images(d)]
            if not found:
                raise BadReference(f"{p}: no photos in this folder (.jpg, .png, .webp, .bmp; or name/ subfolders)")
            targets += found
        else:
            targets += list_people([p])
    return targets


def load_people(paths: Sequence[Path], detector, embedder, det_thresh: float = 0.5) -> list[Person]:
    """:func:`list_people` with each person's descriptor (:func:`describe_people`)."""
    return describe_people(list_people(paths), detector, embedder, det_thresh)


def load_targets(paths: Sequence[Path], detector, embedder, det_thresh: float = 0.5) -> list[Person]:
    """:func:`list_targets` with each target's descriptor (:func:`describe_people`)."""
    return describe_people(list_targets(paths), detector, embedder, det_thresh)


def target_of(track_id: int, targets: Sequence[Person]) -> Person:
    """The target a track is steered towards: ``targets[track_id % len(targets)]`` (tracks are
    numbered from 0 in order of first appearance in each video; targets in :func:`list_targets`
    order), so each video's first track gets the first target, its second the second, and so on,
    round again after the last."""
    return targets[track_id % len(targets)]


def describe_people(people: list[Person], detector, embedder, det_thresh: float = 0.5) -> list[Person]:
    """Set each person's descriptor from their photos. Every photo must show exactly one face
    scored >= ``det_thresh`` by ``detector`` (a faces.Detector), except 112x112 images (deid
    faces' aligned crops), embedded as they are. ``embedder``: generator.embedder.IdentityEmbedder
    (its fp32 ``embed``). BadReference naming the photo: unreadable, no face, several faces."""
    from ..faces.align import arcface_crop
    from ..media.images import read_image

    for person in people:
        crops = []
        for f in person.files:
            try:
                img = read_image(f)
            except InputError:
                raise BadReference(f"{f}: reference photo cannot be read") from None
            if img.shape[:2] == (CROP_SIDE, CROP_SIDE):
                crops.append(img)
                continue
            d = detector.detect(img)
            keep = np.flatnonzero(d.scores >= det_thresh)
            if len(keep) == 0:
                raise BadReference(f"{f}: no face found in this reference photo")
            if len(keep) > 1:
                raise BadReference(f"{f}: {len(keep)} faces in this reference photo; give a photo of one person "
                                   f"(or crop it)")
            crops.append(arcface_crop(img, d.kps[keep[0]]))
        e = embedder.embed(crops).mean(0)
        person.descriptor = (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)
        log.info("reference %s: %d photo(s)", person.name, len(crops))
    return people


def steer_descriptor(own: np.ndarray, target: np.ndarray, weight: float = TARGET_WEIGHT) -> np.ndarray:
    """The descriptor the generator is conditioned on to steer a face with descriptor ``own``
    towards ``target`` (both (..., D) float32, L2-normalised): ``own - weight * target``,
    L2-normalised.

    Why not ``target`` itself, as in the paper: the shipped generator was trained with a repeller
    only (weights/MODEL_CARD.md), so it draws a face *away* from whatever descriptor it is given.
    Given a stranger's descriptor instead of the person's own, it moves the face away from the
    stranger and leaves the person recognisable (LFW DevTest, 400 faces: cosine to the target
    -0.34, 72% of the faces still verified as the person); given own - target it moves away from
    the person and towards the target (docs/target.md, research/target_response.py).

    A face whose own descriptor is at LFW_FAR_THRESHOLD or more to the target (the target is the
    person) keeps its own: own - target would be close to nothing, a random direction, and a random
    descriptor leaves the person recognisable as the target's does."""
    own, target = np.asarray(own, np.float32), np.asarray(target, np.float32)
    d = own - np.float32(weight) * target
    d = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
    same = np.sum(own * target, axis=-1, keepdims=True) >= LFW_FAR_THRESHOLD
    return np.where(same, own, d).astype(np.float32)


@dataclass
class _Track:
    untouched: bool = False  # left as decoded (kept with --keep, not listed with --only)
    decided: bool = False
    similarity: Optional[float] = None  # the deciding cosine (track descriptor . best person)
    person: Optional[str] = None  # the person nearest to the track at the decision
    reason: str = ""
    faces_compared: int = 0
    first_frame: Optional[int] = None
    last_frame: Optional[int] = None
    first_time: Optional[float] = None  # seconds (None when the caller gives no times)
    last_time: Optional[float] = None
    faces: int = 0  # the track's faces seen (detected or filled in; not the held ones)
    switched_at_frame: Optional[int] = None  # where a re-check anonymized an untouched track
    recent: list = field(default_factory=list)  # last RECHECK_FACES embeddings (untouched tracks)
    faces_untouched: int = 0


class Chooser:
    """Per-file track decisions for ``mode`` "keep" or "only" against ``people`` (loaded).

    :meth:`choose` takes a batch of (frame index, image, faces) in frame order, before any of it is
    rendered, and returns the faces to anonymize per item (those of untouched tracks left out).
    The safe direction wins: with keep a track stays untouched only when its descriptor's cosine to
    a kept person is >= KEEP_THRESHOLD; with only, a track is anonymized when it is >=
    ONLY_THRESHOLD. A track without a detected face yet is anonymized and decided later. An
    untouched track is re-checked on each later detected face (mean of its last RECHECK_FACES
    embeddings) for a change of person (a tracker swap, a cut): with keep, when it is no longer
    clearly the kept person (under KEEP_THRESHOLD), with only, when it is clearly a listed person
    (KEEP_THRESHOLD or above), it is anonymized for the rest of the video, from the start of the
    batch where that happened. Never the other way round. With only, the re-check asks for clear
    evidence rather than the decision's ONLY_THRESHOLD because a stranger's faces sway around it
    from frame to frame (ghost_2person: the two people are at cosine 0.05-0.25 to each other, face
    by face), while a swap moves the cosine far (0.15 to 0.8 there).
    """

    def __init__(self, mode: str, people: Sequence[Person], embedder):
        assert mode in ("keep", "only") and people and all(p.descriptor is not None for p in people)
        self.mode, self.people, self.embedder = mode, list(people), embedder
        self.ref = np.stack([p.descriptor for p in people]).astype(np.float32)  # (P, 128)
        self.tracks: dict[int, _Track] = {}

    def _untouched_by(self, cos: float) -> bool:
        return cos >= KEEP_THRESHOLD if self.mode == "keep" else cos < ONLY_THRESHOLD

    def _best(self, emb: np.ndarray) -> tuple[float, str]:
        e = emb.mean(0)
        cos = self.ref @ (e / max(float(np.linalg.norm(e)), 1e-12))
        k = int(np.argmax(cos))
        return float(cos[k]), self.people[k].name

    def choose(self, items: Sequence[tuple[int, np.ndarray, Sequence]],
               times: Optional[Sequence[Optional[float]]] = None) -> list[list]:
        """``times``: each item's frame time in seconds (None: not known), for the report."""
        from ..faces.align import arcface_crop

        new: dict[int, list] = {}  # undecided track -> crops of its first detected faces here
        later: list[tuple[int, int, int]] = []  # (track, item, crop index) for untouched tracks' faces
        crops: list[np.ndarray] = []
        for i, (idx, img, faces) in enumerate(items):
            when = None if times is None or times[i] is None else round(float(times[i]), 3)
            for f in faces:
                t = self.tracks.setdefault(f.track_id, _Track(first_frame=idx, first_time=when))
                if f.held:
                    continue
                t.last_frame, t.last_time = idx, when
                t.faces += 1
                if f.interpolated:
                    continue
                if not t.decided:
                    lst = new.setdefault(f.track_id, [])
                    if len(lst) < DECIDE_FACES:
                        lst.append(len(crops))
                        crops.append(arcface_crop(img, f.kps))
                elif t.untouched:
                    later.append((f.track_id, i, len(crops)))
                    crops.append(arcface_crop(img, f.kps))
        emb = self.embedder.embed(crops) if crops else np.zeros((0, 128), np.float32)
        for tid, idx in new.items():
            t = self.tracks[tid]
            t.similarity, t.person = self._best(emb[idx])
            t.similarity = round(t.similarity, 4)
            t.faces_compared, t.decided = len(idx), True
            t.untouched = self._untouched_by(t.similarity)
            t.recent = list(emb[idx][-RECHECK_FACES:])
            op = ">=" if t.similarity >= (KEEP_THRESHOLD if self.mode == "keep" else ONLY_THRESHOLD) else "<"
            thr = KEEP_THRESHOLD if self.mode == "keep" else ONLY_THRESHOLD
            t.reason = f"cosine to {t.person} {t.similarity:.3f} {op} {thr} over {len(idx)} face(s)"
        switched: set = set()
        for tid, i, j in later:
            t = self.tracks[tid]
            if not t.untouched:
                continue
            t.recent = (t.recent + [emb[j]])[-RECHECK_FACES:]
            t.faces_compared += 1
            cos, name = self._best(np.stack(t.recent))
            if (cos < KEEP_THRESHOLD) if self.mode == "keep" else (cos >= KEEP_THRESHOLD):
                t.untouched = False
                t.switched_at_frame = items[i][0]
                bar = f"< {KEEP_THRESHOLD}" if self.mode == "keep" else f">= {KEEP_THRESHOLD}"
                t.reason += (f"; anonymized from frame {items[0][0]}: last {len(t.recent)} faces at cosine "
                             f"{cos:.3f} to {name} ({bar})")
                switched.add(tid)
        if switched:
            log.warning("track(s) %s changed identity: anonymized from here on", sorted(switched))
        out = []
        for _, _, faces in items:
            keep = []
            for f in faces:
                t = self.tracks[f.track_id]
                if t.decided and t.untouched:
                    t.faces_untouched += 1
                else:
                    keep.append(f)
            out.append(keep)
        return out

    def report(self) -> list[dict]:
        """Every track with its decision (kept: left untouched), similarity and reason."""
        return [{"track": tid, "decision": "kept" if t.decided and t.untouched else "anonymized",
                 "similarity": t.similarity, "nearest_person": t.person, "reason": t.reason or "no detected face",
                 "faces_compared": t.faces_compared, "faces_kept": t.faces_untouched, "first_frame": t.first_frame,
                 "last_frame": t.last_frame, "first_time": t.first_time, "last_time": t.last_time, "faces": t.faces,
                 "switched_at_frame": t.switched_at_frame}
                for tid, t in sorted(self.tracks.items())]
