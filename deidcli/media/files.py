"""Atomic output files: an output is written under a hidden temporary name next to it and renamed
when complete, so a reader never sees half a file. Standard library only (``--dry-run`` and the
folder jobs import it without PyAV)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

#: ``.NAME.deid-tmp-XXXXXXXX.EXT`` (tmp_path_for) -> NAME
TMP_RE = re.compile(r"^\.(?P<name>.+)\.deid-tmp-[0-9a-f]{8}(\.[^.]*)?$")


def tmp_path_for(dst: Path) -> Path:
    """Create (exclusively) and return ``.NAME.deid-tmp-XXXXXXXX.EXT`` next to ``dst`` (the name
    :data:`TMP_RE` matches). Raises OSError when it cannot be created."""
    for _ in range(100):
        tmp = dst.with_name(f".{dst.name}.deid-tmp-{secrets.token_hex(4)}{dst.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(dst))  # pragma: no cover


@contextlib.contextmanager
def atomic_file(dst: Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``dst``; rename it to ``dst`` when the block ends
    normally. On any exception, KeyboardInterrupt and SystemExit included, the temporary file
    is removed and the exception re-raised: ``dst`` is never partially written. Raises OSError
    when the temporary file cannot be created (see ``deidcli.media.images.atomic_output`` for media files)."""
    dst = Path(dst)
    tmp = tmp_path_for(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
