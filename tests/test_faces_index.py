"""`deid faces` (pipeline/faces_index.py): one picture per face track, a contact sheet and a JSON
index, on real clips from ../shared and a synthetic clip without a face (nothing mocked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, VIDEOS, cut_clip, decode_rgb, frame_pts, run_deid

DEID = [sys.executable, "-m", "deidcli.cli"]
VERIFY = 0.335  # the identity network's verification threshold on LFW (docs/identity_check.md)


run = run_deid


def no_face_clip(path: Path, frames: int = 20) -> Path:
    """A small H.264 clip of moving gradients: no face anywhere."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        y, x = np.mgrid[0:240, 0:320]
        for i in range(frames):
            img = np.stack([(x + 4 * i) % 256, (y * 2) % 256, np.full_like(x, 128)], -1).astype(np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """One `deid faces --json` run over a folder: ghost_2person (2.5 s, two people), lp_d12 (1 s, one
    person) and a clip without a face. Returns (input folder, output folder, the report)."""
    d = tmp_path_factory.mktemp("faces")
    src = d / "in"
    (src / "sub").mkdir(parents=True)
    cut_clip(VIDEOS / "ghost_2person.mp4", src / "two.mp4", 2.5, audio=False)
    cut_clip(VIDEOS / "lp_d12.mp4", src / "sub" / "talk.mp4", 1.0)
    no_face_clip(src / "empty.mp4")
    p = run("faces", src, d / "out", "--json", check=0)
    return src, d / "out", json.loads(p.stdout)


def _embedder():
    from deidcli.generator.embedder import IdentityEmbedder

    return IdentityEmbedder(MODELS / "rec_mobilefacenet.onnx")


def _read(path: Path) -> np.ndarray:
    from deidcli.media.images import read_image

    return read_image(path)


def test_report_and_folders(indexed):
    src, out, rep = indexed
    assert (rep["ok"], rep["skipped"], rep["failed"]) == (3, 0, 0), rep
    assert {Path(v["output"]).relative_to(out).as_posix() for v in rep["videos"]} == {"two", "sub/talk", "empty"}
    top = json.loads((out / "index.json").read_text())
    assert {v["dir"] for v in top["videos"]} == {"two", "sub/talk", "empty"}
    assert top["deid"] and top["index_version"] == 1
    for v in top["videos"]:
        assert (out / v["dir"] / "sheet.png").is_file()
        assert v["models"]["embedder"] == "rec_mobilefacenet.onnx" and v["models"]["detector"]
        assert v["deid"] == top["deid"]
    assert not [p for p in out.rglob(".*")], "temporary folders left behind"


def test_two_people_two_tracks_right_crops(indexed):
    """ghost_2person: exactly two tracks, each crop is its own person and not the other one:
    the crops' embeddings are far apart, each is close to its own track's descriptor, and close to
    the faces the detector finds at its track's place in frames of the clip, and of better quality
    (gallery.quality) than those."""
    from deidcli.faces.align import arcface_crop
    from deidcli.faces.detect import Detector
    from deidcli.pipeline.gallery import measure_face

    src, out, _ = indexed
    idx = json.loads((out / "two" / "index.json").read_text())
    tracks = idx["tracks"]
    assert [t["id"] for t in tracks] == [0, 1]
    emb = _embedder()
    crops = [_read(out / "two" / t["crop"]) for t in tracks]
    assert all(c.shape == (112, 112, 3) for c in crops)
    e = emb.embed(crops)
    desc = np.array([t["descriptor"] for t in tracks], np.float32)
    assert desc.shape == (2, 128) and np.allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-3)
    assert float(e[0] @ e[1]) < 0.15, "the two crops look like the same person"
    assert float(desc[0] @ desc[1]) < 0.15
    for k in (0, 1):
        assert float(e[k] @ desc[k]) > 0.8
        assert float(e[k] @ desc[1 - k]) < VERIFY - 0.15
        ctx = _read(out / "two" / tracks[k]["context"])
        assert 64 <= max(ctx.shape[:2]) <= 256
    # independent look: the faces of frames 0, 30 and 60, matched to the tracks by place
    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx")
    centres = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in (t["best"]["box"] for t in tracks)])
    frames = decode_rgb(src / "two.mp4", 61)
    for i in (0, 30, 60):
        d = det.detect(frames[i])
        assert len(d) == 2, i
        for box, kps, score in zip(d.boxes, d.kps, d.scores):
            k = int(np.argmin(np.linalg.norm(centres - [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], axis=1)))
            f = emb.embed([arcface_crop(frames[i], kps)])[0]
            assert float(f @ e[k]) > 0.5 and float(f @ e[1 - k]) < VERIFY - 0.1, (i, k)
            q = measure_face(frames[i], i, None, box, kps, float(score)).quality
            assert tracks[k]["best"]["quality"] >= 0.95 * q, (i, k, q)


def test_times_and_counts_are_consistent(indexed):
    src, out, _ = indexed
    idx = json.loads((out / "two" / "index.json").read_text())
    fps = idx["fps"]
    assert idx["frames"] == len(frame_pts(src / "two.mp4")) > 60 and abs(fps - 29.97) < 0.01
    assert (idx["width"], idx["height"]) == (1280, 720)
    for t in idx["tracks"]:
        b = t["best"]
        assert 0 <= t["first_frame"] <= b["frame"] <= t["last_frame"] < idx["frames"]
        assert t["first_time"] <= b["time"] <= t["last_time"] <= idx["last_time"]
        for f, s in ((t["first_frame"], t["first_time"]), (t["last_frame"], t["last_time"]), (b["frame"], b["time"])):
            assert abs(s - f / fps) < 0.5 / fps, (f, s)
        # both people are in every frame of this clip: nearly every frame has a detected face
        assert idx["frames"] * 0.9 <= t["faces"] <= t["last_frame"] - t["first_frame"] + 1
        assert t["descriptor_faces"] == 5 and t["descriptor_min_cos"] > 0.8
        assert b["yaw"] < 0.3 and b["score"] >= 0.5 and b["height"] > 100
        x0, y0, x1, y1 = b["box"]
        assert 0 <= x0 < x1 <= idx["width"] and 0 <= y0 < y1 <= idx["height"]
    talk = json.loads((out / "sub" / "talk" / "index.json").read_text())
    assert len(talk["tracks"]) == 1 and talk["tracks"][0]["faces"] >= 0.9 * talk["frames"]


