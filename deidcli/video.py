"""Media I/O with PyAV: probe, decode, encode, mux, images and atomic output.

Everything that touches a media file lives here; the rest of the pipeline only sees
``VideoFrame.image`` arrays and hands back processed arrays plus dirty rectangles.

Array contract at this boundary: images are ``(H, W, 3)`` ``uint8`` RGB, C-contiguous,
*upright* (the container's display rotation / EXIF orientation already applied).
Rectangles are ``(x0, y0, x1, y1)`` in upright pixel coordinates, ``x1``/``y1`` exclusive.

Policies (see the README for the user-facing wording):

* Timing: every output frame keeps its input frame's pts in the input's time base
  (variable frame rate is preserved, nothing is resampled to a fixed rate).
* Pixels: outside the dirty rectangles the decoded planes go to the encoder untouched;
  only the rectangles are converted RGB->YUV, with the frame's own matrix and range.
  The output keeps the input's pixel format (10-bit stays 10-bit when the encoder can
  do it, otherwise an :class:`InputError`) and its colour tags.
* Rotation: frames are rotated upright for processing, rotated back to the stored
  orientation before encoding, and the input's display matrix is written unchanged.
* Audio: ``copy`` (packets byte for byte), ``aac`` (re-encode), ``none`` (drop).
  A container that cannot hold the copied audio raises :class:`OutputError` before any
  frame is written.
* Subtitles: copied packet for packet when the output container can hold them (text
  subtitles in .mkv, mov_text in .mp4), otherwise dropped with a warning.
* Metadata: container and stream tags (GPS location, creation time, title, device, the
  source's encoder and handler names ...) and chapters are dropped unless ``keep_metadata``;
  only the streams' ``language`` tag is kept. Data streams (telemetry, GPS tracks) are never
  copied, nor are pictures (cover art, image attachments: deid does not anonymize them);
  ``keep_metadata`` keeps tags, chapters and font attachments where the container allows.
* Damage: a video packet the decoder rejects is skipped, a frame it conceals is kept; the
  errors, the frames lost and the times of the affected frames are reported
  (``decode_errors``, ``frames_lost``, ``decode_error_times``) and logged as a warning.
* Odd sizes: an encoder that cannot store the size in the pixel format (H.264/HEVC 4:2:0 at
  641x361) gets the last column/row cropped, with a warning.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import select
import struct
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import av
import numpy as np

from .errors import InputError, OutputError
from .options import AUDIO_MODES, EncodeOptions
from .stages import NULL, QUEUE_FRAMES, Stages, prefetch, timed

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Rect = tuple[int, int, int, int]

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})

# Video encoders we suggest when the requested one does not exist (only those present are named).
_KNOWN_VIDEO_ENCODERS = (
    "libx264",
    "libx265",
    "h264_nvenc",
    "hevc_nvenc",
    "libvpx-vp9",
    "libsvtav1",
    "libaom-av1",
    "mpeg4",
    "ffv1",
)
# x264-style preset names -> NVENC p1..p7.
_NVENC_PRESETS = {
    "ultrafast": "p1",
    "superfast": "p1",
    "veryfast": "p2",
    "faster": "p3",
    "fast": "p3",
    "medium": "p4",
    "slow": "p5",
    "slower": "p6",
    "veryslow": "p7",
    "placebo": "p7",
}
# AVColorSpace -> swscale SWS_CS_* (what VideoFrame.reformat expects for *_colorspace).
_AVCOL_SPC_TO_SWS = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
# FFmpeg's default channel layout per channel count (for sources with an unknown order).
_DEFAULT_LAYOUTS = {
    1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"
}
# Stream tags that are kept even without keep_metadata (not identifying).
_SAFE_STREAM_TAGS = ("language",)


def media_kind(path: PathLike) -> Optional[str]:
    """``"image"``, ``"video"`` or ``None``, from the file extension (case-insensitive)."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


# --------------------------------------------------------------------------------------
# probing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about the main video stream of a file."""

    width: int  # upright (display) width, i.e. after rotation
    height: int  # upright (display) height
    rotation: int  # display rotation, counter-clockwise degrees: 0, 90, 180 or 270
    frames: int  # frame count from the container, 0 if unknown
    time_base: Fraction
    average_rate: Optional[Fraction]
    duration: Optional[float]  # seconds
    pix_fmt: str  # decoded pixel format, e.g. "yuv420p", "yuv420p10le"
    bit_depth: int  # bits per sample (8, 10, ...)
    codec: str  # decoder name, e.g. "h264"
    audio_streams: int
    color_range: int  # AVColorRange: 0 unspecified, 1 limited (tv), 2 full (pc)
    colorspace: int  # AVColorSpace (matrix): 1 bt709, 5 bt470bg, 6 smpte170m, 2 unspecified ...
    color_primaries: int = 2  # AVColorPrimaries
    color_trc: int = 2  # AVColorTransferCharacteristic
    coded_width: int = 0  # stored size (before rotation)
    coded_height: int = 0


