"""In the wild: the stress set's generator, which faces are generated and which get the fallback,
the tone matching that keeps a face's colours, and a face that starts weak in the first frame."""

import json

import numpy as np
import pytest

from conftest import VIDEOS, decode_rgb


# --- the stress set ---------------------------------------------------------------------------

def test_stress_clips_are_deterministic_and_look_as_named(shared, tmp_path):
    """Two makes of a clip decode to the same frames; the conditions do what they say."""
    from deidcli.research.measures import upright_frames
    from deidcli.research import stress

    names = stress.clip_names()
    assert {"mosaic2", "mosaic3", "mosaic4", "crowd_lfw", "cuts", "fadein"} <= set(names)
    assert all(f"mosaic3_{c}" in names for c in stress.CONDITIONS)
    a = stress.make_clip("mosaic2", tmp_path / "a.mp4", seed=3, seconds=0.2)
    stress.make_clip("mosaic2", tmp_path / "b.mp4", seed=3, seconds=0.2)
    fa = [x for x, _ in upright_frames(tmp_path / "a.mp4")]
    fb = [x for x, _ in upright_frames(tmp_path / "b.mp4")]
    assert len(fa) == len(fb) == a["frames"] == 6 and fa[0].shape == (720, 1280, 3)
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb))
    assert len(a["cells"]) == 4 and len({c["clip"] for c in a["cells"]}) == 4
    rng = np.random.default_rng(0)
    img = fa[0]
    grey = np.full((64, 64, 3), 128, np.uint8)  # -1.5 EV in linear light, then the lifted black level
    assert stress.apply_condition(grey, "dark", rng).mean() == pytest.approx(87, abs=1.5)
    red = stress.apply_condition(img, "red", rng).astype(float)
    assert red[..., 0].mean() > 2 * red[..., 1].mean()
    assert np.array_equal(stress.apply_condition(img, "crf35", rng), img)  # the encoder's part
    with pytest.raises(ValueError):
        stress.apply_condition(img, "fog", rng)


# --- routing ----------------------------------------------------------------------------------

def test_yaw_and_size_bins():
    from deidcli.pipeline.routing import size_bin, yaw

    frontal = np.array([[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]], float)
    turned = frontal.copy()
    turned[2, 0] = 60 + 0.8 * 40  # nose 0.8 eye distances off the middle of the eyes
    assert yaw(frontal) == pytest.approx(0.0)
    assert yaw(turned) == pytest.approx(0.8)
    assert yaw(np.array([[50, 50]] * 5, float)) == float("inf")  # eyes on one point: no face to draw
    assert [size_bin(h) for h in (10, 47.9, 48, 95, 96, 191, 192, 500)] == \
        ["<48", "<48", "48-96", "48-96", "96-192", "96-192", ">=192", ">=192"]


def test_router_decides_with_hysteresis_and_holds_after_a_failed_check():
    from deidcli.pipeline.routing import Router

    r = Router(min_generate=40, max_yaw=0.6, min_light=20, max_passes=4, small_max_passes=2, hold=3)
    assert r.decide(1, 39, 0, 100) == "small" and r.decide(2, 41, 0, 100) == "generated"
    # a track does not flip around the threshold: it must cross it by 10%
    assert r.decide(1, 42, 0, 100) == "small" and r.decide(1, 44.5, 0, 100) == "generated"
    assert r.decide(2, 37, 0, 100) == "generated" and r.decide(2, 35.9, 0, 100) == "small"
    assert r.decide(3, 100, 0.7, 100) == "turned" and r.decide(4, 100, 0.1, 10) == "dark"
    r.soft_fraction = 0.5  # a sharp face of 128 px or more is about 9 sharp: under 4.5 it is too soft to draw on
    assert r.decide(6, 400, 0.1, 100, sharp=4.0) == "soft" and r.decide(7, 400, 0.1, 100, sharp=5.0) == "generated"
    assert r.passes_for(95) == 2 and r.passes_for(96) == 4
    assert r.least_passes(128) == 1 and r.level(1, 128) == 1  # --large-passes 1: the track's count
    r.large_passes = 2  # faces of 128 px and more start at 2 passes, smaller ones at the track's count
    assert [r.level(1, h) for h in (95, 96, 127, 128)] == [1, 1, 1, 2]
    assert [r.level(3, h) for h in (95, 127, 128)] == [2, 3, 3]
    assert r.level(9, 500) == 4
    r.failed_check(5)
    assert [r.decide(5, 100, 0, 100) for _ in range(4)] == ["check"] * 3 + ["generated"]
    r.count("generated", 100)
    r.count("small", 30)
    r.count("small", 31)
    assert r.totals() == {"generated": 1, "small": 2} and r.counts["small"] == {"<48": 2}


def test_small_faces_get_the_fallback_and_are_counted(shared, tmp_path):
    """A face under --min-generate is blurred, not generated; the report says how many took each
    path, by size; --min-generate 0 generates it."""
    from conftest import cut_clip
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.options import AnonymizeOptions

    src = cut_clip(VIDEOS / "lp_d12.mp4", tmp_path / "in.mp4", 0.4, audio=False)  # a 512 px clip, face ~200 px
    big = anonymize(src, tmp_path / "big.mp4", AnonymizeOptions(min_generate=1000))["files"][0]
    n = big["faces_anonymized"]
    assert n > 0 and big["face_paths"] == {"small": n} and big["faces_checked"] == 0
    assert sum(sum(v.values()) for v in big["faces_by_size"].values()) == n
    anonymize(src, tmp_path / "blur.mp4", AnonymizeOptions(method="blur"))
    a, b = decode_rgb(tmp_path / "big.mp4"), decode_rgb(tmp_path / "blur.mp4")
    assert max(np.abs(x.astype(int) - y).mean() for x, y in zip(a, b)) < 0.5  # the blur fallback
    gen = anonymize(src, tmp_path / "gen.mp4", AnonymizeOptions(min_generate=0))["files"][0]
    assert gen["face_paths"].get("generated", 0) > 0 and "small" not in gen["face_paths"]