def test_sheet_shows_every_track(indexed):
    _, out, _ = indexed
    sheet = _read(out / "two" / "sheet.png")
    assert sheet.shape[0] >= 128 and sheet.shape[1] >= 2 * 128  # two tiles side by side
    # each tile holds the track's context crop: its pixels differ from the background
    tile = sheet[26:26 + 128, 4:4 + 128].astype(int)
    assert tile.std() > 20


def test_no_face_clip_gives_empty_track_list(indexed):
    _, out, _ = indexed
    idx = json.loads((out / "empty" / "index.json").read_text())
    assert idx["tracks"] == [] and idx["frames"] == 20
    assert sorted(p.name for p in (out / "empty").iterdir()) == ["index.json", "sheet.png"]


def test_existing_folders_skipped_then_overwritten(indexed, tmp_path):
    """A second run skips the video folders that exist (nothing rewritten); --overwrite replaces them."""
    src, out, _ = indexed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "index.json"}
    rep = json.loads(run("faces", src / "empty.mp4", out, "--json", check=0).stdout)
    assert (rep["ok"], rep["skipped"]) == (0, 1)
    assert before == {p: p.stat().st_mtime_ns for p in before}
    rep = json.loads(run("faces", src / "empty.mp4", out, "--json", "--overwrite", check=0).stdout)
    assert (rep["ok"], rep["skipped"]) == (1, 0)
    assert (out / "empty" / "sheet.png").stat().st_mtime_ns > before[out / "empty" / "sheet.png"]
    assert {v["dir"] for v in json.loads((out / "index.json").read_text())["videos"]} == {"two", "sub/talk", "empty"}
    assert not [p for p in out.rglob(".*")]


def test_python_api(tmp_path):
    from deidcli import FacesOptions, faces_index

    clip = no_face_clip(tmp_path / "blank.mp4", 8)
    rep = faces_index(clip, tmp_path / "faces", FacesOptions(device="cpu"))
    assert rep["ok"] == 1 and rep["videos"][0]["tracks"] == 0
    assert json.loads((tmp_path / "faces" / "index.json").read_text())["videos"][0]["dir"] == "blank"


def test_bad_inputs_fail_cleanly(tmp_path):
    """Missing SRC: usage error; OUT_DIR a file, a non-video SRC: one line, exit 1; an unreadable
    video: failed in the report, exit 1, nothing left behind."""
    p = run("faces", tmp_path / "missing.mp4", tmp_path / "o")
    assert p.returncode == 2 and "does not exist" in p.stderr
    clip = no_face_clip(tmp_path / "ok.mp4", 4)
    (tmp_path / "file").write_text("x")
    p = run("faces", clip, tmp_path / "file")
    assert p.returncode == 1 and "is a file" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    (tmp_path / "notes.txt").write_text("x")
    p = run("faces", tmp_path / "notes.txt", tmp_path / "o")
    assert p.returncode == 1 and "not a video" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    p = run("faces", bad, tmp_path / "o", "--json")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    rep = json.loads(p.stdout)
    assert rep["failed"] == 1 and rep["videos"][0]["status"] == "failed" and "bad.mp4" in rep["videos"][0]["error"]
    assert not (tmp_path / "o" / "bad").exists() and not [q for q in (tmp_path / "o").rglob(".*")]


def test_track_keeps_only_its_best_faces():
    """Bounded memory: however many faces a track has, it keeps BEST_FACES crops, the best first."""
    from deidcli.pipeline.gallery import BEST_FACES, FaceMeasures, TrackFaces

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (200, 200, 3), np.uint8)
    kps = np.array([[80, 90], [120, 90], [100, 110], [85, 130], [115, 130]], float)
    t = TrackFaces(7)
    qs = rng.random(60)
    for i, q in enumerate(qs):
        t.add(img, FaceMeasures(i, i / 25, np.array([60, 60, 140, 150.0]), kps, 0.9, 0.0, 100.0, 5.0, 90.0, 1.0, q))
    assert t.faces == 60 and (t.first, t.last) == ((0, 0.0), (59, 59 / 25))
    assert len(t.best) == BEST_FACES and t.best_face().frame == int(np.argmax(qs))
    assert sorted(it[0] for it in t.best) == sorted(qs)[-BEST_FACES:]
    assert all(c.shape == (112, 112, 3) for c in t.best_crops()) and max(t.context.shape[:2]) <= 256


def test_sigterm_leaves_nothing(tmp_path):
    """SIGTERM while a video is read: exit 143, the report says interrupted, no folder, no temporary."""
    import signal
    import time

    clip = cut_clip(VIDEOS / "ghost_2person.mp4", tmp_path / "two.mp4", 4.0, audio=False)
    out = tmp_path / "out"
    p = subprocess.Popen([*DEID, "faces", str(clip), str(out), "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, DEID_MODELS_DIR=str(MODELS)))
    deadline = time.time() + 60
    while not list(out.glob(".two.deid-tmp-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 143, stderr
    assert json.loads(stdout)["videos"][0]["status"] == "interrupted"
    assert not (out / "two").exists() and not list(out.glob(".*"))
