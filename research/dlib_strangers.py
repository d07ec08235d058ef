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
    cells = json.loads((a.stress / "manifest.json").read_text())[a.mosaic]["cells"]
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


if __name__ == "__main__":
    main()