def test_large_faces_start_at_two_passes_and_an_independent_recognizer_no_longer_matches(shared, tmp_path):
    """lp_d12's first 2.4 s (a 512 px clip, its face about 290 px high): generated at one pass, an
    independent recognizer (dlib, not trained with by deid) still matches some faces to the
    person, though deid's own check passes them; at the default (--large-passes 2) it matches none
    and sits further from the person."""
    pytest.importorskip("dlib", reason="judge extra not installed (pip install 'deid-video[judge]')")
    from conftest import cut_clip
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research.evaluate_video import evaluate_video
    from deidcli.research.judges import load_judge

    src = cut_clip(VIDEOS / "lp_d12.mp4", tmp_path / "in.mp4", 2.4, audio=False)
    judge = load_judge("dlib")
    dist = {}
    for k in (1, 2):
        out = tmp_path / f"large{k}.mp4"
        f = anonymize(src, out, AnonymizeOptions() if k == 2 else AnonymizeOptions(large_passes=1))["files"][0]
        assert f["face_paths"] == {"generated": f["faces_anonymized"]}
        rows = []
        evaluate_video(src, out, judge=judge, judge_every=3,
                       face_hook=lambda face: rows.append(face["judge"]) if face["judge"] is not None else None)
        dist[k] = np.array(rows)
    assert len(dist[1]) >= 15 and len(dist[2]) == len(dist[1])
    assert (dist[1] < 0.6).any() and not (dist[2] < 0.6).any()  # dlib's same-person distance: 0.6
    assert dist[2].mean() > dist[1].mean() + 0.05


def test_the_encoder_stand_in_moves_small_faces_in_coloured_light():
    """encode_loss: no stand-in for a near-lossless crf or a large face, a lower JPEG quality for a
    higher crf; the round trip keeps the region's shape and takes its fine chroma detail away."""
    from deidcli.pipeline.encode_loss import BELOW, encoded_region, jpeg_quality, quality_for, through_encoder

    assert jpeg_quality(None) is None and jpeg_quality(0) is None and jpeg_quality(9) is None
    assert quality_for(18, BELOW - 1) == 70 and quality_for(18, BELOW) is None  # large faces: as pasted
    q = [jpeg_quality(c) for c in (10, 18, 23, 28, 35, 51)]
    assert q == sorted(q, reverse=True) and q[1] == 70 and q[-1] >= 1
    rng = np.random.default_rng(0)
    fine = np.full((48, 40, 3), 128, np.uint8)
    fine[..., 2] = rng.integers(60, 200, (48, 40))  # fine detail in the blue channel only
    out = through_encoder(fine, 40)
    assert out.shape == fine.shape and out.dtype == np.uint8
    assert np.abs(out[..., 2].astype(int) - 128).mean() < 0.7 * np.abs(fine[..., 2].astype(int) - 128).mean()
    assert through_encoder(fine, None) is fine and encoded_region(None, 40) is None
    box, px = encoded_region(((1, 2, 41, 50), fine), 40)
    assert box == (1, 2, 41, 50) and px.shape == fine.shape


def test_small_faces_in_blue_light_stay_anonymized_through_a_lossy_encode(shared, tmp_path):
    """The stress set's blue-lit 3x3 mosaic (faces of 45-180 px), 1 s, written at --crf 28: the
    encode takes much of the generator's change to the small faces away again (before the check
    saw faces through a stand-in for the encoder, 49 of the full clip's 990 faces came out
    exposed, and 20 of this clip's 330). The identity check now regenerates or blurs them: the
    audit found 0 exposed in 4 runs of 5 and 1 in the fifth (the batches, and with them the
    passes a face gets, form as frames arrive from the threads)."""
    from deidcli.options import AnonymizeOptions, EncodeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research import stress
    from deidcli.research.evaluate_video import evaluate_video

    src = tmp_path / "blue.mp4"
    stress.make_clip("mosaic3_blue", src, seed=0, seconds=1.0)
    out = tmp_path / "out.mp4"
    f = anonymize(src, out, AnonymizeOptions(encode=EncodeOptions(crf=28)))["files"][0]
    assert f["face_paths"].get("generated", 0) > 100
    r = evaluate_video(src, out)
    assert r["faces"] >= 250 and r["exposed_faces"] <= 2, [t["exposed_frames"] for t in r["per_track"]]


def test_a_face_whose_fallback_would_still_be_recognized_stays_generated(shared, tmp_path):
    """The stress set's motion-blurred 3x3 mosaic, 0.5 s, with a check threshold every face fails:
    each face gets its most passes, then the blur, except where the blur itself would be
    recognized (its cosine at the network's verification threshold or more) and the generated
    face is further from the person: the 45 px face in motion blur, whose blur keeps what the
    network sees of it. Those faces stay generated and are counted."""
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research import stress

    src = tmp_path / "blur.mp4"
    stress.make_clip("mosaic3_blur", src, seed=0, seconds=0.5)
    f = anonymize(src, tmp_path / "out.mp4", AnonymizeOptions(check_thresh=-1.0))["files"][0]
    kept = f["faces_fallback_closer"]
    assert kept >= 5 and f["face_paths"].get("generated") == kept, f["face_paths"]
    assert f["faces_by_size"]["<48"].get("generated") == kept  # the small face in motion blur
    assert f["face_paths"]["check"] >= 100  # every other face: blurred


# --- a face that starts weak ------------------------------------------------------------------

