"""Folder runs on a Ray cluster: ``deid anonymize SRC DST --ray [ADDRESS]`` (docs/cluster.md).

The same job as a folder run (anonymize.py), spread over the workers of a Ray cluster:

* one Ray actor per worker keeps the models loaded (``Worker``); a GPU actor asks Ray for one GPU
  (``num_gpus=1``) when the cluster has GPUs, a CPU actor for CPUs otherwise;
* one task per input file, handed by this process (the driver) to whichever worker is free, the
  files expected to take longest first (:func:`_estimate`): a long file started last would
  otherwise run alone at the end while the other workers sit idle;
* a worker that dies (killed, out of memory, its node lost) is replaced by a new actor, and its
  file is given again, up to ``ClusterOptions.attempts`` tries; the report says how many;
* each file is processed by ``anonymize._run_job`` on the worker, so the folder run's guarantees
  hold unchanged: atomic output next to its destination, skip or ``--overwrite``, the output's
  lock (jobs.py: a file is never processed twice at once, by two workers or two runs), a failed
  file reported and the others done;
* SRC and DST must be one shared file system, at the same path on every node: the driver writes
  a marker file into DST and every worker must read it back (and see the inputs, same sizes),
  else the run is refused (:class:`NotShared`).

Ray is an optional extra (``pip install 'deid-video[ray]'``); this module imports it only inside
its functions, and nothing else in deid imports this module at module level.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from ..errors import EXIT_USAGE, DeidError, ModelError, OutputError
from ..options import AnonymizeOptions
from .jobs import clean_stale, counts, dest_reason
from .report import FileResult

log = logging.getLogger(__name__)

#: the distribution's extra that installs Ray (pyproject.toml)
RAY_EXTRA = "pip install 'deid-video[ray]'"
#: default count of CPU workers: one per this many CPUs of the cluster (each runs several threads)
CPUS_PER_WORKER = 4
#: Ctrl-C: seconds the workers get to stop their file and remove its partial output
CANCEL_WAIT_S = 30.0
#: warn when no worker has started after this many seconds (the cluster lacks the resources asked)
START_WARN_S = 60.0
#: a file whose worker died and whose lock is still held (a dead node's lock on a network file
#: system) is tried again every LOCK_RETRY_S for up to LOCK_WAIT_S, then reported skipped
LOCK_RETRY_S = 10.0
LOCK_WAIT_S = 300.0
#: seconds between two polls of the workers' frame counts (progress bar)
POLL_S = 0.5
#: up to this many files to do, the driver reads each video's header to order them (a few ms
#: each); past it, their sizes in bytes stand in, and the frames bar has no total
PROBE_MAX = 1000
#: the marker file written into DST for the run: every worker must read it back
MARKER_PREFIX = ".deid-ray-"


@dataclass(frozen=True)
class ClusterOptions:
    address: Optional[str] = None  # None: a local Ray cluster started for the run; "auto"; "ray://host:10001"
    workers: Optional[int] = None  # actors; None: one per GPU of the cluster, else one per CPUS_PER_WORKER CPUs
    attempts: int = 3  # tries per file when its worker dies (the file is given to a new worker each time)
    local_cpus: Optional[int] = None  # local cluster only: the CPUs it offers Ray (None: this machine's)
    object_store_mb: int = 100  # local cluster only: Ray's object store (deid passes only small results)

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, not {self.workers}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {self.attempts}")


class RayMissing(DeidError):
    """--ray without Ray installed."""

    exit_code = EXIT_USAGE


class NotShared(DeidError):
    """A worker cannot see SRC or DST as the driver does: they are not on a shared file system."""

    exit_code = EXIT_USAGE


class ClusterError(DeidError):
    """The cluster cannot be reached, or no worker could be started on it."""


class _Cancelled(BaseException):
    """Raised on a worker, in its frame callback, when the run is cancelled (Ctrl-C on the driver).
    A BaseException: _run_job lets it through, as it does KeyboardInterrupt, after removing the
    partial output and releasing the lock."""


def require_ray():
    """The ``ray`` module, or :class:`RayMissing` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayMissing(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


class ClusterProgress:
    """Progress sink of a cluster run; the CLI passes one that draws bars. No-ops here."""

    def start(self, files: int, frames: int) -> None: ...
    def update(self, files_done: int, frames_done: int) -> None: ...


# --- the worker (a Ray actor) -------------------------------------------------------------------

class _WorkerProgress:
    """report.Progress for one worker: counts the frames of its file; stops it when cancelled."""

    def __init__(self, stop: threading.Event):
        self.stop, self.frames = stop, 0

    def start_file(self, path, total) -> None:
        self.frames = 0

    def advance(self, n: int = 1) -> None:
        self.frames += n
        if self.stop.is_set():
            raise _Cancelled()

    def end_file(self) -> None: ...


class Worker:
    """One worker: models loaded once, then one file per :meth:`process` call.

    Made a Ray actor by :func:`_actor_class`, with ``max_concurrency`` above 1 so that
    :meth:`frames` and :meth:`cancel` answer while :meth:`process` runs (the driver gives a
    worker one file at a time). ``check``: the marker file ``(path, token)`` and ``(input, size)``
    samples that prove this node sees SRC and DST as the driver does. ``cpus``: the CPUs Ray gave
    this worker; its CPU stages then use half of them each (DEID_ORT_THREADS, DEID_TORCH_THREADS
    unless set), not half of the node's.
    """

    def __init__(self, options: AnonymizeOptions, check: dict, cpus: int = 0):
        self.options, self.check = options, check
        if cpus:  # stages.stage_threads' rule (half the cores) applied to this worker's share of them
            for env in ("DEID_ORT_THREADS", "DEID_TORCH_THREADS"):
                os.environ.setdefault(env, str(max(1, cpus // 2)))
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.pipeline = None
        self.stop = threading.Event()
        self.progress = _WorkerProgress(self.stop)

    def _factory(self):
        if self.pipeline is None:
            from .pipeline import Pipeline

            self.pipeline = Pipeline(self.options)
        return self.pipeline

    def _check_shared(self, samples: bool) -> None:
        host = socket.gethostname()
        marker, token = Path(self.check["marker"]), self.check["token"]
        try:
            seen = marker.read_text()
        except OSError:
            seen = None
        if seen != token:
            raise NotShared(f"worker on {host} does not see DST {marker.parent} as the driver does "
                            f"(its marker file {marker.name} is {'missing' if seen is None else 'different'} "
                            f"there): SRC and DST must be on a file system every node mounts at the same path")
        for path, size in (self.check["samples"] if samples else ()):
            try:
                ok = os.stat(path).st_size == size
            except OSError:
                ok = False
            if not ok:
                raise NotShared(f"worker on {host} does not see input {path} as the driver does: SRC and DST "
                                f"must be on a file system every node mounts at the same path")

    def ready(self) -> dict:
        """Check the shared file system, load the models; this worker's description for the report."""
        import ray

        from .. import __version__
        from .anonymize import _report

        self._check_shared(samples=True)
        t = time.perf_counter()
        pipeline = self._factory()
        load = round(time.perf_counter() - t, 3)
        run = _report([], pipeline, load, self.options, [])
        keys = ("device", "dtype", "generator_backend", "detector_precision", "check_precision", "people")
        return {"worker": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "deid": __version__, "load_seconds": load, "cpu_seconds": _cpu_seconds(),
                "run": {k: run[k] for k in keys}}

    def process(self, src: str, dst: str, started: float) -> dict:
        """One file, as a folder run does it (anonymize._run_job). Returns ``{"result": FileResult
        fields, "worker", "stale"}``; status "interrupted" when cancelled (partial output removed)."""
        from .anonymize import _run_job

        self.stop.clear()
        self.progress.frames = 0
        src_p, dst_p = Path(src), Path(dst)
        self._check_shared(samples=False)  # the DST this worker writes into is the shared one
        stale = clean_stale(dst_p, recursive=False)  # a killed attempt's temporary file (lock now free)
        try:
            res = _run_job(self._factory, src_p, dst_p, self.options, self.progress, started)
        except _Cancelled:
            res = FileResult(input=src, output=dst, status="interrupted", error="interrupted; partial output removed")
        return {"result": dict(res.__dict__), "worker": self.name, "stale": [str(q) for q in stale],
                "cpu_seconds": _cpu_seconds()}

    def frames(self) -> int:
        return self.progress.frames

    def cancel(self) -> None:
        self.stop.set()


def _cpu_seconds() -> float:
    """CPU time (user + system, every thread) of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return round(r.ru_utime + r.ru_stime, 3)


def _actor_class(ray):
    return ray.remote(Worker)


# --- the driver ---------------------------------------------------------------------------------

@dataclass
class _Job:
    index: int  # position in the plan (and in the report)
    src: Path  # as given (the report's paths)
    dst: Path
    abs_src: str  # what the workers open
    abs_dst: str
    frames: int = 0  # expected, for the progress bar (0: unknown)
    cost: float = 0.0  # expected work (_estimate): the longest go first
    attempts: int = 0
    lost: list = field(default_factory=list)  # why its workers died, one line per try
    lost_at: float = 0.0  # when its last worker died (time.monotonic)
    not_before: float = 0.0  # not handed out before then (time.monotonic): its lock was still held


@dataclass
class _Slot:
    """One actor as the driver sees it: starting (ready() pending), idle, busy (a file), dead."""

    actor: object
    state: str = "starting"
    ref: object = None  # the pending ready() or process() call
    job: Optional[_Job] = None
    info: Optional[dict] = None  # what ready() returned
    entry: dict = field(default_factory=dict)  # its entry in the report's cluster.workers
    frames: int = 0  # frames of its current file, as last polled
    poll: object = None  # a pending frames() call


def _estimate(job: _Job, probe_it: bool = True) -> None:
    """Expected frames and work of a file: frames x pixels from its header (decoding, detection
    and encoding scale with both); without ``probe_it`` (large folders: PROBE_MAX), its size in
    bytes. An image or an unreadable file counts 0 (little work, or a quick failure)."""
    from ..media.probe import media_kind, probe

    if media_kind(job.src) != "video":
        return
    if not probe_it:
        try:
            job.cost = float(os.stat(job.abs_src).st_size)
        except OSError:
            pass
        return
    try:
        info = probe(job.src)
    except Exception:  # the worker will report it failed
        return
    frames = info.frames or int((info.duration or 0) * float(info.average_rate or 0))
    job.frames = frames
    job.cost = float(frames) * info.width * info.height


def _entry(res: dict, job: Optional[_Job], worker: Optional[str]) -> dict:
    """A report entry: the worker's FileResult fields, paths as the user gave them, ``worker``
    (host:pid of the process that wrote the output, None when skipped here) and ``attempts``."""
    out = dict(res)
    if job is not None:
        for k in ("input", "output", "error"):
            if isinstance(out.get(k), str):
                out[k] = out[k].replace(job.abs_dst, str(job.dst)).replace(job.abs_src, str(job.src))
    out["worker"] = worker
    out["attempts"] = job.attempts if job is not None else 0
    return out


def _lost_reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {first}"


def _connect(ray, cluster: ClusterOptions) -> None:
    """ray.init for an existing cluster, or a local one started for the run. The CLI's SIGINT and
    SIGTERM handlers are put back afterwards (ray.init installs its own SIGTERM handler)."""
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    in_main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    address = cluster.address
    try:
        if address in (None, "", "local"):
            ray.init(address="local", num_cpus=cluster.local_cpus or os.cpu_count() or 1,
                     object_store_memory=cluster.object_store_mb * 2**20, **kw)
        else:
            kw.pop("include_dashboard")
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def worker_resources(res: dict, cluster: ClusterOptions, n_files: int, device: str = "auto") -> tuple[int, dict]:
    """(actors to start, the resources each asks Ray for) on a cluster with resources ``res``
    (``ray.cluster_resources()``). GPU workers where the cluster has GPUs, unless ``device``
    (--device) is "cpu"."""
    gpus, cpus = int(res.get("GPU", 0)) if device != "cpu" else 0, int(res.get("CPU", 0))
    if gpus:
        n = cluster.workers or gpus
    else:
        n = cluster.workers or max(1, cpus // CPUS_PER_WORKER)
    n = max(1, min(n, n_files))  # no worker loading models for nothing
    per = max(1, min(CPUS_PER_WORKER, cpus // n)) if cpus else 1
    return n, ({"num_gpus": 1, "num_cpus": per} if gpus else {"num_cpus": per})


def anonymize_on_ray(src, dst, options: Optional[AnonymizeOptions] = None,
                     cluster: Optional[ClusterOptions] = None,
                     progress: Optional[ClusterProgress] = None) -> dict:
    """``anonymize(src, dst, options)`` (a file or a folder) run on a Ray cluster.

    Returns the folder run's report, each file with ``worker`` and ``attempts`` added and a
    ``cluster`` section. Raises as ``anonymize()`` does (ModelError, InputError, OutputError,
    ValueError, :class:`~deidcli.errors.Interrupted` with the report so far), plus
    :class:`RayMissing`, :class:`NotShared` and :class:`ClusterError`. ``options.dry_run`` returns
    the plan without starting a cluster. Outputs that exist are skipped here, before any worker
    starts: a rerun over a finished folder starts no cluster.
    """
    from .anonymize import PIPE, anonymize, planned_jobs

    options = options or AnonymizeOptions()
    cluster = cluster or ClusterOptions()
    ray = require_ray()
    if PIPE in (str(src), str(dst)):
        raise ValueError("--ray runs files and folders, not - (stdin/stdout)")
    if options.dry_run:
        return anonymize(src, dst, options)  # the plan is the same; no cluster needed
    planned = planned_jobs(src, dst, options)
    src, dst = Path(src), Path(dst)
    run = _Driver(ray, options, cluster, progress or ClusterProgress(), len(planned))
    for i, (s, d) in enumerate(planned):
        if d.exists() and not options.overwrite:
            log.info("skip %s: output exists", s)
            res = FileResult(input=str(s), output=str(d), status="skipped",
                             error="output exists (use --overwrite to replace it)")
            run.files[i] = _entry(res.__dict__, None, None)
        else:
            run.queue.append(_Job(i, s, d, os.path.abspath(s), os.path.abspath(d)))
    for q in (clean_stale(dst, recursive=True) if src.is_dir() else
              [q for _, d in planned for q in clean_stale(d, recursive=False)]):
        log.warning("removed %s, left by a deid run that was killed", q)
        run.stale.append(str(q))
    if run.queue:
        run.run(dst if src.is_dir() else run.queue[0].dst.parent)
    return run.report()


def absolute_paths(options: AnonymizeOptions) -> AnonymizeOptions:
    """``options`` with every path in it (a Path field, or a tuple of them: --weights, --keep,
    --target, ...) made absolute, for workers whose working folder is not the driver's."""
    changes = {}
    for f in fields(options):
        v = getattr(options, f.name)
        if isinstance(v, Path):
            changes[f.name] = Path(os.path.abspath(v))
        elif isinstance(v, tuple) and v and all(isinstance(p, Path) for p in v):
            changes[f.name] = tuple(Path(os.path.abspath(p)) for p in v)
    return replace(options, **changes)


class _Driver:
    """The state of one cluster run, on the driver: the files queued, the workers, the results."""

    def __init__(self, ray, options: AnonymizeOptions, cluster: ClusterOptions, progress: ClusterProgress,
                 n_files: int):
        self.ray, self.options, self.cluster, self.progress = ray, options, cluster, progress
        self.worker_options = absolute_paths(options)  # the workers run elsewhere
        self.started = time.time()  # --overwrite: an output written by another run since then is not redone
        self.files: list[Optional[dict]] = [None] * n_files
        self.queue: deque[_Job] = deque()
        self.slots: list[_Slot] = []
        self.infos: list[dict] = []  # the workers that started, as they describe themselves
        self.stale: list[str] = []
        self.info: dict = {"address": cluster.address or "local", "ray": None, "nodes": 0, "resources": {},
                           "worker_resources": {}, "start_seconds": None, "workers": self.infos}
        self.run_info: dict = {}  # device, dtype, precisions: as the first worker to start runs them
        self.actor_cls = None
        self.cpus = 0  # CPUs each worker asks Ray for
        self.check: dict = {}
        self.spawns_left = 0
        self.done_files = self.done_frames = 0

    # --- the report ---

    def report(self) -> dict:
        from .anonymize import _report

        rep = _report([], None, 0.0, self.options, [])
        if self.infos:
            rep.update(self.run_info)
            rep["load_seconds"] = max(w["load_seconds"] for w in self.infos)  # in parallel, on each worker
        rep["files"] = [f for f in self.files if f is not None]
        rep.update(counts((f["status"] for f in rep["files"]), ("ok", "skipped", "failed", "interrupted", "pending")))
        rep["stale_files_removed"] = self.stale
        rep["cluster"] = self.info
        return rep

    def _finish(self, job: _Job, entry: dict) -> None:
        self.files[job.index] = entry
        self.done_files += 1
        self.done_frames += entry.get("frames") or 0
        if entry["status"] == "failed" and entry["error"].startswith(f"{job.dst}: "):
            log.error("%s", entry["error"])  # about the destination (disk full...): named as in a folder run
        elif entry["status"] == "failed":
            log.error("%s: %s", job.src, _strip(entry["error"], job.src))
        elif entry["status"] == "ok":
            log.info("done %s -> %s (%s)", job.src, job.dst, entry["worker"])
        self._update()

    def _update(self) -> None:
        self.progress.update(self.done_files, self.done_frames + sum(s.frames for s in self.slots if s.state == "busy"))

    # --- the run ---

    def run(self, root: Path) -> None:
        """Start the cluster and the workers, hand out every queued file; Ctrl-C cancels."""
        from .anonymize import _make_dirs

        ray = self.ray
        marker = Path(os.path.abspath(root)) / f"{MARKER_PREFIX}{secrets.token_hex(8)}"
        connected = False
        made: list[Path] = []
        # Ray prints the errors its nodes report (a worker died...) on sys.stdout, which carries only
        # the report: they go to the debug log (-vv); the driver reports what they mean in one line
        quiet_stdout = contextlib.redirect_stdout(_LogLines())
        quiet_stdout.__enter__()
        try:
            for job in self.queue:
                _estimate(job, probe_it=len(self.queue) <= PROBE_MAX)
            self.queue = deque(sorted(self.queue, key=lambda j: (-j.cost, j.index)))  # longest first
            self.progress.start(len(self.queue), sum(j.frames for j in self.queue))
            jobs = list(self.queue)
            samples = sorted({(j.abs_src, os.stat(j.abs_src).st_size) for j in jobs[:4] + jobs[-4:]
                              if os.path.isfile(j.abs_src)})
            self.check = {"marker": str(marker), "token": secrets.token_hex(16), "samples": samples}
            try:
                made = _make_dirs(root)
                marker.write_text(self.check["token"])
            except OSError as e:  # nothing can be written there: no worker could either
                raise OutputError(f"{root}: cannot write there ({dest_reason(e) or e.strerror or e})") from None
            t0 = time.perf_counter()
            _connect(ray, self.cluster)
            connected = True
            n, resources = worker_resources(ray.cluster_resources(), self.cluster, len(self.queue),
                                            self.options.device)
            self.info.update(ray=ray.__version__, nodes=sum(1 for nd in ray.nodes() if nd.get("Alive")),
                             resources={k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
                             worker_resources=resources)
            self.actor_cls = _actor_class(ray).options(max_concurrency=4, max_restarts=0, **resources)
            self.cpus = int(resources["num_cpus"])
            for _ in range(n):
                self._spawn()
            self.spawns_left = n * self.cluster.attempts  # replacements for workers that die
            self._drive(t0)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            if connected:
                self._cancel(signum)
            for job in self.queue:
                self.files[job.index] = _entry(FileResult(input=str(job.src), output=str(job.dst), status="pending",
                                                          error="not started (interrupted)").__dict__, job, None)
            self.queue.clear()
            rep = self.report()
            rep["interrupted_by"] = signal.Signals(signum).name
            from ..errors import Interrupted

            raise Interrupted(signum, rep) from None
        finally:
            for slot in self.slots:
                _kill(ray, slot.actor)
            if connected or ray.is_initialized():  # (a signal may come while ray.init starts a cluster)
                ray.shutdown()
            quiet_stdout.__exit__(None, None, None)
            try:
                marker.unlink()
                for folder in made:  # created for this run and left empty (models missing...)
                    folder.rmdir()
            except OSError:
                pass

    def _spawn(self) -> None:
        slot = _Slot(self.actor_cls.remote(self.worker_options, self.check, self.cpus))
        slot.ref = slot.actor.ready.remote()
        self.slots.append(slot)

    def _replace(self, slot: _Slot) -> None:
        slot.state, slot.job = "dead", None
        _kill(self.ray, slot.actor)
        if self.spawns_left > 0:
            self.spawns_left -= 1
            self._spawn()

    def _drive(self, t0: float) -> None:
        """Hand out files until every one has a result. Raises ModelError/NotShared/ClusterError
        (the run cannot go on) and KeyboardInterrupt (the CLI's signal handler)."""
        ray = self.ray
        last_poll = 0.0
        warned = False
        waiting_since = time.monotonic()
        while True:
            for slot in self.slots:  # idle workers take the next file, longest first
                job = self._next() if slot.state == "idle" else None
                if job is not None:
                    job.attempts += 1
                    slot.state, slot.job, slot.frames, slot.poll = "busy", job, 0, None
                    slot.ref = slot.actor.process.remote(job.abs_src, job.abs_dst, self.started)
            live = [s for s in self.slots if s.state != "dead"]
            if not self.queue and not any(s.state == "busy" for s in live):
                return
            if not live:  # every worker died and no replacement is left
                while self.queue:
                    job = self.queue.popleft()
                    self._finish(job, _entry(_failed(job, "no deid worker left to process it ("
                                                     + (job.lost[-1] if job.lost else "all died") + ")"), job, None))
                return
            if not self.infos and not warned and time.monotonic() - waiting_since > START_WARN_S:
                warned = True
                log.warning("no deid worker has started after %.0f s: does the cluster have the resources each one "
                            "asks for (%s)? See `ray status`", START_WARN_S, self.info["worker_resources"])
            pending = {s.ref: s for s in live if s.ref is not None}
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S / 2)
            for ref in ready:
                slot = pending[ref]
                slot.ref = None
                if slot.state == "starting":
                    self._started(slot, ref, t0)
                else:
                    self._done(slot, ref)
            if time.monotonic() - last_poll >= POLL_S:
                last_poll = time.monotonic()
                self._poll()

    def _started(self, slot: _Slot, ref, t0: float) -> None:
        from ray.exceptions import RayError, RayTaskError

        try:
            info = self.ray.get(ref)
        except RayTaskError as e:  # models missing, SRC/DST not shared, a bad --keep photo, --device: stop
            cause = getattr(e, "cause", None)
            if isinstance(cause, (DeidError, ValueError)):
                raise cause from None
            raise ClusterError(f"a deid worker failed to start: {_lost_reason(cause or e)}") from None
        except RayError as e:  # its process died while starting (killed, out of memory)
            log.warning("a deid worker died while starting (%s)", _lost_reason(e))
            self._replace(slot)
            return
        slot.info, slot.state = info, "idle"
        if self.info["start_seconds"] is None:  # connecting, and the first worker's models loaded
            self.info["start_seconds"] = round(time.perf_counter() - t0, 3)
        slot.entry = {k: v for k, v in info.items() if k != "run"} | {"device": info["run"]["device"]}
        self.infos.append(slot.entry)
        self.run_info = self.run_info or info["run"]
        log.info("worker %s ready (%s, models loaded in %.1f s)", info["worker"], info["run"]["device"],
                 info["load_seconds"])

    def _done(self, slot: _Slot, ref) -> None:
        from ray.exceptions import RayError, RayTaskError

        job = slot.job
        try:
            out = self.ray.get(ref)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (ModelError, NotShared)):
                raise cause from None
            slot.state, slot.job = "idle", None  # a bug on the worker: this file fails, the worker goes on
            self._finish(job, _entry(_failed(job, _lost_reason(cause or e)), job, slot.info["worker"]))
            return
        except RayError as e:  # the worker died: this file again, on a new worker
            why = f"worker {slot.info['worker']} died ({_lost_reason(e)})"
            job.lost.append(why)
            job.lost_at = time.monotonic()
            log.warning("%s: %s", job.src, why)
            self._replace(slot)
            if job.attempts < self.cluster.attempts:
                self.queue.appendleft(job)  # first again: it is among the longest left
            else:
                self._finish(job, _entry(_failed(job, f"its worker died in each of {job.attempts} tries "
                                                      f"(last: {why})"), job, None))
            return
        slot.state, slot.job = "idle", None
        self.stale.extend(out["stale"])
        slot.entry["cpu_seconds"] = out["cpu_seconds"]
        res = out["result"]
        if (job.lost and res["status"] == "skipped" and (res["error"] or "").startswith("in progress")
                and time.monotonic() - job.lost_at < LOCK_WAIT_S):
            # The lock of a worker whose node died stays held on a network file system until the
            # server gives up on that node (NFS: about 90 s); the file is not done: try again later.
            log.info("%s: its lock is still held (%s): trying again in %.0f s", job.src, res["error"], LOCK_RETRY_S)
            job.not_before = time.monotonic() + LOCK_RETRY_S
            job.attempts -= 1  # not a try: nothing was done
            self.queue.append(job)
            return
        self._finish(job, _entry(res, job, out["worker"]))

    def _next(self) -> Optional[_Job]:
        """The first queued file that may start now (see LOCK_RETRY_S), taken off the queue."""
        now = time.monotonic()
        for i, job in enumerate(self.queue):
            if job.not_before <= now:
                del self.queue[i]
                return job
        return None

    def _poll(self) -> None:
        """Frames done in the files in progress, for the progress bar (answers of the last poll)."""
        from ray.exceptions import RayError

        polls = {s.poll: s for s in self.slots if s.state == "busy" and s.poll is not None}
        if polls:
            got, _ = self.ray.wait(list(polls), num_returns=len(polls), timeout=0)
            for ref in got:
                s = polls[ref]
                s.poll = None
                try:
                    s.frames = int(self.ray.get(ref))
                except RayError:
                    pass
        for s in self.slots:
            if s.state == "busy" and s.poll is None:
                s.poll = s.actor.frames.remote()
        self._update()

    def _cancel(self, signum: int) -> None:
        """Ctrl-C: every worker stops its file (partial output removed, lock released) within
        CANCEL_WAIT_S; one that does not is killed and its temporary file removed from here."""
        from ray.exceptions import RayError

        ray = self.ray
        busy = [s for s in self.slots if s.state == "busy"]
        for s in busy:
            s.actor.cancel.remote()
        refs = {s.ref: s for s in busy}
        got = ray.wait(list(refs), num_returns=len(refs), timeout=CANCEL_WAIT_S)[0] if refs else []
        for ref, s in refs.items():
            job, out = s.job, None
            if ref in got:
                try:
                    out = ray.get(ref)
                except RayError:
                    pass
            s.state = "dead"
            if out is not None and out["result"]["status"] != "interrupted":  # it finished meanwhile
                self.stale.extend(out["stale"])
                self.files[job.index] = _entry(out["result"], job, out["worker"])
                continue
            if out is None:  # did not stop in time, or died: kill it, remove its temporary file from here
                _kill(ray, s.actor)
                dst = Path(job.abs_dst)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # its lock is free once its process is gone
                    self.stale.extend(str(q) for q in clean_stale(dst, recursive=False))
                    if not any(dst.parent.glob(f".{dst.name}.deid-tmp-*")):
                        break
                    time.sleep(0.2)
            res = FileResult(input=job.abs_src, output=job.abs_dst, status="interrupted",
                             error="interrupted; partial output removed", exit_code=128 + signum)
            self.files[job.index] = _entry(res.__dict__, job, out["worker"] if out else (s.info or {}).get("worker"))


class _LogLines(io.TextIOBase):
    """A text stream whose lines go to the debug log."""

    def __init__(self):
        self.buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.strip():
                log.debug("ray: %s", re.sub(r"\x1b\[[0-9;]*m", "", line))
        return len(s)


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead, or the cluster is gone
        pass


def _failed(job: _Job, msg: str) -> dict:
    return FileResult(input=job.abs_src, output=job.abs_dst, status="failed", error=msg, exit_code=1).__dict__


def _strip(msg: str, src: Path) -> str:
    """The error without a leading "<input>: " (the log line names the input already)."""
    for prefix in (f"{src}: ", f"{src.name}: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg
