"""How far a person's faces drift from their track's descriptor: the figures behind
``REVISE_BELOW`` in ``deidcli/pipeline/descriptors.py``.

    DEID_MODELS_DIR=../shared/models python research/descriptor_spread.py CLIP ... [--json OUT]

For each clip, the faces the audit of ``deid evaluate-video`` tracks in the input (the clip
evaluated against itself), per track of 10 faces or more (filled-in faces left out): the
descriptor as the pipeline makes it (the mean of the track's first 5 embeddings), and the cosine
of every later face's embedding with it (the identity check's int8 network, which
``Descriptors.observe`` sees). Prints per clip: faces, the 1st and 5th percentiles, the share under
0.2 and 0.3, the lowest. A track of one person reads as one person here; a track that changes
person (a tracker swap) would show as a low tail.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def spread(clip: Path, embedder) -> list:
    """[(cosine, track, frame, face height)] for the later faces of every track of ``clip``."""
    from deidcli.research.evaluate_video import evaluate_video

    crops: dict = {}

    def hook(f):
        if not f["interpolated"]:
            crops.setdefault(f["track"], []).append((f["index"], f["in112"], f["height"]))

    evaluate_video(clip, clip, models_dir=os.environ.get("DEID_MODELS_DIR"), face_hook=hook)
    out = []
    for t, faces in crops.items():
        if len(faces) < 10:
            continue
        e = embedder.embed_check([c for _, c, _ in faces])
        d = e[:5].mean(0)
        d /= np.linalg.norm(d)
        out += [(float(c), t, faces[k + 5][0], faces[k + 5][2]) for k, c in enumerate(e[5:] @ d)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="write every face's (cosine, track, frame, height) here")
    args = ap.parse_args()
    from deidcli import weights
    from deidcli.generator.embedder import IdentityEmbedder

    embedder = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", os.environ.get("DEID_MODELS_DIR")))
    every = {}
    print("| clip | faces | 1st pct | 5th pct | under 0.2 | under 0.3 | lowest |\n|---|---|---|---|---|---|---|")
    for clip in args.clips:
        rows = every[clip.name] = spread(clip, embedder)
        if not rows:
            print(f"| {clip.name} | 0 | | | | | |", flush=True)
            continue
        a = np.array([r[0] for r in rows])
        print(f"| {clip.name} | {len(a)} | {np.percentile(a, 1):.2f} | {np.percentile(a, 5):.2f} | "
              f"{np.mean(a < 0.2) * 100:.1f}% | {np.mean(a < 0.3) * 100:.1f}% | {a.min():.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(every))


if __name__ == "__main__":
    main()
