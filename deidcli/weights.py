"""Model registry: every model file deid uses, its SHA-256, where it comes from, where it is.

Search order for a file: ``--models-dir``, then ``$DEID_MODELS_DIR``, then the cache
``$XDG_CACHE_HOME/deid`` (default ``~/.cache/deid``). Every load verifies the SHA-256
(cached per path/size/mtime within a process). A file found nowhere is fetched on first use
(``model_path``), unless ``$DEID_OFFLINE`` is set. ``download()`` fetches into the cache
through a temporary file that is verified and then renamed; nothing is ever written
into site-packages or the repository. ``$DEID_MODELS_URL`` points every download at a
mirror holding the files under their registry names (``$DEID_MODELS_URL/<name>``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
MIRROR_ENV = "DEID_MODELS_URL"  # base URL of a mirror: files come from $DEID_MODELS_URL/<name>
OFFLINE_ENV = "DEID_OFFLINE"  # set (1, yes, true): no fetch on first use; a missing file: an error

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFile:
    name: str  # file name deid looks for
    sha256: str  # expected SHA-256 of the file
    url: str  # public source it is downloaded from
    source: str  # human-readable provenance (repository : path @ commit)
    licence: str  # licence of the weights
    purpose: str  # what deid uses it for


_INSIGHTFACE_LICENCE = "InsightFace pretrained models: non-commercial research use only"

REGISTRY: dict[str, ModelFile] = {
    m.name: m
    for m in (
        ModelFile(
            name="det_scrfd_2.5g_kps.onnx",
            sha256="bc24bb349491481c3ca793cf89306723162c280cb284c5a5e49df3760bf5c2ce",
            url="https://github.com/darzhz/pixamatch/raw/HEAD/models/scrfd_2.5g_bnkps.onnx",
            source="darzhz/pixamatch : models/scrfd_2.5g_bnkps.onnx (InsightFace SCRFD-2.5GF)",
            licence=_INSIGHTFACE_LICENCE,
            purpose="face detector with 5 landmarks (default)",
        ),
        ModelFile(
            name="det_scrfd_500m_kps_640.onnx",
            sha256="517cb1980c72422e676738fc45431700fb7cbee56d0f825b623ee427b3e5ce58",
            url="https://github.com/hpc203/scrfd-opencv/raw/9e14b462707fe75105c99213fba911646366aebd/"
            "weights/scrfd_500m_kps.onnx",
            source="hpc203/scrfd-opencv : weights/scrfd_500m_kps.onnx @ 9e14b46 (InsightFace SCRFD-500MF)",
            licence=_INSIGHTFACE_LICENCE,
            purpose="faster face detector, fixed 640x640 input (--detector)",
        ),
        ModelFile(
            name="rec_mobilefacenet.onnx",
            sha256="0c9ad2a83969fc82155706f7020e6926b4a1a90a5476fff4a5588dfe207f64a4",
            url="https://github.com/hyeonjunchoi/AutoTracking_RassibarryPi/raw/"
            "4acfb24675aeb8049e513abb62f1861bb64794f4/mobilefacenet.onnx",
            source="hyeonjunchoi/AutoTracking_RassibarryPi : mobilefacenet.onnx @ 4acfb24",
            licence="Apache-2.0 (weights of foamliu/MobileFaceNet)",
            purpose="identity descriptor per track (inference, ONNX Runtime)",
        ),
        ModelFile(
            name="rec_mobilefacenet.pt",
            sha256="90a00ba1d8b0b688af3deb731ed53dca582e6106805d1bc3cfdef55f570493f4",
            url="https://github.com/foamliu/MobileFaceNet/raw/a6cc903/weights/mobilefacenet.pt",
            source="foamliu/MobileFaceNet : weights/mobilefacenet.pt @ a6cc903",
            licence="Apache-2.0",
            purpose="differentiable identity network (training and evaluation)",
        ),
    )
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deid"


def search_dirs(models_dir: Optional[os.PathLike] = None) -> list[Path]:
    """Directories searched for model files, in order."""
    dirs: list[Path] = []
    if models_dir:
        dirs.append(Path(models_dir).expanduser())
    env = os.environ.get("DEID_MODELS_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(cache_dir())
    return dirs


_VERIFIED: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _VERIFIED[key] = h.hexdigest()
    return _VERIFIED[key]


@dataclass
class ModelStatus:
    model: ModelFile
    searched: list[Path]
    path: Optional[Path]  # where it was found (first hit), None if nowhere
    verified: Optional[bool]  # SHA-256 matches; None if not found

    @property
    def ok(self) -> bool:
        return bool(self.verified)


def status(name: str, models_dir: Optional[os.PathLike] = None) -> ModelStatus:
    model = _get(name)
    dirs = search_dirs(models_dir)
    for d in dirs:
        p = d / model.name
        if p.is_file():
            return ModelStatus(model, dirs, p, sha256_file(p) == model.sha256)
    return ModelStatus(model, dirs, None, None)


def source_url(name: str) -> str:
    """Where ``name`` is downloaded from: ``$DEID_MODELS_URL/<name>`` when set, else the registry's
    URL."""
    model = _get(name)
    base = os.environ.get(MIRROR_ENV, "").strip()
    return f"{base.rstrip('/')}/{model.name}" if base else model.url


def offline() -> bool:
    """True when ``$DEID_OFFLINE`` forbids fetching missing files on first use."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def model_path(name: str, models_dir: Optional[os.PathLike] = None,
               fetch: Optional[bool] = None) -> Path:
    """Path of a verified model file. A file found nowhere is downloaded into the cache first
    (``fetch``; default: unless ``$DEID_OFFLINE`` is set). ModelError naming the file, where it
    was looked for and how to get it otherwise."""
    st = status(name, models_dir)
    where = ", ".join(str(d) for d in st.searched)
    if st.path is None and (not offline() if fetch is None else fetch):
        _log.warning("model file %s not found (looked in: %s): fetching it from %s (first use; "
                     "%s=1 turns this off)", name, where, source_url(name), OFFLINE_ENV)
        try:
            got = download([name], models_dir=models_dir)
        except ModelError as e:
            raise ModelError(f"{e}; set {MIRROR_ENV} to a mirror, or DEID_MODELS_DIR / "
                             f"--models-dir to a folder holding {name}, or run `deid models "
                             "download` where the network reaches it") from None
        for path in got:  # none when another process saved it in the meantime
            _log.warning("%s: SHA-256 verified, saved to %s", name, path)
        st = status(name, models_dir)
    if st.path is None:
        off = f" ({OFFLINE_ENV} is set: no download on first use)" if offline() else ""
        raise ModelError(
            f"model file {name} not found (looked in: {where}){off}; run `deid models download` "
            "or set DEID_MODELS_DIR / --models-dir to a folder holding it "
            f"(source: {source_url(name)})"
        )
    if not st.verified:
        raise ModelError(
            f"model file {st.path} does not verify (SHA-256 {sha256_file(st.path)[:12]}..., "
            f"expected {st.model.sha256[:12]}...); delete it and run `deid models download`"
        )
    return st.path


