"""Probing: what a media file holds (VideoInfo), opening inputs, rotation and display matrix,
truncated-file checks; the media kinds deid accepts. The policies of deidcli.media are in its
__init__ docstring."""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import av

from ..errors import InputError

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Rect = tuple[int, int, int, int]

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})


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
    """The frame's DISPLAYMATRIX side data as FFmpeg's 9 int32, or None. Iterating PyAV's side-data
    container gives the SideData themselves up to 18.1.0, and their types (the keys) from 18.1.1."""
    try:
        sds = frame.side_data
        for item in sds:
            sd = item if hasattr(item, "type") else sds[item]
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
