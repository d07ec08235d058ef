"""The training loop: ``train(config)``.

Run directory ``<runs_dir>/<name>/``:
    last.pt          full training state (G, D, both optimisers, step, RNG, config), atomic
    generator.pt     the generator alone (deid-generator checkpoint, fp16; with ema: the average), atomic
    best_generator.pt, best_state.pt   with val_people: the generator of the best validation
                     and the compact state (export_train_state's layout) at it
    log.jsonl        one JSON object per logged step ({"kind": "train"|"eval", ...})
    samples/step_XXXXXXX.png   rows: input / raw / mask / blended (8 train faces + 8 held-out)
    config.json      the resolved config

Re-running with the same name resumes from last.pt with the config saved in it; a --config file
and --set entries given again override it (load_config).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DeidError
from ...generator.identity import to_uint8
from ...generator.model import Discriminator, FeatureDiscriminator, Generator, GeneratorConfig, save_generator
from . import landmarks as LM
from . import losses as L
from .config import DEFAULTS, merge
from .prepare import load_split, prepare_split

logger = logging.getLogger("deid.train")


class _Data:
    """Cached crops on the device as uint8; batches sampled with a seeded numpy RNG."""

    def __init__(self, d: dict, device: torch.device):
        self.crops = torch.from_numpy(d["crops"]).permute(0, 3, 1, 2).contiguous().to(device)
        self.desc = torch.from_numpy(d["desc"]).to(device)
        self.labels = d["labels"]
        self.kps = d.get("crop_kps")  # (N, 5, 2) float32 crop pixels, when the cache has them
        self.fingerprint = d["fingerprint"]
        self.n = len(self.labels)
        by = {}
        for i, lab in enumerate(self.labels):
            by.setdefault(int(lab), []).append(i)
        self.others = [np.array([j for j in by[int(lab)] if j != i], dtype=np.int64)
                       for i, lab in enumerate(self.labels)]
        self.multi = np.array([len(o) > 0 for o in self.others])

    def images(self, idx) -> torch.Tensor:
        return self.crops[torch.as_tensor(idx, device=self.crops.device)].float() / 127.5 - 1.0

    def targets(self, idx, rng: np.random.Generator, multi: bool) -> tuple[np.ndarray, torch.Tensor]:
        tgt = np.array([rng.choice(self.others[i]) if (multi and len(self.others[i])) else i
                        for i in idx])
        return tgt, self.desc[torch.as_tensor(tgt, device=self.desc.device)]


VAL_SEED = 4321  # which DevTrain people split_people holds out: fixed, whatever the run's seed


def split_people(d: dict, n_val: int, seed: int = VAL_SEED) -> tuple[dict, dict]:
    """Split a prepared cache (load_split's dict) by person: ``n_val`` people drawn (fixed
    ``seed``) among those with two or more images, all of whose faces go to the second dict; the
    rest to the first. Per-face arrays are sliced; each part gets its own fingerprint (the
    cache's, hashed with its side and the held-out names)."""
    import hashlib

    labels = np.asarray(d["labels"])
    ids, counts = np.unique(labels, return_counts=True)
    eligible = ids[counts >= 2]
    if n_val > len(eligible):
        raise DeidError(f"val_people {n_val}: only {len(eligible)} training people have two or more images")
    held = np.sort(np.random.default_rng(seed).choice(eligible, size=n_val, replace=False))
    is_val = np.isin(labels, held)
    key = hashlib.sha256((d["fingerprint"] + "," + ",".join(str(p) for p in d["people"][held])).encode())

    def part(m, side):
        out = {k: (v[m] if isinstance(v, np.ndarray) and v.shape[:1] == labels.shape else v)
               for k, v in d.items()}
        h = key.copy()
        h.update(side.encode())
        out["fingerprint"] = h.hexdigest()
        return out

    return part(~is_val, "train"), part(is_val, "val")


def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + f".deid-tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """rows of (B, C, S, S) in [-1,1] (masks in [0,1], C=1) -> (H, W, 3) uint8 RGB."""
    out = []
    for r in rows:
        r = r.detach().float().cpu()
        if r.shape[1] == 1:
            r = r.repeat(1, 3, 1, 1) * 2 - 1
        r = to_uint8(r)
        out.append(np.concatenate(list(r), axis=1))
    return np.concatenate(out, axis=0)


def write_png(path: Path, rgb: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".deid-tmp{os.getpid()}.png")
    cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[:, :, ::-1]))
    os.replace(tmp, path)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": json.dumps(_np_state()),
            "python": json.dumps(random.getstate(), default=list)}


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def train(config: Mapping[str, Any]) -> dict:
    """Train (or resume) the generator described by ``config`` (see DEFAULTS); returns a summary
    {"step", "run_dir", "generator", "elapsed_s", "last": {...losses}}."""
    cfg = merge(DEFAULTS, config)
    gcfg = GeneratorConfig.from_dict(cfg["generator"])
    device = torch.device(cfg["device"])
    if device.type == "cpu" and cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    run_dir = Path(cfg["runs_dir"]) / cfg["name"]
    run_dir.mkdir(parents=True, exist_ok=True)

    # data: DevTrain people to train on; held-out faces to watch (samples, eval records): the
    # val_people split off DevTrain when there is one, else the DevTest people
    paths = {}
    n_val = int(cfg["val_people"] or 0)
    for split in ("train",) if n_val else ("train", "test"):
        lp = cfg["limit_people"]
        paths[split] = prepare_split(split, lfw_dir=cfg["lfw_dir"], cache_dir=cfg["cache_dir"],
                                     size=gcfg.size, margin=gcfg.margin,
                                     models_dir=cfg["models_dir"],
                                     limit_people=lp if split == "train" else (lp and max(lp // 4, 4)))
    train_d = load_split(paths["train"])
    if n_val:
        train_d, val_d = split_people(train_d, n_val)
        data, held = _Data(train_d, device), _Data(val_d, device)
    else:
        data, held = _Data(train_d, device), _Data(load_split(paths["test"]), device)
    logger.info("train: %d faces of %d people (%d with another image); held-out %d faces (%s)",
                data.n, len(set(data.labels.tolist())), int(data.multi.sum()), held.n,
                f"{n_val} DevTrain people" if n_val else "DevTest")

    from ...generator.identity import load_identity_net

    idnet = load_identity_net(cfg["models_dir"], device=device)
    kpnet = None
    if cfg["weights"].get("landmarks", 0) > 0:
        from ...generator.identity import model_file
        from .prepare import DETECTOR

        kpnet = LM.Keypoints(model_file(DETECTOR, cfg["models_dir"])).to(device)
    torch.manual_seed(cfg["seed"])
    G = Generator(gcfg).to(device)
    D = Discriminator(**cfg["discriminator"]).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg["lr_g"], betas=tuple(cfg["betas"]))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg["lr_d"], betas=tuple(cfg["betas"]))
    D_eye = opt_de = None
    if cfg["weights"].get("eye_adv", 0) > 0:
        D_eye = Discriminator(**cfg["eye_discriminator"]).to(device)
        opt_de = torch.optim.Adam(D_eye.parameters(), lr=cfg["lr_d"], betas=tuple(cfg["betas"]))
    D_feat = opt_df = None
    if cfg["weights"].get("feat_adv", 0) > 0:
        from ...generator.identity import FEATURE_LEVELS

        D_feat = FeatureDiscriminator([FEATURE_LEVELS[n] for n in cfg["attractor_levels"]],
                                      **cfg["feat_discriminator"]).to(device)
        opt_df = torch.optim.Adam(D_feat.parameters(), lr=cfg["lr_d"], betas=tuple(cfg["betas"]))
    ema = float(cfg["ema"] or 0.0)
    if not 0.0 <= ema < 1.0:
        raise DeidError(f"ema {ema}: a decay in [0, 1) (0: off)")
    G_ema = None
    gen = torch.Generator().manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    step, elapsed_before = 0, 0.0
    best: Optional[dict] = None  # the validation that best_generator.pt holds
    val_step = -1  # the step of the last validation
    ema_from = None  # a state dict to start the average from (else G's weights)

    last_path = run_dir / "last.pt"
    if last_path.exists():
        st = torch.load(last_path, map_location="cpu", weights_only=True)
        try:
            G.load_state_dict(st["G"])
            D.load_state_dict(st["D"])
            opt_g.load_state_dict(st["opt_g"])
            opt_d.load_state_dict(st["opt_d"])
            if D_eye is not None and "D_eye" in st:
                D_eye.load_state_dict(st["D_eye"])
                opt_de.load_state_dict(st["opt_de"])
            if D_feat is not None and "D_feat" in st:
                D_feat.load_state_dict(st["D_feat"])
                opt_df.load_state_dict(st["opt_df"])
            # an optimiser's state dict carries its learning rate: the config's (a --set lr_g
            # given on resuming) wins, as for every other setting
            for opt, lr in ((opt_g, cfg["lr_g"]), (opt_d, cfg["lr_d"]), (opt_de, cfg["lr_d"]), (opt_df, cfg["lr_d"])):
                for group in (opt.param_groups if opt is not None else ()):
                    group["lr"] = float(lr)
        except (RuntimeError, ValueError) as e:  # shapes or keys of another architecture
            why = "; ".join(x.strip().rstrip(":.") for x in str(e).splitlines()[:2])
            raise DeidError(f"{last_path}: does not fit the networks of this config ({why}); "
                            f"resume without the --config/--set entries that change them, or use a new --name") from e
        step, elapsed_before = int(st["step"]), float(st.get("elapsed_s", 0.0))
        ema_from = st.get("G_ema")
        best = json.loads(st["best"]) if st.get("best") else None
        val_step = int(st.get("val_step", -1))
        gen.set_state(st["gen"])
        rng.bit_generator.state = json.loads(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        logger.info("resumed from %s at step %d", last_path, step)
    elif cfg["init_from"]:
        st = torch.load(cfg["init_from"], map_location="cpu", weights_only=True)
        g_from = _g_init(st, gcfg, cfg)
        G.load_state_dict(g_from(st["G"]))
        D.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in st["D"].items()})
        if D_eye is not None and "D_eye" in st:
            D_eye.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in st["D_eye"].items()})
        if D_feat is not None and "D_feat" in st:
            D_feat.load_state_dict({k: v.float() if v.is_floating_point() else v
                                    for k, v in st["D_feat"].items()})
        step, elapsed_before = int(st.get("step", 0)), float(st.get("elapsed_s", 0.0))
        if "G_ema" in st:
            ema_from = g_from(st["G_ema"])
        logger.info("initialised from %s (step %d; fresh optimisers)", cfg["init_from"], step)
    if ema:
        G_ema = copy.deepcopy(G).requires_grad_(False)
        if ema_from is not None:
            G_ema.load_state_dict(ema_from)
    G_out = G_ema if G_ema is not None else G  # what generator.pt, samples and validation use
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    w = cfg["weights"]
    levels = cfg["attractor_levels"]
    mouth_w = L.mouth_weights(gcfg.size, gcfg.margin).to(device)
    feat_w = L.feature_weights(gcfg.size, gcfg.margin, brows=cfg["structure_brows"]).to(device)
    from ...faces.align import eye_band
    from ...generator.engine import eye_pass_weight

    eye_w = torch.from_numpy(eye_pass_weight(gcfg.size, gcfg.margin)).to(device) if w.get("eye_rep", 0) > 0 else None

    band = eye_band(gcfg.size, gcfg.margin)
    eval_idx = np.random.default_rng(1234).choice(held.n, size=min(cfg["eval_size"], held.n),
                                                  replace=False)
    eval_x = held.images(eval_idx)
    _, eval_tgt = held.targets(eval_idx, np.random.default_rng(1), True)
    eval_own = held.desc[torch.as_tensor(eval_idx, device=device)]
    log_f = open(run_dir / "log.jsonl", "a")
    t_start = time.time()
    last_save = time.time()
    stop = {"flag": False}

    def _sig(signum, frame):
        stop["flag"] = True

    old_handlers = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old_handlers[s] = signal.signal(s, _sig)
        except ValueError:  # not in the main thread
            pass

    def elapsed():
        return elapsed_before + time.time() - t_start

    def meta(extra=None):
        m = {"steps": step, "train_fingerprint": data.fingerprint, "train_faces": data.n,
             "crop_size": gcfg.size, "crop_margin": gcfg.margin, "elapsed_s": round(elapsed(), 1),
             "device": str(device), "train_config": json.dumps(cfg, sort_keys=True)}
        m.update(extra or {})
        return m

    def networks() -> dict:
        """The weights of every network trained (the part of a state _compact keeps), with the
        step, elapsed time and config."""
        nets = {"G": G.state_dict(), "D": D.state_dict(), "step": step, "elapsed_s": elapsed(),
                "config": json.dumps(cfg)}
        if G_ema is not None:
            nets["G_ema"] = G_ema.state_dict()
        if D_eye is not None:
            nets["D_eye"] = D_eye.state_dict()
        if D_feat is not None:
            nets["D_feat"] = D_feat.state_dict()
        return nets

    def running_means() -> dict:
        """Means of the figures since the last log; FloatingPointError if the loss went non-finite
        (checked here, at log and save time, not per step: that would sync the device every step)."""
        means = {k: float(v) / n_run for k, v in running.items()}
        if means and not math.isfinite(means["loss"]):
            raise FloatingPointError(f"non-finite loss within steps {step - n_run + 1}-{step}: {means}")
        return means

    def save():
        running_means()  # never save weights that a non-finite step has touched
        state = {**networks(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                 "gen": gen.get_state(), "rng": json.dumps(rng.bit_generator.state),
                 "torch_rng": torch.get_rng_state()}
        if D_eye is not None:
            state["opt_de"] = opt_de.state_dict()
        if D_feat is not None:
            state["opt_df"] = opt_df.state_dict()
        if best is not None:
            state["best"] = json.dumps(best)
        state["val_step"] = val_step
        _atomic_torch_save(state, last_path)
        save_generator(run_dir / "generator.pt", G_out, meta(last_metrics))
        logger.info("saved step %d (%.0f s)", step, elapsed())

    from ...generator.identity import crop_to_id_input

    @torch.no_grad()
    def evaluate_held():
        G_out.eval()
        raw, mask = G_out(eval_x, eval_own)
        out = mask * raw + (1 - mask) * eval_x
        e = F.normalize(idnet(crop_to_id_input(out, gcfg.margin)), dim=1)
        G.train()
        ev = {"cos_own": float((e * eval_own).sum(1).mean()),
              "cos_other": float((e * eval_tgt).sum(1).mean()),
              "l1": float((out - eval_x).abs().mean()), "mask": float(mask.mean())}
        if kpnet is not None:
            ev["landmarks"] = float(LM.landmark_loss(kpnet, out, eval_x))
        ev["mouth"] = float(L.mouth_l1(out, eval_x, mouth_w))
        ev["structure"] = float(L.structure_l1(raw, eval_x, feat_w))
        return ev, (raw, mask, out)

    if n_val:
        from ..evaluate import rank1
        from ..measures import VERIFY_THRESHOLD

        val_idx = np.sort(np.random.default_rng(VAL_SEED).choice(
            held.n, size=min(int(cfg["val_size"]), held.n), replace=False))
        val_tgt_idx, _ = held.targets(val_idx, np.random.default_rng(VAL_SEED + 1), True)
        val_gallery = held.desc.cpu().numpy()
        lo = None
        if cfg["val_openings"] and held.kps is not None:
            from ..evaluate import opening_agreement, openings_on_crops
            from ..measures import _lip_opening

            lo = _lip_opening()  # None without dlib: no opening figures
            if lo is not None:
                val_kps = held.kps[val_idx]
                val_open_in = openings_on_crops(
                    lo, held.crops[torch.as_tensor(val_idx, device=device)].permute(0, 2, 3, 1).cpu().numpy(), val_kps)

    @torch.no_grad()
    def validate() -> dict:
        """G_out on the held-out DevTrain people's probes (target: another image of the person):
        mean cosine to the probe's own descriptor, fraction verified (cosine >= VERIFY_THRESHOLD),
        rank-1 against a gallery of all their other faces (clean probes: the reference), and
        the detector's 5-point displacement in % of inter-ocular distance; with dlib, the eye and
        inner-lip opening agreement (r across faces, mean |difference| in IOD) with the probes."""
        G_out.eval()
        embs, lm, outs = [], 0.0, []
        for i in range(0, len(val_idx), 32):
            j = val_idx[i:i + 32]
            x = held.images(j)
            raw, mask = G_out(x, held.desc[torch.as_tensor(val_tgt_idx[i:i + 32], device=device)])
            out = mask * raw + (1 - mask) * x
            embs.append(F.normalize(idnet(crop_to_id_input(out, gcfg.margin)), dim=1))
            if lo is not None:
                outs.append(to_uint8(out))
            if kpnet is not None:
                lm += float(LM.landmark_loss(kpnet, out, x)) * len(j)
        G.train()
        e = torch.cat(embs).cpu().numpy()
        own = val_gallery[val_idx]
        cos = (e * own).sum(1)
        v = {"cos": float(cos.mean()), "verified": float((cos >= VERIFY_THRESHOLD).mean()),
             "rank1": rank1(e, val_gallery, held.labels, val_idx),
             "rank1_clean": rank1(own, val_gallery, held.labels, val_idx), "n": len(val_idx)}
        if kpnet is not None:
            v["landmarks_pct"] = 100.0 * lm / len(val_idx)
        if lo is not None:
            v.update(opening_agreement(val_open_in, openings_on_crops(lo, np.concatenate(outs), val_kps)))
        return v

    diverged = {}

    def select(v: dict) -> None:
        """Keep best_generator.pt: the lowest validation cosine whose landmarks are in bounds;
        flag a divergence (val_stop)."""
        nonlocal best, val_step
        val_step = step
        ok = v.get("landmarks_pct", 0.0) <= cfg["select_max_landmarks"]
        if ok and (best is None or v["cos"] < best["cos"]):
            best = {"step": step, **v}
            save_generator(run_dir / "best_generator.pt", G_out,
                           meta({**{f"val_{k}": x for k, x in v.items()}, "val_people": n_val,
                                 "val_fingerprint": held.fingerprint,
                                 "selected_by": f"lowest val cos with landmarks <= "
                                                f"{cfg['select_max_landmarks']}% IOD, ema {ema}"}))
            # and the networks as they are at it (compact, as export_train_state), so a run that
            # goes on and diverges can be restarted from its best point with init_from
            _atomic_torch_save(_compact(networks()), run_dir / "best_state.pt")
        rec = {"kind": "val", "step": step, "t": round(elapsed(), 1), **v, "best_step": best and best["step"]}
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        logger.info("validation step %d %s (best: step %s)", step,
                    " ".join(f"{k}={x:.4f}" for k, x in v.items() if isinstance(x, float)),
                    best and best["step"])
        if cfg["val_stop"] is not None and best is not None and v["cos"] > best["cos"] + cfg["val_stop"]:
            diverged.update(step=step, cos=v["cos"])
            stop["flag"] = True

    last_metrics: dict = {}
    G.train()
    D.train()
    if n_val and val_step != step:
        select(validate())  # the starting weights are a candidate too
    running: dict[str, torch.Tensor] = {}
    n_run = 0
    while step < cfg["steps"] and not stop["flag"]:
        if cfg["max_minutes"] and time.time() - t_start > 60 * cfg["max_minutes"]:
            break
        idx = rng.integers(0, data.n, size=cfg["batch_size"])
        _, tgt_desc = data.targets(idx, rng, cfg["multi_image"])
        x = L.augment(data.images(idx), gen, **cfg["augment"])
        if cfg["degrade"]["p"] > 0:
            # In-the-wild conditions (small, blurred, compressed, dark, coloured, noisy, occluded)
            # go into x itself, so the degraded crop is both what the generator is given and what
            # every term compares with: the attractor's identity-network maps, the pixel, gradient
            # and colour L1s, the landmarks, the discriminators' real samples, the blend's base.
            # The generator is thus asked for a face consistent with the degraded input (as blurred,
            # as dark, as red, the occluder kept), which is what blends into such a frame, never to
            # hallucinate sharp detail that a 24 px face does not hold. The repeller still pushes
            # from the clean descriptors (the person's identity, not the degraded photo's).
            x = L.degrade(x, gen, margin=gcfg.margin, **cfg["degrade"])
        base = x  # what the output is blended over: the crop, or its first pass
        if cfg["second_pass"] > 0:
            sel = torch.as_tensor(rng.random(len(idx)) < cfg["second_pass"], device=device)
            if bool(sel.any()):
                with torch.no_grad():
                    raw1, mask1 = G(L.input_noise(x, gen, **cfg["input_noise"]), tgt_desc)
                    base = torch.where(sel[:, None, None, None], mask1 * raw1 + (1 - mask1) * x, x)
        x_in = L.input_noise(base, gen, **cfg["input_noise"])
        raw, mask = G(x_in, tgt_desc)
        out = mask * raw + (1 - mask) * base

        # discriminator
        use_adv = w["adv"] > 0 and step >= cfg["adv_start"]
        if use_adv:
            opt_d.zero_grad(set_to_none=True)
            ld = L.d_loss(D(x), D(out.detach()), cfg["gan_loss"])
            ld.backward()
            opt_d.step()
        if D_eye is not None:
            opt_de.zero_grad(set_to_none=True)
            eye_src = raw if cfg["eye_adv_on_raw"] else out
            lde = L.d_loss(D_eye(L.eye_view(x, band)), D_eye(L.eye_view(eye_src.detach(), band)), cfg["gan_loss"])
            lde.backward()
            opt_de.step()
        # generator
        attr, rep, cos, (out_maps, ref_maps) = L.attractor_repeller(
            idnet, out, x, tgt_desc, levels, gcfg.margin, cfg["rep_margin"],
            cfg["attractor_level_weights"], gen, cfg["rep_rescale"],
            raw if cfg["losses_on_raw"] else None, data.desc[torch.as_tensor(idx, device=device)],
            cfg["rep_self"], return_maps=True)
        if D_feat is not None:  # its real and fake are the maps the attractor just compared
            opt_df.zero_grad(set_to_none=True)
            ldf = L.d_loss_multi(D_feat(ref_maps), D_feat([m.detach() for m in out_maps]), cfg["gan_loss"])
            ldf.backward()
            opt_df.step()
        terms = {
            "attractor": attr, "repeller": rep,
            "raw_l1": F.l1_loss(raw, x), "blend_l1": F.l1_loss(out, x),
            "grad_l1": L.gradient_l1(raw if cfg["losses_on_raw"] else out, x),
            "mask_l1": mask.mean(), "mask_tv": L.total_variation(mask),
        }
        if w.get("colour_l1", 0) > 0:
            terms["colour_l1"] = L.colour_l1(raw, x, mask)
        if kpnet is not None:
            terms["landmarks"] = LM.landmark_loss(kpnet, out, x)
        if w.get("mouth", 0) > 0:
            terms["mouth"] = L.mouth_l1(out, x, mouth_w)
        if w.get("structure", 0) > 0:
            terms["structure"] = L.structure_l1(raw, x, feat_w)
        if w.get("eye_rep", 0) > 0:
            terms["eye_rep"], eye_cos = L.eye_repeller(idnet, out, x, eye_w, tgt_desc, gcfg.margin,
                                                       cfg["rep_margin"], gen, cfg["rep_rescale"],
                                                       data.desc[torch.as_tensor(idx, device=device)],
                                                       cfg["rep_self"])
        if use_adv:
            for p in D.parameters():
                p.requires_grad_(False)
            terms["adv"] = L.g_adv_loss(D(out), cfg["gan_loss"])
        if D_eye is not None:
            for p in D_eye.parameters():
                p.requires_grad_(False)
            terms["eye_adv"] = L.g_adv_loss(D_eye(L.eye_view(eye_src, band)), cfg["gan_loss"])
        if D_feat is not None:
            for p in D_feat.parameters():
                p.requires_grad_(False)
            terms["feat_adv"] = L.g_adv_loss_multi(D_feat(out_maps), cfg["gan_loss"])
        ramp = 1.0 if step >= cfg["rep_start"] + cfg["rep_ramp"] else (
            0.0 if step < cfg["rep_start"] else (step - cfg["rep_start"]) / max(cfg["rep_ramp"], 1))
        scale = {"repeller": ramp, "eye_rep": ramp}
        loss = sum(w[k] * scale.get(k, 1.0) * v for k, v in terms.items() if w.get(k, 0) > 0)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if G_ema is not None:
            with torch.no_grad():
                for pe, p in zip(G_ema.parameters(), G.parameters()):
                    pe.lerp_(p, 1.0 - ema)
                for be, b in zip(G_ema.buffers(), G.buffers()):
                    be.copy_(b)
        if use_adv:
            for p in D.parameters():
                p.requires_grad_(True)
        if D_eye is not None:
            for p in D_eye.parameters():
                p.requires_grad_(True)
        if D_feat is not None:
            for p in D_feat.parameters():
                p.requires_grad_(True)
        step += 1

        # the step's figures stay on the device until they are logged: one host sync per
        # log_every steps instead of one per figure and step (on CUDA the loop then runs ahead)
        vals = {k: v.detach() for k, v in terms.items()}
        vals.update(loss=loss.detach(), cos=cos.mean(), mask_mean=mask.detach().mean())
        if "eye_rep" in terms:
            vals["eye_cos"] = eye_cos.mean()
        if use_adv:
            vals["d_loss"] = ld.detach()
        if D_eye is not None:
            vals["d_eye_loss"] = lde.detach()
        if D_feat is not None:
            vals["d_feat_loss"] = ldf.detach()
        for k, v in vals.items():
            running[k] = running[k] + v if k in running else v.double()
        n_run += 1
        if step % cfg["log_every"] == 0 or step == 1:
            means = running_means()
            rec = {"kind": "train", "step": step, "t": round(elapsed(), 1),
                   **{k: round(v, 5) for k, v in means.items()}}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            last_metrics = {f"train_{k}": v for k, v in rec.items() if k not in ("kind", "step")}
            logger.info("step %d %s", step, " ".join(f"{k}={v:.4f}" for k, v in rec.items()
                                                      if isinstance(v, float)))
            running, n_run = {}, 0
        if step % cfg["eval_every"] == 0:
            ev, _ = evaluate_held()
            log_f.write(json.dumps({"kind": "eval", "step": step, "t": round(elapsed(), 1), **ev}) + "\n")
            log_f.flush()
            last_metrics.update({f"heldout_{k}": v for k, v in ev.items()})
            logger.info("held-out step %d %s", step, ev)
        if n_val and step % cfg["val_every"] == 0:
            select(validate())
        if step % cfg["sample_every"] == 0:
            _, (hraw, hmask, hout) = evaluate_held()
            k = min(8, len(x), len(eval_x))
            grid = np.concatenate([
                _grid([x[:k], raw[:k], mask[:k], out[:k]]),
                _grid([eval_x[:k], hraw[:k], hmask[:k], hout[:k]])], axis=0)
            write_png(run_dir / "samples" / f"step_{step:07d}.png", grid)
        if time.time() - last_save > cfg["save_every_s"]:
            save()
            last_save = time.time()

    save()
    log_f.close()
    for s, h in old_handlers.items():
        signal.signal(s, h)
    if diverged:
        raise DeidError(
            f"training diverged: validation cosine {diverged['cos']:.3f} at step {diverged['step']}, "
            f"more than val_stop {cfg['val_stop']} above the best, {best['cos']:.3f} at step {best['step']}; "
            f"{run_dir / 'best_generator.pt'} holds that one"
            + (f"; restart from it with a new --name and --set init_from='\"{run_dir / 'best_state.pt'}\"'"
               if (run_dir / "best_state.pt").exists() else ""))
    return {"step": step, "run_dir": str(run_dir), "generator": str(run_dir / "generator.pt"),
            "elapsed_s": round(elapsed(), 1), "last": last_metrics, "best": best}


def _g_init(st: Mapping, gcfg: GeneratorConfig, cfg: Mapping):
    """How init_from's generator weights become this run's: as saved (in fp32), or, when this
    config's generator has more channels per level than the state's and is otherwise the same,
    widened (model.widen_state_dict: the same function, plus ``init_widen_noise`` to let the
    copies grow apart)."""
    def plain(sd):
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}

    saved = json.loads(st["config"]).get("generator") if st.get("config") else None
    if saved is None or GeneratorConfig.from_dict(saved) == gcfg:
        return plain
    from ...generator.model import widen_state_dict, widening

    try:
        ca, cb = widening(saved, gcfg)
    except ValueError as e:
        raise DeidError(f"{cfg['init_from']}: its generator ({saved}) does not fit this config's "
                        f"({gcfg.to_dict()}): {e}") from e
    logger.info("widening the generator of %s: %s -> %s channels (noise %g)", cfg["init_from"],
                ca, cb, cfg["init_widen_noise"])
    return lambda sd: widen_state_dict(plain(sd), saved, gcfg, noise=cfg["init_widen_noise"], seed=cfg["seed"])


def export_train_state(last_pt: os.PathLike, dst: os.PathLike) -> Path:
    """Compact, committable training state from a run's last.pt: the G and D weights (and the eye
    discriminator's, when trained) in fp16, the step count, elapsed time and config (no optimiser
    moments, no RNG). Resume from it with ``"init_from": dst`` (optimisers restart)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(_compact(torch.load(last_pt, map_location="cpu", weights_only=True)), dst)
    return dst


def _compact(st: Mapping) -> dict:
    """The committable part of a training state: networks in fp16, step, elapsed time, config."""
    half = {n: {k: v.detach().half() if v.is_floating_point() else v for k, v in st[n].items()}
            for n in ("G", "G_ema", "D", "D_eye", "D_feat") if n in st}
    return {"format": "deid-train-state", "version": 1, **half, "step": int(st["step"]),
            "elapsed_s": float(st.get("elapsed_s", 0.0)), "config": st.get("config", "")}
