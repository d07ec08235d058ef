"""deidcli.media: probe, transcode (timing, pixels, colour, rotation, audio, metadata), images,
atomic output. Real clips come from ../shared/videos; edge cases are generated here with PyAV."""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import decode_rgb
from deidcli.errors import InputError, OutputError
from deidcli.options import EncodeOptions
from deidcli.media.probe import IMAGE_EXTS, VIDEO_EXTS, VideoInfo, media_kind, probe
from deidcli.media.frames import _paint_rects, _Reformatters, _rect_to_stored, _to_rgb
from deidcli.media.images import atomic_output, read_image, write_image
from deidcli.media.transcode import transcode_video

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIDEOS = SHARED / "videos"
REAL = VIDEOS / "lp_d12.mp4"  # 512x512, 25 fps, 7.3 s, h264 + aac
REAL_MOOV_FIRST = VIDEOS / "ghost_2person.mp4"  # moov before mdat: truncation keeps it openable

needs_shared = pytest.mark.skipif(
    not REAL.is_file() or not REAL_MOOV_FIRST.is_file(),
    reason=f"shared test videos not found under {VIDEOS}",
)

FAST = EncodeOptions(preset="veryfast")  # veryfast still uses B-frames (reordering is tested)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _pattern(i: int, w: int, h: int, marker: bool = True) -> np.ndarray:
    """A smooth, moving, colourful RGB test picture (frame i), with a red marker top-left."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin((x + 3 * i) / 17.0)
    g = 128 + 100 * np.cos((y - 2 * i) / 13.0)
    b = 128 + 90 * np.sin((x + y + 5 * i) / 23.0)
    img = np.stack([r, g, b], axis=-1)
    if marker:
        img[8:24, 8:40] = (250, 20, 20)  # saturated marker in the stored top-left corner
    return np.clip(img, 0, 255).astype(np.uint8)


def make_clip(
    path: Path,
    n: int = 24,
    size: tuple[int, int] = (160, 120),
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    time_base: Fraction = Fraction(1, 1000),
    pts: list[int] | None = None,
    rotation: int | None = None,
    audio: str | None = None,
    audio_rate: int = 16000,
    metadata: dict | None = None,
    audio_metadata: dict | None = None,
    colorspace: int | None = None,
    color_range: int | None = None,
    extra_audio: float = 0.0,
) -> Path:
    """Write a synthetic clip; frame i shows _pattern(i). pts default: 40 ms apart."""
    w, h = size
    pts = pts if pts is not None else [int(i * Fraction(1, 25) / time_base) for i in range(n)]
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=25)
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        vs.time_base = time_base
        vs.codec_context.time_base = time_base
        if codec == "libx264":
            vs.codec_context.options = {"preset": "ultrafast", "crf": "12"}
        if colorspace is not None:
            vs.codec_context.colorspace = colorspace
        if color_range is not None:
            vs.codec_context.color_range = color_range
        if rotation is not None:
            vs.set_display_rotation(rotation)
        if metadata:
            out.metadata.update(metadata)
        ast = None
        if audio:
            ast = out.add_stream(audio, rate=audio_rate, layout="mono")
            if audio_metadata:
                ast.metadata.update(audio_metadata)
        for i, p in enumerate(pts):
            f = av.VideoFrame.from_ndarray(_pattern(i, w, h), format="rgb24")
            kw = {"format": pix_fmt}
            if colorspace in (1, 5, 6):
                kw["dst_colorspace"] = {1: 1, 5: 5, 6: 5}[colorspace]
            if color_range:
                kw["dst_color_range"] = color_range
            f = f.reformat(**kw)
            f.pts, f.time_base = p, time_base
            out.mux(vs.encode(f))
        out.mux(vs.encode(None))
        if ast is not None:
            seconds = pts[-1] * time_base + Fraction(1, 25) + Fraction(extra_audio)
            total = int(audio_rate * seconds)
            t = np.arange(total) / audio_rate
            wave = 0.3 * np.sin(2 * np.pi * 440 * t)
            fmt = ast.codec_context.format.name
            step = 1024
            for s0 in range(0, total, step):
                chunk = wave[s0 : s0 + step]
                arr = (chunk * 32767).astype(np.int16) if fmt.startswith("s16") else chunk.astype(
                    np.float32
                )
                af = av.AudioFrame.from_ndarray(arr[None, :], format=fmt, layout="mono")
                af.sample_rate, af.pts, af.time_base = audio_rate, s0, Fraction(1, audio_rate)
                out.mux(ast.encode(af))
            out.mux(ast.encode(None))
    return path


def identity(frames):
    for f in frames:
        yield f, f.image, []


def batched_identity(frames, batch=32):
    """Like the real pipeline: pull a batch of frames, then yield them (lags the decoder)."""
    buf = []
    for f in frames:
        buf.append(f)
        if len(buf) == batch:
            yield from ((g, g.image, []) for g in buf)
            buf = []
    yield from ((g, g.image, []) for g in buf)


def painter(rect, colour=(0, 255, 0), seen=None):
    """A process that paints `rect` (upright coords) in `colour` and reports it dirty."""

    def process(frames):
        for f in frames:
            if seen is not None:
                seen.append((f.index, f.pts, f.image.shape))
            img = f.image.copy()
            x0, y0, x1, y1 = rect
            img[y0:y1, x0:x1] = colour
            yield f, img, [rect]

    return process


def touch(rect):
    """Dirty `rect` but give back the unchanged image: only the RGB->YUV round trip shows."""

    def process(frames):
        for f in frames:
            yield f, f.image, [rect]

    return process


def frame_times(path: Path) -> list[Fraction]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return [f.pts * v.time_base for f in c.decode(v)]


def packet_times(path: Path) -> list[Fraction]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return sorted(p.pts * v.time_base for p in c.demux(v) if p.size)


def audio_packets(path: Path) -> list[tuple]:
    """(stream position, pts time, dts time, duration, sha1 of payload) of every audio packet."""
    with av.open(str(path)) as c:
        streams = list(c.streams.audio)
        if not streams:
            return []
        pos = {s.index: i for i, s in enumerate(streams)}
        return [
            (
                pos[p.stream.index],
                p.pts * p.time_base,
                p.dts * p.time_base,
                p.duration * p.time_base,
                hashlib.sha1(bytes(p)).hexdigest(),
            )
            for p in c.demux(*streams)
            if p.size
        ]


def decode_planes(path: Path) -> list[list[np.ndarray]]:
    with av.open(str(path)) as c:
        return [[np.array(p, copy=True) for p in _planes(f)] for f in c.decode(c.streams.video[0])]


def _planes(frame) -> list[np.ndarray]:
    """Tight (rows, bytes) arrays of every plane (line padding cut off)."""
    out = []
    bpp = 2 if "10" in frame.format.name else 1
    for pl in frame.planes:
        buf = np.frombuffer(pl, np.uint8)[: pl.height * pl.line_size]
        out.append(buf.reshape(pl.height, pl.line_size)[:, : pl.width * bpp])
    return out


def mask_outside(shape, rect, pad=16):
    """Boolean (H, W) mask of pixels at least `pad` px away from rect (codec blocks may bleed)."""
    m = np.ones(shape[:2], bool)
    x0, y0, x1, y1 = rect
    m[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad] = False
    return m


def mad(a, b, mask=None) -> float:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d[mask].mean() if mask is not None else d.mean())


# ---------------------------------------------------------------------------------------------
# media kinds and probe
# ---------------------------------------------------------------------------------------------


def test_media_kind():
    assert media_kind("a/B.MP4") == "video"
    assert media_kind(Path("x.JpEg")) == "image"
    assert media_kind("x.txt") is None and media_kind("noext") is None
    assert ".webm" in VIDEO_EXTS and ".webp" in IMAGE_EXTS


@needs_shared
def test_probe_real_clip():
    info = probe(REAL)
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height, info.rotation) == (512, 512, 0)
    assert info.frames == 183 and info.average_rate == 25
    assert info.duration == pytest.approx(7.32, abs=0.05)
    assert (info.pix_fmt, info.bit_depth, info.codec) == ("yuv420p", 8, "h264")
    assert info.audio_streams == 1


# ---------------------------------------------------------------------------------------------
# 1. identity on a real clip: frames, pts, audio bytes
# ---------------------------------------------------------------------------------------------


@needs_shared
def test_identity_keeps_frames_pts_and_audio_bytes(tmp_path, capfd):
    dst = tmp_path / "out.mp4"
    calls = []
    stats = transcode_video(REAL, dst, batched_identity, FAST, on_frame=calls.append)
    assert capfd.readouterr().out == ""  # library code never prints to stdout
    assert stats["frames"] == 183 and stats["audio_streams"] == 1 and stats["audio_mode"] == "copy"
    assert calls == list(range(1, 184))
    assert frame_times(dst) == frame_times(REAL)
    assert packet_times(dst) == packet_times(REAL)  # muxed packet pts, after B-frame reordering
    a_in, a_out = audio_packets(REAL), audio_packets(dst)
    assert len(a_in) > 300 and a_out == a_in
    with av.open(str(dst)) as c:  # the encoder really reordered frames (B-frames in use)
        v = c.streams.video[0]
        assert any(p.pts != p.dts for p in c.demux(v) if p.size)
    assert probe(dst).duration == pytest.approx(probe(REAL).duration, abs=1e-3)


@needs_shared
def test_mp4_to_mkv_keeps_frame_times(tmp_path):
    """Matroska must not shift every stream because copied AAC starts at about -48 ms."""
    dst = tmp_path / "out.mkv"
    transcode_video(REAL, dst, identity, EncodeOptions(preset="ultrafast"))
    assert frame_times(dst) == frame_times(REAL)  # 40 ms steps: exact even in milliseconds
    a_in, a_out = audio_packets(REAL), audio_packets(dst)
    assert [p[4] for p in a_out] == [p[4] for p in a_in]  # same payloads, same order
    assert all(abs(x[1] - y[1]) <= Fraction(1, 1000) for x, y in zip(a_in, a_out))


# ---------------------------------------------------------------------------------------------
# 2. dirty rectangles: exact copy outside, correct colour inside
# ---------------------------------------------------------------------------------------------


@needs_shared
def test_dirty_rect_real_clip(tmp_path):
    rect = (100, 60, 260, 220)
    plain, painted = tmp_path / "plain.mp4", tmp_path / "painted.mp4"
    transcode_video(REAL, plain, identity, FAST)
    stats = transcode_video(REAL, painted, painter(rect), FAST)
    assert stats["dirty_frames"] == 183
    src, a, b = decode_rgb(REAL, 40), decode_rgb(plain, 40), decode_rgb(painted, 40)
    out = mask_outside(a[0].shape, rect)
    x0, y0, x1, y1 = rect
    for i in (0, 13, 39):
        assert mad(a[i], b[i], out) < 1.0  # outside: same as a plain re-encode
        assert mad(src[i], b[i], out) < 2.0  # and no colour shift against the input
        inner = b[i][y0 + 4 : y1 - 4, x0 + 4 : x1 - 4].reshape(-1, 3).mean(0)
        assert inner[1] > 230 and inner[0] < 25 and inner[2] < 25  # the rect is green


@needs_shared
def test_dirty_rect_unchanged_image_has_no_colour_shift(tmp_path):
    """Round trip decoded YUV -> RGB -> YUV inside a rect must use the frame's own matrix."""
    rect = (40, 40, 472, 472)
    plain, touched = tmp_path / "plain.mp4", tmp_path / "touched.mp4"
    transcode_video(REAL, plain, identity, FAST)
    transcode_video(REAL, touched, touch(rect), FAST)
    a, b = decode_rgb(plain, 20), decode_rgb(touched, 20)
    x0, y0, x1, y1 = rect
    for i in (0, 19):
        ia, ib = a[i][y0:y1, x0:x1], b[i][y0:y1, x0:x1]
        assert mad(ia, ib) < 1.5
        assert np.abs(ia.reshape(-1, 3).mean(0) - ib.reshape(-1, 3).mean(0)).max() < 0.75


