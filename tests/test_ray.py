"""`deid anonymize SRC DST --ray`: a folder run on a real local Ray cluster (loopback, CPU workers).

Each test runs the real `deid` command in a subprocess, which starts a local Ray cluster for the
run (about 10 s here, the workers loading their models included), on short clips cut from
../shared/videos with `--method blur`. Checked: the outputs match a plain folder run's (frames,
timestamps, audio packets, pixels), a rerun skips everything without starting a cluster, a worker
killed mid-file gets its file retried (complete output, no temporary file left), a bad input fails
alone, Ctrl-C stops the run cleanly, and without Ray `--ray` says how to install it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, audio_packets, decode_rgb, frame_pts, run_deid, start_deid, temp_of
from conftest import wait_for as wait_until
from deidcli.pipeline import jobs

DEID = [sys.executable, "-m", "deidcli.cli"]
ENV = dict(os.environ, DEID_MODELS_DIR=str(MODELS), RAY_DISABLE_USAGE_STATS="1")

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
need_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'deid-video[ray]')")


def run(*args, check=None, timeout=300, env=ENV):
    return run_deid(*args, check=check, timeout=timeout, env=env)


def start(*args):
    return start_deid(*args, env=ENV)


def wait_for(pred, timeout=180.0, what="condition"):
    return wait_until(pred, timeout, what, poll=0.05)


def by_name(report: dict) -> dict:
    return {Path(f["input"]).name: f for f in report["files"]}


def leftovers(root: Path) -> list:
    """Hidden files below root: temporary outputs, locks, the run's marker file."""
    return sorted(str(q.relative_to(root)) for q in root.rglob(".*"))


@pytest.fixture(scope="module")
def folder(clips, tmp_path_factory):
    """in/a.mp4 (512x512, aac), in/sub/b.mp4 (720p, two people, aac), in/c.mp4 (portrait, no audio)."""
    src = tmp_path_factory.mktemp("ray") / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(clips["talking"], src / "a.mp4")
    shutil.copy(clips["two_person"], src / "sub" / "b.mp4")
    shutil.copy(clips["portrait_noaudio"], src / "c.mp4")
    return src


@pytest.fixture(scope="module")
def plain(folder):
    """The plain folder run of the same folder: what --ray must reproduce."""
    out = folder.parent / "plain"
    p = run("anonymize", folder, out, "--method", "blur", "--json", check=0)
    return out, json.loads(p.stdout)


