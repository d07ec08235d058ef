"""Face by face, what the independent judge (dlib) and deid's identity network say of an
anonymized video: the figures behind ``--large-passes`` (docs/in_the_wild.md, eighth pass).

    DEID_MODELS_DIR=../shared/models python research/judged_faces.py IN.mp4 OUT.mp4 [--every 5]

For every judged face (``deid evaluate-video --judge dlib``: the detected faces of every
``--every``-th frame): frame, audit track, dlib's distance between the input and output face (under
0.6: the same person), the identity network's cosine (0.335: verified), the output face's kind
(generated, blurred, ...) and its height in px; then how many dlib calls the same person.
Needs the judge extra (pip install 'deid-video[judge]').
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
    a = ap.parse_args()
    rows = []

    def hook(f: dict) -> None:
        if f.get("judge") is not None:
            rows.append((f["index"], f["track"], f["judge"], f["cos"], f["verdict"].kind, f["height"]))

    evaluate_video(a.input, a.output, judge="dlib", judge_every=a.every, face_hook=hook)
    print("frame track dlib_distance cosine kind height")
    for i, t, d, c, k, h in rows:
        print(f"{i} {t} {d:.3f} {c:.3f} {k} {h:.0f}")
    d = np.array([r[2] for r in rows])
    print(f"dlib same person: {(d < DLIB_SAME_DISTANCE).sum()} of {len(d)}")


if __name__ == "__main__":
    main()
