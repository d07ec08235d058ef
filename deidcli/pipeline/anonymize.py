"""The library entry point: ``anonymize(src, dst, options)`` for a file or a folder.

One frame's walk: media/ decodes -> faces/detect.py and faces/track.py detect and track ->
faces/align.py crops -> generator/engine.py runs the generator in batches (or faces/methods.py
blurs) -> faces/align.py pastes back -> media/ encodes and muxes. pipeline.py holds the per-file
Pipeline; this module plans the jobs (files, folders, pipes) and keeps score.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from ..errors import DeidError, InputError, Interrupted, ModelError, OutputError
from ..options import AnonymizeOptions
from ..stages import Stages
from .jobs import (
    clean_stale,
    counts,
    dest_reason,
    lock_owner,
    lock_path,
    owner_text,
    read_owner,
    select_shard,
    try_lock,
)
from .pipeline import Pipeline
from .report import FileResult, Progress, _reason

log = logging.getLogger(__name__)


def _versions() -> dict:
    import importlib.metadata as md

    from .. import __version__

    out = {"deid": __version__}
    for pkg in ("torch", "av", "insightface", "onnxruntime", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def plan_jobs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: one for a file, every media file below a folder mirrored into dst.

    The output folder is never read as input, even when it lies inside the input folder.
    """
    from ..media.probe import media_kind

    if src.is_file():
        if dst.is_dir():
            dst = dst / src.name
        return [(src, dst)]
    if not src.is_dir():
        raise InputError(f"{src}: no such file or directory")
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"{dst}: input is a folder, so the output must be a folder too")
    dst_res = dst.resolve()
    jobs = []
    for root, dirs, files in os.walk(src):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if (rootp / d).resolve() != dst_res and not d.startswith("."))
        for name in sorted(files):
            p = rootp / name
            if name.startswith(".") or media_kind(p) is None:
                continue
            jobs.append((p, dst / p.relative_to(src)))
    if not jobs:
        # A folder is always a folder run, even when named like a video ("x.mp4/"); such a folder
        # with nothing to process is almost certainly a mistake, a plain empty folder is not.
        kind = media_kind(src)
        if kind is not None:
            raise InputError(f"{src}: is a folder, not a{'n' if kind == 'image' else ''} {kind} file, "
                             f"and holds no image or video files")
        log.warning("%s: no image or video files in this folder; nothing to do", src)
    return jobs


def _process_file(pipeline_factory: Callable[[], Pipeline], src: Path, dst: Path, options: AnonymizeOptions,
                  progress: Progress) -> FileResult:
    from ..media.images import atomic_output, read_image, write_image
    from ..media.probe import media_kind, probe
    from ..media.transcode import transcode_video

    res = FileResult(input=str(src), output=str(dst))
    kind = media_kind(src)
    res.kind = kind
    out_kind = media_kind(dst)
    if kind is None:
        raise InputError(f"{src}: not a supported image or video file (by extension)")
    if out_kind != kind:
        raise OutputError(f"{dst}: output must be a{'n' if kind == 'image' else ''} {kind} file like the input "
                          f"(got extension {dst.suffix or 'none'!r})")
    if src.resolve() == dst.resolve():
        raise OutputError(f"{dst}: output would overwrite the input")
    if kind == "video":
        info = probe(src)  # fail fast on unreadable input, before loading models
    else:
        img = read_image(src)
    pipe = pipeline_factory()
    t0 = time.perf_counter()  # models are loaded once per run: not counted per file
    dst.parent.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    if kind == "video":
        fps = float(info.average_rate) if info.average_rate else None
        progress.start_file(src, info.frames or None)
        try:
            with atomic_output(dst) as tmp:
                st = transcode_video(src, tmp, lambda frames: pipe.process_frames(frames, res, fps, stages),
                                     options.encode, on_frame=lambda n: progress.advance(1), stages=stages)
            res.add_transcode_stats(st)
        finally:
            progress.end_file()
    else:
        out = pipe.image(img, res)
        with atomic_output(dst) as tmp:
            write_image(tmp, out)
    res.finish(stages, t0)
    return res