def test_without_ray_one_line_and_exit_2(folder, tmp_path):
    """Ray not importable: one line naming the extra to install, exit 2, nothing written."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from deidcli.cli import main; sys.argv = ['deid'] + sys.argv[1:]; main()")
    p = subprocess.run([sys.executable, "-c", code, "anonymize", str(folder), str(tmp_path / "out"), "--method",
                        "blur", "--ray"], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["deid: ERROR: --ray needs Ray, which is not installed: "
                                             "pip install 'deid-video[ray]'"], p.stderr
    assert not (tmp_path / "out").exists()


def test_ray_option_usage_errors(folder, tmp_path):
    p = run("anonymize", "--ray", folder, tmp_path / "out")  # SRC read as the address
    assert p.returncode == 2 and "write --ray after SRC DST" in p.stderr, p.stderr
    p = run("anonymize", folder, tmp_path / "out", "--ray-workers", "2")
    assert p.returncode == 2 and "--ray-workers applies to --ray runs only" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_a_worker_that_does_not_see_dst_refuses(tmp_path):
    """A node that mounts no shared DST (here: a marker file it cannot read back) or sees other
    inputs: the worker refuses before loading models; the driver stops the run with that line."""
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.cluster import NotShared, Worker

    (tmp_path / "in.mp4").write_bytes(b"1234")
    marker = tmp_path / ".deid-ray-0123"
    marker.write_text("token")
    ok = {"marker": str(marker), "token": "token", "samples": [(str(tmp_path / "in.mp4"), 4)]}
    Worker(AnonymizeOptions(), ok)._check_shared(samples=True)
    for bad in ({**ok, "marker": str(tmp_path / "elsewhere" / marker.name)}, {**ok, "token": "other"},
                {**ok, "samples": [(str(tmp_path / "in.mp4"), 5)]}, {**ok, "samples": [(str(tmp_path / "x"), 4)]}):
        with pytest.raises(NotShared, match="SRC and DST must be on a file system every node mounts"):
            Worker(AnonymizeOptions(), bad)._check_shared(samples=True)
    assert NotShared.exit_code == 2


def test_the_workers_get_absolute_paths(tmp_path, monkeypatch):
    """Workers run in another folder, on other machines: every path in the options is made absolute."""
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.cluster import absolute_paths

    monkeypatch.chdir(tmp_path)
    o = absolute_paths(AnonymizeOptions(weights=Path("w.pt"), models_dir=Path("m"), keep=(Path("a"), Path("/b"))))
    assert (o.weights, o.models_dir, o.keep) == (tmp_path / "w.pt", tmp_path / "m", (tmp_path / "a", Path("/b")))
    assert absolute_paths(AnonymizeOptions()) == AnonymizeOptions()


def test_workers_and_their_resources():
    """One worker per GPU, else per CPUS_PER_WORKER CPUs; each with up to that many CPUs; never
    more workers than files; --device cpu: CPU workers on a GPU cluster."""
    from deidcli.pipeline.cluster import ClusterOptions, worker_resources

    auto = ClusterOptions()
    assert worker_resources({"CPU": 2.0}, auto, 10) == (1, {"num_cpus": 2})
    assert worker_resources({"CPU": 2.0}, ClusterOptions(workers=2), 10) == (2, {"num_cpus": 1})
    assert worker_resources({"CPU": 64.0}, auto, 10) == (10, {"num_cpus": 4})
    assert worker_resources({"CPU": 64.0}, auto, 100) == (16, {"num_cpus": 4})
    assert worker_resources({"CPU": 32.0, "GPU": 4.0}, auto, 100) == (4, {"num_gpus": 1, "num_cpus": 4})
    assert worker_resources({"CPU": 32.0, "GPU": 4.0}, auto, 100, device="cpu") == (8, {"num_cpus": 4})
    assert worker_resources({"CPU": 4.0, "GPU": 8.0}, auto, 100) == (8, {"num_gpus": 1, "num_cpus": 1})


@need_ray
def test_ray_run_matches_the_plain_folder_run_and_a_rerun_skips(folder, plain, tmp_path):
    plain_out, plain_rep = plain
    out = tmp_path / "out"
    p = run("anonymize", folder, out, "--method", "blur", "--ray", "--ray-workers", "2", "--json", "--report",
            tmp_path / "report.json", check=0)
    assert "Traceback" not in p.stderr, p.stderr
    rep = json.loads(p.stdout)
    assert (tmp_path / "report.json").read_text() == p.stdout
    assert (rep["ok"], rep["skipped"], rep["failed"], rep["interrupted"], rep["pending"]) == (3, 0, 0, 0, 0)
    assert [f["input"] for f in rep["files"]] == [f["input"] for f in plain_rep["files"]]  # the plan's order
    assert rep["device"] == "cpu" and rep["detector_precision"] == plain_rep["detector_precision"]
    cl = rep["cluster"]
    assert cl["address"] == "local" and cl["nodes"] == 1 and len(cl["workers"]) == 2 and cl["start_seconds"] > 0
    assert cl["worker_resources"].get("num_gpus") is None and cl["worker_resources"]["num_cpus"] >= 1
    workers = {w["worker"] for w in cl["workers"]}
    for rel in ("a.mp4", "sub/b.mp4", "c.mp4"):
        f, g = by_name(rep)[Path(rel).name], by_name(plain_rep)[Path(rel).name]
        assert f["status"] == "ok" and f["attempts"] == 1 and f["worker"] in workers, f
        assert f["output"] == str(out / rel) and f["exit_code"] == 0
        for k in ("frames", "faces_detected", "faces_anonymized", "tracks"):
            assert f[k] == g[k], (rel, k)
        assert f["faces_anonymized"] > 0
        assert frame_pts(out / rel) == frame_pts(plain_out / rel) == frame_pts(folder / rel), rel
        if rel != "c.mp4":  # (c.mp4 has no audio)
            assert audio_packets(out / rel) == audio_packets(plain_out / rel) == audio_packets(folder / rel), rel
        a, b = np.stack(decode_rgb(out / rel)), np.stack(decode_rgb(plain_out / rel))
        assert np.abs(a.astype(int) - b).max() <= 2, rel  # the same blur, encoded the same way
        src_px = np.stack(decode_rgb(folder / rel))
        assert np.abs(a.astype(int) - src_px).mean() > 0.5, rel  # something was changed
    assert leftovers(out) == []  # no temporary, lock or marker file
    # a rerun: every output exists, so nothing to hand out and no cluster started
    t = time.time()
    p = run("anonymize", folder, out, "--method", "blur", "--ray", "--ray-workers", "2", "--json", check=0)
    rep = json.loads(p.stdout)
    assert (rep["ok"], rep["skipped"]) == (0, 3) and rep["cluster"]["workers"] == []
    assert all(f["error"] == "output exists (use --overwrite to replace it)" and f["worker"] is None
               and f["attempts"] == 0 for f in rep["files"])
    assert time.time() - t < 30


HOLD_LOCK = """
import sys, time
from pathlib import Path
from deidcli.pipeline import jobs
deadline = time.time() + 10
while (lk := jobs.try_lock(Path(sys.argv[1]))) is None:  # the killed worker's, freed as it dies
    assert time.time() < deadline
    time.sleep(0.01)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lk.release()
