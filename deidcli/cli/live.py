"""``deid live SRC DST``: a camera or a stream, anonymized as it happens (pipeline/live.py).

Loaded by name on first use (cli/main.py's lazy map), so it may use main.py's shared options and
report helpers; Click only, no logic.
"""

from __future__ import annotations

import signal
import sys

import click

from ..errors import EXIT_OK, DeidError
from ..options import LIVE_SEARCH_EVERY, METHODS, PIPE_FORMATS, large_passes_or_default
from .main import (_detector_options, _finish, _generator_options, _run_options, _setup_logging,
                   _signals_to_interrupt, log)


#: At this share of the frames dropped or more, the session ends with a warning that says what to change.
SLOW_WARN_PERCENT = 50.0


def _input_option(ctx, param, values):
    out = []
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r}: give KEY=VALUE (e.g. video_size=1280x720)")
        out.append((key, val))
    return tuple(out)


@click.command("live")
@click.argument("src")
@click.argument("dst")
@click.option("--realtime", is_flag=True, help="Play a file (or stdin) at its own frame rate.")
@click.option("--max-latency", type=click.FloatRange(min=0.01), default=0.3,
              help="Seconds a frame may take from arrival to output.")
@click.option("--timeout", "source_timeout", type=click.FloatRange(min=0.1), default=10.0,
              help="Seconds without data before the source counts as lost.")
@click.option("--reconnect", is_flag=True, help="Retry a lost network source (back-off).")
@click.option("--reconnect-for", type=click.FloatRange(min=0), default=60.0,
              help="Give up reconnecting after this many seconds.")
@click.option("--duration", type=click.FloatRange(min=0.01), default=None,
              help="Stop after this many seconds of source time.")
@click.option("--input-format", default=None, help="FFmpeg input format (default: v4l2 for cameras, else auto).")
@click.option("--input-option", "input_options", multiple=True, callback=_input_option, metavar="KEY=VALUE",
              help="FFmpeg option for the source (repeatable): video_size=1280x720, framerate=30 ...")
@click.option("--method", type=click.Choice(METHODS), default="generate", help="Learned faces, or classic obscuring.")
@_generator_options
@_detector_options
@click.option("--max-gap", type=click.IntRange(min=0), default=8,
              help="Frames an ended track stays covered (lookahead: a third of --max-latency).")
@click.option("--smooth", type=click.FloatRange(min=0), default=1.0, help="Landmark smoothing (0: off).")
@click.option("--codec", default="libx264", help="Video encoder.")
@click.option("--crf", type=click.IntRange(0, 63), default=23, help="Encoder quality (lower is better).")
@click.option("--preset", default="veryfast", help="Encoder speed preset (x264: tune zerolatency).")
@click.option("--audio", type=click.Choice(("copy", "aac", "none")), default="copy",
              help="Copy where the output takes it (else AAC), AAC, or none.")