@pytest.mark.parametrize(
    "fmt,colorspace,color_range",
    [("yuv420p", 6, 1), ("yuv420p", 1, 1), ("yuv420p", 1, 2), ("yuvj420p", 5, 2), ("yuv420p", 2, 0),
     ("yuv420p10le", 1, 1), ("yuv444p", 1, 1)],
)
@pytest.mark.parametrize("pooled", [False, True], ids=["own-context", "pooled-contexts"])
def test_paint_rects_is_exact_outside_and_round_trips_inside(fmt, colorspace, color_range, pooled):
    """Pixel level (no encoder): bytes outside the rect untouched; inside, the decoded picture
    painted back comes out within 1 code value (a wrong matrix or range would not). Pooled: the
    transcoder's way, long-lived swscale contexts converting a PAINT_STEP-sized patch around the
    rect (here shifted up against the frame's top edge) of which only the rect is copied."""
    w, h = 96, 64
    rgb = _pattern(3, w, h, marker=False)  # smooth: 4:2:0 resampling is exact enough on it
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format=fmt,
        dst_colorspace={1: 1, 5: 5, 6: 5}.get(colorspace),
        dst_color_range=color_range or None,
    )
    frame.colorspace, frame.color_range = colorspace, color_range
    before = [p.copy() for p in _planes(frame)]
    pool = _Reformatters() if pooled else None
    decoded_rgb = _to_rgb(frame, av.video.reformatter.VideoReformatter() if pooled else None)
    assert np.array_equal(decoded_rgb, _to_rgb(frame))  # what transcode_video gives `process`
    rect = (10, 6, 70, 50)  # even-aligned, so chroma outside is untouched too
    _paint_rects(frame, decoded_rgb, [rect], pool)
    after = _planes(frame)
    x0, y0, x1, y1 = rect
    bpp = 2 if "10" in fmt else 1
    for p, (b, a) in enumerate(zip(before, after)):
        s = 0 if p == 0 or fmt.startswith("yuv444") else 1
        m = np.ones(b.shape, bool)
        m[y0 >> s : y1 >> s, (x0 >> s) * bpp : (x1 >> s) * bpp] = False
        assert np.array_equal(a[m], b[m]), f"plane {p} changed outside the rect"
        ins = [x[~m].view(np.uint16) if bpp == 2 else x[~m] for x in (a, b)]
        d = np.abs(ins[0].astype(int) - ins[1].astype(int)) / (4 if bpp == 2 else 1)
        # luma exact to 1; chroma carries swscale's ~0.5 code value rounding bias in full range
        assert d.max() <= 1 and d.mean() < (0.3 if p == 0 or color_range != 2 else 0.6), (
            p, d.max(), d.mean())
    # a painted colour lands in the rect, with the frame's range (full vs limited)
    green = decoded_rgb.copy()
    green[y0:y1, x0:x1] = (0, 255, 0)
    _paint_rects(frame, green, [rect], pool)
    back = _to_rgb(frame)[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3)
    assert np.abs(back.mean(0) - (0, 255, 0)).max() < 3


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_rect_to_stored_matches_rot90(rotation):
    sh, sw = 12, 20  # stored size
    rng = np.random.default_rng(rotation)
    k = rotation // 90
    uh, uw = np.rot90(np.zeros((sh, sw)), k).shape
    for _ in range(20):
        x0, x1 = sorted(rng.integers(0, uw + 1, 2))
        y0, y1 = sorted(rng.integers(0, uh + 1, 2))
        up = np.zeros((uh, uw), bool)
        up[y0:y1, x0:x1] = True
        stored = np.rot90(up, -k)
        sx0, sy0, sx1, sy1 = _rect_to_stored((x0, y0, x1, y1), rotation, sw, sh)
        expect = np.zeros((sh, sw), bool)
        expect[sy0:sy1, sx0:sx1] = True
        assert np.array_equal(stored, expect)


