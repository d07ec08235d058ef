"""Generator passes and the identity check of `deid anonymize --method generate`."""

import json

import numpy as np
import pytest
import torch

from conftest import decode_rgb, frame_pts
from test_cli import run

from deidcli.generator.embedder import IdentityEmbedder
from deidcli.generator.engine import GeneratorRunner, eye_pass_weight, later_pass_weight, resolve_runtime
from deidcli.pipeline.pipeline import CALM_FACES
from deidcli.generator.model import Generator


@pytest.mark.parametrize("backend,first_pass_mouth", [("onnxruntime", True), ("torch", True), ("onnxruntime", False)])
def test_passes_compose_to_one_raw_and_mask(backend, first_pass_mouth):
    """k passes returned as one (raw, mask) pair equal k explicit blend-and-rerun steps (the later
    passes' masks scaled by the runner's later-pass weight when it keeps the first pass's mouth)."""
    torch.manual_seed(0)
    gen = Generator({"size": 64, "margin": 0.2, "mask_bias": 0.0}).eval()
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    desc = rng.normal(size=(6, 128)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    runner = GeneratorRunner(gen, resolve_runtime("cpu"), batch_size=4, backend=backend,
                             first_pass_mouth=first_pass_mouth)
    later = later_pass_weight(64, 0.2)[0, 0] if first_pass_mouth else np.ones((64, 64), np.float32)
    assert later.max() == 1 and (later.min() == 0) == first_pass_mouth

    def blend(raw, mask, under):
        return mask[..., None] * raw + (1 - mask[..., None]) * under

    raw1, mask1 = runner.run(crops, desc)
    for k in (2, 3):
        raw, mask = runner.run(crops, desc, passes=k)
        assert raw.dtype == np.uint8 and mask.dtype == np.float32 and mask.shape == (6, 64, 64)
        x = crops.astype(np.float32)
        for i in range(k):  # explicit, rounding to uint8 between passes
            r, m = runner.run(np.rint(x).clip(0, 255).astype(np.uint8), desc)
            x = blend(r, m * (later if i else 1), x)
        got = blend(raw.astype(np.float32), mask, crops.astype(np.float32))
        # uint8 rounding between the explicit passes: a fraction of a grey level on average
        assert np.abs(got - x).mean() < 0.5 and np.abs(got - x).max() < 4
        assert mask.mean() > mask1.mean()  # the union of the masks grows
    mixed_raw, mixed_mask = runner.run(crops, desc, passes=np.array([1, 2, 1, 2, 1, 2]))
    raw2, mask2 = runner.run(crops, desc, passes=2)
    np.testing.assert_array_equal(mixed_raw[0::2], raw1[0::2])
    np.testing.assert_allclose(mixed_mask[1::2], mask2[1::2], atol=1e-6)
    with pytest.raises(ValueError):
        runner.run(crops, desc, passes=0)


def _two_lfw_faces():
    """Two real LFW crops, random unit descriptors, the shipped generator and the CPU runtime, and
    ``out(runner, k)``: the k-pass blended crops (float) of a runner on them."""
    from conftest import aligned_lfw_crops

    from deidcli.generator.model import load_generator
    from deidcli.weights import generator_path

    crops = aligned_lfw_crops(["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Gwyneth_Paltrow/Gwyneth_Paltrow_0001.jpg"])
    rng = np.random.default_rng(1)
    desc = rng.normal(size=(2, 128)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)

    def out(runner, k):
        raw, mask = runner.run(crops, desc, passes=k)
        return mask[..., None] * raw + (1 - mask[..., None]) * crops

    return crops, desc, load_generator(generator_path(None), device="cpu"), resolve_runtime("cpu"), out


def test_later_passes_keep_the_first_pass_mouth():
    """Shipped generator, real LFW faces: with first_pass_mouth (the default) 3 passes leave the
    mouth box exactly as the first pass drew it and still change the eyes further; with
    --every-pass-mouth the mouth changes too."""
    from deidcli.faces.align import CROP_MARGIN, CROP_SIZE, crop_template, mouth_box

    crops, desc, gen, rt, out = _two_lfw_faces()
    keep = GeneratorRunner(gen, rt, colour_match=False)
    redraw = GeneratorRunner(gen, rt, colour_match=False, first_pass_mouth=False)
    one, kept, redrawn = out(keep, 1), out(keep, 3), out(redraw, 3)
    core = later_pass_weight(CROP_SIZE, CROP_MARGIN)[0, 0] == 0  # the mouth box, inside its soft edge
    assert core.sum() > 200 and mouth_box(CROP_SIZE, CROP_MARGIN)[core].min() == 1
    assert np.abs(kept - one)[:, core].max() < 1.0  # rounding of the composed raw to uint8
    assert np.abs(redrawn - one)[:, core].mean() > 2.0
    t = np.round(crop_template(CROP_SIZE, CROP_MARGIN)).astype(int)
    eyes = np.zeros((CROP_SIZE, CROP_SIZE), bool)
    for x, y in t[:2]:
        eyes[y - 6:y + 7, x - 8:x + 9] = True
    assert np.abs(kept - one)[:, eyes].mean() > 2.0


def test_eye_pass_changes_only_the_eyes_and_brows():
    """--eye-pass, shipped generator, real LFW faces: one run more whose change stays inside the
    eye band (align.eye_band, softened): outside it the face is the one-pass face (to uint8
    rounding), inside it the eyes change further; on top of 2 passes likewise; and it equals
    the explicit extra run, blended with its mask times the eye weight."""
    from deidcli.faces.align import CROP_MARGIN, CROP_SIZE, eye_band

    crops, desc, gen, rt, out = _two_lfw_faces()
    plain = GeneratorRunner(gen, rt, colour_match=False)
    eyed = GeneratorRunner(gen, rt, colour_match=False, eye_pass=True)
    w = eye_pass_weight(CROP_SIZE, CROP_MARGIN)[0, 0]
    x0, y0, x1, y1 = eye_band(CROP_SIZE, CROP_MARGIN)
    assert w[y0:y1, x0:x1].min() > 0.25 and w.max() == 1  # its corners are softened
    outside, inside = w == 0, w == 1
    assert outside.sum() > 0.6 * w.size and inside.sum() > 0.5 * (x1 - x0) * (y1 - y0)
    for k in (1, 2):
        base, more = out(plain, k), out(eyed, k)
        assert np.abs(more - base)[:, outside].max() < 1.0, k  # rounding of the composed raw to uint8
        assert np.abs(more - base)[:, inside].mean() > 2.0, k
    # the explicit extra run on the one-pass face
    one = np.rint(out(plain, 1)).clip(0, 255).astype(np.uint8)
    r, m = plain.run(one, desc)
    explicit = (m * w)[..., None] * r + (1 - (m * w)[..., None]) * one
    assert np.abs(out(eyed, 1) - explicit).mean() < 0.5


def _report(args):
    p = run("anonymize", *args, "--json", check=0)
    return json.loads(p.stdout)["files"][0]


def test_identity_check_regenerates_then_blurs(clips, tmp_path):
    """A check threshold every face fails: faces get one more pass, then are blurred; the
    result is the same picture as --method blur. A threshold no face reaches changes nothing."""
    src = clips["talking"]
    forced = tmp_path / "forced.mp4"
    f = _report((src, forced, "--check-thresh", "-1", "--max-passes", "2", "--large-passes", "1", "--crf", "0"))
    n = f["faces_anonymized"]
    # the first batch is generated again at 2 passes, fails again and is blurred; each failed face
    # holds its track on the fallback for --pass-hold faces, so later faces are not generated at all
    assert n > 0 and 0 < f["faces_regenerated"] < n
    assert 0 < f["faces_blurred_fallback"] < n and f["face_paths"] == {"check": n}
    assert f["faces_checked"] == f["faces_blurred_fallback"] + f["faces_regenerated"]
    assert f["track_passes"] and set(f["track_passes"].values()) == {2}
    blurred = tmp_path / "blur.mp4"
    _report((src, blurred, "--method", "blur", "--crf", "0"))
    a, b = decode_rgb(forced), decode_rgb(blurred)
    assert len(a) == len(b) == len(frame_pts(src))
    assert max(np.abs(x.astype(int) - y).mean() for x, y in zip(a, b)) < 0.05

    never = _report((src, tmp_path / "never.mp4", "--check-thresh", "1"))
    # calm tracks (CALM_FACES checks in a row well under the threshold) are checked every other face
    n = never["faces_anonymized"]
    assert never["faces_checked"] + never["faces_check_skipped"] == n > 0
    assert 0 < never["faces_check_skipped"] <= (n - CALM_FACES) // 2 + 1
    assert never["faces_regenerated"] == never["faces_blurred_fallback"] == 0
    assert never["face_paths"] == {"generated": never["faces_anonymized"]}
    assert never["track_passes"] == {}
    assert never["check_cos_max"] < 1

    off = _report((src, tmp_path / "off.mp4", "--no-identity-check", "--passes", "2"))
    assert off["faces_checked"] == 0 and off["check_cos_max"] is None


def test_passes_above_max_passes_is_a_usage_error(clips, tmp_path):
    p = run("anonymize", clips["talking"], tmp_path / "o.mp4", "--passes", "3", "--max-passes", "2")
    assert p.returncode == 2 and "passes" in p.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_evaluate_method_names():
    from deidcli.research.evaluate import _method_passes

    assert [_method_passes(m) for m in ("generate", "generate:3", "blur", "pixelate")] == [1, 3, 0, 0]
    for bad in ("generate:0", "generate:x", "sharpen"):
        with pytest.raises(ValueError):
            _method_passes(bad)
    p = run("evaluate", "--methods", "generate:0")
    assert p.returncode == 2 and "generate:0" in p.stderr


def test_pass_levels_hold_then_return():
    """--pass-hold: a track raised by the check keeps its count for `hold` faces after the last
    raise, then steps down one pass per `hold` faces to --passes; hold 0 keeps it for good. The
    peak is what is reported."""
    from deidcli.pipeline.report import PassLevels

    lv = PassLevels(base=1, hold=2)
    assert [lv.take(7) for _ in range(2)] == [1, 1] and lv.peak == {}
    lv.raise_to(7, 1)  # at base: nothing to hold
    assert lv.get(7) == 1 and lv.peak == {}
    lv.raise_to(7, 3)
    assert lv.get(7) == 3 and lv.get(8) == 1  # other tracks untouched
    # held 2 faces, then one pass down per 2 faces
    assert [lv.take(7) for _ in range(6)] == [3, 3, 2, 2, 1, 1]
    assert lv.faces_raised == 4 and lv.peak == {7: 3}
    lv.raise_to(7, 2)
    assert lv.take(7) == 2
    lv.raise_to(7, 2)  # a raise restarts the hold
    assert [lv.take(7) for _ in range(3)] == [2, 2, 1]
    assert lv.peak == {7: 3} and lv.faces_raised == 4 + 1 + 2

    keep = PassLevels(base=1, hold=0)
    keep.raise_to(0, 2)
    assert [keep.take(0) for _ in range(50)] == [2] * 50 and keep.faces_raised == 50

    from deidcli.options import AnonymizeOptions
    with pytest.raises(ValueError, match="pass_hold"):
        AnonymizeOptions(pass_hold=-1)


def test_colour_match_gives_the_input_colours_and_keeps_shapes():
    """--colour-match (GeneratorRunner(colour_match=True), align.match_colour), shipped generator,
    8 real LFW DevTest faces, and the same faces under a red stage light: under the mask the
    generator's own output is several CIELAB units lighter than the input; matched, the lightness
    means agree within 2, the chroma is the input's own (low-passed), no output pixel has a chroma
    outside the input face's range, and the lightness follows the generator's (shapes, hence the
    new identity, kept). mode "stats" is a per-channel affine map of the raw. No mask leaves raw
    as is."""
    import cv2

    from conftest import LFW, MODELS, aligned_lfw_crops
    from deidcli import weights
    from deidcli.faces.colour import CHROMA_SIGMA, match_colour
    from deidcli.faces.align import arcface_squares
    from deidcli.generator.model import load_generator
    from deidcli.research.train.prepare import read_people

    if not (LFW / "peopleDevTest.txt").is_file():
        pytest.skip("../shared LFW missing")
    people = read_people(LFW / "peopleDevTest.txt")[:8]
    crops = aligned_lfw_crops([f"{p}/{p}_0001.jpg" for p, _ in people])
    red = np.clip(crops * np.array([1.0, 0.3, 0.28]) + [25, 0, 5], 0, 255).astype(np.uint8)
    desc = IdentityEmbedder(MODELS / "rec_mobilefacenet.onnx", precision="fp32").embed(arcface_squares(crops))
    gen = load_generator(weights.generator_path(None), device="cpu")
    rt = resolve_runtime("cpu")
    raw0, mask0 = GeneratorRunner(gen, rt).run(crops, desc)

    def lab(x):
        return cv2.cvtColor(x, cv2.COLOR_RGB2LAB).astype(np.float32)

    def mean_under(x, m):
        return (lab(x) * m[..., None]).sum((0, 1)) / m.sum()

    d0 = np.array([mean_under(r, m) - mean_under(c, m) for r, c, m in zip(raw0, crops, mask0)])
    assert np.abs(d0[:, 0]).mean() > 3, d0  # the generator's own colours: lighter
    for inp in (crops, red):
        raw1, mask1 = GeneratorRunner(gen, rt, colour_match=True).run(inp, desc)
        d1 = np.array([mean_under(r, m) - mean_under(c, m) for r, c, m in zip(raw1, inp, mask1)])
        assert np.abs(d1[:, 0]).max() < 2.0, d1
        sigma = inp.shape[1] * CHROMA_SIGMA
        for r1, c, m, r0 in zip(raw1, inp, mask1, raw0):
            sel = m > 0.5
            chroma_in = cv2.GaussianBlur(lab(c)[..., 1:], (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
            assert np.abs(lab(r1)[..., 1:][sel] - chroma_in[sel]).mean() < 2.0  # the input's chroma
            lo, hi = lab(c)[..., 1:][sel].min(0), lab(c)[..., 1:][sel].max(0)
            assert (lab(r1)[..., 1:][sel] >= lo - 4).all() and (lab(r1)[..., 1:][sel] <= hi + 4).all()
            if inp is crops:  # the generator saw the same face: its lightness is the generator's
                assert np.corrcoef(lab(r0)[..., 0][sel], lab(r1)[..., 0][sel])[0, 1] > 0.9
    raw1 = np.stack([match_colour(r, c, m, mode="stats") for r, c, m in zip(raw0, crops, mask0)])
    for r0, r1, m in zip(raw0, raw1, mask0):
        sel = (m > 0.5) & ~((r1 == 0) | (r1 == 255)).any(-1)  # not clipped to the uint8 range
        for ch in range(3):
            x, y = lab(r0)[..., ch][sel], lab(r1)[..., ch][sel]
            if x.std() > 1:
                assert np.corrcoef(x, y)[0, 1] > 0.98
    r = raw0[0]
    assert match_colour(r, crops[0], np.zeros(mask0[0].shape, np.float32)) is r


@pytest.mark.parametrize("check_thresh", [0.0, 1.0])
def test_finish_writes_what_the_check_saw(check_thresh):
    """Pipeline.finish writes the pixels the identity check embedded (its pasted_region) instead of
    pasting again; the frames must equal pasting every face's final raw and mask in order, also
    where a face overlaps one pasted before it in the same frame (there the region the check saw is
    stale and the face is pasted again) and where faces were regenerated (threshold 0: most are).
    The faces the check gave the fallback are covered after every paste, and a pasted face a paste
    or a cover overlaps is looked at again on the frame as they left it (at threshold 0 it fails
    and is covered too, last)."""
    import copy
    from pathlib import Path

    from conftest import MODELS, VIDEOS
    from deidcli.faces.align import paste
    from deidcli.pipeline.pipeline import Pipeline
    from deidcli.pipeline.report import new_check_stats
    from deidcli.faces.methods import apply_classic
    from deidcli.options import AnonymizeOptions

    p = Pipeline(AnonymizeOptions(models_dir=MODELS, check_thresh=check_thresh, batch_size=8))
    frames = decode_rgb(VIDEOS / "ghost_2person.mp4", 4)
    tracked = list(p.detect_and_track(iter([type("VF", (), {"index": i, "image": im})() for i, im in enumerate(frames)]),
                                      type("R", (), {})(), 25.0))
    items = [(vf.image, list(faces)) for vf, faces in tracked]
    assert sum(len(f) for _, f in items) == 8
    shifted = copy.copy(items[0][1][0])  # a second face over the first one's, in frame 0
    shifted.kps = shifted.kps + np.float32([12, 6])
    shifted.box = shifted.box + np.float32([12, 6, 12, 6])
    items[0][1].append(shifted)
    descriptors, passes, stats = {}, p.new_pass_levels(), new_check_stats()
    got = [(im.copy(), faces) for im, faces in items]
    seen = {}
    check = p._check_identity

    def spy(*a, **k):  # which faces the check gave the fallback
        seen["fallback"] = check(*a, **k)
        seen["checked"] = seen["fallback"].copy()  # finish adds the second look's to the first
        return seen["fallback"]

    p._check_identity = spy
    gen = p.generate(got, descriptors, passes=passes)
    rects = p.finish(got, gen, passes=passes, stats=stats)
    assert stats["checked"] >= 9 and (stats["regenerated"] > 0) == (check_thresh == 0.0)
    checked, fallback = seen["checked"], seen["fallback"]
    again = fallback & ~checked  # failed the second look
    assert stats["fallback"] == checked.sum() and stats["overlap_failed"] == again.sum()
    assert check_thresh == 0.0 or not fallback.any()
    assert again.any() == (check_thresh == 0.0)  # the covered face and the one over it, at 0
    want = [im.copy() for im, _ in items]
    for (i, M, f), r, m, fb in zip(gen.jobs, gen.raw, gen.masks, checked):
        if not fb:
            paste(want[i], r, m, M, p.detail)
    for failed in (checked, again):  # the fallback after the pastes: nothing is pasted over it
        for (i, M, f), fb in zip(gen.jobs, failed):
            if fb:
                apply_classic(want[i], [f], "blur", p.options.margin, [g.box for g in items[i][1] if g is not f])
    for (g, _), w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    n0 = sum(1 for (i, _, _), a in zip(gen.jobs, again) if a and i == 0)
    assert len(rects[0]) == 3 + n0 and rects[0][0][0] < rects[0][2][2] and rects[0][2][0] < rects[0][0][2]


def test_first_generator_batches_ramp_up_to_batch_size():
    """Pipeline.process_frames sends the generator a quarter of --batch-size first, then twice as
    many each time up to --batch-size (so later stages start early); every face is rendered once."""
    from conftest import MODELS, VIDEOS
    from deidcli.pipeline.pipeline import FIRST_BATCH_DIVISOR, Pipeline
    from deidcli.pipeline.report import FileResult
    from deidcli.options import AnonymizeOptions

    p = Pipeline(AnonymizeOptions(models_dir=MODELS, batch_size=8))
    sizes = []
    generate = p.generate

    def recording(items, *a, **k):
        sizes.append(sum(len(faces) for _, faces in items))
        return generate(items, *a, **k)

    p.generate = recording
    frames = [type("VF", (), {"index": i, "image": im})() for i, im in enumerate(decode_rgb(VIDEOS / "ghost_2person.mp4", 14))]
    res = FileResult(input="in", output="out")
    out = list(p.process_frames(iter(frames), res, 25.0, threads=False))
    assert FIRST_BATCH_DIVISOR == 4
    assert [len(out), res.faces_anonymized] == [14, 28]
    assert sizes == [2, 4, 8, 8, 6], sizes  # two faces a frame: 8 // 4, then doubling, the rest


def test_a_calm_track_with_one_face_a_batch_is_still_checked_every_other_face():
    """In a crowd a generator batch (32 faces) holds about one face of each track. Counted within
    the batch, a calm track came to the same parity in every batch and was never checked again
    (stress set crowd_4k: a face left verified at 0.58 in its last 9 frames); counted across
    batches it is checked on every other face, however the faces fall into batches."""
    from deidcli.pipeline.pipeline import CALM_FACES, calm_skips

    calm, turn = {"a": CALM_FACES, "b": CALM_FACES - 1}, {}
    checked = {"a": 0, "b": 0}
    for _ in range(10):  # ten batches, one face of each track in each
        skip = calm_skips(["a", "b"], calm, turn)
        for t, s in zip(("a", "b"), skip):
            checked[t] += not s
    assert checked == {"a": 5, "b": 10}  # b is not calm: every face checked
    turn.clear()
    skip = calm_skips(["a"] * 4 + ["b"] * 2, calm, turn)  # several faces a batch: every other one
    assert skip.tolist() == [True, False, True, False, False, False]
    skip = calm_skips(["a", "a"], calm, turn, behind=[0])  # generated again at a raised count: checked
    assert skip.tolist() == [False, True]
    calm["a"] = 0  # no longer calm: its count starts again
    assert not calm_skips(["a"], calm, turn).any() and "a" not in turn