def planned_jobs(src, dst, options: AnonymizeOptions) -> list:
    """The (input, output) pairs of a file or folder run (jobs.plan_jobs, then ``options.shard``),
    once the paths and options are checked: ValueError for --format (a pipe's option), InputError
    for a missing SRC. Shared by :func:`anonymize` and cluster.anonymize_on_ray."""
    if options.encode.format:
        raise ValueError("--format applies to DST - (stdout) only; a file's container follows its extension")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    jobs = plan_jobs(src, dst)
    if options.shard is not None:
        jobs = select_shard(jobs, src, options.shard)
    return jobs


def anonymize(src, dst, options: Optional[AnonymizeOptions] = None, progress: Optional[Progress] = None) -> dict:
    """Anonymize every face in ``src`` (a video, an image, or a folder of them) into ``dst``.

    Never raises for a failed input file: each file's status is in the report, and the run
    goes on. Raises ModelError when a model cannot be loaded (nothing can be done then),
    InputError/OutputError when the arguments themselves are unusable, and on KeyboardInterrupt
    (Ctrl-C, or the CLI's SIGTERM handler) :class:`~deidcli.errors.Interrupted` carrying the report
    so far, after removing the partial output. Returns the report dict (see README).

    Safe to run several times at once over the same folder: each output is worked on under a lock
    (see jobs.py), an output another run is writing is skipped, and temporary files left by killed
    runs are removed first. ``options.shard`` keeps one shard of the inputs; ``options.dry_run``
    returns the plan instead (see :func:`_dry_run`).
    """
    options = options or AnonymizeOptions()
    progress = progress or Progress()
    if PIPE in (str(src), str(dst)):  # stdin and/or stdout: one stream, its own rules
        return _anonymize_pipe(src, dst, options, progress)
    jobs = planned_jobs(src, dst, options)
    src, dst = Path(src), Path(dst)
    if options.dry_run:
        return _dry_run(jobs, options)
    pipeline: Optional[Pipeline] = None
    load_seconds = 0.0

    def factory() -> Pipeline:
        nonlocal pipeline, load_seconds
        if pipeline is None:
            t = time.perf_counter()
            pipeline = Pipeline(options)
            load_seconds = round(time.perf_counter() - t, 3)
        return pipeline

    if options.keep or options.only or options.target:
        factory()  # loads and checks the references (BadReference) before any input is opened
    results: list[FileResult] = []
    stale: list[Path] = []
    started = time.time()

    def make_report() -> dict:
        return _report(results, pipeline, load_seconds, options, stale)

    try:
        if src.is_dir():
            stale = clean_stale(dst, recursive=True)
        else:
            for _, d in jobs:
                stale += clean_stale(d, recursive=False)
        for q in stale:
            log.warning("removed %s, left by a deid run that was killed", q)
        for s, d in jobs:
            results.append(_run_job(factory, s, d, options, progress, started))
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        n = len(results)  # jobs[n] was in progress (its output removed on the way out)
        if n < len(jobs):
            s, d = jobs[n]
            results.append(FileResult(input=str(s), output=str(d), status="interrupted",
                                      error="interrupted; partial output removed", exit_code=128 + signum))
        results.extend(FileResult(input=str(s), output=str(d), status="pending", error="not started (interrupted)")
                       for s, d in jobs[n + 1:])
        report = make_report()
        report["interrupted_by"] = signal.Signals(signum).name
        raise Interrupted(signum, report) from None
    return make_report()


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, deepest first."""
    made = []
    p = folder
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _run_job(factory: Callable[[], Pipeline], src: Path, dst: Path, options: AnonymizeOptions, progress: Progress,
             started: float) -> FileResult:
    """One input of a run: skipped when its output exists or another run holds its lock, else
    processed while holding that lock. A failure is returned as a "failed" result (ModelError,
    KeyboardInterrupt and SystemExit go through)."""

    def skipped(why: str) -> FileResult:
        log.info("skip %s: %s", src, why)
        return FileResult(input=str(src), output=str(dst), status="skipped", error=why)

    def failed(e: BaseException, reason: Optional[str] = None) -> FileResult:
        reason = reason or (dest_reason(e) if isinstance(e, (OutputError, OSError)) else None)
        if reason:  # disk full, read-only, permission: name the output, not the temporary file
            msg = f"{dst}: {reason}"
            log.error("%s", msg)
        elif isinstance(e, DeidError):
            msg = str(e)
            log.error("%s: %s", src, _reason(e, src))
        else:  # a bug or an unexpected library error: report it, go on
            msg = f"{type(e).__name__}: {e}"
            log.debug("unexpected error", exc_info=True)
            log.error("%s: %s", src, msg)
        return FileResult(input=str(src), output=str(dst), status="failed", error=msg,
                          exit_code=getattr(e, "exit_code", 1) if isinstance(e, DeidError) else 1)

    if dst.exists() and not options.overwrite:
        return skipped("output exists (use --overwrite to replace it)")
    made: list[Path] = []
    try:
        made = _make_dirs(dst.parent)
        lock = try_lock(dst)
    except OSError as e:  # the output's folder or lock file cannot be created
        return failed(e, dest_reason(e) or f"cannot create {e.filename or dst} ({e.strerror or e})")
    try:
        if lock is None:
            return skipped(owner_text(read_owner(lock_path(dst))))
        with lock:
            if dst.exists() and (not options.overwrite or dst.stat().st_mtime >= started):
                return skipped("output written by another deid run meanwhile")
            try:
                res = _process_file(factory, src, dst, options, progress)
            except ModelError:
                raise
            except Exception as e:
                return failed(e)
            log.info("done %s -> %s", src, dst)
            return res
    finally:
        for folder in made:  # created for this output, left empty by a failure
            try:
                folder.rmdir()
            except OSError:
                break


def _dry_run(jobs: Sequence[tuple[Path, Path]], options: AnonymizeOptions) -> dict:
    """What a run would do with each input (process, overwrite, skip), with the same rules as a run.
    Loads no model, opens no input, writes nothing. With --keep / --only it also gives each input
    it would process the decision on each of its tracks (:func:`_decide_file`): that loads the
    detector and the identity network (the references are checked first) and reads the inputs."""
    files = []
    for s, d in jobs:
        exists = d.exists()
        owner = None if exists and not options.overwrite else lock_owner(d)
        if exists and not options.overwrite:
            action, reason = "skip", "output exists"
        elif owner is not None:
            action, reason = "skip", owner_text(owner)
        elif exists:
            action, reason = "overwrite", "output exists"
        else:
            action, reason = "process", None
        files.append({"input": str(s), "output": str(d), "action": action, "reason": reason})
    if options.keep or options.only:
        pipeline = Pipeline(options, render=False)  # BadReference here, before any input is read
        for f in files:
            if f["action"] != "skip":
                f.update(_decide_file(pipeline, Path(f["input"])))
    plan = {"dry_run": True, "files": files,
            **counts((f["action"] for f in files), ("process", "overwrite", "skip")),
            "failed": sum(1 for f in files if f.get("error")), "options": options.to_dict()}
    if options.keep or options.only:  # the people the references name (their photos are not read here)
        from .people import list_people

        plan["people"] = [{"name": p.name, "files": [str(f) for f in p.files]}
                          for p in list_people(options.keep or options.only)]
    if options.target:  # the targets, in the order they are assigned to tracks
        from .people import list_targets

        plan["targets"] = [{"name": p.name, "files": [str(f) for f in p.files]} for p in list_targets(options.target)]
    return plan


def _decide_file(pipeline: Pipeline, src: Path) -> dict:
    """--dry-run with --keep / --only: {"track_decisions": [...], "faces_kept": n, "frames": n}
    for one input (Pipeline.decide_tracks), or {"error": why} when it cannot be read."""
    from ..media.frames import VideoFrame
    from ..media.images import read_image
    from ..media.probe import media_kind, probe
    from ..media.reader import VideoReader

    res = FileResult(input=str(src), output="")
    try:
        if media_kind(src) == "image":
            frames, fps = iter([VideoFrame(0, read_image(src), None, 0.0)]), None
        else:
            rate = probe(src).average_rate
            frames, fps = iter(VideoReader(src)), float(rate) if rate else None
        pipeline.decide_tracks(frames, res, fps)
    except DeidError as e:
        log.error("%s: %s", src, _reason(e, src))
        return {"error": str(e)}
    return {"frames": res.frames, "track_decisions": res.track_decisions, "faces_kept": res.faces_kept}


# --- pipes: "-" as SRC (stdin) and/or DST (stdout) --------------------------------------------

#: The name that stands for stdin (as SRC) or stdout (as DST).
PIPE = "-"


@contextlib.contextmanager
def _set_on_signals(event: threading.Event, seen: list) -> Iterator[None]:
    """While inside (main thread only): SIGINT and SIGTERM also set ``event`` and are appended to
    ``seen``, then the handler in place runs (the CLI's, or Python's Ctrl-C). ``seen`` matters
    when that handler's exception was raised inside FFmpeg's read callback, which drops it."""
    prev = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if callable(handler):
                def chained(signum, frame, handler=handler):
                    seen.append(signum)
                    event.set()
                    handler(signum, frame)

                prev[sig] = handler
                signal.signal(sig, chained)
    try:
        yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)


def _report(results: Sequence[FileResult], pipeline: Optional[Pipeline], load_seconds: float,
            options: AnonymizeOptions, stale: Sequence[Path]) -> dict:
    """The run's report (README, "JSON report"), for file/folder runs and pipes alike."""
    return {
        "files": [r.__dict__ for r in results],
        **counts((r.status for r in results), ("ok", "skipped", "failed", "interrupted", "pending")),
        "device": pipeline.runtime.device if pipeline else None,
        "dtype": pipeline.runtime.dtype if pipeline else None,
        "generator_backend": pipeline.runner.backend if pipeline and pipeline.runner else None,
        "detector_precision": pipeline.detector.precision if pipeline else None,  # int8 | fp32, as run
        "check_precision": (pipeline.embedder.check_precision  # identity check: int8 | fp32, as run; None: no check
                            if pipeline and pipeline.embedder and options.identity_check else None),
        "load_seconds": load_seconds,  # loading the models, once per run
        "versions": _versions(),
        "options": options.to_dict(),
        "stale_files_removed": [str(q) for q in stale],  # temporary files of killed runs
        # --keep / --only: the reference people, each with the photos their descriptor comes from
        "people": [{"name": p.name, "files": [str(f) for f in p.files]} for p in pipeline.people] if pipeline else [],
        # --target: the targets in the order they are assigned to tracks (people.target_of)
        "targets": [{"name": p.name, "files": [str(f) for f in p.files]} for p in pipeline.targets] if pipeline else [],
    }


