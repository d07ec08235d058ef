"""Live sources and sinks (``deid live``): a camera, a network stream, a file played at its own
frame rate or a stream on stdin in; a file, stdout, a network URL or a v4l2loopback device out.
The session that joins them to the pipeline, with its latency rules, is deidcli.pipeline.live.

Array contract as in the rest of deidcli.media: frames reach the pipeline as
:class:`LiveFrame` (a :class:`~deidcli.media.frames.VideoFrame`) whose ``image`` is
``(H, W, 3)`` uint8 RGB, upright, C-contiguous; rectangles come back as ``(x0, y0, x1, y1)`` in
upright pixels, exclusive ends, and only they are converted back to YUV.

Decoded pictures are normalised to yuv420p (8 bit) at the size of the first frame: the live
output is H.264 (or rawvideo for a v4l2 device), which every player and receiver takes.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np

from ..errors import InputError, OutputError, SourceLost
from ..options import EncodeOptions, LiveOptions
from .encoders import _encoder_options, _retime_audio, _video_encoder
from .frames import VideoFrame, _clip_rects, _paint_rects, _rect_to_stored, _Reformatters, _to_rgb
from .probe import _display_matrix, _ff_reason, _rotation, _video_stream

log = logging.getLogger(__name__)

#: URL schemes read as network sources.
NETWORK_SOURCES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "udp", "rtp", "srt", "tcp", "http", "https"})
#: URL schemes deid live publishes to, with the container each one carries.
NETWORK_SINKS = {"udp": "mpegts", "srt": "mpegts", "tcp": "mpegts", "rtp": "rtp_mpegts", "rtmp": "flv",
                 "rtmps": "flv", "rtsp": "rtsp"}
#: File outputs (container by extension). MP4/MOV are readable only once finalized: for long
#: recordings that may be killed (SIGKILL, power), .mkv or .ts stay readable up to the cut.
FILE_SINKS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".ts", ".flv"})
#: Audio codecs each streaming container takes as they are (others are re-encoded to AAC).
_STREAM_AUDIO = {"mpegts": {"aac", "mp3", "mp2", "ac3", "eac3", "opus"}, "rtp_mpegts": {"aac", "mp3", "mp2", "ac3"},
                 "flv": {"aac", "mp3"}, "rtsp": {"aac", "opus", "mp3", "ac3"}}
#: Seconds between reconnection attempts (then the last one, repeated) with --reconnect.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: Audio packets held while no video frame is written (about 10 s of AAC at 48 kHz).
MAX_PENDING_AUDIO = 500
_CAMERA = re.compile(r"(?:/dev/video)?(\d+)")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and reports)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _scheme(spec: str) -> Optional[str]:
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return m.group(1).lower() if m else None


@dataclass(frozen=True)
class Endpoint:
    """A live source or sink, as parsed from the command line."""

    spec: str  # as given
    kind: str  # source: camera | network | file | stdin; sink: file | stdout | network | device
    url: str  # what FFmpeg opens: a path, a URL, /dev/videoN, or "-"
    format: Optional[str] = None  # FFmpeg format (v4l2, mpegts, flv, ...); None: FFmpeg guesses

    @property
    def name(self) -> str:
        """For messages and reports: stdin/stdout, or the URL without its password."""
        return {"stdin": "stdin", "stdout": "stdout"}.get(self.kind, redact(self.spec))


def parse_source(spec: str, input_format: Optional[str] = None) -> Endpoint:
    """SRC of deid live: ``-`` (stdin), a camera ``/dev/videoN`` or ``N``, a network URL or a file.
    Raises InputError (one line) when it cannot be one of them."""
    spec = str(spec)
    if spec == "-":
        return Endpoint(spec, "stdin", "-", input_format)
    m = _CAMERA.fullmatch(spec)
    if m or spec.startswith("/dev/video"):
        if not m:
            raise InputError(f"{spec}: not a camera device (give /dev/videoN or its number N)")
        dev = f"/dev/video{m.group(1)}"
        if not os.path.exists(dev):
            raise InputError(f"{dev}: no such camera (see `ls /dev/video*`)")
        return Endpoint(spec, "camera", dev, input_format or "v4l2")
    scheme = _scheme(spec)
    if scheme is not None:
        if scheme not in NETWORK_SOURCES:
            raise InputError(f"{redact(spec)}: {scheme}:// is not a source deid live reads "
                             f"({', '.join(sorted(NETWORK_SOURCES))}, a camera, a file or -)")
        return Endpoint(spec, "network", spec, input_format)
    p = Path(spec)
    if not p.exists():
        raise InputError(f"{spec}: no such file, camera or stream URL")
    if p.is_dir():
        raise InputError(f"{spec}: is a folder; deid live reads one source (deid anonymize takes folders)")
    return Endpoint(spec, "file", spec, input_format)


def parse_sink(spec: str, fmt: Optional[str] = None, overwrite: bool = False) -> Endpoint:
    """DST of deid live: ``-`` (stdout: MPEG-TS, or ``fmt``: one of options.PIPE_FORMATS), a
    v4l2loopback ``/dev/videoN``, a network URL (udp, srt, tcp, rtp: MPEG-TS; rtmp: FLV; rtsp: an
    RTSP server) or a file (:data:`FILE_SINKS`). Raises OutputError (one line), ValueError for a
    ``fmt`` that does not apply; checks only, creates nothing."""
    from ..options import PIPE_FORMATS

    spec = str(spec)
    if fmt is not None and (spec != "-" or fmt not in PIPE_FORMATS):
        raise ValueError(f"--format applies to DST - (stdout) only, and is one of {', '.join(PIPE_FORMATS)}")
    if spec == "-":
        return Endpoint(spec, "stdout", "-", fmt or "mpegts")
    if spec.startswith("/dev/video"):
        if not os.path.exists(spec):
            raise OutputError(f"{spec}: no such device (create one with `sudo modprobe v4l2loopback`; "
                              f"see docs/live.md)")
        return Endpoint(spec, "device", spec, "v4l2")
    scheme = _scheme(spec)
    if scheme is not None:
        if scheme not in NETWORK_SINKS:
            raise OutputError(f"{redact(spec)}: deid live cannot publish to {scheme}:// "
                              f"({', '.join(sorted(NETWORK_SINKS))}, a file, a v4l2 device or -)")
        return Endpoint(spec, "network", spec, NETWORK_SINKS[scheme])
    p = Path(spec)
    if p.is_dir():
        raise OutputError(f"{spec}: is a folder; give the output file's name")
    if p.suffix.lower() not in FILE_SINKS:
        raise OutputError(f"{spec}: a live output file must be one of {', '.join(sorted(FILE_SINKS))} "
                          f"(got {p.suffix or 'no extension'!r})")
    if not p.parent.is_dir():
        raise OutputError(f"{spec}: folder {p.parent} does not exist")
    if p.exists() and not overwrite:
        raise OutputError(f"{spec}: exists (use --overwrite to replace it)")
    return Endpoint(spec, "file", spec)


@dataclass(eq=False)
class LiveFrame(VideoFrame):
    """A decoded frame of a live source with the times the session keeps for it (monotonic s)."""

    arrival: float = 0.0  # when it arrived: decoded (camera, network, stdin) or due (--realtime)
    seq: int = 0  # 0-based number among all the frames the source delivered (index: among those processed)
    pulled: float = 0.0  # when the detector took it
    generating: float = 0.0  # when the generator started on it (0: it did not)
    covered: bool = False  # its faces got the fallback because generating them would be too late
    probe: bool = False  # generated as the first try after covered frames (the pipeline's back-off)
    faces: list = field(default_factory=list)  # the faces anonymized in it (set by the pipeline)

    def load(self, reformatter=None) -> None:
        """Fill ``image`` (upright RGB) from the decoded frame; ``reformatter``: one per thread."""
        rgb = _to_rgb(self._av, reformatter)
        k = self._rotation // 90
        self.image = np.ascontiguousarray(np.rot90(rgb, k) if k else rgb)


class LiveSource:
    """One live source, opened in the calling thread (:meth:`open`) and read by one thread
    (:meth:`run`): video frames are decoded, normalised to yuv420p at the first frame's size,
    converted to RGB and stamped with their arrival; audio packets are handed on as they are.
    With ``options.reconnect`` a lost network source is opened again with back-off, and its
    frames continue the same timeline."""

    def __init__(self, ep: Endpoint, options: LiveOptions, stop: threading.Event, audio: bool = True):
        self.ep, self.options, self.stop, self.audio = ep, options, stop, audio
        self.container = None
        self.vin = None  # the video stream of the first connection
        self.rate: Fraction = Fraction(30)  # its frame rate (30 when it does not say)
        self.time_base: Fraction = Fraction(1, 90000)  # output timeline: the first connection's video time base
        self.size: Optional[tuple[int, int]] = None  # (w, h) stored, of the first frame
        self.rotation = 0
        self.matrix = None  # the first frame's display matrix
        self.ended: Optional[str] = None  # end | duration | stopped | lost | failed
        self.error: Optional[BaseException] = None  # why it ended when not normally
        self.frames = 0  # frames delivered
        self.decode_errors = 0  # video packets the decoder rejected
        self.pts_fixed = 0  # frames whose missing or non-increasing pts was replaced
        self.reconnects = 0
        self._held: list = []  # items read by open() before the first frame, replayed by run()
        self._it: Optional[Iterator] = None  # the current connection's items (_items)
        self.taken = False  # set when a reader thread runs it (it closes the container itself)
        self._last_pts: Optional[int] = None
        self._last_arrival = 0.0
        self._first_pts: Optional[int] = None
        self._offset: Optional[int] = None  # this connection's pts offset (output time base)
        self._clock: Optional[tuple[float, float]] = None  # --realtime: (wall time, pts s) of the first frame

    # -- opening --------------------------------------------------------------------------
    def _open_once(self):
        ep, o = self.ep, self.options
        name = ep.name
        if ep.kind == "stdin":
            from .pipes import open_stream

            return open_stream(name="stdin", abort=self.stop)
        if ep.kind == "file":
            from .probe import _open_input

            return _open_input(ep.url)
        opts = {str(k): str(v) for k, v in o.input_options}
        scheme = _scheme(ep.url)
        if scheme in ("rtsp", "rtsps"):
            opts.setdefault("rtsp_transport", "tcp")  # no lost packets (UDP drops under load)
        elif scheme == "udp":
            opts.setdefault("overrun_nonfatal", "1")  # a full receive buffer loses packets, not the stream
        try:
            return av.open(ep.url, "r", format=ep.format, options=opts, timeout=(o.timeout, o.timeout),
                           metadata_errors="replace")
        except av.ExitError as e:
            raise InputError(f"{name}: no data within {o.timeout:g} s (--timeout)") from e
        except (av.FFmpegError, OSError, ValueError) as e:
            raise InputError(f"{name}: cannot open ({_ff_reason(e)})") from e

    def open(self) -> None:
        """Open the source and decode its first video frame (InputError when it cannot; a
        network source with ``reconnect`` is tried again with back-off for ``reconnect_for``
        seconds first). Sets :attr:`rate`, :attr:`time_base`, :attr:`size`, :attr:`rotation`."""
        t0 = time.monotonic()
        for attempt in range(1 << 30):
            try:
                self._connect(self._open_once())
                break
            except InputError:
                if not (self.options.reconnect and self.ep.kind == "network"):
                    raise
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                if time.monotonic() + delay - t0 > self.options.reconnect_for or self.stop.wait(delay):
                    raise
        self.rate = self.vin.average_rate or self.vin.guessed_rate or Fraction(30)
        self.time_base = self.vin.time_base or Fraction(1, 90000)

    def _connect(self, c) -> None:
        """Take ``c`` as the current connection: its video stream, and (first connection) its
        first decoded frame, held for :meth:`run` with the audio packets before it."""
        try:
            vin = _video_stream(c, self.ep.name)
            vin.thread_type = "SLICE"  # frame threads would hold frames back (latency)
            items = self._items(c, vin)
            held: list = []
            if self.size is None:
                for kind, obj in items:
                    held.append((kind, obj))
                    if kind == "v":
                        self.size = (obj.width, obj.height)
                        self.rotation = _rotation(obj)
                        self.matrix = _display_matrix(obj)
                        break
                else:
                    raise InputError(f"{self.ep.name}: no decodable video frame")
        except SourceLost as e:
            c.close()
            raise InputError(f"{self.ep.name}: {e}") from e
        except BaseException:
            c.close()
            raise
        self.container, self.vin, self._held, self._it = c, vin, held, items

    def first_image(self) -> np.ndarray:
        """The first frame (held by :meth:`open`) as (H, W, 3) uint8 RGB, upright."""
        f = next(obj for kind, obj in self._held if kind == "v")
        rgb = f.to_ndarray(format="rgb24")
        k = self.rotation // 90
        return np.ascontiguousarray(np.rot90(rgb, k) if k else rgb)

    def close(self) -> None:
        """Close the source unless a reader thread took it over (:meth:`run` closes it)."""
        if not self.taken and self.container is not None:
            self.container.close()
            self.container = None

    def audio_streams(self) -> list:
        """The first connection's audio streams (what the output is made for)."""
        return list(self.container.streams.audio) if self.audio and self.container is not None else []

    # -- reading --------------------------------------------------------------------------
    def run(self, on_frame: Callable[[LiveFrame], None], on_audio: Callable[[Any, float], None]) -> None:
        """Read until the source ends, ``stop`` is set, ``options.duration`` is reached, or the
        source is lost (after reconnecting, if asked). Sets :attr:`ended` and :attr:`error`.
        ``on_audio(packet, shift)``: ``shift`` seconds to add to its timestamps (reconnections)."""
        self.taken = True
        try:
            while True:
                try:
                    self.ended = self._read(on_frame, on_audio)
                    reason = "the stream ended"
                except SourceLost as e:
                    self.ended, reason = "lost", str(e)
                finally:
                    self.container.close()
                    self.container = None
                if self.ended != "lost":
                    return
                if not (self.options.reconnect and self.ep.kind == "network"):
                    self.error = SourceLost(f"{self.ep.name}: {reason}; the output was finalized"
                                            + (" (--reconnect retries a network source)"
                                               if self.ep.kind == "network" else ""))
                    return
                if not self._reconnect(reason):
                    return
        except BaseException as e:  # a bug or an unreadable file: the session reports it
            self.ended, self.error = "failed", e

    def _reconnect(self, reason: str) -> bool:
        """Open the next connection; False when stopped or given up (:attr:`error` set)."""
        name = self.ep.name
        log.warning("%s: %s; reconnecting (for up to %g s)", name, reason, self.options.reconnect_for)
        t0 = time.monotonic()
        for attempt in range(1 << 30):
            delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
            if time.monotonic() + delay - t0 > self.options.reconnect_for:
                break
            if self.stop.wait(delay):
                self.ended = "stopped"
                return False
            try:
                self._connect(self._open_once())
            except InputError as e:
                reason = str(e).removeprefix(f"{name}: ")
                continue
            self.reconnects += 1
            self._offset = None
            self.ended = None
            log.warning("%s: reconnected (attempt %d)", name, attempt + 1)
            return True
        self.ended = "lost"
        self.error = SourceLost(f"{name}: {reason}; gave up reconnecting after {self.options.reconnect_for:g} s; "
                                f"the output was finalized")
        return False

    def _items(self, c, vin) -> Iterator[tuple[str, Any]]:
        """("a", audio packet) and ("v", decoded video frame) of connection ``c``, in order.
        SourceLost when a camera or network source stops sending, fails or ends."""
        name = self.ep.name
        live = self.ep.kind in ("camera", "network")
        audio = list(c.streams.audio) if self.audio else []
        demux = c.demux(vin, *audio)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.ExitError as e:
                raise SourceLost(f"no data for {self.options.timeout:g} s (--timeout)") from e
            except (av.FFmpegError, OSError) as e:
                if live:
                    raise SourceLost(f"reading failed ({_ff_reason(e)})") from e
                raise InputError(f"{name}: reading failed after {self.frames} frames ({_ff_reason(e)})") from e
            if packet.stream.type != "video":
                yield "a", packet
                continue
            try:
                decoded = packet.decode()
            except av.FFmpegError as e:
                self.decode_errors += 1
                log.debug("%s: damaged video packet: %s", name, _ff_reason(e))
                continue
            for f in decoded:
                yield "v", f
        if live:
            raise SourceLost("the stream ended")

    def _read(self, on_frame, on_audio) -> str:
        """The current connection to its end: "end" (a file or stdin), "duration" or "stopped"."""
        held, self._held = self._held, []
        tb = self.vin.time_base or self.time_base
        for kind, obj in itertools.chain(held, self._it):
            if self.stop.is_set():
                return "stopped"
            if kind == "a":
                if not self.reconnects:
                    on_audio(obj, 0.0)
                elif self._offset is not None:  # after a reconnection: once the video has set the shift
                    on_audio(obj, float(self._offset * self.time_base))
                continue
            lf = self._frame(obj, tb)
            if self.options.duration is not None and \
                    (lf._out_pts - self._first_pts) * self.time_base >= self.options.duration:
                return "duration"
            if self.options.realtime and not self._pace(lf):
                return "stopped"
            lf.arrival = time.monotonic()
            self._last_arrival = lf.arrival
            self.frames += 1
            on_frame(lf)
        return "end"

    def _pace(self, lf: LiveFrame) -> bool:
        """--realtime: wait until ``lf`` is due (its pts against the wall clock); False if stopped."""
        t = float(lf._out_pts * self.time_base)
        if self._clock is None:
            self._clock = (time.monotonic(), t)
        due = self._clock[0] + (t - self._clock[1])
        wait = due - time.monotonic()
        return not (wait > 0 and self.stop.wait(wait))

    def _frame(self, f, tb: Fraction) -> LiveFrame:
        """The decoded frame ``f`` as a LiveFrame whose ``image`` is still None (see
        :meth:`LiveFrame.load`: only the frames that are processed are converted to RGB)."""
        w, h = self.size
        if f.format.name != "yuv420p" or (f.width, f.height) != (w, h):
            if (f.width, f.height) != (w, h) and self.reconnects:
                log.warning("%s: the stream came back at %dx%d; scaled to %dx%d", self.ep.name, f.width, f.height,
                            w, h)
            f = f.reformat(width=w, height=h, format="yuv420p")
        out_pts = self._out_pts(f.pts, tb)
        return LiveFrame(index=-1, image=None, pts=f.pts, time=float(out_pts * self.time_base), _av=f,
                         _out_pts=out_pts, _rotation=self.rotation, seq=self.frames)

    def _out_pts(self, pts: Optional[int], tb: Fraction) -> int:
        """The frame's pts on the output timeline: the source's own on the first connection; after
        a reconnection, shifted to continue the timeline with the wall-clock gap."""
        T = self.time_base
        step = max(1, int(round(1 / (self.rate * T))))
        last = self._last_pts
        scaled = None if pts is None else int(round(pts * tb / T))
        if self._offset is None:
            if not self.reconnects or last is None or scaled is None:
                self._offset = 0
            else:
                gap = max(time.monotonic() - self._last_arrival, 0.0)
                self._offset = last + max(step, int(round(gap / T))) - scaled
        new = last + step if scaled is None and last is not None else (scaled or 0) + self._offset
        if last is not None and new <= last:  # one frame interval on: --realtime paces by it
            new = last + step
            self.pts_fixed += 1
        if self._first_pts is None:
            self._first_pts = new
        self._last_pts = new
        return new


