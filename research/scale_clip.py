#!/usr/bin/env python3
"""Scale a clip's video to WxH (bicubic, libx264), audio copied as it is: a test input of a given
resolution from a clip of another, e.g. the 1920x1080 single-face clip of the GPU target
(research/gpu_kit.sh) from ../shared/videos/ghost_obama_short.mp4 (1280x720).

    python research/scale_clip.py IN OUT [--size 1920x1080] [--crf 18] [--repeat 1]

The frames keep their timestamps (same time base); ``--repeat K`` plays the clip K times in a row
(video and audio each shifted by their own span), for a benchmark long enough to reach a steady
state. The output is written to OUT.tmp.mp4 first and renamed when complete.
"""

import argparse
import os
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--size", default="1920x1080", help="WxH of the output video")
    ap.add_argument("--crf", type=int, default=18)
    ap.add_argument("--repeat", type=int, default=1, help="play the clip this many times in a row")
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.lower().split("x"))

    import av
    import cv2

    tmp = a.dst.with_name(a.dst.stem + ".tmp" + a.dst.suffix)
    with av.open(str(a.src)) as inp:
        span = _spans(inp)  # stream index -> span in its time base
    with av.open(str(tmp), "w") as out:
        vout = audio = None
        for k in range(a.repeat):
            with av.open(str(a.src)) as inp:
                vin = inp.streams.video[0]
                if vout is None:
                    vout = out.add_stream("libx264", rate=vin.average_rate,
                                          options={"crf": str(a.crf), "preset": "medium"})
                    vout.width, vout.height, vout.pix_fmt = w, h, "yuv420p"
                    vout.time_base = vin.time_base
                    audio = {s.index: out.add_stream_from_template(s) for s in inp.streams.audio}
                for pkt in inp.demux(vin, *inp.streams.audio):
                    shift = k * span[pkt.stream.index]
                    if pkt.stream.type == "audio":
                        if pkt.dts is not None:
                            pkt.pts, pkt.dts = pkt.pts + shift, pkt.dts + shift
                            pkt.stream = audio[pkt.stream.index]
                            out.mux(pkt)
                        continue
                    for frame in pkt.decode():
                        img = cv2.resize(frame.to_ndarray(format="rgb24"), (w, h), interpolation=cv2.INTER_CUBIC)
                        f = av.VideoFrame.from_ndarray(img, format="rgb24")
                        f.pts, f.time_base = frame.pts + shift, frame.time_base
                        out.mux(vout.encode(f))
        out.mux(vout.encode(None))
    os.replace(tmp, a.dst)
    print(f"{a.dst}: {w}x{h}, {a.dst.stat().st_size / 1e6:.1f} MB")


def _spans(container) -> dict:
    """Stream index -> end of its last packet minus the start of its first, in its time base."""
    first, end = {}, {}
    for pkt in container.demux():
        if pkt.pts is None:
            continue
        i = pkt.stream.index
        first.setdefault(i, pkt.pts)
        end[i] = max(end.get(i, pkt.pts), pkt.pts + (pkt.duration or 0))
    return {i: end[i] - first[i] for i in first}


if __name__ == "__main__":
    main()
