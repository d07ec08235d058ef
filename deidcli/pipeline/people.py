"""--keep / --only: reference people and the per-track decision (docs/keep_only.md).

A reference is a photo (exactly one face), a folder of photos of one person, or a folder of
``name/`` subfolders, one per person; 112x112 images are taken for the ArcFace-aligned crops
``deid faces`` writes (``track_NNN.png``) and embedded as they are. Each person's descriptor is
the normalised mean of the normalised embeddings of their photos (MobileFaceNet, fp32).

A track is compared with the people by the cosine of its own descriptor (the normalised mean
of its first :data:`DECIDE_FACES` detected faces' embeddings) with each person's, the highest
wins. :class:`Chooser` decides once per segment of a track (the track, split where its person
changes), before any of its frames is rendered, and re-checks the segments it leaves untouched on
every later detected face.

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
#: A detected face whose cosine to its segment's anchor (the mean of the faces that decided it) is
#: under this starts a new segment (Chooser: the person under the track changed). The test is
#: KEEP_THRESHOLD's: one face against the mean of up to DECIDE_FACES faces, where 0.1% of strangers
#: reach 0.36 on LFW DevTrain. On the tracks of ../shared/videos (9 tracks, 8 clips; every later face
#: against every 5-face block of its track, python -m deidcli.research.split_rates): the same person
#: under it in 8 of 144,984 comparisons (all lp_d12; 0.1% quantile 0.454), another person at or
#: above it in 43 of 1,322,361 (99.9% quantile 0.298).
SPLIT_THRESHOLD = KEEP_THRESHOLD
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
class _Segment:
    """A run of one track's faces taken for one person: the track's first, then one more from each
    identity change (Chooser)."""

    track: int
    index: int = 0  # 0: the track's first segment; n: after the track's n-th identity change
    untouched: bool = False  # left as decoded (kept with --keep, not listed with --only)
    decided: bool = False
    similarity: Optional[float] = None  # the deciding cosine (segment descriptor . best person)
    person: Optional[str] = None  # the person nearest to the segment at the decision
    reason: str = ""
    faces_compared: int = 0
    first_frame: Optional[int] = None
    last_frame: Optional[int] = None
    first_time: Optional[float] = None  # seconds (None when the caller gives no times)
    last_time: Optional[float] = None
    faces: int = 0  # the segment's faces seen (detected or filled in; not the held ones)
    switched_at_frame: Optional[int] = None  # where a re-check anonymized an untouched segment
    evidence: list = field(default_factory=list)  # the embeddings that decide it (up to DECIDE_FACES)
    anchor: Optional[np.ndarray] = None  # their normalised mean, set at the decision
    recent: list = field(default_factory=list)  # last RECHECK_FACES embeddings (untouched segments)
    faces_untouched: int = 0


class Chooser:
    """Per-file track decisions for ``mode`` "keep" or "only" against ``people`` (loaded).

    :meth:`choose` takes a batch of (frame index, image, faces) in frame order, before any of it is
    rendered, and returns the faces to anonymize per item (those of untouched segments left out).
    The safe direction wins: with keep a segment stays untouched only when its descriptor's cosine
    to a kept person is >= KEEP_THRESHOLD; with only, a segment is anonymized when it is >=
    ONLY_THRESHOLD.

    Segments: a track is one segment until its person changes (a tracker swap at a crossing, a cut
    at the same place). Every detected face of a decided segment is compared with the segment's
    anchor (the normalised mean of the embeddings that decided it); a face under SPLIT_THRESHOLD
    starts a new segment there (with the filled-in faces since the track's last detected face in
    the batch), which is anonymized until it is decided from its own first DECIDE_FACES detected
    faces, in the batch where it gets them (its faces of that batch follow the decision). A track's
    first segment is decided in the batch where it first appears, from up to DECIDE_FACES faces
    there; one without a detected face yet is anonymized.

    An untouched segment is also re-checked on each later detected face (mean of its last
    RECHECK_FACES embeddings): with keep, when it is no longer clearly the kept person (under
    KEEP_THRESHOLD), with only, when it is clearly a listed person (KEEP_THRESHOLD or above), it is
    anonymized to its end, from the start of the batch where that happened. With only, the
    re-check asks for clear evidence rather than the decision's ONLY_THRESHOLD because a stranger's
    faces sway around it from frame to frame (ghost_2person: the two people are at cosine 0.05-0.25
    to each other, face by face), while a swap moves the cosine far (0.15 to 0.8 there).
    """

    def __init__(self, mode: str, people: Sequence[Person], embedder):
        assert mode in ("keep", "only") and people and all(p.descriptor is not None for p in people)
        self.mode, self.people, self.embedder = mode, list(people), embedder
        self.ref = np.stack([p.descriptor for p in people]).astype(np.float32)  # (P, 128)
        self.tracks: dict[int, list[_Segment]] = {}  # track id -> its segments, in order

    def _untouched_by(self, cos: float) -> bool:
        return cos >= KEEP_THRESHOLD if self.mode == "keep" else cos < ONLY_THRESHOLD

    def _best(self, emb: np.ndarray) -> tuple[float, str]:
        e = emb.mean(0)
        cos = self.ref @ (e / max(float(np.linalg.norm(e)), 1e-12))
        k = int(np.argmax(cos))
        return float(cos[k]), self.people[k].name

    def _decide(self, s: _Segment) -> None:
        ev = np.stack(s.evidence)
        sim, s.person = self._best(ev)
        s.similarity = round(sim, 4)
        a = ev.mean(0)
        s.anchor = (a / max(float(np.linalg.norm(a)), 1e-12)).astype(np.float32)
        s.faces_compared += len(ev)
        s.decided = True
        s.untouched = self._untouched_by(s.similarity)
        s.recent = list(ev[-RECHECK_FACES:])
        thr = KEEP_THRESHOLD if self.mode == "keep" else ONLY_THRESHOLD
        op = ">=" if s.similarity >= thr else "<"
        s.reason += ("; " if s.reason else "") + \
            f"cosine to {s.person} {s.similarity:.3f} {op} {thr} over {len(ev)} face(s)"

    def choose(self, items: Sequence[tuple[int, np.ndarray, Sequence]],
               times: Optional[Sequence[Optional[float]]] = None) -> list[list]:
        """``times``: each item's frame time in seconds (None: not known), for the report."""
        from ..faces.align import arcface_crop

        whens = [None if times is None or times[i] is None else round(float(times[i]), 3)
                 for i in range(len(items))]
        crops: list[np.ndarray] = []
        which: list[list[Optional[int]]] = []  # per item and face: its crop's index (None: not embedded)
        for idx, img, faces in items:
            row = []
            for f in faces:
                row.append(None if f.held or f.interpolated else len(crops))
                if row[-1] is not None:
                    crops.append(arcface_crop(img, f.kps))
            which.append(row)
        emb = self.embedder.embed(crops) if crops else np.zeros((0, 128), np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        seg_of: list[list[_Segment]] = []  # per item and face: its segment
        filled: dict[int, list] = {}  # track -> (item, face) filled in since its last detected face here
        changed, switched = [], []
        for i, (idx, _, faces) in enumerate(items):
            when = whens[i]
            row = []
            for k, f in enumerate(faces):
                segs = self.tracks.setdefault(f.track_id, [_Segment(f.track_id, first_frame=idx, first_time=when)])
                s = segs[-1]
                row.append(s)
                if f.held:
                    continue
                j = which[i][k]
                if j is not None and s.decided:
                    cos = float(emb[j] @ s.anchor)
                    s.faces_compared += 1
                    if cos < SPLIT_THRESHOLD:  # another person: a new segment from this face on
                        at = f"t={when:.2f} s (frame {idx})" if when is not None else f"frame {idx}"
                        s = _Segment(f.track_id, len(segs), first_frame=idx, first_time=when,
                                     reason=f"identity changed at {at}: cosine {cos:.3f} to the track's earlier "
                                            f"faces < {SPLIT_THRESHOLD}")
                        segs.append(s)
                        row[-1] = s
                        for i2, k2 in filled.get(f.track_id, []):  # filled in between the two people
                            old = seg_of[i2][k2] if i2 < i else row[k2]
                            old.faces -= 1
                            s.faces += 1
                            s.first_frame, s.first_time = items[i2][0], whens[i2]
                            if i2 < i:
                                seg_of[i2][k2] = s
                            else:
                                row[k2] = s
                        changed.append((f.track_id, idx))
                filled[f.track_id] = [] if j is not None else filled.get(f.track_id, []) + [(i, k)]
                s.last_frame, s.last_time = idx, when
                s.faces += 1
                if j is None:
                    continue
                if not s.decided:
                    if len(s.evidence) < DECIDE_FACES:
                        s.evidence.append(emb[j])
                    if len(s.evidence) == DECIDE_FACES:
                        self._decide(s)
                elif s.untouched:
                    s.recent = (s.recent + [emb[j]])[-RECHECK_FACES:]
                    cos, name = self._best(np.stack(s.recent))
                    if (cos < KEEP_THRESHOLD) if self.mode == "keep" else (cos >= KEEP_THRESHOLD):
                        s.untouched = False
                        s.switched_at_frame = idx
                        bar = f"< {KEEP_THRESHOLD}" if self.mode == "keep" else f">= {KEEP_THRESHOLD}"
                        s.reason += (f"; anonymized from frame {max(items[0][0], s.first_frame)}: last "
                                     f"{len(s.recent)} faces at cosine {cos:.3f} to {name} ({bar})")
                        switched.append(f.track_id)
            seg_of.append(row)
        for segs in self.tracks.values():  # a track's first segment: decided in the batch where it appears
            if segs[0].evidence and not segs[0].decided:
                self._decide(segs[0])
        if changed:
            log.warning("identity changed (track, frame): %s: a new segment each, decided from its own faces",
                        changed)
        if switched:
            log.warning("track(s) %s no longer the person decided: anonymized from here on", sorted(set(switched)))
        out = []
        for (_, _, faces), row in zip(items, seg_of):
            keep = []
            for f, s in zip(faces, row):
                if s.decided and s.untouched:
                    s.faces_untouched += 1
                else:
                    keep.append(f)
            out.append(keep)
        return out

    def report(self) -> list[dict]:
        """Every segment (each track's, in order) with its decision (kept: left untouched),
        similarity and reason."""
        out = []
        for tid, segs in sorted(self.tracks.items()):
            for s in segs:
                reason = s.reason or "no detected face"
                if not s.decided and s.index:
                    reason += f"; not decided ({len(s.evidence)} detected face(s) of {DECIDE_FACES}): anonymized"
                out.append({"track": tid, "segment": s.index,
                            "decision": "kept" if s.decided and s.untouched else "anonymized",
                            "similarity": s.similarity, "nearest_person": s.person, "reason": reason,
                            "faces_compared": s.faces_compared, "faces_kept": s.faces_untouched,
                            "first_frame": s.first_frame, "last_frame": s.last_frame, "first_time": s.first_time,
                            "last_time": s.last_time, "faces": s.faces, "switched_at_frame": s.switched_at_frame})
        return out