def _ff_reason(exc: BaseException) -> str:
    """One-line reason from an FFmpeg/OS error (no errno, no path)."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(reason).split())


def _mp4_without_moov(path: Path) -> bool:
    """True if ``path`` starts like an MP4/MOV file but has no ``moov`` box (the index, written
    last by most recorders): a recording that was cut short or copied incompletely."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            pos, first = 0, True
            while pos + 8 <= size:
                f.seek(pos)
                head = f.read(16)
                n, kind = struct.unpack(">I4s", head[:8])
                if first and kind not in (b"ftyp", b"wide", b"free", b"skip", b"mdat"):
                    return False  # not an ISO media file at all
                first = False
                if kind == b"moov":
                    return False
                if n == 1 and len(head) >= 16:
                    n = struct.unpack(">Q", head[8:16])[0]
                elif n == 0:
                    n = size - pos  # box runs to the end of the file
                if n < 8:
                    return True  # garbage where a box header should be
                pos += n
            return not first
    except OSError:
        return False


def _open_input(path: PathLike) -> "av.container.InputContainer":
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not a video file")
    try:
        empty = p.stat().st_size == 0
    except OSError as e:
        raise InputError(f"{p.name}: cannot read the file ({_ff_reason(e)})") from e
    if empty:
        raise InputError(f"{p.name}: file is empty (0 bytes)")
    try:
        return av.open(str(p), "r", metadata_errors="replace")
    except PermissionError as e:
        raise InputError(f"{p.name}: cannot read the file: permission denied") from e
    except EOFError as e:
        raise InputError(
            f"{p.name}: the file ends before any video data (truncated, or an empty container)"
        ) from e
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        if _mp4_without_moov(p):
            raise InputError(
                f"{p.name}: truncated or incomplete MP4 (moov atom not found); it was probably "
                f"not copied or recorded completely"
            ) from e
        raise InputError(
            f"{p.name}: not a media file, or a damaged one ({_ff_reason(e)})"
        ) from e


def _video_stream(container, name: str):
    for s in container.streams.video:
        if not (s.disposition & av.stream.Disposition.attached_pic):
            return s
    if container.streams.audio:
        raise InputError(f"{name}: no video stream (audio-only file)")
    if container.streams.video:
        raise InputError(f"{name}: no video stream (only a cover picture)")
    raise InputError(f"{name}: no video stream")


def _first_frame(container, vs, name: str, max_errors: int = 250):
    """The first decodable frame of ``vs``; packets the decoder rejects before it are skipped
    (a damaged start is reported by the transcode, not fatal). :class:`InputError` if none."""
    errors, reason = 0, ""
    for packet in container.demux(vs):
        try:
            frames = packet.decode()
        except av.FFmpegError as e:
            errors, reason = errors + 1, _ff_reason(e)
            if errors >= max_errors:
                break
            continue
        if frames:
            return frames[0]
    if errors:
        raise InputError(
            f"{name}: no decodable video frames ({errors} packet(s) failed to decode: {reason})"
        )
    raise InputError(f"{name}: no decodable video frames (the video stream is empty)")


def _check_truncated(container, path: Path) -> None:
    """MP4/MOV index every sample; a sample that ends past EOF means the file was cut short."""
    if "mp4" not in container.format.name and "mov" not in container.format.name:
        return
    try:
        size = path.stat().st_size
    except OSError:
        return
    for s in container.streams:
        if s.type not in ("video", "audio"):
            continue
        entries = s.index_entries
        n = len(entries)
        if n == 0:
            continue
        # Samples are stored in file order within a track; the last few cover the end.
        end = max(entries[i].pos + entries[i].size for i in range(max(0, n - 4), n))
        if end > size:
            pct = 100.0 * size / end
            raise InputError(
                f"{path.name}: file is truncated (only {size} of at least {end} bytes, "
                f"{pct:.0f}%); it was probably not copied or recorded completely"
            )


def _display_matrix(frame) -> Optional[tuple[int, ...]]:
    """The frame's DISPLAYMATRIX side data as FFmpeg's 9 int32, or None."""
    try:
        for sd in frame.side_data:
            if str(getattr(sd, "type", "")).endswith("DISPLAYMATRIX"):
                raw = bytes(sd)
                if len(raw) >= 36:
                    return struct.unpack("<9i", raw[:36])
    except Exception:  # pragma: no cover - side-data API differences across PyAV versions
        return None
    return None