def test_first_frame_face_below_det_thresh_is_anonymized(shared, tmp_path):
    """A face that comes into focus: its detector score is under --det-thresh (0.5) in the first
    frames, frame 0 included, and above it after. The track that starts at the first strong frame
    reaches back: every frame's face is anonymized (the report counts the weak ones)."""
    import av
    import cv2

    from deidcli.pipeline.anonymize import anonymize
    from deidcli.faces.detect import Detector
    from deidcli.options import AnonymizeOptions, DetectOptions

    frames = decode_rgb(VIDEOS / "sadtalker_WDA_KatieHill_000.mp4", 10)
    sigmas = [15, 13, 11] + [0] * 7  # SCRFD-2.5G scores ~0.4-0.47 blurred so, ~0.64 sharp
    src = tmp_path / "focus.mp4"
    with av.open(str(src), "w") as out:
        vs = out.add_stream("libx264", rate=25, options={"crf": "12"})
        vs.width, vs.height, vs.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for img, s in zip(frames, sigmas):
            img = cv2.GaussianBlur(img, (0, 0), s) if s else img
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode(None))
    det = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3, precision="int8")
    inp = decode_rgb(src)
    scores = [det.detect(x).scores for x in inp]
    assert all(len(s) == 1 for s in scores)
    assert all(0.3 <= s[0] < 0.5 for s in scores[:3]) and scores[3][0] >= 0.5, scores  # the premise
    # the tracker alone: every frame searched whole (the near looks of --search-every are zoomed
    # looks) and no zoomed second look at weak detections (see the next test)
    res = anonymize(src, tmp_path / "out.mp4", AnonymizeOptions(
        method="blur", detect=DetectOptions(zoom_weak=False, search_every=1)))["files"][0]
    assert res["faces_anonymized"] == 10 and res["faces_kept_low_score"] == 3 and res["tracks"] == 1
    # with the zoomed look the blurred face scores above --det-thresh at frame 0, where the track
    # starts; frames 1-2 are weak detections of a tracked face and simply continue it
    zoom = anonymize(src, tmp_path / "zoom.mp4", AnonymizeOptions(
        method="blur", detect=DetectOptions(search_every=1)))["files"][0]
    assert zoom["faces_anonymized"] == 10 and zoom["tracks"] == 1
    assert zoom["faces_raised_zoomed"] == 1 and zoom["faces_kept_low_score"] == 2
    # the defaults (frame 0 searched, frames 1-3 looked at near the face) cover every frame too
    dflt = anonymize(src, tmp_path / "dflt.mp4", AnonymizeOptions(method="blur"))["files"][0]
    assert dflt["faces_anonymized"] == 10 and dflt["tracks"] == 1 and dflt["frames_near"] > 0
    box = det.detect(inp[3]).boxes[0].astype(int)
    x0, y0, x1, y1 = box
    for name in ("out.mp4", "dflt.mp4"):
        outp = decode_rgb(tmp_path / name)
        for k in range(3):  # the weak frames, the first included, are blurred where the face is
            d = np.abs(outp[k][y0:y1, x0:x1].astype(int) - inp[k][y0:y1, x0:x1]).mean()
            assert d > 4, (name, k, d)
    assert json.dumps(res)  # the report stays JSON


# --- a flat face ------------------------------------------------------------------------------

def test_hazy_face_is_never_left_nearly_unchanged(shared, tmp_path):
    """Under haze (half the contrast, the stress set's veil) tone matching keeps the generated
    face in the input's narrow lightness range, and the paste used to differ from the input by
    less than deid evaluate-video's "unchanged" (ArcFace crop MAD < 2; lp_d12 so: 5 of 12 faces
    without the identity check's change test). The check fails such a faint face: each face is
    changed by at least UNCHANGED_MAD in the output."""
    import av

    from deidcli.faces.align import arcface_crop
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research.measures import UNCHANGED_MAD
    from deidcli.faces.detect import Detector
    from deidcli.options import AnonymizeOptions
    from deidcli.research.stress import apply_condition, fit

    rng = np.random.default_rng(0)
    src = tmp_path / "haze.mp4"
    with av.open(str(src), "w") as out:
        vs = out.add_stream("libx264", rate=25, options={"crf": "12"})
        vs.width, vs.height, vs.pix_fmt = 512, 288, "yuv420p"  # the face ~110 px
        for img in decode_rgb(VIDEOS / "lp_d12.mp4", 12):
            img = apply_condition(fit(img, (288, 512)), "haze", rng)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode(None))
    res = anonymize(src, tmp_path / "out.mp4", AnonymizeOptions())["files"][0]
    assert res["faces_anonymized"] == 12 and res["faces_check_faint"] > 0, res
    det = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.5)
    mads = []
    for a, b in zip(decode_rgb(src), decode_rgb(tmp_path / "out.mp4")):
        (kps,) = det.detect(a).kps
        mads.append(np.abs(arcface_crop(a, kps).astype(int) - arcface_crop(b, kps)).mean())
    assert len(mads) == 12 and min(mads) >= UNCHANGED_MAD, np.round(mads, 2)


# --- faces the frame-sized look scores low ------------------------------------------------------

def test_zoomed_look_raises_small_faces_and_not_a_hair_tie(shared):
    """The int8 detector scores small crowd faces under --det-thresh frame after frame (no track
    would start); looked at again zoomed nearly all score above it. A hair tie on lp_d6's head, a weak
    detection in a clean clip, stays low zoomed."""
    from deidcli.faces.detect import Detector
    from deidcli.research.stress import Crowd, _seed_of

    det = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3, precision="int8")
    crowd = Crowd(np.random.default_rng(_seed_of("crowd_lfw", 0)), 90)
    weak = []  # (frame, height, score, zoomed score) of the detections under 0.5
    for i in range(31):
        img = next(crowd)
        if i % 6:
            continue
        d = det.detect(img)
        weak += [(i, float(b[3] - b[1]), float(s), det.zoom_score(img, b))
                 for b, s in zip(d.boxes, d.scores) if s < 0.5]
    assert len(weak) >= 8, weak
    assert sum(z >= 0.5 for *_, z in weak) >= len(weak) - 1, weak  # 13 of 14 (frame 30: a crossing, 0.49 -> 0.35)
    assert det.n_raised == 0  # detect() itself does not rescore unless asked
    img = decode_rgb(VIDEOS / "lp_d6.mp4", 61)[60]
    d = det.detect(img)
    ties = [(b, s) for b, s in zip(d.boxes, d.scores) if s < 0.5]
    assert len(ties) == 1 and ties[0][0][1] < 0, d  # the premise: one weak detection, at the top edge
    assert det.zoom_score(img, ties[0][0]) < 0.3
    both = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3, precision="int8",
                    rescore_below=0.5)
    d2 = both.detect(img)
    assert both.n_rescored == 1 and both.n_raised == 0 and len(d2) == len(d)


