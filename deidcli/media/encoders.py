"""Encoder choice and options, output pixel formats, what a container can hold (audio copy,
sizes), tags kept: the decisions taken before the first frame is encoded."""

from __future__ import annotations

import contextlib
import io
import os
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import av
import numpy as np

from ..errors import InputError, OutputError
from ..options import EncodeOptions
from .frames import VideoFrame, _plane_bytes, _plane_layouts
from .probe import _bit_depth, _ff_reason

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

# Stream tags that are kept even without keep_metadata (not identifying).
_SAFE_STREAM_TAGS = ("language",)


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
    if codec_name in ("libx264", "libx265"):
        # one frame thread a core (x264's own default is 1.5 a core): the pipeline's other stages
        # run beside it (ghost_2person, x264 veryfast alone on 2 cores: 10.8 -> 9.4 ms CPU a frame)
        opts["threads"] = str(os.cpu_count() or 1)
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


def _retime_audio(af, rate: int) -> None:
    """A decoded audio frame ``af`` (None: the flush) given pts in 1/``rate`` units, the time base
    an audio encoder at sample rate ``rate`` takes, in place."""
    if af is None:
        return
    if af.pts is not None and af.time_base:
        af.pts = int(round(af.pts * af.time_base * rate))
    af.time_base = Fraction(1, rate)


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