def _rotation(frame) -> int:
    """Counter-clockwise display rotation of a decoded frame, normalised to 0/90/180/270."""
    try:
        r = float(frame.rotation)
    except Exception:  # pragma: no cover
        return 0
    if math.isnan(r):
        return 0
    q = int(round(r / 90.0)) * 90
    if abs(q - r) > 1:
        log.warning("display rotation %.1f is not a multiple of 90 degrees; using %d", r, q % 360)
    return q % 360


def _bit_depth(fmt: str) -> int:
    try:
        return max(c.bits for c in av.VideoFormat(fmt).components)
    except Exception:  # pragma: no cover
        return 8


def _stream_duration(vs, container) -> Optional[float]:
    """Video stream duration in seconds: stream field, Matroska DURATION tag, else container's."""
    if vs.duration and vs.time_base:
        return float(vs.duration * vs.time_base)
    tag = vs.metadata.get("DURATION") or vs.metadata.get("duration")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if container.duration:
        return container.duration / 1_000_000
    return None


def probe(path: PathLike) -> VideoInfo:
    """Read the container and the first video frame of ``path``.

    Raises :class:`InputError` (one-line message) for a missing, garbage, truncated or
    undecodable file, or one without a video stream.
    """
    p = Path(path)
    container = _open_input(p)
    try:
        vs = _video_stream(container, p.name)
        _check_truncated(container, p)
        try:
            first = _first_frame(container, vs, p.name)
        except av.FFmpegError as e:  # reading the file itself failed
            raise InputError(f"{p.name}: cannot read video ({_ff_reason(e)})") from e
        rot = _rotation(first)
        w, h = first.width, first.height
        uw, uh = (h, w) if rot in (90, 270) else (w, h)
        tb = vs.time_base or Fraction(1, 90000)
        duration = _stream_duration(vs, container)
        fmt = first.format.name
        return VideoInfo(
            width=uw,
            height=uh,
            rotation=rot,
            frames=int(vs.frames or 0),
            time_base=tb,
            average_rate=vs.average_rate,
            duration=duration,
            pix_fmt=fmt,
            bit_depth=_bit_depth(fmt),
            codec=vs.codec_context.name,
            audio_streams=len(container.streams.audio),
            color_range=int(first.color_range),
            colorspace=int(first.colorspace),
            color_primaries=int(first.color_primaries),
            color_trc=int(first.color_trc),
            coded_width=w,
            coded_height=h,
        )
    finally:
        container.close()


# --------------------------------------------------------------------------------------
# frames and pixel plumbing
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class VideoFrame:
    """One decoded frame as the pipeline sees it.

    ``image`` is ``(H, W, 3)`` uint8 RGB, upright, C-contiguous (H, W = display size).
    ``pts`` is the original pts in the stream time base (``None`` if the stream had none).
    """

    index: int  # 0-based, decode (= presentation) order
    image: np.ndarray
    pts: Optional[int]
    time: Optional[float] = None  # seconds, pts * time_base
    _av: Any = field(default=None, repr=False)  # the decoded av.VideoFrame (stored orientation)
    _out_pts: int = field(default=0, repr=False)  # strictly increasing pts used for encoding
    _rotation: int = field(default=0, repr=False)


@dataclass(frozen=True)
class _PlaneLayout:
    bpp: int  # bytes per pixel in this plane
    sw: int  # log2 horizontal subsampling
    sh: int  # log2 vertical subsampling


_LAYOUTS: dict[str, tuple[_PlaneLayout, ...]] = {}


def _plane_layouts(fmt: str) -> tuple[_PlaneLayout, ...]:
    """Bytes per pixel and subsampling of every plane of ``fmt`` (measured on a 256x256 frame)."""
    if fmt not in _LAYOUTS:
        vf = av.VideoFormat(fmt)
        if vf.has_palette or vf.is_bayer or vf.is_bit_stream:
            raise InputError(f"pixel format {fmt} is not supported")
        probe_frame = av.VideoFrame(256, 256, fmt)
        layouts = []
        for pl in probe_frame.planes:
            bpp = pl.line_size // pl.width
            layouts.append(
                _PlaneLayout(
                    bpp=bpp,
                    sw=int(round(math.log2(256 / pl.width))),
                    sh=int(round(math.log2(256 / pl.height))),
                )
            )
        _LAYOUTS[fmt] = tuple(layouts)
    return _LAYOUTS[fmt]


def _plane_bytes(plane, rows: int) -> np.ndarray:
    """2-D uint8 view (rows, line_size) of a frame plane's buffer."""
    buf = np.frombuffer(plane, dtype=np.uint8)
    return buf[: rows * plane.line_size].reshape(rows, plane.line_size)


