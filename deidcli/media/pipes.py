"""Streams on pipes: stdin input (with replay for probing) and stdout output."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional

import av

from ..errors import InputError, OutputError
from .probe import _ff_reason, _video_stream

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
