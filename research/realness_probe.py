#!/usr/bin/env python3
"""How far are a generator's faces from real ones? A realness probe, as a number.

    DEID_MODELS_DIR=../shared/models python research/realness_probe.py W [W ...]
        [--features mfn,scrfd,eyes] [--train-faces 2000] [--steps 1500] [--threads 2] [--json F]
    python research/realness_probe.py --control blur-eyes   (or jpeg, copy)
    python research/realness_probe.py W --saved-discriminators weights/train_state/last.pt

For each checkpoint W, the faces `deid anonymize` would paste back (one pass, blended, colours
matched) are made from the LFW DevTrain crops of `deid prepare` (``cache/lfw_train_128_m0.2.npz``).
A small conv head on a frozen network's feature maps is then trained to tell them from the real
crops they were made from, on ``--train-faces`` faces of the training people, and tested on the
200 held-out validation people that ``deid train`` validates on (``loop.split_people``, 1,151
faces; no person of the test is in the probe's training). Printed per checkpoint and feature
space: AUC (0.5: the probe cannot tell outputs from photos; 1.0: it tells every one), accuracy
at logit 0, and "pair", the fraction of test faces whose photo scores above its own output.

Feature spaces: ``mfn`` is MobileFaceNet's b4 map (28 x 28 x 64 of the 112 px ArcFace crop). The
generator is trained against this network (attractor, repeller, and with ``weights.feat_adv``
a discriminator on these very maps), so a generator can learn to satisfy it without looking
natural. ``scrfd`` is deid's detector's stride-8 backbone map (32 x 32 x 48 of the crop resized to
256 px); the landmark loss back-propagates through that backbone, but only to move the 5 points,
and no loss asks it to find the output real. Read ``scrfd`` as the less partial of the two.
``eyes`` is no frozen network: the pixels of the eye band (align.eye_band, 64 x 32 at the 128
crop, eyes and brows), judged by a discriminator of the training's own design
(model.Discriminator, 48 channels, as configs/train_128.json) trained from scratch: what a
fresh adversary of the generator's loop would learn to see there, given ``--steps`` steps.

Controls (``--control``, no checkpoint): the outputs replaced by the photos with their eye boxes
Gaussian-blurred (sigma 2 px: "smeared eyes"), by JPEG quality-50 copies, or by exact copies
(AUC 0.5 by construction: the probe cannot invent a difference). Takes 2-3 minutes per
checkpoint and feature space on 2 cores.

``--saved-discriminators STATE`` trains nothing: it scores the same test faces with the
discriminators a training state saved (``D``, and ``D_eye`` when there is one, as the loop
built them from the state's config): does the generator's own adversary still tell its faces
from photos?

Measured (2026-11-30, weights/MODEL_CARD.md, Schedule), AUC MobileFaceNet / SCRFD:
shipped step 36,500 0.820 / 0.611; eye-blurred photos 0.995 / 0.919; JPEG-50 photos 0.896 / 0.832.
2026-11-30, ``eyes``: shipped 0.916 (0.969 with all 8,374 training faces), eye-blurred 0.999,
JPEG-50 1.000, copies 0.5; the shipped state's own ``D`` 0.943, ``D_eye`` 0.513.
A JPEG copy looks natural and the generator's faces do not, yet the probe tells the JPEG copies
apart more easily: it sees low-level statistics (recompression, blur), not what makes a face
look edited. A high AUC flags smears and artefacts; a lower one does not certify natural faces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "cache" / "lfw_train_128_m0.2.npz"
FEATURES = ("mfn", "scrfd", "eyes")
CONTROLS = ("blur-eyes", "jpeg", "copy")
SCRFD_MAP = "339"  # the SCRFD-2.5G graph's last stride-8 backbone activation (48 channels)


def _models_dir():
    return os.environ.get("DEID_MODELS_DIR", str(ROOT.parent / "shared" / "models"))


class Features:
    """features(crops uint8 (N, S, S, 3) RGB) -> float16 torch (N, C, h, w), frozen networks."""

    def __init__(self, kind: str, margin: float = 0.2):
        import torch

        if kind not in FEATURES:
            raise SystemExit(f"--features: {kind!r} is not one of {', '.join(FEATURES)}")
        self.kind, self.margin, self.torch = kind, margin, torch
        self.pixels = kind == "eyes"  # images, not a frozen network's maps: fit() uses a discriminator
        if kind == "eyes":
            self.net = None
        elif kind == "mfn":
            from deidcli.generator.identity import load_identity_net

            self.net = load_identity_net(_models_dir()).eval()
        else:
            from deidcli.research.train.landmarks import OnnxGraph

            self.net = OnnxGraph(Path(_models_dir()) / "det_scrfd_2.5g_kps.onnx")
            if not any(SCRFD_MAP in outs for _, _, outs, _ in self.net.nodes):
                raise SystemExit(f"det_scrfd_2.5g_kps.onnx has no tensor {SCRFD_MAP!r}: not the graph this probe was written for")
            self.net.output_names = [SCRFD_MAP]

    def __call__(self, crops: np.ndarray, batch: int = 32):
        import torch.nn.functional as F

        from deidcli.generator.identity import crop_to_id_input, to_input

        from deidcli.faces.align import eye_band

        torch, out = self.torch, []
        x0, y0, x1, y1 = eye_band(crops.shape[1], self.margin)
        with torch.no_grad():
            for i in range(0, len(crops), batch):
                x = to_input(crops[i:i + batch])
                if self.kind == "eyes":  # the band's pixels in [-1, 1]
                    f = x[:, :, y0:y1, x0:x1]
                elif self.kind == "mfn":
                    f = self.net.feature_maps(crop_to_id_input(x, self.margin), ["b4"])[0]
                else:  # InsightFace's normalisation, (RGB - 127.5) / 128
                    f = self.net(F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
                                 * (127.5 / 128.0))[0]
                out.append(f.half())
        return torch.cat(out)


def fit(real, fake, steps: int = 1500, batch: int = 32, seed: int = 0, pixels: bool = False):
    """A head (3x3 conv, 64 channels, LeakyReLU, 1x1 conv, mean over positions) trained with
    logistic loss on paired (real, fake) feature maps (N, C, h, w); returns the head. ``pixels``:
    the maps are images, and the head is the training's patch discriminator (model.Discriminator,
    48 channels, no spectral norm), from scratch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)
    if pixels:
        from deidcli.generator.model import Discriminator

        head = Discriminator(48, 3, spectral=False)
    else:
        head = nn.Sequential(nn.Conv2d(real.shape[1], 64, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 1, 1))
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.ones(batch), torch.zeros(batch)])
    for _ in range(steps):
        j = torch.randint(0, len(real), (batch,), generator=g)
        logit = head(torch.cat([real[j], fake[j]]).float()).mean((1, 2, 3))
        loss = F.binary_cross_entropy_with_logits(logit, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def score(head, real, fake) -> dict:
    """AUC (ties count a half), accuracy at logit 0, and the fraction of pairs whose real scores
    above its own fake, on test feature maps."""
    import torch

    with torch.no_grad():
        lr = torch.cat([head(real[i:i + 128].float()).mean((1, 2, 3)) for i in range(0, len(real), 128)]).numpy()
        lf = torch.cat([head(fake[i:i + 128].float()).mean((1, 2, 3)) for i in range(0, len(fake), 128)]).numpy()
    cmp = lr[:, None] - lf[None, :]
    auc = float((cmp > 0).mean() + 0.5 * (cmp == 0).mean())
    acc = 0.5 * float((lr > 0).mean() + (lf <= 0).mean())
    pair = float((lr > lf).mean() + 0.5 * (lr == lf).mean())
    return {"auc": round(auc, 4), "acc": round(acc, 4), "pair": round(pair, 4), "test_faces": len(lr)}


def control(kind: str, crops: np.ndarray, size: int, margin: float) -> np.ndarray:
    """The stand-in outputs of a control (uint8 crops like ``crops``)."""
    import cv2

    if kind == "copy":
        return crops.copy()
    if kind == "jpeg":
        return np.stack([cv2.cvtColor(cv2.imdecode(cv2.imencode(
            ".jpg", cv2.cvtColor(c, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 50])[1], cv2.IMREAD_COLOR),
            cv2.COLOR_BGR2RGB) for c in crops])
    if kind == "blur-eyes":
        from deidcli.faces.align import eye_boxes

        m = eye_boxes(size, margin, soften=3).max(0)[..., None]
        b = np.stack([cv2.GaussianBlur(c, (0, 0), 2.0) for c in crops])
        return (m * b + (1 - m) * crops).round().astype(np.uint8)
    raise SystemExit(f"--control: {kind!r} is not one of {', '.join(CONTROLS)}")


def outputs(weights: str, crops: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, int]:
    """(the pipeline's one-pass, colour-matched, blended faces, the checkpoint's step)."""
    from deidcli.research.evaluate import generate_on_crops
    from deidcli.generator.model import load_generator

    g = load_generator(weights)
    return generate_on_crops(g, crops, desc, "cpu", passes=1, colour_match=True)[0], g.meta.get("steps")


def saved_discriminators(state: str, real: np.ndarray, fake: np.ndarray) -> dict:
    """{name: score} of the discriminators in a training state (``D``, ``D_eye``) on uint8 test
    crops, real and fake (no training): each built as the loop builds it from the state's config,
    ``D_eye`` judging losses.eye_view of the eye band. Read AUC and pair: "acc" thresholds at
    logit 0, which an LSGAN discriminator (targets 1 and 0) does not centre on."""
    import json as _json

    import torch

    from deidcli.faces.align import eye_band
    from deidcli.generator.identity import to_input
    from deidcli.generator.model import Discriminator
    from deidcli.research.train import losses as L
    from deidcli.research.train.config import DEFAULTS, merge

    st = torch.load(state, map_location="cpu", weights_only=True)
    cfg = merge(DEFAULTS, _json.loads(st["config"]) if st.get("config") else {})
    band = eye_band(real.shape[1], float(cfg["generator"]["margin"]))
    out = {}
    for name, key, view in (("D", "discriminator", lambda x: x), ("D_eye", "eye_discriminator",
                                                                   lambda x: L.eye_view(x, band))):
        if name not in st:
            continue
        net = Discriminator(**cfg[key])
        net.load_state_dict(st[name])
        net.eval()
        out[name] = score(lambda x, net=net, view=view: net(view(x)), to_input(real), to_input(fake))
    return out


def probe(real_tr, fake_tr, real_te, fake_te, features: Features, steps: int) -> dict:
    """Fit on the training crops, score on the test crops (uint8 crops, paired real and fake)."""
    return score(fit(features(real_tr), features(fake_tr), steps, pixels=features.pixels),
                 features(real_te), features(fake_te))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", nargs="*")
    ap.add_argument("--control", action="append", default=[], help=", ".join(CONTROLS))
    ap.add_argument("--features", default="mfn,scrfd")
    ap.add_argument("--train-faces", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--saved-discriminators", metavar="STATE",
                    help="instead of training probes, score the discriminators saved in this training state")
    a = ap.parse_args(argv)
    if not a.weights and not a.control:
        ap.error("give checkpoints or --control")
    bad = [c for c in a.control if c not in CONTROLS] + [k for k in a.features.split(",") if k not in FEATURES]
    if bad:
        ap.error(f"unknown control or feature space {bad[0]!r} (controls: {', '.join(CONTROLS)}; "
                 f"features: {', '.join(FEATURES)})")
    if not Path(a.cache).is_file():
        print(f"error: {a.cache} not found (run `deid prepare`)", file=sys.stderr)
        return 2
    for w in a.weights + ([a.saved_discriminators] if a.saved_discriminators else []):
        if not Path(w).is_file():
            print(f"error: {w} not found", file=sys.stderr)
            return 2
    if a.saved_discriminators and (len(a.weights) != 1 or a.control):
        ap.error("--saved-discriminators takes exactly one checkpoint and no --control")
    import torch

    from deidcli.research.train.loop import split_people
    from deidcli.research.train.prepare import load_split

    torch.set_num_threads(max(1, a.threads))
    d = load_split(Path(a.cache))
    tr, va = split_people(d, 200)
    if a.saved_discriminators:
        fake, step = outputs(a.weights[0], va["crops"], va["desc"])
        rows = [{"weights": a.weights[0], "step": step, "state": a.saved_discriminators, "discriminator": k, **v}
                for k, v in saved_discriminators(a.saved_discriminators, va["crops"], fake).items()]
        for r in rows:
            print(json.dumps(r), flush=True)
        return _write_json(a.json, rows)
    itr = np.sort(np.random.default_rng(0).choice(len(tr["crops"]), min(a.train_faces, len(tr["crops"])), replace=False))
    real_tr, real_te = tr["crops"][itr], va["crops"]
    feats = [Features(k, d["margin"]) for k in a.features.split(",")]
    real = {f.kind: (f(real_tr), f(real_te)) for f in feats}  # the photos' maps, once per space
    rows = []
    jobs = [("control", c) for c in a.control] + [("weights", w) for w in a.weights]
    for what, x in jobs:
        t0 = time.time()
        if what == "control":
            fake_tr, fake_te, step = (control(x, real_tr, d["size"], d["margin"]),
                                      control(x, real_te, d["size"], d["margin"]), None)
        else:
            fake, step = outputs(x, np.concatenate([real_tr, real_te]), np.concatenate([tr["desc"][itr], va["desc"]]))
            fake_tr, fake_te = fake[:len(real_tr)], fake[len(real_tr):]  # one load, one pass over both
        for f in feats:
            fr, fr_te = real[f.kind]
            r = {what: x, "step": step, "features": f.kind, **score(fit(fr, f(fake_tr), a.steps, pixels=f.pixels), fr_te, f(fake_te)),
                 "train_faces": len(itr), "seconds": round(time.time() - t0)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    return _write_json(a.json, rows)


def _write_json(path, rows) -> int:
    """Write the rows to ``path`` when one was given; main's exit status."""
    if path:
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