def test_lossless_identity_is_bit_exact_and_rect_outside_untouched(tmp_path):
    """With a lossless encoder (ffv1), 'unchanged' is checkable exactly."""
    src = make_clip(tmp_path / "in.mkv", n=12, codec="ffv1", pix_fmt="yuv420p", colorspace=1,
                    color_range=1)
    ffv1 = EncodeOptions(codec="ffv1")
    ident, painted = tmp_path / "ident.mkv", tmp_path / "painted.mkv"
    transcode_video(src, ident, identity, ffv1)
    rect = (30, 20, 90, 80)
    transcode_video(src, painted, painter(rect), ffv1)
    p_in, p_id, p_pa = decode_planes(src), decode_planes(ident), decode_planes(painted)
    assert len(p_in) == len(p_id) == len(p_pa) == 12
    for fi, fo in zip(p_in, p_id):
        assert all(np.array_equal(a, b) for a, b in zip(fi, fo))
    y = (p_in[5][0], p_pa[5][0])
    m = np.ones(y[0].shape, bool)
    m[20:80, 30:90] = False
    assert np.array_equal(y[0][m], y[1][m])
    assert not np.array_equal(y[0][~m], y[1][~m])


# ---------------------------------------------------------------------------------------------
# 3. variable frame rate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tb,ext", [(Fraction(1, 1000), ".mp4"), (Fraction(1, 90000), ".mp4"),
                                    (Fraction(1, 1000), ".mkv")])
