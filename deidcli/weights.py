"""Model registry: every model file deid uses, its SHA-256, where it comes from, where it is.

Search order for a file: ``--models-dir``, then ``$DEID_MODELS_DIR``, then the cache
``$XDG_CACHE_HOME/deid`` (default ``~/.cache/deid``). Every load verifies the SHA-256
(cached per path/size/mtime within a process). ``download()`` fetches into the cache
through a temporary file that is verified and then renamed; nothing is ever written
into site-packages or the repository.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def model_path(name: str, models_dir: Optional[os.PathLike] = None) -> Path:
    """Path of a verified model file; ModelError naming the file, where it was looked for and how
    to get it otherwise."""
    st = status(name, models_dir)
    where = ", ".join(str(d) for d in st.searched)
    if st.path is None:
        raise ModelError(
            f"model file {name} not found (looked in: {where}); run `deid models download` "
            f"or set DEID_MODELS_DIR / --models-dir to a folder holding it (source: {st.model.url})"
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
    log: Callable[[str], None] = lambda s: None,
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch model files that are missing or corrupt into ``dest`` (default: the cache).

    Each file goes to a temporary file in ``dest``, is checked against its SHA-256, and is
    renamed into place only then. ``urls`` overrides the source URL per name (mirrors, tests).
    Returns the paths written. Raises ModelError if a download fails or does not verify.
    """
    dest = Path(dest) if dest else cache_dir()
    written = []
    for name in names or list(REGISTRY):
        model = _get(name)
        st = status(name, models_dir)
        if st.ok:
            log(f"{name}: present at {st.path}")
            continue
        url = (urls or {}).get(name, model.url)
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        try:
            h = hashlib.sha256()
            log(f"{name}: downloading {url}")
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != model.sha256:
                raise ModelError(
                    f"download of {name} from {url} does not verify "
                    f"(SHA-256 {h.hexdigest()[:12]}..., expected {model.sha256[:12]}...)"
                )
            final = dest / name
            os.replace(tmp, final)
            written.append(final)
            log(f"{name}: saved to {final}")
        except ModelError:
            raise
        except Exception as e:  # network errors, HTTP errors, disk errors
            raise ModelError(f"download of {name} from {url} failed: {e}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return written


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
