"""Batched inference: device and dtype resolution, the generator runner, the identity embedder.

Imports torch lazily; nothing here touches files except through weights.py / model.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


def stage_threads(env: str) -> int:
    """Intra-op threads for one heavy CPU stage (detector, generator): half the cores, at least
    one, since decoding, detection, generation and encoding run concurrently in their own
    threads. The environment variable ``env`` overrides it."""
    n = os.environ.get(env)
    if n:
        return max(1, int(n))
    return max(1, (os.cpu_count() or 2) // 2)


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

    run(crops (N, S, S, 3) uint8 RGB, desc (N, D) float32 L2-normalised)
      -> raw (N, S, S, 3) uint8 RGB, mask (N, S, S) float32 in [0, 1]

    Backend: on CUDA the torch module itself (fp16 when asked); on the CPU the module is
    exported to ONNX in memory at load time (about 0.3 s) and run by ONNX Runtime, which on
    this network's small depthwise convolutions is 2-3x faster than torch's CPU kernels
    (examples/bench_generator_backends.py; outputs agree to ~1e-6). ``backend`` forces one
    ("torch" or "onnxruntime"); the environment variable DEID_GENERATOR_BACKEND does too.
    """

    def __init__(self, generator, runtime: Runtime, batch_size: int = 32, backend: Optional[str] = None):
        import torch

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
        self.session = None
        if backend == "onnxruntime":
            self.session = _onnx_session(generator.float().eval(), self.size, stage_threads("DEID_ORT_THREADS"))
            self.generator = None
        else:
            self.generator = generator.to(self.device, self.dtype).eval()
            if self.device.type == "cpu":
                torch.set_num_threads(stage_threads("DEID_TORCH_THREADS"))

    def run(self, crops: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(crops)
        S = self.size
        assert crops.shape == (n, S, S, 3) and crops.dtype == np.uint8, (crops.shape, crops.dtype)
        assert desc.ndim == 2 and len(desc) == n, desc.shape
        if n == 0:
            return np.zeros((0, S, S, 3), np.uint8), np.zeros((0, S, S), np.float32)
        run = self._run_onnx if self.session is not None else self._run_torch
        raws, masks = zip(*(run(crops[i:i + self.batch_size], desc[i:i + self.batch_size])
                            for i in range(0, n, self.batch_size)))
        return np.concatenate(raws), np.concatenate(masks)

    def _run_onnx(self, crops: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = crops.transpose(0, 3, 1, 2).astype(np.float32)
        x *= 1.0 / 127.5
        x -= 1.0
        raw, mask = self.session.run(None, {"x": x, "d": np.ascontiguousarray(desc, dtype=np.float32)})
        raw = np.rint(np.clip((raw + 1.0) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(raw), np.clip(mask[:, 0], 0, 1)

    def _run_torch(self, crops: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(crops).to(self.device)
            x = x.permute(0, 3, 1, 2).to(self.dtype).div_(127.5).sub_(1.0)
            d = torch.from_numpy(np.ascontiguousarray(desc)).to(self.device, self.dtype)
            raw, mask = self.generator(x, d)
            raw = raw.float().add_(1.0).mul_(127.5).clamp_(0, 255).round_().to(torch.uint8)
            return raw.permute(0, 2, 3, 1).cpu().numpy(), mask.float()[:, 0].clamp_(0, 1).cpu().numpy()


def _onnx_session(generator, size: int, threads: int):
    """An ONNX Runtime CPU session of ``generator`` (inputs x (B, 3, S, S) float32 in [-1, 1],
    d (B, D) float32; outputs raw (B, 3, S, S), mask (B, 1, S, S)), exported in memory."""
    import warnings

    import onnxruntime
    import torch

    dim = int(generator.config.get("id_dim", 128))
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


class IdentityEmbedder:
    """MobileFaceNet identity descriptors through InsightFace's ONNX recognizer.

    embed(crops112: list of (112, 112, 3) uint8 RGB ArcFace-aligned crops) -> (N, 128) float32, L2-normalised
    """

    def __init__(self, model_path: os.PathLike, providers: Optional[list[str]] = None):
        from insightface.model_zoo import model_zoo

        with contextlib.redirect_stdout(io.StringIO()):  # InsightFace may print while loading
            self.model = model_zoo.get_model(str(model_path), providers=providers or ["CPUExecutionProvider"])

    def embed(self, crops112: list[np.ndarray]) -> np.ndarray:
        if not crops112:
            return np.zeros((0, 128), np.float32)
        bgr = [np.ascontiguousarray(c[:, :, ::-1]) for c in crops112]
        feat = np.asarray(self.model.get_feat(bgr), dtype=np.float32).reshape(len(bgr), -1)
        return feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)


def onnx_providers(runtime: Runtime) -> list[str]:
    """ONNX Runtime providers for the detector and embedder: CUDA first when it is used and present."""
    import onnxruntime

    avail = onnxruntime.get_available_providers()
    if runtime.device.startswith("cuda") and "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
