"""Still images (read/write upright RGB) and atomic output files."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError, OutputError
from .files import atomic_file
from .probe import PathLike, _ff_reason


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
    :func:`deidcli.media.files.atomic_file`; here a temp file that cannot be created is an OutputError.
    """
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
