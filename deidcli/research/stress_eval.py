"""Run ``deid anonymize`` over the stress set (and/or the shared clips) and measure each output
with ``deid evaluate-video --judge dlib``: one table per run, per condition.

    python -m deidcli.research.stress_eval OUT_DIR CLIP.mp4 [CLIP.mp4 ...] [--tag NAME]
        [--reencode] [--judge-every 5] [-- ANONYMIZE_OPTIONS ...]

For each clip: OUT_DIR/<tag>/<clip>.mp4 (the anonymized output), <clip>.run.json (its report),
<clip>.eval.json (evaluate-video's), then OUT_DIR/<tag>/table.md and table.json with, per clip:
faces, exposed faces, dlib same-person share, garish faces, the share of faces that took each
path (generated, blurred), frames/s, and with ``--reencode`` the time of a plain re-encode of
the same clip (deid's encoder settings) and the ratio. Anonymizing and re-encoding are timed
one after the other on the same machine, nothing else of this script running meanwhile.
Options after ``--`` go to ``deid anonymize`` unchanged (e.g. ``-- --method blur``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: How deid is run: this interpreter, the deidcli package on its path (a checkout's own when run
#: from that checkout with ``python -m``).
DEID = [sys.executable, "-c", "from deidcli.cli import main; main()"]


def reencode_seconds(src: Path, dst: Path) -> float:
    from .. import video
    from ..options import EncodeOptions

    t = time.perf_counter()
    with video.atomic_output(dst) as tmp:
        video.reencode(src, tmp, EncodeOptions())
    return time.perf_counter() - t


def _row(name: str, run: dict, ev: dict, reenc) -> dict:
    f = run["files"][0]
    faces = ev.get("faces") or 0
    row = {
        "clip": name, "frames": ev.get("frames"), "faces": faces,
        "exposed": ev.get("exposed_faces"), "verified": ev.get("exposed_verified"),
        "unchanged": ev.get("exposed_unchanged"),
        "dlib_same": ev.get("judge_same_frac"), "dlib_faces": ev.get("judge_faces"),
        "garish": ev.get("garish_faces"), "garish_frac": ev.get("garish_frac"),
        "eval_generated": ev.get("faces_generated"), "eval_blurred": ev.get("faces_blurred"),
        "eval_pixelated": ev.get("faces_pixelated"),
        "anon_faces": f.get("faces_anonymized"), "paths": f.get("face_paths"),
        "fallback": f.get("faces_blurred_fallback"), "regenerated": f.get("faces_regenerated"),
        "seconds": f.get("seconds"), "fps": f.get("fps"),
    }
    if reenc is not None:
        row["reencode_s"] = round(reenc, 2)
        row["x_reencode"] = round(f["seconds"] / reenc, 2) if reenc else None
    return row


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def to_markdown(rows: list) -> str:
    head = ("| clip | faces | exposed | dlib same | garish | generated / blurred (eval) | anonymizer paths "
            "| fps | x re-encode |")
    out = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        paths = ", ".join(f"{k} {v}" for k, v in (r.get("paths") or {}).items()) or (
            f"fallback {r.get('fallback')}")
        out.append(f"| {r['clip']} | {r['faces']} | {r['exposed']} | {_pct(r['dlib_same'])} "
                   f"| {r['garish'] if r['garish'] is not None else ''} ({_pct(r['garish_frac'])}) "
                   f"| {r['eval_generated']} / {r['eval_blurred']} | {paths} | {r['fps']} "
                   f"| {r.get('x_reencode', '')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("clips", type=Path, nargs="+")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--reencode", action="store_true", help="also time a plain re-encode of each clip")
    ap.add_argument("--judge-every", type=int, default=5)
    ap.add_argument("--no-judge", action="store_true")
    ap.add_argument("--keep", action="store_true", help="reuse an output whose run report exists")
    ap.add_argument("--no-eval", action="store_true", help="anonymize (and time) only")
    a = ap.parse_args(argv)
    d = a.out_dir / a.tag
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in a.clips:
        name = clip.stem
        out = d / f"{name}.mp4"
        run_json, eval_json = d / f"{name}.run.json", d / f"{name}.eval.json"
        cmd = [*DEID, "anonymize", str(clip), str(out), "--overwrite", "--json", "-q", *extra]
        reenc_json = d / f"{name}.reencode.json"
        if not (a.keep and run_json.exists() and out.exists()):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: anonymize failed ({r.returncode}): {r.stderr.strip()[-400:]}", file=sys.stderr)
                continue
            run_json.write_text(r.stdout)
            if a.reencode:
                reenc_json.write_text(json.dumps({"seconds": reencode_seconds(clip, d / f".{name}.reenc.mp4")}))
        reenc = json.loads(reenc_json.read_text())["seconds"] if reenc_json.exists() else None
        if a.no_eval:
            print(f"{name}: {json.loads(run_json.read_text())['files'][0]['seconds']} s", file=sys.stderr)
            continue
        ecmd = [*DEID, "evaluate-video", str(clip), str(out), "--json", str(eval_json), "-q",
                "--strip", str(d / f"{name}.strip.png")]
        if not a.no_judge:
            ecmd += ["--judge", "dlib", "--judge-every", str(a.judge_every)]
        r = subprocess.run(ecmd, capture_output=True, text=True)
        if r.returncode not in (0,):
            print(f"{name}: evaluate-video failed ({r.returncode}): {r.stderr.strip()[-400:]}", file=sys.stderr)
            continue
        ev = json.loads(eval_json.read_text())["clips"][0]
        rows.append(_row(name, json.loads(run_json.read_text()), ev, reenc))
        print(to_markdown(rows[-1:]).splitlines()[-1], file=sys.stderr)
    (d / "table.json").write_text(json.dumps(rows, indent=1))
    (d / "table.md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
