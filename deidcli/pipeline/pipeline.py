"""The per-file pipeline: detect and track faces, route them, generate or blur, paste back,
and hand frames to the encoder (deidcli.media)."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..faces.detect import rects_meet
from ..options import AnonymizeOptions
from ..stages import NULL, QUEUE_FRAMES, Stages, prefetch
from .descriptors import Descriptors, describe_new
from .face_check import blotched_faces, lost_faces, overlapping_faces
from .people import DECIDE_FACES, LFW_FAR_THRESHOLD
from .report import FileResult, PassLevels, new_check_stats

log = logging.getLogger(__name__)

#: Most frames held waiting for a generator batch to fill (bounds latency and memory).
MAX_PENDING_FRAMES = 64
#: The first generator batch of a video holds batch_size // FIRST_BATCH_DIVISOR faces, each next
#: one twice as many, up to batch_size (Pipeline.process_frames).
FIRST_BATCH_DIVISOR = 4
#: A track whose last CALM_FACES checked faces all came out at least CALM_MARGIN under
#: --check-thresh is checked on every other face only (until a check comes out closer): most of
#: the check's cost goes to tracks the generator handles with room to spare.
CALM_FACES = 8
CALM_MARGIN = 0.1
#: The identity check also fails a face whose output ArcFace crop differs from the input's by less
#: than this mean absolute difference (0-255): a generated face so faint that the paste left the
#: face nearly as it was (flat, hazy faces under tone matching), which deid evaluate-video counts
#: as unchanged below 2.0.
CHECK_MIN_CHANGE = 2.2
#: --keep-detail pastes the generated face's change at this many times the generator's crop size
#: (256 px for the 128 px generator): the frame keeps only what is finer than that. The ArcFace
#: square an identity network sees at 112 px spans 183 px of a 256 crop, so what is kept lies
#: above what such a network resolves. Measured on sadtalker_WDA and lp_d13, one pass, identity
#: network on the frame's ArcFace crop: keeping everything finer than the 128 crop raised the
#: mean cosine to the person by 0.09 and 0.06; at 256, by 0.03 and 0.02, with 87% and 99% of
#: the input's fine detail (mean |Laplacian|) where the mask is full (plain paste: 31% and 26%).
DETAIL_SCALE = 2


class Pipeline:
    """Models loaded once and reused across the files of a run."""

    #: With --search-every N > 1, search a file's last frame whatever its place in the cycle, so a
    #: face that came in after the last search is found (and looked for backwards). This needs to
    #: know which frame is last, one frame ahead; live streams (pipeline/live.py) do not wait for it.
    SEARCH_LAST = True

    def __init__(self, options: AnonymizeOptions, render: bool = True):
        """``render`` False: only detection, tracking and the --keep / --only decisions
        (:meth:`decide_tracks`, the dry run); the generator and the check's network are not loaded."""
        from .. import weights
        from ..generator.embedder import IdentityEmbedder
        from ..generator.engine import GeneratorRunner, onnx_providers, resolve_runtime
        from ..faces.detect import Detector

        self.options = options
        self.runtime = resolve_runtime(options.device, options.fp16)
        for w in self.runtime.warnings:
            log.warning(w)
        providers = onnx_providers(self.runtime)
        d = options.detect
        # The detector reports faces down to keep_thresh; only those >= det_thresh start a track
        # (see faces.Tracker): real faces whose score sags between frames stay anonymized. Those
        # under det_thresh are looked at again zoomed (Detector.zoom_score): small faces the
        # frame-sized look scores low in every frame start tracks too.
        self.detector = Detector(weights.model_path(d.detector, options.models_dir),
                                 det_thresh=min(d.det_thresh, options.track.keep_thresh),
                                 det_size=d.det_size, min_face=d.min_face, providers=providers,
                                 precision=d.precision, rescore_below=d.det_thresh if d.zoom_weak else 0.0)
        self.runner = None
        self.embedder = None
        self.detail = 0  # align.paste(detail=): DETAIL_SCALE x the generator's crop with --keep-detail
        if options.method == "generate" and render:
            ckpt = weights.generator_path(options.weights)  # clear ModelError before importing torch models
            from ..generator.model import load_generator

            gen = load_generator(ckpt, device="cpu")
            self.runner = GeneratorRunner(gen, self.runtime, options.batch_size,
                                          colour_match=options.colour_match,
                                          first_pass_mouth=options.first_pass_mouth,
                                          eye_pass=options.eye_pass)
            self.detail = DETAIL_SCALE * self.runner.size if options.keep_detail else 0
            self.embedder = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", options.models_dir),
                                             providers, options.check_precision if options.identity_check
                                             else "fp32")
        # --keep / --only / --target (people.py): the references are loaded and checked here, before
        # any input is opened; their descriptors and the track decisions use the fp32 network (embed).
        self.people: list = []
        self.targets: list = []
        if options.keep or options.only or options.target:
            from .people import load_people, load_targets

            self._ref_embedder = self.embedder or IdentityEmbedder(
                weights.model_path("rec_mobilefacenet.onnx", options.models_dir), providers, "fp32")
            if options.keep or options.only:
                self.people = load_people(options.keep or options.only, self.detector, self._ref_embedder,
                                          d.det_thresh)
            if options.target:
                self.targets = load_targets(options.target, self.detector, self._ref_embedder, d.det_thresh)

    # -- rendering -------------------------------------------------------------------------
    def render(self, items: Sequence[tuple[np.ndarray, Sequence]], descriptors: dict,
               stages: Stages = NULL, passes: Optional[PassLevels] = None, stats: Optional[dict] = None,
               router=None) -> list[list]:
        """Anonymize a batch of frames in place.

        items: (image (H, W, 3) uint8 RGB, faces) pairs; faces have track_id, box, kps, interpolated.
        descriptors: track_id -> (D,) float32, filled in here for tracks seen for the first time.
        passes: generator passes per track, raised here by the identity check (one per video).
        stats: identity-check counters (see new_check_stats), updated here.
        router: which faces are generated and which get the fallback (routing.Router, one per video).
        Returns, per item, the list of touched rectangles.

        With ``generate`` this is :meth:`generate` then :meth:`finish`, which process_frames runs
        in two threads (the next batch is generated while this one is checked and pasted).
        """
        from ..faces.methods import apply_classic

        o = self.options
        if o.method != "generate":
            with stages("blend"):
                return [apply_classic(img, faces, o.method, o.margin) for img, faces in items]
        passes = self.new_pass_levels() if passes is None else passes
        router = self.new_router() if router is None else router
        return self.finish(items, self.generate(items, descriptors, stages, passes, router), stages, passes, stats,
                           router)

    def generate(self, items: Sequence[tuple[np.ndarray, Sequence]], descriptors: dict, stages: Stages = NULL,
                 passes: Optional[PassLevels] = None, router=None) -> Optional["_Generated"]:
        """First half of :meth:`render` (method generate): align every face of ``items``, decide
        which the generator draws (``router``, routing.py; the others get the fallback in
        :meth:`finish`), describe their new tracks and run the generator at each face's pass
        count. Reads the images, changes nothing in them. None when there is no face."""
        from ..faces.align import estimate_transform, feather, warp_crop
        from .routing import face_height, measure, yaw

        passes = self.new_pass_levels() if passes is None else passes
        router = self.new_router() if router is None else router
        S, margin = self.runner.size, self.runner.margin
        jobs, crops, held = [], [], []
        with stages("align"):
            for i, (img, faces) in enumerate(items):
                for f in faces:
                    if f.held:  # where the face may be, past its track: not drawn there
                        held.append((i, f, "held"))
                        continue
                    M = estimate_transform(f.kps, S, margin)
                    crop = warp_crop(img, M, S)
                    light, sharp = measure(crop, sharpness=router.soft_fraction > 0)
                    path = router.decide(f.track_id, face_height(f.box), yaw(f.kps), light, sharp)
                    if path != "generated":
                        held.append((i, f, path))
                        continue
                    jobs.append((i, M, f))
                    crops.append(crop)
        if not jobs and not held:
            return None
        drawn: list[list] = [[] for _ in items]  # per item, the faces the generator draws
        for i, _, f in jobs:
            drawn[i].append(f)
        with stages("identity"):  # only the tracks the generator draws need a descriptor
            describe_new(descriptors, self.embedder, [(img, fs) for (img, _), fs in zip(items, drawn)])
        tracks = [f.track_id for _, _, f in jobs]
        desc = np.stack([descriptors[t] for t in tracks]).astype(np.float32) if jobs else np.zeros((0, 128), np.float32)
        cond = self.conditioning(tracks, desc)
        crops = np.stack(crops) if jobs else np.zeros((0, S, S, 3), np.uint8)
        levels = np.array([router.level(passes.take(t), face_height(f.box)) for t, (_, _, f) in zip(tracks, jobs)],
                          np.int64)
        with stages("generate"):
            raw, mask = self.runner.run(crops, cond, levels)
        return _Generated(jobs, crops, desc, tracks, levels, raw, [feather(m, S) for m in mask], [None] * len(jobs),
                          held, cond, descriptors=descriptors)

    def conditioning(self, tracks: Sequence, desc: np.ndarray) -> np.ndarray:
        """The descriptors (N, D) float32 the generator is conditioned on for faces of ``tracks``
        whose own track descriptors are ``desc`` (N, D): ``desc`` itself, or with --target each
        track's target (people.target_of) steered into it (people.steer_descriptor). The identity
        check compares the output with ``desc``, the person, either way."""
        if not self.targets or not len(desc):
            return desc
        from .people import steer_descriptor, target_of

        return steer_descriptor(desc, np.stack([target_of(t, self.targets).descriptor for t in tracks]))

    def finish(self, items: Sequence[tuple[np.ndarray, Sequence]], gen: Optional["_Generated"],
               stages: Stages = NULL, passes: Optional[PassLevels] = None, stats: Optional[dict] = None,
               router=None) -> list[list]:
        """Second half of :meth:`render`: the identity check (``--identity-check``) on ``gen``
        (from :meth:`generate` on the same ``items``), then paste every generated face into its
        image, then give the others the fallback (last, so that nothing is pasted over it).
        Returns, per item, the list of touched rectangles."""
        from ..faces.align import arcface_crop, paste, put_region
        from ..faces.methods import apply_classic, ellipse_mask
        from .routing import face_height

        o = self.options
        passes = self.new_pass_levels() if passes is None else passes
        stats = new_check_stats() if stats is None else stats
        router = self.new_router() if router is None else router
        rects: list[list] = [[] for _ in items]
        if gen is None:
            return rects
        fallback = np.zeros(len(gen.jobs), bool)
        if o.identity_check and len(gen.jobs):
            fallback = self._check_identity(gen, passes, stats, stages, items, router)
        with stages("blend"):  # the blotch guard (face_check.py)
            blotched = blotched_faces(gen.crops, gen.raw, gen.masks, np.flatnonzero(~fallback))
        for j in blotched:
            fallback[j] = True
            router.failed_check(gen.tracks[j], "blotch")
        stats["blotch"] += len(blotched)
        covered = list(gen.held) + [(i, f, "blotch" if j in blotched else "check")
                                    for j, (i, _, f) in enumerate(gen.jobs) if fallback[j]]
        pasted = [j for j in range(len(gen.jobs)) if not fallback[j]]
        overlaps = (overlapping_faces(gen.jobs, pasted, [(i, f) for i, f, _ in covered if not f.held])
                    if o.identity_check else [])
        # the input faces' embeddings: the check's where it made them, else from the frames as they came
        own = np.zeros((len(overlaps), gen.desc.shape[1]), np.float32)
        missing = [k for k, j in enumerate(overlaps) if gen.own is None or not gen.own[j].any()]
        for k, j in enumerate(overlaps):
            if k not in missing:
                own[k] = gen.own[j]
        before = [arcface_crop(items[gen.jobs[overlaps[k]][0]][0], gen.jobs[overlaps[k]][2].kps) for k in missing]
        with stages("blend"):
            for j in pasted:
                (i, M, f), r, m = gen.jobs[j], gen.raw[j], gen.masks[j]
                region = gen.regions[j]
                if region is not None and not any(rects_meet(region[0], b) for b in rects[i]):
                    # what the check embedded, computed on this frame as it still is here
                    box = put_region(items[i][0], region)
                else:  # no check, or a face already pasted in this frame overlaps it
                    box = paste(items[i][0], r, m, M, self.detail)
                if box is not None:
                    rects[i].append(box)

        def cover(faces: list) -> None:
            """Give ``faces`` ((item, face, path) each) the fallback, drawn over what is pasted."""
            with stages("blend"):
                for i, f, path in faces:
                    router.count(path, face_height(f.box))
                    img = items[i][0]
                    # a held face (where a face may still be, past its track) is not covered over the
                    # faces seen in its frame: it is behind them if it is there at all (stress set
                    # crowd_lfw: held blur over half of a generated face next to it). What is kept of
                    # them is the ellipse through their box's corners, not the box: a box's straight
                    # edges across a blur read as a painted patch (crowd_1080: 2 garish faces)
                    seen = [em for g in items[i][1] if f.held and not g.held
                            and (em := ellipse_mask(img.shape, g.box, None, CORNER_MARGIN)) is not None]
                    saved = [img[y0:y1, x0:x1].copy() for (x0, y0, x1, y1), _ in seen]
                    rects[i].extend(apply_classic(img, [f], o.fallback, o.margin, _other_boxes(items[i][1], f)))
                    for ((x0, y0, x1, y1), m), px in zip(seen, saved):
                        keep = m > 0
                        img[y0:y1, x0:x1][keep] = px[keep]

        cover(covered)  # before the second look: a cover can leave a face it overlaps recognizable
        covered = []
        if overlaps:  # the check once more, on the frame as the pastes and covers left it
            with stages("identity"):
                after = [arcface_crop(items[gen.jobs[j][0]][0], gen.jobs[j][2].kps) for j in overlaps]
                e = self.embedder.embed_check(before + after)
                own[missing], out = e[:len(missing)], e[len(missing):]
                cos = np.maximum(np.einsum("nd,nd->n", out, own), np.einsum("nd,nd->n", out, gen.desc[overlaps]))
            stats["overlap_checked"] += len(overlaps)
            for j, c in zip(overlaps, cos):
                if c >= o.check_thresh:
                    fallback[j] = True
                    covered.append((gen.jobs[j][0], gen.jobs[j][2], "check"))
                    router.failed_check(gen.tracks[j])
                    stats["overlap_failed"] += 1
        cover(covered)
        # the face check (face_check.py) on the frames as they now are: a generated face the
        # detector no longer finds gets the fallback after all
        shown = [j for j in pasted if not fallback[j]]
        if o.identity_check and shown:
            with stages("identity"):
                lost = lost_faces(self.detector, items, [gen.jobs[j] for j in shown], router.failed_on("lost"))
            stats["lost"] += len(lost)
            with stages("blend"):
                for k in lost:
                    i, _, f = gen.jobs[shown[k]]
                    rects[i].extend(apply_classic(items[i][0], [f], o.fallback, o.margin,
                                                  _other_boxes(items[i][1], f)))
                    router.failed_check(f.track_id, "lost")
                    router.count("lost", face_height(f.box))
            gone = set(lost)
            shown = [j for k, j in enumerate(shown) if k not in gone]
        for j in shown:
            router.count("generated", face_height(gen.jobs[j][2].box))
        return rects

    def new_chooser(self):
        """Per-file track decisions for --keep / --only (people.Chooser), or None without them."""
        from .people import Chooser

        if not self.people:
            return None
        return Chooser("keep" if self.options.keep else "only", self.people, self._ref_embedder)

    def new_router(self):
        """Per-file routing state (routing.Router): which faces are generated, which get the fallback."""
        from .routing import new_router

        return new_router(self.options)

    def new_pass_levels(self) -> PassLevels:
        """Per-file pass counts: ``--passes``, raised by the identity check for ``--pass-hold`` faces."""
        return PassLevels(self.options.passes, self.options.pass_hold)

    def _check_identity(self, gen: "_Generated", passes: PassLevels, stats: dict, stages: Stages,
                        items: Sequence[tuple[np.ndarray, Sequence]], router) -> np.ndarray:
        """The identity check (``--identity-check``): embed every generated face as it will be
        pasted (feathered mask; with ``--keep-detail``, the ArcFace crop of the frame as the paste
        will leave it, align.pasted_region + region_arcface, since the frame's own finer detail stays,
        after a JPEG stand-in for what the encoder at ``--crf`` takes away, encode_loss.py) and compare
        it with its track's descriptor and with the input face of the same frame (a pose far from
        the track's first faces can be closer to the input than to the descriptor). A face whose
        higher cosine is >= ``check_thresh``, or whose ArcFace crop differs from the input's by less
        than :data:`CHECK_MIN_CHANGE` (a faint face), is generated again with one more pass, up to
        ``max_passes`` (``small_max_passes`` for a face under routing.LARGE_FACE px), and its track
        keeps the higher count for the next ``pass_hold`` of its faces (0: for good; see
        PassLevels). A face still too close after its most passes gets the fallback (blur), and so
        do its track's next ``pass_hold`` faces (routing.Router.failed_check): more passes are what
        draw masks on a face. A face generated with fewer passes than its track has
        reached meanwhile (the batch was generated while an earlier one was checked) is generated
        again at the track's count first. Updates ``gen`` in place; returns the faces to blur
        (bool per face)."""
        from ..faces.align import feather
        from .routing import face_height

        o = self.options
        S = self.runner.size
        crops, desc, tracks, levels, raw, masks = gen.crops, gen.desc, gen.tracks, gen.levels, gen.raw, gen.masks
        cond = gen.desc if gen.cond is None else gen.cond  # what the generator is fed (--target), desc: the person
        from .encode_loss import quality_for

        heights = [face_height(f.box) for _, _, f in gen.jobs]
        most = np.array([router.passes_for(h) for h in heights], np.int64)
        quality = [quality_for(o.encode.crf, h) for h in heights]  # the encoder's stand-in, per face
        fallback = np.zeros(len(crops), bool)

        def regenerate(idx: np.ndarray) -> None:
            """Run the generator again on faces ``idx`` at their levels and conditioning."""
            with stages("generate"):
                r, m = self.runner.run(crops[idx], cond[idx], levels[idx])
            for j, rj, mj in zip(idx, r, m):
                masks[j] = feather(mj, S)
                raw[j] = rj

        behind = np.flatnonzero([router.level(passes.get(t), h) > lv for t, lv, h in zip(tracks, levels, heights)])
        if len(behind):
            levels[behind] = [router.level(passes.get(tracks[j]), heights[j]) for j in behind]  # not counted: no check asked
            regenerate(behind)

        def refresh() -> None:
            """Generate again, at their passes, the faces whose track's descriptor was revised
            (pipeline/descriptors.py) since they were generated, with the new one."""
            now = gen.descriptors
            if not isinstance(now, Descriptors) or not now.revisions:
                return
            stale = np.array([j for j, t in enumerate(tracks) if t in now.revisions and not np.array_equal(desc[j], now[t])],
                             np.int64)
            if not len(stale):
                return
            desc[stale] = np.stack([now[tracks[j]] for j in stale])
            cond[stale] = self.conditioning([tracks[j] for j in stale], desc[stale])
            regenerate(stale)

        refresh()
        todo = np.arange(len(crops))
        skip = calm_skips(tracks, passes.calm, passes.calm_turn, behind)
        if skip.any():
            todo = np.flatnonzero(~skip)
            stats["skipped"] += int(skip.sum())
        frames = [items[i][0] for i, _, _ in gen.jobs]
        if self.detail:
            from ..faces.align import arcface_crop, pasted_region, region_arcface
            from .encode_loss import encoded_region

            def seen(idx):
                """Embeddings of the faces as the output frame will show them (finish writes the same
                pixels) after a stand-in for the encoder's loss (encode_loss.py), and their ArcFace
                crops as written (for the faint test: JPEG's own noise is no change)."""
                for j in idx:
                    gen.regions[j] = pasted_region(frames[j], raw[j], masks[j], gen.jobs[j][1], self.detail)
                c112 = [region_arcface(frames[j], gen.regions[j], gen.jobs[j][2].kps) for j in idx]
                enc = [c if quality[j] is None else
                       region_arcface(frames[j], encoded_region(gen.regions[j], quality[j]), gen.jobs[j][2].kps)
                       for c, j in zip(c112, idx)]
                return self.embedder.embed_check(enc), np.stack(c112)

            def input_crop(j):
                return arcface_crop(frames[j], gen.jobs[j][2].kps)
        else:
            from ..faces.align import arcface_squares, blend_crops

            def seen(idx):
                squares = arcface_squares(blend_crops(crops[idx], raw[idx], [masks[j] for j in idx]), S,
                                          self.runner.margin)
                return self.embedder.embed_check(squares), np.stack(squares)
            input_crop = None
        own = np.zeros((len(crops), desc.shape[1]), np.float32)
        own112 = np.zeros((len(crops), 112, 112, 3), np.uint8)
        # A face the detector scored under the start threshold (found back over frames it barely
        # saw, kept at a low score, filled in) is raised or given the fallback on its own, and
        # leaves its track as it was: the stress set's fadein had its first face (found back at
        # 0.38, blurred and dark) fail at 4 passes, which put the 25 sharp faces after it on the
        # fallback and the rest of the track at 4 passes.
        weak = np.array([f.score < o.detect.det_thresh for _, _, f in gen.jobs], bool)

        def check(todo: np.ndarray) -> set:
            """The check's rounds over the faces ``todo``; returns the tracks of those that failed
            the first round."""
            with stages("identity"):
                own[todo], own112[todo] = self._own_embeddings(gen, todo, input_crop)
            if isinstance(gen.descriptors, Descriptors):
                revised = 0
                for j in todo:
                    f = gen.jobs[j][2]
                    revised += gen.descriptors.observe(tracks[j], own[j], float(f.score), face_height(f.box))
                if revised:
                    stats["redescribed"] += revised
                    refresh()
            failed = None
            while len(todo):
                with stages("identity"):
                    emb, out112 = seen(todo)
                    cos = np.maximum(np.einsum("nd,nd->n", emb, desc[todo]), np.einsum("nd,nd->n", emb, own[todo]))
                    change = np.abs(out112.astype(np.int16) - own112[todo].astype(np.int16)).mean((1, 2, 3))
                stats["checked"] += len(todo)
                stats["cos_max"] = max(stats["cos_max"], float(cos.max()))
                faint = change < CHECK_MIN_CHANGE
                stats["faint"] += int(faint.sum())
                for j, c, f in zip(todo, cos, faint):
                    t = tracks[j]
                    passes.calm[t] = passes.calm.get(t, 0) + 1 if c < o.check_thresh - CALM_MARGIN and not f else 0
                again = (cos >= o.check_thresh) | faint
                todo, cos, faint = todo[again], cos[again], faint[again]
                if failed is None:
                    failed = {tracks[j] for j in todo}
                if not len(todo):
                    break
                top = levels[todo] >= most[todo]
                # The fallback, unless it would itself be recognized (the network verifies at
                # LFW_FAR_THRESHOLD) and the generated face is further from the person: a blur of a
                # face the input already shows blurred keeps what the network sees of it (stress set
                # mosaic3_blur: a 45 px face in motion blur, verified at up to 0.71 once blurred).
                further = np.ones(len(todo), bool)
                closer = np.flatnonzero(top & ~faint)
                if len(closer):
                    with stages("identity"):
                        fb = self._fallback_cos(gen, todo[closer], items, quality, desc, own)
                    further[closer] = (fb < LFW_FAR_THRESHOLD) | (fb <= cos[closer])
                stats["fallback_closer"] += int((top & ~further).sum())
                fallback[todo[top & further]] = True
                for j in todo[top & further]:
                    if not weak[j]:
                        router.failed_check(tracks[j])
                up = todo[~top]
                levels[up] += 1
                stats["regenerated"] += len(up)
                for j in up:
                    if not weak[j]:
                        passes.raise_to(tracks[j], int(levels[j]))
                todo = up
                if not len(todo):
                    break
                regenerate(todo)
            return failed or set()

        failed = check(todo)
        # A calm track's faces left unchecked in a batch where one of its checked faces failed are
        # checked after all: its person may have changed (a tracker swap at a crossing, a cut at
        # the same place), and the generator still draws from the track's first person (stress set
        # crowd_lfw: an unchecked face between two failed ones came out nearly unchanged).
        late = np.setdiff1d(np.flatnonzero([t in failed for t in tracks]), todo)
        if len(late):
            stats["skipped"] -= len(late)
            check(late)
        stats["fallback"] += int(fallback.sum())
        gen.own = own  # rows of the faces checked; zero for the others
        return fallback

    def _fallback_cos(self, gen: "_Generated", idx: np.ndarray, items: Sequence,
                      quality: Sequence, desc: np.ndarray, own: np.ndarray) -> np.ndarray:
        """The check's cosine (the higher of track descriptor and input face) of faces ``idx`` of
        ``gen`` given the ``--fallback`` instead (in their frames of ``items``), seen through the
        encoder's stand-in at ``quality[j]`` as the generated faces are (encode_loss.py)."""
        from ..faces.align import region_arcface
        from ..faces.methods import classic_region
        from .encode_loss import encoded_region

        o = self.options
        c112 = []
        for j in idx:
            i, _, f = gen.jobs[j]
            frame, faces = items[i]
            region = classic_region(frame, f, o.fallback, o.margin, _other_boxes(faces, f))
            c112.append(region_arcface(frame, encoded_region(region, quality[j]), f.kps))
        e = self.embedder.embed_check(c112)
        return np.maximum(np.einsum("nd,nd->n", e, desc[idx]), np.einsum("nd,nd->n", e, own[idx]))

    def _own_embeddings(self, gen: "_Generated", idx: np.ndarray, crop112) -> tuple[np.ndarray, np.ndarray]:
        """(len(idx), D) embeddings of the input faces ``idx`` of ``gen`` for the identity check and
        their (len(idx), 112, 112, 3) uint8 ArcFace crops. Each face's own frame: reusing a track's
        embedding of a few frames before let faces through where the expression changes fast
        (stress set, lp_d6 in a 3x3 mosaic: frames 1-3 compared with frame 0's face, verified at
        cosine 0.34-0.52).
        ``crop112(j)``: face j's 112 px input crop, or None for the generator crops' squares
        (align.arcface_squares, as in training)."""
        from ..faces.align import arcface_squares

        if not len(idx):
            return np.zeros((0, gen.desc.shape[1]), np.float32), np.zeros((0, 112, 112, 3), np.uint8)
        c112 = np.stack([crop112(j) for j in idx] if crop112 is not None
                        else arcface_squares(gen.crops[idx], self.runner.size, self.runner.margin))
        return self.embedder.embed_check(list(c112)), c112

    # -- one video ---------------------------------------------------------------------------
    def detect_and_track(self, frames: Iterator, result: FileResult, fps: Optional[float],
                         stages: Stages = NULL) -> Iterator:
        """(frame, faces) for every decoded frame, in order, once its faces are final (the tracker
        looks up to ``max_gap`` frames ahead to fill detector misses)."""
        from ..faces.looks import Looks
        from ..faces.track import Tracker

        tracker = Tracker(self.options.track, fps=fps, start_thresh=self.options.detect.det_thresh)
        pending: deque = deque()  # decoded frames whose faces are not final yet
        small0, raised0 = self.detector.n_small, self.detector.n_raised
        every = self.options.detect.detect_every
        # --search-every works with a detector on every frame only
        looks = Looks(self.detector, self.options.detect.search_every if every == 1 else 1)

        def earlier(index):
            k = index - pending[0].index if pending else -1
            return pending[k].image if 0 <= k < len(pending) else None

        def take(final):
            for idx, faces in final:
                vf = pending.popleft()
                assert vf.index == idx, (vf.index, idx)
                yield vf, faces

        for vf, last in _with_last(frames, self.SEARCH_LAST and looks.every > 1):
            if tracker.frame_size is None:
                tracker.frame_size = (vf.image.shape[1], vf.image.shape[0])
            dets, searched, history, cut = None, True, None, False
            if vf.index % every == 0:
                with stages("detect"):
                    dets, searched, history, cut = looks.look(vf.index, vf.image, tracker, earlier, last=last)
            else:
                result.frames_not_detected += 1
            pending.append(vf)
            with stages("track"):
                final = tracker.push(vf.index, dets, searched=searched, history=history, cut=cut)
            yield from take(final)
        with stages("track"):
            final = tracker.flush()
        yield from take(final)
        assert not pending, f"{len(pending)} frames left untracked"
        result.tracks = tracker.n_tracks
        result.faces_detected = tracker.n_detections - tracker.n_weak_dropped
        result.faces_kept_low_score = tracker.n_weak_kept
        result.faces_predicted = tracker.n_predicted
        result.faces_below_min_size = self.detector.n_small - small0
        result.faces_raised_zoomed = self.detector.n_raised - raised0
        for key, value in looks.stats.items():
            setattr(result, key, value)
        result.faces_found_back = tracker.n_found_back

    def process_frames(self, frames: Iterator, result: FileResult, fps: Optional[float],
                       stages: Stages = NULL, threads: bool = True, queue_frames: int = QUEUE_FRAMES,
                       max_pending: int = MAX_PENDING_FRAMES, render: bool = True) -> Iterator:
        """Transform decoded frames into (frame, image, rects), in order (see video.transcode_video).

        Detection and tracking run in their own thread (``threads``), a few frames ahead of
        rendering, which batches faces across frames for the generator. With ``generate`` the
        generator runs in a thread of its own too, one batch ahead of the identity check and the
        pasting (Pipeline.generate / Pipeline.finish).

        ``queue_frames`` (frames detection may run ahead of rendering) and ``max_pending`` (most
        frames in one generator batch) bound how long a frame waits inside; deid live lowers both
        (pipeline/live.py).

        ``render`` False: the frames come out as decoded (no rectangles), in the same batches, so
        the --keep / --only decisions are the ones a run makes (:meth:`decide_tracks`).
        """
        tracked = self.detect_and_track(frames, result, fps, stages)
        if threads:
            tracked = prefetch(tracked, queue_frames, "deid-detect")
        descriptors = Descriptors()
        passes = self.new_pass_levels()
        router = self.new_router()
        check = new_check_stats()
        generate = self.options.method == "generate"
        batch_faces = self.options.batch_size if generate else 1
        chooser = self.new_chooser()
        if chooser is not None:  # batches long enough to give a new track DECIDE_FACES faces, where it has them
            batch_faces = max(batch_faces, 2 * DECIDE_FACES)

        def chosen(ready: list) -> list:
            """--keep / --only: the batch without the faces of the tracks left untouched (decided
            here, before any of the batch is rendered; the encoder keeps their decoded pixels)."""
            if chooser is None:
                return ready
            with stages("identity"):
                faces = chooser.choose([(vf.index, vf.image, fs) for vf, fs in ready], [vf.time for vf, _ in ready])
            return [(vf, fs) for (vf, _), fs in zip(ready, faces)]

        def batches() -> Iterator[list]:
            ready: list = []  # (frame, faces) waiting for a full generator batch
            n_faces = 0
            # The first batches are smaller (a quarter of --batch-size, doubling), so that the
            # generator, the check and the encoder start while the detector is still alone
            # (1280x720, 2 cores: the first full batch of 32 faces waits on 16 detected frames).
            target = max(1, batch_faces // FIRST_BATCH_DIVISOR)
            if chooser is not None:
                target = max(target, min(batch_faces, 2 * DECIDE_FACES))
            for vf, faces in tracked:
                ready.append((vf, faces))
                n_faces += len(faces)
                if n_faces >= target or len(ready) >= max_pending:
                    yield chosen(ready)
                    ready, n_faces = [], 0
                    target = min(batch_faces, 2 * target)
            if ready:
                yield chosen(ready)

        def generated() -> Iterator[tuple[list, list, Optional[_Generated]]]:
            for batch in batches():
                imgs = [(vf.image, faces) for vf, faces in batch]
                yield batch, imgs, self.generate(imgs, descriptors, stages, passes, router)

        if generate and render:
            work = prefetch(generated(), 1, "deid-generate") if threads else generated()
        else:
            work = ((batch, None, None) for batch in batches())
        try:
            for batch, imgs, gen in work:
                # Rendered in place: nothing reads a frame's decoded picture afterwards (the writer
                # takes the pixels outside the touched rectangles from the decoded planes).
                if not render:
                    rects = [[] for _ in batch]
                elif generate:
                    rects = self.finish(imgs, gen, stages, passes, check, router)
                else:
                    rects = self.render([(vf.image, faces) for vf, faces in batch], descriptors, stages)
                for (vf, faces), r in zip(batch, rects):
                    result.frames += 1
                    result.faces_anonymized += len(faces)
                    n_interp = sum(1 for f in faces if f.interpolated)
                    result.faces_interpolated += n_interp
                    result.frames_interpolated += n_interp > 0
                    yield vf, vf.image, r
            result.add_check_stats(check, passes)
            result.add_route_stats(router)
            result.add_track_decisions(chooser)
            result.add_track_targets(self.targets, descriptors)
        finally:
            for it in (work, tracked):
                if hasattr(it, "close"):
                    it.close()

    def decide_tracks(self, frames: Iterator, result: FileResult, fps: Optional[float]) -> None:
        """The --keep / --only decisions a run would make on ``frames`` (decoded VideoFrames, or
        one for an image) into ``result.track_decisions``: detection, tracking and the decisions,
        in a run's batches; nothing generated, blurred or written."""
        for _ in self.process_frames(frames, result, fps, render=False):
            pass

    def image(self, img: np.ndarray, result: FileResult) -> np.ndarray:
        from ..faces.track import Tracker

        dets = self.detector.detect(img)
        tracker = Tracker(self.options.track, start_thresh=self.options.detect.det_thresh)
        final = tracker.push(0, dets) + tracker.flush()
        result.faces_detected = tracker.n_detections - tracker.n_weak_dropped
        faces = final[0][1] if final else []
        chooser = self.new_chooser()
        if chooser is not None:
            faces = chooser.choose([(0, img, faces)], [0.0])[0]
        out = img.copy()
        passes = self.new_pass_levels()
        check = new_check_stats()
        router = self.new_router()
        descriptors = Descriptors()
        self.render([(out, faces)], descriptors, NULL, passes, check, router)
        result.add_check_stats(check, passes)
        result.add_route_stats(router)
        result.add_track_targets(self.targets, descriptors)
        result.frames = 1
        result.faces_anonymized = len(faces)
        result.tracks = len({f.track_id for f in final[0][1]}) if final else 0
        result.add_track_decisions(chooser)
        return out


@dataclass
class _Generated:
    """The generator's output for one batch (Pipeline.generate), per face j:
    jobs[j] = (item index, M (2, 3) frame -> crop, face); crops (N, S, S, 3) uint8 RGB input
    crops; desc (N, D) float32 track descriptors; tracks[j] track id; levels (N,) int64 passes
    run; raw (N, S, S, 3) uint8 RGB; masks[j] (S, S) float32 in [0, 1], feathered; regions[j]
    None or align.pasted_region of the face's current raw and mask on its frame as it was before
    any face of the batch was pasted (set by the identity check, which embeds that). held: the
    faces not generated, (item index, face, reason) each (routing.py), given the fallback. cond:
    (N, D) float32 the descriptors the generator was conditioned on (Pipeline.conditioning; None:
    desc)."""

    jobs: list
    crops: np.ndarray
    desc: np.ndarray
    tracks: list
    levels: np.ndarray
    raw: np.ndarray
    masks: list
    regions: list
    held: list = field(default_factory=list)
    cond: Optional[np.ndarray] = None
    own: Optional[np.ndarray] = None  # (N, D) the check's embeddings of the input faces; zero rows: not made
    descriptors: Optional[dict] = None  # the run's track descriptors (a Descriptors: the check revises them)


def calm_skips(tracks: Sequence, calm: dict, turn: dict, behind: Sequence[int] = ()) -> np.ndarray:
    """Which faces of a batch (``tracks``: the track of each, in frame order) the identity check
    skips: every other face of a calm track (``calm``: its checked faces in a row well under the
    threshold, CALM_FACES or more), counted across batches in ``turn`` (track -> calm faces seen,
    updated here), so a track with one face a batch is still checked on every other one. Counted
    within the batch instead (until 2026-12-07), a crowd's track with one face in each batch (30
    faces a frame, batches of 32) came to the same parity in every batch and was never checked
    again: a 51 px face of the stress set's crowd_4k left verified at 0.58 in its last 9 frames.
    Faces in ``behind`` (generated again at their track's raised count) are always checked. A track
    no longer calm starts its count again."""
    skip = np.zeros(len(tracks), bool)
    for j, t in enumerate(tracks):
        if calm.get(t, 0) < CALM_FACES:
            turn.pop(t, None)
            continue
        if j in behind:
            continue
        turn[t] = turn.get(t, 0) + 1
        skip[j] = turn[t] % 2 == 1
    return skip


def _with_last(items: Iterator, peek: bool) -> Iterator[tuple[Any, bool]]:
    """(item, whether it is the last) for each item; with ``peek`` False, never marked last (no
    item waits for the next)."""
    if not peek:
        for item in items:
            yield item, False
        return
    items = iter(items)
    item = next(items, _END)
    while item is not _END:
        nxt = next(items, _END)
        yield item, nxt is _END
        item = nxt


_END = object()


#: The margin of the upright ellipse about a box that holds all of it (through its corners: sqrt(2) -
#: 1, and a little more): what a held face's cover keeps of the faces seen in its frame.
CORNER_MARGIN = 0.45


def _other_boxes(faces: Sequence, face) -> list:
    """The boxes of ``faces`` (a frame's) other than ``face``'s."""
    return [g.box for g in faces if g is not face]



# --- files and folders -------------------------------------------------------------------------
