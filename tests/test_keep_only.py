"""`deid anonymize --keep / --only` (pipeline/people.py): real clips and photos from ../shared,
nothing mocked. The references come from a different part of ghost_2person (after 5 s) than
the 3 s cut anonymized."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS, VIDEOS, cut_clip, decode_rgb, run_deid
from deidcli.pipeline.people import KEEP_THRESHOLD

DEID = [sys.executable, "-m", "deidcli.cli"]
REF_FRAMES = (180, 225)  # 6.0 s and 7.5 s of ghost_2person: outside the 3 s cut


run = run_deid


def _detector():
    from deidcli.faces.detect import Detector

    return Detector(MODELS / "det_scrfd_2.5g_kps.onnx")


def _left_right(d):
    """Indices of the left and right person's detections (ghost_2person: x ~ 280 and ~ 850)."""
    order = np.argsort(d.boxes[:, 0])
    return int(order[0]), int(order[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The 3 s cut, its plain re-encode, the input faces' boxes per frame (left, right), and
    references: left/ holds two 112 px ArcFace crops as deid faces writes them (embedded as they
    are); right.jpg a photo of the right person cut from a frame (detected)."""
    import av

    from deidcli.faces.align import arcface_crop
    from deidcli.media.images import write_image

    from test_cli import plain_reencode

    d = tmp_path_factory.mktemp("keep_only")
    clip = cut_clip(VIDEOS / "ghost_2person.mp4", d / "two.mp4", 3.0, audio=False)
    plain = plain_reencode(clip, d / "plain.mp4")
    det = _detector()
    frames = {}
    with av.open(str(VIDEOS / "ghost_2person.mp4")) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in REF_FRAMES:
                frames[i] = f.to_ndarray(format="rgb24")
            if i >= max(REF_FRAMES):
                break
    (d / "left").mkdir()
    for i, img in frames.items():
        det_i = det.detect(img)
        assert len(det_i) == 2
        lft, rgt = _left_right(det_i)
        write_image(d / "left" / f"track_{i:03d}.png", arcface_crop(img, det_i.kps[lft]))
    img = frames[REF_FRAMES[0]]
    det_i = det.detect(img)
    x0, y0, x1, y1 = det_i.boxes[_left_right(det_i)[1]].astype(int)
    write_image(d / "right.jpg", img[max(0, y0 - 150):y1 + 150, max(0, x0 - 150):x1 + 150])
    write_image(d / "both.jpg", img)  # two faces
    write_image(d / "background.jpg", img[480:720, 0:240])  # the clip's background, no face
    inp = decode_rgb(clip)
    boxes = []
    for im in inp:
        di = det.detect(im)
        assert len(di) == 2, "every frame of the cut shows both people"
        boxes.append([di.boxes[k].astype(int) for k in _left_right(di)])
    return {"dir": d, "clip": clip, "input": inp, "plain": decode_rgb(plain), "boxes": boxes}


def _face_diffs(out, data):
    """Per frame and face box (left, right): mean |out - plain re-encode|, and how much further
    the output is from the decoded input than the plain re-encode is (its encoder noise)."""
    frames = decode_rgb(out)
    assert len(frames) == len(data["plain"]) == len(data["boxes"])
    vs_plain, extra = [], []
    for a, b, c, boxes in zip(frames, data["plain"], data["input"], data["boxes"]):
        mad = lambda u, v, x0, y0, x1, y1: float(np.abs(u[y0:y1, x0:x1].astype(int) - v[y0:y1, x0:x1]).mean())  # noqa
        vs_plain.append([mad(a, b, *bx) for bx in boxes])
        extra.append([mad(a, c, *bx) - mad(b, c, *bx) for bx in boxes])
    return np.array(vs_plain), np.array(extra)  # (frames, 2) each


def _untouched(vs_plain, extra):
    """A face left as decoded: identical to the plain re-encode until the encoder's choices drift
    (the other face differs), then within its noise: the plain re-encode itself is 1.2-2.0 from
    the decoded input on this face; the output no further from it (under 0.75 in any frame: the
    encoder's choices; 0.1 on average) and never 2.5 from the plain re-encode (a changed face: > 6)."""
    assert vs_plain[0] < 0.1 and vs_plain.max() < 2.5, vs_plain
    assert extra.max() < 0.75 and extra.mean() < 0.1, extra


def _decisions(report):
    (f,) = report["files"]
    assert f["status"] == "ok", f
    return {t["track"]: t for t in f["track_decisions"]}, f


def test_keep_leaves_the_kept_person_as_a_plain_reencode(data):
    """--keep left/ (deid faces crops of the left person): the left face is a plain re-encode's
    (within encoder noise, see _untouched) in every frame, the right one is anonymized (generated)
    in every frame (deid evaluate-video: exposed in no frame); the report gives both tracks with
    their decisions and similarities."""
    d = data["dir"]
    p = run("anonymize", data["clip"], d / "keep.mp4", "--keep", d / "left", "--json", check=0)
    vs_plain, extra = _face_diffs(d / "keep.mp4", data)
    _untouched(vs_plain[:, 0], extra[:, 0])  # kept: encoder noise only
    assert vs_plain[:, 1].min() > 6.0, vs_plain[:, 1].min()  # the other person changed in every frame
    dec, f = _decisions(json.loads(p.stdout))
    assert sorted(t["decision"] for t in dec.values()) == ["anonymized", "kept"]
    kept = next(t for t in dec.values() if t["decision"] == "kept")
    other = next(t for t in dec.values() if t["decision"] == "anonymized")
    assert kept["similarity"] >= KEEP_THRESHOLD > other["similarity"] and kept["nearest_person"] == "left"
    assert kept["switched_at_frame"] is None and kept["faces_kept"] == len(data["boxes"]) == f["faces_kept"]
    assert f["faces_anonymized"] == len(data["boxes"])
    # deid evaluate-video: the anonymized person exposed in no frame, the kept one in every frame
    from deidcli.research.evaluate_video import evaluate_video

    ev = evaluate_video(data["clip"], d / "keep.mp4", models_dir=MODELS)
    exposed = sorted((len(t["exposed_frames"]), t["cos_max"]) for t in ev["per_track"])
    assert [n for n, _ in exposed] == [0, len(data["boxes"])] and exposed[0][1] < KEEP_THRESHOLD, exposed


def test_only_anonymizes_the_listed_person_only(data):
    """--only right.jpg (a photo, detected): the right face is anonymized in every frame, the left
    one is a plain re-encode's (here with --method blur: the decision does not depend on it)."""
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize

    d = data["dir"]
    options = AnonymizeOptions(method="blur", only=(d / "right.jpg",), models_dir=MODELS)
    report = anonymize(data["clip"], d / "only.mp4", options)
    vs_plain, extra = _face_diffs(d / "only.mp4", data)
    _untouched(vs_plain[:, 0], extra[:, 0])
    assert vs_plain[:, 1].min() > 6.0, vs_plain[:, 1].min()
    dec, f = _decisions(report)
    assert sorted(t["decision"] for t in dec.values()) == ["anonymized", "kept"]
    assert report["people"] == [{"name": "right", "files": [str(d / "right.jpg")]}]
    # decided from 5 faces each, though blur renders frame by frame
    assert all(t["reason"].endswith("over 5 face(s)") for t in dec.values()), dec


@pytest.mark.parametrize("case", ["no face", "several faces", "unreadable", "empty folder", "missing"])
def test_bad_references_fail_before_anything_is_written(data, case, tmp_path):
    """Each bad reference: exit 2, one line naming the file, no output folder made (the CLI), and
    BadReference from the API, before any input is opened."""
    d = data["dir"]
    ref = {"no face": d / "background.jpg", "several faces": d / "both.jpg", "unreadable": tmp_path / "bad.png",
           "empty folder": tmp_path / "empty", "missing": tmp_path / "nope.jpg"}[case]
    if case == "unreadable":
        ref.write_bytes(b"\x89PNG not really")
    if case == "empty folder":
        ref.mkdir()
        (ref / "notes.txt").write_text("no photo here")
    dst = tmp_path / "out" / "two.mp4"
    p = run("anonymize", data["clip"], dst, "--keep", d / "left", "--keep", ref, check=2)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(ref) in lines[0], p.stderr
    assert {"no face": "no face", "several faces": "2 faces", "unreadable": "cannot be read",
            "empty folder": "no photos", "missing": "no such file"}[case] in lines[0]
    assert not (tmp_path / "out").exists()


def test_keep_and_only_together_and_dry_run(data, tmp_path):
    """--keep with --only is a usage error; --dry-run lists the reference people and each track's
    decision (the run's: left kept, right anonymized), writes nothing; a bad reference is exit 2
    in a dry run too."""
    from deidcli.options import AnonymizeOptions

    d = data["dir"]
    with pytest.raises(ValueError):
        AnonymizeOptions(keep=(d / "left",), only=(d / "right.jpg",))
    run("anonymize", data["clip"], tmp_path / "o.mp4", "--keep", d / "left", "--only", d / "right.jpg", check=2)
    p = run("anonymize", data["clip"], tmp_path / "o.mp4", "--keep", d / "left", "--dry-run", "--json", check=0)
    plan = json.loads(p.stdout)
    assert {q["name"]: len(q["files"]) for q in plan["people"]} == {"left": 2}
    (f,) = plan["files"]
    n = len(data["boxes"])
    dec = sorted((t["decision"], t["nearest_person"], t["first_time"], t["faces"]) for t in f["track_decisions"])
    assert dec == [("anonymized", "left", 0.0, n), ("kept", "left", 0.0, n)], dec
    assert all(abs(t["last_time"] - (n - 1) / 30) < 0.05 for t in f["track_decisions"])  # 30 fps
    assert f["faces_kept"] == n and not (tmp_path / "o.mp4").exists()
    p = run("anonymize", data["clip"], tmp_path / "o.mp4", "--only", d / "right.jpg", "--dry-run", check=0)
    assert ": kept (cosine to right" in p.stdout and ": anonymized (cosine to right" in p.stdout, p.stdout
    run("anonymize", data["clip"], tmp_path / "o.mp4", "--keep", d / "both.jpg", "--dry-run", check=2)
    assert not tmp_path.joinpath("o.mp4").exists()


def test_a_swapped_track_is_split_at_each_swap(data):
    """A kept track whose person changes (a tracker swap: the right person's faces under the left
    person's track id in frames 40-49, the left person's again from 50) is split at each change:
    the right person's segment is anonymized from its first face (undecided at the end of the
    batch it starts in, then decided from its own 5 faces), the left person's third segment is
    kept again; the report lists the three segments."""
    from deidcli import weights
    from deidcli.faces.track import Face
    from deidcli.generator.embedder import IdentityEmbedder
    from deidcli.pipeline.people import Chooser, load_people

    det = _detector()
    emb = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", MODELS))
    people = load_people([data["dir"] / "left"], det, emb)
    ch = Chooser("keep", people, emb)
    frames = decode_rgb(data["clip"], 60)
    items = []
    for i, img in enumerate(frames):
        di = det.detect(img)
        k = _left_right(di)[1 if 40 <= i < 50 else 0]
        items.append((i, img, [Face(0, di.boxes[k], di.kps[k], float(di.scores[k]), False)]))
    out = ch.choose(items[:20]) + ch.choose(items[20:42]) + ch.choose(items[42:])
    assert [len(fs) for fs in out] == [0] * 40 + [1] * 10 + [0] * 10
    kept, swapped, back = ch.report()
    assert [t["segment"] for t in (kept, swapped, back)] == [0, 1, 2]
    assert kept["decision"] == "kept" and kept["last_frame"] == 39 and kept["faces_kept"] == kept["faces"] == 40
    assert swapped["decision"] == "anonymized" and (swapped["first_frame"], swapped["last_frame"]) == (40, 49)
    assert swapped["reason"].startswith("identity changed at frame 40: cosine") and swapped["faces_kept"] == 0
    assert swapped["similarity"] < KEEP_THRESHOLD and swapped["reason"].endswith("over 5 face(s)")
    assert back["decision"] == "kept" and back["first_frame"] == 50 and back["faces_kept"] == 10
    assert all(t["switched_at_frame"] is None for t in (kept, swapped, back))


def _swap_clip(path, n=30, m=30, local=False):
    """A 640x720 clip at 30 fps: the left half of ghost_2person's frames 0..n-1 (the left person),
    then frames n..n+m-1 scaled by 0.6 and shifted so that the right person's face sits where the
    left one's was (a cut at the same place), the left person's edge blacked out. ``local``: only
    the region around the left person's face (its box in frame 0 grown by a quarter each side)
    is taken from those, the rest of the picture goes on as before: no cut, one face replaced by
    another at the same place (as a tracker swap at a crossing leaves it)."""
    import av
    import cv2

    out = []
    region = None
    with av.open(str(VIDEOS / "ghost_2person.mp4")) as c:
        for i, f in enumerate(c.decode(video=0)):
            img = f.to_ndarray(format="rgb24")
            if i < n:
                out.append(np.ascontiguousarray(img[:, :640]))
            else:
                canvas = np.zeros((720, 640, 3), np.uint8)
                canvas[70:70 + 432, :569] = cv2.resize(img, (768, 432), interpolation=cv2.INTER_AREA)[:, 199:]
                canvas[:, :100] = 0  # the left person's edge
                if local:
                    if region is None:
                        (x0, y0, x1, y1), = _detector().detect(out[0]).boxes
                        gx, gy = (x1 - x0) / 4, (y1 - y0) / 4
                        region = (slice(max(int(y0 - gy), 0), int(y1 + gy)), slice(max(int(x0 - gx), 0), int(x1 + gx)))
                    local_frame = np.ascontiguousarray(img[:, :640])
                    local_frame[region] = canvas[region]
                    canvas = local_frame
                out.append(canvas)
            if len(out) == n + m:
                break
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 640, 720, "yuv420p"
        s.options = {"crf": "12"}
        for img in out:
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_a_swap_in_a_real_clip_splits_the_track(data, tmp_path):
    """A clip whose one face changes person at frame 30 (_swap_clip; the tracker carries one track
    across): --keep left/ keeps the left person's frames (a plain re-encode's) and anonymizes the
    right person's in every frame; --only right.jpg the other way round; the report and --dry-run
    list the track's two segments."""
    from test_cli import plain_reencode

    n = 30
    clip = _swap_clip(tmp_path / "swap.mp4", n, local=True)
    det = _detector()
    inp = decode_rgb(clip)
    boxes = []
    for im in inp:
        di = det.detect(im)
        assert len(di) == 1
        boxes.append(di.boxes[0].astype(int))
    plain = decode_rgb(plain_reencode(clip, tmp_path / "plain.mp4"))
    d = data["dir"]

    def diffs(out):
        mad = lambda u, v, x0, y0, x1, y1: float(np.abs(u[y0:y1, x0:x1].astype(int) - v[y0:y1, x0:x1]).mean())  # noqa
        return np.array([mad(a, b, *bx) for a, b, bx in zip(decode_rgb(out), plain, boxes)])

    for mode, ref, untouched in (("--keep", d / "left", slice(0, n)), ("--only", d / "right.jpg", slice(0, n))):
        out = tmp_path / f"{mode[2:]}.mp4"
        p = run("anonymize", clip, out, mode, ref, "--method", "blur", "--json", check=0)
        (f,) = json.loads(p.stdout)["files"]
        assert f["tracks"] == 1, f  # one track across the change
        first, second = f["track_decisions"]
        assert (first["track"], first["segment"], second["track"], second["segment"]) == (0, 0, 0, 1)
        assert first["decision"] == "kept" and (first["first_frame"], first["last_frame"]) == (0, n - 1), first
        assert second["decision"] == "anonymized" and second["first_frame"] == n, second
        assert second["reason"].startswith(f"identity changed at t={n / 30:.2f} s (frame {n}): cosine"), second
        assert f["faces_kept"] == n and f["faces_anonymized"] == len(inp) - n
        v = diffs(out)
        assert v[untouched].max() < 2.5 and v[0] < 0.1, v[untouched]  # the plain re-encode's, within its noise
        assert v[n:].min() > 6.0, v[n:]  # anonymized in every frame from the change
    p = run("anonymize", clip, tmp_path / "o.mp4", "--keep", d / "left", "--dry-run", check=0)
    assert f"track 0 0.00-{(n - 1) / 30:.2f} s, {n} face(s): kept (" in p.stdout, p.stdout
    assert f"track 0.1 {n / 30:.2f}-" in p.stdout and "anonymized (identity changed at t=1.00 s" in p.stdout, p.stdout


def test_a_cut_to_another_person_at_the_same_place_starts_a_new_track(data, tmp_path):
    """The same change made by a cut (the whole picture changes): the cut ends the track (faces/
    looks.py), and the face after it is decided from its own faces: --keep left/ keeps frames 0-29
    and anonymizes every frame after."""
    n = 30
    clip = _swap_clip(tmp_path / "cut.mp4", n)
    p = run("anonymize", clip, tmp_path / "keep.mp4", "--keep", data["dir"] / "left", "--method", "blur", "--json",
            check=0)
    (f,) = json.loads(p.stdout)["files"]
    assert f["cuts"] == 1 and f["tracks"] == 2, f
    first, second = f["track_decisions"]
    assert (first["track"], first["decision"], first["first_frame"], first["last_frame"]) == (0, "kept", 0, n - 1)
    assert (second["track"], second["decision"], second["first_frame"]) == (1, "anonymized", n), second
    assert f["faces_kept"] == n and f["faces_anonymized"] == n


def test_bad_reference_with_stdout_fails_before_the_stream(data):
    """DST - (stdout): the same exit 2 and one line, and not a byte on stdout."""
    e = dict(os.environ, DEID_MODELS_DIR=str(MODELS))
    p = subprocess.run([*DEID, "anonymize", str(data["clip"]), "-", "--only", str(data["dir"] / "both.jpg")],
                       capture_output=True, env=e, timeout=300)
    assert p.returncode == 2 and p.stdout == b"", p.stderr
    assert b"both.jpg: 2 faces" in p.stderr
