"""Model registry: search order, verification, and download through a real local HTTP server:
explicit (`deid models download`) and on first use, from the mirror $DEID_MODELS_URL."""

import hashlib
import socket

import pytest
from click.testing import CliRunner

from conftest import MODELS
from deidcli import weights
from deidcli.cli.main import cli
from deidcli.errors import EXIT_MODELS, ModelError

# ../shared/models, or in a clone without it the cache conftest filled from $DEID_MODELS_URL
SHARED_MODELS = MODELS
needs_shared = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models not present")
SMALL = "det_scrfd_500m_kps_640.onnx"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DEID_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


@pytest.mark.skipif(not (SHARED_MODELS / "SHA256SUMS").is_file(), reason="../shared/models not present")
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
def http_server(tmp_path, serve):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    base, _ = serve(root)
    yield root, base


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


# --- first use: a missing file is fetched from $DEID_MODELS_URL/<name>, verified, then used --------

@pytest.fixture
def online(clean_env, monkeypatch):
    """Fetching on first use allowed (conftest turns it off for every other test), no mirror yet."""
    monkeypatch.delenv("DEID_OFFLINE", raising=False)
    monkeypatch.delenv("DEID_MODELS_URL", raising=False)
    return clean_env / "xdg" / "deid"


def test_source_url_follows_the_mirror(monkeypatch):
    monkeypatch.delenv("DEID_MODELS_URL", raising=False)
    assert weights.source_url(SMALL) == weights.REGISTRY[SMALL].url
    monkeypatch.setenv("DEID_MODELS_URL", "http://mirror.example/deid/models/")
    assert weights.source_url(SMALL) == f"http://mirror.example/deid/models/{SMALL}"


@needs_shared
def test_first_use_fetches_from_the_mirror(online, monkeypatch, serve, caplog):
    base, got = serve(SHARED_MODELS)
    monkeypatch.setenv("DEID_MODELS_URL", base)
    path = weights.model_path(SMALL)
    assert path == online / SMALL and got == [f"/{SMALL}"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == weights.REGISTRY[SMALL].sha256
    assert [p.name for p in online.iterdir()] == [SMALL]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644
    assert f"fetching it from {base}/{SMALL}" in caplog.text and "SHA-256 verified" in caplog.text
    assert weights.model_path(SMALL) == path and got == [f"/{SMALL}"]  # cached: fetched once


@pytest.fixture
def tampered_mirror(online, monkeypatch, serve, tmp_path):
    """DEID_MODELS_URL pointing at a mirror whose SMALL file is not the registry's; the files
    requested from it."""
    www = tmp_path / "www"
    www.mkdir()
    (www / SMALL).write_bytes(b"tampered")
    base, got = serve(www)
    monkeypatch.setenv("DEID_MODELS_URL", base)
    return got


def test_first_use_rejects_a_corrupt_download(online, tampered_mirror):
    got = tampered_mirror
    for _ in range(2):  # nothing kept: the second use fetches (and refuses) again
        with pytest.raises(ModelError, match="does not verify") as e:
            weights.model_path(SMALL)
        assert "DEID_MODELS_URL" in str(e.value) and "\n" not in str(e.value)
        assert list(online.iterdir()) == []
    assert got == [f"/{SMALL}"] * 2


def test_first_use_network_failure_is_one_line(online, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DEID_MODELS_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelError) as e:
        weights.model_path(SMALL)
    msg = str(e.value)
    assert "\n" not in msg and f"http://127.0.0.1:{port}/{SMALL} failed: Connection refused" in msg
    assert e.value.exit_code == EXIT_MODELS
    assert not online.exists() or list(online.iterdir()) == []


def test_missing_on_the_mirror_is_http_404(online, monkeypatch, serve, tmp_path):
    (tmp_path / "empty").mkdir()
    base, _ = serve(tmp_path / "empty")
    monkeypatch.setenv("DEID_MODELS_URL", base)
    with pytest.raises(ModelError, match=f"{SMALL} from {base}/{SMALL} failed: HTTP 404"):
        weights.model_path(SMALL)


def test_offline_turns_first_use_off(online, monkeypatch, serve, tmp_path):
    (tmp_path / "empty").mkdir()
    base, got = serve(tmp_path / "empty")
    monkeypatch.setenv("DEID_MODELS_URL", base)
    monkeypatch.setenv("DEID_OFFLINE", "1")
    with pytest.raises(ModelError, match="DEID_OFFLINE is set") as e:
        weights.model_path(SMALL)
    assert "deid models download" in str(e.value) and got == []
    with pytest.raises(ModelError, match="HTTP 404"):  # fetch=True asks all the same
        weights.model_path(SMALL, fetch=True)
    assert got == [f"/{SMALL}"]


@needs_shared
def test_models_download_command_uses_the_mirror(online, monkeypatch, serve, capsys):
    base, got = serve(SHARED_MODELS)
    monkeypatch.setenv("DEID_MODELS_URL", base)
    monkeypatch.setenv("DEID_OFFLINE", "1")  # the explicit command fetches all the same
    r = CliRunner().invoke(cli, ["models", "download", SMALL])
    assert r.exit_code == 0, r.output
    assert f"downloading {base}/{SMALL}" in r.output and "SHA-256 verified" in r.output
    r = CliRunner().invoke(cli, ["models", "download"])  # the rest of the registry
    assert r.exit_code == 0, r.output
    assert sorted(got) == sorted(f"/{n}" for n in weights.REGISTRY)
    assert sorted(p.name for p in online.iterdir()) == sorted(weights.REGISTRY)
    r = CliRunner().invoke(cli, ["models"])
    assert r.exit_code == 0 and r.output.count(" OK ") >= len(weights.REGISTRY), r.output


def test_models_download_command_refuses_a_corrupt_mirror(online, tampered_mirror):
    r = CliRunner().invoke(cli, ["models", "download", SMALL])
    assert r.exit_code == EXIT_MODELS
    err = [ln for ln in r.output.splitlines() if ln.startswith("deid: error:")]
    assert len(err) == 1 and "does not verify" in err[0]
    assert list(online.iterdir()) == []


@needs_shared
def test_download_progress_bar(online, monkeypatch, serve, capsys):
    base, _ = serve(SHARED_MODELS)
    monkeypatch.setenv("DEID_MODELS_URL", base)
    weights.download([SMALL], progress=True)
    err = capsys.readouterr().err
    assert f"{SMALL}:" in err and "/2.41M" in err  # a byte bar of the whole file on stderr
