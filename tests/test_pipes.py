"""`deid anonymize - -`: a video stream on stdin and/or stdout, through real pipes (nothing mocked)."""

import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, audio_packets, decode_rgb, frame_times

DEID = [sys.executable, "-m", "deidcli.cli"]
ENV = dict(os.environ, DEID_MODELS_DIR=str(MODELS))
MAGIC = {"matroska": b"\x1a\x45\xdf\xa3", "mpegts": b"\x47"}


def remux(src: Path, dst: Path, fmt: str, options=None) -> Path:
    """Stream-copy every video/audio packet of ``src`` into container ``fmt``."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt, options=options or {}) as out:
        streams = [inp.streams.video[0], *inp.streams.audio]
        omap = {s.index: out.add_stream_from_template(s) for s in streams}
        for s in streams:
            omap[s.index].time_base = s.time_base
        for pkt in inp.demux(*streams):
            if pkt.dts is None:
                continue
            pkt.stream = omap[pkt.stream.index]
            out.mux(pkt)
    return dst


def deid_pipe(args, data: bytes = b"", pre: str = None, timeout=300):
    """Run deid with ``data`` written to its stdin through a pipe; (returncode, stdout bytes, stderr text)."""
    cmd = DEID if pre is None else [sys.executable, "-c", pre + "\nfrom deidcli.cli import main; main()"]
    p = subprocess.Popen([*cmd, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    out, err = p.communicate(data, timeout=timeout)
    return p.returncode, out, err.decode()


def face_boxes(frames, scale):
    from deidcli.faces.detect import Detector

    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx")
    boxes = []
    for img in frames:
        bs = []
        for x0, y0, x1, y1 in det.detect(img).boxes:
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale, (y1 - y0) * scale
            bs.append((max(int(cx - w / 2), 0), max(int(cy - h / 2), 0), int(cx + w / 2), int(cy + h / 2)))
        boxes.append(bs)
    return boxes


def assert_faces_changed(src: Path, out: Path, n=8, min_change=6.0):
    """Inside every face box (detector box) of the first ``n`` frames the picture changed, several
    times more than re-encoding changes it; outside the faces (1.6x boxes) it is the input's."""
    a, b = decode_rgb(src, n), decode_rgb(out, n)
    inner, outer = face_boxes(a, 1.0), face_boxes(a, 1.6)
    assert len(a) == len(b) == n and all(inner), "test clip should show a face in every frame"
    for fa, fb, bs, big in zip(a, b, inner, outer):
        diff = np.abs(fa.astype(int) - fb.astype(int))
        for x0, y0, x1, y1 in bs:
            assert diff[y0:y1, x0:x1].mean() > min_change, diff[y0:y1, x0:x1].mean()
        outside = np.ones(diff.shape[:2], bool)
        for x0, y0, x1, y1 in big:
            outside[y0:y1, x0:x1] = False
        assert diff[outside].mean() < 1.5, diff[outside].mean()


@pytest.mark.parametrize("fmt,method", [("matroska", "blur"), ("mpegts", "generate")])
def test_stdin_to_stdout(clips, tmp_path, fmt, method):
    """matroska -> matroska (blur) and MPEG-TS -> MPEG-TS (the shipped generator): same frames, same
    presentation times, same audio packets, faces replaced, nothing but the stream on stdout."""
    src = remux(clips["two_person"], tmp_path / f"in.{fmt}", fmt)
    args = ["anonymize", "-", "-", "--method", method, "--preset", "ultrafast"]
    if fmt != "matroska":
        args += ["--format", fmt]
    rc, out, err = deid_pipe(args, src.read_bytes())
    assert rc == 0, err
    assert out.startswith(MAGIC[fmt]), out[:16]
    dst = tmp_path / f"out.{fmt}"
    dst.write_bytes(out)
    times = frame_times(src)
    assert len(times) > 20 and frame_times(dst) == times  # exact, in seconds
    a_in, a_out = audio_packets(src), audio_packets(dst)
    assert len(a_in) > 20 and a_out == a_in  # pts, dts, duration and payload of every packet
    assert_faces_changed(src, dst)
    assert "1 ok" in err


