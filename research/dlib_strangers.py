"""How often dlib calls two *different* people of a stress mosaic the same person, next to how often
it calls an anonymized face its own person: dlib's false matches at the clip's light, blur and size.

    DEID_MODELS_DIR=../shared/models python research/dlib_strangers.py MOSAIC OUT.mp4 [--every 5]
        [--stress out/stress]

MOSAIC is a mosaic's name in the stress set's manifest (``python -m deidcli.research.stress``), OUT
the anonymized output of ``out/stress/MOSAIC.mp4``. On every ``--every``-th frame, the input faces
the audit's detector finds at 0.5 or more are described by dlib at their boxes, in the input and
the output (as ``deid evaluate-video --judge dlib`` does). A face's person is the shared clip of its
mosaic cell (two cells of one clip are one person). Prints:

- own: output faces under dlib's 0.6 to their own input face (what ``judge_same_frac`` counts);
- strangers: pairs of input faces of different people in the same frame under 0.6 (dlib's false
  matches on this input), and the same for output faces against other people's input faces;
- each own match with its distance to the nearest other person's input face in that frame.

A crowd of the stress set (``crowd_lfw``, ``crowd_1080``, ``crowd_4k``: every face a different LFW
person) has no cells: there a face's person is its track in the audit of ``deid evaluate-video``
(run here, with ``--judge dlib``; a few minutes), and the faces are those it judges (every 5th
frame), of the tracks it confirms. Two faces of one frame whose boxes meet are left out as a pair
(a face half behind another, or a second detection inside a face, can be one person). The strangers
are then also given by face height (the smaller of the pair's), next to the share of own matches at
that height, and "own" counts what the audit's ``judge_same_frac`` does.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def main() -> None:
    import av

    from deidcli.research.evaluate_video import _Models
    from deidcli.research.judges import DLIB_SAME_DISTANCE, load_judge

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mosaic")
    ap.add_argument("output", type=Path)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--stress", type=Path, default=Path("out/stress"))
    a = ap.parse_args()
    entry = json.loads((a.stress / "manifest.json").read_text())[a.mosaic]
    if entry["kind"] == "crowd":
        return crowd(a.stress / entry["file"], a.output, a.mosaic)
    cells = entry["cells"]
    models = _Models(os.environ.get("DEID_MODELS_DIR"), 0.5, 0.3, 640, 0)
    judge = load_judge("dlib")

    def person(box):
        """The clip of the cell holding the box's centre; None for a centre outside every cell (a
        box reaching past the frame's edge), whose face is then left out."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return next((c["clip"] for c in cells if c["cell"][0] <= cx < c["cell"][2] and c["cell"][1] <= cy < c["cell"][3]),
                    None)

    rows = []  # (frame, person, height, input descriptor, output descriptor)
    with av.open(str(a.stress / f"{a.mosaic}.mp4")) as ci, av.open(str(a.output)) as co:
        for i, (fi, fo) in enumerate(zip(ci.decode(video=0), co.decode(video=0))):
            if i % a.every:
                continue
            img_in, img_out = fi.to_ndarray(format="rgb24"), fo.to_ndarray(format="rgb24")
            d = models.det_in.detect(img_in)
            for box, score in zip(d.boxes, d.scores):
                if score >= 0.5 and person(box) is not None:
                    rows.append((i, person(box), float(box[3] - box[1]), judge.describe_boxes(img_in, [box])[0],
                                 judge.describe_boxes(img_out, [box])[0]))
    same = DLIB_SAME_DISTANCE
    own = [float(np.linalg.norm(r[3] - r[4])) for r in rows]
    pairs_in, pairs_out = [], []
    for r in rows:
        for q in rows:
            if q[0] == r[0] and q[1] != r[1]:
                pairs_in.append(np.linalg.norm(r[3] - q[3]))
                pairs_out.append(np.linalg.norm(r[4] - q[3]))
    pin, pout = np.array(pairs_in), np.array(pairs_out)
    print(f"{a.mosaic}: {len(rows)} faces; own (output to its input) under {same}: {sum(x < same for x in own)} "
          f"({100 * np.mean(np.array(own) < same):.1f}%)")
    if len(pin):
        print(f"strangers, input to input: {len(pin)} pairs, under {same}: {100 * np.mean(pin < same):.1f}% "
              f"(median {np.median(pin):.3f}); output to another person's input: {100 * np.mean(pout < same):.1f}%")
    print("frame person height own nearest_other")
    for r, o in zip(rows, own):
        if o < same:
            others = [np.linalg.norm(r[4] - q[3]) for q in rows if q[0] == r[0] and q[1] != r[1]]
            print(r[0], r[1], round(r[2]), f"{o:.3f}", f"{min(others):.3f}" if others else "-")


