"""``deid evaluate``: how much identity a method removes and how much of the face it keeps.

On the LFW DevTest people (never seen in training), for the generator and, side by side, blur
and pixelate applied to the same aligned crops:

identity (MobileFaceNet descriptors of the ArcFace square of each crop, as in training)
- ``cos_to_original``: mean cosine similarity anonymized vs original crop;
- ``verified``: fraction of anonymized faces accepted as the same person as another clean image
  of that person at the threshold for FAR = 0.1% on clean pairsDevTest (clean: the reference);
- ``rank1``: rank-1 re-identification of probes against a gallery of all *other* clean test
  images (probes: test faces whose person has another image);
perception kept (SCRFD run on input and output crops, padded into a 256x256 canvas)
- ``landmark_disp_iod``: mean 5-point displacement output vs input, % of inter-ocular distance;
- ``det_rate`` / ``det_score``: detection rate and mean score on outputs (inputs: reference).
independent judges (``judges=("dlib",)``, deidcli/research/judges.py): the same identity metrics with a
recognition network deid was not trained with, its own threshold for FAR = 0.1% on clean
pairsDevTest, in ``report["judges"][name]`` (its descriptors centred on their clean DevTest mean
before cosines).

Writes report.json, report.md and contact_sheet.png (input / output / mask, 32 random faces).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

from ..faces.align import arcface_box
from .measures import PAD, describe, far_threshold

logger = logging.getLogger("deid.evaluate")


DET_SIZE = 256


# ----------------------------------------------------------------- classic methods on crops


def classic_on_crops(crops: np.ndarray, method: str, size: int, margin: float,
                     crop_kps: Optional[np.ndarray] = None) -> np.ndarray:
    """Blur / pixelate each (S, S, 3) uint8 crop over the face ellipse, as deid does on frames.

    The face box is the ArcFace square of the crop (align.arcface_box), the size of a detector
    box. Uses deidcli.faces.methods.apply_classic when available, else a local equivalent.
    """
    off, side = arcface_box(size, margin)
    box = np.array([off, off, off + side, off + side], np.float32)
    try:
        from ..faces.methods import apply_classic
    except ImportError:  # pragma: no cover - colleague's module missing
        apply_classic = None
    out = crops.copy()
    for i in range(len(out)):
        kps = None if crop_kps is None else crop_kps[i]
        if apply_classic is not None:
            apply_classic(out[i], [SimpleNamespace(box=box, kps=kps)], method, 0.25)
        else:
            out[i] = _local_classic(out[i], side, method)
    return out


def _local_classic(img: np.ndarray, face_px: float, method: str) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    if method == "pixelate":
        b = max(face_px / 8.0, 2.0)
        small = cv2.resize(img, (max(1, round(w / b)), max(1, round(h / b))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    f = min(1.0, 12.0 / face_px)
    small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 1.5)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------------ helpers


def generate_on_crops(gen, crops: np.ndarray, desc: np.ndarray, device="cpu",
                      batch_size: int = 32, passes: int = 1,
                      colour_match: bool = True, first_pass_mouth: bool = True,
                      eye_pass: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(blended uint8 (N,S,S,3), mask float32 (N,S,S)) from the generator on uint8 crops;
    ``passes`` > 1 applies it again to its own blended output (mask: 1 - prod(1 - m_i)), as
    ``deid anonymize --passes`` does; ``colour_match`` feeds each crop in the colours the generator was trained on
    (align.normalise_tone) and gives the combined raw output the input's colours (align.match_colour),
    as ``deid anonymize`` does by default;
    ``first_pass_mouth``: passes after the first leave the mouth alone; ``eye_pass``: one run more,
    on the eye band only (engine.GeneratorRunner)."""
    import torch

    from ..faces.colour import match_colour, normalise_tone
    from ..generator.engine import _compose_passes, eye_pass_weight, further_weights, later_pass_weight
    from ..generator.identity import to_input, to_uint8

    later = None
    if first_pass_mouth:
        later = torch.from_numpy(later_pass_weight(crops.shape[1], float(gen.config["margin"]))).to(device)
    eye = None
    if eye_pass:
        eye = torch.from_numpy(eye_pass_weight(crops.shape[1], float(gen.config["margin"]))).to(device)
    further = further_weights(passes, later, eye)
    outs, masks = [], []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            c = crops[i:i + batch_size]
            # as GeneratorRunner: with colour matching each face is fed in the colours it was trained on
            x = to_input(np.stack([normalise_tone(ci) for ci in c]) if colour_match else c).to(device)
            d = torch.from_numpy(desc[i:i + batch_size]).to(device)
            raw, m = gen(x, d)
            if further:  # one equivalent (raw, mask) pair, as GeneratorRunner returns
                raw, m = _compose_passes(x, raw, m.clamp(0, 1), further, lambda y: gen(y, d), torch)
            mk = m[:, 0].float().cpu().numpy()
            if colour_match:
                raw8 = np.stack([match_colour(r, ci, mi) for r, ci, mi in zip(to_uint8(raw), c, mk)])
                outs.append((mk[..., None] * raw8 + (1 - mk[..., None]) * c).round().astype(np.uint8))
            else:
                outs.append(to_uint8(m * raw + (1 - m) * x))
            masks.append(mk)
    return np.concatenate(outs), np.concatenate(masks)


