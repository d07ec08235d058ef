"""End-to-end: the `deid` command on real clips from ../shared (nothing mocked)."""

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, VIDEOS, audio_packets, decode_rgb, frame_pts, frame_times

DEID = [sys.executable, "-m", "deidcli.cli"]


def run(*args, env=None, check=None):
    e = dict(os.environ, DEID_MODELS_DIR=str(MODELS))
    e.update(env or {})
    p = subprocess.run([*DEID, *map(str, args)], capture_output=True, text=True, env=e, timeout=600)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}"
    return p


def plain_reencode(src: Path, dst: Path):
    """The floor: the same decode/encode path with no face touched."""
    from deidcli.media.transcode import transcode_video
    from deidcli.options import EncodeOptions

    transcode_video(src, dst, lambda frames: ((f, f.image, []) for f in frames), EncodeOptions())
    return dst


def face_boxes(frames, scale=1.6):
    """Face boxes found by the detector on input frames, enlarged by ``scale`` about their centre."""
    from deidcli.faces.detect import Detector

    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx")
    out = []
    for img in frames:
        d = det.detect(img)
        bs = []
        for x0, y0, x1, y1 in d.boxes:
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale, (y1 - y0) * scale
            bs.append((int(cx - w / 2), int(cy - h / 2), int(cx + w / 2), int(cy + h / 2)))
        out.append(bs)
    return out


def assert_only_faces_changed(src, out, tmp_path, n=10, scale=1.6):
    ref = plain_reencode(src, tmp_path / "plain.mp4")
    a, b, inp = decode_rgb(ref, n), decode_rgb(out, n), decode_rgb(src, n)
    boxes = face_boxes(inp, scale)
    assert all(len(bs) > 0 for bs in boxes), "test clip should show a face in every frame"
    for fa, fb, bs in zip(a, b, boxes):
        outside = np.ones(fa.shape[:2], bool)
        inside_change = []
        for x0, y0, x1, y1 in bs:
            outside[max(y0, 0):y1, max(x0, 0):x1] = False
            inside_change.append(np.abs(fa[max(y0, 0):y1, max(x0, 0):x1].astype(int)
                                        - fb[max(y0, 0):y1, max(x0, 0):x1]).mean())
        diff = np.abs(fa.astype(int) - fb.astype(int))
        # outside the faces: equal to a plain re-encode up to encoding noise
        assert diff[outside].mean() < 1.0, diff[outside].mean()
        assert np.percentile(diff[outside], 99.5) < 16
        # every face really changed
        assert min(inside_change) > 8, inside_change


