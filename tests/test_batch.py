"""Batch runs that are safe to automate: failures, signals, kill -9 and resume, concurrent runs,
full or read-only destinations, --dry-run, --shard, --report.

Unit tests of deidcli/pipeline/jobs.py first, then the real `deid` command in subprocesses on short clips
cut from ../shared/videos (`--method blur`, so each run costs seconds).
"""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MODELS, VIDEOS, cut_clip, frame_pts, run_deid, start_deid, temp_of, wait_for
from deidcli.pipeline import jobs
from deidcli.errors import InputError, OutputError

DEID = [sys.executable, "-m", "deidcli.cli"]
ENV = dict(os.environ, DEID_MODELS_DIR=str(MODELS))


def run(*args, check=None, timeout=300, pyflags=()):
    return run_deid(*args, check=check, timeout=timeout, env=ENV, pyflags=pyflags)


def start(*args):
    return start_deid(*args, env=ENV)


def tree(root: Path) -> dict:
    """Every path below root with (size, mtime), to show that nothing was written."""
    out = {}
    for q in sorted(root.rglob("*")):
        st = q.lstat()
        out[str(q.relative_to(root))] = (st.st_size if q.is_file() else None, st.st_mtime_ns)
    return out


def statuses(report: dict) -> dict:
    return {Path(f["input"]).name: f["status"] for f in report["files"]}


@pytest.fixture(scope="module")
def medium(shared, tmp_path_factory):
    """3 s of a talking head (about 75 frames): long enough to be caught in the middle."""
    return cut_clip(VIDEOS / "lp_d6.mp4", tmp_path_factory.mktemp("medium") / "medium.mp4", 3.0)


# --- jobs.py: sharding --------------------------------------------------------------------------

def test_parse_shard():
    assert jobs.parse_shard("0/4") == (0, 4)
    assert jobs.parse_shard(" 3 / 4 ") == (3, 4)
    assert jobs.parse_shard("0/1") == (0, 1)
    for bad in ("4/4", "1/0", "-1/3", "a/b", "1", "1/2/3", ""):
        with pytest.raises(ValueError):
            jobs.parse_shard(bad)


def test_shards_partition_a_folder_stably(tmp_path):
    rng = random.Random(0)
    rels = [f"d{rng.randrange(5)}/sub{rng.randrange(3)}/clip_{i:03d}.mp4" for i in range(120)]
    rels += ["top.mp4", "ünïcode name.mov", "with space/x.mkv"]
    roots = [tmp_path / "a" / "in", tmp_path / "b" / "deeper" / "in"]  # same files, elsewhere
    for root in roots:
        for r in rels:
            (root / r).parent.mkdir(parents=True, exist_ok=True)
            (root / r).write_bytes(b"")
    from deidcli.pipeline.anonymize import plan_jobs

    for n in (1, 2, 3, 7):
        per_root = []
        for root in roots:
            all_jobs = plan_jobs(root, root.parent / "out")
            assert len(all_jobs) == len(rels)
            shards = [jobs.select_shard(all_jobs, root, (i, n)) for i in range(n)]
            sets = [{s.relative_to(root).as_posix() for s, _ in sh} for sh in shards]
            assert set().union(*sets) == set(rels)  # union: every file
            assert sum(len(s) for s in sets) == len(rels)  # pairwise disjoint
            # not the listing order: a shuffled plan keeps every file in its shard
            shuffled = list(all_jobs)
            rng.shuffle(shuffled)
            assert [{s.relative_to(root).as_posix() for s, _ in jobs.select_shard(shuffled, root, (i, n))}
                    for i in range(n)] == sets
            per_root.append(sets)
        assert per_root[0] == per_root[1]  # not the folder's absolute location
    # not which outputs exist: the plan of a half-done folder keeps the same assignment
    root = roots[0]
    for s, d in plan_jobs(root, root.parent / "out")[::2]:
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(b"x")
    assert {s for s, _ in jobs.select_shard(plan_jobs(root, root.parent / "out"), root, (1, 3))} == \
        {root / r for r in rels if jobs.shard_of(r, 3) == 1}
    # not the machine or the Python version: pinned values (changing them reshuffles running shards)
    assert int.from_bytes(hashlib.sha1(b"d1/sub2/clip_007.mp4").digest()[:8], "big") % 10 == 3
    assert [jobs.shard_of("top.mp4", 4), jobs.shard_of("d1/sub2/clip_007.mp4", 10)] == [1, 3]
    # balanced enough
    sizes = [sum(jobs.shard_of(f"f{i}.mp4", 4) == k for i in range(2000)) for k in range(4)]
    assert min(sizes) > 400, sizes


