"""`deid live`: a file played in real time, a stream the test serves itself on the loopback
interface (MPEG-TS over UDP), stopping by signal, a source that disconnects, a source faster than
deid, stdout and network outputs, bad arguments. Real clips, real models, nothing mocked.

The UDP sender paints a barcode (the frame's number in the clip) in the top-left corner of every
frame, so that each output frame is matched to the very frame it was made from, whatever the
MPEG-TS muxers do to the timestamps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, VIDEOS, cut_clip, frame_times

DEID = [sys.executable, "-m", "deidcli.cli"]
ENV = dict(os.environ, DEID_MODELS_DIR=str(MODELS))
BITS, CELL = 10, 8  # barcode: 10 cells of 8x8 px, white = 1, on a row at the top-left corner


def deid(*args, timeout=120):
    p = subprocess.run([*DEID, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def start(*args):
    return subprocess.Popen([*DEID, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode(path: Path) -> list:
    """[(pts, (H, W, 3) uint8 RGB)] of every frame of ``path``'s video."""
    import av

    with av.open(str(path)) as c:
        return [(f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]


def face_boxes(images) -> list:
    """Detector boxes (x0, y0, x1, y1) ints of each image (faces seen by deid's own detector)."""
    from deidcli.faces.detect import Detector

    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx")
    return [[tuple(int(v) for v in b) for b in det.detect(img).boxes] for img in images]


def assert_faces_changed(pairs, boxes, min_change=6.0):
    """Every face box of each source frame changed in its output frame (mean |difference| of the
    box > ``min_change``: a face left as it was, re-encoded, differs by 1-3)."""
    n_faces = 0
    for (src, out), bs in zip(pairs, boxes):
        diff = np.abs(src.astype(np.int16) - out.astype(np.int16))
        for x0, y0, x1, y1 in bs:
            d = diff[max(y0, 0):y1, max(x0, 0):x1].mean()
            assert d > min_change, f"a face left unchanged (mean difference {d:.1f})"
            n_faces += 1
    assert n_faces >= len(pairs), "the test clip should show faces in every frame"


def read_code(img: np.ndarray) -> int:
    cells = [img[2:CELL - 2, k * CELL + 2:(k + 1) * CELL - 2].mean() > 128 for k in range(BITS)]
    return sum(int(b) << k for k, b in enumerate(cells))


class Sender(threading.Thread):
    """Serve ``clip`` (scaled to ``size``, barcoded, x264 with a keyframe every 10 frames) as MPEG-TS
    on udp://127.0.0.1:PORT at ``speed`` x its frame rate, in a loop, until :meth:`stop`.
    ``frames``: the clip's frames as a receiver decodes them, in barcode order."""

    def __init__(self, clip: Path, tmp: Path, speed: float = 1.0, size=(640, 360)):
        super().__init__(daemon=True)
        import av

        self.port, self.speed, self.halt = free_udp_port(), speed, threading.Event()
        ts = tmp / "send.ts"
        with av.open(str(clip)) as inp, av.open(str(ts), "w", format="mpegts") as out:
            vin = inp.streams.video[0]
            self.rate = vin.average_rate
            ov = out.add_stream("libx264", rate=self.rate)
            ov.width, ov.height, ov.pix_fmt = *size, "yuv420p"
            ov.codec_context.gop_size = 10
            ov.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "26"}
            for n, f in enumerate(inp.decode(vin)):
                img = f.to_ndarray(width=size[0], height=size[1], format="rgb24")
                img[:CELL] = 0
                for k in range(BITS):
                    img[:CELL, k * CELL:(k + 1) * CELL] = 255 * ((n >> k) & 1)
                g = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
                g.pts, g.time_base = n, Fraction(1) / self.rate
                for p in ov.encode(g):
                    out.mux(p)
            for p in ov.encode(None):
                out.mux(p)
        self.frames = [img for _, img in decode(ts)]
        with av.open(str(ts)) as c:
            self.packets = [(bytes(p), p.pts, p.dts, p.time_base, p.is_keyframe) for p in c.demux(c.streams.video[0])
                            if p.dts is not None]
        self.url = f"udp://127.0.0.1:{self.port}"
        self.sent = 0

    def run(self):
        import av

        tb = self.packets[0][3]
        step = int(round(1 / (self.rate * tb)))  # one frame in the time base
        loop_len = len(self.frames) * step
        t0 = time.monotonic()
        with av.open(self.url + "?pkt_size=1316", "w", format="mpegts") as out:
            ovs = out.add_stream("h264", rate=self.rate)
            ovs.time_base = tb
            loop = 0
            while not self.halt.is_set():
                for data, pts, dts, _, key in self.packets:
                    due = t0 + float((dts - self.packets[0][2] + loop * loop_len) * tb) / self.speed
                    if self.halt.wait(max(0.0, due - time.monotonic())):
                        return
                    p = av.Packet(data)
                    p.stream, p.time_base = ovs, tb
                    p.pts, p.dts, p.is_keyframe = pts + loop * loop_len, dts + loop * loop_len, key
                    out.mux(p)
                    self.sent += 1
                loop += 1

    def stop(self):
        self.halt.set()
        self.join(5)

    def again(self) -> "Sender":
        """A new sender of the same frames on the same port (not started)."""
        new = Sender.__new__(Sender)
        threading.Thread.__init__(new, daemon=True)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k in (
            "port", "speed", "rate", "frames", "packets", "url")}, halt=threading.Event(), sent=0)
        return new


