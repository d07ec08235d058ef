"""Static int8 quantization of the SCRFD face detector, for ONNX Runtime's CPU execution provider.

deid ships no quantized model. It derives one in memory when the detector loads, from the fp32
ONNX file (found and verified as any model file) and the activation ranges shipped in
``deidcli/data/<detector stem>.calib.json``. That JSON is made once by
examples/calibrate_detector.py (LFW DevTrain people only; its docstring has the recipe). Besides
ONNX Runtime's calibration cache (``ranges``) it records, under ``deid``, the SHA-256 of the
detector file it was made for and the quantization recipe; a build refuses any other file.

The build (:func:`build_int8`), in a temporary folder removed afterwards (nothing is written next
to the model, into the working directory or into site-packages):

1. opset 11 -> 13 (``onnx.version_converter``): per-channel DequantizeLinear needs opset 13;
2. ``quant_pre_process`` (ONNX shape inference and ONNX Runtime's basic graph optimizations;
   symbolic shape inference skipped): the graph whose tensors the ranges name;
3. ``quantize_static`` in QDQ format (uint8 activations, int8 weights, per output channel) with the
   shipped ranges as its calibration cache, so no calibration runs at load.

It takes about 0.3 s on a 2-core Xeon, so it is done at every load rather than cached on disk.
Every import of onnx/onnxruntime here is deferred to the call.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

CALIBRATION_DIR = Path(__file__).resolve().parent / "data"
CALIBRATION_FORMAT = "deid-int8-calibration/1"  # the "deid" section's layout
OPSET = 13  # per-channel DequantizeLinear (an axis attribute) needs opset 13


class Int8Error(Exception):
    """The int8 detector cannot be built; the message says why (one line)."""


class NoCalibration(Int8Error):
    """No calibration JSON ships for this detector (by file name)."""


def calibration_path(detector: Union[str, Path]) -> Path:
    """Where the calibration JSON of a detector file lives: deidcli/data/<stem>.calib.json."""
    return CALIBRATION_DIR / f"{Path(detector).stem}.calib.json"


def load_calibration(path: Union[str, Path]) -> dict:
    """The calibration JSON at ``path``, checked for the sections a build needs."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        meta = doc["deid"]
        if meta.get("format") != CALIBRATION_FORMAT:
            raise Int8Error(f"{path.name}: format {meta.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
        for key in ("detector_sha256", "recipe"):
            meta[key]  # noqa: B018 (presence check)
        doc["ranges"]["data"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Int8Error(f"{path.name}: unreadable calibration ({type(e).__name__}: {e})") from None
    return doc


def quantize_kwargs(recipe: dict) -> dict:
    """``quantize_static`` keyword arguments for a recipe (the JSON-able dict stored with the ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return dict(
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType[recipe["activation_type"]],
        weight_type=QuantType[recipe["weight_type"]],
        per_channel=bool(recipe["per_channel"]),
        reduce_range=bool(recipe.get("reduce_range", False)),
        calibrate_method=CalibrationMethod[recipe["calibrate_method"]],
        nodes_to_exclude=list(recipe.get("nodes_to_exclude", [])),
        extra_options=dict(recipe.get("extra_options", {})),
    )


def prepare_fp32(detector: Union[str, Path], out: Union[str, Path]) -> Path:
    """Steps 1-2: the fp32 detector at opset 13, shape-inferred and optimized, saved to ``out``.

    ``out`` should be in a temporary folder: ONNX Runtime writes intermediate files next to it.
    The calibration script and the build both quantize this model, so tensor names agree.
    """
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    model = onnx.load(str(detector))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < OPSET:
        model = version_converter.convert_version(model, OPSET)
    converted = out.with_name(out.stem + ".opset.onnx")
    onnx.save(model, str(converted))
    quant_pre_process(str(converted), str(out), skip_symbolic_shape=True)
    converted.unlink()
    return out


def _check_fit(model_path: Path, ranges: dict, recipe: dict) -> None:
    """The ranges name tensors of this graph and cover every activation a Conv reads or writes, and
    the nodes to leave in fp32 exist; otherwise they were made by another onnxruntime whose
    optimizer named things differently."""
    import onnx

    g = onnx.load(str(model_path)).graph
    absent = set(recipe.get("nodes_to_exclude", [])) - {n.name for n in g.node}
    if absent:
        raise Int8Error(f"the calibration's nodes to exclude are not in this graph ({sorted(absent)[:3]}...): "
                        "rerun examples/calibrate_detector.py with this onnxruntime")
    inits = {t.name for t in g.initializer}
    names = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    unknown = set(ranges) - names
    needed = {t for n in g.node if n.op_type == "Conv" for t in (n.input[0], n.output[0]) if t not in inits}
    missing = needed - set(ranges)
    if unknown or missing:
        raise Int8Error(f"the calibration does not fit this graph ({len(unknown)} unknown, {len(missing)} missing "
                        "tensors): rerun examples/calibrate_detector.py with this onnxruntime")


def build_int8(detector: Union[str, Path], calibration: Optional[Union[str, Path]] = None,
               sha256: Optional[str] = None) -> tuple[bytes, dict]:
    """The int8 QDQ model of ``detector`` (serialized ONNX) and what was done.

    calibration: the JSON (default :func:`calibration_path`). sha256: the detector's SHA-256 when
    the caller has it (default: computed, cached per file by weights.sha256_file).
    Raises NoCalibration when no JSON ships for this detector, Int8Error when the JSON was made for
    another file or does not fit the graph; onnx/onnxruntime errors pass through.
    Returns (bytes, {"seconds", "calibration", "recipe"}).
    """
    from . import weights

    t0 = time.perf_counter()
    detector = Path(detector)
    calibration = Path(calibration) if calibration else calibration_path(detector)
    if not calibration.is_file():
        raise NoCalibration(f"no int8 calibration for {detector.name} (no {calibration.name} in deidcli/data)")
    doc = load_calibration(calibration)
    meta = doc["deid"]
    got = sha256 or weights.sha256_file(detector)
    if got != meta["detector_sha256"]:
        raise Int8Error(f"{calibration.name} was made for another detector file "
                        f"(SHA-256 {meta['detector_sha256'][:12]}..., {detector} has {got[:12]}...)")
    kwargs = quantize_kwargs(meta["recipe"])

    from onnxruntime.quantization import quantize_static

    with tempfile.TemporaryDirectory(prefix="deid-int8-") as tmp:
        tmp = Path(tmp)
        pre = prepare_fp32(detector, tmp / "fp32.onnx")
        _check_fit(pre, doc["ranges"]["data"], meta["recipe"])
        cache = tmp / "ranges.json"  # onnxruntime's own calibration-cache layout
        cache.write_text(json.dumps(doc["ranges"]))
        out = tmp / "int8.onnx"
        quantize_static(str(pre), str(out), None, calibration_cache_path=str(cache), **kwargs)
        data = out.read_bytes()
    return data, {"seconds": round(time.perf_counter() - t0, 3), "calibration": str(calibration),
                  "recipe": meta["recipe"]}