def detect_crops(det, crops: np.ndarray) -> dict:
    """Detector on each crop padded into a canvas: best face nearest the centre."""
    n, s = len(crops), crops.shape[1]
    found = np.zeros(n, bool)
    score = np.zeros(n, np.float32)
    kps = np.full((n, 5, 2), np.nan, np.float32)
    canvas = np.full((s + 2 * PAD, s + 2 * PAD, 3), 127, np.uint8)
    for i in range(n):
        canvas[PAD:PAD + s, PAD:PAD + s] = crops[i]
        d = det.detect(canvas)
        if len(d):
            c = (d.boxes[:, :2] + d.boxes[:, 2:]) / 2 - (s / 2 + PAD)
            k = int(np.argmin(np.hypot(c[:, 0], c[:, 1])))
            found[i], score[i], kps[i] = True, d.scores[k], d.kps[k] - PAD
    return {"found": found, "score": score, "kps": kps}


def rank1(probe: np.ndarray, gallery: np.ndarray, labels: np.ndarray, probe_idx: np.ndarray) -> float:
    """Rank-1 rate: nearest gallery image (excluding the probe's own image) has its label."""
    if len(probe_idx) == 0:
        return float("nan")
    sim = probe @ gallery.T
    sim[np.arange(len(probe_idx)), probe_idx] = -np.inf
    return float(np.mean(labels[sim.argmax(1)] == labels[probe_idx]))


def openings_on_crops(lo, crops: np.ndarray, crop_kps: np.ndarray) -> np.ndarray:
    """(N, 2) float: inner-lip and eye opening in IOD (evaluate_video.LipOpening.openings, dlib 68
    points) of each crop (N, S, S, 3) uint8 RGB, fitted at the given 5 points (N, 5, 2) in crop
    pixels: the input's points for input and output alike, as evaluate-video does on frames."""
    return np.array([lo.openings(c, k) for c, k in zip(crops, crop_kps)], dtype=np.float64).reshape(-1, 2)


