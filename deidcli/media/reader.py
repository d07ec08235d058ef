"""Read a video's frames only (no output side): upright RGB frames with their times, for the
commands that look at a video without writing one (``deid faces``, pipeline/faces_index.py).

Decoding is the transcoder's (media/decode.py): the frame's own colour matrix and range, the
display rotation applied; a packet the decoder rejects is skipped and counted, a read error of
the file itself is an :class:`~deidcli.errors.InputError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from ..errors import InputError
from .frames import VideoFrame, _to_rgb
from .probe import PathLike, _check_truncated, _ff_reason, _open_input, _rotation, _video_stream

log = logging.getLogger(__name__)


class VideoReader:
    """``for vf in VideoReader(path)``: :class:`~deidcli.media.frames.VideoFrame` objects (index
    0-based in presentation order, image (H, W, 3) uint8 RGB upright, pts, time in seconds: pts x
    time base, or index / rate when the frame has no pts). Streamed: one frame at a time.

    After the loop: ``decoded`` frames, ``decode_errors`` (packets the decoder rejected).
    Raises :class:`InputError` when the file cannot be opened, has no video stream, or no frame
    could be decoded.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.decoded = 0
        self.decode_errors = 0

    def __iter__(self) -> Iterator[VideoFrame]:
        name = self.path.name
        container = _open_input(self.path)
        try:
            vs = _video_stream(container, name)
            _check_truncated(container, self.path)
            vs.thread_type = "AUTO"
            tb = vs.time_base
            rate = vs.average_rate or vs.guessed_rate
            to_rgb = av.video.reformatter.VideoReformatter()
            for packet in container.demux(vs):
                try:
                    frames = packet.decode()
                except av.FFmpegError as e:
                    self.decode_errors += 1
                    log.debug("%s: damaged packet near pts %s: %s", name, packet.pts, _ff_reason(e))
                    continue
                for frame in frames:
                    rgb = _to_rgb(frame, to_rgb)
                    k = _rotation(frame) // 90
                    if k:
                        rgb = np.rot90(rgb, k)
                    if frame.pts is not None and tb:
                        t = float(frame.pts * tb)
                    else:
                        t = self.decoded / float(rate) if rate else None
                    yield VideoFrame(index=self.decoded, image=np.ascontiguousarray(rgb), pts=frame.pts, time=t)
                    self.decoded += 1
        except av.FFmpegError as e:
            raise InputError(f"{name}: decoding failed after {self.decoded} frames ({_ff_reason(e)})") from e
        finally:
            container.close()
        if not self.decoded:
            why = f"{self.decode_errors} packet(s) failed to decode" if self.decode_errors else "the stream is empty"
            raise InputError(f"{name}: no decodable video frames ({why})")
        if self.decode_errors:
            log.warning("%s: %d damaged video packet(s) skipped", name, self.decode_errors)