def test_mp4_file_to_stdout_and_fragmented_mp4_from_stdin(clips, tmp_path):
    """Either side may be `-` alone: a file to stdout (default matroska), and stdin to a file."""
    src = clips["talking"]
    rc, out, err = deid_pipe(["anonymize", src, "-", "--method", "blur", "--preset", "ultrafast", "-q"])
    assert rc == 0, err
    assert out.startswith(MAGIC["matroska"]) and err == ""
    mkv = tmp_path / "out.mkv"
    mkv.write_bytes(out)
    a, b = frame_times(src), frame_times(mkv)
    # Matroska stores milliseconds: the same presentation times to the millisecond
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= Fraction(1, 2000)
    assert [p[4] for p in audio_packets(mkv)] == [p[4] for p in audio_packets(src)]  # payloads
    assert_faces_changed(src, mkv, n=4)

    frag = remux(src, tmp_path / "frag.mp4", "mp4", {"movflags": "frag_keyframe+empty_moov"})
    dst = tmp_path / "out.mp4"
    rc, out, err = deid_pipe(["anonymize", "-", dst, "--method", "blur", "--preset", "ultrafast", "-q"],
                             frag.read_bytes())
    assert rc == 0 and out == b"", err
    assert frame_times(dst) == frame_times(frag)
    assert audio_packets(dst) == audio_packets(frag)
    assert list(tmp_path.glob(".*deid-tmp*")) == []


def test_stdout_carries_only_the_video(clips, tmp_path):
    """Whatever prints to stdout during a run (Python or C level, like a library loading a model) goes
    to stderr while stdout is the video stream; also a clip without audio."""
    src = remux(clips["portrait_noaudio"], tmp_path / "in.mkv", "matroska")
    noisy = ("import os, sys, deidcli.pipeline.pipeline\n"
             "a = sys.modules['deidcli.pipeline.pipeline']\n"
             "init = a.Pipeline.__init__\n"
             "def noisy(self, *args, **kw):\n"
             "    print('NOISE-PRINT', flush=True); os.write(1, b'NOISE-FD1\\n'); init(self, *args, **kw)\n"
             "a.Pipeline.__init__ = noisy")
    rc, out, err = deid_pipe(["anonymize", "-", "-", "--method", "blur", "--preset", "ultrafast"],
                             src.read_bytes(), pre=noisy)
    assert rc == 0, err
    assert b"NOISE" not in out and "NOISE-PRINT" in err and "NOISE-FD1" in err
    dst = tmp_path / "out.mkv"
    dst.write_bytes(out)
    assert frame_times(dst) == frame_times(src)
    import av

    with av.open(str(dst)) as c:
        assert len(c.streams.audio) == 0 and len(c.streams.video) == 1