@click.option("--format", "out_format", type=click.Choice(PIPE_FORMATS), default=None,
              help="Container when DST is - (mpegts).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_run_options
def live_command(src, dst, realtime, max_latency, source_timeout, reconnect, reconnect_for, duration, input_format,
                 input_options, method, weights, device, fp16, batch_size, passes, identity_check, check_thresh,
                 check_precision, max_passes, small_max_passes, large_passes, fallback, min_generate, max_yaw, min_light,
                 soft_fraction, colour_match, first_pass_mouth, eye_pass, keep_detail, pass_hold, margin, det_thresh,
                 det_size, keep_thresh, min_face, detector, detector_precision, detect_every, search_every, max_gap, smooth, codec,
                 crf, preset, audio, out_format, overwrite, models_dir, as_json, report_path, quiet, verbose):
    """Anonymize a camera or a stream as it happens: SRC live into DST.

    SRC: a camera (/dev/video0 or 0), a stream URL (rtsp, rtmp, udp, srt, http...), a file with
    --realtime, or - (stdin). DST: a file, - (stdout, MPEG-TS), a URL (udp, srt, tcp: MPEG-TS;
    rtmp: FLV; rtsp) or a v4l2loopback device.

    Fail closed: a frame that cannot be anonymized within --max-latency is dropped or its faces
    are blurred; no face leaves unanonymized. Runs until the source ends or Ctrl-C/SIGTERM (the
    output is finalized). Exit codes: 0 source ended, 1 failure, 2 usage, 3 models, 4 the source
    stopped or disconnected, 130/143 SIGINT/SIGTERM. docs/live.md.
    """
    _setup_logging(quiet, verbose)
    if as_json and dst == "-":
        raise click.UsageError("--json cannot be used with DST -: stdout carries the video (use --report FILE)")
    disarm = _signals_to_interrupt()
    from ..options import AnonymizeOptions, DetectOptions, EncodeOptions, LiveOptions, TrackOptions

    try:
        options = AnonymizeOptions(
            method=method, weights=weights, device=device, fp16=fp16, batch_size=batch_size, margin=margin,
            passes=passes, identity_check=identity_check, check_thresh=check_thresh,
            check_precision=check_precision, max_passes=max_passes, colour_match=colour_match,
            small_max_passes=small_max_passes, large_passes=large_passes_or_default(large_passes, max_passes, live=True),
            fallback=fallback, min_generate=min_generate, max_yaw=max_yaw,
            min_light=min_light, soft_fraction=soft_fraction, first_pass_mouth=first_pass_mouth, eye_pass=eye_pass,
            keep_detail=keep_detail, pass_hold=pass_hold, models_dir=models_dir, overwrite=overwrite,
            detect=DetectOptions(det_thresh=det_thresh, det_size=det_size, min_face=min_face, detector=detector,
                                 detect_every=detect_every, search_every=search_every or LIVE_SEARCH_EVERY,
                                 precision=detector_precision),
            track=TrackOptions(max_gap=max_gap, smooth=smooth, keep_thresh=keep_thresh),
            encode=EncodeOptions(codec=codec, crf=crf, preset=preset, audio=audio, format=out_format),
        )
        live_options = LiveOptions(realtime=realtime, max_latency=max_latency, timeout=source_timeout,
                                   reconnect=reconnect, reconnect_for=reconnect_for, duration=duration,
                                   input_format=input_format, input_options=input_options)
    except ValueError as e:
        raise click.UsageError(str(e))
    from ..pipeline.live import live

    try:
        try:
            report = live(src, dst, options, live_options)
        finally:
            disarm()
    except KeyboardInterrupt as e:  # Interrupted, with the report; the output was finalized
        signum = getattr(e, "signum", signal.SIGINT)
        report = getattr(e, "report", None) or {"error": "interrupted", "options": options.to_dict()}
        log.error("interrupted by %s; the output was finalized (%s frames)", signal.Signals(signum).name,
                  report.get("frames_out", 0))
        _finish(as_json, report_path, report, 128 + signum)
    except ValueError as e:  # a file without --realtime, an unusable --device and similar
        raise click.UsageError(str(e))
    except DeidError as e:
        log.error("%s", e)
        _finish(as_json, report_path, getattr(e, "report", None) or {"error": str(e), "options": options.to_dict()},
                e.exit_code)
    if report["frames_in"] and report["dropped_percent"] >= SLOW_WARN_PERCENT:
        # fail closed is right, but a stream that stays dark must say why
        hint = ", or use --method blur" if options.method == "generate" else ""
        log.warning("%s%% of the frames were dropped: this machine could not anonymize them within "
                    "--max-latency %g s; raise it%s (docs/live.md)", report["dropped_percent"],
                    live_options.max_latency, hint)
    if not as_json and not quiet:
        lat = report["latency_ms"]
        click.echo(f"{report['source']} -> {report['destination']}: {report['frames_out']} of {report['frames_in']} "
                   f"frame(s) out ({report['dropped_percent']}% dropped, {report['frames_covered']} covered), "
                   f"latency p50 {lat['p50']} / p95 {lat['p95']} / max {lat['max']} ms, "
                   f"{report['fps_out']} frames/s (device {report['device']})", err=True)
    sys.stdout.flush()
    _finish(as_json, report_path, report, EXIT_OK)
