"""What the shipped generator does with a foreign descriptor (``--target``, docs/target.md).

    DEID_MODELS_DIR=../shared/models python -m deidcli.research.target_response \
        [--faces 400] [--passes 1] [--seed 0] [--strip out/target_response/strip.png] [--weights CKPT]

On LFW DevTest (people never seen in training; the prepared crops of ``deid prepare``, cached
under cache/), each of ``--faces`` faces x is generated as ``deid anonymize`` does by default
(colours matched, later passes keep the first pass's mouth; no identity check) once per
conditioning (:func:`conditionings`): its own descriptor (deid without --target), the descriptor
of a target t in its place (the paper's way; t: a face of another DevTest person who has at least
two photos, drawn at random), the steered descriptors ``own - w * t`` (people.steer_descriptor,
what --target feeds) and a random unit vector (a control). Every output is described by
MobileFaceNet (the ArcFace square of the crop, as in training and ``deid evaluate``) and, with
``--judge dlib`` (default), by dlib's network, which deid was not trained against.

Prints JSON; for the input and each conditioning, means over the faces:

- ``cos_to_target``: MobileFaceNet cosine to the target's descriptor (the one conditioned on);
  ``cos_to_target_other_photo``: to another photo of the target person (not conditioned on);
  ``target_verified``: share at or above LFW_FAR_THRESHOLD (people.py, FAR 0.1%) to that photo;
- ``cos_to_person`` / ``person_verified``: to the input's own descriptor (what the identity
  check watches), and the share at or above LFW_FAR_THRESHOLD;
- ``dlib_same_as_target`` / ``dlib_same_as_person``: share dlib calls the same person as the
  target's other photo / the input (Euclidean distance < 0.6, dlib's rule);
- ``pixels_vs_input``, ``pixels_vs_own_conditioned``: mean absolute difference (0-255, crop).

About 2 minutes for 400 faces on 2 cores, 10 with the dlib judge. ``--strip`` writes a PNG, one
row per face (the first 12): input | own | target in place of own | steered (TARGET_WEIGHT) |
target photo, at 2x.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..pipeline.people import LFW_FAR_THRESHOLD
from .judges import DLIB_SAME_DISTANCE as DLIB_SAME

log = logging.getLogger(__name__)

STRIP_FACES = 12
#: Steering weights measured besides people.TARGET_WEIGHT (own - weight x target).
STEER_WEIGHTS = (0.5, 1.0, 2.0)


def _mean_se(v: np.ndarray) -> dict:
    return {"mean": round(float(v.mean()), 4), "se": round(float(v.std(ddof=1) / np.sqrt(len(v))), 4)}


def conditionings(own: np.ndarray, target: np.ndarray, rand: np.ndarray) -> dict:
    """name -> (N, D) descriptors the generator is conditioned on: the face's own, the target's
    (in place of the own: the paper's way), steered (people.steer_descriptor: own - weight x
    target, normalised; the shipped --target) at STEER_WEIGHTS and people.TARGET_WEIGHT, and a
    random unit vector."""
    from ..pipeline.people import TARGET_WEIGHT, steer_descriptor

    out = {"own": own, "target": target}
    for w in sorted({*STEER_WEIGHTS, TARGET_WEIGHT}):
        out[f"steered_{w:g}"] = steer_descriptor(own, target, w)
    out["random"] = rand
    return out


def target_response(n_faces: int = 400, passes: int = 1, seed: int = 0, weights: Optional[Path] = None,
                    models_dir=None, lfw_dir=None, cache_dir=None, strip: Optional[Path] = None,
                    judge: Optional[str] = "dlib") -> dict:
    from ..faces.align import arcface_box
    from ..generator.identity import load_identity_net
    from ..generator.model import load_generator
    from ..weights import generator_path
    from .evaluate import generate_on_crops
    from .measures import describe
    from .train.prepare import load_split, prepare_split

    gen = load_generator(generator_path(weights), device="cpu")
    size, margin = int(gen.config["size"]), float(gen.config["margin"])
    data = load_split(prepare_split("test", lfw_dir=lfw_dir, cache_dir=cache_dir, size=size, margin=margin,
                                    models_dir=models_dir))
    crops, labels, desc = data["crops"], data["labels"], data["desc"].astype(np.float32)
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    pool = np.flatnonzero(counts[labels] >= 2)  # targets: people with another photo to check against
    faces = np.sort(rng.choice(len(crops), min(n_faces, len(crops)), replace=False))
    tgt, other = np.zeros(len(faces), int), np.zeros(len(faces), int)
    for k, i in enumerate(faces):
        cand = pool[labels[pool] != labels[i]]
        tgt[k] = rng.choice(cand)
        same = np.flatnonzero(labels == labels[tgt[k]])
        other[k] = rng.choice(same[same != tgt[k]])
    rand = rng.standard_normal((len(faces), desc.shape[1])).astype(np.float32)
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)

    x = crops[faces]
    net = load_identity_net(models_dir)
    jn, box = None, None
    if judge:
        from .judges import load_judge

        jn = load_judge(judge)
        off, side = arcface_box(size, margin)
        box = (off, off, off + side, off + side)
        j_person, j_other = jn.describe(x, box), jn.describe(crops[other], box)
    p_desc, t_desc, o_desc = desc[faces], desc[tgt], desc[other]

    def cos(a, b):
        return np.einsum("nd,nd->n", a, b)

    rep: dict = {"faces": len(faces), "passes": passes, "seed": seed, "threshold": LFW_FAR_THRESHOLD,
                 "generator": str(generator_path(weights).name),
                 "input": {"cos_to_target": _mean_se(cos(p_desc, t_desc)),
                           "cos_to_target_other_photo": _mean_se(cos(p_desc, o_desc)),
                           "target_verified": round(float((cos(p_desc, o_desc) >= LFW_FAR_THRESHOLD).mean()), 4)},
                 "conditioned_on": {}}
    if jn is not None:
        dist = np.linalg.norm(j_person - j_other, axis=1)
        rep["input"][f"{judge}_same_as_target"] = round(float((dist < DLIB_SAME).mean()), 4)
    outs = {}
    for name, cond in conditionings(p_desc, t_desc, rand).items():
        log.info("generating %d faces conditioned on %s, %d pass(es)", len(faces), name, passes)
        out, mask = generate_on_crops(gen, x, cond.astype(np.float32), passes=passes)
        outs[name] = out
        d = describe(net, out, margin)
        c_t, c_o, c_p = cos(d, t_desc), cos(d, o_desc), cos(d, p_desc)
        r = {"cos_to_target": _mean_se(c_t), "cos_to_target_other_photo": _mean_se(c_o),
             "target_verified": round(float((c_o >= LFW_FAR_THRESHOLD).mean()), 4),
             "cos_to_person": _mean_se(c_p), "person_verified": round(float((c_p >= LFW_FAR_THRESHOLD).mean()), 4),
             "mask_mean": round(float(mask.mean()), 4),
             "pixels_vs_input": _mad(out, x)}
        if name != "own":
            r["pixels_vs_own_conditioned"] = _mad(out, outs["own"])
            r["cos_to_target_minus_own_conditioned"] = _mean_se(c_t - rep["conditioned_on"]["own"]["_c_t"])
            r["share_closer_to_target_than_own_conditioned"] = round(
                float((c_t > rep["conditioned_on"]["own"]["_c_t"]).mean()), 4)
        else:
            r["_c_t"] = c_t
        if jn is not None:
            jd = jn.describe(out, box)
            r[f"{judge}_same_as_target"] = round(float((np.linalg.norm(jd - j_other, axis=1) < DLIB_SAME).mean()), 4)
            r[f"{judge}_same_as_person"] = round(float((np.linalg.norm(jd - j_person, axis=1) < DLIB_SAME).mean()), 4)
        rep["conditioned_on"][name] = r
    rep["conditioned_on"]["own"].pop("_c_t")
    if strip is not None:
        k = slice(0, STRIP_FACES)
        from ..pipeline.people import TARGET_WEIGHT

        write_strip(Path(strip), [x[k], outs["own"][k], outs["target"][k], outs[f"steered_{TARGET_WEIGHT:g}"][k],
                                  crops[tgt[k]]])
        rep["strip"] = {"path": str(strip), "columns": ["input", "own", "target", f"steered_{TARGET_WEIGHT:g}",
                                                        "target photo"]}
    return rep


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference, 0-255, over the crops."""
    return round(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()), 3)


def write_strip(path: Path, columns) -> None:
    """One row per face, one column per array of ``columns`` ((N, S, S, 3) uint8 RGB each), 2x."""
    from ..media.images import write_image

    gap = np.full((columns[0].shape[1], 4, 3), 255, np.uint8)
    rows = []
    for cols in zip(*columns):
        parts = []
        for c in cols:
            parts += [c, gap]
        rows.append(np.concatenate(parts[:-1], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    img = np.concatenate(rows[:-1], axis=0)
    img = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # 2x, to be looked at
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, img)


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m deidcli.research.target_response", description=__doc__.split("\n")[0])
    p.add_argument("--faces", type=int, default=400)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--strip", type=Path, default=None)
    p.add_argument("--judge", default="dlib", help="independent recognizer (judges.py); '' for none")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(json.dumps(target_response(a.faces, a.passes, a.seed, a.weights, strip=a.strip, judge=a.judge or None),
                     indent=2))


if __name__ == "__main__":
    _main()
