"""The `deid` command line: a thin Click layer over the library. No pipeline logic lives here.

Heavy modules (torch, av, insightface, onnxruntime) are imported inside the commands, so
`deid --help` and `deid --version` answer instantly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from .. import __version__
from .demo import demo_clip
from .det_size import det_size_option
from .doctor import doctor
from .lazy import LazyGroup
from ..errors import EXIT_FAILED, EXIT_MODELS, EXIT_OK, DeidError, Interrupted, ModelError
from ..options import (AUDIO_MODES, CHECK_PRECISIONS, DETECTOR_PRECISIONS, FALLBACKS, LIVE_SEARCH_EVERY, METHODS,
                       PASS_HOLD, PIPE_FORMATS, DetectOptions, TrackOptions, large_passes_or_default)

log = logging.getLogger("deidcli")


def _setup_logging(quiet: bool, verbose: int) -> None:
    """Log records go to stderr; stdout is kept for the --json report."""
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("deid: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if verbose >= 2 else logging.WARNING)
    logging.getLogger("deidcli").setLevel(level)


def _signals_to_interrupt():
    """SIGINT (Ctrl-C) and SIGTERM stop a run: the first one raises Interrupted in the main thread
    (the file in progress stops after its current batch, its partial output is removed, the report
    is written, exit 128 + the signal number: 130 or 143). A later signal, or one after the run is
    over, prints one line and is otherwise ignored, so it cannot cut the shutdown short with a
    traceback. Returns disarm(), called once the run is over."""
    state = {"armed": True, "got": None}

    def handler(signum, frame):
        if state["armed"] and state["got"] is None:
            state["got"] = signum
            raise Interrupted(signum)
        why = "already stopping" if state["got"] is not None else "writing the report"
        os.write(2, f"deid: {signal.Signals(signum).name} ignored: {why}\n".encode())

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return lambda: state.update(armed=False)


def _shard_option(ctx, param, value):
    if value is None:
        return None
    from ..pipeline.jobs import parse_shard

    try:
        return parse_shard(value)
    except ValueError as e:
        raise click.BadParameter(str(e))


class _RichProgress:
    """Progress bar on stderr (only used when stderr is a terminal)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=False)
        self.task = None

    def start_file(self, path, total):
        if self.task is None:
            self.p.start()
        self.task = self.p.add_task(str(path.name), total=total)

    def advance(self, n=1):
        self.p.advance(self.task, n)

    def end_file(self):
        pass

    def stop(self):
        if self.task is not None:
            self.p.stop()