def _anonymize_pipe(src, dst, options: AnonymizeOptions, progress: Progress) -> dict:
    """One video from stdin (SRC ``-``) and/or to stdout (DST ``-``); the other side may be a file.

    stdin is opened once (a pipe cannot be read twice) and checked before the models load.
    stdout carries only the video stream, in ``options.encode.format`` (default matroska),
    written as it is encoded: there is no atomic rename on a pipe, so on a failure the stream is
    cut and the file's status is "failed" (the CLI then exits non-zero). While the stream is
    open, file descriptor 1 points at stderr (see stdout_stream). A file DST is written
    atomically and skipped if it exists, as usual; there is no folder, shard, lock or dry run.
    """
    from ..media.images import atomic_output
    from ..media.pipes import open_stream, stdout_stream, stream_rate
    from ..media.probe import media_kind, probe
    from ..media.transcode import transcode_video
    from ..options import PIPE_FORMATS

    src_pipe, dst_pipe = str(src) == PIPE, str(dst) == PIPE
    src, dst = Path(src), Path(dst)
    if options.encode.format and not dst_pipe:
        raise ValueError("--format applies to DST - (stdout) only; a file's container follows its extension")
    if options.dry_run or options.shard is not None:
        raise ValueError("--dry-run and --shard do not apply to - (stdin/stdout)")
    if not src_pipe:
        if not src.is_file():
            raise InputError(f"{src}: no such file" if not src.exists() else
                             f"{src}: only one video file can be written to stdout, not a folder")
        if media_kind(src) != "video":
            raise InputError(f"{src}: only a video can be written to stdout (by extension: .mp4, .mkv, ...)")
    if not dst_pipe:
        if dst.is_dir():
            raise OutputError(f"{dst}: is a folder; give the output file's name when reading stdin")
        if media_kind(dst) != "video":
            raise OutputError(f"{dst}: the output of a stream read from stdin must be a video file "
                              f"(.mp4, .mkv, ...; got {dst.suffix or 'no extension'!r})")
    res = FileResult(input=str(src), output=str(dst), kind="video")
    pipeline: Optional[Pipeline] = None
    load_seconds = 0.0
    if options.keep or options.only or options.target:  # references checked (BadReference) before any input is read
        t = time.perf_counter()
        pipeline = Pipeline(options)
        load_seconds = round(time.perf_counter() - t, 3)

    def report() -> dict:
        return _report([res], pipeline, load_seconds, options, [])

    if not dst_pipe and dst.exists() and not options.overwrite:
        res.status, res.error = "skipped", "output exists (use --overwrite to replace it)"
        log.info("skip %s: %s exists", src, dst)
        return report()
    name = "stdin" if src_pipe else src.name
    stages = Stages()
    signals: list = []  # SIGINT/SIGTERM received while stdin was open
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(stdout_stream()) if dst_pipe else None  # first: guards stdout
            inp = None
            if src_pipe:
                abort = threading.Event()  # a signal while upstream is silent: stdin then reads as ended
                stack.enter_context(_set_on_signals(abort, signals))
                inp = open_stream(name=name, abort=abort)
                stack.callback(inp.close)  # transcode_video closes it too; closing twice is harmless
                rate, total = stream_rate(inp), None
            else:
                info = probe(src)
                rate, total = info.average_rate, info.frames or None
            fps = float(rate) if rate else None
            if pipeline is None:
                t = time.perf_counter()
                pipeline = Pipeline(options)
                load_seconds = round(time.perf_counter() - t, 3)
            t0 = time.perf_counter()
            if not dst_pipe:
                dst.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(atomic_output(dst))
            progress.start_file(Path(name), total)
            try:
                st = transcode_video(name if src_pipe else src, out,
                                     lambda frames: pipeline.process_frames(frames, res, fps, stages),
                                     options.encode, on_frame=lambda n: progress.advance(1), stages=stages,
                                     input_container=inp,
                                     output_format=(options.encode.format or PIPE_FORMATS[0]) if dst_pipe
                                     else None)
                res.add_transcode_stats(st)
            finally:
                progress.end_file()
        if signals:  # its exception was lost in a read callback; the stream was ended early
            raise Interrupted(signals[0])
        res.finish(stages, t0)
        log.info("done %s -> %s", src, dst)
    except ModelError:
        raise
    except (KeyboardInterrupt, Exception) as e:
        if not (isinstance(e, KeyboardInterrupt) or signals):
            return _pipe_failed(e, res, report, before_models=pipeline is None)
        signum = getattr(e, "signum", None) or (signals[0] if signals else signal.SIGINT)
        res.status, res.exit_code = "interrupted", 128 + signum
        res.error = "interrupted; " + ("the stream was cut" if dst_pipe else "partial output removed")
        rep = report()
        rep["interrupted_by"] = signal.Signals(signum).name
        raise Interrupted(signum, rep) from None
    return report()


def _pipe_failed(e: Exception, res: FileResult, report: Callable[[], dict], before_models: bool) -> dict:
    """The stream is cut (or the output file not written): one line on stderr, status failed."""
    if isinstance(e, ValueError) and before_models:
        raise e  # an unusable --device and similar: a usage error, as for files
    msg = str(e) if isinstance(e, DeidError) else f"{type(e).__name__}: {e}"
    if not isinstance(e, DeidError):
        log.debug("unexpected error", exc_info=(type(e), e, e.__traceback__))
    res.status, res.error = "failed", msg
    res.exit_code = e.exit_code if isinstance(e, DeidError) else 1
    log.error("%s", msg)
    return report()
