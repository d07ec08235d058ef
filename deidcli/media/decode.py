"""The decoding side of the transcoder: open the input, decode with damage accounting (packets
the decoder rejects are skipped and reported), frames as upright RGB with monotonic timestamps.
The encoding side, and the class that runs both, is :mod:`deidcli.media.transcode`."""


from __future__ import annotations

import logging
from fractions import Fraction
from itertools import chain
from typing import Any, Iterator, Optional

import av
import numpy as np

from ..errors import InputError
from .frames import VideoFrame, _to_rgb
from .probe import _check_truncated, _ff_reason, _open_input, _video_stream

log = logging.getLogger(__name__)


class _Decoding:
    """Mixin of _Transcoder (its state is set in _Transcoder.__init__): the input side."""

    # ---- input side -------------------------------------------------------------
    def open_input(self) -> None:
        from_path = self.inp is None  # else a stream opened by the caller (open_stream)
        if from_path:
            self.inp = _open_input(self.src)
        self.vin = _video_stream(self.inp, self.src.name)
        if from_path:
            _check_truncated(self.inp, self.src)
        self.vin.thread_type = "AUTO"
        if self.encode.audio != "none":
            self.audio_in = list(self.inp.streams.audio)
        self.subs_in = list(self.inp.streams.subtitles)
        rate = self.vin.average_rate or self.vin.guessed_rate
        tb = self.vin.time_base
        if rate and tb:
            self.pts_step = max(1, int(round(1 / (rate * tb))))

    def _decode_error(self, pts: Optional[int], reason: str, kind: list) -> None:
        self.decode_errors += 1
        if pts is not None and len(kind) < 1000:
            kind.append(pts)
        log.debug("%s: damaged video near pts %s: %s", self.src.name, pts, reason)

    def _damage_report(self) -> None:
        """Affected frames once decoding is over: those the decoder concealed and those it never
        output (a frame-threaded decoder raises a few packets late: the lost frames' own pts are
        exact, the packet in hand when it raised is only a fallback)."""
        lost = sorted(self._awaiting)
        self.frames_lost = len(lost)
        pts = set(self._concealed) | set(lost) or set(self._rejected)
        tb = self.vin.time_base or Fraction(1, 90000)
        self.decode_error_times = [round(float(p * tb), 3) for p in sorted(pts)[:100]]

    def _decoded(self) -> Iterator[Any]:
        """Demux in file order; yield decoded video frames, route audio/subtitle packets on the fly.

        A damaged video packet does not stop the transcode: a packet the decoder rejects is
        skipped, a frame it flags as concealed is kept, and both are counted with their times
        (``decode_errors``, ``frames_lost``, ``decode_error_times``); every frame it does output
        goes on with its pts.
        Failing to read the file itself (I/O error) raises :class:`InputError`.
        """
        name = self.src.name
        corrupt = 0
        demux = self.inp.demux(self.vin, *self.audio_in, *self.subs_in)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.FFmpegError as e:
                raise InputError(
                    f"{name}: decoding failed after {self.decoded} frames ({_ff_reason(e)})"
                ) from e
            if packet.stream.type != "video":
                self.pending_audio.append(packet)
                continue
            if packet.is_corrupt:
                corrupt += 1
            if packet.size and packet.pts is not None:
                self._awaiting[packet.pts] = None
                if len(self._awaiting) > 10000:  # bounded (field-coded video: 2 packets a frame)
                    del self._awaiting[next(iter(self._awaiting))]
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                self._decode_error(packet.pts, _ff_reason(e), self._rejected)
                continue
            for frame in frames:
                self._awaiting.pop(frame.pts, None)
                if frame.is_corrupt:
                    self._decode_error(frame.pts, "concealed by the decoder", self._concealed)
                yield frame
        expected = int(self.vin.frames or 0)
        if corrupt:
            # Threaded decoders conceal errors instead of raising; a corrupt (e.g. cut short)
            # packet plus missing frames means the input is damaged: do not pass it off as done.
            if expected and self.decoded < expected:
                raise InputError(
                    f"{name}: decoding failed: only {self.decoded} of {expected} frames could "
                    f"be read (file truncated or corrupt)"
                )
            log.warning("%s: %d corrupt video packet(s); the decoder concealed them", name, corrupt)
        if self.decode_errors:
            self._damage_report()
            times = ", ".join(f"{t:.3f}" for t in self.decode_error_times[:10]) or "unknown times"
            more = ", ..." if len(self.decode_error_times) > 10 else ""
            log.warning(
                "%s: damaged video: %d decoding error(s), frames affected at %s s%s (%d lost); the "
                "%d frames decoded were processed (frames after a damaged one may show artefacts "
                "until the next keyframe)",
                name, self.decode_errors, times, more, self.frames_lost, self.decoded,
            )
        self.exhausted = True

    def frames(self, first, rest) -> Iterator[VideoFrame]:
        rot = self.rotation
        k = rot // 90
        tb = self.vin.time_base
        to_rgb = av.video.reformatter.VideoReformatter()  # this thread's (see _to_rgb)
        for frame in chain([first], rest):
            rgb = _to_rgb(frame, to_rgb)
            if k:
                rgb = np.rot90(rgb, k)
            rgb = np.ascontiguousarray(rgb)
            pts = frame.pts
            out_pts = self._fix_pts(pts)
            vf = VideoFrame(
                index=self.decoded,
                image=rgb,
                pts=pts,
                time=float(pts * tb) if pts is not None and tb else None,
                _av=frame,
                _out_pts=out_pts,
                _rotation=rot,
            )
            self.decoded += 1
            yield vf

    def _fix_pts(self, pts: Optional[int]) -> int:
        last = self.last_pts
        if pts is None:
            new = 0 if last is None else last + self.pts_step
        elif last is not None and pts <= last:
            new = last + 1
        else:
            new = pts
        if new != pts:
            if self.pts_fixed == 0:
                log.warning(
                    "%s: frame %d has %s pts; using %d (further fixes are counted in the report)",
                    self.src.name,
                    self.decoded,
                    "no" if pts is None else f"non-increasing ({pts})",
                    new,
                )
            self.pts_fixed += 1
        self.last_pts = new
        return new
