"""Batched inference: device and dtype resolution, the generator runner, the identity embedder.

Imports torch lazily; nothing here touches files except through weights.py / model.py.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..stages import stage_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: str  # resolved torch device string, e.g. "cpu" or "cuda:0"
    dtype: str  # "float32" or "float16"
    warnings: tuple[str, ...] = ()  # what was degraded while resolving (said to the user)


def resolve_runtime(device: str = "auto", fp16: bool = False) -> Runtime:
    """Map --device/--fp16 to what will actually run. Raises ValueError for an unusable device."""
    import torch

    warnings = []
    dev = device.strip().lower()
    if dev == "auto":
        dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        idx = int(dev.split(":", 1)[1]) if ":" in dev else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
        dev = f"cuda:{idx}"
    elif dev != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    dtype = "float32"
    if fp16:
        if dev.startswith("cuda"):
            dtype = "float16"
        else:
            warnings.append("--fp16 needs CUDA; running float32 on the CPU")
    elif dev == "cpu" and torch.cuda.is_available():
        warnings.append("CUDA is present but --device cpu was asked for")
    return Runtime(dev, dtype, tuple(warnings))


class GeneratorRunner:
    """Runs the generator on aligned crops in batches.

    run(crops (N, S, S, 3) uint8 RGB, desc (N, D) float32 L2-normalised, passes=1)
      -> raw (N, S, S, 3) uint8 RGB, mask (N, S, S) float32 in [0, 1]

    ``passes`` (an int, or one per face) applies the generator again to its own blended
    output, with the same descriptor: each pass moves the face further from the identity
    (LFW DevTest, shipped checkpoint, 600 faces: mean cosine to the original 0.084 after one
    pass, -0.043 after two; pixels changed 3.6 -> 5.3 grey levels). The k passes are returned
    as one equivalent (raw, mask) pair: mask = 1 - prod(1 - m_i) and raw such that
    ``mask * raw + (1 - mask) * crop`` is the k-th blended crop; with one pass this is the
    generator's own raw and mask. With ``colour_match`` (`deid anonymize` default) each crop is fed
    to the generator in the colours it was trained on (align.normalise_tone) and the returned raw
    has the input crop's colours: its chroma and lightness range, at its level of detail
    (align.match_colour).

    With ``first_pass_mouth`` (default) the passes after the first leave the mouth
    (align.mouth_box, softened) as the first pass drew it: each pass smudges the lips a little
    more, and it is the eyes, brows and nose that carry most of the identity the later passes
    are there to remove (`deid evaluate-video`, 4-pass track of lp_d12: inner-lip opening
    correlation 0.87 with every pass redrawing the mouth, 0.91 with the first pass's mouth).

    With ``eye_pass`` every face gets one generator run more after its passes, whose mask is
    limited to the eye band (:func:`eye_pass_weight`: eyes and brows): an independent recognizer
    (dlib) still matched a third of the one-pass faces of two clips to the person, and over half
    of what it goes by lies in the eyes; a full second pass fixes that too, but redraws the rest
    of the face once more (lip motion suffers).

    Backend: on CUDA the torch module itself (fp16 when asked), ``batch_size`` faces a call; on
    the CPU the module is exported to ONNX in memory at load time (about 0.3 s; as
    model.for_export writes it: the same function with fewer memory passes) and run by ONNX
    Runtime one face per intra-op thread a call (``network_batch``), about 4x torch's CPU
    kernels on one thread (examples/bench_generator_backends.py; outputs agree to ~1e-6).
    ``backend`` forces one ("torch" or "onnxruntime"); the environment variable
    DEID_GENERATOR_BACKEND does too.
    """

    def __init__(self, generator, runtime: Runtime, batch_size: int = 32, backend: Optional[str] = None,
                 colour_match: bool = False, first_pass_mouth: bool = True, eye_pass: bool = False):
        import torch

        self.colour_match = colour_match
        self.torch = torch
        self.device = torch.device(runtime.device)
        self.dtype = torch.float16 if runtime.dtype == "float16" else torch.float32
        self.batch_size = batch_size
        self.size = int(generator.config["size"])
        self.margin = float(generator.config["margin"])
        backend = backend or os.environ.get("DEID_GENERATOR_BACKEND") or (
            "onnxruntime" if self.device.type == "cpu" else "torch")
        if backend not in ("torch", "onnxruntime"):
            raise ValueError(f"generator backend must be torch or onnxruntime, not {backend!r}")
        if backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError("the onnxruntime generator backend runs on the CPU only")
        self.backend = backend
        self.later = later_pass_weight(self.size, self.margin) if first_pass_mouth else None
        self.eye = eye_pass_weight(self.size, self.margin) if eye_pass else None
        self.session = None
        if backend == "onnxruntime":
            threads = stage_threads("DEID_ORT_THREADS")
            self.session = _onnx_session(generator.float().eval(), self.size, threads)
            # ONNX Runtime is fed one face per intra-op thread at a time: a face's activations
            # stay in the CPU caches (128 crop: ~1 MB a layer), where a batch of 32 streams
            # through memory. Shipped 128 generator, exported module, faces/s at one thread:
            # 217 in runs of 1 face, 190 of 4, 148 of 32; two threads: 256 of 2, 236 of 32.
            self.network_batch = threads
            self.generator = None
        else:
            self.network_batch = batch_size  # faces per network call
            self.generator = generator.to(self.device, self.dtype).eval()
            if self.later is not None:  # on the device once, not per batch
                self.later = torch.from_numpy(self.later).to(self.device)
            if self.eye is not None:
                self.eye = torch.from_numpy(self.eye).to(self.device)
            if self.device.type == "cpu":
                torch.set_num_threads(stage_threads("DEID_TORCH_THREADS"))

    def run(self, crops: np.ndarray, desc: np.ndarray, passes=1, colour_match=None) -> tuple[np.ndarray, np.ndarray]:
        """``colour_match``: None for the runner's setting, else a bool or one per face."""
        n = len(crops)
        S = self.size
        assert crops.shape == (n, S, S, 3) and crops.dtype == np.uint8, (crops.shape, crops.dtype)
        assert desc.ndim == 2 and len(desc) == n, desc.shape
        raw = np.zeros((n, S, S, 3), np.uint8)
        mask = np.zeros((n, S, S), np.float32)
        if n == 0:
            return raw, mask
        per_face = np.broadcast_to(np.asarray(passes, dtype=np.int64), (n,))
        if per_face.min() < 1:
            raise ValueError(f"passes must be >= 1, not {per_face.min()}")
        run = self._run_onnx if self.session is not None else self._run_torch
        step = self.network_batch
        match = np.broadcast_to(np.asarray(self.colour_match if colour_match is None else colour_match, bool), (n,))
        fed = crops
        if match.any():  # the generator sees each face in the colours it was trained on
            from ..faces.colour import normalise_tone

            fed = crops.copy()
            for j in np.flatnonzero(match):
                fed[j] = normalise_tone(crops[j])
        for k in np.unique(per_face):
            idx = np.flatnonzero(per_face == k)
            for j in range(0, len(idx), step):
                sel = idx[j:j + step]
                raw[sel], mask[sel] = run(fed[sel], desc[sel], int(k))
        if match.any():
            from ..faces.colour import match_colour

            for j in np.flatnonzero(match):
                raw[j] = match_colour(raw[j], crops[j], mask[j])
        return raw, mask

    def further(self, passes: int) -> list:
        """Mask weights of the runs after the first for a face of ``passes`` passes (see
        _compose_passes): the later passes' (None: the whole face), then the eye pass's."""
        return further_weights(passes, self.later, self.eye)

    def _run_onnx(self, crops: np.ndarray, desc: np.ndarray, passes: int) -> tuple[np.ndarray, np.ndarray]:
        x0 = crops.transpose(0, 3, 1, 2).astype(np.float32)
        x0 *= 1.0 / 127.5
        x0 -= 1.0
        d = np.ascontiguousarray(desc, dtype=np.float32)
        raw, mask = self.session.run(None, {"x": x0, "d": d})
        further = self.further(passes)
        if further:
            raw, mask = _compose_passes(x0, raw, np.clip(mask, 0, 1), further,
                                        lambda x: self.session.run(None, {"x": x, "d": d}), np)
        raw = np.rint(np.clip((raw + 1.0) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(raw), np.clip(mask[:, 0], 0, 1)

    def _run_torch(self, crops: np.ndarray, desc: np.ndarray, passes: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(crops).to(self.device)
            x = x.permute(0, 3, 1, 2).to(self.dtype).div_(127.5).sub_(1.0)
            d = torch.from_numpy(np.ascontiguousarray(desc)).to(self.device, self.dtype)
            raw, mask = self.generator(x, d)
            further = self.further(passes)
            if further:
                raw, mask = _compose_passes(x.float(), raw.float(), mask.float().clamp(0, 1), further,
                                            lambda y: self.generator(y.to(self.dtype), d), torch)
            raw = raw.float().add_(1.0).mul_(127.5).clamp_(0, 255).round_().to(torch.uint8)
            return raw.permute(0, 2, 3, 1).cpu().numpy(), mask.float()[:, 0].clamp_(0, 1).cpu().numpy()


def later_pass_weight(size: int, margin: float) -> np.ndarray:
    """(1, 1, S, S) float32 in [0, 1]: where passes after the first may change the face, i.e. 1
    minus the mouth box (align.mouth_box) softened over ~S/14 px (9 at the 128 crop)."""
    from ..faces.align import mouth_box

    return (1.0 - mouth_box(size, margin, soften=(size // 14) | 1))[None, None]


def eye_pass_weight(size: int, margin: float) -> np.ndarray:
    """(1, 1, S, S) float32 in [0, 1]: where the eye pass may change the face: the eye band
    (align.eye_band: both eyes and brows) softened over ~S/14 px (9 at the 128 crop)."""
    from ..faces.align import eye_band, soft_box

    x0, y0, x1, y1 = eye_band(size, margin)
    return soft_box(size, (x0, y0, x1 - 1, y1 - 1), soften=(size // 14) | 1)[None, None]


def further_weights(passes: int, later=None, eye=None) -> list:
    """The mask weights of the generator runs after the first (see _compose_passes) for ``passes``
    passes: ``later`` for each further pass (None: the whole face), then ``eye`` for the eye pass
    when it is given."""
    return [later] * (passes - 1) + ([eye] if eye is not None else [])


def _compose_passes(x0, raw, mask, weights, step, xp):
    """Apply one further generator pass (``step(x) -> (raw, mask)``) per entry of ``weights`` to
    the blended output of a first pass (``raw``, ``mask`` on input ``x0``, all (B, C, S, S) in
    [-1, 1] / [0, 1]) and return one equivalent (raw, mask) pair (see GeneratorRunner). ``xp``:
    numpy or torch. Each entry, None or (1, 1, S, S) in [0, 1] of x0's array kind (e.g.
    :func:`later_pass_weight`, :func:`eye_pass_weight`), scales the mask of its pass: where it is
    0 the face stays as the passes before drew it."""
    x = mask * raw + (1 - mask) * x0
    keep = 1 - mask
    for w in weights:
        r, m = step(x)
        r, m = (r.float(), m.float().clamp(0, 1)) if xp is not np else (r, np.clip(m, 0, 1))
        if w is not None:
            m = m * w
        x = m * r + (1 - m) * x
        keep = keep * (1 - m)
    total = 1 - keep
    # Where the combined mask is ~0 the raw value does not matter: use the blended crop.
    safe = xp.where(total > 1e-3, total, xp.ones_like(total)) if xp is np else total.clamp(min=1e-3)
    out = (x - keep * x0) / safe
    out = xp.where(total > 1e-3, out, x)
    return out, total


def _onnx_session(generator, size: int, threads: int):
    """An ONNX Runtime CPU session of ``generator`` (inputs x (B, 3, S, S) float32 in [-1, 1],
    d (B, D) float32; outputs raw (B, 3, S, S), mask (B, 1, S, S)), exported in memory."""
    import warnings

    import onnxruntime
    import torch

    from .model import for_export

    dim = int(generator.config.get("id_dim", 128))
    generator = for_export(generator)  # the same function, fewer ops for ONNX Runtime
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the shape asserts, instance norm
        torch.onnx.export(generator, (torch.zeros(1, 3, size, size), torch.zeros(1, dim)), buf,
                          input_names=["x", "d"], output_names=["raw", "mask"], opset_version=17,
                          dynamic_axes={k: {0: "batch"} for k in ("x", "d", "raw", "mask")}, dynamo=False)
    so = onnxruntime.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def onnx_providers(runtime: Runtime) -> list[str]:
    """ONNX Runtime providers for the detector and embedder: CUDA first when it is used and present."""
    import onnxruntime

    avail = onnxruntime.get_available_providers()
    if runtime.device.startswith("cuda") and "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