# --- jobs.py: locks and stale files -------------------------------------------------------------

def test_lock_is_exclusive_and_names_its_owner(tmp_path):
    dst = tmp_path / "out.mp4"
    lk = jobs.try_lock(dst)
    assert lk is not None and lk.path == tmp_path / ".out.mp4.deid-lock"
    assert jobs.try_lock(dst) is None  # a second open file description conflicts, even in this process
    owner = jobs.lock_owner(dst)
    assert owner["pid"] == os.getpid() and owner["host"] and owner["started"]
    assert jobs.owner_text(owner) == f"in progress in another deid run (pid {os.getpid()})"
    lk.release()
    assert not lk.path.exists() and jobs.lock_owner(dst) is None
    lk2 = jobs.try_lock(dst)
    assert lk2 is not None
    lk2.release()


HOLDER = """
import sys, time
from pathlib import Path
from deidcli.pipeline import jobs
dst = Path(sys.argv[1])
lk = jobs.try_lock(dst)
tmp = dst.with_name(f".{dst.name}.deid-tmp-0123abcd{dst.suffix}")
tmp.write_bytes(b"partial")
print("ready", flush=True)
time.sleep(600)
"""


def test_stale_files_of_a_killed_run_are_removed_never_those_of_a_live_one(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / "sub" / "live.mp4")], stdout=subprocess.PIPE,
                            text=True)
    killed = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / "dead.mp4")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert live.stdout.readline().strip() == "ready" and killed.stdout.readline().strip() == "ready"
        # a temp file with no lock file at all (a run killed before locks existed) and unrelated files
        orphan = out / ".orphan.jpg.deid-tmp-89abcdef.jpg"
        orphan.write_bytes(b"x")
        keep = [out / ".keep", out / "ckpt.pt.deid-tmp123", out / "dead.mp4.deid-tmp-0123abcd.mp4"]
        for q in keep:
            q.write_bytes(b"x")
        assert jobs.lock_owner(out / "dead.mp4")["pid"] == killed.pid
        # both owners alive: only the orphan goes
        assert jobs.clean_stale(out, recursive=True) == [orphan]
        killed.kill()
        killed.wait(10)
        # the dead run's lock file is still there but free; its temp goes, the live run's stays
        assert (out / ".dead.mp4.deid-lock").exists() and jobs.lock_owner(out / "dead.mp4") is None
        assert jobs.clean_stale(out, recursive=True) == [out / ".dead.mp4.deid-tmp-0123abcd.mp4"]
        assert sorted(q.name for q in out.iterdir()) == sorted([q.name for q in keep] + ["sub"])
        assert sorted(q.name for q in (out / "sub").iterdir()) == [".live.mp4.deid-lock",
                                                                 ".live.mp4.deid-tmp-0123abcd.mp4"]
        assert jobs.lock_owner(out / "sub" / "live.mp4")["pid"] == live.pid
        # one output only (single-file runs)
        assert jobs.clean_stale(out / "sub" / "live.mp4", recursive=False) == []
    finally:
        for p in (live, killed):
            p.kill()
            p.wait(10)
    live_tmp = out / "sub" / ".live.mp4.deid-tmp-0123abcd.mp4"
    assert jobs.clean_stale(out / "sub" / "live.mp4", recursive=False) == [live_tmp]
    assert list((out / "sub").iterdir()) == []


