"""``deid evaluate-video``: is every face of a video anonymized, and does the output stay stable in time?

Compares an input clip with its anonymized output, frame by frame (deid keeps the frame
count and timestamps, so frame i of one is frame i of the other). The faces are found in the
INPUT: SCRFD-2.5G on every frame, linked and smoothed by deid's own tracker (a face the
detector misses for a few frames inside a track is filled in and still checked; a cut, as the
anonymizer sees one, faces.looks.Cuts, ends every track, so no face's landmarks are smoothed
with another person's across it). The audit is
stricter than the anonymizer: detections down to ``audit_thresh`` (0.3) are tracked, and a
track counts when one of its detections reaches ``det_thresh`` (0.5, the anonymizer's
default); tracks that never do are listed as unconfirmed and left out. Each face is cropped at
the input's smoothed landmarks from both frames, so input and output crops have exactly the
same alignment. Per face, per track and per clip:

exposure (goal: zero)
    a face is *exposed* when the output face still matches the input identity
    (cosine >= the verification threshold, :data:`VERIFY_THRESHOLD`) or the output crop is
    unchanged (mean absolute difference of the ArcFace crops < :data:`UNCHANGED_MAD`, i.e. no
    replacement happened). Every frame index with an exposed face is reported. Faces whose
    box is smaller than ``min_face`` are not checked and are counted separately.
    A verification has a control: the input crop with its face region filled flat
    (measures.face_removed). When the network matches that control to the input at least as
    closely as it matches the output, the match comes from what surrounds the face (hair,
    background, a colour cast or haze) or from an input it cannot read (faces of ~30 px, where
    different LFW people pass the threshold 6% of the time at 24 px), not from the face: such
    a face is counted in ``verified_context_only`` instead of exposed. On the stress set's
    hazy and blue-lit mosaics, deid's blurred faces passed the threshold this way, and the
    control itself passes it for 40 of 300 hazy faces (research/identity_control.py).
    A diagnostic, which changes no count: ``exposed_flat_verified``, the exposed faces whose input
    the network also verifies against one flat colour, the crop's mean (measures.flat_patch).
    A face filled in by the tracker (not detected in that frame) whose input crop is not the
    track's person (cosine to the mean of its detected faces so far under the threshold) is
    behind something, mostly another face passing in front: its crop shows what hides it, and
    comparing output with input there judges that. Such a face counts in ``faces_hidden`` and is
    exposed when its output crop matches the person (stress set crowd_lfw: 8 filled-in faces
    behind passing faces, input crops at -0.04-0.31 to their person, were "exposed" at 0.39-0.75
    by the occluder they showed, their output at that place a blur or another generated face).
identity
    cosine between the MobileFaceNet embeddings of the output and input ArcFace crops (mean,
    max) and the fraction of faces still verified as the same person.
temporal stability
    flicker = mean absolute difference (0-255 RGB) between consecutive ArcFace crops of a
    track, for the output and for the input (same alignment for both), and their ratio
    (target <= 1.3); embedding variation = mean (1 - cosine) between consecutive embeddings,
    output and input.
perception kept over time
    landmark displacement: SCRFD run on the output frame, its face matched to the input's raw
    detection by IoU, mean distance of the 5 points in % of the inter-ocular distance (and how
    often the output face was found at all); mouth opening (the jaw-drop proxy, see
    :func:`jaw_drop`): Pearson correlation across frames, per track, between input and output
    (target >= 0.9).
garish faces and fallbacks (goal: no garish face; deidcli/research/garish.py)
    each output face is classified unchanged / blurred / pixelated (deid's fallbacks) /
    generated, and a generated face is *garish* when its colours are not the input face's
    (colour), it has black or white blotches (blotch), or the detector (down to audit_thresh)
    no longer finds a face the input had at det_thresh and it was replaced (lost, faces >= 40
    px); a face the frame's other faces cover in part (garish.OCCLUDED_SHARE) is blurred
    whatever its colour and never lost, the cover of the face in front lying over it. Reported
    per clip (also by face-height bin: <48, 48-96, 96-192, >=192 px) and per track: garish_faces, garish_frac, the count of each reason, faces_generated, faces_blurred,
    faces_pixelated. Validation (thresholds in garish.py): on the stress mosaics and shared
    clips, plain re-encodes and deid's blur/pixelate outputs give no garish face and the shared
    clips' deid outputs none either; two blind by-eye gradings of 90 faces each agreed on 86
    and 81 (the misses: faces with milder dark eye sockets than the flagged ones).

Array contract: frames are (H, W, 3) uint8 RGB, upright (display rotation applied as in
video.py). Memory is bounded: frames are streamed; only the tracker's few frames of lag are
held, plus one float per face and frame for the correlations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import click
import numpy as np

from ..cli.det_size import det_size_option
from ..options import DET_SIZE_AUTO
from .measures import (
    EYES_MIN_STD,
    MOUTH_MIN_STD,
    UNCHANGED_MAD,
    VERIFY_THRESHOLD,
    _corr_ci90,
    _iod,
    _lip_opening,
    _mean,
    _pearson,
    _ratio,
    face_filled,
    flat_patch,
    face_removed,
    jaw_drop,
    lfw_far_threshold,
    mouth_crop,
    mouth_profile,
    upright_frames,
)
from .video_report import STRIP_FRAMES, _thumb, _write_strip, to_markdown

#: Detections down to this score are tracked in the INPUT, so that faces the anonymizer's
#: detector (det_thresh, 0.5 by default) misses in a few frames are still checked there. A
#: track counts only when at least one of its detections reaches det_thresh (hysteresis): on
#: lp_d6.mp4 the face scores 0.37-0.49 in a third of the frames (strong grimaces), while the
#: only things below 0.5 that are not faces (a hair tie, scored 0.31-0.35) never reach it.
AUDIT_THRESH = 0.3

#: Minimum IoU to pair a tracked face with a raw detection (input, then output).
MATCH_IOU = 0.3

#: Targets from issue 4.
TARGET_FLICKER_RATIO = 1.3

TARGET_MOUTH_CORR = 0.9

#: Fewest frames of a track for a mouth correlation to be reported.
MIN_CORR_FRAMES = 10

#: Faces embedded per identity-network call.
EMBED_BATCH = 32


@dataclass
class _Track:
    track_id: int
    frames: list = field(default_factory=list)  # frame indices
    interpolated: int = 0
    cos: list = field(default_factory=list)
    exposed: list = field(default_factory=list)  # frame indices
    exposed_verified: int = 0
    exposed_unchanged: int = 0
    verified_context: int = 0  # verified, but no closer than the crop without its face
    exposed_flat: int = 0  # exposed (verified), and a flat patch of the input crop's colour is verified too
    hidden: int = 0  # filled in where the input crop is not the person (behind something): judged against ref
    ref: Any = None  # sum of the input embeddings of the track's detected faces so far
    mouth_in: list = field(default_factory=list)
    mouth_out: list = field(default_factory=list)
    lips_in: list = field(default_factory=list)  # inner-lip opening (IOD); empty when not measured
    lips_out: list = field(default_factory=list)
    eyes_in: list = field(default_factory=list)  # eye opening (IOD), measured with the lips
    eyes_out: list = field(default_factory=list)
    flicker_in: list = field(default_factory=list)
    flicker_out: list = field(default_factory=list)
    embvar_in: list = field(default_factory=list)
    embvar_out: list = field(default_factory=list)
    lm_disp: list = field(default_factory=list)  # % IOD, faces whose output was detected
    lm_checked: int = 0  # faces with a raw input detection
    judge_dist: list = field(default_factory=list)  # --judge: input-output descriptor distances
    judge_ctx: int = 0  # --judge: same-person calls where the input with its face filled flat is called the same too
    kinds: dict = field(default_factory=dict)  # garish.KINDS -> faces
    garish: list = field(default_factory=list)  # frame indices of garish faces
    garish_reasons: dict = field(default_factory=dict)  # garish.REASONS -> faces
    max_score: float = 0.0  # best detector score of the track
    prev: Any = None  # (index, in112 float32, out112 float32, e_in, e_out)

    def summary(self, thr: float) -> dict:
        fi, fo = _mean(self.flicker_in), _mean(self.flicker_out)
        ei, eo = _mean(self.embvar_in), _mean(self.embvar_out)
        n = len(self.frames)
        sd = float(np.std(self.mouth_in)) if self.mouth_in else None
        corr = _pearson(self.mouth_in, self.mouth_out) if n >= MIN_CORR_FRAMES and sd >= MOUTH_MIN_STD else None
        lsd = float(np.std(self.lips_in)) if self.lips_in else None
        lcorr = (_pearson(self.lips_in, self.lips_out)
                 if len(self.lips_in) >= MIN_CORR_FRAMES and lsd >= MOUTH_MIN_STD else None)
        esd = float(np.std(self.eyes_in)) if self.eyes_in else None
        ecorr = (_pearson(self.eyes_in, self.eyes_out)
                 if len(self.eyes_in) >= MIN_CORR_FRAMES and esd >= EYES_MIN_STD else None)
        return {
            "track": self.track_id,
            "first_frame": self.frames[0],
            "last_frame": self.frames[-1],
            "faces": n,
            "interpolated": self.interpolated,
            "exposed_frames": list(self.exposed),
            "exposed_verified": self.exposed_verified,
            "exposed_unchanged": self.exposed_unchanged,
            "verified_context_only": self.verified_context,
            "exposed_flat_verified": self.exposed_flat,
            "faces_hidden": self.hidden,
            "cos_mean": _mean(self.cos),
            "cos_max": float(np.max(self.cos)) if self.cos else None,
            "verified_frac": float(np.mean(np.asarray(self.cos) >= thr)) if self.cos else None,
            "flicker_in": fi,
            "flicker_out": fo,
            "flicker_ratio": _ratio(fo, fi),
            "embvar_in": ei,
            "embvar_out": eo,
            "landmark_disp_iod_pct": _mean(self.lm_disp),
            "landmark_found_frac": (len(self.lm_disp) / self.lm_checked) if self.lm_checked else None,
            "mouth_in_std": sd,
            "mouth_out_std": float(np.std(self.mouth_out)) if self.mouth_out else None,
            "mouth_corr": corr,
            "mouth_corr_ci90": _corr_ci90(self.mouth_in, self.mouth_out) if corr is not None else None,
            "lips_in_std": lsd,
            "lips_out_std": float(np.std(self.lips_out)) if self.lips_out else None,
            "lips_corr": lcorr,
            "lips_corr_ci90": _corr_ci90(self.lips_in, self.lips_out) if lcorr is not None else None,
            "eyes_in_mean": _mean(self.eyes_in),
            "eyes_out_mean": _mean(self.eyes_out),
            "eyes_in_std": esd,
            "eyes_out_std": float(np.std(self.eyes_out)) if self.eyes_out else None,
            "eyes_corr": ecorr,
            "eyes_corr_ci90": _corr_ci90(self.eyes_in, self.eyes_out) if ecorr is not None else None,
            **_judge_summary(self.judge_dist, self.judge_ctx),
            **_garish_summary(self.kinds, self.garish, self.garish_reasons),
        }


def _garish_summary(kinds: dict, garish: list, reasons: dict) -> dict:
    """Garish and fallback figures of a track or a clip (see deidcli/research/garish.py)."""
    from .garish import KINDS, REASONS

    n = sum(kinds.values())
    return {
        "garish_faces": len(garish),
        "garish_frac": len(garish) / n if n else None,
        "garish_frames": sorted(set(garish)),
        **{f"garish_{r}": int(reasons.get(r, 0)) for r in REASONS},
        **{f"faces_{k}": int(kinds.get(k, 0)) for k in KINDS},
        "fallback_frac": (kinds.get("blurred", 0) + kinds.get("pixelated", 0)) / n if n else None,
    }


def _sum_dicts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _by_size(track_bins: list, names: list) -> dict:
    """{size bin: {faces, garish, blurred, pixelated, garish_frac, fallback_frac}} over the tracks."""
    out = {}
    for name in names:
        c = _sum_dicts(b[name] for b in track_bins if name in b)
        n = c.get("faces", 0)
        out[name] = {"faces": n, "garish": c.get("garish", 0), "blurred": c.get("blurred", 0),
                     "pixelated": c.get("pixelated", 0),
                     "garish_frac": c.get("garish", 0) / n if n else None,
                     "fallback_frac": (c.get("blurred", 0) + c.get("pixelated", 0)) / n if n else None}
    return out


def _judge_summary(dist: list, context: int = 0) -> dict:
    """``--judge`` figures of a list of input-output descriptor distances (empty: no keys), and
    ``context``, how many of its same-person calls the judge also makes on the input with its face
    filled flat (measures.face_filled): a diagnostic, counted in judge_same_frac all the same."""
    if not dist:
        return {}
    from .judges import DLIB_SAME_DISTANCE

    d = np.asarray(dist)
    return {"judge_faces": len(d), "judge_dist_mean": float(d.mean()), "judge_dist_min": float(d.min()),
            "judge_same_frac": float(np.mean(d < DLIB_SAME_DISTANCE)),
            "judge_same_context_frac": context / len(d)}


# --------------------------------------------------------------------------------------
# Evaluation


class _Models:
    def __init__(self, models_dir, det_thresh: float, audit_thresh: float, det_size: int, min_face: int):
        from .. import weights
        from ..faces.detect import Detector
        from ..generator.embedder import IdentityEmbedder

        det_path = weights.model_path("det_scrfd_2.5g_kps.onnx", models_dir)
        # input faces: down to audit_thresh, min_face applies (as in the pipeline);
        # output faces: every face down to audit_thresh (a face counts as lost, garish.py, only
        # when none is found); the landmark check keeps those at det_thresh.
        self.det_in = Detector(det_path, det_thresh=min(det_thresh, audit_thresh), det_size=det_size,
                               min_face=min_face)
        self.det_out = Detector(det_path, det_thresh=min(det_thresh, audit_thresh), det_size=det_size,
                                min_face=0)
        self.embedder = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", models_dir))


def _best_iou(box: np.ndarray, boxes: np.ndarray) -> Optional[int]:
    from ..faces.detect import box_iou

    if len(boxes) == 0:
        return None
    iou = box_iou(box[None], boxes)[0]
    j = int(np.argmax(iou))
    return j if iou[j] >= MATCH_IOU else None


def evaluate_video(input_path: os.PathLike, output_path: os.PathLike, models_dir: Optional[os.PathLike] = None,
                   det_thresh: float = 0.5, min_face: int = 0, verify_threshold: Optional[float] = None,
                   strip_png: Optional[os.PathLike] = None, det_size: int = DET_SIZE_AUTO,
                   audit_thresh: float = AUDIT_THRESH, judge: Any = None, judge_every: int = 5,
                   face_hook: Optional[Callable[[dict], None]] = None) -> dict:
    """Measure exposure, identity, temporal stability and perception of ``output_path`` against
    ``input_path`` (see the module docstring). Returns a JSON-serialisable dict; writes a PNG
    strip (input frames above, output below, then the ArcFace crops of their first face) to
    ``strip_png`` when given. Raises InputError when a file is unreadable or the frame counts differ.

    ``judge`` ("dlib", or a judge loaded by deidcli.research.judges.load_judge): identity also measured by
    a recognition network deid was not trained with, on the detected (not interpolated) faces
    of every ``judge_every``-th frame: the distance between its descriptors of the input and the
    output face, each aligned by the judge itself from the full frame at the input's face box,
    and the fraction below its same-person distance (dlib: 0.6). Raises JudgeUnavailable (exit 3)
    when the judge is not installed.

    ``face_hook``: called with every face of a confirmed-or-not track as it is accounted (a dict:
    index, track, in112, out112, height, verdict (garish.Verdict), cos, score, interpolated, lost,
    box, judge (the distance), judge_context (where the judge called the output the same person:
    whether it calls the input with its face filled flat the same too), exposed (as counted: the
    control and hidden faces taken into account), hidden, covered (garish.occluded_share: the
    share of its box the frame's other faces cover)); for validation tools.
    """
    from ..errors import InputError
    from ..faces.align import arcface_crop
    from ..faces.looks import Cuts
    from ..faces.track import Tracker
    from ..media.probe import probe
    from ..options import TrackOptions
    from .garish import OCCLUDED_SHARE, assess, box_region, occluded_share, size_bin, size_bin_names
    from .garish import settings as garish_settings

    t_start = time.time()
    thr = float(VERIFY_THRESHOLD if verify_threshold is None else verify_threshold)
    input_path, output_path = Path(input_path), Path(output_path)
    info_in, info_out = probe(input_path), probe(output_path)
    if (info_in.width, info_in.height) != (info_out.width, info_out.height):
        raise InputError(f"{output_path.name}: {info_out.width}x{info_out.height}, but the input is "
                         f"{info_in.width}x{info_in.height}")
    judge_net = judge
    if isinstance(judge, str):
        from .judges import load_judge

        judge_net = load_judge(judge)
    models = _Models(models_dir, det_thresh, audit_thresh, det_size, min_face)
    fps = float(info_in.average_rate) if info_in.average_rate else None
    tracker = Tracker(TrackOptions(pad=0), fps=fps)  # the faces seen, none held past a track
    cuts = Cuts()
    n_expected = info_in.frames or (round(info_in.duration * fps) if info_in.duration and fps else 0)
    strip_at = set(np.linspace(0, max(n_expected - 1, 0), STRIP_FRAMES).round().astype(int).tolist()) \
        if strip_png else set()
    strip: dict[int, tuple] = {}
    exposed_crops: list = []  # (track, index, in112, out112, cos): the first few, for the strip
    garish_crops: list = []  # (track, index, in112, out112, reason): the first few, for the strip
    bins: dict = {}  # track -> {size bin: {"faces", "garish", "blurred", "pixelated"}}

    tracks: dict[int, _Track] = {}
    small_faces = 0
    frames_small: list[int] = []
    pending: deque = deque()  # (index, in_img, out_img, in_dets, out_dets) awaiting the tracker
    todo: list[dict] = []  # faces waiting for a batched embedding, in frame order
    max_dt = 0.0

    def flush_embeddings():
        if not todo:
            return
        e = models.embedder.embed([c for f in todo for c in (f["in112"], f["out112"])])
        for k, f in enumerate(todo):
            account(f, e[2 * k], e[2 * k + 1])
        todo.clear()

    def account(f: dict, e_in: np.ndarray, e_out: np.ndarray):
        tr = tracks.setdefault(f["track"], _Track(f["track"]))
        i = f["index"]
        cos = float(np.dot(e_in, e_out))
        verified, unchanged = cos >= thr, f["mad"] < UNCHANGED_MAD
        hidden = False
        if not f["interpolated"]:
            tr.ref = e_in if tr.ref is None else tr.ref + e_in
        elif tr.ref is not None and float(np.dot(e_in, person := tr.ref / np.linalg.norm(tr.ref))) < thr:
            # filled in, and the input crop is not the person: the face is behind something (another
            # face passing in front) and the crop shows that. Judged by whether the output shows the
            # person (the track's detected faces so far), not whether it still shows what hides it.
            tr.hidden, hidden = tr.hidden + 1, True
            cos = float(np.dot(e_out, person))
            verified, unchanged = cos >= thr, False
        if verified and not unchanged and not hidden:  # the control: the input crop without its face
            e_ctx = models.embedder.embed([face_removed(f["in112"])])[0]
            if cos <= float(np.dot(e_in, e_ctx)):
                verified = False
                tr.verified_context += 1
        tr.frames.append(i)
        tr.interpolated += f["interpolated"]
        tr.max_score = max(tr.max_score, f["score"])
        tr.cos.append(cos)
        if verified or unchanged:
            if (strip_png and tr.max_score >= det_thresh and len(tr.exposed) < STRIP_FRAMES
                    and len(exposed_crops) < 4 * STRIP_FRAMES):  # confirmed so far; bounded
                exposed_crops.append((tr.track_id, i, f["in112"], f["out112"], cos))
            tr.exposed.append(i)
            tr.exposed_verified += verified
            if verified:  # the diagnostic: would the network verify a crop of one flat colour too?
                e_flat = models.embedder.embed([flat_patch(f["in112"])])[0]
                tr.exposed_flat += float(np.dot(e_in, e_flat)) >= thr
            tr.exposed_unchanged += unchanged
        tr.mouth_in.append(f["mouth_in"])
        tr.mouth_out.append(f["mouth_out"])
        if f["lips_in"] is not None:
            tr.lips_in.append(f["lips_in"])
            tr.lips_out.append(f["lips_out"])
            tr.eyes_in.append(f["eyes_in"])
            tr.eyes_out.append(f["eyes_out"])
        if f["judge"] is not None:
            tr.judge_dist.append(f["judge"][0])
            tr.judge_ctx += bool(f["judge"][1])
        v = f["verdict"]
        if (verified or unchanged) and "lost" in v.reasons:  # not replaced: exposed, not garish
            v = v.without("lost")
        tr.kinds[v.kind] = tr.kinds.get(v.kind, 0) + 1
        b = bins.setdefault(tr.track_id, {}).setdefault(size_bin(f["height"]), dict.fromkeys(
            ("faces", "garish", "blurred", "pixelated"), 0))
        b["faces"] += 1
        b["garish"] += v.garish
        if v.kind in ("blurred", "pixelated"):
            b[v.kind] += 1
        if v.garish:
            tr.garish.append(i)
            for r in v.reasons:
                tr.garish_reasons[r] = tr.garish_reasons.get(r, 0) + 1
            if (strip_png and tr.max_score >= det_thresh and len(tr.garish) <= 2
                    and len(garish_crops) < 4 * STRIP_FRAMES):  # 2 a track, bounded
                garish_crops.append((tr.track_id, i, f["in112"], f["out112"], v.reason))
        if face_hook is not None:
            face_hook({"index": i, "track": tr.track_id, "in112": f["in112"], "out112": f["out112"],
                       "height": f["height"], "verdict": v, "cos": cos, "score": f["score"],
                       "interpolated": f["interpolated"], "lost": f["lost"], "box": f["box"],
                       "covered": f["covered"],
                       "judge": None if f["judge"] is None else f["judge"][0],
                       "judge_context": None if f["judge"] is None else f["judge"][1],
                       "exposed": bool(verified or unchanged), "hidden": hidden})
        if f["lm"] is not None:
            tr.lm_checked += 1
            if f["lm"] >= 0:
                tr.lm_disp.append(f["lm"])
        a = f["in112"].astype(np.float32)
        b = f["out112"].astype(np.float32)
        if tr.prev is not None and tr.prev[0] == i - 1:
            _, pa, pb, pea, peb = tr.prev
            tr.flicker_in.append(float(np.mean(np.abs(a - pa))))
            tr.flicker_out.append(float(np.mean(np.abs(b - pb))))
            tr.embvar_in.append(1.0 - float(np.dot(e_in, pea)))
            tr.embvar_out.append(1.0 - float(np.dot(e_out, peb)))
        tr.prev = (i, a, b, e_in, e_out)
        if i in strip:
            strip[i][2].append((f["track"], f["in112"], f["out112"], cos, verified or unchanged, v.reason))

    refs: dict[int, list] = {}  # track -> [input, output] first mouth profile
    lips = _lip_opening()

    def mouth(face, img: np.ndarray, k: int) -> float:
        prof = mouth_profile(mouth_crop(img, face.kps))
        ref = refs.setdefault(face.track_id, [None, None])
        if ref[k] is None:
            ref[k] = prof
        return jaw_drop(prof, ref[k])

    def judged(img_in: np.ndarray, img_out: np.ndarray, face) -> tuple[float, Optional[bool]]:
        """The judge's distance between input and output at the face's box and, where it calls them
        the same person, whether it calls the input with its face filled flat the same too."""
        from .judges import DLIB_SAME_DISTANCE

        a, b = (judge_net.describe_boxes(x, [face.box])[0] for x in (img_in, img_out))
        d = float(np.linalg.norm(a - b))
        if d >= DLIB_SAME_DISTANCE:
            return d, None
        c = judge_net.describe_boxes(face_filled(img_in, face.box, face.kps), [face.box])[0]
        return d, bool(np.linalg.norm(a - c) < DLIB_SAME_DISTANCE)

    def finalize(final):
        for idx, faces in final:
            i, img_in, img_out, dets_in, dets_out = pending.popleft()
            assert i == idx, (i, idx)
            lm_out = dets_out.select(dets_out.scores >= det_thresh)  # the landmark check's faces
            boxes = []
            for face in faces:
                in112 = arcface_crop(img_in, face.kps)
                out112 = arcface_crop(img_out, face.kps)
                mad = float(np.mean(np.abs(in112.astype(np.int16) - out112.astype(np.int16))))
                lm, lost = None, None
                j = None if face.interpolated else _best_iou(face.box, dets_in.boxes)
                if j is not None:
                    k = _best_iou(dets_in.boxes[j], lm_out.boxes)
                    kin = dets_in.kps[j]
                    lm = -1.0 if k is None else float(
                        np.mean(np.linalg.norm(lm_out.kps[k] - kin, axis=1)) / _iod(kin) * 100.0)
                    if dets_in.scores[j] >= det_thresh:  # a confident input face: is there any output one?
                        lost = _best_iou(dets_in.boxes[j], dets_out.boxes) is None
                height = float(face.box[3] - face.box[1])
                covered = occluded_share(face.box, [g.box for g in faces if g is not face])
                verdict = assess(in112, out112, box_region(img_in, face.box), box_region(img_out, face.box),
                                 mad, UNCHANGED_MAD, lost=lost, height=height, occluded=covered >= OCCLUDED_SHARE)
                (lips_in, eyes_in), (lips_out, eyes_out) = (
                    (lips.openings(img_in, face.kps), lips.openings(img_out, face.kps)) if lips
                    else ((None, None), (None, None)))
                todo.append({
                    "index": i, "track": face.track_id, "interpolated": bool(face.interpolated),
                    "score": float(face.score),
                    "in112": in112, "out112": out112, "mad": mad, "lm": lm,
                    "verdict": verdict, "height": height, "lost": lost, "box": face.box, "covered": covered,
                    "mouth_in": mouth(face, img_in, 0), "mouth_out": mouth(face, img_out, 1),
                    "lips_in": lips_in, "lips_out": lips_out, "eyes_in": eyes_in, "eyes_out": eyes_out,
                    "judge": judged(img_in, img_out, face) if (judge_net and not face.interpolated
                                                               and i % judge_every == 0) else None,
                })
                boxes.append((face.track_id, face.box))
            if i in strip_at:
                strip[i] = (_thumb(img_in), _thumb(img_out), [], boxes, img_in.shape[1])
            if len(todo) >= EMBED_BATCH:
                flush_embeddings()

    n = 0
    with contextlib.closing(upright_frames(output_path)) as frames_out:
        for n_in, (img_in, t_in) in enumerate(upright_frames(input_path)):
            got = next(frames_out, None)
            if got is None:
                raise InputError(f"{output_path.name} has fewer frames than {input_path.name} "
                                 f"(ends at frame {n_in}); frames cannot be paired")
            img_out, t_out = got
            if img_out.shape != img_in.shape:
                raise InputError(f"frame {n_in}: output {img_out.shape} vs input {img_in.shape}")
            if t_in is not None and t_out is not None:
                max_dt = max(max_dt, abs(t_in - t_out))
            small0 = models.det_in.n_small
            dets_in = models.det_in.detect(img_in)
            if models.det_in.n_small > small0:
                small_faces += models.det_in.n_small - small0
                frames_small.append(n_in)
            dets_out = models.det_out.detect(img_out)
            pending.append((n_in, img_in, img_out, dets_in, dets_out))
            finalize(tracker.push(n_in, dets_in, cut=cuts(img_in)))
            n = n_in + 1
        if next(frames_out, None) is not None:
            raise InputError(f"{output_path.name} has more frames than {input_path.name} ({n}); "
                             f"frames cannot be paired")
    finalize(tracker.flush())
    flush_embeddings()
    assert not pending

    unconfirmed = {k: t for k, t in tracks.items() if t.max_score < det_thresh}
    tracks = {k: t for k, t in tracks.items() if k not in unconfirmed}
    per_track = [tracks[k].summary(thr) for k in sorted(tracks)]
    allv = lambda attr: [v for t in tracks.values() for v in getattr(t, attr)]  # noqa: E731
    exposed_frames = sorted(set(allv("exposed")))
    cos = allv("cos")
    fi, fo = _mean(allv("flicker_in")), _mean(allv("flicker_out"))
    corr_tracks = [(t["mouth_corr"], t["faces"]) for t in per_track if t["mouth_corr"] is not None]
    mouth_corr = (sum(c * w for c, w in corr_tracks) / sum(w for _, w in corr_tracks)) if corr_tracks else None
    lips_tracks = [(t["lips_corr"], t["faces"]) for t in per_track if t["lips_corr"] is not None]
    lips_corr = (sum(c * w for c, w in lips_tracks) / sum(w for _, w in lips_tracks)) if lips_tracks else None
    eyes_tracks = [(t["eyes_corr"], t["faces"]) for t in per_track if t["eyes_corr"] is not None]
    eyes_corr = (sum(c * w for c, w in eyes_tracks) / sum(w for _, w in eyes_tracks)) if eyes_tracks else None
    lm_checked = sum(t.lm_checked for t in tracks.values())
    lm = allv("lm_disp")
    res = {
        "input": str(input_path),
        "output": str(output_path),
        "frames": n,
        "fps": fps,
        "width": info_in.width,
        "height": info_in.height,
        "frames_with_faces": len(set(allv("frames"))),
        "faces": sum(len(t.frames) for t in tracks.values()),
        "faces_interpolated": sum(t.interpolated for t in tracks.values()),
        "tracks": len(tracks),
        "cuts": cuts.n_cuts,
        # tracks whose detections all stayed below det_thresh: not counted anywhere else
        "unconfirmed_tracks": [{"track": k, "first_frame": t.frames[0], "last_frame": t.frames[-1],
                                "faces": len(t.frames), "max_score": round(t.max_score, 3)}
                               for k, t in sorted(unconfirmed.items())],
        "faces_below_min_face": small_faces,
        "frames_with_faces_below_min_face": len(frames_small),
        "exposed_frames": exposed_frames,
        "exposed_faces": sum(len(t.exposed) for t in tracks.values()),
        "exposed_verified": sum(t.exposed_verified for t in tracks.values()),
        "exposed_unchanged": sum(t.exposed_unchanged for t in tracks.values()),
        "verified_context_only": sum(t.verified_context for t in tracks.values()),
        "exposed_flat_verified": sum(t.exposed_flat for t in tracks.values()),
        "faces_hidden": sum(t.hidden for t in tracks.values()),
        "cos_mean": _mean(cos),
        "cos_max": float(np.max(cos)) if cos else None,
        "verified_frac": float(np.mean(np.asarray(cos) >= thr)) if cos else None,
        "flicker_in": fi,
        "flicker_out": fo,
        "flicker_ratio": _ratio(fo, fi),
        "embvar_in": _mean(allv("embvar_in")),
        "embvar_out": _mean(allv("embvar_out")),
        "landmark_disp_iod_pct": _mean(lm),
        "landmark_found_frac": (len(lm) / lm_checked) if lm_checked else None,
        "mouth_corr": mouth_corr,
        "lips_corr": lips_corr,
        "eyes_corr": eyes_corr,
        **_judge_summary(allv("judge_dist"), sum(t.judge_ctx for t in tracks.values())),
        **_garish_summary(_sum_dicts(t.kinds for t in tracks.values()), allv("garish"),
                          _sum_dicts(t.garish_reasons for t in tracks.values())),
        "garish_by_size": _by_size([bins.get(k, {}) for k in tracks], size_bin_names()),
        "per_track": per_track,
        "settings": {
            "verify_threshold": thr, "unchanged_mad": UNCHANGED_MAD, "det_thresh": det_thresh,
            "garish": garish_settings(),
            "audit_thresh": audit_thresh,
            "det_size": "auto" if det_size == DET_SIZE_AUTO else det_size,
            "det_input": list(models.det_in.input_size_for((info_in.height, info_in.width))),
            "min_face": min_face, "match_iou": MATCH_IOU,
            "detector": "det_scrfd_2.5g_kps.onnx", "identity": "rec_mobilefacenet.onnx",
            "lips": "dlib shape_predictor_68_face_landmarks" if lips else None,
            "judge": judge_net.name if judge_net else None, "judge_every": judge_every if judge_net else None,
        },
        "max_time_offset_s": max_dt,
        "seconds": round(time.time() - t_start, 2),
    }
    res["targets"] = {
        "no_exposure": not res["exposed_frames"],
        "flicker_ratio_le_1.3": None if res["flicker_ratio"] is None else res["flicker_ratio"] <= TARGET_FLICKER_RATIO,
        "mouth_corr_ge_0.9": None if mouth_corr is None else mouth_corr >= TARGET_MOUTH_CORR,
        "lips_corr_ge_0.9": None if lips_corr is None else lips_corr >= TARGET_MOUTH_CORR,
    }
    if strip_png:
        _write_strip(Path(strip_png), strip, exposed_crops, set(tracks),
                     f"{input_path.name} vs {output_path.name}", garish=garish_crops)
        res["strip"] = str(strip_png)
    return res


# --------------------------------------------------------------------------------------
# Strip and markdown


@click.command("evaluate-video", context_settings={"show_default": True})
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON report to this file.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the markdown tables to this file.")
@click.option("--strip", "strip_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG strip of frames (input above, output below); with several pairs, one per "
                   "pair named STEM_<input stem>.png.")
@click.option("--min-face", type=click.IntRange(min=0), default=0,
              help="Faces smaller than this many pixels are not checked (counted in the report).")
@click.option("--det-thresh", type=click.FloatRange(0, 1), default=0.5, help="Face detector score threshold.")
@click.option("--audit-thresh", type=click.FloatRange(0, 1), default=AUDIT_THRESH,
              help="Input detections down to this score are tracked and checked, in tracks that reach --det-thresh.")
@det_size_option()
@click.option("--verify-threshold", type=float, default=None,
              help=f"Identity cosine threshold [default: {VERIFY_THRESHOLD}, FAR 0.1% on LFW].")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder searched first for model files.")
@click.option("--judge", type=click.Choice(["dlib"]), default=None,
              help="Also measure identity with a recognition network deid was not trained with (dlib's "
                   "ResNet, pip install 'deid-video[judge]'): input-output descriptor distance per face, and "
                   "the fraction it calls the same person (< 0.6).")
@click.option("--judge-every", type=click.IntRange(min=1), default=5,
              help="--judge: every Nth frame's faces (about 25 ms a face on one core).")
@click.option("--fail-on-exposure", is_flag=True, help="Exit 1 when any face is exposed.")
@click.option("-q", "--quiet", is_flag=True, help="No markdown table on stderr.")
def evaluate_video_command(paths, json_path, md_path, strip_path, min_face, det_thresh, audit_thresh, det_size,
                           verify_threshold, models_dir, judge, judge_every, fail_on_exposure, quiet):
    """Compare anonymized videos with their inputs: PATHS are INPUT OUTPUT [INPUT OUTPUT ...].

    Prints one JSON report on stdout ({"clips": [...]}) and the markdown tables on stderr.
    Exit codes: 0 ok, 1 an input failed (or --fail-on-exposure and a face is exposed), 3 models.
    """
    from ..errors import DeidError

    if len(paths) % 2:
        raise click.UsageError("PATHS must be pairs: INPUT OUTPUT [INPUT OUTPUT ...]")
    pairs = [(paths[i], paths[i + 1]) for i in range(0, len(paths), 2)]
    judge_net = None
    if judge:
        from .judges import load_judge

        try:
            judge_net = load_judge(judge)  # once for all pairs; not installed: exit 3 before any work
        except DeidError as e:
            click.echo(f"deid: error: {e}", err=True)
            sys.exit(e.exit_code)
    results, failed, code = [], [], 0
    for src, dst in pairs:
        strip = None
        if strip_path is not None:
            strip = strip_path if len(pairs) == 1 else strip_path.with_name(f"{strip_path.stem}_{src.stem}.png")
        try:
            results.append(evaluate_video(src, dst, models_dir=models_dir, det_thresh=det_thresh, min_face=min_face,
                                          verify_threshold=verify_threshold, strip_png=strip, det_size=det_size,
                                          audit_thresh=audit_thresh, judge=judge_net, judge_every=judge_every))
        except DeidError as e:
            click.echo(f"deid: error: {src} vs {dst}: {e}", err=True)
            failed.append({"input": str(src), "output": str(dst), "error": str(e)})
            code = max(code, e.exit_code)
    report = {"clips": results, "failed": failed}
    text = json.dumps(report, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    md = to_markdown(results) if results else ""
    if md_path is not None:
        md_path.write_text(md)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if not quiet and md:
        click.echo(md, err=True)
    if fail_on_exposure and any(r["exposed_frames"] for r in results):
        code = max(code, 1)
    sys.exit(code)


def _main() -> None:
    """``python -m deidcli.research.evaluate_video --lfw-threshold``: recompute VERIFY_THRESHOLD."""
    if sys.argv[1:] == ["--lfw-threshold"]:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        print(json.dumps(lfw_far_threshold(), indent=2))
    else:
        evaluate_video_command(prog_name="python -m deidcli.research.evaluate_video")


if __name__ == "__main__":
    _main()
