"""``deid faces SRC OUT_DIR``: one picture per person (face track) of each video, a contact sheet and
a JSON index (pipeline/faces_index.py).

Loaded by name on first use (cli/main.py's lazy map), so it may use main.py's shared helpers;
Click only, no logic.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from ..errors import EXIT_FAILED, EXIT_OK, DeidError
from ..options import TrackOptions
from .det_size import det_size_option
from .main import _finish, _RichProgress, _setup_logging, _signals_to_interrupt, log


@click.command("faces")
@click.argument("src", type=click.Path(exists=True, readable=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--det-thresh", type=click.FloatRange(0, 1), default=0.5, help="Detector score that starts a track.")
@det_size_option()
@click.option("--keep-thresh", type=click.FloatRange(0, 1), default=TrackOptions.keep_thresh,
              help="Lower score that keeps a track going.")
@click.option("--min-face", type=click.IntRange(min=0), default=0, help="Ignore smaller faces (px).")
@click.option("--detector", default="det_scrfd_2.5g_kps.onnx", help="Detector model file (see `deid models`).")
@click.option("--detect-every", type=click.IntRange(min=1), default=1,
              help="Detect on every Nth frame only (faster, fewer faces to choose from).")
@click.option("--max-gap", type=click.IntRange(min=0), default=8, help="Frames a tracked face may be missed.")
@click.option("--overwrite", is_flag=True, help="Replace existing video folders (else skip them).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder searched first for model files.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout at the end.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON report to FILE.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv: debug).")
def faces_command(src, out_dir, device, det_thresh, det_size, keep_thresh, min_face, detector, detect_every, max_gap,
                  overwrite, models_dir, as_json, report_path, quiet, verbose):
    """List the people in videos: one picture per face track, a contact sheet, a JSON index.

    SRC is a video or a folder of videos. For each video OUT_DIR/<name>/ gets track_NNN.png
    (the track's sharpest, most frontal face, aligned), track_NNN_context.png, sheet.png (every
    track with its id, first-last time and face count) and index.json; OUT_DIR/index.json
    gathers them. Existing video folders are skipped unless --overwrite.

    Details and the index's fields: docs/faces.md.
    """
    _setup_logging(quiet, verbose)
    from ..options import DetectOptions, TrackOptions
    from ..pipeline.faces_index import FacesOptions

    try:
        options = FacesOptions(device=device, models_dir=models_dir, overwrite=overwrite,
                               detect=DetectOptions(det_thresh=det_thresh, det_size=det_size, min_face=min_face,
                                                    detector=detector, detect_every=detect_every),
                               track=TrackOptions(max_gap=max_gap, keep_thresh=keep_thresh))
    except ValueError as e:
        raise click.UsageError(str(e))
    disarm = _signals_to_interrupt()
    progress = _RichProgress() if (sys.stderr.isatty() and not quiet and not as_json) else None
    from ..pipeline.faces_index import faces_index

    try:
        try:
            report = faces_index(src, out_dir, options, progress=progress)
        finally:
            disarm()
            if progress is not None:
                progress.stop()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        log.error("interrupted by %s; the video in progress left nothing behind; run the same command again "
                  "to resume", signal.Signals(signum).name)
        _finish(as_json, report_path, getattr(e, "report", None) or {"error": "interrupted"}, 128 + signum)
    except ValueError as e:  # unusable --device and similar
        raise click.UsageError(str(e))
    except DeidError as e:
        log.error("%s", e)
        _finish(as_json, report_path, {"error": str(e), "options": options.to_dict()}, e.exit_code)
    if not as_json and not quiet:
        for v in report["videos"]:
            if v["status"] == "ok":
                click.echo(f"{v['input']} -> {v['output']}: {v['tracks']} track(s), {v['frames']} frame(s), "
                           f"{v['seconds']:.1f} s", err=True)
        click.echo(f"deid: {report['ok']} ok, {report['skipped']} skipped, {report['failed']} failed; "
                   f"index {report['index'] or 'not written (no video)'}", err=True)
    _finish(as_json, report_path, report, EXIT_FAILED if report["failed"] else EXIT_OK)
