"""Alignment geometry, pasting and the classic methods (pure functions; synthetic arrays, and a
real frame where what is measured is the look of a face)."""

import cv2
import numpy as np
import pytest

from deidcli.faces.align import (ARCFACE_112, arcface_box, arcface_crop, arcface_squares, crop_template,
                                 estimate_transform, feather, paste, pasted_arcface, warp_crop)
from deidcli.faces.methods import apply_classic, ellipse_mask


class F:
    def __init__(self, box, kps=None):
        self.box = np.asarray(box, np.float32)
        self.kps = kps


def test_template_keeps_arcface_inside_central_square():
    t = crop_template(128, 0.2)
    off, side = arcface_box(128, 0.2)
    # mapping the central square back to 112 gives the ArcFace template exactly
    np.testing.assert_allclose((t - off) / side * 112, ARCFACE_112, atol=1e-3)


def test_transform_maps_landmarks_to_template():
    rng = np.random.default_rng(0)
    t = crop_template(128, 0.2)
    # a rotated, scaled, shifted copy of the template in a frame
    a, s = np.deg2rad(20), 2.5
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * s
    kps = (t @ R.T + [300, 200]).astype(np.float32) + rng.normal(0, 0.01, (5, 2)).astype(np.float32)
    M = estimate_transform(kps, 128, 0.2)
    back = kps @ M[:, :2].T + M[:, 2]
    np.testing.assert_allclose(back, t, atol=0.1)


def test_paste_changes_only_masked_pixels():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    orig = img.copy()
    kps = crop_template(128, 0.2) * 0.8 + [100, 60]
    M = estimate_transform(kps, 128, 0.2)
    crop = np.full((128, 128, 3), 7, np.uint8)
    mask = np.zeros((128, 128), np.float32)
    mask[40:90, 40:90] = 1
    box = paste(img, crop, feather(mask, 128), M)
    changed = np.any(img != orig, axis=2)
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = box
    assert changed.sum() > 1000
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    # where the mask is fully on, the pixel is the crop's
    inv = np.linalg.inv(np.vstack([M, [0, 0, 1]]))
    px, py, _ = inv @ [65, 65, 1]
    assert np.all(img[int(round(py)), int(round(px))] == 7)
    # nothing outside the returned rectangle changed, and pixels far from the mask are untouched
    assert not changed[:y0].any() and not changed[y1:].any()