def test_weak_detection_of_a_tracked_face_is_not_looked_at_again(shared):
    """lp_d6's own face scores under 0.5 in a third of its frames (frame 80: 0.46); it is tracked,
    so the detector given the tracker's boxes does not spend a zoomed look on it. The hair tie
    above it (not tracked) still gets one, and stays low."""
    from deidcli.faces.detect import Detector

    det = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3, precision="int8",
                   rescore_below=0.5)
    frames = decode_rgb(VIDEOS / "lp_d6.mp4", 81)
    plain = det.detect(frames[80])
    assert det.n_rescored == 2 and det.n_raised == 1, plain  # the premise: the face (raised) and the hair tie
    face = plain.boxes[int(np.argmax(plain.boxes[:, 3] - plain.boxes[:, 1]))]
    again = det.detect(frames[80], tracked=face[None].astype(np.float64))
    assert det.n_rescored == 3 and det.n_raised == 1  # only the hair tie looked at again
    big = int(np.argmax(again.boxes[:, 3] - again.boxes[:, 1]))
    assert again.scores[big] < 0.5 <= plain.scores[int(np.argmax(plain.boxes[:, 3] - plain.boxes[:, 1]))]


# --- a person changing under a calm track ---------------------------------------------------------

def test_calm_track_whose_person_changes_has_every_face_checked(shared, tmp_path):
    """The identity check looks at every other face of a calm track. In the stress set's crowd_lfw
    one face is swapped for another person at the same place at frame 28, and the tracker carries
    the track on: the face of frame 29, unchecked, came out nearly as it went in (ArcFace crop MAD
    7, the frames around it 21; deid evaluate-video: verified). Faces of a track left unchecked in
    a batch where one of its checked faces failed are checked after all."""
    import av

    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research.stress import FPS, H, W, Crowd, _seed_of

    src = tmp_path / "crowd.mp4"
    crowd = Crowd(np.random.default_rng(_seed_of("crowd_lfw", 0)), 90)  # the stress clip's plan
    with av.open(str(src), "w") as out:
        vs = out.add_stream("libx264", rate=FPS, options={"crf": "18", "preset": "fast"})
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        for _ in range(34):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(next(crowd), format="rgb24")))
        out.mux(vs.encode(None))
    res = anonymize(src, tmp_path / "out.mp4", AnonymizeOptions())["files"][0]
    assert res["faces_check_skipped"] > 0, res  # the premise: calm tracks, checked every other face
    x0, y0, x1, y1 = 147, 203, 202, 278  # the swapped face, frames 28-33
    a, b = decode_rgb(src), decode_rgb(tmp_path / "out.mp4")
    mads = [np.abs(a[i][y0:y1, x0:x1].astype(int) - b[i][y0:y1, x0:x1]).mean() for i in range(28, 34)]
    assert min(mads) > 14, np.round(mads, 1)


# --- held faces next to seen ones ----------------------------------------------------------------

def test_held_face_is_not_blurred_over_a_face_seen_in_its_frame(shared):
    """A held face (Face.held: where a face may still be after its track) gets the fallback, but not
    over a face detected in the same frame (the ellipse through its box's corners): it would be behind that face if there at all
    (stress set crowd_lfw: the held blur of a face that passed behind covered half of the generated
    face in front)."""
    from deidcli.faces.detect import Detector
    from deidcli.faces.track import Face
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.pipeline import Pipeline

    img = decode_rgb(VIDEOS / "ghost_2person.mp4", 1)[0]
    det = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.5)
    d = det.detect(img)
    seen = Face(0, d.boxes[0], d.kps[0], float(d.scores[0]), False)
    x0, y0, x1, y1 = (int(v) for v in d.boxes[0])
    shift = np.array([0.5 * (x1 - x0), 0.0, 0.5 * (x1 - x0), 0.0], np.float32)  # half over the seen face
    held = Face(7, d.boxes[0] + shift, d.kps[0] + shift[:2], 0.0, True, held=True)
    pipe = Pipeline(AnonymizeOptions(identity_check=False))

    def run(faces):
        out = img.copy()
        items = [(out, faces)]
        pipe.finish(items, pipe.generate(items, {}))
        return out

    alone, both = run([seen]), run([seen, held])
    inner = (slice(y0 + 2, y1 - 2), slice(x0 + 2, x1 - 2))
    assert np.array_equal(alone[inner], both[inner])  # the seen face as if the held one were not there
    # kept up to an ellipse through the box's corners, not to the box's straight edge (the edge of a
    # box across a blur read as a painted patch: crowd_1080, 2 garish faces)
    ym = (y0 + y1) // 2
    edge = (slice(ym - 5, ym + 5), slice(x1 + 1, x1 + 4))
    assert np.array_equal(alone[edge], both[edge])
    assert np.abs(alone[inner].astype(int) - img[inner]).mean() > 5  # and it was anonymized
    hx0, hy0, hx1, hy1 = (int(v) for v in held.box)
    beside = (slice(hy0 + 10, hy1 - 10), slice(x1 + 2, hx1 - 10))  # the held face's part outside it
    assert np.abs(both[beside].astype(int) - alone[beside]).mean() > 2  # blurred there


# --- faces whose pastes overlap ------------------------------------------------------------------