def test_vfr_keeps_every_timestamp_and_duration(tmp_path, tb, ext):
    gaps_ms = [33, 67, 33, 100, 17, 50, 200, 33, 33, 83, 40, 40, 120, 33, 67, 33, 250, 33, 33, 40]
    ms = np.concatenate([[0], np.cumsum(gaps_ms)]).tolist()
    pts = [int(Fraction(m, 1000) / tb) for m in ms]
    src = make_clip(tmp_path / f"vfr{ext}", pts=pts, time_base=tb, audio="aac")
    dst = tmp_path / f"out{ext}"
    stats = transcode_video(src, dst, identity, FAST)
    assert stats["frames"] == len(pts) and stats["pts_fixed"] == 0
    t_in = frame_times(src)
    assert t_in == [Fraction(m, 1000) for m in ms]  # the generator really wrote VFR
    assert frame_times(dst) == t_in
    assert packet_times(dst) == t_in
    assert probe(dst).duration == pytest.approx(probe(src).duration, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# 4. rotation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_clip_processed_upright_and_displays_the_same(tmp_path, rotation):
    src = make_clip(tmp_path / "rot.mp4", n=16, size=(160, 120), rotation=rotation, audio="aac")
    info = probe(src)
    assert (info.rotation, info.width, info.height) == (rotation, 120, 160)
    assert (info.coded_width, info.coded_height) == (160, 120)
    k = rotation // 90
    expected_upright = np.rot90(_pattern(0, 160, 120), k)
    rect = (0, 0, 24, 16)  # upright top-left corner
    seen, firsts = [], []

    def process(frames):
        inner = painter(rect, seen=seen)
        for item in inner(frames):
            if item[0].index == 0:
                firsts.append(item[0].image)
            yield item

    dst = tmp_path / "out.mp4"
    transcode_video(src, dst, process, FAST)
    assert {s for _, _, s in seen} == {(160, 120, 3)}  # H, W swapped: upright
    assert mad(firsts[0], expected_upright) < 3  # the right way up, not mirrored
    out = probe(dst)
    assert (out.rotation, out.width, out.height) == (rotation, 120, 160)
    assert (out.coded_width, out.coded_height) == (160, 120)
    with av.open(str(dst)) as c:
        stored = next(c.decode(video=0)).to_ndarray(format="rgb24")
    upright = np.rot90(stored, k)
    corner = upright[2:14, 2:22].reshape(-1, 3).mean(0)
    assert corner[1] > 220 and corner[0] < 40  # green where process painted it (upright coords)
    assert mad(upright[40:], expected_upright[40:]) < 3  # rest of the picture unchanged


# ---------------------------------------------------------------------------------------------
# 5/6. audio modes and incompatible audio
# ---------------------------------------------------------------------------------------------


def test_clip_without_audio(tmp_path):
    src = make_clip(tmp_path / "noaudio.mp4", n=10)
    stats = transcode_video(src, tmp_path / "out.mp4", identity, FAST)
    assert stats["audio_streams"] == 0 and stats["frames"] == 10
    assert probe(tmp_path / "out.mp4").audio_streams == 0


def test_audio_none_and_aac(tmp_path):
    src = make_clip(tmp_path / "pcm.mkv", n=20, audio="pcm_s16le")
    dst_none, dst_aac = tmp_path / "none.mp4", tmp_path / "aac.mp4"
    s1 = transcode_video(src, dst_none, identity, EncodeOptions(preset="veryfast", audio="none"))
    assert s1["audio_streams"] == 0 and probe(dst_none).audio_streams == 0
    s2 = transcode_video(src, dst_aac, identity, EncodeOptions(preset="veryfast", audio="aac"))
    assert s2["audio_mode"] == "aac"
    with av.open(str(dst_aac)) as c:
        (a,) = c.streams.audio
        assert a.codec_context.name == "aac" and a.sample_rate == 16000
        n_samples = sum(f.samples for f in c.decode(a))
    assert abs(n_samples - 16000 * 0.8) < 2048  # the whole 0.8 s of sound is there


def test_audio_copy_from_mkv_keeps_bytes(tmp_path):
    src = make_clip(tmp_path / "pcm.mkv", n=20, audio="pcm_s16le")
    dst = tmp_path / "out.mkv"
    transcode_video(src, dst, identity, FAST)
    assert audio_packets(dst) == audio_packets(src) and len(audio_packets(src)) > 5


@pytest.mark.parametrize(
    "acodec,src_ext,dst_ext,vcodec",
    [("pcm_s16le", ".mkv", ".mp4", "libx264"), ("aac", ".mp4", ".webm", "libvpx-vp9")],
)
def test_incompatible_audio_copy_is_refused_before_any_frame(tmp_path, acodec, src_ext, dst_ext,
                                                             vcodec):
    src = make_clip(tmp_path / f"in{src_ext}", n=10, audio=acodec)
    called = []

    def process(frames):
        called.append(1)
        yield from identity(frames)

    with pytest.raises(OutputError) as ei:
        transcode_video(src, tmp_path / f"out{dst_ext}", process, EncodeOptions(codec=vcodec))
    msg = str(ei.value)
    assert "audio" in msg and acodec in msg and "--audio aac" in msg and "\n" not in msg
    assert not called


def test_unknown_codec_names_alternatives(tmp_path):
    src = make_clip(tmp_path / "in.mp4", n=4)
    with pytest.raises(OutputError, match="libx264"):
        transcode_video(src, tmp_path / "o.mp4", identity, EncodeOptions(codec="nope264"))


# ---------------------------------------------------------------------------------------------
# 7. metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
@pytest.mark.parametrize("keep", [False, True])
def test_metadata_policy(tmp_path, keep, ext):
    tags = {"location": "+48.8584+002.2945/", "title": "home video", "comment": "alice",
            "creation_time": "2024-05-01T10:00:00.000000Z"}
    src = make_clip(tmp_path / f"tagged{ext}", n=8, metadata=tags, audio="aac",
                    audio_metadata={"language": "fra", "title": "alice voice"})
    with av.open(str(src)) as c:  # the input really carries the tags
        md = {k.lower(): v for k, v in c.metadata.items()}
        amd = c.streams.audio[0].metadata
        assert md.get("location") == tags["location"] and md.get("title") and md.get("comment")
        assert md.get("creation_time") and amd.get("title", amd.get("name")) == "alice voice"
    dst = tmp_path / f"out{ext}"
    transcode_video(src, dst, identity, EncodeOptions(preset="veryfast", keep_metadata=keep))
    with av.open(str(dst)) as c:
        md = {k.lower(): v for k, v in c.metadata.items()}
        amd = c.streams.audio[0].metadata
        assert c.streams.audio[0].language == "fra"  # language is kept either way
    track_title = amd.get("title", amd.get("name"))  # MP4 track titles read back as "name"
    if keep:
        assert md.get("location") == tags["location"] and md.get("title") == "home video"
        assert track_title == "alice voice"
    else:
        assert not any("location" in k.lower() for k in md), md
        assert "title" not in md and "comment" not in md and "creation_time" not in md
        assert track_title is None


# ---------------------------------------------------------------------------------------------
# 8. bad inputs, mid-stream errors, atomic output
# ---------------------------------------------------------------------------------------------


def _one_line_input_error(fn, *args):
    with pytest.raises(InputError) as ei:
        fn(*args)
    msg = str(ei.value)
    assert msg and "\n" not in msg and "Traceback" not in msg and "Errno" not in msg
    return msg


def test_garbage_and_missing_inputs(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    _one_line_input_error(probe, junk)
    _one_line_input_error(transcode_video, junk, tmp_path / "o.mp4", identity, FAST)
    assert "no such file" in _one_line_input_error(probe, tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _one_line_input_error(probe, empty)


def test_no_video_stream(tmp_path):
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w", format="ipod") as out:
        a = out.add_stream("aac", rate=16000, layout="mono")
        af = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp",
                                        layout="mono")
        af.sample_rate, af.pts = 16000, 0
        out.mux(a.encode(af))
        out.mux(a.encode(None))
    assert "no video stream" in _one_line_input_error(probe, path)
    _one_line_input_error(transcode_video, path, tmp_path / "o.mp4", identity, FAST)


@needs_shared
@pytest.mark.parametrize("name", ["lp_d12.mp4", "ghost_2person.mp4"])  # moov last / moov first
def test_truncated_real_file(tmp_path, name):
    data = (VIDEOS / name).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: int(len(data) * 0.3)])
    _one_line_input_error(probe, cut)
    dst = tmp_path / "out.mp4"
    with pytest.raises(InputError):
        with atomic_output(dst) as tmp:
            transcode_video(cut, tmp, identity, FAST)
    assert list(tmp_path.iterdir()) == [cut]