def wait_for_output(dst: Path, proc, min_bytes=30_000, timeout=90) -> int:
    """Wait until deid has written ``min_bytes`` to its temporary output (frames are going out);
    returns its size."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tmps = list(dst.parent.glob(f".{dst.name}.deid-tmp-*"))
        if tmps and (size := tmps[0].stat().st_size) >= min_bytes:
            return size
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("deid live wrote nothing")


def check_matched(sender: Sender, out: Path, report: dict) -> list:
    """The output holds report["frames_out"] frames, in increasing pts, each one a frame of the
    sender's clip (by its barcode) with every face changed. Returns the clip numbers written."""
    frames = decode(out)
    assert len(frames) == report["frames_out"] > 0
    pts = [p for p, _ in frames]
    assert all(b > a for a, b in zip(pts, pts[1:])), "output timestamps must increase"
    codes = [read_code(img) for _, img in frames]
    assert all(0 <= c < len(sender.frames) for c in codes), codes
    boxes = face_boxes([sender.frames[c] for c in sorted(set(codes))])
    by_code = dict(zip(sorted(set(codes)), boxes))
    assert_faces_changed([(sender.frames[c], img) for c, (_, img) in zip(codes, frames)], [by_code[c] for c in codes])
    return codes


def check_counts(r: dict):
    assert r["frames_in"] == r["frames_out"] + r["frames_dropped"]
    assert r["frames_dropped"] == r["frames_dropped_old"] + r["frames_dropped_late"] + r["frames_dropped_at_stop"]
    assert r["frames_out"] > 0 and r["latency_ms"]["max"] <= r["max_latency_ms"] + 100


@pytest.fixture(scope="module")
def clip(shared, tmp_path_factory):
    """2.5 s of the 720p two-person clip (audio kept)."""
    return cut_clip(VIDEOS / "ghost_2person.mp4", tmp_path_factory.mktemp("live") / "two.mp4", 2.5)


def test_realtime_file_generate(clip, tmp_path):
    """A file played at its frame rate through the shipped generator: a playable file whose frames
    are source frames (same pts: drops only), every face replaced, audio kept, counts consistent."""
    out = tmp_path / "out.mp4"
    rc, stdout, err = deid("live", clip, out, "--realtime", "--json")
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["status"] == "ok" and r["exit_reason"] == "end of source" and r["source_kind"] == "file"
    src = decode(clip)
    assert r["frames_in"] == len(src) and r["frames_before_ready"] == 0
    check_counts(r)
    assert r["faces"] + r["faces_covered"] >= r["frames_out"] and r["audio"]["mode"] == "copy"
    got = decode(out)
    assert len(got) == r["frames_out"]
    times = frame_times(out)
    assert set(times) <= set(frame_times(clip)) and times == sorted(times), "only source timestamps, in order"
    by_pts = dict(src)
    pairs = [(by_pts[p], img) for p, img in got]
    assert_faces_changed(pairs, face_boxes([a for a, _ in pairs]))
    import av

    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1 and c.streams.video[0].codec_context.name == "h264"
    assert not list(tmp_path.glob(".*deid-tmp*"))


