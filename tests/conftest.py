"""Shared fixtures: where ../shared is, and short real clips cut from it (stream copy, no re-encode)."""

import os
from fractions import Fraction
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIDEOS = SHARED / "videos"
LFW = SHARED / "data" / "lfw"


def _models() -> Path:
    """../shared/models, the team's fast path. A fresh clone without it, with DEID_MODELS_URL set,
    fetches every registry file from that mirror into the cache once (verified; what `deid models
    download` does) and tests with those, as `make demo` runs with them."""
    shared = SHARED / "models"
    if shared.is_dir() or not os.environ.get("DEID_MODELS_URL"):
        return shared
    from deidcli import weights

    weights.download(dest=weights.cache_dir(), models_dir=weights.cache_dir())
    return weights.cache_dir()


MODELS = _models()


def pytest_configure(config):
    if MODELS.is_dir():
        os.environ.setdefault("DEID_MODELS_DIR", str(MODELS))
    # no model fetched on first use behind a test's back: a missing file stays an error (exit 3);
    # tests/test_weights.py turns fetching on against its own loopback server
    os.environ.setdefault("DEID_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared():
    if not VIDEOS.is_dir():
        pytest.skip("../shared/videos not present")
    return SHARED


@pytest.fixture
def serve():
    """serve(root) -> (base URL, paths requested so far): a real HTTP server on 127.0.0.1 (a free
    port) serving the folder ``root`` until the test ends; a mirror for DEID_MODELS_URL."""
    import functools
    import http.server
    import threading

    servers = []

    def start(root: Path):
        got = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                got.append(self.path)
                super().do_GET()

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", got

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _need_shared(path: Path) -> None:
    """Skip the test when ``path`` is a file of ../shared that is absent (a clone without it);
    a missing file anywhere else is left to fail."""
    if SHARED in Path(path).parents and not Path(path).exists():
        pytest.skip(f"{path} not present")


def run_deid(*args, check=None, timeout=300, env=None, pyflags=()):
    """``deid ARGS...`` in a subprocess (this interpreter, the shared models, or ``env``;
    ``pyflags``: the interpreter's own, e.g. ("-X", "importtime")); with ``check`` the exit code
    must be that, else the assertion shows both streams."""
    import os
    import subprocess
    import sys

    env = env or dict(os.environ, DEID_MODELS_DIR=str(MODELS))
    p = subprocess.run([sys.executable, *pyflags, "-m", "deidcli.cli", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}"
    return p


def start_deid(*args, env=None):
    """``deid ARGS...`` started in a subprocess (as :func:`run_deid`), not waited for."""
    import os
    import subprocess
    import sys

    env = env or dict(os.environ, DEID_MODELS_DIR=str(MODELS))
    return subprocess.Popen([sys.executable, "-m", "deidcli.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(pred, timeout=120.0, what="condition", poll=0.1):
    """Poll ``pred()`` until it is true; AssertionError after ``timeout`` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def temp_of(folder: Path, name: str) -> list:
    """Temporary files of output ``name`` in ``folder`` (.NAME.deid-tmp-XXXXXXXX.EXT)."""
    try:
        return [q for q in folder.iterdir() if q.name.startswith(f".{name}.deid-tmp-")]
    except FileNotFoundError:
        return []


def cut_clip(src: Path, dst: Path, seconds: float, audio: bool = True) -> Path:
    """Copy the first ``seconds`` of ``src`` (video from its first keyframe, audio packets as they are)."""
    import av

    _need_shared(src)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        streams = [vin] + (list(inp.streams.audio) if audio else [])
        omap = {s.index: out.add_stream_from_template(s) for s in streams}
        for s in streams:
            omap[s.index].time_base = s.time_base
        for pkt in inp.demux(*streams):
            if pkt.dts is None or pkt.pts is None:
                continue
            t = float(pkt.pts * pkt.time_base)
            if t >= seconds:
                if pkt.stream.type == "video":
                    break
                continue
            pkt.stream = omap[pkt.stream.index]
            out.mux(pkt)
    return dst


@pytest.fixture(scope="session")
def clips(shared, tmp_path_factory):
    """Short real clips: two_person (720p, aac), talking (512x512, aac), portrait_noaudio (720x1280, none)."""
    d = tmp_path_factory.mktemp("clips")
    return {
        "two_person": cut_clip(VIDEOS / "ghost_2person.mp4", d / "two_person.mp4", 1.0),
        "talking": cut_clip(VIDEOS / "lp_d12.mp4", d / "talking.mp4", 1.5),
        "portrait_noaudio": cut_clip(VIDEOS / "lp_d13.mp4", d / "portrait_noaudio.mp4", 0.7, audio=False),
    }


def frame_pts(path: Path) -> list:
    import av

    with av.open(str(path)) as c:
        return [f.pts for f in c.decode(c.streams.video[0])]


def frame_times(path: Path) -> list:
    """Presentation time of every frame in seconds (Fraction), for comparing across containers."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [Fraction(f.pts) * s.time_base for f in c.decode(s)]


def audio_packets(path: Path) -> list:
    """(pts, dts, duration, sha1 of payload) of every audio packet of every audio stream."""
    import hashlib

    import av

    with av.open(str(path)) as c:
        out = []
        for pkt in c.demux(*c.streams.audio):
            if pkt.size == 0:
                continue
            out.append((pkt.stream.index, pkt.pts, pkt.dts, pkt.duration,
                        hashlib.sha1(bytes(pkt)).hexdigest()))
        return out


def decode_rgb(path: Path, n: int | None = None) -> list:
    import av

    _need_shared(path)

    with av.open(str(path)) as c:
        out = []
        for f in c.decode(c.streams.video[0]):
            out.append(f.to_ndarray(format="rgb24"))
            if n and len(out) >= n:
                break
        return out


def aligned_lfw_crops(names):
    """(N, 128, 128, 3) uint8 RGB generator crops of the central face of LFW images (names like
    ``Aaron_Peirsol/Aaron_Peirsol_0001.jpg``), aligned on deid's own detector's 5 points with the
    default crop geometry, as the pipeline aligns them."""
    import cv2
    import numpy as np

    from deidcli.faces.align import CROP_MARGIN, CROP_SIZE, estimate_transform, warp_crop
    from deidcli.faces.detect import Detector

    if not LFW.is_dir():
        pytest.skip(f"{LFW} not present")

    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx", det_thresh=0.3, det_size=320)
    crops = []
    for name in names:
        img = np.ascontiguousarray(cv2.imread(str(LFW / "lfw_deepfunneled" / name))[:, :, ::-1])
        d = det.detect(img)
        assert len(d), name
        k = int(np.argmin(np.linalg.norm((d.boxes[:, :2] + d.boxes[:, 2:]) / 2 - 125, axis=1)))  # central face
        crops.append(warp_crop(img, estimate_transform(d.kps[k], CROP_SIZE, CROP_MARGIN), CROP_SIZE))
    return np.stack(crops)


__all__ = ["SHARED", "VIDEOS", "MODELS", "LFW", "cut_clip", "frame_pts", "frame_times", "audio_packets", "decode_rgb", "aligned_lfw_crops", "Fraction"]
