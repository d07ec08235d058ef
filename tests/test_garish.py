"""Garish-face measure (deidcli/research/garish.py): crops of real shared-clip frames, edited the way the
generator fails (black blotches, a yellow-green nose) or obscured the way deid's fallbacks do
(blur, pixelate), and deid evaluate-video end to end against a blur output."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from conftest import VIDEOS, cut_clip

REPO = Path(__file__).resolve().parents[1]

# (clip, frame index): a 512x512 talking head (face about 290 px high) and the left face of the
# two-person 720p clip (about 140 px high)
FRAMES = [("lp_d12.mp4", 30), ("ghost_2person.mp4", 30)]


def _frame_and_face(name: str, index: int):
    from deidcli import weights
    from deidcli.research.measures import upright_frames
    from deidcli.faces.detect import Detector

    for i, (img, _) in enumerate(upright_frames(VIDEOS / name)):
        if i == index:
            break
    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx"), det_thresh=0.5, det_size=640)
    d = det.detect(img)
    assert len(d) >= 1
    k = int(np.argmin(d.boxes[:, 0]))  # the leftmost face
    return img, SimpleNamespace(box=d.boxes[k].copy(), kps=d.kps[k].copy())


@pytest.fixture(scope="module", params=FRAMES, ids=[f"{n[:-4]}@{i}" for n, i in FRAMES])
def face(request, shared):
    return _frame_and_face(*request.param)


def _assess(img_in, img_out, face, **kw):
    from deidcli.faces.align import arcface_crop
    from deidcli.research.garish import assess, box_region

    return assess(arcface_crop(img_in, face.kps), arcface_crop(img_out, face.kps),
                  box_region(img_in, face.box), box_region(img_out, face.box), **kw)


def _iod(face) -> float:
    return float(np.linalg.norm(face.kps[1] - face.kps[0]))


# ----------------------------------------------------------------------------- unit tests


def test_unchanged_and_recompressed_faces_are_not_garish(face):
    img, f = face
    v = _assess(img, img, f)
    assert v.kind == "unchanged" and not v.garish, v
    # a lossy copy of the frame (JPEG quality 60): changed pixels, same face
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 60])
    jpg = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])
    v = _assess(img, jpg, f, unchanged_mad=0.0)  # judged as if it had been replaced
    assert v.kind == "generated" and not v.garish, v


def test_black_blotch_over_the_eyes_is_garish(face):
    img, f = face
    out = img.copy()
    iod = _iod(f)
    for x, y in f.kps[:2]:  # a black patch over each eye and the cheek under it
        cv2.ellipse(out, (int(x), int(y + 0.15 * iod)), (int(0.35 * iod), int(0.3 * iod)), 0, 0, 360,
                    (12, 10, 10), -1)
    v = _assess(img, out, f, unchanged_mad=0.0)  # see test_yellow_green_nose_is_garish
    assert v.kind == "generated" and v.garish and "blotch" in v.reasons, v


def test_yellow_green_nose_is_garish(face):
    img, f = face
    out = img.copy()
    x, y = f.kps[2]
    cv2.circle(out, (int(x), int(y)), int(0.3 * _iod(f)), (170, 215, 40), -1)
    # the rest of the face is left as it was (mean difference under UNCHANGED_MAD): judge it as a
    # replaced face, as the generator's would be
    v = _assess(img, out, f, unchanged_mad=0.0)
    assert v.kind == "generated" and v.garish and "colour" in v.reasons, v
    # (it is also lighter than anything on the input face, so it may count as a bright blotch too)


def test_gaussian_blurred_face_is_blurred_not_garish(face):
    img, f = face
    x0, y0, x1, y1 = f.box.astype(int)
    out = img.copy()
    sigma = (x1 - x0) / 8.0
    out[:, :] = cv2.GaussianBlur(img, (0, 0), sigma)  # the whole frame: no seam inside the crop
    v = _assess(img, out, f)
    assert v.kind == "blurred" and not v.garish, v


def test_pixelated_face_is_pixelated_not_garish(face):
    from deidcli.faces.methods import apply_classic

    img, f = face
    out = img.copy()
    apply_classic(out, [f], "pixelate", 0.2)
    v = _assess(img, out, f)
    assert v.kind == "pixelated" and not v.garish, v


def test_lost_counts_only_for_large_sharp_faces(face):
    img, f = face
    out = img.copy()
    x, y = f.kps[2]
    cv2.circle(out, (int(x), int(y)), int(0.1 * _iod(f)), (120, 90, 80), -1)  # a small, plausible change
    kw = {"unchanged_mad": 0.0}
    assert not _assess(img, out, f, **kw).garish
    assert _assess(img, out, f, lost=True, height=100.0, **kw).reasons == ("lost",)
    assert not _assess(img, out, f, lost=True, height=30.0, **kw).garish  # too small to count


def test_a_face_under_its_neighbours_cover_is_judged_as_occluded(face):
    """A face half behind another (the stress set's crowd_1080: 90% under the front face's box)
    comes out under the front face's blur: no detail, the front face's colour. Alone it is
    "generated" and garish for that colour; occluded it is blurred. And a generated face the
    detector misses under its neighbour's cover is not "lost"."""
    from deidcli.research.garish import OCCLUDED_SHARE, occluded_share

    img, f = face
    x0, y0, x1, y1 = f.box.astype(int)
    out = img.copy()
    out[:, :] = cv2.GaussianBlur(img, (0, 0), (x1 - x0) / 8.0)
    out[y0:y1, x0:x1] = np.clip(out[y0:y1, x0:x1].astype(int) + 45, 0, 255).astype(np.uint8)  # a lighter face
    alone = _assess(img, out, f)
    assert alone.kind == "generated" and alone.garish, alone
    assert _assess(img, out, f, occluded=True).kind == "blurred"
    # missed by the detector: lost alone, not under a neighbour's cover
    v = _assess(img, img, f, unchanged_mad=-1.0, lost=True, height=100.0)
    assert v.reasons == ("lost",), v
    assert not _assess(img, img, f, unchanged_mad=-1.0, lost=True, height=100.0, occluded=True).garish
    # the share of a box other boxes cover (their union, not their sum)
    box = np.array([0.0, 0.0, 100.0, 100.0])
    assert occluded_share(box, []) == 0.0
    assert occluded_share(box, [np.array([50.0, 0, 200, 100])]) == 0.5
    assert occluded_share(box, [np.array([50.0, 0, 200, 100]), np.array([60.0, 0, 200, 100])]) == 0.5
    assert occluded_share(box, [np.array([-10.0, 80, 50, 200]), np.array([50.0, 0, 200, 100])]) == 0.6
    assert 0 < OCCLUDED_SHARE < 0.3  # crowd_4k's generated face under a passing face's blur: 0.29


