"""Decoded frames as upright RGB arrays, and painting processed rectangles back into the
stored planes (only the dirty rectangles are converted RGB->YUV)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import av
import numpy as np

from ..errors import InputError
from .probe import Rect

# AVColorSpace -> swscale SWS_CS_* (what VideoFrame.reformat expects for *_colorspace).
_AVCOL_SPC_TO_SWS = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}


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


#: _rgb_to_yuv420: (Kr, Kb) of the colour matrices it computes itself, by AVColorSpace; an
#: unspecified matrix (2) is BT.601, as swscale takes it. Other matrices go through swscale.
_KR_KB = {1: (0.2126, 0.0722), 2: (0.299, 0.114), 5: (0.299, 0.114), 6: (0.299, 0.114)}


def _rgb_to_yuv420(rgb: np.ndarray, kr: float, kb: float, full: bool) -> tuple[np.ndarray, ...]:
    """(H, W, 3) uint8 RGB, H and W even -> Y (H, W), U and V (H/2, W/2) uint8 views: the
    exact matrix, rounded, each 2x2 block's chroma averaged. swscale with ACCURATE_RND gives the
    same codes within 1 (tests/test_video.py) in ~10x the time (a 340 px face: 0.5-1.4 ms; this
    0.08 ms)."""
    import cv2

    kg = 1.0 - kr - kb
    ys, yo, cs = (1.0, 0.0, 1.0) if full else (219 / 255, 16.0, 224 / 255)
    m = np.array([
        [kr * ys, kg * ys, kb * ys, yo],
        [-kr / (2 * (1 - kb)) * cs, -kg / (2 * (1 - kb)) * cs, 0.5 * cs, 128.0],
        [0.5 * cs, -kg / (2 * (1 - kr)) * cs, -kb / (2 * (1 - kr)) * cs, 128.0],
    ], np.float32)
    h, w = rgb.shape[:2]
    # uint8 in and out (rounded to nearest): float arrays of a face's size cost 10x as much
    yuv = cv2.transform(np.ascontiguousarray(rgb), m)
    half = cv2.resize(yuv, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return yuv[..., 0], half[..., 1], half[..., 2]


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
    own = None  # (Kr, Kb, full range) where this function converts itself (8-bit 4:2:0)
    if fmt in ("yuv420p", "yuvj420p") and int(frame.colorspace) in _KR_KB and W % 2 == 0 and H % 2 == 0:
        full = rng == 2 or (fmt == "yuvj420p" and rng is None)
        own = (*_KR_KB[int(frame.colorspace)], full)
    for x0, y0, x1, y1 in rects:
        x0, y0 = x0 - x0 % ax, y0 - y0 % ay
        x1 = min(W, -(-x1 // ax) * ax)
        y1 = min(H, -(-y1 // ay) * ay)
        if own is not None:
            if x1 > x0 and y1 > y0:
                y, u, v = _rgb_to_yuv420(stored_rgb[y0:y1, x0:x1], *own)
                dst_views[0][y0:y1, x0:x1] = y
                dst_views[1][y0 // 2:y1 // 2, x0 // 2:x1 // 2] = u
                dst_views[2][y0 // 2:y1 // 2, x0 // 2:x1 // 2] = v
            continue
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