BINS = ((0, 48), (48, 72), (72, 96), (96, 1e9))


def crowd(clip: Path, output: Path, name: str) -> None:
    """The crowd form (module docstring): persons are the audit's confirmed tracks."""
    import contextlib

    from deidcli.faces.detect import rects_meet
    from deidcli.research.evaluate_video import evaluate_video
    from deidcli.research.measures import upright_frames
    from deidcli.research.judges import DLIB_SAME_DISTANCE, load_judge

    judge = load_judge("dlib")
    faces = []  # the judged faces: (frame, track, height, box)

    def hook(h):
        if h["judge"] is not None:
            faces.append((h["index"], h["track"], float(h["height"]), np.asarray(h["box"], np.float64)))

    rep = evaluate_video(clip, output, models_dir=os.environ.get("DEID_MODELS_DIR"), judge=judge, face_hook=hook)
    unconfirmed = {t["track"] for t in rep["unconfirmed_tracks"]}
    faces = [f for f in faces if f[1] not in unconfirmed]
    frames: dict = {}
    for f in faces:
        frames.setdefault(f[0], []).append(f)
    rows = []  # (frame, track, height, box, input descriptor, output descriptor)
    with contextlib.closing(upright_frames(output)) as frames_out:  # the frames as the audit reads them
        for i, ((img_in, _), (img_out, _)) in enumerate(zip(upright_frames(clip), frames_out)):
            if i in frames:
                boxes = [f[3] for f in frames[i]]
                din, dout = judge.describe_boxes(img_in, boxes), judge.describe_boxes(img_out, boxes)
                rows += [(*f, x, y) for f, x, y in zip(frames[i], din, dout)]
    same = DLIB_SAME_DISTANCE
    own = np.array([np.linalg.norm(r[4] - r[5]) for r in rows])
    pairs, heights, crossed, nearest = [], [], [], []
    for r in rows:
        others = [q for q in rows if q[0] == r[0] and q[1] != r[1] and not rects_meet(r[3], q[3])]
        pairs += [np.linalg.norm(r[4] - q[4]) for q in others if r[1] < q[1]]
        heights += [min(r[2], q[2]) for q in others if r[1] < q[1]]
        crossed += [np.linalg.norm(r[5] - q[4]) for q in others]
        nearest.append(min((np.linalg.norm(r[5] - q[4]) for q in others), default=np.nan))
    pairs, heights, crossed, nearest = np.array(pairs), np.array(heights), np.array(crossed), np.array(nearest)
    h = np.array([r[2] for r in rows])
    print(f"{name}: {len(rows)} judged faces of {len(set(r[1] for r in rows))} confirmed tracks; own (output to "
          f"its input) under {same}: {int((own < same).sum())} ({100 * np.mean(own < same):.1f}%; the audit's "
          f"judge_same_frac {100 * rep['judge_same_frac']:.1f}%)")
    print(f"strangers, input to input: {len(pairs)} pairs, under {same}: {100 * np.mean(pairs < same):.1f}% "
          f"(median {np.median(pairs):.3f}); output to another person's input: {len(crossed)} pairs, under "
          f"{same}: {100 * np.mean(crossed < same):.1f}%")
    print("| face height | stranger pairs | strangers under 0.6 | judged faces | own under 0.6 |")
    print("|---|---|---|---|---|")
    for lo, hi in BINS:
        m, k = (heights >= lo) & (heights < hi), (h >= lo) & (h < hi)
        label = f">={lo}" if hi > 1e8 else f"{lo}-{hi}"
        print(f"| {label} | {int(m.sum())} | {100 * np.mean(pairs[m] < same) if m.any() else float('nan'):.1f}% | "
              f"{int(k.sum())} | {100 * np.mean(own[k] < same) if k.any() else float('nan'):.1f}% |")
    print("frame track height own nearest_other")
    for r, o, n in zip(rows, own, nearest):
        if o < same:
            print(r[0], r[1], round(r[2]), f"{o:.3f}", f"{n:.3f}" if np.isfinite(n) else "-")


if __name__ == "__main__":
    main()
