"""An in-the-wild stress set made from ``../shared``: crowds of small faces, stage light, low
light, blur, compression, haze, scene cuts and moving LFW crowds.

    python -m deidcli.research.stress OUT_DIR [--seed 0] [--seconds 3] [--only NAME ...] [--list]

Every clip but the large crowds and the close-ups is 1280x720 at 30 frames/s, H.264 (libx264 crf 18, crf 35 for ``*_crf35``), no audio,
and is made deterministically from ``--seed`` (which shared clip goes in which cell, where each
starts, the noise, the LFW people and their paths). The videos are never committed: this script
is. ``OUT_DIR/manifest.json`` lists what each clip is made of. Existing clips are kept unless
``--overwrite``; each is written to a temporary name and renamed when complete.

The clips (names are what ``--only`` takes):

mosaicN (N = 2, 3, 4)
    the eight clips of ``../shared/videos`` scaled into an N x N grid of 1280x720 (each fitted
    whole into its cell over a dark grey background, starting at a seeded frame, looping): faces
    from about 150 px (2x2, the 512 px talking heads) down to about 15 px (4x4, the small face of
    lp_s32).
mosaic3_<condition>
    the 3x3 mosaic under one condition: ``dark`` (-1.5 EV in linear light, a lifted black level
    and sensor-like noise), ``red`` / ``blue`` / ``green`` (strong stage-light casts), ``blur``
    (motion blur, 13 px at a seeded angle), ``crf35`` (heavy compression), ``haze`` (a bright
    veil that halves the contrast). ``--all-grids`` makes them for the 2x2 and 4x4 mosaics too.
crowd_lfw
    about 20 faces at a time, 20-80 px, from LFW DevTest people (never seen in training), moving
    over a smooth background, entering and leaving the frame, some pairs crossing each other;
    some mirrored, some squeezed sideways (a crude turn of the head), some cut off at one side.
fadein
    one shared talking head, full frame, coming into focus over its first 20 frames (a Gaussian
    blur of 40 px down to none) while fading in from 40% brightness: the detector scores the face
    below the start threshold, or not at all, in the first frames.
crowd_1080, crowd_4k
    the same kind of LFW crowd, 30 faces at a time, in a 1920x1080 frame (faces 20-80 px) and a
    3840x2160 one (30-120 px): small faces in large frames, which a detector looking at the whole
    frame at a fixed 640 px shrinks below what it can find.
cuts
    hard scene cuts every 20 frames between a full-frame shared clip and 2x2, 3x3 and 4x4
    mosaics (a face in the very first frame; tracks that must end at a cut).
closeup_4k, selfie_4k
    one large face in a 4K frame: ``ghost_obama_short`` (1280x720) scaled 3x into 3840x2160, a
    talking head of about 1,290 px, and ``lp_d13`` (720x1280, a phone selfie) scaled 3x into
    2160x3840, about 1,550 px. The detector's search, at half the frame's size, sees faces this
    large at 640-780 px, beyond what it finds (faces/detect.py, COARSE_SIDE).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

W, H, FPS = 1280, 720, 30
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
VIDEOS = SHARED / "videos"
LFW = SHARED / "data" / "lfw"
BACKGROUND = 40  # grey level around a clip fitted into its cell
CONDITIONS = ("dark", "red", "blue", "green", "blur", "crf35", "haze")
CAST = {"red": ((1.0, 0.30, 0.28), (0.10, 0.0, 0.02)),  # per-channel gain, offset (RGB, 0-1)
        "blue": ((0.30, 0.42, 1.0), (0.0, 0.02, 0.10)),
        "green": ((0.32, 1.0, 0.38), (0.0, 0.08, 0.0))}
DARK_EV = -1.5
DARK_LIFT = 0.035  # black level added after the exposure change (0-1)
DARK_NOISE = 5.0  # grey levels, std of the luminance noise (chroma noise: half)
BLUR_PX = 13
HAZE = 0.5  # share of the veil
HAZE_LEVEL = 0.85  # its brightness (0-1)
CUT_EVERY = 20  # frames between scene cuts
CROWD_AT_ONCE = 20
FADE_FRAMES, FADE_FROM, FADE_BLUR = 20, 0.4, 40.0
#: The crowds (Crowd's keyword arguments). crowd_1080 and crowd_4k: the same kind of faces in larger
#: frames, which a detector looking at 640 px shrinks 3 and 6 times.
CROWDS = {"crowd_lfw": {},
          "crowd_1080": {"size": (1920, 1080), "at_once": 30, "face_px": (20, 80)},
          "crowd_4k": {"size": (3840, 2160), "at_once": 30, "face_px": (30, 120)}}
#: The close-ups: (shared clip, frame size (W, H)), the clip scaled up to fill the frame.
CLOSEUPS = {"closeup_4k": ("ghost_obama_short.mp4", (3840, 2160)),
            "selfie_4k": ("lp_d13.mp4", (2160, 3840))}


def shared_clips() -> list[Path]:
    clips = sorted(VIDEOS.glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no clips in {VIDEOS}: the stress set is made from ../shared/videos")
    return clips


# --- sources ----------------------------------------------------------------------------------

class Looper:
    """Upright RGB frames of one clip from frame ``start``, looping at the end, each fitted whole
    into a (h, w) cell (aspect kept, dark grey around it)."""

    def __init__(self, path: Path, start: int, cell: tuple[int, int]):
        self.path, self.start, self.cell = path, start, cell
        self._it = self._frames()

    def _frames(self) -> Iterator[np.ndarray]:
        from .measures import upright_frames

        skip = self.start
        while True:
            n = 0
            for img, _ in upright_frames(self.path):
                n += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield fit(img, self.cell)
            if n == 0:
                raise RuntimeError(f"{self.path}: no frames")
            skip = skip % n if skip > 0 else 0

    def __next__(self) -> np.ndarray:
        return next(self._it)


def fit(img: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """``img`` (h, w, 3) uint8 scaled to fit whole inside ``cell`` (H, W), centred on grey."""
    import cv2

    ch, cw = cell
    h, w = img.shape[:2]
    s = min(ch / h, cw / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.full((ch, cw, 3), BACKGROUND, np.uint8)
    y, x = (ch - nh) // 2, (cw - nw) // 2
    out[y:y + nh, x:x + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


def grid_cells(n: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the n x n cells of a W x H frame, row by row."""
    ys = np.linspace(0, H, n + 1).round().astype(int)
    xs = np.linspace(0, W, n + 1).round().astype(int)
    return [(ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(n) for c in range(n)]


class Mosaic:
    """Frames of an n x n grid of the shared clips; ``plan`` says which clip, from which frame."""

    def __init__(self, n: int, rng: np.random.Generator):
        clips = shared_clips()
        order = rng.permutation(len(clips))
        cells = grid_cells(n)
        self.plan = []
        self.loopers = []
        for k, (y0, y1, x0, x1) in enumerate(cells):
            clip = clips[order[k % len(clips)]]
            start = int(rng.integers(0, 60))
            self.plan.append({"cell": [int(x0), int(y0), int(x1), int(y1)], "clip": clip.name, "start": start})
            self.loopers.append(Looper(clip, start, (y1 - y0, x1 - x0)))
        self.cells = cells

    def __next__(self) -> np.ndarray:
        frame = np.empty((H, W, 3), np.uint8)
        for (y0, y1, x0, x1), lp in zip(self.cells, self.loopers):
            frame[y0:y1, x0:x1] = next(lp)
        return frame


# --- conditions -------------------------------------------------------------------------------

def _to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def apply_condition(frame: np.ndarray, condition: Optional[str], rng: np.random.Generator,
                    angle: float = 0.0) -> np.ndarray:
    """One frame (H, W, 3) uint8 RGB under ``condition`` (None or one of CONDITIONS; ``crf35`` is
    applied by the encoder, not here). ``rng`` draws the noise; ``angle`` (degrees) orients the
    motion blur."""
    import cv2

    if condition in (None, "crf35"):
        return frame
    x = frame.astype(np.float32) / 255.0
    if condition == "dark":
        x = _to_srgb(_to_linear(x) * 2.0 ** DARK_EV) + DARK_LIFT
        lum = rng.normal(0.0, DARK_NOISE / 255.0, x.shape[:2]).astype(np.float32)[..., None]
        chroma = rng.normal(0.0, DARK_NOISE / 510.0, x.shape).astype(np.float32)
        x = x + lum + chroma
    elif condition in CAST:
        gain, off = CAST[condition]
        x = x * np.asarray(gain, np.float32) + np.asarray(off, np.float32)
    elif condition == "blur":
        k = np.zeros((BLUR_PX, BLUR_PX), np.float32)
        k[BLUR_PX // 2, :] = 1.0 / BLUR_PX
        rot = cv2.getRotationMatrix2D((BLUR_PX / 2 - 0.5, BLUR_PX / 2 - 0.5), angle, 1.0)
        k = cv2.warpAffine(k, rot, (BLUR_PX, BLUR_PX))
        x = cv2.filter2D(x, -1, k / max(float(k.sum()), 1e-6))
    elif condition == "haze":
        x = cv2.GaussianBlur(x, (0, 0), 1.0)
        x = (1 - HAZE) * x + HAZE * HAZE_LEVEL
    else:
        raise ValueError(f"unknown condition {condition!r}; one of {CONDITIONS}")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# --- an LFW crowd -----------------------------------------------------------------------------

def _lfw_people(rng: np.random.Generator, k: int) -> list[Path]:
    """One photo each of ``k`` LFW DevTest people (peopleDevTest.txt), chosen by ``rng``."""
    names = []
    lines = (LFW / "peopleDevTest.txt").read_text().split("\n")[1:]
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            names.append((parts[0], int(parts[1])))
    pick = rng.choice(len(names), size=min(k, len(names)), replace=False)
    out = []
    for i in pick:
        name, count = names[i]
        j = int(rng.integers(1, count + 1))
        out.append(LFW / "lfw_deepfunneled" / name / f"{name}_{j:04d}.jpg")
    return out


def _smooth_background(rng: np.random.Generator, size: tuple[int, int] = (W, H)) -> np.ndarray:
    import cv2

    w, h = size
    grey = rng.uniform(60, 170, (9, 16, 1))
    tint = rng.uniform(-20, 20, (9, 16, 3))
    bg = cv2.resize((grey + tint).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    bg += rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return np.clip(bg, 0, 255)


class Crowd:
    """Moving LFW faces over a smooth background (see the module docstring)."""

    def __init__(self, rng: np.random.Generator, frames: int, size: tuple[int, int] = (W, H),
                 at_once: int = CROWD_AT_ONCE, face_px: tuple[float, float] = (20, 80)):
        import cv2

        fw, fh = self.size = size
        self.bg = _smooth_background(rng, size)
        self.sprites = []
        self.plan = []
        total = at_once * 2
        photos = _lfw_people(rng, total)
        for k, photo in enumerate(photos):
            img = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
            img = img[55:195, 55:195]  # the deep-funneled face and a little around it (140 px)
            face = float(rng.uniform(*face_px))  # face height, px
            side = max(8, int(round(face * 140 / 100)))
            variant = rng.choice(["plain", "mirrored", "squeezed", "cut"], p=[0.4, 0.2, 0.25, 0.15])
            sw = side
            if variant == "mirrored":
                img = img[:, ::-1]
            elif variant == "squeezed":
                sw = max(6, int(round(side * rng.uniform(0.55, 0.75))))
            sprite = cv2.resize(img, (sw, side), interpolation=cv2.INTER_AREA).astype(np.float32)
            yy, xx = np.mgrid[0:side, 0:sw].astype(np.float32)
            a = ((xx - sw / 2 + 0.5) / (sw * 0.48)) ** 2 + ((yy - side / 2 + 0.5) / (side * 0.5)) ** 2
            alpha = np.clip((1.0 - a) * 4.0, 0.0, 1.0)
            if variant == "cut":
                alpha[:, : int(sw * rng.uniform(0.3, 0.45))] = 0.0
            # a path that crosses the frame: enter at one edge, leave at another (or stay)
            start = int(rng.integers(-frames // 2, frames))
            life = int(rng.integers(frames // 2, 2 * frames))
            if k % 8 == 0 and k + 1 < total:  # pairs that cross: same row, opposite directions
                y = float(rng.uniform(0.2, 0.8) * fh)
                p0, p1 = np.array([-side, y]), np.array([fw + side, y + rng.uniform(-40, 40)])
            elif k % 8 == 1:
                p0, p1 = self.sprites[-1]["p1"].copy(), self.sprites[-1]["p0"].copy()
                start = self.sprites[-1]["start"]
                life = self.sprites[-1]["life"]
            else:
                p0 = rng.uniform([-side, -side], [fw + side, fh + side])
                p1 = rng.uniform([0, 0], [fw, fh])
            self.sprites.append({"img": sprite, "alpha": alpha[..., None], "p0": np.asarray(p0, float),
                                 "p1": np.asarray(p1, float), "start": start, "life": life})
            self.plan.append({"photo": str(photo.relative_to(LFW / "lfw_deepfunneled")), "face_px": round(face, 1),
                              "variant": str(variant), "start": start, "frames": life})
        self.t = 0

    @staticmethod
    def centre(sprite: dict, t: int) -> Optional[np.ndarray]:
        """(x, y) of ``sprite``'s centre in frame ``t`` (float pixels; may be off the frame), or
        None when it is not on its path then."""
        u = (t - sprite["start"]) / max(sprite["life"], 1)
        return sprite["p0"] + u * (sprite["p1"] - sprite["p0"]) if 0.0 <= u <= 1.0 else None

    def __next__(self) -> np.ndarray:
        fw, fh = self.size
        out = self.bg.copy()
        for s in self.sprites:
            c = self.centre(s, self.t)
            if c is None:
                continue
            cx, cy = c
            h, w = s["img"].shape[:2]
            x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
            xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, fw), min(y0 + h, fh)
            if xa >= xb or ya >= yb:
                continue
            a = s["alpha"][ya - y0:yb - y0, xa - x0:xb - x0]
            out[ya:yb, xa:xb] = a * s["img"][ya - y0:yb - y0, xa - x0:xb - x0] + (1 - a) * out[ya:yb, xa:xb]
        self.t += 1
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class Cuts:
    """Hard cuts every CUT_EVERY frames: a full-frame clip, then 2x2, 3x3, 4x4 mosaics, repeated."""

    def __init__(self, rng: np.random.Generator):
        clips = shared_clips()
        full = clips[int(rng.integers(0, len(clips)))]
        self.scenes = [Looper(full, 0, (H, W)), Mosaic(2, rng), Mosaic(3, rng), Mosaic(4, rng)]
        self.plan = {"full": full.name, "every": CUT_EVERY,
                     "mosaics": [m.plan for m in self.scenes[1:]]}
        self.t = 0

    def __next__(self) -> np.ndarray:
        scene = self.scenes[(self.t // CUT_EVERY) % len(self.scenes)]
        self.t += 1
        return next(scene)


class Closeup:
    """A shared clip scaled up to a large frame of its own aspect (bicubic: ``fit``'s area resize
    enlarges in blocks), looping: one large face."""

    def __init__(self, clip: str, size: tuple[int, int]):
        self._it = self._frames(VIDEOS / clip, size)
        self.plan = {"clip": clip, "size": list(size)}

    @staticmethod
    def _frames(path: Path, size: tuple[int, int]) -> Iterator[np.ndarray]:
        import cv2

        from .measures import upright_frames

        while True:
            for img, _ in upright_frames(path):
                yield cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)

    def __next__(self) -> np.ndarray:
        return next(self._it)


class FadeIn:
    """A full-frame shared clip whose brightness rises from FADE_FROM to 1 and whose blur falls
    from FADE_BLUR px to none over FADE_FRAMES."""

    def __init__(self, rng: np.random.Generator):
        clips = [c for c in shared_clips() if c.name != "ghost_2person.mp4"]
        clip = clips[int(rng.integers(0, len(clips)))]
        self.src = Looper(clip, 0, (H, W))
        self.plan = {"clip": clip.name, "frames": FADE_FRAMES, "from": FADE_FROM, "blur": FADE_BLUR}
        self.t = 0

    def __next__(self) -> np.ndarray:
        import cv2

        u = min(self.t / FADE_FRAMES, 1.0)
        self.t += 1
        img = next(self.src).astype(np.float32) * (FADE_FROM + (1 - FADE_FROM) * u)
        if u < 1.0:
            img = cv2.GaussianBlur(img, (0, 0), FADE_BLUR * (1.0 - u))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --- the set ----------------------------------------------------------------------------------

def clip_names(all_grids: bool = False) -> list[str]:
    grids = (2, 3, 4)
    names = [f"mosaic{n}" for n in grids]
    names += [f"mosaic{n}_{c}" for n in (grids if all_grids else (3,)) for c in CONDITIONS]
    return names + ["crowd_lfw", "cuts", "fadein"] + [c for c in CROWDS if c != "crowd_lfw"] + list(CLOSEUPS)


def _seed_of(name: str, seed: int) -> int:
    """A seed of its own per clip (stable across Python runs, unlike hash())."""
    return seed * 1_000_003 + sum((i + 1) * ord(ch) for i, ch in enumerate(name))


def make_clip(name: str, path: Path, seed: int = 0, seconds: float = 3.0) -> dict:
    """Write clip ``name`` to ``path`` (atomically); returns its manifest entry."""
    import av

    rng = np.random.default_rng(_seed_of(name, seed))
    frames = int(round(seconds * FPS))
    condition = None
    size = CLOSEUPS[name][1] if name in CLOSEUPS else CROWDS.get(name, {}).get("size", (W, H))
    entry: dict = {"name": name, "file": path.name, "frames": frames, "fps": FPS, "size": list(size), "seed": seed}
    if name.startswith("mosaic"):
        n = int(name[len("mosaic")])
        condition = name.split("_", 1)[1] if "_" in name else None
        if condition is not None and condition not in CONDITIONS:
            raise ValueError(f"unknown condition in {name!r}")
        src = Mosaic(n, rng)
        entry.update(kind="mosaic", grid=n, condition=condition, cells=src.plan)
    elif name in CROWDS:
        src = Crowd(rng, frames, **CROWDS[name])
        entry.update(kind="crowd", faces=src.plan)
    elif name in CLOSEUPS:
        src = Closeup(*CLOSEUPS[name])
        entry.update(kind="closeup", source=src.plan)
    elif name == "fadein":
        src = FadeIn(rng)
        entry.update(kind="fadein", source=src.plan)
    elif name == "cuts":
        src = Cuts(rng)
        entry.update(kind="cuts", scenes=src.plan)
    else:
        raise ValueError(f"unknown stress clip {name!r}; one of {clip_names(True)}")
    angle = float(rng.uniform(0, 180))
    crf = 35 if condition == "crf35" else 18
    entry["crf"] = crf
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with av.open(str(tmp), "w") as out:
            vs = out.add_stream("libx264", rate=FPS, options={"crf": str(crf), "preset": "fast"})
            (vs.width, vs.height), vs.pix_fmt = size, "yuv420p"
            for _ in range(frames):
                img = apply_condition(next(src), condition, rng, angle)
                out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(vs.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return entry


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="just these clips")
    ap.add_argument("--all-grids", action="store_true", help="conditions on the 2x2 and 4x4 mosaics too")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the clip names and exit")
    a = ap.parse_args(argv)
    names = clip_names(a.all_grids)
    if a.list:
        print("\n".join(names))
        return
    if a.only:
        unknown = [n for n in a.only if n not in clip_names(True)]
        if unknown:
            ap.error(f"unknown clip(s) {unknown}; --list shows them")
        names = a.only
    a.out_dir.mkdir(parents=True, exist_ok=True)
    man_path = a.out_dir / "manifest.json"
    manifest = json.loads(man_path.read_text()) if man_path.exists() else {}
    for name in names:
        path = a.out_dir / f"{name}.mp4"
        if path.exists() and not a.overwrite and name in manifest:
            print(f"{path}: exists")
            continue
        manifest[name] = make_clip(name, path, a.seed, a.seconds)
        print(f"{path}: {manifest[name]['frames']} frames")
        tmp = man_path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, man_path)


if __name__ == "__main__":
    main()
