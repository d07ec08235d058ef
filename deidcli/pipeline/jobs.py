"""Folder runs that are safe to automate: sharding, per-output locks, stale temporary files.

No heavy imports here (no av, torch, onnxruntime): ``--dry-run`` plans with this module alone.

Files next to an output ``DIR/NAME`` while it is being written (see
:func:`deidcli.media.files.atomic_file`):

* ``DIR/.NAME.deid-tmp-XXXXXXXX.EXT``: the output being written, renamed to ``NAME`` when complete;
* ``DIR/.NAME.deid-lock``: the lock of the run writing it. The run holds ``flock`` on it while it
  works on ``NAME``; the kernel releases that lock when the process ends in any way (kill -9
  included), so a lock file left behind by a dead run is simply free. It holds the pid, host and
  start time of its run, for humans.

A temporary file is only created while its output's lock is held, so a temporary file whose lock
can be taken belongs to a dead run: :func:`clean_stale` removes those, and never the temporary file
of a live run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, Optional, Sequence

from ..media.files import TMP_RE, atomic_file

log = logging.getLogger(__name__)

#: ``.NAME.deid-lock`` -> NAME
LOCK_RE = re.compile(r"^\.(?P<name>.+)\.deid-lock$")


# --- sharding -----------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, 0-based: ``0/4`` ... ``3/4`` are the four shards. ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"shard must look like I/N (e.g. 0/4), not {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"shard count must be >= 1, not {n}")
    if not 0 <= i < n:
        raise ValueError(f"shard index must be in 0..{n - 1} (0-based), not {i}")
    return i, n


def shard_of(rel: PurePath | str, count: int) -> int:
    """Shard (0..count-1) of an input, from the SHA-1 of its POSIX path relative to the source folder.

    Depends only on that relative path: not on listing order, the machine, the absolute location
    of the folder, or which outputs already exist.
    """
    key = PurePath(rel).as_posix().encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") % count


def select_shard(jobs: Sequence[tuple[Path, Path]], src: Path, shard: tuple[int, int]) -> list[tuple[Path, Path]]:
    """The jobs of shard ``shard = (index, count)``; inputs keyed by their path relative to ``src``
    (a single file: its name)."""
    index, count = shard
    out = []
    for s, d in jobs:
        rel = s.relative_to(src) if src.is_dir() else PurePath(s.name)
        if shard_of(rel, count) == index:
            out.append((s, d))
    return out


# --- locks --------------------------------------------------------------------------------------

def lock_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.deid-lock")


@dataclass
class OutputLock:
    """An exclusive ``flock`` on ``.NAME.deid-lock`` next to an output; :meth:`release` removes the file."""

    path: Path
    fd: int
    locked: bool = True  # False where the file system has no flock (then nothing is excluded)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiting run then sees a new file (see try_lock)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_lock(dst: Path) -> Optional[OutputLock]:
    """Take the lock of output ``dst`` without waiting; None when another live process holds it.

    Creates the lock file (raises OSError when it cannot, e.g. read-only or missing folder).
    """
    path = lock_path(dst)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            _warn_no_flock(path.parent, e)  # work on, unprotected, rather than not at all
            locked = False
        except BaseException:
            os.close(fd)
            raise
        # Its previous holder may have removed the file between our open and flock: then we hold
        # a lock on a dead inode that nobody else sees. Start again on the current file.
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:  # only informative (a full disk must not stop the run here)
            pass
        return OutputLock(path, fd, locked)


#: flock not supported by the file system (some FUSE and network file systems)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_warned_no_flock: set[str] = set()


def _warn_no_flock(folder: Path, e: OSError) -> None:
    if str(folder) not in _warned_no_flock:
        _warned_no_flock.add(str(folder))
        log.warning("%s: file locks are not supported here (%s): runs that overlap on this folder "
                    "could process the same file twice", folder, e.strerror)


def lock_owner(dst: Path) -> Optional[dict]:
    """Who holds the lock of ``dst`` (``{"pid", "host", "started"}``, values may be None), or None
    when nobody does. Writes nothing: used by ``--dry-run``."""
    path = lock_path(dst)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_owner(path)
        except OSError:  # no flock on this file system: cannot be known
            return None
        return None  # free: our shared lock goes with the close below
    finally:
        os.close(fd)


def read_owner(path: Path, wait_s: float = 1.0) -> dict:
    """The pid/host/start time written in a lock file (None values when unreadable).

    The owner writes these right after taking the lock, so a reader that finds the lock held
    may see the file still empty: it re-reads for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(Path(path).read_text())
            if not isinstance(info, dict):
                raise ValueError
            break
        except (OSError, ValueError):
            info = {}
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return {k: info.get(k) for k in ("pid", "host", "started")}


def owner_text(owner: Optional[dict]) -> str:
    """The reason reported for a file another run is working on."""
    owner = owner or {}
    pid = owner.get("pid") or "?"
    host = owner.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"in progress in another deid run (pid {pid}{where})"


# --- stale temporary files ----------------------------------------------------------------------

def _leftovers(folder: Path, only: Optional[str]) -> dict[str, list[Path]]:
    """Output name -> temporary and lock files next to it, in one folder."""
    found: dict[str, list[Path]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for n in names:
        m = TMP_RE.match(n) or LOCK_RE.match(n)
        if m and (only is None or m.group("name") == only):
            found.setdefault(m.group("name"), []).append(folder / n)
    return found


def clean_stale(dst: Path, recursive: bool) -> list[Path]:
    """Remove the temporary files (and free lock files) that dead runs left for outputs in ``dst``.

    ``recursive``: ``dst`` is an output folder, searched recursively; otherwise ``dst`` is one
    output file and only its own leftovers are looked at. A leftover is removed only while its
    output's lock is held here, so the temporary file of a live run is never touched. Returns the
    temporary files removed.
    """
    if recursive:
        if not dst.is_dir():
            return []
        folders = [Path(root) for root, _, _ in os.walk(dst)]
        only = None
    else:
        folders, only = [dst.parent], dst.name
    removed = []
    for folder in folders:
        for name, paths in sorted(_leftovers(folder, only).items()):
            try:
                lock = try_lock(folder / name)
            except OSError:
                continue  # cannot lock here (read-only...): leave it
            if lock is None or not lock.locked:
                if lock is not None:
                    lock.release()
                continue  # a live run is working on it (or, without flock, it cannot be known)
            with lock:
                for p in paths:
                    if p == lock.path:
                        continue
                    try:
                        os.unlink(p)
                        removed.append(p)
                    except OSError:  # gone already, or not ours to remove
                        pass
    return removed


# --- reports and errors -------------------------------------------------------------------------

def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` through :func:`atomic_file` (readers never see half a
    report). Raises OSError."""
    with atomic_file(Path(path)) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


#: errors about the place an output goes, reported as "OUTPUT: <reason>"
DEST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def dest_reason(exc: BaseException) -> Optional[str]:
    """"no space left on device", "read-only file system", ... when an OS error about the destination
    is at the root of ``exc`` (its cause chain); None otherwise."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        n = getattr(e, "errno", None)
        if isinstance(n, int) and abs(n) in DEST_ERRNOS:
            text = os.strerror(abs(n))
            return text[:1].lower() + text[1:]
        e = e.__cause__ or e.__context__
    return None


def counts(statuses: Iterable[str], keys: Sequence[str]) -> dict[str, int]:
    statuses = list(statuses)
    return {k: statuses.count(k) for k in keys}