def _rect_to_stored(rect: Rect, rotation: int, stored_w: int, stored_h: int) -> Rect:
    """Map an upright rectangle to the stored (coded) orientation.

    The upright image is ``np.rot90(stored, rotation // 90)``.
    """
    x0, y0, x1, y1 = rect
    if rotation == 90:
        return (stored_w - y1, x0, stored_w - y0, x1)
    if rotation == 180:
        return (stored_w - x1, stored_h - y1, stored_w - x0, stored_h - y0)
    if rotation == 270:
        return (y0, stored_h - x1, y1, stored_h - x0)
    return rect


def _clip_rects(rects: Sequence[Sequence[int]], w: int, h: int) -> list[Rect]:
    out = []
    for r in rects:
        x0, y0 = int(math.floor(r[0])), int(math.floor(r[1]))
        x1, y1 = int(math.ceil(r[2])), int(math.ceil(r[3]))
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(w, x1), min(h, y1)
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1, y1))
    return out


# swscale flags. Without ACCURATE_RND (+ full chroma interpolation on the way to RGB) the
# YUV -> RGB -> YUV round trip darkens luma by ~1 code value: a visible seam around a rect.
_SWS_TO_RGB = int(
    av.video.reformatter.Interpolation.BILINEAR
    | av.video.reformatter.Interpolation.ACCURATE_RND
    | av.video.reformatter.Interpolation.FULL_CHR_H_INT
)
_SWS_FROM_RGB = int(
    av.video.reformatter.Interpolation.BILINEAR | av.video.reformatter.Interpolation.ACCURATE_RND
)


def _to_rgb(frame, reformatter=None) -> np.ndarray:
    """Decoded frame -> (H, W, 3) uint8 RGB, stored orientation, the frame's own matrix/range.

    reformatter: an ``av.video.reformatter.VideoReformatter`` kept across the frames of a video
    (one per thread): it keeps its swscale context while the size and format stay the same,
    where ``frame.to_ndarray`` builds one per call (720p: 2.4 -> 1.4 ms a frame).
    """
    if reformatter is None:
        return frame.to_ndarray(format="rgb24", interpolation=_SWS_TO_RGB)
    return reformatter.reformat(frame, format="rgb24", interpolation=_SWS_TO_RGB).to_ndarray()


# Patches converted RGB->YUV by _paint_rects are this many pixels (width and height rounded up),
# so that the few sizes a video's faces give reuse their swscale contexts (_Reformatters).
PAINT_STEP = 32


