"""`deid live` on a network stream over the loopback interface: frames in and out, dropped, latency.

    DEID_MODELS_DIR=../shared/models python research/live_udp.py CLIP [CLIP ...] [-- deid live options]

Each clip is encoded once to MPEG-TS at its own size (libx264 ultrafast, zerolatency, crf 20, a
keyframe every 30 frames, as a camera or encoder box would send it) in a temporary folder; then its
packets are written to udp://127.0.0.1:PORT at the clip's frame rate (7-packet datagrams,
pkt_size 1316), :data:`LOOPS` times in a row, while ``deid live udp://127.0.0.1:PORT OUT.mp4
--timeout 5 --json`` runs as a separate process. When the last packet is sent the source goes
quiet, deid ends after --timeout with exit 4 ("source stopped"), its output finalized, and the
script prints deid's report figures per clip (JSON lines).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

#: The clip is sent this many times in a row, as one stream: deid opens a network source when its
#: first data arrives and loads its models then, so the first pass is partly skipped
#: (``frames_before_ready``); the figures are those of the frames after.
LOOPS = 2


def _encode_ts(clip: Path, ts: Path) -> Fraction:
    import av

    with av.open(str(clip)) as inp, av.open(str(ts), "w", format="mpegts") as out:
        vin = inp.streams.video[0]
        rate = vin.average_rate
        ov = out.add_stream("libx264", rate=rate)
        ov.width, ov.height, ov.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        ov.codec_context.gop_size = 30
        ov.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "20"}
        for n, f in enumerate(inp.decode(vin)):
            g = f.reformat(format="yuv420p")
            g.pts, g.time_base = n, Fraction(1) / rate
            for p in ov.encode(g):
                out.mux(p)
        for p in ov.encode(None):
            out.mux(p)
    return rate


def _send(ts: Path, url: str, rate: Fraction, sent: list, loops: int) -> None:
    import av

    with av.open(str(ts)) as c:
        packets = [(bytes(p), p.pts, p.dts, p.time_base, p.is_keyframe) for p in c.demux(c.streams.video[0])
                   if p.dts is not None]
    tb = packets[0][3]
    span = int(round(len(packets) / (rate * tb)))  # the clip's length in the time base
    t0 = time.monotonic()
    with av.open(url + "?pkt_size=1316", "w", format="mpegts") as out:
        ovs = out.add_stream("h264", rate=rate)
        ovs.time_base = tb
        for loop in range(loops):
            for data, pts, dts, _, key in packets:
                off = loop * span
                time.sleep(max(0.0, t0 + float((dts + off - packets[0][2]) * tb) - time.monotonic()))
                p = av.Packet(data)
                p.stream, p.time_base = ovs, tb
                p.pts, p.dts, p.is_keyframe = pts + off, dts + off, key
                out.mux(p)
                sent[0] += 1


def measure(clip: Path, tmp: Path, extra: list) -> dict:
    ts = tmp / f"{clip.stem}.ts"
    rate = _encode_ts(clip, ts)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"udp://127.0.0.1:{port}"
    out = tmp / f"{clip.stem}_live_{port}.mp4"  # a clip may be measured more than once
    cmd = [sys.executable, "-m", "deidcli.cli", "live", url, str(out), "--timeout", "5", "--json", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    sent = [0]
    _send(ts, url, rate, sent, LOOPS)
    stdout, stderr = proc.communicate(timeout=120)
    try:
        rep = json.loads(stdout)
    except json.JSONDecodeError:
        return {"clip": clip.name, "exit": proc.returncode, "error": stderr.strip()[-600:]}
    live = rep.get("live", rep)
    keys = ("exit_reason", "frames_before_ready", "frames_in", "frames_out", "frames_dropped", "dropped_percent",
            "frames_covered", "faces_covered", "latency_ms", "fps_in", "fps_out", "source_fps", "size", "decode_errors")
    return {"clip": clip.name, "exit": proc.returncode, "packets_sent": sent[0], **{k: live.get(k) for k in keys}}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    clips = [Path(a) for a in (argv[:argv.index("--")] if "--" in argv else argv)]
    if not clips:
        sys.exit(__doc__)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory() as d:
        for clip in clips:
            print(json.dumps(measure(clip, Path(d), extra)), flush=True)


if __name__ == "__main__":
    main()