"""


@need_ray
def test_a_worker_killed_mid_file_gets_the_file_retried_and_a_bad_input_fails_alone(clips, medium, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(medium, src / "long.mp4")  # 3 s, the longest: handed out first
    shutil.copy(clips["talking"], src / "a.mp4")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    shutil.copy(clips["portrait_noaudio"], src / "c.mp4")
    proc = start("anonymize", src, out, "--method", "blur", "--ray", "--ray-workers", "2", "--json", "-v")
    try:
        wait_for(lambda: temp_of(out, "long.mp4") or proc.poll() is not None, what="long.mp4 to be written")
        assert temp_of(out, "long.mp4"), proc.communicate()
        owner = jobs.lock_owner(out / "long.mp4")  # the worker writing it: a Ray actor's process
        assert owner and owner["pid"] not in (None, proc.pid), owner
        time.sleep(0.5)
        tmp = temp_of(out, "long.mp4")
        os.kill(owner["pid"], signal.SIGKILL)
        # As a dead node's lock on NFS does until the server gives up on it, the lock stays held
        # a while: the retry finds it held, waits, and tries again (not reported skipped).
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / "long.mp4"), "8"],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        stdout, stderr = proc.communicate(timeout=300)
        assert holder.wait(30) == 0
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr  # broken.mp4
    assert "Traceback" not in stderr, stderr
    rep = json.loads(stdout)
    files = by_name(rep)
    assert {n: f["status"] for n, f in files.items()} == {
        "a.mp4": "ok", "broken.mp4": "failed", "c.mp4": "ok", "long.mp4": "ok"}
    assert files["long.mp4"]["attempts"] == 2 and files["long.mp4"]["worker"] != f"{owner['host']}:{owner['pid']}"
    assert files["broken.mp4"]["attempts"] == 1 and files["broken.mp4"]["exit_code"] == 1
    assert "broken.mp4" in files["broken.mp4"]["error"] and str(src / "broken.mp4") in files["broken.mp4"]["input"]
    assert len([ln for ln in stderr.splitlines() if "ERROR" in ln]) == 1, stderr
    assert "long.mp4: its lock is still held (in progress in another deid run" in stderr, stderr
    assert len(rep["cluster"]["workers"]) == 3  # two, and the one that replaced the killed one
    assert rep["stale_files_removed"] == [str(tmp[0])]  # the killed try's, removed by the next one
    assert sorted(q.name for q in out.iterdir()) == ["a.mp4", "c.mp4", "long.mp4"]  # no temp, lock or marker
    for name in ("a.mp4", "c.mp4", "long.mp4"):
        assert frame_pts(out / name) == frame_pts(src / name), name  # complete, decodes to the end
        if name != "c.mp4":
            assert audio_packets(out / name) == audio_packets(src / name), name


@pytest.fixture(scope="module")
def medium(shared, tmp_path_factory):
    from conftest import VIDEOS, cut_clip

    return cut_clip(VIDEOS / "lp_d6.mp4", tmp_path_factory.mktemp("medium") / "medium.mp4", 3.0)


@need_ray
def test_sigint_cancels_the_run_cleanly(clips, medium, tmp_path):
    """Ctrl-C while workers are busy: their files stop, partial outputs are removed, the report is
    written (in progress: interrupted; not started: pending), exit 130; a rerun finishes."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(medium, src / "long.mp4")
    for i in range(3):
        shutil.copy(clips["portrait_noaudio"], src / f"short{i}.mp4")
    proc = start("anonymize", src, out, "--method", "blur", "--ray", "--ray-workers", "1", "--json")
    try:
        wait_for(lambda: temp_of(out, "long.mp4") or proc.poll() is not None, what="long.mp4 to be written")
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # a second one while it stops: ignored
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert time.time() - t0 < 40, "did not stop promptly"
    assert "Traceback" not in stderr and "interrupted by SIGINT" in stderr, stderr
    rep = json.loads(stdout)
    assert rep["interrupted_by"] == "SIGINT"
    assert {n: f["status"] for n, f in by_name(rep).items()} == {
        "long.mp4": "interrupted", "short0.mp4": "pending", "short1.mp4": "pending", "short2.mp4": "pending"}
    assert by_name(rep)["long.mp4"]["exit_code"] == 130
    assert not out.exists()  # nothing half-written: no output, temp, lock or marker; the folder made for it removed


@need_ray
def test_models_missing_on_the_workers_exit_3(folder, tmp_path):
    """A worker that cannot load the models stops the run as a plain run stops: exit 3, one line."""
    env = dict(ENV, DEID_MODELS_DIR=str(tmp_path / "no_models"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               DEID_OFFLINE="1")
    p = run("anonymize", folder, tmp_path / "out", "--method", "blur", "--ray", "--json", env=env)
    assert p.returncode == 3, p.stderr
    assert [ln.split(":")[:2] for ln in p.stderr.strip().splitlines()] == [["deid", " ERROR"]], p.stderr
    assert "not found" in json.loads(p.stdout)["error"]
    assert not (tmp_path / "out").exists()
