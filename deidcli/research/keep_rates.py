"""The --keep / --only decision's rates on LFW DevTest, simulated with photos (docs/keep_only.md).

    DEID_MODELS_DIR=../shared/models python -m deidcli.research.keep_rates [--lfw DIR] [--calibrate]

--calibrate derives the thresholds from DevTrain instead (people.KEEP_THRESHOLD, ONLY_THRESHOLD).

Faces are detected, aligned and embedded as measures.lfw_descriptors does for the verification
threshold (SCRFD-2.5G, the face nearest the centre, ArcFace crop, MobileFaceNet fp32), and a
person or track descriptor is the normalised mean of normalised embeddings, as in
pipeline/people.py. Two simulations:

1. pairsDevTest.txt (500 same-person, 500 different-person pairs), one photo per side: the
   reference is one photo, the "track" one photo.
2. "Tracks" of several photos: every DevTest person with at least 3 photos; the reference is
   their first photo, the track the mean of their next (up to people.DECIDE_FACES) photos.
   Same person: that track against their own reference; strangers: every track against every
   other person's reference.

Prints JSON: for each, kept rate (same person, cosine >= KEEP_THRESHOLD), stranger kept rate
(different people, >= KEEP_THRESHOLD), and for --only the same at ONLY_THRESHOLD (a listed
person caught, a stranger anonymized needlessly), with counts.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..pipeline.people import DECIDE_FACES, KEEP_THRESHOLD, ONLY_THRESHOLD
from .measures import lfw_descriptors

DEFAULT_LFW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lfw"


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _rates(same: np.ndarray, diff: np.ndarray) -> dict:
    out = {"same_pairs": int(len(same)), "different_pairs": int(len(diff))}
    for key, thr in (("keep", KEEP_THRESHOLD), ("only", ONLY_THRESHOLD)):
        s, d = int((same >= thr).sum()), int((diff >= thr).sum())
        out[key] = {"threshold": thr, "same_person_rate": round(s / max(len(same), 1), 5), "same_person_count": s,
                    "stranger_rate": round(d / max(len(diff), 1), 6), "stranger_count": d}
    out["same_cos_quantiles"] = [round(float(q), 4) for q in np.quantile(same, [0.001, 0.01, 0.02, 0.05])]
    out["different_cos_top"] = [round(float(q), 4) for q in np.sort(diff)[::-1][:5]]
    return out


def _cosines(lfw_dir: Path, split: str, models_dir=None) -> dict:
    """Cosines of LFW ``split`` ("DevTest" or "DevTrain"): single-photo pairs (pairs<split>.txt)
    and photo-vs-track (people<split>.txt), same person and different people, as arrays."""
    name = lambda p, i: f"{p}/{p}_{int(i):04d}.jpg"  # noqa: E731
    lines = [ln.split() for ln in (lfw_dir / f"pairs{split}.txt").read_text().splitlines()[1:] if ln.strip()]
    pairs = [(name(p[0], p[1]), name(p[0], p[2]), True) if len(p) == 3 else (name(p[0], p[1]), name(p[2], p[3]), False)
             for p in lines]
    people = [ln.split() for ln in (lfw_dir / f"people{split}.txt").read_text().splitlines()[1:] if ln.strip()]
    many = [(p, int(n)) for p, n in people if int(n) >= 3]
    names = sorted({n for a, b, _ in pairs for n in (a, b)}
                   | {name(p, i) for p, n in many for i in range(1, min(n, DECIDE_FACES + 1) + 1)})
    found, desc, missed = lfw_descriptors(names, lfw_dir, models_dir)
    idx = {n: i for i, n in enumerate(found)}
    ok = [(a, b, s) for a, b, s in pairs if a in idx and b in idx]
    cos = np.array([float(desc[idx[a]] @ desc[idx[b]]) for a, b, _ in ok])
    same = np.array([s for _, _, s in ok])
    refs, tracks = [], []
    for p, n in many:
        r = name(p, 1)
        t = [idx[name(p, i)] for i in range(2, min(n, DECIDE_FACES + 1) + 1) if name(p, i) in idx]
        if r in idx and t:
            refs.append(desc[idx[r]])
            tracks.append(_norm(desc[t].mean(0)))
    C = np.stack(tracks) @ np.stack(refs).T  # (track, reference)
    return {"single_same": cos[same], "single_diff": cos[~same], "track_same": np.diag(C),
            "track_diff": C[~np.eye(len(C), dtype=bool)], "pairs_without_a_face": len(pairs) - len(ok),
            "images_without_a_face": len(missed)}


def keep_rates(lfw_dir: Path = DEFAULT_LFW, models_dir=None) -> dict:
    """The shipped thresholds' rates on DevTest (see the module's docstring)."""
    c = _cosines(lfw_dir, "DevTest", models_dir)
    single = _rates(c["single_same"], c["single_diff"])
    multi = _rates(c["track_same"], c["track_diff"])
    return {"single_photo_pairs_devtest": single, f"photo_vs_track_of_up_to_{DECIDE_FACES}_photos_devtest": multi,
            "pairs_without_a_face": c["pairs_without_a_face"], "images_without_a_face": c["images_without_a_face"]}


def calibrate(lfw_dir: Path = DEFAULT_LFW, models_dir=None, far: float = 1e-3, miss: float = 5e-3) -> dict:
    """Thresholds from DevTrain (identity-disjoint from DevTest): the smallest cosine keeping at
    most ``far`` of the strangers, photo vs track and photo vs photo (--keep); the cosine that
    ``1 - miss`` of the same-person photo pairs reach (--only)."""
    c = _cosines(lfw_dir, "DevTrain", models_dir)

    def above(diff):  # accept when cos >= thr: at most floor(far * n) strangers at or above
        top = np.sort(diff)[::-1]
        k = int(np.floor(far * len(top)))
        return float(np.nextafter(np.float32(top[k]), np.float32(1)))

    return {"keep_far_track": round(above(c["track_diff"]), 5), "keep_far_single": round(above(c["single_diff"]), 5),
            "only_single_same_quantile": round(float(np.quantile(c["single_same"], miss)), 5),
            "only_track_same_quantile": round(float(np.quantile(c["track_same"], miss)), 5),
            "track_diff_pairs": len(c["track_diff"]), "single_same_pairs": len(c["single_same"])}


def _main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    args = sys.argv[1:]
    lfw = Path(args[args.index("--lfw") + 1]) if "--lfw" in args else DEFAULT_LFW
    print(json.dumps(calibrate(lfw) if "--calibrate" in args else keep_rates(lfw), indent=2))


if __name__ == "__main__":
    _main()