class LiveSink:
    """The live output: opened at the first frame (its size), written by one thread. Video is
    encoded with the frame's pts kept; audio packets (:meth:`queue_audio`, any thread) are copied
    where the container takes them, else re-encoded to AAC; a v4l2 device gets raw yuv420p video
    only. ``target``: a path (the temporary file of a file output), a URL, a device, or a
    writable file object (stdout)."""

    def __init__(self, ep: Endpoint, target: Any, encode: EncodeOptions):
        self.ep, self.target, self.encode = ep, target, encode
        self.out = None
        self.ovs = None
        self.tb: Fraction = Fraction(1, 90000)
        self.audio_out: dict[int, Any] = {}  # input stream index -> output stream
        self._copied: set[int] = set()  # input stream indices whose packets are copied as they are
        self.audio_mode = "none"  # copy | aac | mixed | none, as written
        self.audio_packets = 0
        self.audio_dropped = 0  # packets let go: no video written for a long time, or no such stream
        self._audio: collections.deque = collections.deque()
        self._reformatters = _Reformatters()
        self.frames = 0

    @property
    def is_open(self) -> bool:
        return self.out is not None

    def queue_audio(self, packet, shift: float = 0.0) -> None:
        """Hand an audio packet over (the reader thread, which also decodes the ones to be
        re-encoded, with its own container); the writing thread muxes or encodes it."""
        idx = packet.stream.index
        ost = self.audio_out.get(idx)
        if ost is None or packet.size == 0 or packet.dts is None:
            self.audio_dropped += ost is None
            return
        if shift:
            d = int(round(shift / packet.time_base))
            packet.pts, packet.dts = packet.pts + d, packet.dts + d
        if idx in self._copied:
            items = [(packet, ost)]
        else:
            try:
                items = [(af, ost) for af in packet.decode()]
            except av.FFmpegError:
                self.audio_dropped += 1
                return
        for item in items:
            if len(self._audio) >= MAX_PENDING_AUDIO:
                self._audio.popleft()
                self.audio_dropped += 1
            self._audio.append(item)

    def open(self, source: LiveSource) -> None:
        """Create the output for ``source``'s frames (OutputError when it cannot be created)."""
        ep, enc = self.ep, self.encode
        device = ep.kind == "device"
        codec = _video_encoder("rawvideo" if device else enc.codec)
        try:
            self.out = av.open(self.target, "w", format=ep.format)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise OutputError(f"{ep.name}: cannot create output ({_ff_reason(e)})") from e
        fmt = self.out.format.name
        if fmt in ("matroska", "webm"):
            self.out.container_options["avoid_negative_ts"] = "disabled"  # keep the source's times
        self.tb = source.time_base
        w, h = source.size
        try:
            ovs = self.out.add_stream(codec.name, rate=source.rate)
        except ValueError as e:
            raise OutputError(f"{ep.name}: a {fmt} output cannot hold {codec.name} video (--codec)") from e
        ovs.width, ovs.height, ovs.pix_fmt = w, h, "yuv420p"
        ovs.time_base = self.tb
        cc = ovs.codec_context
        cc.time_base, cc.framerate = self.tb, source.rate
        if not device:
            cc.gop_size = max(1, int(round(2 * float(source.rate))))  # a keyframe every 2 s: receivers join fast
            opts = _encoder_options(codec.name, enc)
            if codec.name in ("libx264", "libx265"):
                opts.setdefault("tune", "zerolatency")  # no lookahead, no B-frames: each frame out at once
            cc.options = opts
        if source.matrix is not None and fmt in ("mov", "mp4", "matroska"):
            try:
                ovs.set_display_matrix(source.matrix)
            except Exception:  # pragma: no cover - PyAV without display matrices
                log.warning("%s: the display rotation could not be written", ep.name)
        self.ovs = ovs
        self._open_audio(source, fmt, device)
        try:
            self.out.start_encoding()
        except (av.FFmpegError, ValueError, OSError) as e:
            raise OutputError(f"{ep.name}: cannot start the output ({_ff_reason(e)})") from e

    def _open_audio(self, source: LiveSource, fmt: str, device: bool) -> None:
        streams = source.audio_streams()
        if not streams or self.encode.audio == "none":
            return
        if device:
            log.warning("%s: a v4l2 device carries video only; the audio is not written", self.ep.name)
            return
        modes = set()
        for s in streams:
            ctx = s.codec_context
            if self.encode.audio == "copy" and _can_copy(fmt, s):
                ost = self.out.add_stream_from_template(s)
                ost.time_base = s.time_base
                self._copied.add(s.index)
                modes.add("copy")
            else:
                if self.encode.audio == "copy":
                    log.info("%s: %s audio cannot go into %s as it is; re-encoded to AAC", self.ep.name,
                             ctx.name, fmt)
                layout = ctx.layout.name if not ctx.layout.name.endswith("channels") else "stereo"
                try:
                    ost = self.out.add_stream("aac", rate=ctx.sample_rate or 48000, layout=layout)
                except ValueError as e:
                    raise OutputError(f"{self.ep.name}: a {fmt} output cannot hold AAC audio (--audio none)") from e
                ost.time_base = Fraction(1, ctx.sample_rate or 48000)
                modes.add("aac")
            self.audio_out[s.index] = ost
        self.audio_mode = modes.pop() if len(modes) == 1 else "mixed"

    def _mux(self, packet) -> None:
        try:
            self.out.mux(packet)
        except (av.FFmpegError, OSError) as e:
            raise OutputError(f"{self.ep.name}: writing failed ({_ff_reason(e)})") from e

    def _encode(self, stream, frame) -> list:
        try:
            return stream.encode(frame)
        except av.FFmpegError as e:
            raise OutputError(f"{self.ep.name}: {stream.codec_context.name} encoding failed ({_ff_reason(e)})") from e

    def write(self, vf: LiveFrame, image: np.ndarray, rects) -> None:
        """Paint ``image`` inside ``rects`` into the decoded frame, encode and mux it, then the
        audio that came meanwhile."""
        frame = vf._av
        if rects:
            uh, uw = vf.image.shape[:2]
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (uh, uw, 3), \
                (getattr(image, "shape", None), getattr(image, "dtype", None))
            clipped = _clip_rects(rects, uw, uh)
            if clipped:
                k = vf._rotation // 90
                stored = np.rot90(image, -k) if k else image
                srects = [_rect_to_stored(r, vf._rotation, frame.width, frame.height) for r in clipped]
                frame = _paint_rects(frame, stored, srects, self._reformatters)
        frame.pts = vf._out_pts
        frame.time_base = self.tb
        frame.pict_type = 0
        for pkt in self._encode(self.ovs, frame):
            self._mux(pkt)
        self.frames += 1
        self.drain_audio()

    def drain_audio(self) -> None:
        """Mux the copied audio packets and encode the decoded audio frames queued so far."""
        q = self._audio
        while q:
            item, ost = q.popleft()
            if isinstance(item, av.Packet):
                item.stream = ost
                self._mux(item)
                self.audio_packets += 1
            else:
                self._encode_audio(item, ost)

    def _encode_audio(self, af, ost) -> None:
        _retime_audio(af, ost.codec_context.sample_rate)
        for pkt in self._encode(ost, af):
            self._mux(pkt)
            self.audio_packets += 1

    def close(self) -> None:
        """Flush the encoders and finish the container (trailer, index): the output is complete."""
        if self.out is None:
            return
        try:
            self.drain_audio()
            for pkt in self._encode(self.ovs, None):
                self._mux(pkt)
            for idx, ost in self.audio_out.items():
                if idx not in self._copied:
                    self._encode_audio(None, ost)
            try:
                self.out.close()
            except (av.FFmpegError, OSError) as e:
                raise OutputError(f"{self.ep.name}: finishing the output failed ({_ff_reason(e)})") from e
        finally:
            self.out = None

    def abort(self) -> None:
        """Close after an error, flushing nothing."""
        if self.out is not None:
            try:
                self.out.close()
            except Exception:  # closing after an error: nothing more to report
                pass
            self.out = None


def _can_copy(fmt: str, stream) -> bool:
    """Whether container ``fmt`` takes ``stream``'s packets as they are."""
    codec = stream.codec_context.name
    if fmt in _STREAM_AUDIO:
        return codec in _STREAM_AUDIO[fmt]
    if codec.startswith("pcm_") and fmt in ("mp4", "mov", "ipod"):
        return False  # FFmpeg writes it, most players cannot play it
    try:
        with av.open(io.BytesIO(), "w", format=fmt) as probe_out:
            probe_out.add_stream_from_template(stream)
            probe_out.start_encoding()
    except Exception:
        return False
    return True
