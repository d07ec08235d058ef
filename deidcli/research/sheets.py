"""Contact sheets of faces: every face of a few frames, input beside output, at one size, so
that small faces can be looked at.

    python -m deidcli.research.sheets IN OUT SHEET.png [--frames 4] [--tile 96] [--per-row 8]

Faces are found in the INPUT (SCRFD-2.5G, fp32, score >= 0.3) on ``--frames`` evenly spaced
frames; each tile pair is the face's box grown by 30%, input left, output right, labelled with
the box height in pixels (the face's size in the frame). Sorted by size, largest first.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np


def face_pairs(inp: Path, out: Path, frames: int = 4, models_dir=None, det_thresh: float = 0.3):
    """[(size px, frame index, input tile, output tile)] with tiles uncropped (variable size)."""
    from .. import weights
    from .measures import upright_frames
    from ..faces.detect import Detector

    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", models_dir), det_thresh=det_thresh)
    n = sum(1 for _ in upright_frames(inp))
    at = set(np.linspace(0, n - 1, frames).round().astype(int).tolist())
    pairs = []
    for i, ((a, _), (b, _)) in enumerate(zip(upright_frames(inp), upright_frames(out))):
        if i not in at:
            continue
        d = det.detect(a)
        for box in d.boxes:
            x0, y0, x1, y1 = box
            cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 1.3
            X0, Y0 = int(max(cx - s / 2, 0)), int(max(cy - s / 2, 0))
            X1, Y1 = int(min(cx + s / 2, a.shape[1])), int(min(cy + s / 2, a.shape[0]))
            if X1 - X0 < 4 or Y1 - Y0 < 4:
                continue
            pairs.append((float(y1 - y0), i, a[Y0:Y1, X0:X1], b[Y0:Y1, X0:X1]))
    pairs.sort(key=lambda p: -p[0])
    return pairs


def sheet(pairs, tile: int = 96, per_row: int = 8, title: Optional[str] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB: pairs of tiles, input | output, ``per_row`` pairs a row."""
    import cv2

    if not pairs:
        return np.zeros((tile, tile, 3), np.uint8)
    rows = (len(pairs) + per_row - 1) // per_row
    head = 18 if title else 0
    img = np.full((head + rows * (tile + 14), per_row * (2 * tile + 6), 3), 24, np.uint8)
    if title:
        cv2.putText(img, title, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    for k, (size, i, a, b) in enumerate(pairs):
        r, c = divmod(k, per_row)
        y, x = head + r * (tile + 14), c * (2 * tile + 6)
        img[y:y + tile, x:x + tile] = cv2.resize(a, (tile, tile), interpolation=cv2.INTER_CUBIC)
        img[y:y + tile, x + tile:x + 2 * tile] = cv2.resize(b, (tile, tile), interpolation=cv2.INTER_CUBIC)
        cv2.putText(img, f"{size:.0f}px f{i}", (x + 2, y + tile + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (255, 255, 0), 1, cv2.LINE_AA)
    return img


def main(argv=None) -> None:
    import cv2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inp", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--tile", type=int, default=96)
    ap.add_argument("--per-row", type=int, default=8)
    ap.add_argument("--max-faces", type=int, default=96)
    a = ap.parse_args(argv)
    pairs = face_pairs(a.inp, a.out, a.frames)[: a.max_faces]
    img = sheet(pairs, a.tile, a.per_row, f"{a.inp.name} (left) vs {a.out.name} (right)")
    a.png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(a.png), img[:, :, ::-1])
    print(f"{a.png}: {len(pairs)} faces")


if __name__ == "__main__":
    main()