def test_size_bins():
    from deidcli.research.garish import size_bin, size_bin_names

    assert size_bin_names() == ["<48", "48-96", "96-192", ">=192"]
    assert [size_bin(h) for h in (10, 47.9, 48, 95, 96, 191, 192, 900)] == \
        ["<48", "<48", "48-96", "48-96", "96-192", "96-192", ">=192", ">=192"]


# ----------------------------------------------------------------------------- end to end


def test_evaluate_video_counts_blurred_faces_and_no_garish(shared, tmp_path):
    from deidcli.research.evaluate_video import evaluate_video
    from deidcli.research.video_report import to_markdown

    src = cut_clip(VIDEOS / "ghost_2person.mp4", tmp_path / "two.mp4", 0.4, audio=False)
    out = tmp_path / "two_blur.mp4"
    env = dict(os.environ, DEID_MODELS_DIR=os.environ.get("DEID_MODELS_DIR", str(VIDEOS.parent / "models")))
    r = subprocess.run([sys.executable, "-m", "deidcli.cli", "anonymize", str(src), str(out), "--method", "blur",
                        "--overwrite", "-q"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    strip = tmp_path / "strip.png"
    res = evaluate_video(src, out, strip_png=strip)
    assert res["faces"] > 0
    assert res["faces_blurred"] > 0.9 * res["faces"], res
    assert res["garish_faces"] == 0 and res["garish_frac"] == 0.0, res
    assert res["faces_pixelated"] == 0
    by = res["garish_by_size"]
    assert sum(b["faces"] for b in by.values()) == res["faces"]
    assert sum(b["blurred"] for b in by.values()) == res["faces_blurred"]
    t = res["per_track"][0]
    assert {"garish_faces", "garish_frac", "faces_blurred", "faces_pixelated", "faces_generated",
            "garish_colour", "garish_blotch", "garish_lost"} <= set(t)
    md = to_markdown(res)
    assert "| garish |" in md and "fallback" in md
    assert strip.is_file()
