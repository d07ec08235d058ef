"""The bundled demo input: a few seconds of video made here from a public-domain photograph.

The photograph is scikit-image's ``astronaut`` (Eileen Collins, NASA; "No known copyright
restrictions, released into the public domain", per ``skimage.data.astronaut``), which
arrives inside the scikit-image wheel: nothing is downloaded. A slow pan and zoom (the
"Ken Burns" move) from the upper body to the face makes the video; a soft generated chord
makes the audio track, so ``--audio copy`` has something to keep. Same bytes in, same
frames out: the clip is deterministic for a given FFmpeg build.

    deid demo-clip out/demo_in.mp4          # or: python -m deidcli.cli.demo out/demo_in.mp4
    deid anonymize out/demo_in.mp4 out/demo_out.mp4
"""

from __future__ import annotations

from pathlib import Path

import click

SIZE = (640, 480)  # output width, height
FPS = 25  # frames per second
SAMPLE_RATE = 48000  # audio samples per second
# Camera windows in the 512x512 photograph, (centre x, centre y, width); height = width * 3/4.
# From the upper body and flag to the face (its box is about x 181-271, y 56-178).
START = (256.0, 190.0, 480.0)
END = (226.0, 122.0, 256.0)


def frame_at(image, t: float):
    """The frame at ``t`` in [0, 1] of the move: (480, 640, 3) uint8 RGB from ``image``
    ((H, W, 3) uint8 RGB, the photograph)."""
    import cv2
    import numpy as np

    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, image.shape
    s = t * t * (3 - 2 * t)  # smoothstep: starts and ends at rest
    cx, cy, w = (a + (b - a) * s for a, b in zip(START, END))
    scale = SIZE[0] / w
    # source (cx, cy) -> output centre
    m = np.array([[scale, 0, SIZE[0] / 2 - scale * cx], [0, scale, SIZE[1] / 2 - scale * cy]])
    return cv2.warpAffine(image, m, SIZE, flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REFLECT)


def chord(n: int, offset: int):
    """(1, n) float32 mono samples from sample ``offset``: a quiet A major chord that fades in."""
    import numpy as np

    t = (np.arange(n) + offset) / SAMPLE_RATE
    x = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63)) / 3
    return (0.2 * np.minimum(t / 0.5, 1.0) * x).astype(np.float32)[None]


def make_demo_clip(dst: Path, seconds: float = 4.0, audio: bool = True) -> Path:
    """Write the demo clip to ``dst`` (MP4: H.264 yuv420p 640x480 at 25 fps, AAC mono 48 kHz),
    atomically: ``dst`` appears only when complete. Returns ``dst``."""
    import av
    import numpy as np
    from skimage.data import astronaut

    from ..media.files import atomic_file

    image = np.ascontiguousarray(astronaut())  # (512, 512, 3) uint8 RGB
    n_frames = max(1, round(seconds * FPS))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        vs.options = {"crf": "18", "preset": "medium"}
        packets = []
        if audio:
            aus = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            n_samples, step = round(n_frames / FPS * SAMPLE_RATE), 1024
            for i in range(0, n_samples, step):
                af = av.AudioFrame.from_ndarray(chord(min(step, n_samples - i), i), format="fltp",
                                                layout="mono")
                af.sample_rate, af.pts = SAMPLE_RATE, i
                packets += aus.encode(af)
            packets += aus.encode(None)
        for k in range(n_frames):
            rgb = frame_at(image, k / max(1, n_frames - 1))
            out.mux(vs.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(vs.encode(None))
        out.mux(packets)
    return dst


@click.command("demo-clip")
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seconds", type=click.FloatRange(min=0.04), default=4.0, show_default=True,
              help="Length of the clip.")
@click.option("--no-audio", is_flag=True, help="Leave out the generated audio track.")
def demo_clip(dst, seconds, no_audio):
    """Write the bundled demo input to DST: a public-domain NASA portrait, panned and zoomed."""
    make_demo_clip(dst, seconds, audio=not no_audio)
    click.echo(f"wrote {dst} ({seconds:g} s, {SIZE[0]}x{SIZE[1]}, {FPS} fps)", err=True)


if __name__ == "__main__":
    demo_clip()