def test_without_flock_runs_go_on_but_nothing_is_cleaned(tmp_path, monkeypatch, caplog):
    """A file system without flock (some FUSE/network mounts): work goes on, with a warning, and
    no temporary file is ever removed (a live run's cannot be told from a dead one's)."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(jobs.fcntl, "flock", no_flock)
    tmp = tmp_path / ".out.mp4.deid-tmp-0123abcd.mp4"
    tmp.write_bytes(b"x")
    lk = jobs.try_lock(tmp_path / "out.mp4")
    assert lk is not None and not lk.locked and "file locks are not supported" in caplog.text
    assert jobs.lock_owner(tmp_path / "out.mp4") is None  # --dry-run: cannot know, says nothing
    lk.release()
    assert jobs.clean_stale(tmp_path, recursive=True) == [] and tmp.exists()


def test_report_file_and_destination_errors(tmp_path):
    path = tmp_path / "r.json"
    jobs.write_json_atomic(path, {"a": 1})
    jobs.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and [q.name for q in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(OSError):
        jobs.write_json_atomic(tmp_path / "missing" / "r.json", {})
    try:
        raise OutputError("x.mp4: finishing the file failed") from OSError(errno.ENOSPC, "No space left on device")
    except OutputError as e:
        assert jobs.dest_reason(e) == "no space left on device"
    assert jobs.dest_reason(OSError(errno.EROFS, "x")) == "read-only file system"
    assert jobs.dest_reason(InputError("y.mp4: not readable")) is None


def test_a_second_signal_while_stopping_is_ignored():
    code = """
import os, signal
from deidcli.cli.main import _signals_to_interrupt
from deidcli.errors import Interrupted
disarm = _signals_to_interrupt()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    raise SystemExit("not interrupted")
except Interrupted as e:
    os.kill(os.getpid(), signal.SIGTERM)  # while shutting down: no second exception
    os.kill(os.getpid(), signal.SIGINT)
    print(e.signum, e.exit_code)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["15", "143"]
    assert p.stderr.count("ignored: already stopping") == 2 and "Traceback" not in p.stderr


# --- the command ----------------------------------------------------------------------------------

def test_folder_run_goes_on_after_failures_and_reports_them(clips, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    shutil.copy(clips["portrait_noaudio"], src / "a.mp4")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    shutil.copy(clips["portrait_noaudio"], src / "sub" / "c.mp4")
    dst.mkdir()
    (dst / "sub").write_text("a file where the output folder should go")  # output failure
    shutil.copy(clips["portrait_noaudio"], src / "z.mp4")  # still done after both failures
    p = run("anonymize", src, dst, "--method", "blur", "--json", "--report", tmp_path / "report.json")
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    assert (tmp_path / "report.json").read_text() == p.stdout
    assert statuses(rep) == {"a.mp4": "ok", "broken.mp4": "failed", "c.mp4": "failed", "z.mp4": "ok"}
    assert (rep["ok"], rep["failed"], rep["skipped"], rep["interrupted"], rep["pending"]) == (2, 2, 0, 0, 0)
    fails = {Path(f["input"]).name: f for f in rep["files"] if f["status"] == "failed"}
    for name, f in fails.items():
        assert f["input"] == str(src / name if name != "c.mp4" else src / "sub" / name)
        assert f["exit_code"] == 1 and f["error"]
    assert fails["broken.mp4"]["output"] == str(dst / "broken.mp4") and "broken.mp4" in fails["broken.mp4"]["error"]
    assert fails["c.mp4"]["output"] == str(dst / "sub" / "c.mp4")
    assert fails["c.mp4"]["error"].startswith(f"{dst / 'sub' / 'c.mp4'}: cannot create {dst / 'sub'}")
    errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 2 and "Traceback" not in p.stderr, p.stderr
    assert sorted(q.name for q in dst.iterdir()) == ["a.mp4", "sub", "z.mp4"]  # no temp or lock file
    assert frame_pts(dst / "z.mp4") == frame_pts(src / "z.mp4")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_promptly_removes_partial_output_and_writes_report(clips, shared, tmp_path, sig):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "0_broken.mp4").write_bytes(os.urandom(3000))
    shutil.copy(clips["portrait_noaudio"], src / "0_done.mp4")
    dst.mkdir()
    (dst / "0_done.mp4").write_bytes(b"done by an earlier run")
    shutil.copy(clips["portrait_noaudio"], src / "a.mp4")
    os.symlink(VIDEOS / "lp_d6.mp4", src / "b.mp4")  # 1008 frames: a minute or more of work
    shutil.copy(clips["portrait_noaudio"], src / "c.mp4")
    proc = start("anonymize", src, dst, "--method", "blur", "--json", "--report", tmp_path / "report.json")
    try:
        wait_for(lambda: temp_of(dst, "b.mp4") or proc.poll() is not None, what="b.mp4 to be written")
        assert temp_of(dst, "b.mp4"), proc.communicate()
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(sig)
        time.sleep(0.2)
        proc.send_signal(sig)  # again, while it shuts down (or already gone)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.time() - t0 < 30, "did not stop promptly"
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"interrupted by {sig.name}" in err, err
    rep = json.loads(out)
    assert (tmp_path / "report.json").read_text() == out
    assert statuses(rep) == {"0_broken.mp4": "failed", "0_done.mp4": "skipped", "a.mp4": "ok",
                             "b.mp4": "interrupted", "c.mp4": "pending"}
    assert (rep["failed"], rep["skipped"], rep["ok"], rep["interrupted"], rep["pending"]) == (1, 1, 1, 1, 1)
    assert rep["interrupted_by"] == sig.name
    assert [f["exit_code"] for f in rep["files"]] == [1, 0, 0, 128 + sig, 0]
    assert sorted(q.name for q in dst.iterdir()) == ["0_done.mp4", "a.mp4"]  # no partial b.mp4, temp or lock