def test_mp4_with_index_at_the_end_is_refused_on_stdin(clips, tmp_path):
    src = clips["talking"]  # written by PyAV's mp4 muxer: moov after mdat
    rc, out, err = deid_pipe(["anonymize", "-", "-", "--method", "blur"], src.read_bytes())
    assert rc == 1 and out == b""
    errors = [ln for ln in err.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "moov" in errors[0] and "-f matroska" in errors[0], err
    assert "Traceback" not in err


def test_garbage_on_stdin(tmp_path):
    rc, out, err = deid_pipe(["anonymize", "-", "-", "--method", "blur"], os.urandom(50_000))
    assert rc == 1 and out == b"" and "stdin: not a readable video stream" in err


def test_json_and_format_conflicts_are_usage_errors(clips, tmp_path):
    rc, out, err = deid_pipe(["anonymize", clips["talking"], "-", "--json"])
    assert rc == 2 and out == b"" and "--json cannot be used with DST -" in err
    rc, out, err = deid_pipe(["anonymize", clips["talking"], tmp_path / "o.mp4", "--format", "mpegts"])
    assert rc == 2 and "--format applies to DST -" in err and not (tmp_path / "o.mp4").exists()
    rc, out, err = deid_pipe(["anonymize", clips["talking"], "-", "--format", "avi"])
    assert rc == 2 and out == b""


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_ffmpeg_pipeline(clips, tmp_path):
    """ffmpeg -i in.mp4 -f matroska - | deid anonymize - - | ffmpeg -i - out.mp4"""
    src, dst = clips["two_person"], tmp_path / "out.mp4"
    cmd = (f"ffmpeg -v error -i '{src}' -c copy -f matroska - | {sys.executable} -m deidcli.cli anonymize - - "
           f"--method blur --preset ultrafast -q | ffmpeg -v error -i - -c copy '{dst}'")
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    a, b = frame_times(src), frame_times(dst)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= Fraction(1, 1000)
    assert [p[4] for p in audio_packets(dst)] == [p[4] for p in audio_packets(src)]
    assert_faces_changed(src, dst)


def synthetic_pcm_mkv(path: Path, frames=12, rate=48000) -> Path:
    """A tiny Matroska clip (no faces) with PCM audio, which MPEG-TS has no mapping for."""
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=12)
        v.width, v.height, v.pix_fmt = 128, 96, "yuv420p"
        a = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        for i in range(frames):
            img = np.full((96, 128, 3), 20 * i % 255, np.uint8)
            for pkt in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        n = rate * frames // 12
        af = av.AudioFrame.from_ndarray(np.zeros((1, n), np.int16), format="s16", layout="mono")
        af.sample_rate, af.pts = rate, 0
        for pkt in a.encode(af):
            out.mux(pkt)
        for s in (v, a):
            for pkt in s.encode(None):
                out.mux(pkt)
    return path


def test_audio_mpegts_cannot_hold(tmp_path):
    src = synthetic_pcm_mkv(tmp_path / "pcm.mkv")
    data = src.read_bytes()
    rc, out, err = deid_pipe(["anonymize", "-", "-", "--method", "blur", "--format", "mpegts"], data)
    assert rc == 1 and out == b""
    assert "cannot hold the input's pcm_s16le audio" in err and "--audio aac" in err, err
    rc, out, err = deid_pipe(["anonymize", "-", "-", "--method", "blur", "--format", "mpegts", "--audio", "aac"],
                             data)
    assert rc == 0, err
    dst = tmp_path / "out.ts"
    dst.write_bytes(out)
    import av

    with av.open(str(dst)) as c:
        assert [s.codec_context.name for s in c.streams.audio] == ["aac"]
    assert len(frame_times(dst)) == 12


def test_signal_while_upstream_is_silent(clips, tmp_path):
    """SIGTERM while deid waits on a silent stdin (upstream alive, no data, no EOF): it stops at
    once with 143, instead of waiting for upstream's next byte."""
    import signal
    import time

    src = remux(clips["portrait_noaudio"], tmp_path / "in.mkv", "matroska")
    p = subprocess.Popen([*DEID, "anonymize", "-", "-", "--method", "blur", "--preset", "ultrafast", "-q"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        p.stdin.write(src.read_bytes())
        p.stdin.flush()  # stdin stays open: deid reads everything, then waits for more
        time.sleep(8)  # models loaded, the few frames processed: deid is waiting on stdin
        assert p.poll() is None
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
        assert rc == 143 and time.monotonic() - t < 5, (rc, time.monotonic() - t)
        err = p.stderr.read().decode()
        assert "SIGTERM" in err and "the stream was cut" in err and "resume" not in err, err
    finally:
        p.stdin.close()
        if p.poll() is None:
            p.kill()
        p.wait()