def test_faces_whose_pastes_overlap_are_the_ones_checked_again():
    """face_check.overlapping_faces: the generated faces of a frame whose boxes (grown by a fifth)
    meet another generated face's box, or a covered face's, in the SAME frame; those are checked
    again once every face is pasted and covered (the later paste renders the other face's pixels its
    own way: stress set crowd_lfw, a small face passing in front of a large one came out under the
    large one's paste; a cover can blur part of a generated face: crowd_1080)."""
    from types import SimpleNamespace

    from deidcli.pipeline.face_check import overlapping_faces

    def face(x0, y0, x1, y1):
        return SimpleNamespace(box=np.array([x0, y0, x1, y1], np.float32))

    jobs = [(0, None, face(100, 100, 200, 220)),  # 0: frame 0, big
            (0, None, face(150, 120, 190, 170)),  # 1: frame 0, inside 0
            (0, None, face(400, 100, 500, 220)),  # 2: frame 0, apart
            (0, None, face(505, 100, 600, 220)),  # 3: frame 0, 5 px from 2: meets it grown
            (1, None, face(150, 120, 190, 170)),  # 4: frame 1, alone there
            (1, None, face(700, 100, 800, 220))]  # 5: frame 1, apart
    assert overlapping_faces(jobs, list(range(6))) == [0, 1, 2, 3]
    assert overlapping_faces(jobs, [0, 2, 4, 5]) == []  # 1 and 3 given the fallback
    covered = [(0, jobs[1][2]), (0, jobs[3][2])]  # ... and drawn over 0 and next to 2
    assert overlapping_faces(jobs, [0, 2, 4, 5], covered) == [0, 2]
    assert overlapping_faces(jobs, [0, 2, 4, 5], [(1, jobs[1][2])]) == [4]  # in frame 1: over 4
    assert overlapping_faces(jobs, [0, 2, 4, 5], [(1, jobs[2][2])]) == []  # 2's box, but in frame 1


# --- a face that fades in from a blur -------------------------------------------------------------

def test_a_face_fading_in_from_a_blur_is_generated_once_sharp(shared, tmp_path):
    """The stress set's fadein: the face comes out of a 40 px blur and 40% brightness over 20
    frames. Its track's first faces (one found back at a score under --det-thresh) describe the
    blur, not the person, and the first of them fails the identity check at its most passes. That
    face gets the fallback on its own: its track is neither put on the fallback nor kept at more
    passes (before: 29 of 89 faces blurred), and the track's descriptor is made again from the sharp
    faces (pipeline/descriptors.py)."""
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research import stress

    src = tmp_path / "fadein.mp4"
    stress.make_clip("fadein", src, seed=0, seconds=2.0)
    res = anonymize(src, tmp_path / "out.mp4", AnonymizeOptions())["files"][0]
    assert res["tracks"] == 1 and res["faces_anonymized"] >= 55, res
    assert res["tracks_redescribed"] == 1, res
    assert res["faces_blurred_fallback"] <= 2, res
    assert res["face_paths"]["generated"] >= res["faces_anonymized"] - 2, res


def test_a_descriptor_is_revised_only_from_clearer_agreeing_faces_in_a_row():
    """Descriptors.observe on unit vectors: three checked faces in a row far from the descriptor,
    agreeing with each other, seen with a higher detector score (or larger), replace it, once."""
    from deidcli.pipeline.descriptors import MAX_REVISIONS, REVISE_FACES, Descriptors

    rng = np.random.default_rng(0)

    def unit(v):
        return (v / np.linalg.norm(v)).astype(np.float32)

    old, person = unit(rng.normal(size=128)), unit(rng.normal(size=128))
    near = [unit(person + 0.5 * unit(rng.normal(size=128))) for _ in range(8)]
    assert min(float(a @ person) for a in near) > 0.6  # the premise: the sharp faces agree
    d = Descriptors()
    d[7], d.made_from[7] = old, (0.6, 100.0)
    # not clearer (same score, same size): kept
    assert not any(d.observe(7, e, 0.62, 100.0) for e in near[:REVISE_FACES + 1])
    # a face close to the descriptor breaks the row
    assert not d.observe(7, old, 0.85, 100.0)
    assert not d.observe(7, near[0], 0.85, 100.0) and not d.observe(7, near[1], 0.85, 100.0)
    assert not d.observe(7, old, 0.85, 100.0)
    assert not d.observe(7, near[2], 0.85, 100.0) and not d.observe(7, near[3], 0.85, 100.0)
    assert d.observe(7, near[4], 0.85, 100.0)  # three in a row: revised
    assert float(d[7] @ person) > 0.9 and d.n_revised == 1
    # disagreeing faces (three different people) never make a descriptor
    d[8], d.made_from[8] = old, (0.5, 50.0)
    assert not any(d.observe(8, unit(rng.normal(size=128)), 0.9, 200.0) for _ in range(6))
    # at most MAX_REVISIONS a track; faces filled in (score 0.0) never count
    assert MAX_REVISIONS == 1
    assert not any(d.observe(7, e, 0.99, 400.0) for e in [old] * 5)
    d[9], d.made_from[9] = old, (0.5, 50.0)
    assert not any(d.observe(9, e, 0.0, 400.0) for e in near)
    # larger is clearer too
    d[10], d.made_from[10] = old, (0.8, 40.0)
    assert [d.observe(10, e, 0.8, 64.0) for e in near[:3]] == [False, False, True]


# --- the face check -------------------------------------------------------------------------------