@needs_shared
def test_decode_error_mid_stream_propagates(tmp_path, monkeypatch):
    """Bypass the up-front truncation check: the decode error itself must surface."""
    import deidcli.media.decode as video

    data = REAL_MOOV_FIRST.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.3)])
    monkeypatch.setattr(video, "_check_truncated", lambda *a: None)
    dst = tmp_path / "out.mp4"
    done = []
    with pytest.raises(InputError, match="decoding failed"):
        with atomic_output(dst) as tmp:
            transcode_video(cut, tmp, identity, EncodeOptions(preset="ultrafast"),
                            on_frame=done.append)
    assert done and not dst.exists() and list(tmp_path.iterdir()) == [cut]


def test_atomic_output(tmp_path):
    dst = tmp_path / "out.mp4"
    with atomic_output(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.mp4.") and tmp.suffix == ".mp4"
        assert not dst.exists()
        tmp.write_bytes(b"done")
    assert dst.read_bytes() == b"done" and list(tmp_path.iterdir()) == [dst]

    for exc in (RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(exc)):
            with atomic_output(dst) as tmp:
                tmp.write_bytes(b"partial")
                raise exc
        assert dst.read_bytes() == b"done"  # an existing output is left alone
        assert list(tmp_path.iterdir()) == [dst]

    new = tmp_path / "new.mkv"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(new) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert not new.exists() and list(tmp_path.iterdir()) == [dst]


def test_error_inside_process_propagates_and_leaves_nothing(tmp_path):
    src = make_clip(tmp_path / "in.mp4", n=30, audio="aac")
    dst = tmp_path / "out.mp4"

    def process(frames):
        for f in frames:
            if f.index == 12:
                raise KeyboardInterrupt
            yield f, f.image, []

    with pytest.raises(KeyboardInterrupt):
        with atomic_output(dst) as tmp:
            transcode_video(src, tmp, process, FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_process_that_never_pulls_past_the_last_frame(tmp_path, monkeypatch):
    """Trailing audio after the last video frame is still copied. Unthreaded ffv1 has no
    decoder delay, so the last frame really is handed out before the trailing audio is read."""
    import deidcli.media.transcode as video

    orig = video._Transcoder.open_input

    def open_input_unthreaded(self):
        orig(self)
        self.vin.thread_type = "NONE"

    monkeypatch.setattr(video._Transcoder, "open_input", open_input_unthreaded)
    src = make_clip(tmp_path / "in.mkv", n=10, codec="ffv1", audio="pcm_s16le", extra_audio=1.0)

    def process(frames):
        for _ in range(10):
            f = next(frames)
            yield f, f.image, []

    dst = tmp_path / "out.mkv"
    assert transcode_video(src, dst, process, FAST)["frames"] == 10
    assert audio_packets(dst) == audio_packets(src)


def test_process_that_drops_frames_is_an_error(tmp_path):
    src = make_clip(tmp_path / "in.mp4", n=10)

    def process(frames):
        for f in frames:
            if f.index % 2 == 0:
                yield f, f.image, []

    with pytest.raises(RuntimeError):
        transcode_video(src, tmp_path / "o.mp4", process, FAST)


# ---------------------------------------------------------------------------------------------
# 9. images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext,tol", [(".png", 0.0), (".jpg", 3.0), (".webp", 3.0)])
def test_image_round_trip_without_metadata(tmp_path, ext, tol):
    img = _pattern(0, 90, 60)
    path = tmp_path / f"a{ext}"
    write_image(path, img)
    back = read_image(path)
    assert back.shape == (60, 90, 3) and back.dtype == np.uint8 and back.flags.c_contiguous
    assert mad(back, img) <= tol
    assert back[16, 20, 0] > 200 and back[16, 20, 1] < 60  # red marker: RGB order kept
    raw = path.read_bytes()
    assert b"Exif" not in raw and b"XMP" not in raw and b"tEXt" not in raw


def test_read_image_applies_exif_orientation(tmp_path):
    from PIL import Image

    img = _pattern(0, 90, 60)  # marker at the stored top-left
    path = tmp_path / "rot.jpg"
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0)}  # GPS, to check write_image drops it
    pil.save(path, exif=exif, quality=95)
    back = read_image(path)
    assert back.shape == (90, 60, 3)
    assert mad(back, np.rot90(img, -1)) < 4  # clockwise: marker now at the top-right
    out = tmp_path / "clean.jpg"
    write_image(out, back)
    assert not Image.open(out).getexif() and read_image(out).shape == (90, 60, 3)


