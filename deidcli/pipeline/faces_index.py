"""``faces_index(src, out_dir, options)``: the people in a video, one picture per track (``deid faces``).

For each video (a file, or every video below a folder) the faces are detected and tracked as
``deid anonymize`` does (Pipeline.detect_and_track, the same options), and each track's best
detected face (gallery.quality: sharp, frontal, large, lit, inside the frame) is written as
pictures, with a contact sheet and a JSON index per video::

    OUT_DIR/<video>/track_003.png           the best face, ArcFace-aligned 112 px (what the identity network sees)
    OUT_DIR/<video>/track_003_context.png   the same face with its surroundings (at most 256 px)
    OUT_DIR/<video>/sheet.png               every track's context crop, id, first-last time, faces
    OUT_DIR/<video>/index.json              the video's tracks (fields: docs/faces.md)
    OUT_DIR/index.json                      every video folder's index below OUT_DIR, in one file

Each track's ``descriptor`` is the normalised mean of the identity network's L2-normalised
embeddings of its best faces (up to gallery.BEST_FACES; the network and arithmetic the anonymize
pipeline uses for its descriptors), so that reference photos can later be matched to tracks
without reading the video again.

Memory does not grow with the video's length: a track keeps only its best faces' small crops,
and a track not seen for a while is finished (pictures written, crops dropped). A video's folder
is written under a hidden temporary name and renamed into place when complete; an existing one
is skipped unless ``overwrite``.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DeidError, InputError, Interrupted, ModelError, OutputError
from ..options import DetectOptions, TrackOptions
from .report import FileResult, Progress

log = logging.getLogger(__name__)

#: The identity network whose embeddings make the tracks' descriptors.
EMBEDDER = "rec_mobilefacenet.onnx"
#: Format of index.json (raised when a field changes meaning).
INDEX_VERSION = 1
#: Most tracks drawn on one contact sheet (the most faces first); the index lists them all.
SHEET_MAX_TRACKS = 240


@dataclass(frozen=True)
class FacesOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N (the detector's ONNX Runtime provider)
    models_dir: Optional[Path] = None  # first place to look for model files
    overwrite: bool = False  # replace existing video folders (else they are skipped)
    detect: DetectOptions = field(default_factory=DetectOptions)
    track: TrackOptions = field(default_factory=TrackOptions)

    def __post_init__(self):
        if not 1 <= self.detect.detect_every <= self.track.max_gap + 1:
            raise ValueError(f"detect_every must be between 1 and max_gap + 1 = {self.track.max_gap + 1}, "
                             f"not {self.detect.detect_every}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models_dir"] = str(self.models_dir) if self.models_dir else None
        return d


def plan_videos(src: Path, out_dir: Path) -> list[tuple[Path, Path]]:
    """(video, its output folder) pairs: ``out_dir/<stem>`` for a file; for a folder, every video
    below it (anonymize.plan_jobs' walk) mirrored as ``out_dir/<relative path without extension>``
    (``<name>_<ext>`` where two videos would share a folder). Images are left out."""
    from ..media.probe import media_kind
    from .anonymize import plan_jobs

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file; OUT_DIR must be a folder (it is created if missing)")
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    if src.is_file():
        if media_kind(src) != "video":
            raise InputError(f"{src}: not a video file (by extension: .mp4 .mov .mkv .webm .avi .m4v)")
        return [(src, out_dir / src.stem)]
    found = [s for s, _ in plan_jobs(src, out_dir)]
    videos = [s for s in found if media_kind(s) == "video"]
    if len(found) > len(videos):
        log.warning("%s: %d image(s) left out: deid faces reads videos only", src, len(found) - len(videos))
    rels = [s.relative_to(src) for s in videos]
    stems = [r.with_suffix("") for r in rels]
    return [(s, out_dir / (st if stems.count(st) == 1 else r.with_name(f"{r.stem}_{r.suffix[1:]}")))
            for s, r, st in zip(videos, rels, stems)]


class _Models:
    """The detector (through a Pipeline, method blur: no generator) and the identity embedder,
    loaded on first use and kept for the run."""

    def __init__(self, options: FacesOptions):
        self.options = options
        self.pipeline = None
        self.embedder = None
        self.load_seconds = 0.0

    def get(self):
        if self.pipeline is None:
            from .. import weights
            from ..generator.embedder import IdentityEmbedder
            from ..generator.engine import onnx_providers
            from ..options import AnonymizeOptions
            from .pipeline import Pipeline

            t = time.perf_counter()
            o = self.options
            self.pipeline = Pipeline(AnonymizeOptions(method="blur", device=o.device, models_dir=o.models_dir,
                                                      detect=o.detect, track=o.track))
            self.embedder = IdentityEmbedder(weights.model_path(EMBEDDER, o.models_dir),
                                             onnx_providers(self.pipeline.runtime), "fp32")
            self.load_seconds = round(time.perf_counter() - t, 3)
        return self.pipeline, self.embedder


def faces_index(src, out_dir, options: Optional[FacesOptions] = None, progress: Optional[Progress] = None) -> dict:
    """Write one picture per face track of each video in ``src`` (a video file or a folder) into
    ``out_dir``, with a contact sheet and a JSON index per video, and ``out_dir/index.json``.

    Returns the run's report: ``videos`` (input, output folder, status ok | skipped | failed,
    error, frames, tracks, seconds), the counts, ``index`` (the path of out_dir/index.json),
    versions and options. A video that fails (unreadable, damaged beyond decoding) is recorded
    and the run goes on; a video with no face gets an empty track list. Raises InputError or
    OutputError when ``src`` or ``out_dir`` themselves are unusable, ModelError when a model file
    is missing, and on KeyboardInterrupt :class:`~deidcli.errors.Interrupted` with the report so
    far (the video in progress leaves nothing behind).
    """
    options = options or FacesOptions()
    progress = progress or Progress()
    src, out_dir = Path(src), Path(out_dir)
    jobs = plan_videos(src, out_dir)
    models = _Models(options)
    results: list[dict] = []

    def report() -> dict:
        from .anonymize import _versions
        from .jobs import counts

        p = models.pipeline
        return {"videos": results, **counts((r["status"] for r in results), ("ok", "skipped", "failed")),
                "index": str(out_dir / "index.json") if (out_dir / "index.json").is_file() else None,
                "device": p.runtime.device if p else None,
                "detector_precision": p.detector.precision if p else None,
                "load_seconds": models.load_seconds, "versions": _versions(), "options": options.to_dict()}

    try:
        if jobs:
            out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the folder ({e.strerror or e})") from e
    try:
        for s, d in jobs:
            results.append(_run_video(models, s, d, options, progress))
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        n = len(results)
        results.extend({"input": str(s), "output": str(d), "status": "interrupted" if i == n else "pending"}
                       for i, (s, d) in enumerate(jobs[n:], n))
        rep = report()
        rep["interrupted_by"] = signal.Signals(signum).name
        raise Interrupted(signum, rep) from None
    if jobs or out_dir.is_dir():
        try:
            _write_top_index(out_dir)
        except OSError as e:
            raise OutputError(f"{out_dir / 'index.json'}: cannot write ({e.strerror or e})") from e
    return report()  # "index": None where nothing was written (no video in src, out_dir not there)


def _run_video(models: _Models, src: Path, vdir: Path, options: FacesOptions, progress: Progress) -> dict:
    """One video: skipped when its folder exists (unless overwrite) or another deid run holds its
    lock (jobs.try_lock, as deid anonymize's outputs), else indexed into a temporary folder
    renamed into place. A failure is returned as status "failed"."""
    from .anonymize import _make_dirs
    from .jobs import lock_path, owner_text, read_owner, try_lock

    entry = {"input": str(src), "output": str(vdir), "status": "ok", "error": None}

    def skipped(why: str) -> dict:
        log.info("skip %s: %s", src, why)
        return {**entry, "status": "skipped", "error": why}

    def failed(msg: str) -> dict:
        log.error("%s", msg if msg.startswith((src.name, str(src), str(vdir))) else f"{src}: {msg}")
        return {**entry, "status": "failed", "error": msg}

    if vdir.exists() and not vdir.is_dir():
        return failed(f"{vdir}: exists and is not a folder")
    if vdir.exists() and not options.overwrite:
        return skipped("output exists (use --overwrite to replace it)")
    made: list[Path] = []
    stage = None
    try:
        made = _make_dirs(vdir.parent)
        lock = try_lock(vdir)
    except OSError as e:
        return failed(f"{vdir}: cannot create {e.filename or vdir.parent} ({e.strerror or e})")
    try:
        if lock is None:
            return skipped(owner_text(read_owner(lock_path(vdir))))
        with lock:
            if vdir.exists() and not options.overwrite:
                return skipped("output written by another deid run meanwhile")
            if lock.locked:  # what a killed run left for this folder
                for q in vdir.parent.glob(f".{vdir.name}.deid-*"):
                    if q.is_dir() and q.name.split(".deid-")[-1].startswith(("tmp-", "old-")):
                        log.warning("removed %s, left by a deid run that was killed", q)
                        shutil.rmtree(q, ignore_errors=True)
            from ..media.probe import probe

            info = probe(src)  # fail fast on unreadable input, before loading models
            pipeline, embedder = models.get()
            t0 = time.perf_counter()
            stage = vdir.with_name(f".{vdir.name}.deid-tmp-{secrets.token_hex(4)}")
            stage.mkdir()
            index = _index_video(pipeline, embedder, src, stage, info, options, progress)
            _replace_dir(stage, vdir)
            stage = None
            made = []
            log.info("done %s -> %s: %d track(s)", src, vdir, len(index["tracks"]))
            return {**entry, "frames": index["frames"], "tracks": len(index["tracks"]),
                    "seconds": round(time.perf_counter() - t0, 3)}
    except ModelError:
        raise
    except (DeidError, OSError) as e:
        return failed(str(e) if isinstance(e, DeidError) else f"{vdir}: {e.strerror or e}")
    except Exception as e:  # a bug or an unexpected library error: report it, go on
        log.debug("unexpected error", exc_info=True)
        return failed(f"{type(e).__name__}: {e}")
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in made:  # created for this video, left empty by a failure
            try:
                folder.rmdir()
            except OSError:
                break


def _replace_dir(stage: Path, vdir: Path) -> None:
    """Rename the finished ``stage`` folder to ``vdir``; an existing ``vdir`` (overwrite) is moved
    aside first and removed after, so ``vdir`` is always either the old folder or the new one."""
    old = None
    if vdir.exists():
        old = vdir.with_name(f".{vdir.name}.deid-old-{secrets.token_hex(4)}")
        os.rename(vdir, old)
    try:
        os.rename(stage, vdir)
    except BaseException:
        if old is not None:
            os.rename(old, vdir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _index_video(pipeline, embedder, src: Path, stage: Path, info, options: FacesOptions,
                 progress: Progress) -> dict:
    """Read ``src`` once, keep each track's best faces, write the pictures, the sheet and
    index.json into ``stage``. Returns the video's index."""
    from ..media.reader import VideoReader
    from .gallery import TrackFaces, measure_face

    fps = float(info.average_rate) if info.average_rate else None
    reader = VideoReader(src)
    result = FileResult(input=str(src), output=str(stage))
    tracks: dict[int, TrackFaces] = {}
    last_seen: dict[int, int] = {}
    entries: dict[int, dict] = {}
    # a track not in the tracker's output for this many frames has ended (its gaps are at most
    # max_gap frames, its held ends pad frames): its pictures are written and its crops dropped
    idle = 4 * (options.track.max_gap + options.track.pad + options.detect.detect_every) + 30
    n_frames, first_time, last_time, size = 0, None, None, None
    progress.start_file(src, info.frames or None)
    try:
        for vf, faces in pipeline.detect_and_track(iter(reader), result, fps):
            n_frames += 1
            if first_time is None:
                first_time, size = vf.time, vf.image.shape[:2]
            last_time = vf.time
            for f in faces:
                last_seen[f.track_id] = vf.index
                if f.interpolated or f.held:  # filled in by the tracker: not a picture of the person
                    continue
                t = tracks.setdefault(f.track_id, TrackFaces(f.track_id))
                t.add(vf.image, measure_face(vf.image, vf.index, vf.time, f.box, f.kps, f.score))
            if vf.index % 30 == 0:
                for tid, t in tracks.items():
                    if not t.done and last_seen[tid] < vf.index - idle:
                        entries[tid] = _finish_track(t, embedder, stage)
            progress.advance(1)
    finally:
        progress.end_file()
    for tid, t in tracks.items():
        if not t.done:
            entries[tid] = _finish_track(t, embedder, stage)
        else:  # seen again after it was finished (should not happen): counts and last face updated
            entries[tid].update(_times(t))
    track_list = [entries[k] for k in sorted(entries)]
    from .. import __version__

    index = {
        "index_version": INDEX_VERSION,
        "deid": __version__,
        "models": {"detector": options.detect.detector, "detector_precision": pipeline.detector.precision,
                   "embedder": EMBEDDER},
        "descriptor": (f"normalised mean of the L2-normalised {EMBEDDER} embeddings (fp32) of the ArcFace crops "
                       f"of each track's best faces (at most {_best_faces()})"),
        "input": str(src),
        "frames": n_frames,
        "fps": round(fps, 6) if fps else None,
        "width": int(size[1]) if size else None,
        "height": int(size[0]) if size else None,
        "first_time": None if first_time is None else round(first_time, 3),
        "last_time": None if last_time is None else round(last_time, 3),
        "decode_errors": reader.decode_errors,
        "sheet": "sheet.png",
        "options": options.to_dict(),
        "tracks": track_list,
    }
    _write_sheet(stage, src.name, track_list, n_frames)
    from .jobs import write_json_atomic

    write_json_atomic(stage / "index.json", index)
    return index


def _best_faces() -> int:
    from .gallery import BEST_FACES

    return BEST_FACES


def _times(t) -> dict:
    r = lambda v: None if v is None else round(float(v), 3)  # noqa: E731
    return {"first_frame": t.first[0], "last_frame": t.last[0], "first_time": r(t.first[1]),
            "last_time": r(t.last[1]), "faces": t.faces}


def _finish_track(t, embedder, stage: Path) -> dict:
    """Embed the track's best faces, write its pictures into ``stage``, drop its crops."""
    from ..media.images import write_image

    best = t.best_face()
    crops = t.best_crops()
    emb = embedder.embed(crops)
    mean = emb.mean(0)
    desc = mean / max(float(np.linalg.norm(mean)), 1e-12)
    name = f"track_{t.track_id:03d}"
    write_image(stage / f"{name}.png", crops[0])
    write_image(stage / f"{name}_context.png", t.context)
    t.best, t.context, t.done = [], None, True
    return {"id": t.track_id, **_times(t), "crop": f"{name}.png", "context": f"{name}_context.png",
            "context_box": t.context_box,
            "best": best.to_dict(), "descriptor": [round(float(v), 6) for v in desc],
            "descriptor_faces": len(crops),
            # how alike its best faces are (lowest cosine of one to the descriptor): low for a
            # track whose person changed (a tracker swap)
            "descriptor_min_cos": round(float((emb @ desc).min()), 4)}


def _write_sheet(stage: Path, title: str, tracks: list[dict], frames: int) -> None:
    from ..media.images import read_image, write_image
    from .gallery import clock, sheet

    shown = sorted(tracks, key=lambda e: -e["faces"])[:SHEET_MAX_TRACKS]
    shown.sort(key=lambda e: e["id"])
    tiles = [(read_image(stage / e["context"]),
              [f"#{e['id']}  {e['faces']} faces", f"{clock(e['first_time'])}-{clock(e['last_time'])}"],
              e["context_box"])
             for e in shown]
    more = f", {len(tracks) - len(shown)} more in index.json" if len(tracks) > len(shown) else ""
    write_image(stage / "sheet.png", sheet(tiles, f"{title}: {len(tracks)} track(s), {frames} frames{more}"))


def _write_top_index(out_dir: Path) -> None:
    """out_dir/index.json: every video folder's index.json below out_dir (this run's and earlier
    ones'), each with its folder relative to out_dir."""
    import json

    from .. import __version__
    from .jobs import write_json_atomic

    videos = []
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "index.json" in files and Path(root) != out_dir:
            try:
                with open(Path(root) / "index.json") as f:
                    v = json.load(f)
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable, left out of %s (%s)", Path(root) / "index.json", out_dir / "index.json", e)
                continue
            videos.append({"dir": str(Path(root).relative_to(out_dir)), **v})
    write_json_atomic(out_dir / "index.json", {"index_version": INDEX_VERSION, "deid": __version__,
                                               "videos": videos})