def test_the_face_check_finds_a_face_the_detector_no_longer_sees():
    """face_check.lost_faces on the stress set's crowd (first frame, as built): of the faces under 96
    px the detector finds at 0.4 or more, the one painted over flat is lost, the others, untouched,
    are not; a face filled in by the tracker (interpolated, score 0) is not looked at."""
    from deidcli.faces.detect import Detector
    from deidcli.faces.track import Face
    from deidcli.pipeline.face_check import LOST_BELOW, LOST_INPUT_SCORE, lost_faces
    from deidcli.research.stress import Crowd, _seed_of

    img = next(Crowd(np.random.default_rng(_seed_of("crowd_lfw", 0)), 90))
    detector = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3)
    det = detector.look(img)
    h = det.boxes[:, 3] - det.boxes[:, 1]
    pick = np.flatnonzero((h >= 30) & (h < LOST_BELOW) & (det.scores >= LOST_INPUT_SCORE))
    assert len(pick) >= 3, (h, det.scores)  # the premise: several such faces in the frame
    faces = [Face(k, det.boxes[j], det.kps[j], float(det.scores[j]), False) for k, j in enumerate(pick)]
    out = img.copy()
    x0, y0, x1, y1 = (int(v) for v in faces[0].box)
    out[y0:y1, x0:x1] = out[y0:y1, x0:x1].reshape(-1, 3).mean(0).astype(np.uint8)  # face 0: gone
    jobs = [(0, None, f) for f in faces]
    assert lost_faces(detector, [(img, faces)], jobs) == []
    assert lost_faces(detector, [(out, faces)], jobs) == [0]
    filled = Face(9, faces[0].box, faces[0].kps, 0.0, True)
    assert lost_faces(detector, [(out, [filled])], [(0, None, filled)]) == []


def test_a_track_lost_once_needs_a_clearer_face_to_stay_generated():
    """face_check.lost_faces with ``again``: a face of the stress set's crowd faded toward flat until
    the look scores it between LOST_FOUND and LOST_FOUND_AGAIN is still a face for a track never
    found lost, and lost for a track found lost before (its generated face, drawn again from the
    same input after its hold, came out garish on crowd_lfw at 0.41-0.42)."""
    from deidcli.faces.detect import Detector
    from deidcli.faces.track import Face
    from deidcli.pipeline.face_check import (LOST_BELOW, LOST_FOUND, LOST_FOUND_AGAIN, LOST_INPUT_SCORE, found_scores,
                                             lost_faces)
    from deidcli.research.stress import Crowd, _seed_of

    img = next(Crowd(np.random.default_rng(_seed_of("crowd_lfw", 0)), 90))
    detector = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3)
    det = detector.look(img)
    h = det.boxes[:, 3] - det.boxes[:, 1]
    pick = np.flatnonzero((h >= 30) & (h < LOST_BELOW) & (det.scores >= LOST_INPUT_SCORE))
    target = (LOST_FOUND + LOST_FOUND_AGAIN) / 2
    for j in pick:  # the first face that fades through the band between the two thresholds
        face = Face(7, det.boxes[j], det.kps[j], float(det.scores[j]), False)
        x0, y0, x1, y1 = (int(v) for v in face.box)
        flat = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        for a in np.linspace(0, 1, 41):
            out = img.copy()
            out[y0:y1, x0:x1] = (out[y0:y1, x0:x1] * (1 - a) + flat * a).astype(np.uint8)
            score = found_scores(detector.look_around(out, face.box[None, :4]), face.box[None, :4])[0]
            if abs(score - target) < 0.03:
                break
        else:
            continue
        break
    else:
        raise AssertionError("no face of the frame fades through the band")
    jobs = [(0, None, face)]
    assert lost_faces(detector, [(out, [face])], jobs) == []
    assert lost_faces(detector, [(out, [face])], jobs, again={7}) == [0]
    assert lost_faces(detector, [(out, [face])], jobs, again={8}) == []


def test_a_look_around_some_faces_sees_them_as_the_frames_look_does():
    """Detector.look_around (face_check.lost_faces' look) on the stress set's crowd (first frame,
    as built): around three faces the frame's look scores 0.4 or more, it finds each where that
    look does, at its score
    within 0.05, and not the faces far from them; around every face it costs as much as the frame,
    and is the frame's look."""
    from deidcli.faces.detect import Detector, box_iou
    from deidcli.research.stress import Crowd, _seed_of

    img = next(Crowd(np.random.default_rng(_seed_of("crowd_lfw", 0)), 90))
    detector = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3, precision="int8")
    full = detector.look(img)
    assert len(full) >= 10  # the premise: a crowd
    sure = np.flatnonzero(full.scores >= 0.4)  # the faces lost_faces looks at
    three = sure[[0, len(sure) // 2, len(sure) - 1]]
    pick = full.boxes[three]
    near = detector.look_around(img, pick)
    iou = box_iou(pick, near.boxes)
    assert (iou.max(1) > 0.8).all()
    assert np.abs(near.scores[iou.argmax(1)] - full.scores[three]).max() < 0.05
    assert len(near) < len(full)  # only around them
    everyone = detector.look_around(img, full.boxes)
    assert np.array_equal(everyone.boxes, full.boxes) and np.array_equal(everyone.scores, full.scores)


def test_generated_faces_the_detector_loses_get_the_fallback(shared, tmp_path):
    """The stress set's crowd_lfw, first 60 frames: without the face check the detector no longer
    found 4 generated faces of 40-47 px (deid evaluate-video: garish, "lost"; dark sockets and
    brows); with it they and their tracks' next faces are blurred, counted as the path "lost"
    (one was left while the check began at 40 px: the pipeline's box of that 41 px face was 39).
    Frames 50-59 hold a track lost once and generated again after its hold (LOST_FOUND_AGAIN):
    at 0.35 for it too, frame 55 came out garish (commit 381d5d0)."""
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research.evaluate_video import evaluate_video

    src = _crowd_clip(tmp_path / "crowd.mp4", 60)
    res = anonymize(src, tmp_path / "out.mp4", AnonymizeOptions())["files"][0]
    assert res["faces_lost_fallback"] > 0 and res["face_paths"]["lost"] >= res["faces_lost_fallback"], res
    r = evaluate_video(src, tmp_path / "out.mp4")
    assert r["garish_lost"] == 0, r["garish_lost"]


def _crowd_clip(path, frames: int, name: str = "crowd_lfw"):
    """The first ``frames`` frames of the stress set's crowd ``name`` (stress.CROWDS), encoded as
    stress.py does."""
    import av

    from deidcli.research.stress import CROWDS, FPS, Crowd, _seed_of

    crowd = Crowd(np.random.default_rng(_seed_of(name, 0)), 90, **CROWDS[name])  # the stress clip's plan
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=FPS, options={"crf": "18", "preset": "fast"})
        vs.width, vs.height, vs.pix_fmt = crowd.size[0], crowd.size[1], "yuv420p"
        for _ in range(frames):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(next(crowd), format="rgb24")))
        out.mux(vs.encode(None))
    return path


