"""Training configuration: DEFAULTS, merging overrides, loading and saving a run's config."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .prepare import REPO_ROOT

logger = logging.getLogger("deid.train")


DEFAULTS: dict[str, Any] = {
    "name": "main",
    "runs_dir": str(REPO_ROOT / "runs"),
    "cache_dir": None,  # default <repo>/cache
    "lfw_dir": None,  # default ../shared/data/lfw
    "models_dir": None,  # identity/detector models (registry search order otherwise)
    "limit_people": None,  # use only the first N training people (smoke tests)
    "seed": 0,
    "device": "cpu",
    "threads": 2,  # torch intra-op threads on CPU
    "generator": {},  # GeneratorConfig fields (size, margin, base_channels, ...)
    "discriminator": {"channels": 32, "n_layers": 3, "spectral": True},
    "eye_discriminator": {"channels": 32, "n_layers": 3, "spectral": False},  # used when
    # weights.eye_adv > 0: a second patch discriminator on the eye band (L.eye_view)
    "feat_discriminator": {"channels": 64, "spectral": True},  # used when weights.feat_adv > 0:
    # model.FeatureDiscriminator heads on the identity network's maps of the attractor levels
    "eye_adv_on_raw": False,  # the eye discriminator judges the raw output's eyes, not the
    # blend's (on the blend the generator can meet it by opening its mask over the input's eyes)
    "gan_loss": "lsgan",
    "batch_size": 16,
    "steps": 200000,  # stop after this many steps ...
    "max_minutes": None,  # ... or after this much wall time in this invocation
    "lr_g": 2e-4,
    "lr_d": 2e-4,
    "betas": [0.5, 0.999],
    "weights": {
        "attractor": 1.0,
        "repeller": 1.0,
        "raw_l1": 0.05,
        "blend_l1": 0.2,
        "grad_l1": 0.2,
        "mask_l1": 0.05,
        "mask_tv": 0.5,
        "adv": 0.05,
        "eye_adv": 0.0,  # adversarial term of the eye discriminator (blended eyes and brows vs
        # the input's), where the repeller smudges lids, irises and brows
        "colour_l1": 0.0,  # L.colour_l1: block-mean colour of the raw output vs the input, under the mask
        "landmarks": 0.0,  # LM.landmark_loss: the detector's 5 points on the blended
        # output vs the input, in inter-ocular distances (what `deid evaluate` reports)
        "mouth": 0.0,  # L.mouth_l1: pixels and gradients of the blended output's mouth box vs
        # the input's (lip motion; `deid evaluate-video` lips r)
        "structure": 0.0,  # L.structure_l1: luminance edges of the raw output's eyes, brows and
        # mouth vs the input's (open eyes, the lip gap), on the raw so the mask cannot dodge it
        "feat_adv": 0.0,  # adversarial term of the feature discriminator: heads on the identity
        # network's attractor-level maps of the raw output vs the input's (a projected GAN).
        # Measured at 1.0 and 4.0 for 3,600 steps from the shipped step: eyes unchanged (MODEL_CARD)
        "eye_rep": 0.0,  # L.eye_repeller: the repeller on the input with the output's eye band
        # (eyes and brows), so the eyes themselves stop looking like the person's
    },
    "structure_brows": True,  # the structure loss's eye boxes include the brows (False: lids only)
    "attractor_levels": ["stem", "dw", "b4"],
    "attractor_level_weights": None,
    "losses_on_raw": True,  # attractor and gradient L1 on the raw output (not the blend), so
    # they keep the raw face's expression/pose without pushing the mask shut
    "rep_margin": 0.0,  # repeller hinge: no push once cos < rep_margin
    "rep_self": 0.0,  # extra repeller weight (relative) on the input photo's own descriptor
    "rep_rescale": 0.5,  # repeller sees the output down-scaled to [rep_rescale, 1] x and back
    "adv_start": 0,  # step from which the adversarial term is used
    "rep_start": 0,  # repeller off before this step (G and D first learn natural faces) ...
    "rep_ramp": 0,  # ... then its weight ramps up linearly over this many steps
    "augment": {"flip": 0.5, "rotate_deg": 5.0, "scale": 0.05, "translate": 0.03,
                "brightness": 0.1, "contrast": 0.15, "saturation": 0.15},
    "input_noise": {"sigma": 0.02, "jpeg_like_blur": 0.3},
    "degrade": {  # L.degrade: in-the-wild degradations of the augmented crop, which is then the
        # generator's input and the reference of every loss (see the loop). p 0: off, the shipped
        # recipe (no draws from the generator's RNG either); configs/train_128_wild.json: 0.5
        "p": 0.0,  # fraction of samples degraded; each degraded one gets 1 to max_ops of:
        "max_ops": 3,
        "occlusion": 0.15, "colour_cast": 0.15, "low_light": 0.2, "blur": 0.2,
        "motion_blur": 0.1, "downscale": 0.45, "noise": 0.2, "jpeg": 0.3,  # ... each this often
        "face_px": [24, 64], "face_frac": 0.55,  # downscale: the face to this many px (it spans
        # face_frac of the crop), and back up
        "blur_sigma": [0.5, 2.5], "box_blur": 0.3, "motion_px": [5, 13],
        "jpeg_quality": [20, 60],
        "ev": [0.5, 2.5], "black_lift": [0.0, 0.05], "dark_noise": [0.008, 0.03],
        "noise_sigma": [0.01, 0.05], "chroma_noise": 0.5,
        "cast_gains": [[1.0, 0.3, 0.3], [0.3, 0.45, 1.0], [0.35, 1.0, 0.4]],  # red, blue, green
        "cast_strength": [0.5, 1.0], "cast_lift": [0.0, 0.08],
        "occlusion_area": [0.1, 0.3],
    },
    "init_from": None,  # compact state (export_train_state) to start from when no last.pt exists:
    # G and D weights and the step count; optimisers and RNG start fresh. A generator config
    # with more channels per level than the state's starts from the state's generator widened
    # (model.widen_state_dict, Net2Net: the same function at step 0)
    "init_widen_noise": 0.01,  # ... plus Gaussian noise of this times each widened tensor's std,
    # so the copied channels can grow apart (0.01, shipped generator 16 -> 32 base channels, 64
    # DevTest faces: the blend moves 0.15 grey levels on average, 1.8 at the 99th percentile)
    "multi_image": True,  # target descriptor from another image of the same person
    "second_pass": 0.0,  # fraction of samples whose generator input is its own blended output
    # (no gradient through that first pass), blended back over it, as `anonymize --passes 2` and
    # the identity check's escalation run it; all losses still compare with the original crop,
    # so a second pass learns to keep colour and expression instead of compounding artifacts.
    # Measured (weights/MODEL_CARD.md): 0.3 for 1,786 steps from step 18,650 weakened identity
    # removal (LFW DevTest rank-1 3.3% -> 8.5%, landmarks 3.47 -> 3.09% IOD): comparing the
    # second pass with the original crop also teaches it to restore what the first pass removed
    "ema": 0.0,  # decay of an exponential moving average of G's weights (0: off). With it,
    # generator.pt, best_generator.pt and the held-out figures are the average's: snapshots of
    # this adversarial training swing by points of rank-1 from one save to the next
    "val_people": 0,  # DevTrain people (each with >= 2 images) held out of training to choose the
    # checkpoint on (split_people); with > 0 training never loads the DevTest people at all
    "val_every": 500,  # steps between validations (and one at the start of every invocation)
    "val_size": 256,  # validation probes (faces of the held-out people); the gallery is all their faces
    "val_openings": True,  # validation also reports how the outputs' eye and inner-lip opening
    # follow the probes' (eyes_r, lips_r: evaluate.opening_agreement, dlib 68 points), when the
    # judge extra (dlib) is installed; figures only, the selection stays on the cosine
    "select_max_landmarks": 3.0,  # best_generator.pt: the lowest validation cosine among
    # validations whose landmark displacement (% inter-ocular) is at most this
    "val_stop": 0.2,  # stop (error, exit 1) when a validation cosine exceeds the best one by more
    # than this: the run has diverged (2026-11-30: 0.106 -> 0.785 within 500 steps; between
    # healthy validations it moved by < 0.02). None: never
    "log_every": 10,
    "sample_every": 200,
    "eval_every": 100,
    "eval_size": 64,
    "save_every_s": 300,
}


def merge(base: Mapping[str, Any], over: Optional[Mapping[str, Any]]) -> dict:
    """Recursive dict merge; keys of ``over`` must exist in ``base`` (except under
    "generator", whose keys GeneratorConfig validates) and their values be of the kind of
    ``base``'s (a number for a number, true/false for a flag, ...) where that is not None."""
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        if k not in out:
            raise ValueError(f"unknown config key {k!r}")
        kind = _kind(out[k])
        if kind is not None and v is not None and _kind(v) != kind:
            raise ValueError(f"config key {k!r}: expected {kind}, got {v!r}")
        if isinstance(out[k], dict) and isinstance(v, Mapping) and k != "generator":
            out[k] = merge(out[k], v)
        elif k == "generator":
            out[k] = {**out[k], **dict(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


#: Keys that say where and how long this invocation runs, not what it trains: a resumed run takes
#: them from this invocation (its options, config file or the defaults), never from the run's save.
INVOCATION_KEYS = ("name", "runs_dir", "cache_dir", "lfw_dir", "models_dir", "device", "threads", "max_minutes")


def _kind(v) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true or false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return "a list" if isinstance(v, (list, tuple)) else "an object"


def load_config(path: Optional[os.PathLike] = None, overrides: Optional[Mapping] = None) -> dict:
    """The config of ``deid train``: DEFAULTS, then the JSON file ``path``, then ``overrides``.

    When the run it names already has a ``last.pt``, the run's saved config takes the place of
    DEFAULTS (except INVOCATION_KEYS), so ``deid train --name RUN`` resumes the run as it was
    started (networks, loss weights, --set entries) instead of a default config whose networks
    may not even fit the checkpoint; the file and ``overrides`` still apply on top.
    """
    try:
        file = json.loads(Path(path).read_text()) if path else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    cfg = merge(merge(DEFAULTS, file), overrides)
    saved = saved_config(Path(cfg["runs_dir"]) / cfg["name"] / "last.pt")
    if saved is None:
        return cfg
    base = merge(DEFAULTS, _known({k: v for k, v in saved.items() if k not in INVOCATION_KEYS}, DEFAULTS))
    return merge(merge(base, file), overrides)


def saved_config(last_path: Path) -> Optional[dict]:
    """The config a run's ``last.pt`` was saved with; None when there is no such file."""
    if not last_path.exists():
        return None
    st = torch.load(last_path, map_location="cpu", weights_only=True)
    return json.loads(st["config"]) if st.get("config") else None


def _known(cfg: Mapping, ref: Mapping) -> dict:
    """``cfg`` without the keys ``ref`` does not have (a save of an older deid), logged."""
    out = {}
    for k, v in cfg.items():
        if k not in ref:
            logger.warning("saved config key %r is no longer used; ignored", k)
        elif isinstance(v, Mapping) and isinstance(ref[k], Mapping) and k != "generator":
            out[k] = _known(v, ref[k])
        else:
            out[k] = v
    return out
