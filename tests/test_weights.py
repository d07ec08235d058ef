"""Model registry: search order, verification, and download through a real local HTTP server."""

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from deidcli import weights
from deidcli.cli import cli
from deidcli.errors import EXIT_MODELS, ModelError

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
needs_shared = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models not present")
SMALL = "det_scrfd_500m_kps_640.onnx"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DEID_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_registry_matches_shared_checksums():
    sums = dict(line.split()[::-1] for line in (SHARED_MODELS / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert set(weights.REGISTRY) == set(sums)
    for name, m in weights.REGISTRY.items():
        assert m.sha256 == sums[name], name
        assert m.url.startswith("https://github.com/"), m.url


def test_search_order(clean_env, monkeypatch):
    a, b = clean_env / "a", clean_env / "b"
    monkeypatch.setenv("DEID_MODELS_DIR", str(b))
    assert weights.search_dirs(a) == [a, b, clean_env / "xdg" / "deid"]


def test_missing_model_error_names_file_and_places(clean_env):
    with pytest.raises(ModelError) as e:
        weights.model_path(SMALL, clean_env / "nowhere")
    msg = str(e.value)
    assert SMALL in msg and "nowhere" in msg and "deid models download" in msg


def test_corrupt_model_is_refused(clean_env):
    d = clean_env / "m"
    d.mkdir()
    (d / SMALL).write_bytes(b"not a model")
    with pytest.raises(ModelError, match="does not verify"):
        weights.model_path(SMALL, d)


@needs_shared
def test_models_command_exit_codes(clean_env):
    r = CliRunner().invoke(cli, ["models"])
    assert r.exit_code == EXIT_MODELS and "MISSING" in r.output
    r = CliRunner().invoke(cli, ["models", "--models-dir", str(SHARED_MODELS)])
    assert r.exit_code == 0, r.output
    assert r.output.count(" OK ") >= len(weights.REGISTRY)


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@needs_shared
def test_download_verifies_then_renames(clean_env, http_server):
    root, base = http_server
    (root / SMALL).write_bytes((SHARED_MODELS / SMALL).read_bytes())
    dest = clean_env / "cache"
    got = weights.download([SMALL], dest=dest, urls={SMALL: f"{base}/{SMALL}"})
    assert got == [dest / SMALL]
    assert hashlib.sha256((dest / SMALL).read_bytes()).hexdigest() == weights.REGISTRY[SMALL].sha256
    assert [p.name for p in dest.iterdir()] == [SMALL]  # no temp file left
    assert weights.model_path(SMALL, dest) == dest / SMALL


def test_download_bad_content_leaves_nothing(clean_env, http_server):
    root, base = http_server
    (root / SMALL).write_bytes(b"tampered")
    dest = clean_env / "cache"
    with pytest.raises(ModelError, match="does not verify"):
        weights.download([SMALL], dest=dest, urls={SMALL: f"{base}/{SMALL}"})
    assert list(dest.iterdir()) == []


def test_download_http_error(clean_env, http_server):
    _, base = http_server
    with pytest.raises(ModelError, match="failed"):
        weights.download([SMALL], dest=clean_env / "c", urls={SMALL: f"{base}/missing.onnx"})