class _RichClusterProgress:
    """--ray: files and frames done across the cluster, on stderr (only when it is a terminal)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=False)
        self.tasks = None

    def start(self, files, frames):
        self.p.start()
        self.tasks = (self.p.add_task("files", total=files), self.p.add_task("frames", total=frames or None))

    def update(self, files_done, frames_done):
        self.p.update(self.tasks[0], completed=files_done)
        self.p.update(self.tasks[1], completed=frames_done)

    def stop(self):
        if self.tasks is not None:
            self.p.stop()


def _ray_option(ctx, param, value):
    """--ray [ADDRESS]: "local" (no ADDRESS: a local cluster for the run), "auto", ray://HOST:PORT
    or HOST:PORT. Anything else is most likely SRC read as the address (--ray before SRC)."""
    import re

    if value is None or value in ("local", "auto") or value.startswith("ray://") \
            or re.fullmatch(r"[\w.-]+:\d+", value):
        return value
    raise click.BadParameter(f"ADDRESS must be auto, ray://HOST:PORT or HOST:PORT, not {value!r} "
                             f"(write --ray after SRC DST when it takes no ADDRESS)")


#: Research commands (deidcli.research): imported only when run; the help line is shown by `deid --help`.
RESEARCH_COMMANDS = {
    "bench": ("deidcli.research.bench:bench_command",
              "Frames/s on CLIP per stage, next to a plain re-encode."),
    "evaluate": ("deidcli.research.train.commands:evaluate_command",
                 "Measure identity removal and what is kept on LFW DevTest; JSON on stdout."),
    "evaluate-video": ("deidcli.research.evaluate_video:evaluate_video_command",
                       "Compare anonymized videos with their inputs: PATHS are INPUT OUTPUT [INPUT OUTPUT ...]."),
    "prepare": ("deidcli.research.train.commands:prepare_command",
                "Detect, align and describe LFW faces once; cache one .npz per split."),
    "train": ("deidcli.research.train.commands:train_command",
              "Train the de-identification generator on LFW DevTrain (resumes from runs/<name>/last.pt)."),
}


#: Product commands loaded on first use too (they import main.py's shared options).
LAZY_COMMANDS = {
    "live": ("deidcli.cli.live:live_command", "Anonymize a camera or a stream as it happens: SRC live into DST."),
    "faces": ("deidcli.cli.faces:faces_command",
              "List the people in videos: one picture per face track, a contact sheet, a JSON index."),
}


@click.group(cls=LazyGroup, lazy={**RESEARCH_COMMANDS, **LAZY_COMMANDS},
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "-V", "--version", prog_name="deid")
def cli():
    """deid: replace the identity of every face in videos and images, keep what the face does.

    Start with `deid anonymize IN OUT`; `deid doctor` checks the installation. The manual is
    README.md, with details in docs/.
    """


def _stacked(*options):
    """One decorator applying Click ``options`` in the order given (as stacked above a command)."""
    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return decorate


#: --margin and the detector's options, shared by `anonymize` and `live`.
_detector_options = _stacked(
    click.option("--margin", type=click.FloatRange(min=0), default=0.25,
                 help="Margin around the face box (fraction)."),
    click.option("--det-thresh", type=click.FloatRange(0, 1), default=0.5,
                 help="Detector score that starts a track."),
    det_size_option(),
    click.option("--keep-thresh", type=click.FloatRange(0, 1), default=TrackOptions.keep_thresh,
                 help="Lower score that keeps a track going."),
    click.option("--min-face", type=click.IntRange(min=0), default=0, help="Ignore smaller faces (px)."),
    click.option("--detector", default="det_scrfd_2.5g_kps.onnx", help="Detector model file (see `deid models`)."),
    click.option("--detector-precision", type=click.Choice(DETECTOR_PRECISIONS), default="auto",
                 help="Detector arithmetic (auto: CPU int8)."),
    click.option("--detect-every", type=click.IntRange(min=1), default=1,
                 help="Detect on every Nth frame only (faster, less coverage)."),
    click.option("--search-every", type=click.IntRange(min=1), default=None,
                 help="Search whole frames for new faces every Nth frame; between, look near followed faces "
                      f"[default: {DetectOptions.search_every}; live: {LIVE_SEARCH_EVERY}]."),
)


#: --models-dir/--json/--report/-q/-v, shared by `anonymize` and `live`.
_run_options = _stacked(
    click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder searched first for model files."),
    click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout at the end."),
    click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Also write the JSON report to FILE."),
    click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr."),
    click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv: debug)."),
)


#: The generator's options (--weights, --device, --passes, the check...): `anonymize`, `live`, `bench`.
_generator_options = _stacked(
    click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Generator checkpoint (default: shipped)."),
    click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N."),
    click.option("--fp16", is_flag=True, help="Half-precision generator on CUDA."),
    click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Faces per generator batch."),
    click.option("--passes", type=click.IntRange(1, 8), default=1,
                 help="Generator passes per face."),
    click.option("--large-passes", type=click.IntRange(1, 8), default=None,
                 help="Fewest passes for faces 128 px up [anonymize: 2, live: 1]."),
    click.option("--identity-check/--no-identity-check", default=True,
                 help="Redo or blur faces still like the person."),
    click.option("--check-thresh", type=click.FloatRange(-1, 1), default=0.25,
                 help="Cosine at which the identity check acts."),
    click.option("--check-precision", type=click.Choice(CHECK_PRECISIONS), default="auto",
                 help="Identity check arithmetic (auto: CPU int8)."),
    click.option("--max-passes", type=click.IntRange(1, 8), default=4,
                 help="Most passes before the fallback (96 px up)."),
    click.option("--small-max-passes", type=click.IntRange(1, 8), default=2, show_default=True,
                 help="Most passes for faces under 96 px."),
    click.option("--fallback", type=click.Choice(FALLBACKS), default="blur", show_default=True,
                 help="What faces not generated get."),
    click.option("--min-generate", type=click.IntRange(min=0), default=40, show_default=True,
                 help="Smaller faces (px high) get the fallback."),
    click.option("--max-yaw", type=click.FloatRange(min=0), default=0.6, show_default=True,
                 help="Faces turned further get the fallback."),
    click.option("--min-light", type=click.FloatRange(min=0), default=20.0, show_default=True,
                 help="Darker faces (CIELAB L*) get the fallback."),
    click.option("--soft-fraction", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="Softer faces get the fallback (0: off)."),
    click.option("--colour-match/--no-colour-match", default=True,
                 help="Give generated faces the input's colours."),
    click.option("--first-pass-mouth/--every-pass-mouth", default=True,
                 help="Later passes keep the first pass's mouth."),
    click.option("--eye-pass/--no-eye-pass", default=False,
                 help="One more generator run on eyes and brows."),
    click.option("--keep-detail/--no-keep-detail", default=True,
                 help="Keep the frame's fine detail in big faces."),
    click.option("--pass-hold", type=click.IntRange(min=0), default=PASS_HOLD, show_default=True,
                 help="Faces a track keeps raised passes (0: all)."),
)


@cli.command()
# unreadable: a per-file error; "-": stdin
@click.argument("src", type=click.Path(exists=True, readable=False, allow_dash=True, path_type=Path))
@click.argument("dst", type=click.Path(allow_dash=True, path_type=Path))
@click.option("--method", type=click.Choice(METHODS), default="generate",
              help="Learned faces, or classic obscuring.")
@_generator_options
@_detector_options
@click.option("--max-gap", type=click.IntRange(min=0), default=8,
              help="Frames a tracked face may be missed.")
@click.option("--smooth", type=click.FloatRange(min=0), default=1.0, help="Landmark smoothing (0: off).")
@click.option("--codec", default="libx264", help="Video encoder (libx265, h264_nvenc, ...).")
@click.option("--crf", type=click.IntRange(0, 63), default=18, help="Encoder quality (lower is better).")
@click.option("--preset", default="veryfast", help="Encoder speed preset (medium: smaller, slower).")
@click.option("--audio", type=click.Choice(AUDIO_MODES), default="copy",
              help="Copy, re-encode (aac) or drop (none).")
@click.option("--keep-metadata", is_flag=True, help="Also copy tags (GPS, dates, devices...).")
@click.option("--format", "out_format", type=click.Choice(PIPE_FORMATS), default=None,
              help="Container when DST is - (matroska).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (else skip).")
@click.option("--dry-run", is_flag=True,
              help="List what would be done; write nothing.")
@click.option("--shard", metavar="I/N", callback=_shard_option, default=None,
              help="Only shard I of N (0-based) of the inputs.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              callback=_ray_option, help="Run on a Ray cluster: auto, ray://HOST:10001; none: a local one.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="--ray: workers (default: one per GPU, else per 4 CPUs).")
@click.option("--keep", multiple=True, metavar="PHOTO_OR_DIR", type=click.Path(path_type=Path),
              help="Leave these people untouched (repeatable).")
@click.option("--only", multiple=True, metavar="PHOTO_OR_DIR", type=click.Path(path_type=Path),
              help="Anonymize only these people (repeatable).")
@click.option("--target", multiple=True, metavar="PHOTO_OR_DIR", type=click.Path(path_type=Path),
              help="Steer generated faces towards these faces (repeatable).")
@_run_options
def anonymize(src, dst, method, weights, device, fp16, batch_size, passes, identity_check, check_thresh,
              check_precision, max_passes, small_max_passes, large_passes, fallback, min_generate, max_yaw, min_light,
              soft_fraction,
              colour_match, first_pass_mouth, eye_pass, keep_detail, pass_hold,
              margin, det_thresh, keep_thresh, det_size, min_face,
              detector, detector_precision, detect_every, search_every,
              max_gap, smooth, codec, crf, preset, audio, keep_metadata, overwrite, dry_run, shard, models_dir, as_json,
              report_path, quiet, verbose, out_format, keep, only, ray_address, ray_workers, target):
    """Anonymize SRC (video, image, or folder) into DST.

    SRC or DST `-`: a video stream on stdin / to stdout (Matroska, or --format mpegts).

    A folder is processed recursively and mirrored into DST; existing outputs are skipped
    unless --overwrite. Exit codes: 0 ok, 1 some input failed, 2 usage, 3 models, 130/143
    interrupted by SIGINT/SIGTERM (partial output removed, report written; rerun to resume).

    --ray: the same run on the workers of a Ray cluster (docs/cluster.md); write it after
    SRC DST when it takes no ADDRESS.

    Each option in depth: docs/options.md.
    """
    _setup_logging(quiet, verbose)
    if as_json and str(dst) == "-":
        raise click.UsageError("--json cannot be used with DST -: stdout carries the video (use --report FILE)")
    disarm = _signals_to_interrupt()
    from ..options import AnonymizeOptions, DetectOptions, EncodeOptions, TrackOptions

    try:  # the dataclasses check combinations Click cannot (e.g. --detect-every vs --max-gap)
        options = AnonymizeOptions(
            method=method, weights=weights, device=device, fp16=fp16, batch_size=batch_size, margin=margin,
            passes=passes, identity_check=identity_check, check_thresh=check_thresh,
            check_precision=check_precision, max_passes=max_passes, colour_match=colour_match,
            small_max_passes=small_max_passes, large_passes=large_passes_or_default(large_passes, max_passes),
            fallback=fallback, min_generate=min_generate, max_yaw=max_yaw,
            min_light=min_light, soft_fraction=soft_fraction, first_pass_mouth=first_pass_mouth, eye_pass=eye_pass,
            keep_detail=keep_detail, pass_hold=pass_hold,
            models_dir=models_dir, overwrite=overwrite, dry_run=dry_run, shard=shard, keep=keep, only=only,
            target=target,
            detect=DetectOptions(det_thresh=det_thresh, det_size=det_size, min_face=min_face, detector=detector,
                                 detect_every=detect_every,
                                 search_every=search_every or DetectOptions.search_every,
                                 precision=detector_precision),
            track=TrackOptions(max_gap=max_gap, smooth=smooth, keep_thresh=keep_thresh),
            encode=EncodeOptions(codec=codec, crf=crf, preset=preset, audio=audio, keep_metadata=keep_metadata,
                                 format=out_format),
        )
    except ValueError as e:
        raise click.UsageError(str(e))
    if ray_workers is not None and ray_address is None:
        raise click.UsageError("--ray-workers applies to --ray runs only")
    tty = sys.stderr.isatty() and not quiet and not as_json
    if ray_address is None:
        progress = _RichProgress() if tty else None
        from ..pipeline.anonymize import anonymize as run
    else:
        from functools import partial

        from ..pipeline.cluster import ClusterOptions, anonymize_on_ray

        progress = _RichClusterProgress() if tty else None
        run = partial(anonymize_on_ray, cluster=ClusterOptions(address=ray_address, workers=ray_workers))

    try:
        try:
            report = run(src, dst, options, progress=progress)
        finally:
            disarm()
            if progress is not None:
                progress.stop()
    except KeyboardInterrupt as e:  # Interrupted carries the report of the files done so far
        signum = getattr(e, "signum", signal.SIGINT)
        if "-" in (str(src), str(dst)):
            log.error("interrupted by %s; the stream was cut", signal.Signals(signum).name)
        else:
            log.error("interrupted by %s; partial output removed; run the same command again to resume",
                      signal.Signals(signum).name)
        _finish(as_json, report_path, getattr(e, "report", None) or {"error": "interrupted",
                                                                     "options": options.to_dict()}, 128 + signum)
    except ValueError as e:  # unusable --device and similar
        raise click.UsageError(str(e))
    except DeidError as e:
        log.error("%s", e)
        _finish(as_json, report_path, {"error": str(e), "options": options.to_dict()}, e.exit_code)
    if report.get("dry_run"):
        if not as_json:
            for f in report["files"]:
                why = f"  ({f['reason']})" if f["reason"] else ""
                click.echo(f"{f['action']:9s} {f['input']} -> {f['output']}{why}")
                if f.get("error"):
                    click.echo(f"{'':9s} cannot decide: {f['error']}")
                for t in f.get("track_decisions", []):  # --keep / --only: what the run would decide
                    span = "" if t["first_time"] is None else f" {t['first_time']:.2f}-{t['last_time'] or 0:.2f} s"
                    seg = f".{t['segment']}" if t.get("segment") else ""  # a segment after an identity change
                    click.echo(f"{'':9s} track {t['track']}{seg}{span}, {t['faces']} face(s): {t['decision']} "
                               f"({t['reason']})")
            for p in report.get("people", []):
                click.echo(f"{'keep' if keep else 'only':9s} {p['name']}: {len(p['files'])} photo(s)")
            n = len(report.get("targets", []))
            for k, p in enumerate(report.get("targets", [])):
                click.echo(f"{'target':9s} {p['name']}: {len(p['files'])} photo(s), for tracks "
                           f"{', '.join(str(k + i * n) for i in range(3))}, ...")
        _finish(as_json, report_path, report, EXIT_FAILED if report.get("failed") else EXIT_OK)
    if not as_json and not quiet:
        for f in report["files"]:
            if f["status"] == "ok":
                click.echo(f"{f['input']} -> {f['output']}: {f['frames']} frame(s), {f['faces_anonymized']} face(s), "
                           f"{f['tracks']} track(s), {f['seconds']:.1f} s", err=True)
        click.echo(f"deid: {report['ok']} ok, {report['skipped']} skipped, {report['failed']} failed "
                   f"(device {report['device']}, {report['dtype']})", err=True)
    _finish(as_json, report_path, report, EXIT_FAILED if report["failed"] else EXIT_OK)


def _emit(as_json: bool, obj: dict) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()


def _finish(as_json: bool, report_path, obj: dict, code: int) -> None:
    """Print the report (--json), write it to --report (atomically), exit with ``code``."""
    _emit(as_json, obj)
    if report_path is not None:
        from ..pipeline.jobs import write_json_atomic

        try:
            write_json_atomic(report_path, obj)
        except OSError as e:
            log.error("%s: cannot write the report (%s)", report_path, e.strerror or e)
            code = code or EXIT_FAILED
    for s in (signal.SIGINT, signal.SIGTERM):  # a late signal must not turn the exit status into "killed"
        signal.signal(s, signal.SIG_IGN)  # (Python restores SIG_DFL at shutdown, but keeps SIG_IGN)
    sys.exit(code)


@cli.group(invoke_without_command=True)
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder searched first for model files.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON on stdout.")
@click.pass_context
def models(ctx, models_dir, as_json):
    """List the model files: where found, whether they verify.

    Every model file deid uses, where it was looked for and found, and whether its SHA-256 verifies.

    Exit code 3 if any file is missing or does not verify.
    """
    ctx.ensure_object(dict)
    ctx.obj["models_dir"] = models_dir
    if ctx.invoked_subcommand is not None:
        return
    from .. import weights

    rows = []
    for name in weights.REGISTRY:
        st = weights.status(name, models_dir)
        rows.append({"name": name, "found": str(st.path) if st.path else None, "verified": st.verified,
                     "searched": [str(d) for d in st.searched], "source": weights.source_url(name),
                     "licence": st.model.licence, "purpose": st.model.purpose})
    gen = weights.DEFAULT_GENERATOR
    if as_json:
        click.echo(json.dumps({"models": rows, "generator": str(gen) if gen.is_file() else None}, indent=2))
    else:
        click.echo("searched, in order: " + ", ".join(rows[0]["searched"]))
        for r in rows:
            state = "OK" if r["verified"] else ("CORRUPT (SHA-256 mismatch)" if r["found"] else "MISSING")
            click.echo(f"{r['name']:30s} {state:28s} {r['found'] or '-'}")
            click.echo(f"{'':30s} {r['purpose']}; {r['licence']}")
        click.echo(f"{'generator':30s} {'OK' if gen.is_file() else 'MISSING':28s} {gen if gen.is_file() else '-'}")
    ctx.exit(EXIT_OK if all(r["verified"] for r in rows) else EXIT_MODELS)


@models.command("download")
@click.argument("names", nargs=-1)
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to save (default: the cache, $XDG_CACHE_HOME/deid).")
@click.pass_context
def models_download(ctx, names, dest):
    """Fetch missing or corrupt model files (SHA-256 verified).

    From their sources, or from the mirror $DEID_MODELS_URL/<name> when set.
    """
    from .. import weights

    try:
        weights.download(names or None, dest=dest, models_dir=ctx.obj.get("models_dir"),
                         log=lambda s: click.echo(s, err=True))
    except ModelError as e:
        click.echo(f"deid: error: {e}", err=True)
        ctx.exit(EXIT_MODELS)


# The product's own light commands; the research ones load on first use (cli/lazy.py).
cli.add_command(doctor)
cli.add_command(demo_clip)


def main() -> None:
    cli(prog_name="deid")


if __name__ == "__main__":
    main()