def test_stream_reconnected_then_stopped_by_signal(clip, tmp_path, sig=signal.SIGINT):
    """A UDP stream that stops and comes back (timestamps from 0 again) with --reconnect, then
    Ctrl-C: one output across both (its times go on increasing), finalized (playable, every frame
    anonymized), the report written, exit 130 (SIGTERM takes the same path, exit 143)."""
    first = Sender(clip, tmp_path)
    first.start()
    out, rep = tmp_path / "out.mp4", tmp_path / "r.json"
    second = None
    try:
        p = start("live", first.url, out, "--method", "blur", "--timeout", "1", "--reconnect", "--report", rep)
        size = wait_for_output(out, p)
        first.stop()
        time.sleep(1.5)
        second = first.again()
        second.start()
        wait_for_output(out, p, min_bytes=size + 60_000)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        for s in (first, second):
            if s is not None:
                s.stop()
    assert p.returncode == 128 + sig, err
    assert "reconnected" in err and f"interrupted by {signal.Signals(sig).name}; the output was finalized" in err
    r = json.loads(rep.read_text())
    assert r["status"] == "interrupted" and r["exit_code"] == 128 + sig and r["source_kind"] == "network"
    assert r["reconnects"] == 1
    check_counts(r)
    check_matched(first, out, r)  # the second sender sends the same frames
    assert not list(tmp_path.glob(".*deid-tmp*"))


def test_stream_disconnects(clip, tmp_path):
    """The sender stops: deid ends with one line naming the source, exit 4, the output finalized."""
    sender = Sender(clip, tmp_path)
    sender.start()
    out, rep = tmp_path / "out.mkv", tmp_path / "r.json"
    try:
        p = start("live", sender.url, out, "--method", "pixelate", "--timeout", "1", "--report", rep)
        wait_for_output(out, p)
    finally:
        sender.stop()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 4, err
    lines = [x for x in err.splitlines() if "ERROR" in x]
    assert len(lines) == 1 and sender.url in lines[0] and "no data for 1 s" in lines[0], err
    r = json.loads(rep.read_text())
    assert r["status"] == "source_lost" and r["exit_code"] == 4
    check_counts(r)
    check_matched(sender, out, r)


def test_source_faster_than_deid(clip, tmp_path):
    """A stream at 6x its frame rate through the generator: frames are dropped (counted), and every
    frame that comes out is a source frame with every face replaced or covered."""
    sender = Sender(clip, tmp_path, speed=6.0)
    sender.start()
    out, rep = tmp_path / "out.ts", tmp_path / "r.json"
    try:
        p = start("live", sender.url, out, "--timeout", "1", "--report", rep)
        wait_for_output(out, p, min_bytes=200_000)
    finally:
        sender.stop()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 4, err
    r = json.loads(rep.read_text())
    check_counts(r)
    assert r["frames_dropped"] > r["frames_in"] // 3, r  # 180 frames/s in: most cannot be processed
    codes = check_matched(sender, out, r)
    assert len(codes) == r["frames_out"]


