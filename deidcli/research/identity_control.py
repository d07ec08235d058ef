"""How far the identity network's verification can be trusted on small and degraded faces.

    DEID_MODELS_DIR=../shared/models python -m deidcli.research.identity_control far-by-size
    DEID_MODELS_DIR=../shared/models python -m deidcli.research.identity_control clips CLIP.mp4 [...]

``far-by-size``: LFW pairs.txt (3000 same-person, 3000 different-person pairs: the pairs
:data:`measures.VERIFY_THRESHOLD` was set on), each photo
downscaled so its face box is H px high (INTER_AREA, as a small face in a video) and cropped
with align.arcface_crop (upscaled back to 112, as evaluate_video does): per H, the share of
different-person pairs at or above :data:`measures.VERIFY_THRESHOLD` (its FAR, 0.1% by
construction at full size), their 99.9th percentile, and the share of same-person pairs above
it. About 6 min on 2 cores.

``clips``: per clip, every third frame's faces (SCRFD at 0.5): the share whose control crop
(measures.face_removed: the face region filled flat) the network verifies as the face itself,
i.e. faces for which a verification of any output says nothing about the face.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .measures import VERIFY_THRESHOLD, face_removed

HEIGHTS = (0, 128, 96, 64, 48, 40, 32, 24)  # 0: the photo as it is


def far_by_size(lfw_dir: Path, models_dir=None, heights=HEIGHTS) -> list[dict]:
    import cv2

    from .. import weights
    from ..faces.align import arcface_crop
    from ..faces.detect import Detector
    from ..generator.embedder import IdentityEmbedder
    from .measures import _lfw_pairs

    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", models_dir), det_thresh=0.3, det_size=320)
    emb = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", models_dir))
    pairs = _lfw_pairs(lfw_dir)
    desc = {}
    for name in sorted({n for a, b, *_ in pairs for n in (a, b)}):
        bgr = cv2.imread(str(lfw_dir / "lfw_deepfunneled" / name), cv2.IMREAD_COLOR)
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        d = det.detect(rgb)
        if len(d) == 0:
            continue
        c = (d.boxes[:, :2] + d.boxes[:, 2:]) / 2.0
        k = int(np.argmin(np.hypot(c[:, 0] - rgb.shape[1] / 2, c[:, 1] - rgb.shape[0] / 2)))
        bh = float(d.boxes[k, 3] - d.boxes[k, 1])
        crops = []
        for h in heights:
            f = 1.0 if not h or h >= bh else h / bh
            img = rgb if f == 1.0 else cv2.resize(rgb, (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f))),
                                                 interpolation=cv2.INTER_AREA)
            crops.append(arcface_crop(img, d.kps[k] * f))
        desc[name] = emb.embed(crops)
    ok = [(a, b, s) for a, b, s, *_ in pairs if a in desc and b in desc]
    same = np.array([s for *_, s in ok])
    rows = []
    for j, h in enumerate(heights):
        cos = np.array([float(desc[a][j] @ desc[b][j]) for a, b, _ in ok])
        neg = cos[~same]
        rows.append({"face_height": h or "photo", "far": float(np.mean(neg >= VERIFY_THRESHOLD)),
                     "different_p99_9": float(np.quantile(neg, 0.999)), "different_max": float(neg.max()),
                     "tar": float(np.mean(cos[same] >= VERIFY_THRESHOLD)), "pairs": len(ok)})
    return rows


def control_share(clip: Path, models_dir=None, every: int = 3) -> dict:
    import av

    from .. import weights
    from ..faces.align import arcface_crop
    from ..faces.detect import Detector
    from ..generator.embedder import IdentityEmbedder

    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", models_dir), det_thresh=0.5)
    emb = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", models_dir))
    cos = []
    with av.open(str(clip)) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i % every:
                continue
            img = fr.to_ndarray(format="rgb24")
            for kps in det.detect(img).kps:
                crop = arcface_crop(img, kps)
                e = emb.embed([crop, face_removed(crop)])
                cos.append(float(e[0] @ e[1]))
    cos = np.asarray(cos)
    return {"clip": clip.name, "faces": len(cos), "control_verified": int((cos >= VERIFY_THRESHOLD).sum()),
            "control_cos_mean": float(cos.mean()) if len(cos) else None}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["far-by-size"]:
        from .measures import DEFAULT_LFW

        print(json.dumps(far_by_size(Path(argv[1]) if len(argv) > 1 else Path(DEFAULT_LFW)), indent=1))
    elif argv[:1] == ["clips"] and len(argv) > 1:
        for p in argv[1:]:
            print(json.dumps(control_share(Path(p))))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
