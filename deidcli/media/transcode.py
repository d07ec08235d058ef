"""The transcoder: decode -> process -> encode/mux one video, keeping timing, pixels outside
the processed rectangles, rotation, audio and subtitles (see deidcli.media.probe for the policies)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional

import av
import numpy as np

from ..errors import InputError, OutputError
from ..options import AUDIO_MODES, EncodeOptions
from ..stages import NULL, QUEUE_FRAMES, Stages, prefetch, timed
from .decode import _Decoding
from .encoders import (
    ProcessFn,
    _aac_config_for_stream,
    _cannot_copy,
    _check_audio_copy,
    _copy_tags,
    _crop_frame,
    _encodable_size,
    _encoder_options,
    _output_pix_fmt,
    _retime_audio,
    _video_encoder,
)
from .frames import VideoFrame, _clip_rects, _paint_rects, _plane_layouts, _rect_to_stored, _Reformatters
from .probe import PathLike, _display_matrix, _ff_reason, _rotation

# FFmpeg's default channel layout per channel count (for sources with an unknown order).
_DEFAULT_LAYOUTS = {
    1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"
}


log = logging.getLogger(__name__)


class _Transcoder(_Decoding):
    """State of one transcode: input/output containers, stream maps, audio routing."""

    def __init__(self, src: Path, dst: Path, encode: EncodeOptions, inp=None, dst_file=None,
                 out_format: Optional[str] = None):
        self.src, self.dst, self.encode = src, dst, encode
        self.inp = inp  # an already open input container (a pipe: read once), else opened from src
        self.dst_file = dst_file  # a writable binary file object to write instead of the path dst
        self.out_format = out_format  # container format name; None: guessed from dst's extension
        self.out = None
        self.vin = None
        self.ovs = None
        self.audio_in: list = []
        self.audio_out: dict[int, Any] = {}  # input stream index -> output stream
        self.subs_in: list = []  # subtitle streams, copied when the output container can hold them
        self.subs_out: dict[int, Any] = {}  # input stream index -> output stream
        # Audio and subtitle packets from the demuxer, muxed by the thread that writes video
        # (PyAV containers are not thread-safe; the decoder may run in its own thread).
        # deque: thread-safe ends.
        self.pending_audio: deque = deque()
        # Damage: errors the decoder reported (packets it rejected + frames it concealed), video
        # packets that gave no frame, input times (s) of the lost and concealed frames (first 100).
        self.decode_errors = 0
        self.frames_lost = 0
        self.decode_error_times: list[float] = []
        self._concealed: list[int] = []  # pts of frames the decoder flagged as concealed
        self._rejected: list[int] = []  # pts of the packets being sent when the decoder raised
        self._awaiting: dict[int, None] = {}  # pts of video packets whose frame is not out yet
        self.crop: Optional[tuple[int, int]] = None  # (w, h) encoded, when it needs even sizes
        self.decoded = 0
        self.exhausted = False
        self.rotation = 0
        self.last_pts: Optional[int] = None
        self.pts_step = 1
        self.pts_fixed = 0
        self.audio_packets = 0
        self.subtitle_packets = 0
        self.durations: dict[int, int] = {}  # out pts -> input frame duration (stream time base)
        self.reformatters = _Reformatters()  # RGB->YUV patches, used by the thread that encodes

    def drain_audio(self) -> None:
        """Mux (or re-encode) the audio packets demuxed so far. Called by the writing thread."""
        q = self.pending_audio
        while q:
            self._on_audio(q.popleft())

    def _on_audio(self, packet) -> None:
        sub = self.subs_out.get(packet.stream.index)
        if sub is not None:  # subtitles: always copied as they are
            if packet.size == 0 or (packet.pts is None and packet.dts is None):
                return  # demuxer flush packet
            if sub.codec_context.name == "mov_text" and bytes(packet) == b"\x00\x00":
                return  # an empty "cue ends" sample: the MP4 muxer writes its own at each cue end
            if packet.dts is None:
                packet.dts = packet.pts
            packet.stream = sub
            self._mux(packet)
            self.subtitle_packets += 1
            return
        ost = self.audio_out.get(packet.stream.index)
        if ost is None:
            return
        if self.encode.audio == "copy":
            if packet.size == 0 or packet.dts is None:
                return  # demuxer flush packet
            packet.stream = ost
            self._mux(packet)
            self.audio_packets += 1
        else:  # aac
            for af in packet.decode():
                self._encode_audio(af, ost)

    def _encode_audio(self, af, ost) -> None:
        _retime_audio(af, ost.codec_context.sample_rate)
        for pkt in self._encode(ost, af):
            self._mux(pkt)
            self.audio_packets += 1

    def _encode(self, stream, frame) -> list:
        try:
            return stream.encode(frame)
        except av.FFmpegError as e:
            raise OutputError(
                f"{self.dst.name}: {stream.codec_context.name} encoding failed ({_ff_reason(e)})"
            ) from e

    def _mux(self, packet) -> None:
        try:
            self.out.mux(packet)
        except (av.FFmpegError, OSError) as e:  # OSError: a file object's write (a closed pipe)
            raise OutputError(f"{self.dst.name}: writing failed ({_ff_reason(e)})") from e

    # ---- output side ------------------------------------------------------------
    def open_output(self, first) -> None:
        enc = self.encode
        codec = _video_encoder(enc.codec)
        try:
            self.out = av.open(str(self.dst) if self.dst_file is None else self.dst_file, "w",
                               format=self.out_format)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise OutputError(f"{self.dst.name}: cannot create output ({_ff_reason(e)})") from e
        out, vin = self.out, self.vin
        fmt_name = out.format.name
        if fmt_name in ("matroska", "webm"):
            # Matroska would shift *every* stream so that the earliest timestamp is >= 0 (copied
            # AAC starts at about -48 ms, B-frame dts are negative): that moves all frame times.
            # It can store negative timestamps, so keep them as they are.
            out.container_options["avoid_negative_ts"] = "disabled"
        elif fmt_name == "avi":
            log.warning(
                "%s: AVI has no per-frame timestamps; variable frame rate cannot be kept "
                "(use .mp4 or .mkv)", self.dst.name
            )

        if enc.audio == "copy" and self.audio_in:
            _check_audio_copy(fmt_name, self.audio_in, self.dst)

        in_fmt = first.format.name
        self.frame_shape = (first.width, first.height, in_fmt)
        pix_fmt = _output_pix_fmt(in_fmt, codec, self.src.name)
        _plane_layouts(in_fmt)  # refuse formats the rectangle painter cannot handle, early
        self.convert_fmt = None if pix_fmt == in_fmt else pix_fmt
        size = _encodable_size(codec.name, pix_fmt, first.width, first.height, enc)
        if size != (first.width, first.height):
            self.crop = size
            log.warning(
                "%s: %dx%d cannot be encoded by %s in %s (it needs even sizes); the last "
                "column/row is cropped: the output is %dx%d (--codec libvpx-vp9 or ffv1 keep the "
                "exact size)", self.src.name, first.width, first.height, codec.name, pix_fmt, *size,
            )

        rate = vin.average_rate or vin.guessed_rate or Fraction(25)
        try:
            ovs = out.add_stream(codec.name, rate=rate)
        except ValueError as e:
            raise OutputError(
                f"{self.dst.suffix or fmt_name} output cannot hold {codec.name} video; "
                f"choose another --codec or an .mp4/.mkv output"
            ) from e
        self.ovs = ovs
        cc = ovs.codec_context
        ovs.width, ovs.height = self.crop or (first.width, first.height)
        ovs.pix_fmt = pix_fmt
        ovs.time_base = vin.time_base
        cc.time_base = vin.time_base
        cc.framerate = rate
        color_range = int(first.color_range)
        if in_fmt.startswith("yuvj"):
            color_range = 2
        for attr, val in (
            ("color_range", color_range),
            ("colorspace", int(first.colorspace)),
            ("color_primaries", int(first.color_primaries)),
            ("color_trc", int(first.color_trc)),
        ):
            try:
                setattr(cc, attr, val)
            except Exception:  # pragma: no cover - attribute missing in this PyAV
                log.debug("cannot set %s on the encoder", attr)
        sar = vin.sample_aspect_ratio
        if sar and sar != 1:
            cc.sample_aspect_ratio = sar
        if codec.name.startswith("libvpx"):
            cc.bit_rate = 0  # constant quality mode
        cc.options = _encoder_options(codec.name, enc)

        matrix = _display_matrix(first)
        self.rotation = _rotation(first)
        if matrix is not None and matrix != (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30):
            ovs.set_display_matrix(matrix)
            det = matrix[0] * matrix[4] - matrix[1] * matrix[3]
            if det < 0:
                log.warning(
                    "%s: the display matrix mirrors the picture; frames are processed "
                    "rotated but not mirrored (output displays like the input)",
                    self.src.name,
                )
        _copy_tags(ovs.metadata, vin.metadata, enc.keep_metadata)

        if enc.audio == "copy":
            for s in self.audio_in:
                ost = out.add_stream_from_template(s)
                ost.time_base = s.time_base
                if self.dst_file is not None and fmt_name in ("matroska", "webm"):
                    _aac_config_for_stream(s, ost)
                _copy_tags(ost.metadata, s.metadata, enc.keep_metadata)
                self.audio_out[s.index] = ost
        elif enc.audio == "aac":
            for s in self.audio_in:
                ctx = s.codec_context
                layout = ctx.layout.name
                if layout.endswith("channels"):  # unknown order: use the default for the count
                    layout = _DEFAULT_LAYOUTS.get(ctx.layout.nb_channels, layout)
                try:
                    ost = out.add_stream("aac", rate=ctx.sample_rate, layout=layout)
                except ValueError as e:
                    raise OutputError(
                        f"{self.dst.suffix or fmt_name} output cannot hold AAC audio; "
                        f"use an .mp4/.mkv output or --audio none"
                    ) from e
                ost.time_base = Fraction(1, ctx.sample_rate)
                _copy_tags(ost.metadata, s.metadata, enc.keep_metadata)
                self.audio_out[s.index] = ost

        for s in self.subs_in:
            why = _cannot_copy(fmt_name, s)
            if why:
                log.warning(
                    "%s: subtitle stream #%d (%s) cannot be stored in a %s output (%s); dropped "
                    "(an .mkv output keeps text subtitles)",
                    self.src.name, s.index, s.codec_context.name, self.dst.suffix or fmt_name, why,
                )
                continue
            ost = out.add_stream_from_template(s)
            ost.time_base = s.time_base
            with contextlib.suppress(Exception):  # default/forced flags
                ost.disposition = s.disposition
            _copy_tags(ost.metadata, s.metadata, enc.keep_metadata)
            self.subs_out[s.index] = ost

        if enc.keep_metadata:
            out.metadata.update(self.inp.metadata)
            if fmt_name in ("mp4", "mov", "ipod"):
                # Write every key (Apple's location, make, model...), not only the iTunes ones.
                flags = out.container_options.get("movflags")
                out.container_options["movflags"] = (
                    f"{flags}+use_metadata_tags" if flags else "use_metadata_tags"
                )
            self._keep_chapters_and_attachments(fmt_name)

        try:
            out.start_encoding()
        except (av.FFmpegError, ValueError, OSError) as e:
            raise OutputError(
                f"{self.dst.name}: cannot open the encoders ({codec.name} video, audio "
                f"{enc.audio}): {_ff_reason(e)}"
            ) from e
        self.drain_audio()

    def _keep_chapters_and_attachments(self, fmt_name: str) -> None:
        """--keep-metadata: chapters and non-picture attachments (fonts) where the container can
        hold them. Pictures (cover art, image attachments) are never copied: deid does not
        anonymize them and they often show a face."""
        name = self.src.name
        chapters = self.inp.chapters()
        if chapters:
            try:
                self.out.set_chapters(chapters)
            except Exception as e:
                log.warning("%s: chapters not kept (%s)", name, _ff_reason(e))
        pictures = [s for s in self.inp.streams.video
                    if s.disposition & av.stream.Disposition.attached_pic]
        for s in self.inp.streams.attachments:
            mime = (s.mimetype or "").lower()
            fname = s.metadata.get("filename") or s.name or f"attachment{s.index}"
            if mime.startswith("image/"):
                pictures.append(s)
                continue
            if fmt_name not in ("matroska",):
                log.warning("%s: attachment %r not kept (a %s output cannot hold attachments)",
                            name, fname, self.dst.suffix or fmt_name)
                continue
            try:
                self.out.add_attachment(fname, s.mimetype or "application/octet-stream", s.data)
            except Exception as e:
                log.warning("%s: attachment %r not kept (%s)", name, fname, _ff_reason(e))
        if pictures:
            log.warning(
                "%s: %d attached picture(s) (cover art) not copied even with --keep-metadata: "
                "deid does not anonymize them", name, len(pictures),
            )

    def encode_frame(self, vf: VideoFrame, image: np.ndarray, rects) -> bool:
        frame = vf._av
        if (frame.width, frame.height, frame.format.name) != self.frame_shape:
            raise InputError(
                f"{self.src.name}: the video changes from {self.frame_shape[0]}x"
                f"{self.frame_shape[1]} {self.frame_shape[2]} to {frame.width}x{frame.height} "
                f"{frame.format.name} at frame {vf.index}; this is not supported"
            )
        dirty = False
        if rects:
            uh, uw = vf.image.shape[:2]
            if not (
                isinstance(image, np.ndarray)
                and image.dtype == np.uint8
                and image.shape == (uh, uw, 3)
            ):
                raise ValueError(
                    f"process must yield ({uh}, {uw}, 3) uint8 images, got "
                    f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', None)}"
                )
            clipped = _clip_rects(rects, uw, uh)
            if clipped:
                k = vf._rotation // 90
                stored = np.rot90(image, -k) if k else image
                sw, sh = frame.width, frame.height
                srects = [_rect_to_stored(r, vf._rotation, sw, sh) for r in clipped]
                frame = _paint_rects(frame, stored, srects, self.reformatters)
                dirty = True
        if self.convert_fmt is not None:  # yuvjXXXp -> yuvXXXp: same samples, full range kept
            frame = frame.reformat(format=self.convert_fmt, src_color_range=2, dst_color_range=2)
        if self.crop is not None:
            frame = _crop_frame(frame, *self.crop)
        frame.pts = vf._out_pts
        frame.time_base = self.vin.time_base
        frame.pict_type = 0  # let the encoder choose frame types
        if frame.duration:
            self.durations[vf._out_pts] = frame.duration
        self._mux_video(self._encode(self.ovs, frame))
        self.drain_audio()
        return dirty

    def _mux_video(self, packets) -> None:
        # Encoders with delay do not reliably carry frame durations through reordering; the
        # muxer uses the last packet's duration for the stream length, so restore the input's.
        for pkt in packets:
            dur = self.durations.pop(pkt.pts, None)
            if dur is not None and pkt.time_base == self.vin.time_base:
                pkt.duration = dur
            self._mux(pkt)

    def finish(self) -> None:
        self.drain_audio()
        self._mux_video(self._encode(self.ovs, None))
        if self.encode.audio == "aac":
            for s in self.audio_in:
                ost = self.audio_out[s.index]
                try:
                    for af in s.codec_context.decode(None):
                        self._encode_audio(af, ost)
                except av.FFmpegError:  # pragma: no cover - decoder already flushed
                    pass
                for pkt in self._encode(ost, None):
                    self._mux(pkt)
                    self.audio_packets += 1
        try:
            self.out.close()
        except av.FFmpegError as e:
            raise OutputError(
                f"{self.dst.name}: finishing the file failed ({_ff_reason(e)})"
            ) from e
        self.out = None

    def close(self) -> None:
        for c in (self.out, self.inp):
            if c is not None:
                try:
                    c.close()
                except Exception:  # closing after an error: nothing more to report
                    pass
        self.out = self.inp = None


def reencode(src: PathLike, dst: PathLike, encode: EncodeOptions, *, stages: Stages = NULL) -> dict:
    """Decode ``src`` and encode it to ``dst`` with ``encode``, no face touched (audio, pts and
    everything else as :func:`transcode_video` keeps them): the floor of ``deid bench`` and the
    reference of examples/reencode_floor.sh. Returns transcode_video's stats."""
    return transcode_video(src, dst, lambda frames: ((f, f.image, []) for f in frames), encode, stages=stages)