class _Reformatters:
    """Long-lived swscale contexts, one per patch size (building one takes ~3 ms, more than
    converting a face-sized patch with it: 0.35 ms), least recently used dropped past ``keep``.
    One thread uses an instance."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._by_size: dict[tuple[int, int], Any] = {}

    def get(self, size: tuple[int, int]):
        rf = self._by_size.pop(size, None)
        if rf is None:
            rf = av.video.reformatter.VideoReformatter()
            if len(self._by_size) >= self.keep:
                self._by_size.pop(next(iter(self._by_size)))
        self._by_size[size] = rf  # most recently used last
        return rf


def _patch_span(a0: int, a1: int, n: int, align: int) -> tuple[int, int]:
    """A span [b0, b1) of [0, n) holding [a0, a1), its length rounded up to PAINT_STEP where the
    frame allows, starting on a multiple of ``align`` (a0 is one)."""
    length = min(n, -(-(a1 - a0) // PAINT_STEP) * PAINT_STEP)
    b0 = min(a0, n - length)
    b0 -= b0 % align
    return b0, min(n, b0 + length)


def _paint_rects(frame, stored_rgb: np.ndarray, rects: list[Rect], reformatters: Optional[_Reformatters] = None):
    """Write ``stored_rgb`` into ``frame`` inside ``rects`` (stored coordinates), in place.

    Only the (chroma-aligned) rectangles are written, converted RGB->YUV with the frame's
    colour matrix and range; every other byte of the planes is left as decoded. With
    ``reformatters`` (kept across a video's frames) each rectangle is converted as part of a
    patch whose size is a multiple of PAINT_STEP, so its swscale context is reused; only the
    rectangle is copied back (chroma at its edges then sees the real neighbouring pixels rather
    than replicated edge ones).
    """
    fmt = frame.format.name
    layouts = _plane_layouts(fmt)
    ax = 1 << max(lay.sw for lay in layouts)
    ay = 1 << max(lay.sh for lay in layouts)
    W, H = frame.width, frame.height
    cs = _AVCOL_SPC_TO_SWS.get(int(frame.colorspace))
    rng = int(frame.color_range) or None
    frame.make_writable()
    planes = frame.planes
    dst_views = [
        _plane_bytes(pl, -(-H // (1 << lay.sh)))
        for pl, lay in zip(planes, layouts)
    ]
    kw: dict[str, Any] = {"format": fmt, "interpolation": _SWS_FROM_RGB}
    if cs is not None:
        kw["dst_colorspace"] = cs
    if rng is not None:
        kw["dst_color_range"] = rng
    for x0, y0, x1, y1 in rects:
        x0, y0 = x0 - x0 % ax, y0 - y0 % ay
        x1 = min(W, -(-x1 // ax) * ax)
        y1 = min(H, -(-y1 // ay) * ay)
        if reformatters is None:
            bx0, bx1, by0, by1 = x0, x1, y0, y1
        else:
            bx0, bx1 = _patch_span(x0, x1, W, ax)
            by0, by1 = _patch_span(y0, y1, H, ay)
        patch = av.VideoFrame.from_ndarray(np.ascontiguousarray(stored_rgb[by0:by1, bx0:bx1]), format="rgb24")
        if reformatters is None:
            yuv = patch.reformat(**kw)
        else:
            yuv = reformatters.get((bx1 - bx0, by1 - by0)).reformat(patch, **kw)
        for p, lay in enumerate(layouts):
            py0, py1 = y0 >> lay.sh, -(-y1 // (1 << lay.sh))
            px0, px1 = x0 >> lay.sw, -(-x1 // (1 << lay.sw))
            oy, ox = by0 >> lay.sh, bx0 >> lay.sw  # the patch's origin in this plane
            src = _plane_bytes(yuv.planes[p], py1 - oy)[py0 - oy:]
            b0 = (px0 - ox) * lay.bpp
            nbytes = (px1 - px0) * lay.bpp
            dst_views[p][py0:py1, px0 * lay.bpp : px0 * lay.bpp + nbytes] = src[:, b0:b0 + nbytes]
    return frame


# --------------------------------------------------------------------------------------
# encoder / muxer setup
# --------------------------------------------------------------------------------------


def _available_video_encoders() -> list[str]:
    names = []
    for n in _KNOWN_VIDEO_ENCODERS:
        try:
            if av.Codec(n, "w").type == "video":
                names.append(n)
        except Exception:
            pass
    return names


def _video_encoder(name: str):
    try:
        codec = av.Codec(name, "w")
    except Exception:
        codec = None
    if codec is None or codec.type != "video":
        alts = ", ".join(_available_video_encoders()) or "none found"
        raise OutputError(f"unknown video encoder {name!r}; available: {alts}")
    return codec


def _encoder_options(codec_name: str, encode: EncodeOptions) -> dict[str, str]:
    """crf/preset translated to the options this encoder actually has."""
    try:
        ctx = av.CodecContext.create(codec_name, "w")
        private = {o.name for o in ctx.supported_options.private}
    except Exception:  # pragma: no cover
        private = set()
    opts: dict[str, str] = {}
    is_nvenc = codec_name.endswith("_nvenc")
    if "crf" in private:
        opts["crf"] = str(encode.crf)
    elif "cq" in private:
        opts["cq"] = str(encode.crf)
        if is_nvenc:
            opts["rc"] = "vbr"
    if "preset" in private and encode.preset:
        preset = encode.preset
        if is_nvenc:
            preset = _NVENC_PRESETS.get(preset, preset)
        if codec_name == "libsvtav1" and not preset.isdigit():
            preset = ""  # SVT-AV1 presets are numbers; keep its default
        if preset:
            opts["preset"] = preset
    if "x265-params" in private:
        opts["x265-params"] = "log-level=error"
    return opts


def _output_pix_fmt(fmt: str, codec, src_name: str) -> str:
    """The encoder pixel format for decoded format ``fmt``: the same one, or refuse."""
    supported = {f.name for f in (codec.video_formats or ())}
    if not supported or fmt in supported:
        return fmt
    if fmt.startswith("yuvj") and "yuv" + fmt[4:] in supported:
        return "yuv" + fmt[4:]  # same samples, full range carried by the colour tag
    depth = _bit_depth(fmt)
    able = [
        n
        for n in _available_video_encoders()
        if fmt in {f.name for f in (av.Codec(n, "w").video_formats or ())}
    ]
    hint = f"; encoders that can: {', '.join(able)}" if able else ""
    if depth > 8:
        raise InputError(
            f"{src_name}: {depth}-bit video ({fmt}) is not supported by encoder "
            f"{codec.name}{hint} (deid does not reduce the bit depth silently)"
        )
    raise InputError(f"{src_name}: pixel format {fmt} cannot be encoded by {codec.name}{hint}")


# Audio codecs MPEG-TS has a standard mapping for (others would be written as private data).
_MPEGTS_AUDIO = frozenset(
    {"aac", "aac_latm", "mp3", "mp2", "mp1", "ac3", "eac3", "opus", "dts", "truehd"}
)


def _check_audio_copy(fmt_name: str, streams: list, dst: Path) -> None:
    """Dry-run: can this muxer hold these audio streams as they are? OutputError if not.

    PCM into MP4 is refused too: FFmpeg can write it (ISO 23003-5 ``ipcm``) but most
    players cannot play it.
    """
    for s in streams:
        codec = s.codec_context.name
        try:
            if codec.startswith("pcm_") and fmt_name in ("mp4", "ipod"):
                raise ValueError("PCM audio in MP4 does not play in most players")
            if fmt_name == "mpegts" and codec not in _MPEGTS_AUDIO:
                raise ValueError("the MPEG-TS muxer writes it as an unreadable private stream")
            with av.open(io.BytesIO(), "w", format=fmt_name) as probe_out:
                probe_out.add_stream_from_template(s)
                probe_out.start_encoding()
        except Exception as e:
            raise OutputError(
                f"{dst.suffix or fmt_name} output cannot hold the input's "
                f"{codec} audio (stream #{s.index}) as it is; "
                f"use --audio aac, --audio none, or an .mkv output"
                + (" (--format matroska on a pipe)" if fmt_name == "mpegts" else "")
            ) from e


def _cannot_copy(fmt_name: str, stream) -> Optional[str]:
    """Dry-run: why this muxer cannot hold ``stream`` copied as it is, or None if it can."""
    try:
        with av.open(io.BytesIO(), "w", format=fmt_name) as probe_out:
            probe_out.add_stream_from_template(stream)
            probe_out.start_encoding()
    except Exception as e:
        return _ff_reason(e)
    return None


def _encodable_size(codec_name: str, pix_fmt: str, w: int, h: int, enc: EncodeOptions
                    ) -> tuple[int, int]:
    """(w, h), or the size cropped to the chroma subsampling when the encoder refuses odd sizes
    in this pixel format (H.264/HEVC cannot store 641x361 in 4:2:0: crop units are 2 pixels)."""
    lay = _plane_layouts(pix_fmt)
    ax, ay = 1 << max(p.sw for p in lay), 1 << max(p.sh for p in lay)
    if w % ax == 0 and h % ay == 0:
        return w, h
    try:
        ctx = av.CodecContext.create(codec_name, "w")
        ctx.width, ctx.height, ctx.pix_fmt = w, h, pix_fmt
        ctx.time_base, ctx.framerate = Fraction(1, 25), Fraction(25)
        ctx.options = _encoder_options(codec_name, enc)
        ctx.open()
        return w, h
    except Exception:
        return w - w % ax, h - h % ay


def _crop_frame(frame, w: int, h: int):
    """A new frame with the top-left ``w`` x ``h`` of ``frame`` (sizes aligned to its chroma)."""
    fmt = frame.format.name
    out = av.VideoFrame(w, h, fmt)
    for src, dst, lay in zip(frame.planes, out.planes, _plane_layouts(fmt)):
        rows = -(-h // (1 << lay.sh))
        nbytes = -(-w // (1 << lay.sw)) * lay.bpp
        _plane_bytes(dst, rows)[:, :nbytes] = _plane_bytes(src, rows)[:, :nbytes]
    for attr in ("colorspace", "color_range", "color_primaries", "color_trc", "duration"):
        with contextlib.suppress(Exception):
            setattr(out, attr, getattr(frame, attr))
    return out


_AAC_RATES = (
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350
)
_AAC_OBJECT_TYPES = {"Main": 1, "LC": 2, "SSR": 3, "LTP": 4}  # the profiles ADTS can signal


def _aac_config_for_stream(src_stream, ost) -> None:
    """AAC read from MPEG-TS (ADTS) has no AudioSpecificConfig; Matroska written to a pipe
    needs it in the header, before the first packet could supply it. Build it from the stream
    parameters (the muxer strips the ADTS headers from the copied packets itself)."""
    ctx = src_stream.codec_context
    if ctx.name != "aac" or ctx.extradata:
        return
    rate, channels = ctx.sample_rate, ctx.layout.nb_channels
    if rate not in _AAC_RATES or not 1 <= channels <= 8 or channels == 7:
        return  # the muxer then refuses with its own error
    aot = _AAC_OBJECT_TYPES.get(str(ctx.profile), 2)
    chan_cfg = 7 if channels == 8 else channels
    asc = (aot << 11) | (_AAC_RATES.index(rate) << 7) | (chan_cfg << 3)  # AudioSpecificConfig
    ost.codec_context.extradata = asc.to_bytes(2, "big")


def _copy_tags(
    dst: dict, src: dict, keep_all: bool, keys: Sequence[str] = _SAFE_STREAM_TAGS
) -> None:
    for k, v in src.items():
        if keep_all or k in keys:
            dst[k] = v
    if keep_all and "name" in src and "title" not in src:
        dst["title"] = src["name"]  # the MOV/MP4 demuxer reads a track title back as "name"


# --------------------------------------------------------------------------------------
# transcoding
# --------------------------------------------------------------------------------------

ProcessFn = Callable[
    [Iterator[VideoFrame]], Iterator[tuple[VideoFrame, np.ndarray, Sequence[Sequence[int]]]]
]


class _Transcoder:
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
        rate = ost.codec_context.sample_rate
        if af.pts is not None and af.time_base:
            af.pts = int(round(af.pts * af.time_base * rate))
        af.time_base = Fraction(1, rate)
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


def read_image(path: PathLike) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB, upright (EXIF orientation applied).

    Alpha is dropped; 16-bit images are scaled to 8 bits. :class:`InputError` if unreadable.
    """
    import cv2

    p = Path(path)
    try:
        data = np.fromfile(str(p), dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as e:
        raise InputError(f"{p.name}: cannot read ({_ff_reason(e)})") from e
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise InputError(f"{p.name}: not a readable image")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def write_image(path: PathLike, image: np.ndarray) -> None:
    """Write ``(H, W, 3)`` uint8 RGB ``image``; format from the extension (jpg q95, png, webp q95).

    No metadata (EXIF, GPS, ICC, text chunks) is written. :class:`OutputError` on failure.
    """
    import cv2

    p = Path(path)
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise ValueError(
            f"image must be (H, W, 3) uint8 RGB, got {getattr(image, 'shape', None)} "
            f"{getattr(image, 'dtype', None)}"
        )
    ext = p.suffix.lower()
    params: list[int]
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, 95]
    elif ext == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 95]
    else:
        raise OutputError(f"{p.name}: unsupported image format {ext or '(none)'}")
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image[:, :, ::-1]), params)
    if not ok:
        raise OutputError(f"{p.name}: could not encode the image")
    try:
        with open(p, "wb") as f:
            f.write(buf.tobytes())
    except OSError as e:
        raise OutputError(f"{p.name}: cannot write ({_ff_reason(e)})") from e


