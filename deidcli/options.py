"""Option sets, as frozen dataclasses. The CLI maps its flags one-to-one onto these fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

METHODS = ("generate", "blur", "pixelate", "solid")
FALLBACKS = ("blur", "pixelate", "solid")  # what --method generate gives a face it does not draw
AUDIO_MODES = ("copy", "aac", "none")
#: DetectOptions.det_size that follows the frame: the detector looks at it shrunk at most 2 times (its
#: longer side to 640 px at least; faces.detect.auto_side), so 1080p is searched at 960 px, 4K at 1920.
DET_SIZE_AUTO = 0
DETECTOR_PRECISIONS = ("auto", "fp32", "int8")  # auto: int8 on the CPU execution provider, fp32 on CUDA
CHECK_PRECISIONS = ("auto", "fp32", "int8")  # the identity check's embedder, the same way
PASS_HOLD = 25  # default --pass-hold (AnonymizeOptions.pass_hold): about 1 s of a track at 25 fps
PIPE_FORMATS = ("matroska", "mpegts")  # container formats written to stdout (DST "-"); the first is the default


@dataclass(frozen=True)
class EncodeOptions:
    codec: str = "libx264"  # video encoder (any PyAV/FFmpeg encoder: libx265, h264_nvenc, ...)
    crf: int = 18  # constant rate factor for x264/x265 (lower = better quality)
    preset: str = "veryfast"  # encoder speed preset (x264/x265/nvenc; docs/speed.md: medium costs 2.3x the CPU)
    audio: str = "copy"  # copy: packets unchanged; aac: re-encode; none: drop audio
    keep_metadata: bool = False  # copy container/stream tags (GPS, creation time, ...)
    format: Optional[str] = None  # container written to stdout (DST "-"): matroska (default) or mpegts


@dataclass(frozen=True)
class DetectOptions:
    det_thresh: float = 0.5  # SCRFD score threshold
    det_size: int = 0  # detector input's longer side (multiple of 32); DET_SIZE_AUTO (0): half the frame's, at least 640
    min_face: int = 0  # ignore faces whose box is smaller than this many pixels (shorter side)
    detector: str = "det_scrfd_2.5g_kps.onnx"  # registry name of the detector model
    detect_every: int = 1  # run the detector on every Nth frame only (opt-in speed/coverage trade; tracks fill the rest)
    precision: str = "auto"  # detector weights/activations: auto (int8 on CPU, fp32 on CUDA) | fp32 | int8
    zoom_weak: bool = True  # detections under det_thresh are looked at again zoomed (faces.Detector.zoom_score)
    search_every: int = 4  # search the whole frame for new faces every Nth frame; between, look only around followed faces (faces/looks.py)

    def __post_init__(self):
        if self.search_every < 1:
            raise ValueError(f"search_every must be >= 1, not {self.search_every}")
        if self.precision not in DETECTOR_PRECISIONS:
            raise ValueError(f"detector precision must be one of {DETECTOR_PRECISIONS}, not {self.precision!r}")


@dataclass(frozen=True)
class TrackOptions:
    iou_thresh: float = 0.2  # minimum IoU to continue a track
    keep_thresh: float = 0.2  # detector score that keeps an existing track going (new tracks need det_thresh; weak ones that may start one, faces.detect.WEAK_MIN)
    max_gap: int = 8  # frames a track may miss and still be filled by interpolation
    reach_back: int = 30  # frames a new track reaches back over detections below det_thresh (>= keep_thresh)
    pad: int = 2  # frames a small or edge-cut face's track is extended by at each end (faces.track.PAD_BELOW)
    smooth: float = 1.0  # landmark smoothing strength (0 = off); One-Euro filter min cutoff scale


#: deid live's --search-every: every frame between two searches is held until the second (faces
#: that appear between them are looked for backwards), which a live output waits for; 2 holds one
#: frame (docs/live.md).
LIVE_SEARCH_EVERY = 2
#: Fewest generator passes for a face routing.TWO_PASS_FACE px high or more: in files (--large-passes
#: default) and live (its default: the second pass would take the latency budget). On the shared
#: clips lp_d12 and lp_d13 an independent recognizer (dlib) matched 13.5% and 11.3% of one-pass
#: faces to the person, none at two (docs/in_the_wild.md, eighth pass).
LARGE_PASSES = 2
LIVE_LARGE_PASSES = 1


def large_passes_or_default(value: Optional[int], max_passes: int, live: bool = False) -> int:
    """``--large-passes`` as given, else the default of files or of live, at most ``max_passes``."""
    if value is not None:
        return int(value)
    return min(LIVE_LARGE_PASSES if live else LARGE_PASSES, int(max_passes))


@dataclass(frozen=True)
class LiveOptions:
    """deid live (pipeline/live.py): how a live source is read and how late a frame may leave."""

    realtime: bool = False  # release a file's (or stdin's) frames at their own pts against the wall clock
    max_latency: float = 0.3  # seconds from a frame's arrival to its output; older frames are dropped, never sent raw
    timeout: float = 10.0  # seconds without data before a camera or network source counts as lost (also to open it)
    reconnect: bool = False  # retry a lost network source (back-off 0.5, 1, 2, 4, 8 s) and go on in the same output
    reconnect_for: float = 60.0  # give up reconnecting after this many seconds without a frame
    duration: Optional[float] = None  # stop (normally) after this many seconds of source time
    input_format: Optional[str] = None  # FFmpeg input format (v4l2 for /dev/videoN; auto otherwise)
    input_options: tuple = ()  # (key, value) FFmpeg options for the source (video_size, framerate, ...)

    def __post_init__(self):
        if not self.max_latency > 0:
            raise ValueError(f"max_latency must be > 0 seconds, not {self.max_latency}")
        if not self.timeout > 0 or not self.reconnect_for >= 0:
            raise ValueError("timeout must be > 0 and reconnect_for >= 0 seconds")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, not {self.duration}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_options"] = dict(self.input_options)
        return d


@dataclass(frozen=True)
class AnonymizeOptions:
    method: str = "generate"  # generate | blur | pixelate | solid
    weights: Optional[Path] = None  # generator checkpoint (default: the one shipped in weights/)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    fp16: bool = False  # half precision for the generator (CUDA only; ignored with a warning on CPU)
    batch_size: int = 32  # faces per generator batch (batched across frames)
    passes: int = 1  # generator passes per face (each one moves the face further from the identity)
    identity_check: bool = True  # embed each generated face; regenerate / blur faces still close to the person
    check_thresh: float = 0.25  # cosine to the track's descriptor at which the check acts (verification: 0.335)
    check_precision: str = "auto"  # identity check's embedder: auto (int8 on CPU, fp32 on CUDA) | fp32 | int8
    max_passes: int = 4  # most passes the identity check may raise a track to before it blurs the face
    colour_match: bool = True  # give the generated face the input face's colour statistics (align.match_colour)
    first_pass_mouth: bool = True  # passes after the first leave the mouth as the first drew it (lip motion)
    eye_pass: bool = False  # one generator run more per face, its mask limited to the eyes and brows
    keep_detail: bool = True  # paste the generated face's change, so the frame keeps detail finer than the crop
    pass_hold: int = PASS_HOLD  # faces a track stays at passes raised by the check before each step down to `passes` (0: for good)
    margin: float = 0.25  # extra margin around the face box for blur/pixelate/solid, fraction of size
    fallback: str = "blur"  # generate: what a face the generator does not draw gets (blur | pixelate | solid)
    min_generate: int = 40  # generate: faces less than this many px high get the fallback (pipeline/routing.py)
    max_yaw: float = 0.6  # generate: faces turned further (routing.yaw, eye distances) get the fallback
    min_light: float = 20.0  # generate: faces darker than this (mean CIELAB L*, 0-255) get the fallback
    soft_fraction: float = 0.0  # generate: faces less sharp than this share of a sharp face of their size get the fallback (0: off)
    small_max_passes: int = 2  # generate: most passes for faces under routing.LARGE_FACE px before the fallback
    large_passes: int = LARGE_PASSES  # generate: fewest passes for faces routing.TWO_PASS_FACE px high or more
    models_dir: Optional[Path] = None  # first place to look for model files
    overwrite: bool = False  # replace existing outputs (folder runs skip them otherwise)
    dry_run: bool = False  # only list what would be done (no model loaded, nothing written)
    shard: Optional[tuple[int, int]] = None  # (index, count), 0-based: only the inputs of that shard (jobs.shard_of)
    keep: tuple[Path, ...] = ()  # reference photos / folders of people left untouched; all other faces anonymized
    only: tuple[Path, ...] = ()  # reference photos / folders of the only people anonymized (not with keep)
    target: tuple[Path, ...] = ()  # photos / folders (a target a photo) generated faces are steered towards
    detect: DetectOptions = field(default_factory=DetectOptions)
    track: TrackOptions = field(default_factory=TrackOptions)
    encode: EncodeOptions = field(default_factory=EncodeOptions)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.encode.audio not in AUDIO_MODES:
            raise ValueError(f"audio must be one of {AUDIO_MODES}, not {self.encode.audio!r}")
        if self.encode.format is not None and self.encode.format not in PIPE_FORMATS:
            raise ValueError(f"format must be one of {PIPE_FORMATS}, not {self.encode.format!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 1 <= self.passes <= self.max_passes:
            raise ValueError(f"passes must be between 1 and max_passes = {self.max_passes}, not {self.passes}")
        if self.pass_hold < 0:
            raise ValueError(f"pass_hold must be >= 0, not {self.pass_hold}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, not {self.fallback!r}")
        if self.min_generate < 0 or self.min_light < 0 or self.max_yaw < 0 or self.soft_fraction < 0:
            raise ValueError("min_generate, max_yaw, min_light and soft_fraction must be >= 0")
        if self.small_max_passes < 1:
            raise ValueError(f"small_max_passes must be >= 1, not {self.small_max_passes}")
        if not 1 <= self.large_passes <= self.max_passes:
            raise ValueError(f"large_passes must be between 1 and max_passes = {self.max_passes}, "
                             f"not {self.large_passes}")
        if self.check_precision not in CHECK_PRECISIONS:
            raise ValueError(f"check precision must be one of {CHECK_PRECISIONS}, not {self.check_precision!r}")
        if not -1.0 <= self.check_thresh <= 1.0:
            raise ValueError(f"check_thresh must be a cosine in [-1, 1], not {self.check_thresh}")
        if not 1 <= self.detect.detect_every <= self.track.max_gap + 1:
            raise ValueError(f"detect_every must be between 1 and max_gap + 1 = {self.track.max_gap + 1}, "
                             f"not {self.detect.detect_every}")
        if self.keep and self.only:
            raise ValueError("keep and only cannot be used together (keep: these people stay; only: only these go)")
        if self.target and self.method != "generate":
            raise ValueError(f"target steers the generator: it needs method generate, not {self.method!r}")
        for k in ("keep", "only", "target"):  # one path, or several
            v = getattr(self, k)
            object.__setattr__(self, k, (Path(v),) if isinstance(v, (str, Path)) else tuple(Path(p) for p in v))
        if self.shard is not None and not (len(self.shard) == 2 and 0 <= self.shard[0] < self.shard[1]):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, not {self.shard!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, Path):
                d[k] = str(v)
            elif k in ("keep", "only", "target"):
                d[k] = [str(p) for p in v]
        return d
