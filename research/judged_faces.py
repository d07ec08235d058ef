"""Face by face, what the independent judge (dlib) and deid's identity network say of an
anonymized video: the figures behind ``--large-passes`` (docs/in_the_wild.md, eighth pass).

    DEID_MODELS_DIR=../shared/models python research/judged_faces.py IN.mp4 OUT.mp4 [--every 5]

For every judged face (``deid evaluate-video --judge dlib``: the detected faces of every
``--every``-th frame): frame, audit track, dlib's distance between the input and output face (under
0.6: the same person), the identity network's cosine (0.335: verified), the output face's kind
(generated, blurred, ...) and its height in px; then how many dlib calls the same person.
Needs the judge extra (pip install 'deid-video[judge]').

    ... research/judged_faces.py IN.mp4 OUT.mp4 --covers

also covers each face dlib calls the same person, alone on its input frame, with the shipped
small-face blur (a quarter of its contrast), the plain blur, the face ellipse filled flat and the
same over a margin of 0.6 (the ellipse at the audit's box, as deid draws it at --margin 0.25),
and prints how many of them dlib still calls the same person under each, with the mean distance:
what no cover of the face can change (docs/in_the_wild.md, fourteenth pass).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from deidcli.research.evaluate_video import evaluate_video
    from deidcli.research.judges import DLIB_SAME_DISTANCE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--every", type=int, default=5, help="judge every Nth frame")
    ap.add_argument("--covers", action="store_true", help="cover each same-person face alone, four ways")
    a = ap.parse_args()
    rows, boxes = [], []

    def hook(f: dict) -> None:
        if f.get("judge") is not None:
            rows.append((f["index"], f["track"], f["judge"], f["cos"], f["verdict"].kind, f["height"]))
            boxes.append(np.asarray(f["box"], np.float32))

    evaluate_video(a.input, a.output, judge="dlib", judge_every=a.every, face_hook=hook)
    print("frame track dlib_distance cosine kind height")
    for i, t, d, c, k, h in rows:
        print(f"{i} {t} {d:.3f} {c:.3f} {k} {h:.0f}")
    d = np.array([r[2] for r in rows])
    print(f"dlib same person: {(d < DLIB_SAME_DISTANCE).sum()} of {len(d)}")
    if a.covers:
        covers(a.input, [(r[0], b) for r, b in zip(rows, boxes) if r[2] < DLIB_SAME_DISTANCE])


def covers(src: str, faces: list) -> None:
    """dlib's same-person calls on the faces ``faces`` ((frame, box (4,)) each) of ``src`` once
    each is covered alone on its input frame, per cover."""
    import av

    import deidcli.faces.methods as methods
    from deidcli.research.judges import DLIB_SAME_DISTANCE, load_judge
    from deidcli.research.measures import face_filled

    class Face:
        def __init__(self, box):
            self.box, self.kps = box, None

    def blurred(img, box, keep, margin=0.25):
        out, old = img.copy(), methods.SMALL_KEEP
        methods.SMALL_KEEP = keep
        try:
            methods.apply_classic(out, [Face(box)], "blur", margin)
        finally:
            methods.SMALL_KEEP = old
        return out

    variants = {
        "shipped small-face blur": lambda img, b: blurred(img, b, methods.SMALL_KEEP),
        "plain blur": lambda img, b: blurred(img, b, 1.0),
        "ellipse filled flat": lambda img, b: face_filled(img, b, None),
        "filled flat, margin 0.6": lambda img, b: face_filled(img, b, None, 0.6),
    }
    judge = load_judge("dlib")
    want = {i for i, _ in faces}
    frames = {}
    with av.open(src) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i in want:
                frames[i] = fr.to_ndarray(format="rgb24")
    dist: dict = {k: [] for k in variants}
    for i, box in faces:
        ref = judge.describe_boxes(frames[i], [box])[0]
        for k, cover in variants.items():
            dist[k].append(float(np.linalg.norm(judge.describe_boxes(cover(frames[i], box), [box])[0] - ref)))
    print(f"\n| cover, drawn alone | dlib same person (of {len(faces)}) | mean distance |\n|---|---|---|")
    for k, v in dist.items():
        v = np.array(v)
        print(f"| {k} | {(v < DLIB_SAME_DISTANCE).sum()} | {v.mean():.3f} |" if len(v) else f"| {k} | 0 | - |")


if __name__ == "__main__":
    main()