def transcode_video(
    src: PathLike,
    dst: PathLike,
    process: ProcessFn,
    encode: EncodeOptions,
    *,
    on_frame: Optional[Callable[[int], None]] = None,
    stages: Stages = NULL,
    threads: bool = True,
    input_container: Any = None,
    output_format: Optional[str] = None,
) -> dict:
    """Decode ``src``, run ``process`` over its frames, encode to ``dst`` and handle audio.

    ``dst`` is the exact path to write (typically the temp path of :func:`atomic_output`);
    the container format is guessed from its extension.

    Pipes: ``input_container`` is an already open input (see :func:`open_stream`; a pipe can
    be read only once), read instead of opening ``src``, which then only names it in messages;
    it is closed here. ``dst`` may be a writable binary file object (see
    :func:`stdout_stream`) instead of a path; ``output_format`` (e.g. "matroska", "mpegts")
    then names the container format, which a path's extension gives otherwise.

    ``process(frames)`` receives an iterator of :class:`VideoFrame` (lazily decoded) and must
    yield, in the same order, one ``(frame, image, rects)`` per input frame: ``image`` is the
    output ``(H, W, 3)`` uint8 RGB upright picture, ``rects`` the dirty rectangles
    ``(x0, y0, x1, y1)`` (upright pixel coordinates, exclusive ends). Pixels outside the
    rectangles are taken from the decoded frame, not from ``image``; with no rectangles the
    decoded frame is encoded as it is. ``process`` may run many frames behind the input.

    Every output frame keeps its input pts (same count, same timestamps, VFR kept). Audio per
    ``encode.audio``: "copy" (packets unchanged), "aac" (re-encoded), "none" (dropped).

    Returns stats: ``frames``, ``dirty_frames``, ``audio_streams``, ``audio_mode``,
    ``audio_packets``, ``video_codec``, ``pix_fmt``, ``width``/``height`` (upright),
    ``rotation``, ``pts_fixed`` (frames whose missing/duplicate pts had to be replaced),
    ``dropped_streams`` (input streams not written: data, pictures, subtitles the output cannot
    hold, extra video ...), ``subtitle_streams``/``subtitle_packets`` (copied),
    ``encoded_size`` (``[w, h]`` stored; smaller than the input only for an odd size the encoder
    cannot store), and the damage found: ``decode_errors``, ``frames_lost``,
    ``decode_error_times`` (see :meth:`_Transcoder._decoded`).

    Stages overlap (``threads=True``): decoding runs in one thread, ``process`` in another,
    and the calling thread encodes and muxes, joined by short bounded queues, so memory does
    not grow with the length of the video. ``stages`` receives the time of "decode" and
    "encode" (``process`` reports its own).

    Raises :class:`InputError` for unreadable input, input without a decodable frame, or a read
    error mid-stream (a damaged packet mid-stream is counted, not raised), and
    :class:`OutputError` when the output cannot be written as asked.
    """
    if encode.audio not in AUDIO_MODES:
        raise ValueError(f"audio must be one of {AUDIO_MODES}, not {encode.audio!r}")
    dst_file = None
    if not isinstance(dst, (str, os.PathLike)):
        if output_format is None:
            raise ValueError("output_format is needed to write to a file object")
        dst_file, dst = dst, "stdout"
    src, dst = Path(src), Path(dst)
    t = _Transcoder(
        src, dst, encode, inp=input_container, dst_file=dst_file, out_format=output_format
    )
    frames = results = None
    try:
        t.open_input()
        decoded = t._decoded()
        try:
            first = next(decoded)
        except StopIteration:
            why = (f"{t.decode_errors} packet(s) failed to decode" if t.decode_errors
                   else "the video stream is empty")
            raise InputError(f"{src.name}: no decodable video frames ({why})") from None
        t.open_output(first)

        n_out = dirty = 0
        frames = timed(t.frames(first, decoded), stages, "decode")
        if threads:
            frames = prefetch(frames, QUEUE_FRAMES, "deid-decode")
        results = process(frames)
        if threads:
            results = prefetch(results, QUEUE_FRAMES, "deid-process")
        for item in results:
            vf, image, rects = item
            if vf.index != n_out:
                raise RuntimeError(
                    f"process yielded frame {vf.index} where frame {n_out} was expected"
                )
            with stages("encode"):
                if t.encode_frame(vf, image, rects):
                    dirty += 1
            n_out += 1
            if on_frame is not None:
                on_frame(n_out)
        if not t.exhausted and next(frames, None) is None:
            pass  # process stopped right at the last frame; the demuxer is now drained
        if not t.exhausted or n_out != t.decoded:
            raise RuntimeError(
                f"process yielded {n_out} frames but {t.decoded} were decoded"
                + ("" if t.exhausted else " and it stopped reading before the end")
            )
        with stages("encode"):
            t.finish()
        n_audio = len(t.audio_out)
        dropped = [
            f"#{s.index} {s.type}"
            for s in t.inp.streams
            if s is not t.vin and s.index not in t.audio_out and s.index not in t.subs_out
        ]
        if dropped:
            log.info("%s: streams not written: %s", src.name, ", ".join(dropped))
        uw, uh = first.width, first.height
        if t.rotation in (90, 270):
            uw, uh = uh, uw
        return {
            "frames": n_out,
            "dirty_frames": dirty,
            "audio_streams": n_audio,
            "audio_mode": encode.audio if n_audio else "none",
            "audio_packets": t.audio_packets,
            "video_codec": _video_encoder(encode.codec).name,
            "pix_fmt": t.convert_fmt or first.format.name,
            "width": uw,
            "height": uh,
            "rotation": t.rotation,
            "pts_fixed": t.pts_fixed,
            "dropped_streams": dropped,
            "subtitle_streams": len(t.subs_out),
            "subtitle_packets": t.subtitle_packets,
            "decode_errors": t.decode_errors,
            "frames_lost": t.frames_lost,
            "decode_error_times": list(t.decode_error_times),
            "encoded_size": list(t.crop) if t.crop else [first.width, first.height],
        }
    finally:
        # Stop the worker threads (consumer side first) before the containers they use close.
        for g in (results, frames):
            if g is not None and hasattr(g, "close"):
                g.close()
        t.close()


# --------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------