def test_paste_keeps_the_frames_detail(shared):
    """--keep-detail (paste with detail=256 for the 128 px generator): the first frame of lp_d13
    (a face ~375 px wide), shipped generator, colour matched. Pasting the upscaled crop leaves the
    face with 22% of the input's fine detail (mean |Laplacian| where the mask is full: 1.39 vs
    6.30); pasting the change against the frame's own 256 px crop keeps 99% (6.22). At the crop's
    resolution the two pastes are the same face (0.6 grey levels apart, 3.8 from the input);
    outside the mask nothing changes; a crop equal to the frame's own leaves it bit-identical;
    pasted_arcface is what the paste leaves."""
    import cv2

    from conftest import MODELS, VIDEOS, decode_rgb
    from deidcli import weights
    from deidcli.generator.embedder import IdentityEmbedder
    from deidcli.generator.engine import GeneratorRunner, resolve_runtime
    from deidcli.faces.detect import Detector
    from deidcli.generator.model import load_generator

    img = decode_rgb(VIDEOS / "lp_d13.mp4", 1)[0]
    kps = Detector(MODELS / "det_scrfd_2.5g_kps.onnx").detect(img).kps[0]
    M = estimate_transform(kps, 128, 0.2)
    crop = warp_crop(img, M, 128)
    desc = IdentityEmbedder(MODELS / "rec_mobilefacenet.onnx", precision="fp32").embed(
        arcface_squares(crop[None]))
    gen = load_generator(weights.generator_path(None), device="cpu")
    raw, mask = GeneratorRunner(gen, resolve_runtime("cpu"), colour_match=True).run(crop[None], desc)
    m = feather(mask[0], 128)
    plain, detail = img.copy(), img.copy()
    paste(plain, raw[0], m, M)
    paste(detail, raw[0], m, M, detail=256)

    full = cv2.warpAffine(m, M, img.shape[1::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)

    def fine(x):
        g = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return float(np.abs(cv2.Laplacian(g, cv2.CV_32F))[full > 0.9].mean())

    assert (full > 0.9).sum() > 50_000
    assert fine(plain) < 0.4 * fine(img), (fine(plain), fine(img))
    assert 0.8 * fine(img) < fine(detail) < 1.25 * fine(img), (fine(detail), fine(img))

    def at_crop(x):
        return warp_crop(x, M, 128).astype(np.float32)

    assert np.abs(at_crop(detail) - at_crop(plain)).mean() < 1.0, np.abs(at_crop(detail) - at_crop(plain)).mean()
    assert np.abs(at_crop(plain) - at_crop(img)).mean() > 3.0
    assert np.array_equal(detail[full == 0], img[full == 0]) and np.array_equal(plain[full == 0], img[full == 0])
    M2 = estimate_transform(kps, 256, 0.2)
    same = img.copy()
    m2 = feather(cv2.resize(mask[0], (256, 256)), 256)
    paste(same, warp_crop(img, M2, 256), m2, M2, detail=256)
    assert np.array_equal(same, img)
    for d, out in ((0, plain), (256, detail)):
        np.testing.assert_array_equal(pasted_arcface(img, raw[0], m, M, kps, d), arcface_crop(out, kps))


@pytest.mark.parametrize("method", ["blur", "pixelate", "solid"])
@pytest.mark.parametrize("scale", [1, 2])
def test_classic_methods_change_only_the_ellipse(method, scale):
    """Each method changes its face's ellipse at --margin and nothing else, for an 80 px face (a
    small face's blur is flattened) and a 160 px one."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (200 * scale, 300 * scale, 3), dtype=np.uint8)
    orig = img.copy()
    face = F(np.float32([100, 50, 160, 130]) * scale)
    rects = apply_classic(img, [face], method, 0.25)
    assert len(rects) == 1
    (x0, y0, x1, y1), mask = ellipse_mask(img.shape, face.box, None, 0.25)
    changed = np.any(img != orig, axis=2)
    assert not changed[:y0].any() and not changed[y1:].any()
    assert not changed[:, :x0].any() and not changed[:, x1:].any()
    inside = changed[y0:y1, x0:x1][mask > 0]
    assert inside.mean() > 0.9  # the face area is really obscured
    assert not changed[y0:y1, x0:x1][mask == 0].any()  # corners of the box outside the ellipse untouched
    # obscured: high-frequency content gone (except solid which is constant)
    cx, cy = 130 * scale, 90 * scale
    patch = img[cy - 15:cy + 15, cx - 15:cx + 15].astype(float)
    assert np.abs(np.diff(patch, axis=1)).mean() < np.abs(np.diff(orig[cy - 15:cy + 15, cx - 15:cx + 15].astype(float), axis=1)).mean() / 3


def test_a_small_faces_blur_keeps_its_colour_and_a_quarter_of_the_contrast(shared):
    """Under SMALL_FACE px the blur keeps SMALL_KEEP of its variation about the face's own mean
    colour (CIELAB, 5/8 of the box about the landmarks); a face at SMALL_FACE px or more is
    blurred as before. A real face (ghost_2person, frame 0) shrunk to 60 px and to 120 px."""
    import cv2
    import deidcli.faces.methods as methods
    from conftest import MODELS, VIDEOS, decode_rgb
    from deidcli import weights
    from deidcli.faces.detect import Detector

    frame = decode_rgb(VIDEOS / "ghost_2person.mp4", 1)[0]
    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", MODELS), det_thresh=0.5)
    for px in (60, 120):
        faces = det.detect(frame)
        box = faces.boxes[np.argmax(faces.boxes[:, 3] - faces.boxes[:, 1])]
        s = px / float(max(box[2] - box[0], box[3] - box[1]))
        img = cv2.resize(frame, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        f = F(box * s, faces.kps[np.argmax(faces.boxes[:, 3] - faces.boxes[:, 1])] * s)
        outs = {}
        for keep in (methods.SMALL_KEEP, 1.0):
            out = img.copy()
            old = methods.SMALL_KEEP
            methods.SMALL_KEEP = keep
            try:
                apply_classic(out, [f], "blur", 0.25)
            finally:
                methods.SMALL_KEEP = old
            outs[keep] = out.astype(np.float32)
        (x0, y0, x1, y1), mask = ellipse_mask(img.shape, f.box, f.kps, 0.25)
        sel = mask > 0
        a, b = outs[methods.SMALL_KEEP][y0:y1, x0:x1][sel], outs[1.0][y0:y1, x0:x1][sel]
        ratio = a.std(0).mean() / b.std(0).mean()
        if px < methods.SMALL_FACE:
            assert 0.2 < ratio < 0.3, ratio  # a quarter of the blur's contrast
            bx0, by0, bx1, by1 = f.box
            qw, qh = (bx1 - bx0) * 5 / 16, (by1 - by0) * 5 / 16
            cx, cy = f.kps.mean(0)  # about the landmarks
            c = (slice(int(cy - qh) + 1, int(cy + qh)), slice(int(cx - qw) + 1, int(cx + qw)))
            lab = [cv2.cvtColor(im[c].astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3).mean(0)
                   for im in (outs[methods.SMALL_KEEP], img)]
            np.testing.assert_allclose(lab[0], lab[1], atol=1.5)  # its mean L*, a*, b* kept
        else:
            assert ratio == 1.0  # as before


def test_face_at_frame_edge_is_clipped():
    img = np.zeros((100, 100, 3), np.uint8) + 128
    rects = apply_classic(img, [F([-30, -30, 40, 40])], "solid", 0.25)
    x0, y0, x1, y1 = rects[0]
    assert x0 == 0 and y0 == 0 and x1 <= 100 and y1 <= 100
    assert (img[0, 0] == 0).all()


def test_a_small_faces_blur_is_not_flattened_over_another_face():
    """A flat patch laid over the face in front reads as paint: a small face whose ellipse reaches
    into another face's box keeps the plain blur (apply_classic's other faces, or ``others``)."""
    rng = np.random.default_rng(3)
    img = cv2.resize(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), (300, 200), interpolation=cv2.INTER_CUBIC)
    small, near, far = F([100, 50, 150, 110]), F([140, 60, 200, 130]), F([250, 140, 290, 190])

    def contrast(others=()):
        out = img.copy()
        apply_classic(out, [small], "blur", 0.25, others)
        (x0, y0, x1, y1), mask = ellipse_mask(img.shape, small.box, None, 0.25)
        return out[y0:y1, x0:x1][(mask > 0)].astype(np.float32).std(0).mean()

    flat, plain = contrast(), contrast([near.box])
    assert flat < 0.5 * plain, (flat, plain)
    assert contrast([far.box]) == flat  # a face clear of its ellipse changes nothing
    both, apart = img.copy(), img.copy()  # the frame's other faces in the same call count as others
    apply_classic(both, [small, near], "blur", 0.25)
    apply_classic(apart, [small], "blur", 0.25, [near.box])
    apply_classic(apart, [near], "blur", 0.25, [small.box])
    np.testing.assert_array_equal(both, apart)


def test_a_held_small_faces_blur_is_not_flattened():
    """A held face (a box kept before its track's first detection or moved on past its last) may
    not be where its box is: its blur stays plain, a flat patch there can be the background's
    colour (stress set crowd_lfw, frame 70)."""
    rng = np.random.default_rng(4)
    img = cv2.resize(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), (300, 200), interpolation=cv2.INTER_CUBIC)
    seen, held = F([100, 50, 150, 110]), F([100, 50, 150, 110])
    held.held = True
    outs = []
    for f in (seen, held):
        out = img.copy()
        apply_classic(out, [f], "blur", 0.25)
        (x0, y0, x1, y1), mask = ellipse_mask(img.shape, f.box, None, 0.25)
        outs.append(out[y0:y1, x0:x1][(mask > 0)].astype(np.float32).std(0).mean())
    assert outs[0] < 0.5 * outs[1], outs