# --- the blotch guard ------------------------------------------------------------------------------

def _shared_face_crop(clip: str = "ghost_2person.mp4"):
    """The generator crop (128 px) of the first face of a shared clip's first frame."""
    from deidcli.faces.align import CROP_MARGIN, CROP_SIZE, estimate_transform, warp_crop
    from deidcli.faces.detect import Detector

    img = decode_rgb(VIDEOS / clip, 1)[0]
    det = Detector(VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx").detect(img)
    return warp_crop(img, estimate_transform(det.kps[0], CROP_SIZE, CROP_MARGIN), CROP_SIZE)


def _paint_eyes(crop, colour, axes, eyes: int = 2) -> None:
    """Paint filled ellipses of ``axes`` (px) in ``colour`` over the first ``eyes`` eyes of the crop
    template (where alignment puts a generator crop's eyes), in place."""
    import cv2

    from deidcli.faces.align import crop_template

    for x, y in crop_template(crop.shape[0])[:eyes]:
        cv2.ellipse(crop, (int(x), int(y)), axes, 0, 0, 360, colour, -1)


def test_the_blotch_guard_measures_dark_sockets_not_a_changed_face(shared):
    """faces/blotch.blotchy on a real face (ghost_2person): the face itself, a face brighter or
    darker all over by 6 L* and a face blurred (what a generated face differs by) stay under
    GUARD_SHARE; the same face with black eye sockets (what the generator drew on a 40-50 px dark
    face of the stress set's crowd_1080) is over it, and so is a white smear over one eye."""
    import cv2

    from deidcli.faces.align import crop_template
    from deidcli.faces.blotch import GUARD_SHARE, blotchy

    crop = _shared_face_crop()
    assert blotchy(crop, crop) == 0.0
    lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB).astype(np.int16)
    for d in (-15, 15):  # 6 L* of 100 is 15 of OpenCV's 255
        shifted = cv2.cvtColor(np.clip(lab + [d, 0, 0], 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
        assert blotchy(crop, shifted) < GUARD_SHARE / 2, d
    assert blotchy(crop, cv2.GaussianBlur(crop, (0, 0), 2.0)) < GUARD_SHARE / 2
    left, right = crop_template(crop.shape[0])[:2]
    iod = float(np.hypot(*(right - left)))
    sockets, smear = crop.copy(), crop.copy()
    _paint_eyes(sockets, (12, 8, 8), (int(0.22 * iod), int(0.14 * iod)))
    _paint_eyes(smear, (250, 250, 250), (int(0.25 * iod), int(0.15 * iod)), eyes=1)
    assert blotchy(crop, sockets) > GUARD_SHARE
    assert blotchy(crop, smear) > GUARD_SHARE


def test_a_face_drawn_with_black_sockets_gets_the_fallback(shared, tmp_path, monkeypatch):
    """The pipeline's blotch guard: lp_d12 (a ~200 px face), with the generator's output given black
    eye sockets every 2nd run (what it drew on a 40-50 px dark face of the stress set's crowd_1080:
    10 faces garish, "blotch", before the guard). The blotched faces get the fallback, counted as
    the path "blotch" with their track's next faces, and the audit finds no blotched face; without
    the marks nothing takes that path."""
    from conftest import cut_clip
    from deidcli.generator.engine import GeneratorRunner
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research.evaluate_video import evaluate_video

    src = cut_clip(VIDEOS / "lp_d12.mp4", tmp_path / "in.mp4", 1.0, audio=False)
    opts = AnonymizeOptions(pass_hold=4)
    clean = anonymize(src, tmp_path / "clean.mp4", opts)["files"][0]
    assert clean["faces_blotch_fallback"] == 0 and "blotch" not in clean["face_paths"], clean["face_paths"]
    run, calls = GeneratorRunner.run, []

    def with_sockets(self, crops, desc, passes=1, colour_match=None):
        raw, mask = run(self, crops, desc, passes, colour_match)
        calls.append(len(raw))
        if len(calls) % 2 == 0:
            for r in raw:
                _paint_eyes(r, (10, 8, 8), (11, 7))
        return raw, mask

    monkeypatch.setattr(GeneratorRunner, "run", with_sockets)
    res = anonymize(src, tmp_path / "out.mp4", opts)["files"][0]
    assert res["faces_blotch_fallback"] > 0, res
    assert res["face_paths"]["blotch"] >= res["faces_blotch_fallback"], res["face_paths"]
    assert res["face_paths"].get("generated", 0) > 0, res["face_paths"]  # the others stay generated
    r = evaluate_video(src, tmp_path / "out.mp4")
    assert r["garish_blotch"] == 0 and r["exposed_faces"] == 0, (r["garish_blotch"], r["exposed_faces"])


def test_the_audit_judges_a_face_behind_another_by_its_person(shared, tmp_path):
    """deid evaluate-video of crowd_lfw's first 50 frames against themselves: every face is
    unchanged, so exposed, except the faces filled in behind a face passing in front (frames
    45-47: a 47 px face behind a 67 px one), whose input crops show the face in front, not their
    person: counted as hidden, and not exposed, since the output there does not show the person."""
    from deidcli.research.evaluate_video import evaluate_video

    src = _crowd_clip(tmp_path / "crowd.mp4", 50)
    r = evaluate_video(src, src)
    assert r["faces_hidden"] >= 3, r["faces_hidden"]
    behind = [t for t in r["per_track"] if t["faces_hidden"]]
    for t in behind:  # each of their faces exposed (unchanged) but the hidden ones
        assert len(t["exposed_frames"]) == t["faces"] - t["faces_hidden"], t
    assert any(not set(range(45, 48)) & set(t["exposed_frames"]) and t["first_frame"] < 45 < t["last_frame"]
               for t in behind)


def test_the_blur_keeps_a_small_faces_colour(shared):
    """The fallback blur takes a face's detail, not its colour: on the stress set's crowd (LFW faces
    of 20-80 px over a coloured background) every face blurred alone is classed "blurred" by the
    garish measure (mean L* and a*b* within 8 of the input's), none garish. A blur to 8 px across
    with the 12 px blur's sigma (1.5 px there) bled the background into 4 of 10 faces under 48 px
    of frames 0, 30 and 60, and `deid evaluate-video` counted 20 such blurs of crowd_lfw garish."""
    from deidcli.faces.detect import Detector
    from deidcli.faces.methods import apply_classic
    from deidcli.faces.align import arcface_crop
    from deidcli.research import garish
    from deidcli.research.stress import Crowd, _seed_of
    from deidcli import weights
    from conftest import MODELS

    crowd = Crowd(np.random.default_rng(_seed_of("crowd_lfw", 0)), 90)
    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", MODELS), det_thresh=0.5)
    kinds, small = [], 0
    for i in range(61):
        img = next(crowd)
        if i % 30:
            continue
        faces = det.detect(img)
        for box, kps in zip(faces.boxes, faces.kps):
            out = img.copy()
            apply_classic(out, [type("Face", (), {"box": box, "kps": kps})], "blur", 0.25)
            v = garish.assess(arcface_crop(img, kps), arcface_crop(out, kps), garish.box_region(img, box),
                              garish.box_region(out, box))
            kinds.append((round(float(box[3] - box[1])), v.kind, v.garish, v.metrics["dL"], v.metrics["dab"]))
            small += box[3] - box[1] < 48
    assert len(kinds) >= 30 and small >= 5, (len(kinds), small)
    assert all(k == "blurred" and not g for _, k, g, _, _ in kinds), [r for r in kinds if r[1] != "blurred" or r[2]]


def test_small_faces_in_a_4k_frame_are_found_at_the_automatic_detector_size(shared):
    """A 640 px look at a 3840x2160 frame shrinks its 30-120 px faces six times, below what the
    detector finds; det_size auto (the default) looks at it at 1920 px and finds them. Ground truth:
    the crowd's own plan (whole, unturned faces in frame 30 of the stress set's crowd_4k)."""
    from deidcli.faces.detect import Detector, box_iou
    from deidcli.options import DetectOptions
    from deidcli.research.stress import CROWDS, Crowd, _seed_of

    crowd = Crowd(np.random.default_rng(_seed_of("crowd_4k", 0)), 90, **CROWDS["crowd_4k"])
    for _ in range(31):
        img = next(crowd)
    t, (fw, fh) = crowd.t - 1, crowd.size
    truth = []
    for s, p in zip(crowd.sprites, crowd.plan):
        c = crowd.centre(s, t)
        h, w = s["img"].shape[:2]
        if (c is not None and p["variant"] in ("plain", "mirrored") and w / 2 <= c[0] <= fw - w / 2
                and h / 2 <= c[1] <= fh - h / 2):
            cx, cy = c
            f = p["face_px"]
            truth.append([cx - 0.4 * f, cy - 0.5 * f, cx + 0.4 * f, cy + 0.5 * f])
    truth = np.array(truth)
    assert img.shape == (2160, 3840, 3) and len(truth) >= 15, len(truth)
    model = VIDEOS.parent / "models" / "det_scrfd_2.5g_kps.onnx"
    found = {}
    for size in (DetectOptions().det_size, 640):
        det = Detector(model, det_size=size, precision=DetectOptions().precision)
        boxes = det.detect(img).boxes
        found[size] = int((box_iou(truth, boxes).max(1) >= 0.3).sum()) if len(boxes) else 0
        if size == DetectOptions().det_size:
            assert det.input_size_for(img.shape) == (1920, 1088)
    auto = DetectOptions().det_size
    assert found[auto] >= 0.8 * len(truth), found  # 16 of 18 (int8, as the pipeline runs it)
    assert found[640] <= 0.6 * len(truth), found  # 5 of 18: why a fixed 640 is not the default


def test_the_automatic_detector_size_follows_the_frame():
    from deidcli.faces.detect import auto_side

    assert [auto_side(n) for n in (320, 480, 1280, 1300, 1920, 2560, 3840, 7680)] == \
        [640, 640, 640, 672, 960, 1280, 1920, 3840]


# --- one large face in a large frame -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["selfie_4k", "closeup_4k"])
def test_a_face_filling_a_4k_frame_is_anonymized_in_every_frame(shared, tmp_path, name):
    """The stress set's close-ups: a 2160x3840 phone selfie (the face about 1,550 px high) and a 4K
    talking head (1,290 px). The search, at half the frame's size, does not find faces that large;
    until 2026-12-07 every frame went out as it was (0 faces anonymized, all 30 of a second exposed
    by the audit). The coarse look finds the face in every frame, and deid evaluate-video, whose
    search looks the same way, finds none exposed."""
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.research import stress
    from deidcli.research.evaluate_video import evaluate_video

    src, out = tmp_path / f"{name}.mp4", tmp_path / "out.mp4"
    stress.make_clip(name, src, seed=0, seconds=0.2)
    res = anonymize(src, out, AnonymizeOptions(method="blur"))["files"][0]
    assert res["status"] == "ok" and res["faces_anonymized"] == res["frames"] == 6, res
    ev = evaluate_video(src, out, models_dir=VIDEOS.parent / "models")
    assert ev["faces"] == 6 and ev["exposed_faces"] == 0, {k: ev[k] for k in ("faces", "exposed_faces")}
