"""Click commands ``prepare``, ``train`` and ``evaluate`` (loaded by name on first use by the
``deid`` group, deidcli/cli/main.py). Module import is light: torch is imported inside the command functions."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click


def _logging(verbose: bool = True):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


_path = click.Path(path_type=Path)


def _one_line_errors(f):
    """The command's failures that are the user's to fix (a missing file or model, a checkpoint
    that does not fit) as one line ``deid: ERROR: ...`` on stderr and the exit code of the error
    (README, Exit codes), as `deid anonymize` reports them, not a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from ...errors import EXIT_FAILED, DeidError

        try:
            return f(*args, **kwargs)
        except DeidError as e:
            click.echo(f"deid: ERROR: {e}", err=True)
            sys.exit(e.exit_code)
        except FileNotFoundError as e:
            click.echo(f"deid: ERROR: {e.filename}: no such file or directory", err=True)
            sys.exit(EXIT_FAILED)

    return wrapper


@click.command("prepare")
@click.option("--split", type=click.Choice(["train", "test", "both"]), default="both",
              show_default=True, help="LFW split: peopleDevTrain / peopleDevTest people.")
@click.option("--lfw-dir", type=_path, default=None, help="LFW root (default ../shared/data/lfw).")
@click.option("--cache-dir", type=_path, default=None, help="Cache folder (default <repo>/cache).")
@click.option("--size", type=int, default=128, show_default=True, help="Crop side.")
@click.option("--margin", type=float, default=0.2, show_default=True, help="Crop margin.")
@click.option("--det-size", type=int, default=320, show_default=True, help="Detector input size.")
@click.option("--models-dir", type=_path, default=None, help="Folder holding the model files.")
@click.option("--force", is_flag=True, help="Rebuild even if the cache file exists.")
@_one_line_errors
def prepare_command(split, lfw_dir, cache_dir, size, margin, det_size, models_dir, force):
    """Detect, align and describe LFW faces once; cache one .npz per split."""
    _logging()
    from .prepare import prepare_split

    splits = ["train", "test"] if split == "both" else [split]
    out = {s: str(prepare_split(s, lfw_dir=lfw_dir, cache_dir=cache_dir, size=size, margin=margin,
                                det_size=det_size, models_dir=models_dir, force=force))
           for s in splits}
    click.echo(json.dumps(out))


@click.command("train")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="JSON training config (see configs/train_128.json).")
@click.option("--name", default=None, help="Run name: runs/<name>/ (resumes if it exists).")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (overrides the config).")
@click.option("--steps", type=int, default=None, help="Stop at this total step count.")
@click.option("--max-minutes", type=float, default=None, help="Stop after this wall time.")
@click.option("--runs-dir", type=_path, default=None, help="Parent of run folders (default <repo>/runs).")
@click.option("--cache-dir", type=_path, default=None, help="Prepared-data cache folder.")
@click.option("--models-dir", type=_path, default=None, help="Folder holding the model files.")
@click.option("--set", "sets", multiple=True, metavar="KEY=JSON",
              help="Override a config entry, e.g. --set weights.repeller=2.0 (repeatable).")
@_one_line_errors
def train_command(config_path, name, device, steps, max_minutes, runs_dir, cache_dir, models_dir, sets):
    """Train the de-identification generator on LFW DevTrain (resumes from runs/<name>/last.pt)."""
    _logging()
    from .config import load_config
    from .loop import train

    over: dict = {}
    for k, v in (("name", name), ("device", device), ("steps", steps), ("max_minutes", max_minutes),
                 ("runs_dir", runs_dir and str(runs_dir)), ("cache_dir", cache_dir and str(cache_dir)),
                 ("models_dir", models_dir and str(models_dir))):
        if v is not None:
            over[k] = v
    for s in sets:
        if "=" not in s:
            raise click.BadParameter(f"expected KEY=JSON, got {s!r}", param_hint="--set")
        key, val = s.split("=", 1)
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass
        node = over
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    from ...generator.engine import resolve_runtime

    try:
        cfg = load_config(config_path, over)
        cfg["device"] = resolve_runtime(str(cfg["device"])).device  # "auto", and CUDA checked here
    except ValueError as e:  # unknown config key, a value of the wrong type, an unusable device, bad JSON
        raise click.UsageError(str(e))
    click.echo(json.dumps(train(cfg)))


@click.command("evaluate")
@click.option("--weights", type=_path, default=None,
              help="Generator checkpoint (default: the shipped weights/deid_generator_128.pt).")
@click.option("--out", "out_dir", type=_path, default=Path("out/evaluate"), show_default=True,
              help="Folder for report.json, report.md and contact_sheet.png.")
@click.option("--methods", default="generate,blur,pixelate", show_default=True,
              help="Comma-separated methods to compare: generate, generate:K (K generator passes, as "
                   "`anonymize --passes K`), blur, pixelate.")
@click.option("--cache-dir", type=_path, default=None, help="Prepared-data cache folder.")
@click.option("--lfw-dir", type=_path, default=None, help="LFW root (default ../shared/data/lfw).")
@click.option("--models-dir", type=_path, default=None, help="Folder holding the model files.")
@click.option("--device", default="cpu", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--limit", type=int, default=None, help="Evaluate on at most this many test faces.")
@click.option("--judge", "judges", multiple=True, type=click.Choice(["dlib"]),
              help="Also measure identity with this independent recognition network (deid was not "
                   "trained with it; needs pip install 'deid-video[judge]'). Repeatable.")
@click.option("--colour-match/--no-colour-match", default=True,
              help="generate: give the generated face the input's colour statistics, as `deid anonymize` does "
                   "by default (--no-colour-match: the generator's own colours).")
@click.option("--first-pass-mouth/--every-pass-mouth", default=True,
              help="generate:K: passes after the first leave the mouth as the first drew it, as `deid "
                   "anonymize` does by default (--every-pass-mouth: every pass redraws it).")
@click.option("--eye-pass/--no-eye-pass", default=False,
              help="generate: one generator run more on the eye band only, as `deid anonymize --eye-pass`.")
@_one_line_errors
def evaluate_command(weights, out_dir, methods, cache_dir, lfw_dir, models_dir, device, limit, judges, colour_match,
                     first_pass_mouth, eye_pass):
    """Measure identity removal and what is kept on LFW DevTest; JSON on stdout."""
    _logging()
    from ..evaluate import _method_passes, evaluate

    methods = tuple(m for m in methods.split(",") if m)
    for m in methods:
        try:
            _method_passes(m)
        except ValueError as e:
            raise click.UsageError(str(e))
    from ...generator.engine import resolve_runtime

    try:
        device = resolve_runtime(device).device
    except ValueError as e:
        raise click.UsageError(str(e))
    report = evaluate(weights=weights, out_dir=out_dir, methods=methods,
                      cache_dir=cache_dir, lfw_dir=lfw_dir, models_dir=models_dir, device=device,
                      limit=limit, judges=judges, colour_match=colour_match,
                      first_pass_mouth=first_pass_mouth, eye_pass=eye_pass)
    click.echo(json.dumps(report))
