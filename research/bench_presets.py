"""x264 presets side by side on a clip: encoder CPU, file size and Y-PSNR against the source.

    python research/bench_presets.py CLIP.mp4 [PRESET:CRF ...]   (default: medium:18 faster:18 veryfast:18 veryfast:17)

Decodes CLIP once, then encodes every frame with libx264 at each PRESET:CRF (yuv420p, the
clip's frame rate), timing the encoder's CPU (this process, all threads) and wall time per
frame, and decodes the result to compare its luma with the source's (mean per-frame PSNR).
The figures behind deid's default preset (docs/speed.md, "The encoder preset").
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import av
import numpy as np


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    src, specs = sys.argv[1], sys.argv[2:] or ["medium:18", "faster:18", "veryfast:18", "veryfast:17"]
    with av.open(src) as c:
        vs = c.streams.video[0]
        rate, w, h = vs.average_rate, vs.width, vs.height
        yuv = [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]
    ref = [y[:h].astype(np.float32) for y in yuv]
    print("| preset:crf | encoder CPU ms/frame | wall ms/frame | MB | Y-PSNR dB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.mp4")
        for spec in specs:
            preset, crf = spec.split(":")
            with av.open(out_path, "w") as out:
                s = out.add_stream("libx264", rate=rate, options={"crf": crf, "preset": preset})
                s.width, s.height, s.pix_fmt = w, h, "yuv420p"
                frames = [av.VideoFrame.from_ndarray(y, format="yuv420p") for y in yuv]
                cpu, wall = time.process_time(), time.perf_counter()
                for f in frames:
                    out.mux(s.encode(f))
                out.mux(s.encode(None))
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            with av.open(out_path) as d:
                psnr = [10 * np.log10(255.0 ** 2 / max(float(np.mean((f.to_ndarray(format="yuv420p")[:h] - r) ** 2)), 1e-6))
                        for f, r in zip(d.decode(video=0), ref)]
            n = len(yuv)
            print(f"| {spec} | {cpu / n * 1000:.1f} | {wall / n * 1000:.1f} | "
                  f"{os.path.getsize(out_path) / 1e6:.2f} | {np.mean(psnr):.2f} |")


if __name__ == "__main__":
    main()