def test_stdout_and_udp_outputs(clip, tmp_path):
    """DST - (MPEG-TS on stdout, nothing else there) and udp:// (read back by a receiver)."""
    import av

    short = cut_clip(clip, tmp_path / "short.mp4", 1.0)
    rep = tmp_path / "r.json"
    p = subprocess.run([*DEID, "live", str(short), "-", "--realtime", "--method", "blur", "--report", str(rep)],
                       capture_output=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout[:1] == b"\x47"  # MPEG-TS sync byte: only the stream on stdout
    (tmp_path / "o.ts").write_bytes(p.stdout)
    r = json.loads(rep.read_text())
    assert len(decode(tmp_path / "o.ts")) == r["frames_out"] > 0 and r["destination_kind"] == "stdout"

    port = free_udp_port()
    got = []

    def receive():
        with av.open(f"udp://127.0.0.1:{port}", timeout=(60, 2),
                     options={"analyzeduration": "200000", "probesize": "100000"}) as c:
            try:
                for f in c.decode(c.streams.video[0]):
                    got.append(f.pts)
            except av.FFmpegError:
                pass  # no data for 2 s: the stream is over

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    rc, stdout, err = deid("live", short, f"udp://127.0.0.1:{port}?pkt_size=1316", "--realtime", "--method", "blur",
                           "--json")
    th.join(20)
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["destination_kind"] == "network" and len(got) == r["frames_out"] > 0


BAD = [  # (arguments, exit code, words of the one-line error)
    (["{clip}", "{tmp}/o.mp4"], 2, "a file is not a live source"),
    (["{tmp}/missing.mp4", "{tmp}/o.mp4", "--realtime"], 1, "no such file"),
    (["ftp://127.0.0.1/x", "{tmp}/o.mp4"], 1, "not a source deid live reads"),
    (["{clip}", "{tmp}/o.txt", "--realtime"], 1, "a live output file must be one of"),
    (["{clip}", "{tmp}/no/such/o.mp4", "--realtime"], 1, "does not exist"),
    (["{clip}", "{clip}", "--realtime"], 1, "exists (use --overwrite"),
    (["{clip}", "gopher://x/y", "--realtime"], 1, "cannot publish to gopher://"),
    (["udp://127.0.0.1:{port}", "{tmp}/o.mp4", "--timeout", "0.5"], 1, "no data within 0.5 s"),
    (["{clip}", "-", "--realtime", "--json"], 2, "--json cannot be used with DST -"),
]


def test_bad_source_or_destination(clip, tmp_path):
    """Each: one line on stderr (Click's usage errors: three), the documented exit code, nothing
    written, the input untouched; no model is loaded (run side by side)."""
    before = clip.stat().st_mtime_ns
    procs = [(start("live", *[a.format(clip=clip, tmp=tmp_path, port=free_udp_port()) for a in args]), code, words)
             for args, code, words in BAD]
    for p, code, words in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == code, (words, err)
        assert words in err and len([x for x in err.splitlines() if x.strip()]) <= (3 if code == 2 else 1), err
    assert not list(tmp_path.iterdir()) and clip.stat().st_mtime_ns == before


def test_a_session_that_drops_most_frames_says_what_to_change(clip, tmp_path):
    """Fail closed drops what cannot be anonymized in time (a crowd on 2 cores: 4 of 360 frames out
    with the generator, 329 with --method blur); a stream that stays dark must say why at the end,
    not only count it. A budget no frame can meet drops every frame."""
    rc, stdout, err = deid("live", clip, tmp_path / "out.mp4", "--realtime", "--json", "--max-latency", "0.01")
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["frames_in"] > 0 and r["dropped_percent"] >= 50, r
    assert "of the frames were dropped" in err and "--max-latency 0.01" in err and "--method blur" in err, err


def _simulate(gen_seconds: float, frames: int = 300, delay: int = 9) -> list:
    """deid live's cover decisions (pipeline/live.py, _State) for ``frames`` frames, each 0.05 s
    old when the generator takes it and out ``delay`` frames later: a generated one
    ``gen_seconds`` after the generator took it (late past the 0.3 s budget), a covered one 0.1 s.
    Returns per frame "generated" or "covered"."""
    from deidcli.pipeline.live import _State

    st, pending, kinds = _State(0.3), [], []
    for i in range(frames):
        late, probe = st.cover([0.05], True)
        kinds.append("covered" if late else "generated")
        pending.append((i + delay, 0.1 if late else gen_seconds, not late, probe))
        while pending and pending[0][0] <= i:
            _, s, generated, pr = pending.pop(0)
            st.out(s, generated, pr, 0.05 + s > st.budget)
    return kinds


def test_a_crowd_too_slow_to_generate_comes_out_covered():
    """Where generating a frame's faces takes longer than the budget (a crowd on 2 cores), deid
    live covers them and tries the generator again only now and then, one try at a time: each
    try holds up the frames behind it. Before, the estimate shrank by a fifth on each covered frame
    and the frames behind a try were generated too: on a 12 s, 15-20-face crowd, 4-15 of 360
    frames came out (229 and 215 with this rule, all covered; docs/live.md). A clip the machine
    keeps up with is never covered."""
    kinds = _simulate(0.45)
    tries = sum(k == "generated" for k in kinds[30:])  # the first frames teach it the time it takes
    assert kinds[0] == "generated" and tries <= 0.05 * 270, (tries, "".join(k[0] for k in kinds))
    assert _simulate(0.1) == ["generated"] * 300