def test_kill_9_leaves_a_temp_file_and_the_rerun_resumes(clips, medium, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(clips["portrait_noaudio"], src / "a.mp4")
    shutil.copy(medium, src / "b.mp4")
    shutil.copy(clips["talking"], src / "c.mp4")
    cmd = ("anonymize", src, dst, "--method", "blur", "--json")
    proc = start(*cmd)
    try:
        wait_for(lambda: temp_of(dst, "b.mp4") or proc.poll() is not None, what="b.mp4 to be written")
        proc.kill()
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    left = sorted(q.name for q in dst.iterdir())
    tmp = temp_of(dst, "b.mp4")
    assert len(tmp) == 1, left
    assert set(left) - {".b.mp4.deid-lock"} == {"a.mp4", tmp[0].name}, left
    p = run(*cmd, check=0)
    rep = json.loads(p.stdout)
    assert statuses(rep) == {"a.mp4": "skipped", "b.mp4": "ok", "c.mp4": "ok"}
    assert rep["stale_files_removed"] == [str(tmp[0])]
    assert sorted(q.name for q in dst.iterdir()) == ["a.mp4", "b.mp4", "c.mp4"]
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        assert frame_pts(dst / name) == frame_pts(src / name), name  # complete, decodes to the end


def test_concurrent_runs_process_each_file_exactly_once(clips, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, clip in (("a", "talking"), ("b", "portrait_noaudio"), ("c", "two_person"), ("d", "portrait_noaudio")):
        shutil.copy(clips[clip], src / f"{name}.mp4")
    procs = [start("anonymize", src, dst, "--method", "blur", "--json") for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    reps = [json.loads(out) for out, _ in outs]
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        entries = [next(f for f in r["files"] if Path(f["input"]).name == name) for r in reps]
        assert sorted(f["status"] for f in entries) == ["ok", "skipped"], entries
        for f, other in zip(entries, procs[::-1]):
            if f["status"] == "skipped":
                assert f["error"] in ("output exists (use --overwrite to replace it)",
                                      f"in progress in another deid run (pid {other.pid})",
                                      "output written by another deid run meanwhile"), f["error"]
        assert frame_pts(dst / name) == frame_pts(src / name), name
    assert sorted(q.name for q in dst.iterdir()) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]


MOUNT_AND_RUN = """
d=$1; opts=$2; marker=$3; listing=$4; shift 4
mount -t tmpfs -o "$opts" tmpfs "$d" || exit 99
: > "$marker"
"$@"; rc=$?
ls -A "$d" > "$listing"
exit $rc
"""


@pytest.mark.parametrize("opts,reason", [("size=64k", "no space left on device"), ("ro", "read-only file system")],
                         ids=["disk-full", "read-only"])
def test_full_or_read_only_destination(clips, tmp_path, opts, reason):
    """A size-limited or read-only tmpfs, mounted in a private mount namespace (unshare -rm)."""
    if not shutil.which("unshare"):
        pytest.skip("unshare not installed: cannot mount a private tmpfs")
    dest = tmp_path / "dest"
    dest.mkdir()
    marker, listing = tmp_path / "mounted", tmp_path / "listing"
    p = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT_AND_RUN, "sh", str(dest), opts, str(marker), str(listing),
                        *DEID, "anonymize", str(clips["two_person"]), str(dest / "out.mp4"), "--method", "blur",
                        "--json"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    if not marker.exists():
        pytest.skip(f"cannot mount a private tmpfs here (unshare -rm; mount -t tmpfs): {p.stderr.strip()}")
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines() == [f"deid: ERROR: {dest / 'out.mp4'}: {reason}"], p.stderr
    f = json.loads(p.stdout)["files"][0]
    assert f["status"] == "failed" and f["error"] == f"{dest / 'out.mp4'}: {reason}" and f["exit_code"] == 1
    assert listing.read_text() == ""  # nothing partial: no output, temp or lock file


def test_dry_run_lists_the_plan_without_models_or_writes(clips, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        shutil.copy(clips["portrait_noaudio"], src / name)
    dst.mkdir()
    (dst / "a.mp4").write_bytes(b"done before")
    lk = jobs.try_lock(dst / "b.mp4")  # another live run is on b.mp4 (this process)
    try:
        before = tree(tmp_path)
        # default method (generate): a real run would load the generator and torch
        p = run("anonymize", src, dst, "--dry-run", "--json", check=0, pyflags=("-X", "importtime"))
        rep = json.loads(p.stdout)
        assert rep["dry_run"] is True and (rep["process"], rep["skip"], rep["overwrite"]) == (1, 2, 0)
        assert [(Path(f["input"]).name, f["action"], f["reason"]) for f in rep["files"]] == [
            ("a.mp4", "skip", "output exists"),
            ("b.mp4", "skip", f"in progress in another deid run (pid {os.getpid()})"),
            ("c.mp4", "process", None)]
        imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")}
        assert "av" in imported or "deidcli.pipeline.jobs" in imported  # importtime output was read
        heavy = {m for m in imported if m.split(".")[0] in ("torch", "onnxruntime", "insightface")}
        assert not heavy, sorted(heavy)[:10]
        p = run("anonymize", src, dst, "--dry-run", "--overwrite", check=0)
        lines = p.stdout.splitlines()
        assert lines == [f"overwrite {src / 'a.mp4'} -> {dst / 'a.mp4'}  (output exists)",
                         f"skip      {src / 'b.mp4'} -> {dst / 'b.mp4'}  "
                         f"(in progress in another deid run (pid {os.getpid()}))",
                         f"process   {src / 'sub' / 'c.mp4'} -> {dst / 'sub' / 'c.mp4'}"], p.stdout
        # the library call, same promise
        code = (f"from deidcli.pipeline.anonymize import anonymize; from deidcli.options import AnonymizeOptions\n"
                f"r = anonymize({str(src)!r}, {str(dst)!r}, AnonymizeOptions(dry_run=True))\n"
                "import json, sys\n"
                "print(json.dumps([[m for m in ('torch', 'onnxruntime', 'insightface') if m in sys.modules], "
                "r['process']]))")
        q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
        assert json.loads(q.stdout) == [[], 1], q.stderr
        assert tree(tmp_path) == before  # nothing written, not even out/sub
    finally:
        lk.release()


def test_shard_option_splits_a_folder(tmp_path):
    """--shard I/N on a real folder, through the command (dry runs: inputs are not opened)."""
    src = tmp_path / "in"
    names = [f"s{i // 4}/clip{i}.mp4" for i in range(14)]
    for n in names:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_bytes(b"")
    seen = []
    for i in range(3):
        p = run("anonymize", src, tmp_path / "out", "--dry-run", "--json", "--shard", f"{i}/3", check=0)
        got = [Path(f["input"]).relative_to(src).as_posix() for f in json.loads(p.stdout)["files"]]
        assert sorted(got) == sorted(n for n in names if jobs.shard_of(n, 3) == i)
        seen += got
    assert sorted(seen) == sorted(names)
    for bad in ("3/3", "1/0", "x"):
        p = run("anonymize", src, tmp_path / "out", "--dry-run", "--shard", bad)
        assert p.returncode == 2 and "--shard" in p.stderr, p.stderr