# --------------------------------------------------------------------------------------
# atomic output
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(dst: PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``dst`` (hidden, same extension); rename it to ``dst`` on success.

    On any exception, KeyboardInterrupt and SystemExit included, the temp file is removed
    and the exception re-raised: ``dst`` is never partially written. The mechanism is
    :func:`deidcli.jobs.atomic_file`; here a temp file that cannot be created is an OutputError.
    """
    from .jobs import atomic_file

    dst = Path(dst)
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_file(dst))
        except OSError as e:
            raise OutputError(f"{dst}: cannot create output ({_ff_reason(e)})") from e
        yield tmp


# --------------------------------------------------------------------------------------
# pipes: `deid anonymize - -` (stdin / stdout)
# --------------------------------------------------------------------------------------

#: Top-level MP4/MOV boxes that may come before ``moov``/``mdat`` (skipped when peeking).
_MP4_LEADING_BOXES = frozenset({b"ftyp", b"styp", b"free", b"skip", b"wide", b"pdin", b"uuid"})
_MP4_PEEK_LIMIT = 1 << 20


class _Replay:
    """Non-seekable reader of a stream: ``head`` (bytes peeked at) first, then the rest of ``f``.

    It has no ``seek``/``tell``: PyAV then tells FFmpeg the input is a stream. On a real file
    descriptor (a pipe) it waits for data in short slices and reads as ended once ``abort`` is
    set: a signal while upstream is silent would otherwise wait for upstream's next byte.
    """

    def __init__(self, f, abort: Optional[threading.Event] = None):
        self.head = b""
        self.abort = abort
        self.pending: Optional[BaseException] = None  # raised by a signal handler while reading
        try:
            self.fd: Optional[int] = f.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        self._read = getattr(f, "read1", None) or f.read

    def raw(self, n: int) -> bytes:
        """Up to ``n`` bytes from ``f``, what is there (not waiting for ``n``); b"" at the end."""
        if self.fd is None:
            return self._read(n)
        try:
            while not (self.abort is not None and self.abort.is_set()):
                if select.select([self.fd], [], [], 0.2)[0]:
                    return os.read(self.fd, n)
        except Exception:
            raise  # a read error: PyAV passes it on
        except BaseException as e:
            # A signal handler raised (Ctrl-C, the CLI's SIGTERM) while the main thread waited
            # here, maybe inside FFmpeg's read callback, which cannot pass it on: end the stream
            # and keep it for the caller to raise (see open_stream).
            self.pending = e
        return b""

    def read(self, n: int = -1) -> bytes:
        n = n if n and n > 0 else 1 << 16
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.raw(n)

    def readable(self) -> bool:
        return True


class _StreamWriter:
    """Write-only, non-seekable view of a binary file (PyAV does not seek or close it)."""

    def __init__(self, f):
        self.f = f

    def write(self, b) -> int:
        self.f.write(b)
        return len(b)

    def writable(self) -> bool:
        return True


def _mp4_moov_at_end(read: Callable[[int], bytes]) -> tuple[bytes, bool]:
    """Peek at the top-level boxes of a stream: (bytes read, True if it is an MP4/MOV whose
    ``mdat`` comes before ``moov``, i.e. one that can only be read from a seekable file)."""
    head = b""
    pos = 0
    while pos <= _MP4_PEEK_LIMIT:
        while len(head) < pos + 16:
            chunk = read(pos + 16 - len(head))
            if not chunk:
                return head, False
            head += chunk
        size = int.from_bytes(head[pos:pos + 4], "big")
        kind = head[pos + 4:pos + 8]
        if kind in (b"moov", b"moof"):
            return head, False  # streamable (faststart or fragmented)
        if kind == b"mdat":
            return head, True
        if kind not in _MP4_LEADING_BOXES:
            return head, False  # not an MP4/MOV at all (Matroska, MPEG-TS, ...), or unknown layout
        if size == 1:
            size = int.from_bytes(head[pos + 8:pos + 16], "big")
        if size < 8:
            return head, False  # box up to the end of the file, or garbage
        pos += size
    return head, False


def open_stream(f=None, name: str = "stdin",
                abort: Optional[threading.Event] = None) -> "av.container.InputContainer":
    """Open a video stream from a binary file object (default: this process's stdin), once.

    A pipe can be read only once: the container returned here is the one to decode (pass it
    to :func:`transcode_video` as ``input_container``). A regular file redirected to stdin
    (``< in.mp4``) stays seekable, so any MP4 works; on a pipe an MP4/MOV with its index
    (``moov``) at the end cannot be read and is refused here with a one-line
    :class:`InputError`, before any model is loaded. Matroska, MPEG-TS, fragmented or
    "faststart" MP4 stream fine. Once ``abort`` is set, a pipe reads as ended (see
    :class:`_Replay`).
    """
    if f is None:
        if sys.stdin is None or os.isatty(0):
            raise InputError(
                f"{name}: is a terminal; pipe a video into it "
                "(e.g. `... -f matroska - | deid anonymize - out.mp4`)"
            )
        f = sys.stdin.buffer
    try:
        seekable = f.seekable() and f.tell() == 0
        if seekable and not f.read(1):
            raise InputError(f"{name}: no data (empty input)")
        if seekable:
            f.seek(0)
    except (AttributeError, OSError, ValueError):
        seekable = False
    src = f
    if not seekable:
        src = _Replay(f, abort)
        try:
            head, moov_at_end = _mp4_moov_at_end(src.raw)
        except OSError as e:
            raise InputError(f"{name}: cannot read ({_ff_reason(e)})") from e
        if src.pending is not None:
            raise src.pending
        if not head:
            raise InputError(f"{name}: no data (empty input)")
        if moov_at_end:
            raise InputError(
                f"{name}: this MP4/MOV has its index (moov) at the end and cannot be read from "
                "a pipe; send a streamable format instead, "
                "e.g. `ffmpeg -i in.mp4 -c copy -f matroska -`, "
                "or give the file's path"
            )
        src.head = head  # replayed to FFmpeg first
    try:
        container = av.open(src, "r", metadata_errors="replace")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        if getattr(src, "pending", None) is not None:
            raise src.pending from None
        raise InputError(f"{name}: not a readable video stream ({_ff_reason(e)})") from e
    if getattr(src, "pending", None) is not None:  # a signal ended the stream early
        container.close()
        raise src.pending
    try:
        _video_stream(container, name)
    except InputError:
        container.close()
        raise
    return container


def stream_rate(container) -> Optional[Fraction]:
    """Average frame rate of the main video stream of an open container (None if unknown)."""
    vs = _video_stream(container, "input")
    return vs.average_rate or vs.guessed_rate or None


@contextlib.contextmanager
def stdout_stream() -> Iterator[Any]:
    """Yield a writable, non-seekable binary file on this process's stdout, for the video.

    Meanwhile file descriptor 1 points at stderr, so nothing else (``print``, a library
    loading a model, C code) can slip into the stream; it is restored on the way out. On a
    normal exit the stream is flushed (:class:`OutputError` if that fails, e.g. the reader
    went away); after an error it is simply cut.
    """
    sys.stdout.flush()
    video_fd = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(video_fd, "wb")
    ok = False
    try:
        yield _StreamWriter(out)
        ok = True
    finally:
        try:
            if ok:
                try:
                    out.flush()
                except OSError as e:
                    raise OutputError(f"stdout: writing failed ({_ff_reason(e)})") from e
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()  # anything printed meanwhile goes to stderr, not the video
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL(None).fflush(None)  # the same for C stdio buffers
            os.dup2(video_fd, 1)
            with contextlib.suppress(OSError):
                out.close()
