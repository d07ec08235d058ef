"""First contact: the bundled demo clip, and a run on a machine with no models, fetched on first
use from a loopback mirror (DEID_MODELS_URL) as `make demo` does in a fresh clone."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import MODELS, frame_pts
from deidcli.cli.main import cli
from deidcli.cli.demo import FPS, SIZE, make_demo_clip

DEID = [sys.executable, "-m", "deidcli.cli"]
FETCHED = ("det_scrfd_2.5g_kps.onnx", "rec_mobilefacenet.onnx")  # what --method generate loads


def test_demo_clip_streams(tmp_path):
    import av

    dst = make_demo_clip(tmp_path / "demo.mp4", seconds=1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]  # written atomically, no temp left
    with av.open(str(dst)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.width, v.height, v.average_rate) == ("h264", *SIZE, FPS)
        assert (a.codec_context.name, a.rate, a.channels) == ("aac", 48000, 1)
        assert abs(float(a.duration * a.time_base) - 1.0) < 0.05
    assert len(frame_pts(dst)) == FPS


def test_demo_clip_command(tmp_path):
    r = CliRunner().invoke(cli, ["demo-clip", str(tmp_path / "d.mp4"), "--seconds", "0.4", "--no-audio"])
    assert r.exit_code == 0, r.output
    import av

    with av.open(str(tmp_path / "d.mp4")) as c:
        assert len(c.streams.audio) == 0 and c.streams.video[0].frames == 10


@pytest.mark.skipif(not all((MODELS / n).is_file() for n in FETCHED), reason="../shared/models not present")
def test_fresh_machine_fetches_models_and_generates_the_demo_face(tmp_path, serve):
    """No DEID_MODELS_DIR, an empty cache: `deid anonymize` fetches the two files it needs from the
    mirror, verifies them, and generates the astronaut's face in every frame."""
    src = make_demo_clip(tmp_path / "demo.mp4", seconds=1.0, audio=False)
    base, got = serve(MODELS)
    env = {k: v for k, v in os.environ.items() if k not in ("DEID_MODELS_DIR", "DEID_OFFLINE")}
    env.update(DEID_MODELS_URL=base, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    p = subprocess.run([*DEID, "anonymize", str(src), str(tmp_path / "out.mp4"), "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    f = json.loads(p.stdout)["files"][0]
    assert f["status"] == "ok" and f["frames"] == FPS
    assert f["face_paths"] == {"generated": FPS} and f["tracks"] == 1
    assert sorted(got) == sorted(f"/{n}" for n in FETCHED)
    cache = tmp_path / "xdg" / "deid"
    assert sorted(x.name for x in cache.iterdir()) == sorted(FETCHED)
    for n in FETCHED:
        assert f"fetching it from {base}/{n}" in p.stderr and f"{n}: SHA-256 verified" in p.stderr
    p = subprocess.run([*DEID, "anonymize", str(src), str(tmp_path / "out2.mp4"), "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and len(got) == len(FETCHED), p.stderr  # the second run uses the cache