def test_help_and_version_are_instant_and_light():
    code = ("import sys, deidcli.cli; heavy = [m for m in ('torch', 'av', 'insightface', 'onnxruntime', 'cv2') "
            "if m in sys.modules]; print(heavy)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"
    t = time.perf_counter()
    p = run("--version", check=0)
    assert "deid" in p.stdout
    run("--help", check=0)
    run("anonymize", "--help", check=0)
    assert time.perf_counter() - t < 6


def test_blur_video_keeps_timing_audio_and_background(clips, tmp_path):
    src = clips["two_person"]
    out = tmp_path / "out.mp4"
    p = run("anonymize", src, out, "--method", "blur", "--json", check=0)
    report = json.loads(p.stdout)
    f = report["files"][0]
    assert f["status"] == "ok" and f["frames"] == len(frame_pts(src)) == len(frame_pts(out))
    assert frame_pts(out) == frame_pts(src)
    assert audio_packets(out) == audio_packets(src) and len(audio_packets(src)) > 10
    assert f["tracks"] == 2 and f["faces_anonymized"] >= 2 * f["frames"]
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["options"]["method"] == "blur" and report["versions"]["deid"]
    assert_only_faces_changed(src, out, tmp_path)
    assert list(tmp_path.glob(".*deid-tmp*")) == []


@pytest.mark.parametrize("method", ["pixelate", "solid"])
def test_other_classic_methods(clips, tmp_path, method):
    out = tmp_path / f"{method}.mkv"
    run("anonymize", clips["talking"], out, "--method", method, "-q", check=0)
    # Matroska stores milliseconds: same presentation times to the millisecond
    a, b = frame_times(out), frame_times(clips["talking"])
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= Fraction(1, 1000)


def test_generate_with_a_random_generator(clips, tmp_path):
    """Plumbing of --method generate: a randomly initialised generator saved as a checkpoint."""
    import torch

    from deidcli.generator.model import Generator, save_generator

    torch.manual_seed(0)
    # mask_bias: the mask starts at sigmoid(4) ~ 0.98, i.e. "replace the whole crop"
    g = Generator({"size": 128, "margin": 0.2, "mask_bias": 4.0})
    ckpt = tmp_path / "random.pt"
    save_generator(ckpt, g, {"note": "random init for tests"})
    src = clips["talking"]
    out = tmp_path / "gen.mp4"
    p = run("anonymize", src, out, "--weights", ckpt, "--batch-size", "8", "--json", check=0)
    f = json.loads(p.stdout)["files"][0]
    assert f["status"] == "ok" and f["tracks"] >= 1
    assert frame_pts(out) == frame_pts(src)
    assert audio_packets(out) == audio_packets(src)
    # a generator crop (with its margin) spans about twice the detector's face box
    assert_only_faces_changed(src, out, tmp_path, n=6, scale=2.2)


def test_generate_without_weights_is_a_models_error(clips, tmp_path):
    p = run("anonymize", clips["talking"], tmp_path / "o.mp4", "--weights", tmp_path / "none.pt")
    assert p.returncode == 3 and "none.pt" in p.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_missing_models_exit_code(clips, tmp_path):
    p = run("anonymize", clips["talking"], tmp_path / "o.mp4", "--method", "blur",
            env={"DEID_MODELS_DIR": str(tmp_path / "empty"), "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert p.returncode == 3, p.stderr
    assert "det_scrfd_2.5g_kps.onnx" in p.stderr and "deid models download" in p.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_clip_without_audio(clips, tmp_path):
    src = clips["portrait_noaudio"]
    out = tmp_path / "p.mp4"
    run("anonymize", src, out, "--method", "blur", "-q", check=0)
    assert frame_pts(out) == frame_pts(src)
    import av

    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 0
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (720, 1280)


def test_audio_modes(clips, tmp_path):
    import av

    run("anonymize", clips["talking"], tmp_path / "n.mp4", "--method", "blur", "--audio", "none", "-q", check=0)
    run("anonymize", clips["talking"], tmp_path / "a.mp4", "--method", "blur", "--audio", "aac", "-q", check=0)
    with av.open(str(tmp_path / "n.mp4")) as c:
        assert len(c.streams.audio) == 0
    with av.open(str(tmp_path / "a.mp4")) as c:
        assert c.streams.audio[0].codec_context.name == "aac"


def test_vfr_and_rotated_clips(tmp_path, shared):
    """Synthetic VFR and rotated clips with a real face pasted in keep timing and orientation."""
    import av

    face = decode_rgb(VIDEOS / "lp_d12.mp4", 1)[0][::2, ::2]  # 256x256 face
    vfr = tmp_path / "vfr.mp4"
    pts = [0, 40, 80, 200, 240, 600, 640, 700, 1000, 1040]
    with av.open(str(vfr), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 320, 256, "yuv420p"
        s.time_base = Fraction(1, 1000)
        s.set_display_rotation(90)
        for i, t in enumerate(pts):
            img = np.full((256, 320, 3), 40 + i * 10, np.uint8)
            img[:, 32:288] = face
            fr = av.VideoFrame.from_ndarray(img, format="rgb24")
            fr.pts, fr.time_base = t, s.time_base
            for pkt in s.encode(fr):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    out = tmp_path / "vfr_out.mp4"
    p = run("anonymize", vfr, out, "--method", "solid", "--json", check=0)
    rep = json.loads(p.stdout)["files"][0]
    assert frame_pts(out) == frame_pts(vfr)
    assert rep["faces_anonymized"] == len(pts), rep  # the face was found in the (upright) picture
    # Every frame keeps its pts (above). The stream's duration is a different thing: MP4 takes it
    # from the last packet in decoding order (its dts + duration), which with B-frames is not the
    # last frame shown, and which frame it is follows libx264's frame-type choices for the pixels
    # (the input's own duration, 13,440 ticks of 1/16,000 s, ends before its last frame does, at
    # 17,920). So the two may differ by at most the longest frame interval (pts are in ms).
    gap = max(b - a for a, b in zip(pts, pts[1:])) / 1000
    with av.open(str(vfr)) as a, av.open(str(out)) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert abs(float(va.duration * va.time_base) - float(vb.duration * vb.time_base)) <= gap
    from deidcli.media.probe import probe

    assert probe(out).rotation == probe(vfr).rotation != 0


def test_image(shared, tmp_path):
    import cv2

    img = decode_rgb(VIDEOS / "ghost_2person.mp4", 1)[0]
    src = tmp_path / "photo.jpg"
    cv2.imwrite(str(src), img[:, :, ::-1])
    for ext in ("jpg", "png", "webp"):
        out = tmp_path / f"out.{ext}"
        p = run("anonymize", src, out, "--method", "pixelate", "--json", check=0)
        f = json.loads(p.stdout)["files"][0]
        assert f["status"] == "ok" and f["faces_anonymized"] == 2 and out.is_file()


def test_folder_mirrors_skips_and_survives_a_corrupt_file(clips, tmp_path):
    import shutil

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(clips["talking"], src / "a.mp4")
    shutil.copy(clips["portrait_noaudio"], src / "sub" / "b.mp4")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(5000))
    (src / "notes.txt").write_text("not media")
    dst = src / "out"  # inside the input: must never be read back as input
    p = run("anonymize", src, dst, "--method", "blur", "--json")
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    st = {Path(f["input"]).name: f["status"] for f in rep["files"]}
    assert st == {"a.mp4": "ok", "b.mp4": "ok", "broken.mp4": "failed"}, st
    assert (dst / "a.mp4").is_file() and (dst / "sub" / "b.mp4").is_file() and not (dst / "broken.mp4").exists()
    assert [f["error"] for f in rep["files"] if f["status"] == "failed"][0]
    # second run: everything present is skipped, the corrupt file fails again, out/ not re-read
    p = run("anonymize", src, dst, "--method", "blur", "--json")
    rep = json.loads(p.stdout)
    st = {Path(f["input"]).name: f["status"] for f in rep["files"]}
    assert st == {"a.mp4": "skipped", "b.mp4": "skipped", "broken.mp4": "failed"}, st
    p = run("anonymize", src, dst, "--method", "blur", "--json", "--overwrite")
    assert [f["status"] for f in json.loads(p.stdout)["files"]].count("ok") == 2


def test_garbage_and_truncated_inputs(shared, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(20000))
    data = (VIDEOS / "lp_d12.mp4").read_bytes()
    trunc = tmp_path / "trunc.mp4"
    trunc.write_bytes(data[: len(data) // 3])
    for src in (garbage, trunc):
        out = tmp_path / f"{src.stem}_out.mp4"
        p = run("anonymize", src, out, "--method", "blur")
        assert p.returncode == 1, p.stderr
        err = [line for line in p.stderr.splitlines() if "error" in line.lower()]
        assert err and "Traceback" not in p.stderr, p.stderr
        assert not out.exists()
        assert [q.name for q in tmp_path.iterdir() if "deid-tmp" in q.name] == []


def test_interrupted_run_leaves_nothing(shared, tmp_path):
    out = tmp_path / "long.mp4"
    e = dict(os.environ, DEID_MODELS_DIR=str(MODELS))
    proc = subprocess.Popen([*DEID, "anonymize", str(VIDEOS / "lp_d6.mp4"), str(out), "--method", "blur", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)
    deadline = time.time() + 60
    while time.time() < deadline and not any("deid-tmp" in q.name for q in tmp_path.iterdir()):
        time.sleep(0.2)
    assert any("deid-tmp" in q.name for q in tmp_path.iterdir()), "encoding never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143, proc.stderr.read()  # 128 + SIGTERM (Ctrl-C: 130, see test_batch.py)
    assert list(tmp_path.iterdir()) == []


def test_bad_usage_exit_code(tmp_path, shared):
    assert run("anonymize", tmp_path / "nope.mp4", tmp_path / "o.mp4").returncode == 2
    assert run("anonymize", VIDEOS / "lp_d12.mp4", tmp_path / "o.mp4", "--method", "nope").returncode == 2
    p = run("anonymize", VIDEOS / "lp_d12.mp4", tmp_path / "o.txt", "--method", "blur")
    assert p.returncode == 1 and "video file" in p.stderr


def test_package_api_is_the_function_even_after_the_submodule_import():
    """`from deidcli import anonymize` (README, examples/api.py) gives the function, also when
    the submodule of the same name was imported first (as the CLI and the tests do)."""
    code = ("import deidcli.pipeline.anonymize, inspect; from deidcli import anonymize, AnonymizeOptions; "
            "from deidcli.pipeline.anonymize import plan_jobs; assert inspect.isfunction(anonymize), anonymize; "
            "assert anonymize.__module__ == 'deidcli.pipeline.anonymize'; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_detector_precision_option_and_report(clips, tmp_path):
    """--detector-precision: auto is int8 on the CPU, fp32 is fp32; both in the report; a bad value
    is a usage error."""
    src = clips["two_person"]
    reports = {}
    for precision in ("auto", "fp32"):
        p = run("anonymize", src, tmp_path / f"{precision}.mp4", "--method", "blur", "--detector-precision",
                precision, "--json", check=0)
        reports[precision] = json.loads(p.stdout)
        assert reports[precision]["options"]["detect"]["precision"] == precision
        assert "WARNING" not in p.stderr, p.stderr
    assert reports["auto"]["detector_precision"] == "int8" and reports["fp32"]["detector_precision"] == "fp32"
    a, b = reports["auto"]["files"][0], reports["fp32"]["files"][0]
    assert a["status"] == b["status"] == "ok" and a["tracks"] == b["tracks"] == 2
    assert a["faces_anonymized"] == b["faces_anonymized"]
    p = run("anonymize", src, tmp_path / "bad.mp4", "--detector-precision", "int4")
    assert p.returncode == 2 and "int4" in p.stderr and not (tmp_path / "bad.mp4").exists()


def test_the_small_fixed_size_detector_anonymizes(clips, tmp_path):
    """--detector det_scrfd_500m_kps_640.onnx (a model with a fixed 640x640 input, listed by `deid
    models`): the file is anonymized, both people found. Until 2026-12-07 the near looks between
    searches raised on it and every file failed."""
    p = run("anonymize", clips["two_person"], tmp_path / "small.mp4", "--method", "blur", "--detector",
            "det_scrfd_500m_kps_640.onnx", "--json", check=0)
    f = json.loads(p.stdout)["files"][0]
    assert f["status"] == "ok" and f["tracks"] >= 2 and f["faces_anonymized"] >= 2 * f["frames"], f


def test_det_size_takes_auto_or_a_multiple_of_32():
    import click

    from deidcli.cli.det_size import DetSize
    from deidcli.options import DET_SIZE_AUTO

    t = DetSize()
    assert t.convert("auto", None, None) == DET_SIZE_AUTO == 0
    assert t.convert("AUTO", None, None) == 0 and t.convert("960", None, None) == 960 and t.convert(640, None, None) == 640
    for bad in ("100", "0", "-32", "big"):
        with pytest.raises(click.BadParameter):
            t.convert(bad, None, None)