def test_read_image_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    _one_line_input_error(read_image, bad)
    _one_line_input_error(read_image, tmp_path / "missing.jpg")
    with pytest.raises(OutputError):
        write_image(tmp_path / "x.bmpx", np.zeros((4, 4, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# 10. 10-bit: kept when the encoder can, refused clearly when it cannot
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec,ext", [("libx264", ".mp4"), ("libvpx-vp9", ".webm")])
def test_full_range_jpeg_source_keeps_range(tmp_path, codec, ext):
    """MJPEG-style yuvj420p in; libx264 takes yuvj420p, VP9 needs yuv420p + full-range tag."""
    src = make_clip(tmp_path / "mjpeg.mkv", n=6, codec="mjpeg", pix_fmt="yuvj420p")
    assert probe(src).pix_fmt == "yuvj420p"
    dst = tmp_path / f"out{ext}"
    transcode_video(src, dst, identity, EncodeOptions(codec=codec, crf=10, preset="veryfast"))
    info = probe(dst)
    assert info.color_range == 2 or info.pix_fmt.startswith("yuvj")
    a, b = decode_rgb(src), decode_rgb(dst)
    assert len(a) == len(b) == 6
    assert mad(a[2], b[2]) < 2.5  # a range mix-up would shift every pixel by ~8-16


def test_10bit_is_kept(tmp_path):
    src = make_clip(tmp_path / "ten.mkv", n=12, codec="ffv1", pix_fmt="yuv420p10le", colorspace=1,
                    color_range=1)
    assert (probe(src).pix_fmt, probe(src).bit_depth) == ("yuv420p10le", 10)
    dst = tmp_path / "out.mkv"
    rect = (20, 20, 60, 60)
    stats = transcode_video(src, dst, painter(rect), EncodeOptions(codec="ffv1"))
    info = probe(dst)
    assert stats["pix_fmt"] == info.pix_fmt == "yuv420p10le" and info.bit_depth == 10
    p_in, p_out = decode_planes(src), decode_planes(dst)
    y_in, y_out = p_in[3][0].view(np.uint16), p_out[3][0].view(np.uint16)
    m = np.ones(y_in.shape, bool)
    m[20:60, 20:60] = False
    assert np.array_equal(y_in[m], y_out[m])  # 10-bit samples outside the rect untouched
    assert (y_in % 4).any()  # the input really uses the two extra bits...
    assert (y_out[m] % 4).any()  # ...and so does the output
    green = decode_rgb(dst, 4)[3][24:56, 24:56].reshape(-1, 3).mean(0)
    assert green[1] > 230 and green[0] < 25
    x264 = tmp_path / "x264.mp4"
    transcode_video(src, x264, identity, FAST)  # libx264 here does High 10
    assert probe(x264).pix_fmt == "yuv420p10le"


def test_10bit_refused_by_8bit_only_encoder(tmp_path):
    src = make_clip(tmp_path / "ten.mkv", n=4, codec="ffv1", pix_fmt="yuv420p10le")
    dst = tmp_path / "out.mp4"
    with pytest.raises(InputError, match="10-bit") as ei:
        with atomic_output(dst) as tmp:
            transcode_video(src, tmp, identity, EncodeOptions(codec="mpeg4"))
    assert "libx264" in str(ei.value)
    assert not dst.exists()


def test_scale_clip_example_repeats_with_monotonic_times(shared, tmp_path):
    """research/scale_clip.py (the GPU target's 1920x1080 input, research/gpu_kit.sh): the size asked
    for, the clip played --repeat times with strictly increasing frame and audio times, the audio
    packets' bytes those of the source."""
    import subprocess
    import sys

    from conftest import cut_clip, frame_pts

    src = cut_clip(VIDEOS / "ghost_2person.mp4", tmp_path / "src.mp4", 0.5)
    dst = tmp_path / "scaled.mp4"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "research" / "scale_clip.py"),
                    src, dst, "--size", "320x180", "--repeat", "2"], check=True, capture_output=True)
    info = probe(dst)
    assert (info.width, info.height) == (320, 180)
    pts_in, pts_out = frame_pts(src), frame_pts(dst)
    assert len(pts_out) == 2 * len(pts_in) and np.all(np.diff(pts_out) > 0)
    a_in, a_out = audio_packets(src), audio_packets(dst)
    assert len(a_out) == 2 * len(a_in) and np.all(np.diff([p[2] for p in a_out]) > 0)
    assert [p[4] for p in a_out] == [p[4] for p in a_in] * 2
    assert not list(tmp_path.glob("*.tmp.mp4"))
