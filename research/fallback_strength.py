"""How much of a face's identity each fallback leaves, as the audit of `deid evaluate-video` reads it.

    DEID_MODELS_DIR=../shared/models python research/fallback_strength.py CLIP ... [--every 6] [--json OUT]
        [--judge dlib]

On every ``--every``-th frame of each clip, each face the audit's detector finds at 0.5 or more is
given, alone on a copy of the frame, each variant below (the face ellipse at the default
``--margin`` 0.25, as ``deidcli.faces.methods.apply_classic`` draws it), and the audit's network
(MobileFaceNet, fp32) compares the ArcFace crop of the result with the input's. A face counts as
verified when the cosine is at or over the audit's threshold (0.33514) and over the control's
(``research.measures.face_removed``: the face region filled flat), as in the audit. Prints, per
variant and face height: faces, verified, the mean cosine. With ``--judge dlib``, also dlib's
descriptor distance between the input and the result at the detector's box (dlib's own alignment):
the share under 0.6 (dlib's same person) and the mean, per variant and face height.

Variants: ``blurN`` (N 12, 8, 5: the shipped blur shrinks the face to N px across, blurs with sigma 1.5 there
and enlarges back; the shipped N is 8 since 2026-12-07, 12 before), ``blurNsS`` (the same with sigma S), ``blur8c`` (blur8, then the central half
of the region shifted back to the input's mean colour there),
``blur8fK`` (blur8c with K% of its contrast about the face's mean colour left), ``fill`` (the
face ellipse filled flat with that colour), ``pixN`` (N blocks across the face; the shipped
``pixelate`` is 8), ``<variant>_mNN`` (the same over an ellipse of margin NN / 100) and
``shipped`` (``deidcli.faces.methods.apply_classic`` as it is: since 2026-12-07 blur8f25 for
faces under 96 px, its colour taken about the landmarks in CIELAB, blur8c above). ``--variants`` picks some.

Each result is also classified by the garish measure of ``deid evaluate-video``
(``deidcli.research.garish.assess`` on the ArcFace crops): a fallback should come out "blurred" or
"pixelated" (its detail gone, the input's mean colour kept); one classified "generated" moved the
face's colour (mostly towards what surrounds a small face) and counts as garish there.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

THRESHOLD = 0.33514
BINS = ("<48", "48-96", "96-192", ">=192")


def _blur(n: float, sigma: float = 1.5):
    def obscure(roi, face_px, _method, _centre=None):
        import cv2

        h, w = roi.shape[:2]
        f = min(1.0, n / max(face_px, 1.0))
        small = cv2.resize(roi, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REPLICATE)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return obscure


def _centre_kept(obscure):
    """``obscure``, then its central half (each way) shifted to the input's mean colour there
    (``deidcli.faces.methods.centre_colour_kept``, the shipped blur's last step)."""
    def kept(roi, face_px, method, _centre=None):
        from deidcli.faces.methods import centre_colour_kept

        return centre_colour_kept(roi, obscure(roi, face_px, method))
    return kept


def _pixelate(n: float):
    def obscure(roi, face_px, _method, _centre=None):
        import cv2

        h, w = roi.shape[:2]
        block = max(face_px / n, 2.0)
        small = cv2.resize(roi, (max(1, round(w / block)), max(1, round(h / block))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return obscure


def _flattened(obscure, keep: float):
    """``obscure``, then its variation about the input's central mean colour scaled by ``keep``
    (0: the region filled flat with that colour)."""
    def flat(roi, face_px, method, _centre=None):
        h, w = roi.shape[:2]
        mean = roi[h // 4:h - h // 4, w // 4:w - w // 4].reshape(-1, 3).mean(0)
        out = obscure(roi, face_px, method).astype(np.float32)
        return np.clip(np.rint(mean + keep * (out - mean)), 0, 255).astype(np.uint8)
    return flat


VARIANTS = {"blur12": _blur(12), "blur8": _blur(8), "blur8s1.0": _blur(8, 1.0), "blur8s0.7": _blur(8, 0.7),
            "blur8c": _centre_kept(_blur(8)), "blur6s0.75": _blur(6, 0.75),
            "blur5": _blur(5),
            "blur8f50": _flattened(_centre_kept(_blur(8)), 0.5), "blur8f25": _flattened(_centre_kept(_blur(8)), 0.25),
            "fill": _flattened(_centre_kept(_blur(8)), 0.0), "pix8": _pixelate(8), "pix6": _pixelate(6), "pix5": _pixelate(5)}
#: ``<variant>_mNN``: the same over an ellipse with margin NN / 100 (the shipped ``--margin`` is 0.25)
VARIANTS["shipped"] = None  # deidcli.faces.methods as it is (blur at the default margin 0.25)
VARIANTS.update({f"{name}_m{m}": VARIANTS[name] for name in ("blur8c", "blur8f25", "fill") for m in (50, 75)})


def margin(variant: str) -> float:
    """The ellipse margin of a variant: 0.25 unless it is named ``..._mNN``."""
    return int(variant.rsplit("_m", 1)[1]) / 100 if "_m" in variant else 0.25


def size_bin(h: float) -> str:
    return BINS[0] if h < 48 else BINS[1] if h < 96 else BINS[2] if h < 192 else BINS[3]


def measure(clip: Path, models, every: int, judge=None, variants=VARIANTS) -> list:
    """[{clip, frame, h, ctl, <variant>: cosine, kind_<variant>: the garish measure's class ("blurred",
    "pixelated", "generated" or "unchanged"), garish_<variant>: 0/1, ..., and with ``judge`` (a
    research.judges judge) dlib_<variant>: its descriptor distance, ...}] for the faces of ``clip``."""
    from deidcli.research import garish

    import av

    import deidcli.faces.methods as methods
    from deidcli.faces.align import arcface_crop
    from deidcli.research.measures import face_removed

    rows = []
    shipped = methods._obscured
    with av.open(str(clip)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i % every:
                continue
            img = frame.to_ndarray(format="rgb24")
            dets = models.det_in.detect(img)
            for box, kps, score in zip(dets.boxes, dets.kps, dets.scores):
                if score < 0.5:
                    continue
                crop = arcface_crop(img, kps)
                crops = [crop, face_removed(crop)]
                face = type("Face", (), {"box": box, "kps": kps})
                dist, kinds = {}, {}
                ref = judge.describe_boxes(img, [box])[0] if judge is not None else None
                region_in = garish.box_region(img, box)
                for name in variants:
                    out = img.copy()
                    if name == "shipped":  # methods.apply_classic as it is
                        methods.apply_classic(out, [face], "blur", 0.25)
                    else:  # the variant's blur, over its own margin
                        methods._obscured = VARIANTS[name]
                        try:
                            methods.apply_classic(out, [face], "blur", margin(name))
                        finally:
                            methods._obscured = shipped
                    crops.append(arcface_crop(out, kps))
                    v = garish.assess(crop, crops[-1], region_in, garish.box_region(out, box))
                    kinds[f"kind_{name}"], kinds[f"garish_{name}"] = v.kind, int(v.garish)
                    if judge is not None:
                        dist[f"dlib_{name}"] = float(np.linalg.norm(judge.describe_boxes(out, [box])[0] - ref))
                e = models.embedder.embed(crops)
                cos = e[1:] @ e[0]
                rows.append({"clip": clip.name, "frame": i, "h": float(box[3] - box[1]), "ctl": float(cos[0]),
                             **{k: float(v) for k, v in zip(variants, cos[1:])}, **dist, **kinds})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--every", type=int, default=6, help="every Nth frame (default 6)")
    ap.add_argument("--json", type=Path, help="write every face's cosines here")
    ap.add_argument("--judge", choices=["dlib"], help="also dlib's distance (same person under 0.6)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="default: all")
    args = ap.parse_args()
    from deidcli.research.evaluate_video import _Models

    models = _Models(os.environ.get("DEID_MODELS_DIR"), 0.5, 0.3, 640, 0)
    judge = None
    if args.judge:
        from deidcli.research.judges import load_judge

        judge = load_judge(args.judge)
    rows = []
    for clip in args.clips:
        rows += measure(clip, models, args.every, judge, args.variants)
    if args.json:
        args.json.write_text(json.dumps(rows))
    print("| variant | face height | faces | verified | mean cosine | classed a fallback | garish |\n"
          "|---|---|---|---|---|---|---|")
    for name in args.variants:
        for b in BINS + ("all",):
            sel = [r for r in rows if b == "all" or size_bin(r["h"]) == b]
            if sel:
                v = sum(r[name] >= THRESHOLD and r[name] > r["ctl"] for r in sel)
                fb = sum(r[f"kind_{name}"] in ("blurred", "pixelated") for r in sel)
                g = sum(r[f"garish_{name}"] for r in sel)
                print(f"| {name} | {b} | {len(sel)} | {v} ({100 * v / len(sel):.1f}%) | "
                      f"{np.mean([r[name] for r in sel]):.3f} | {fb} ({100 * fb / len(sel):.1f}%) | {g} |")
    if judge is not None:
        print("\n| variant | face height | faces | dlib same person (< 0.6) | mean distance |\n|---|---|---|---|---|")
        for name in args.variants:
            for b in BINS + ("all",):
                sel = [r for r in rows if b == "all" or size_bin(r["h"]) == b]
                if sel:
                    d = [r[f"dlib_{name}"] for r in sel]
                    v = sum(x < 0.6 for x in d)
                    print(f"| {name} | {b} | {len(sel)} | {v} ({100 * v / len(sel):.1f}%) | {np.mean(d):.3f} |")


if __name__ == "__main__":
    main()
