"""Which faces of an anonymized video the garish measure judges as occluded, and what that
changes: the check behind ``garish.OCCLUDED_SHARE`` (docs/in_the_wild.md, fifteenth pass).

    DEID_MODELS_DIR=../shared/models python research/occluded_faces.py IN.mp4 OUT.mp4 [--sheet F.png]

Runs ``deid evaluate-video``'s audit and, for every face whose verdict the occluded rule changes
(a face whose box the frame's other faces cover ``OCCLUDED_SHARE`` or more of: blurred whatever
its colour, never lost), prints frame, audit track, box, the share covered, and the verdict
without and with the rule; ``--sheet`` writes their input (top) and output (bottom) ArcFace crops
side by side, to look at. The verdicts here are judged without the face box regions, so a
pixelated face counts as generated in both.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from deidcli.research.evaluate_video import evaluate_video
    from deidcli.research.garish import OCCLUDED_SHARE, assess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--sheet", help="PNG of the reclassified faces' crops (the first 40)")
    a = ap.parse_args()
    changed, occluded, n = [], 0, 0

    def hook(f: dict) -> None:
        nonlocal occluded, n
        n += 1
        if f["covered"] < OCCLUDED_SHARE:
            return  # the rule does not apply: the same verdict either way
        occluded += 1
        kw = {"lost": f["lost"], "height": f["height"]}
        old = assess(f["in112"], f["out112"], **kw)
        new = assess(f["in112"], f["out112"], occluded=True, **kw)
        if (old.kind, old.garish) != (new.kind, new.garish):
            changed.append((f, f["covered"], old, new))

    report = evaluate_video(a.input, a.output, face_hook=hook)
    print(f"faces {n}, occluded (>= {OCCLUDED_SHARE}) {occluded}, reclassified {len(changed)} "
          f"(garish without the rule {sum(o.garish for _, _, o, _ in changed)}); "
          f"the clip's garish faces {report['garish_faces']} {report['garish_frames']}")
    for f, share, old, new in changed:
        print(f"  frame {f['index']} track {f['track']} box {np.round(f['box']).astype(int).tolist()} "
              f"covered {share:.2f}: {old.kind} {old.reason or '-'} -> {new.kind} {new.reason or '-'}")
    if a.sheet and changed:
        import cv2

        tiles = [np.concatenate([f["in112"], f["out112"]], 0) for f, *_ in changed[:40]]
        cv2.imwrite(a.sheet, np.concatenate(tiles, 1)[:, :, ::-1])


if __name__ == "__main__":
    main()