def opening_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Pearson r across faces and mean |difference| (IOD) of the openings of the input (a) and of
    the output (b), both (N, 2) from :func:`openings_on_crops`."""
    from .measures import _pearson

    out = {}
    for j, key in enumerate(("lips", "eyes")):
        out[f"{key}_r"] = _pearson(a[:, j], b[:, j])
        out[f"{key}_absdiff_iod"] = float(np.mean(np.abs(a[:, j] - b[:, j])))
    return out


def contact_sheet(inputs: np.ndarray, outputs: np.ndarray, masks: np.ndarray, cols: int = 8) -> np.ndarray:
    """Groups of three rows (input / output / mask), ``cols`` faces per row; (H, W, 3) uint8."""
    rows = []
    for g in range(0, len(inputs), cols):
        sl = slice(g, g + cols)
        m = (np.clip(masks[sl], 0, 1) * 255).astype(np.uint8)[..., None].repeat(3, -1)
        for block in (inputs[sl], outputs[sl], m):
            if len(block) < cols:
                block = np.concatenate([block, np.zeros((cols - len(block),) + block.shape[1:], np.uint8)])
            rows.append(np.concatenate(list(block), axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows, axis=0)


def _markdown(rep: dict) -> str:
    m = rep["methods"]
    names = list(m)
    head = "| metric | clean (reference) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    clean = rep["clean"]

    def row(label, key, fmt, ref=None):
        vals = [fmt.format(m[n][key]) if m[n].get(key) is not None else "-" for n in names]
        lines.append(f"| {label} | {ref if ref is not None else '-'} | " + " | ".join(vals) + " |")

    row("mean cosine to original (lower is better; target <= 0.2)", "cos_to_original", "{:.3f}", "1.000")
    row(f"verified at FAR=0.1% (thr {rep['verification']['threshold']:.3f}; target <= 2%)", "verified",
        "{:.1%}", f"{clean['verified']:.1%}")
    row("rank-1 re-identification (target <= 2%)", "rank1", "{:.1%}", f"{clean['rank1']:.1%}")
    if "det_rate" in clean:  # evaluate(detect=False) runs no detector
        row("landmark displacement, % IOD (target <= 3%)", "landmark_disp_iod", "{:.2f}", "0")
        row("detection rate on outputs (input ref.)", "det_rate", "{:.1%}", f"{clean['det_rate']:.1%}")
        row("detection rate relative to input (target >= 99%)", "det_rate_rel", "{:.1%}", "100%")
        row("mean detector score", "det_score", "{:.3f}", f"{clean['det_score']:.3f}")
    if "eyes_r" in clean:  # dlib's 68 points were available
        row("eye opening r across faces (dlib 68 points; reference: a JPEG q90 copy)", "eyes_r", "{:.3f}",
            f"{clean['eyes_r']:.3f}")
        row("eye opening mean abs. difference, IOD", "eyes_absdiff_iod", "{:.4f}", f"{clean['eyes_absdiff_iod']:.4f}")
        row("inner-lip opening r across faces", "lips_r", "{:.3f}", f"{clean['lips_r']:.3f}")
        row("inner-lip opening mean abs. difference, IOD", "lips_absdiff_iod", "{:.4f}",
            f"{clean['lips_absdiff_iod']:.4f}")
    for jname, j in rep.get("judges", {}).items():
        jm, jc = j["methods"], j["clean"]
        for label, key, fmt, ref in (
                (f"{jname} (independent): mean cosine to original", "cos_to_original", "{:.3f}", "1.000"),
                (f"{jname}: verified at FAR=0.1% (thr {j['verification']['threshold']:.3f})", "verified",
                 "{:.1%}", f"{jc['verified']:.1%}"),
                (f"{jname}: rank-1 re-identification", "rank1", "{:.1%}", f"{jc['rank1']:.1%}")):
            vals = [fmt.format(jm[n][key]) if n in jm else "-" for n in names]
            lines.append(f"| {label} | {ref} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- evaluate


def _method_passes(method: str) -> int:
    """generate -> 1, generate:K -> K (generator passes); other methods -> 0."""
    if method == "generate":
        return 1
    if method.startswith("generate:") and method[9:].isdigit() and int(method[9:]) >= 1:
        return int(method[9:])
    if method in ("blur", "pixelate"):
        return 0
    raise ValueError(f"cannot evaluate method {method!r} (generate, generate:K for K passes, blur, pixelate)")


def evaluate(weights: Optional[os.PathLike] = None, out_dir: os.PathLike = "out/evaluate",
             methods: Sequence[str] = ("generate", "blur", "pixelate"),
             cache_dir: Optional[os.PathLike] = None, lfw_dir: Optional[os.PathLike] = None,
             models_dir: Optional[os.PathLike] = None, device: str = "cpu",
             limit: Optional[int] = None, seed: int = 0, detect: bool = True,
             judges: Sequence[str] = (), colour_match: bool = True, first_pass_mouth: bool = True,
             eye_pass: bool = False) -> dict:
    """Run the evaluation; writes report.json / report.md / contact_sheet.png in ``out_dir`` and
    returns the report dict. ``colour_match``: generate as ``deid anonymize`` does by default
    (align.match_colour); False for the generator's own colours. ``first_pass_mouth``: as
    ``deid anonymize`` does by default, generate:K's later passes leave the mouth alone.
    ``eye_pass``: one generator run more on the eye band (``deid anonymize --eye-pass``)."""
    import cv2

    from ..faces.detect import Detector
    from ..generator.identity import load_identity_net, model_file
    from .train.prepare import DEFAULT_LFW, DETECTOR, load_split, prepare_split, read_pairs

    t0 = time.time()
    out_dir = Path(out_dir)  # created when the first result is written: nothing left by a failed start
    gen = None
    size, margin = 128, 0.2
    for method in methods:
        _method_passes(method)  # a clear error before any work
    from .judges import load_judge, normalise

    judge_nets = {name: load_judge(name) for name in judges}  # JudgeUnavailable before any work
    if any(m.startswith("generate") for m in methods):
        from ..generator.model import load_generator
        from ..weights import generator_path

        wpath = generator_path(weights)
        gen = load_generator(wpath, device=device)
        size, margin = int(gen.config["size"]), float(gen.config["margin"])
    data = load_split(prepare_split("test", lfw_dir=lfw_dir, cache_dir=cache_dir, size=size,
                                    margin=margin, models_dir=models_dir))
    crops, labels, names, desc = data["crops"], data["labels"], data["names"], data["desc"]
    net = load_identity_net(models_dir, device=device)
    pairs = read_pairs(Path(lfw_dir or DEFAULT_LFW) / "pairsDevTest.txt")
    verif = far_threshold(desc, list(names), pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    thr = verif["threshold"]

    # subset (probes); the gallery stays all clean test images
    n_all = len(crops)
    rng = np.random.default_rng(seed)
    sub = np.arange(n_all) if not limit or limit >= n_all else np.sort(rng.choice(n_all, limit, replace=False))
    counts = np.bincount(labels)
    # verification partner: another clean image of the same person
    partner = np.full(n_all, -1)
    for i in sub:
        others = np.flatnonzero(labels == labels[i])
        others = others[others != i]
        if len(others):
            partner[i] = rng.choice(others)
    has_partner = partner[sub] >= 0
    probes = sub[counts[labels[sub]] >= 2]

    det = Detector(model_file(DETECTOR, models_dir), det_thresh=0.5, det_size=DET_SIZE) if detect else None
    clean_det = detect_crops(det, crops[sub]) if det else None

    def identity_metrics(anon_desc: np.ndarray, desc: np.ndarray = desc, thr: float = thr) -> dict:
        """anon_desc: (len(sub), D) descriptors of the anonymized crops; desc: (n_all, D) of the
        clean crops (gallery, originals, partners), same network; thr: its verification threshold."""
        d_sub = anon_desc
        cos = np.sum(d_sub * desc[sub], 1)
        pv = np.sum(d_sub[has_partner] * desc[partner[sub][has_partner]], 1)
        pos = {j: k for k, j in enumerate(sub)}
        pr = np.array([pos[j] for j in probes], dtype=np.int64)
        return {"cos_to_original": float(cos.mean()), "cos_to_original_median": float(np.median(cos)),
                "verified": float(np.mean(pv >= thr)) if len(pv) else float("nan"),
                "cos_to_other_image": float(pv.mean()) if len(pv) else float("nan"),
                "rank1": rank1(d_sub[pr], desc, labels, probes)}

    clean = identity_metrics(desc[sub])
    clean.pop("cos_to_original_median")
    from .measures import _lip_opening

    lo = _lip_opening()  # None without the judge extra: no opening figures
    crop_kps = data["crop_kps"][sub]
    open_in = None
    if lo is not None:  # expression kept: eye and lip opening, the input's vs the output's
        open_in = openings_on_crops(lo, crops[sub], crop_kps)
        jpeg = np.stack([cv2.imdecode(cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 90])[1], cv2.IMREAD_UNCHANGED)
                         for c in crops[sub]])  # the measure's own noise: the same faces, re-compressed
        clean.update(opening_agreement(open_in, openings_on_crops(lo, jpeg, crop_kps)))
    if clean_det is not None:
        clean.update(det_rate=float(clean_det["found"].mean()),
                     det_score=float(clean_det["score"][clean_det["found"]].mean()))
    report = {"data": {"split": "LFW peopleDevTest", "faces": int(len(sub)), "faces_total": int(n_all),
                       "people": int(len(np.unique(labels[sub]))), "probes_rank1": int(len(probes)),
                       "gallery": int(n_all), "verification_probes": int(has_partner.sum()),
                       "crop_size": size, "crop_margin": margin, "test_fingerprint": data["fingerprint"]},
              "verification": verif, "clean": clean, "methods": {}}
    off, side = arcface_box(size, margin)
    face_box = (off, off, off + side, off + side)
    judged = {}  # name -> (judge, clean descriptors of all test crops, threshold)
    for name, jn in judge_nets.items():
        tj = time.time()
        jraw = jn.describe(crops, face_box)
        centre = jraw.mean(0)
        jdesc = normalise(jraw, centre)
        jver = far_threshold(jdesc, list(names), pairs)
        judged[name] = (jn, jdesc, jver["threshold"], centre)
        jclean = identity_metrics(jdesc[sub], jdesc, jver["threshold"])
        jclean.pop("cos_to_original_median")
        report.setdefault("judges", {})[name] = {"verification": jver, "clean": jclean, "methods": {},
                                                 "seconds_clean": round(time.time() - tj, 1)}
        logger.info("judge %s: clean %s, threshold %.3f (TAR %.3f)", name, jclean, jver["threshold"],
                    jver["tar_clean"])
    if gen is not None:
        report["generator"] = {"path": str(wpath), "colour_match": bool(colour_match),
                               "first_pass_mouth": bool(first_pass_mouth), "eye_pass": bool(eye_pass),
                               "config": gen.config,
                               "meta": {k: v for k, v in gen.meta.items() if k != "train_config"}}
    sheet_idx = np.sort(rng.choice(len(sub), min(32, len(sub)), replace=False))
    for method in methods:
        tm = time.time()
        if method.startswith("generate"):
            anon, masks = generate_on_crops(gen, crops[sub], desc[sub], device, passes=_method_passes(method),
                                            colour_match=colour_match, first_pass_mouth=first_pass_mouth,
                                            eye_pass=eye_pass)
        elif method in ("blur", "pixelate"):
            anon = classic_on_crops(crops[sub], method, size, margin, data["crop_kps"][sub])
            masks = (np.abs(anon.astype(np.int16) - crops[sub]).sum(-1) > 0).astype(np.float32)
        else:
            raise ValueError(f"cannot evaluate method {method!r}")
        res = identity_metrics(describe(net, anon, margin, device))
        if det is not None:
            od = detect_crops(det, anon)
            both = od["found"] & clean_det["found"]
            ik = clean_det["kps"][both]
            iod = np.linalg.norm(ik[:, 0] - ik[:, 1], axis=1)
            disp = np.linalg.norm(od["kps"][both] - ik, axis=2).mean(1) / iod * 100
            res.update(det_rate=float(od["found"].mean()),
                       det_rate_rel=float(od["found"].mean() / max(clean["det_rate"], 1e-9)),
                       det_score=float(od["score"][od["found"]].mean()) if od["found"].any() else 0.0,
                       landmark_disp_iod=float(disp.mean()) if len(disp) else None,
                       landmark_disp_iod_median=float(np.median(disp)) if len(disp) else None)
        if open_in is not None:
            res.update(opening_agreement(open_in, openings_on_crops(lo, anon, crop_kps)))
        res["seconds"] = round(time.time() - tm, 1)
        report["methods"][method] = res
        for name, (jn, jdesc, jthr, centre) in judged.items():
            jres = identity_metrics(normalise(jn.describe(anon, face_box), centre), jdesc, jthr)
            report["judges"][name]["methods"][method] = jres
            logger.info("judge %s on %s: %s", name, method, {k: round(v, 4) for k, v in jres.items()})
        sheet = contact_sheet(crops[sub][sheet_idx], anon[sheet_idx], masks[sheet_idx])
        cv2.imwrite(str(out_dir / f"contact_sheet_{method}.png"), sheet[:, :, ::-1])
        if method == "generate":
            cv2.imwrite(str(out_dir / "contact_sheet.png"), sheet[:, :, ::-1])
        logger.info("%s: %s", method, {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()})
    report["seconds"] = round(time.time() - t0, 1)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report))
    return report
