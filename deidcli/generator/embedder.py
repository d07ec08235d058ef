"""The identity embedder (ArcFace-style network in ONNX Runtime, int8 on CPU) used by the
identity check: descriptors of the input and generated faces."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


class IdentityEmbedder:
    """MobileFaceNet identity descriptors: InsightFace's ONNX recognizer (ArcFaceONNX), its session
    fed directly.

    embed(crops112: list of (112, 112, 3) uint8 RGB ArcFace-aligned crops) -> (N, 128) float32, L2-normalised
    embed_check(crops112) -> the same, from the identity check's session (see ``precision``)

    Both feed the network what ArcFaceONNX.get_feat does (RGB, NCHW, (x - input_mean) / input_std,
    127.5 and 127.5 for MobileFaceNet) without its per-call resize and colour swap.
    ``embed`` always runs the fp32 model: its descriptors condition the generator. precision:
    what ``embed_check`` runs (the pipeline's identity check, which only compares cosines): fp32
    (the default here), int8 (statically quantized at load from this file and the calibration
    shipped for it, deidcli/data/<model stem>.calib.json, see deidcli/quantize.py; CPU provider
    only), or auto (int8 on the CPU provider alone, fp32 with any other). Where int8 cannot be had
    it says why in one warning (auto with a model that has no calibration: at INFO) and runs fp32;
    ``check_precision`` after loading says what runs ("int8" or "fp32"). calibration: the int8
    calibration JSON (default: the one shipped for this model).
    """

    def __init__(self, model_path: os.PathLike, providers: Optional[list[str]] = None, precision: str = "fp32",
                 calibration: Optional[os.PathLike] = None):
        from insightface.model_zoo import model_zoo

        from ..options import CHECK_PRECISIONS
        from ..stages import ort_session_options  # the detector's: half the cores, no spinning

        if precision not in CHECK_PRECISIONS:
            raise ValueError(f"precision must be one of {CHECK_PRECISIONS}, not {precision!r}")
        providers = list(providers or ["CPUExecutionProvider"])
        with contextlib.redirect_stdout(io.StringIO()):  # InsightFace may print while loading
            self.model = model_zoo.get_model(str(model_path), providers=providers, sess_options=ort_session_options())
        self.session = self.model.session
        self.input_name, self.output_name = self.model.input_name, self.model.output_names[0]
        self.input_mean, self.input_std = float(self.model.input_mean), float(self.model.input_std)
        from ..quantize import int8_session

        # time taken to build the int8 model (None: fp32)
        int8, self.build_seconds = int8_session(model_path, precision, providers, "identity check", log,
                                                ort_session_options(), calibration)
        self.check_session = int8 if int8 is not None else self.session
        self.check_precision = "int8" if int8 is not None else "fp32"  # what embed_check runs

    def embed(self, crops112: list[np.ndarray]) -> np.ndarray:
        return self._run(self.session, crops112)

    def embed_check(self, crops112: list[np.ndarray]) -> np.ndarray:
        return self._run(self.check_session, crops112)

    def to_input(self, crops112) -> np.ndarray:
        """The network's input (N, 3, 112, 112) float32 for (N, 112, 112, 3) uint8 RGB crops."""
        x = np.stack(crops112)
        assert x.shape[1:] == (112, 112, 3) and x.dtype == np.uint8, (x.shape, x.dtype)
        blob = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
        blob -= self.input_mean
        blob *= 1.0 / self.input_std
        return blob

    def _run(self, session, crops112: list[np.ndarray]) -> np.ndarray:
        if not len(crops112):
            return np.zeros((0, 128), np.float32)
        feat = session.run([self.output_name], {self.input_name: self.to_input(crops112)})[0]
        feat = feat.reshape(len(crops112), -1)
        return feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)