def _get(name: str) -> ModelFile:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


def download(
    names: Optional[Iterable[str]] = None,
    dest: Optional[Path] = None,
    models_dir: Optional[os.PathLike] = None,
    urls: Optional[dict[str, str]] = None,
    log: Callable[[str], None] = _log.info,
    timeout: float = 60.0,
    progress: Optional[bool] = None,
) -> list[Path]:
    """Fetch model files that are missing or corrupt into ``dest`` (default: the cache).

    Each file goes to a temporary file in ``dest``, is checked against its SHA-256, and is
    renamed into place only then. Sources: ``urls`` per name (tests), else :func:`source_url`
    (``$DEID_MODELS_URL`` or the registry). ``progress``: a byte progress bar on stderr
    (default: only when stderr is a terminal). Returns the paths written. Raises ModelError
    (one line) if a download fails or does not verify; nothing is left behind then.
    """
    dest = Path(dest) if dest else cache_dir()
    written = []
    for name in names or list(REGISTRY):
        model = _get(name)
        st = status(name, models_dir)
        if st.ok:
            log(f"{name}: present at {st.path}")
            continue
        url = (urls or {}).get(name) or source_url(name)
        log(f"{name}: downloading {url}")
        try:
            dest.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        except OSError as e:
            raise ModelError(f"cannot write {name} into {dest}: {e.strerror or e}") from None
        try:
            digest = _fetch(url, fd, timeout, name, progress)
            if digest != model.sha256:
                raise ModelError(
                    f"download of {name} from {url} does not verify "
                    f"(SHA-256 {digest[:12]}..., expected {model.sha256[:12]}...)"
                )
            final = dest / name
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the cache from other users
            os.replace(tmp, final)
            written.append(final)
            log(f"{name}: SHA-256 verified, saved to {final}")
        except ModelError:
            raise
        except Exception as e:  # network errors, HTTP errors, disk errors
            raise ModelError(f"download of {name} from {url} failed: {_reason(e)}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return written


def _fetch(url: str, fd: int, timeout: float, name: str, progress: Optional[bool]) -> str:
    """Stream ``url`` into the open file ``fd`` (closed here); returns the SHA-256 of the bytes."""
    from tqdm import tqdm

    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "deid-video"})
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, disable=None if progress is None else not progress,
                  leave=False) as bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def _reason(e: Exception) -> str:
    """One line for a download failure: the HTTP status, the socket error, or the OS error."""
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, Exception) else Exception(str(e.reason))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


# --- the generator checkpoint shipped with deid (trained by this project) -------------------
DEFAULT_GENERATOR = REPO_ROOT / "weights" / "deid_generator_128.pt"


def generator_path(weights: Optional[os.PathLike] = None) -> Path:
    """The generator checkpoint to use: ``weights`` if given, else the one shipped in weights/."""
    p = Path(weights) if weights else DEFAULT_GENERATOR
    if not p.is_file():
        if weights:
            raise ModelError(f"generator checkpoint {p} not found")
        raise ModelError(
            f"no trained generator checkpoint: {p} is missing. `--method generate` needs one; "
            "pass --weights PATH to a checkpoint made by `deid train`, or use --method blur/pixelate/solid"
        )
    return p
