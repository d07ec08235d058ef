"""Independent face-recognition networks ("judges") for ``deid evaluate --judge``.

The generator is trained against MobileFaceNet, so MobileFaceNet's verdict alone can be fooled
by patterns that only that network sees. A judge is a recognition network deid was *not*
trained with; ``deid evaluate`` computes the same identity metrics with it (its own FAR = 0.1%
threshold on clean pairsDevTest, rank-1, cosine).

``dlib``: dlib's ResNet face-recognition model v1 (128-d, trained by Davis King on ~3M faces of
other datasets; CC0) with its own 5-point shape predictor and face-chip alignment (150x150,
padding 0.25): nothing of deid's alignment or identity network is shared beyond the crop.
Install with ``pip install 'deid-video[judge]'`` (packages ``dlib-bin`` and ``face_recognition_models``;
the weights come inside the package, no download at run time).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelError

JUDGES = ("dlib",)
#: dlib's own rule for its descriptors: the same person below this Euclidean distance (99.38%
#: on LFW pairs, dlib's model documentation); ``deid evaluate-video --judge dlib`` uses it.
DLIB_SAME_DISTANCE = 0.6


class JudgeUnavailable(ModelError):
    """The judge's package (and so its model) is not installed: exit code 3, like a missing model."""


def _dlib_models() -> Path:
    # face_recognition_models' __init__ imports pkg_resources (gone from new setuptools): find
    # its data folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise JudgeUnavailable("judge 'dlib' needs the packages dlib-bin and face_recognition_models "
                               "(pip install 'deid-video[judge]')")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibJudge:
    """dlib ResNet descriptors of face crops.

    describe(crops, box): crops (N, S, S, 3) uint8 **RGB**; box (x0, y0, x1, y1) float, the face
    square in crop pixels, where dlib's 5-point shape predictor starts (deid passes the ArcFace
    square of its aligned crop). Returns (N, 128) float32 raw descriptors (dlib compares them by
    Euclidean distance; all faces lie in one cone, cosine ~0.85 between strangers): use
    :func:`normalise` with a centre before taking cosines.
    """

    name = "dlib"
    chip_size, chip_padding = 150, 0.25  # dlib's recommended alignment for this model

    def __init__(self):
        try:
            import dlib
        except ImportError as e:
            raise JudgeUnavailable("judge 'dlib' needs the packages dlib-bin and face_recognition_models "
                                   "(pip install 'deid-video[judge]')") from e
        d = _dlib_models()
        self._dlib = dlib
        self.rec = dlib.face_recognition_model_v1(str(d / "dlib_face_recognition_resnet_model_v1.dat"))
        self.shape = dlib.shape_predictor(str(d / "shape_predictor_5_face_landmarks.dat"))

    def describe(self, crops: np.ndarray, box: Sequence[float], batch: int = 64) -> np.ndarray:
        if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
            raise ValueError(f"crops must be (N, S, S, 3) uint8 RGB, got {crops.shape} {crops.dtype}")
        out = [self._descriptors([self._chip(np.ascontiguousarray(img), box) for img in crops[i:i + batch]])
               for i in range(0, len(crops), batch)]
        return np.concatenate(out) if out else np.zeros((0, 128), np.float32)

    def describe_boxes(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """(N, 128) float32 raw descriptors of the faces of one image (H, W, 3) uint8 **RGB**, each
        at its box (x0, y0, x1, y1) in image pixels, where dlib's 5-point predictor starts (e.g. a
        detector's face box). dlib's own alignment cuts each 150 px chip from the full image."""
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        image = np.ascontiguousarray(image)
        return self._descriptors([self._chip(image, b) for b in boxes])

    def _chip(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """dlib's aligned 150 px chip of the face of ``image`` (contiguous RGB) at ``box``."""
        rect = self._dlib.rectangle(*(int(round(v)) for v in box[:4]))
        return self._dlib.get_face_chip(image, self.shape(image, rect), size=self.chip_size,
                                        padding=self.chip_padding)

    def _descriptors(self, chips: list) -> np.ndarray:
        if not chips:
            return np.zeros((0, 128), np.float32)
        return np.array(self.rec.compute_face_descriptor(chips), np.float32).reshape(len(chips), -1)


def normalise(desc: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(N, D) descriptors minus ``centre`` (D,), L2-normalised: cosine 0 for unrelated faces.
    deid evaluate centres on the mean clean DevTest descriptor (no labels used)."""
    d = desc - centre
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def load_judge(name: str):
    if name == "dlib":
        return DlibJudge()
    raise ValueError(f"unknown judge {name!r} (known: {', '.join(JUDGES)})")
