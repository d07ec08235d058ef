"""Static int8 quantization of deid's ONNX models, for ONNX Runtime's CPU execution provider.

deid ships no quantized model. It derives one in memory when a model loads, from the fp32 ONNX
file (found and verified as any model file) and the activation ranges shipped in
``deidcli/data/<model stem>.calib.json``. Two models have one:

- the SCRFD face detector (``det_scrfd_2.5g_kps``), made by research/calibrate_detector.py,
  used by faces.Detector;
- the MobileFaceNet identity network (``rec_mobilefacenet``), made by
  research/calibrate_identity.py, used by engine.IdentityEmbedder for the identity check only.

Both calibrations use LFW DevTrain people only; the scripts' docstrings have the recipes. Besides
ONNX Runtime's calibration cache (``ranges``) each JSON records, under ``deid``, the SHA-256 of the
model file it was made for (``model_sha256``; the detector's file names it ``detector_sha256``)
and the quantization recipe; a build refuses any other file.

The build (:func:`build_int8`), in a temporary folder removed afterwards (nothing is written next
to the model, into the working directory or into site-packages):

1. opset 11 or 12 -> 13 (``onnx.version_converter``): per-channel DequantizeLinear needs opset 13;
2. ``quant_pre_process`` (ONNX shape inference and ONNX Runtime's basic graph optimizations;
   symbolic shape inference skipped): the graph whose tensors the ranges name;
3. ``quantize_static`` in QDQ format (uint8 activations, int8 weights, per output channel) with the
   shipped ranges as its calibration cache, so no calibration runs at load.

It takes about 0.5 s per model on a 2-core Xeon, so it is done at every load rather than cached on
disk. Every import of onnx/onnxruntime here is deferred to the call.
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
SHA_KEYS = ("model_sha256", "detector_sha256")  # where the "deid" section names the calibrated file


class Int8Error(Exception):
    """The int8 model cannot be built; the message says why (one line)."""


class NoCalibration(Int8Error):
    """No calibration JSON ships for this model (by file name)."""


def calibration_path(model: Union[str, Path]) -> Path:
    """Where the calibration JSON of a model file lives: deidcli/data/<stem>.calib.json."""
    return CALIBRATION_DIR / f"{Path(model).stem}.calib.json"


def calibrated_sha256(meta: dict) -> str:
    """The SHA-256 of the model file a calibration's "deid" section was made for."""
    return next(meta[k] for k in SHA_KEYS if k in meta)


def load_calibration(path: Union[str, Path]) -> dict:
    """The calibration JSON at ``path``, checked for the sections a build needs."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        meta = doc["deid"]
        if meta.get("format") != CALIBRATION_FORMAT:
            raise Int8Error(f"{path.name}: format {meta.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
        if not any(k in meta for k in SHA_KEYS):
            raise KeyError(SHA_KEYS[0])
        meta["recipe"]  # noqa: B018 (presence check)
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


def prepare_fp32(model: Union[str, Path], out: Union[str, Path]) -> Path:
    """Steps 1-2: the fp32 model at opset 13, shape-inferred and optimized, saved to ``out``.

    ``out`` should be in a temporary folder: ONNX Runtime writes intermediate files next to it.
    The calibration scripts and the build both quantize this model, so tensor names agree.
    """
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    proto = onnx.load(str(model))
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < OPSET:
        proto = version_converter.convert_version(proto, OPSET)
    converted = out.with_name(out.stem + ".opset.onnx")
    onnx.save(proto, str(converted))
    quant_pre_process(str(converted), str(out), skip_symbolic_shape=True)
    converted.unlink()
    return out


def _check_fit(model_path: Path, ranges: dict, recipe: dict, script: str = "the calibration script") -> None:
    """The ranges name tensors of this graph and cover every activation a Conv reads or writes, and
    the nodes to leave in fp32 exist; otherwise they were made by another onnxruntime whose
    optimizer named things differently. ``script``: what remakes the calibration (for the message)."""
    import onnx

    g = onnx.load(str(model_path)).graph
    absent = set(recipe.get("nodes_to_exclude", [])) - {n.name for n in g.node}
    if absent:
        raise Int8Error(f"the calibration's nodes to exclude are not in this graph ({sorted(absent)[:3]}...): "
                        f"rerun {script} with this onnxruntime")
    inits = {t.name for t in g.initializer}
    names = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    unknown = set(ranges) - names
    needed = {t for n in g.node if n.op_type == "Conv" for t in (n.input[0], n.output[0]) if t not in inits}
    missing = needed - set(ranges)
    if unknown or missing:
        raise Int8Error(f"the calibration does not fit this graph ({len(unknown)} unknown, {len(missing)} missing "
                        f"tensors): rerun {script} with this onnxruntime")


def build_int8(model: Union[str, Path], calibration: Optional[Union[str, Path]] = None,
               sha256: Optional[str] = None) -> tuple[bytes, dict]:
    """The int8 QDQ model of ``model`` (serialized ONNX) and what was done.

    calibration: the JSON (default :func:`calibration_path`). sha256: the model's SHA-256 when
    the caller has it (default: computed, cached per file by weights.sha256_file).
    Raises NoCalibration when no JSON ships for this model, Int8Error when the JSON was made for
    another file or does not fit the graph; onnx/onnxruntime errors pass through.
    Returns (bytes, {"seconds", "calibration", "recipe"}).
    """
    from . import weights

    t0 = time.perf_counter()
    model = Path(model)
    calibration = Path(calibration) if calibration else calibration_path(model)
    if not calibration.is_file():
        raise NoCalibration(f"no int8 calibration for {model.name} (no {calibration.name} in deidcli/data)")
    doc = load_calibration(calibration)
    meta = doc["deid"]
    want = calibrated_sha256(meta)
    got = sha256 or weights.sha256_file(model)
    if got != want:
        kind = "detector" if "detector_sha256" in meta and "model_sha256" not in meta else "model"
        raise Int8Error(f"{calibration.name} was made for another {kind} file "
                        f"(SHA-256 {want[:12]}..., {model} has {got[:12]}...)")
    kwargs = quantize_kwargs(meta["recipe"])
    script = meta.get("calibration_set", {}).get("script", "the calibration script")

    from onnxruntime.quantization import quantize_static

    with tempfile.TemporaryDirectory(prefix="deid-int8-") as tmp:
        tmp = Path(tmp)
        pre = prepare_fp32(model, tmp / "fp32.onnx")
        _check_fit(pre, doc["ranges"]["data"], meta["recipe"], script)
        cache = tmp / "ranges.json"  # onnxruntime's own calibration-cache layout
        cache.write_text(json.dumps(doc["ranges"]))
        out = tmp / "int8.onnx"
        quantize_static(str(pre), str(out), None, calibration_cache_path=str(cache), **kwargs)
        data = out.read_bytes()
    return data, {"seconds": round(time.perf_counter() - t0, 3), "calibration": str(calibration),
                  "recipe": meta["recipe"]}


def int8_session(model_path: Union[str, Path], precision: str, providers: list, what: str, log,
                 session_options=None, calibration: Optional[Union[str, Path]] = None):
    """The int8 ONNX Runtime CPU session a model loader asked for, or None to run fp32.

    precision: "fp32" (None), "int8" or "auto" (int8 on the CPU execution provider alone).
    None also where int8 cannot be had, said once on ``log`` naming ``what`` ("detector",
    "identity check"): another provider than the CPU one, no calibration shipped (a warning for
    int8, INFO for auto), or a build or load failure (a warning). Returns (session, build seconds)
    or (None, None).
    """
    if precision == "fp32":
        return None, None
    if list(providers) != ["CPUExecutionProvider"]:
        if precision == "int8":
            log.warning("int8 %s is for the CPU execution provider only: fp32 on %s", what, providers[0])
        return None, None
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # stdout carries only deid's report
            data, info = build_int8(model_path, calibration)
        import onnxruntime

        session = onnxruntime.InferenceSession(data, sess_options=session_options,
                                               providers=["CPUExecutionProvider"])
    except NoCalibration as e:
        (log.warning if precision == "int8" else log.info)("%s: fp32 %s", e, what)
        return None, None
    except Exception as e:  # Int8Error, or onnx/onnxruntime failing in any of their ways
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        log.warning("int8 %s unavailable, using fp32: %s", what, reason)
        return None, None
    log.info("int8 %s built from %s in %.2f s", what, Path(model_path).name, info["seconds"])
    return session, info["seconds"]


def calibrate(model: Union[str, Path], feeds: list, recipe: dict, exclude=None) -> tuple[dict, dict]:
    """Measure activation ranges of ``model`` (the research/calibrate_*.py scripts; not at load).

    feeds: input dicts ({input name: array}), one per calibration call, so the calibrator holds
    one feed's activations at a time. recipe: the JSON-able quantization recipe (quantize_kwargs);
    exclude(graph) -> node names to leave in fp32, added to recipe["nodes_to_exclude"], named in
    the graph this module quantizes (prepare_fp32). Returns (recipe, ranges: onnxruntime's
    calibration-cache layout), for write_calibration.
    """
    import contextlib
    import sys

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(())

        def __len__(self):
            return len(feeds)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(feeds[start_index:end_index])

        def get_next(self):
            return next(self.it, None)

    recipe = json.loads(json.dumps(recipe))  # a copy, JSON-able
    with tempfile.TemporaryDirectory(prefix="deid-calib-") as tmp:
        tmp = Path(tmp)
        pre = prepare_fp32(model, tmp / "fp32.onnx")
        if exclude is not None:
            recipe["nodes_to_exclude"] = list(recipe.get("nodes_to_exclude", [])) + exclude(onnx.load(str(pre)).graph)
        cache = tmp / "ranges.json"
        kwargs = quantize_kwargs(recipe)
        kwargs["extra_options"]["CalibStridedMinMax"] = 1  # one feed per calibration call (see Reader)
        with contextlib.redirect_stdout(sys.stderr):  # onnxruntime's calibrators print
            quantize_static(str(pre), str(tmp / "int8.onnx"), Reader(), calibration_cache_path=str(cache), **kwargs)
        return recipe, json.loads(cache.read_text())


def write_calibration(out: Union[str, Path], meta: dict, ranges: dict) -> Path:
    """Write a calibration JSON ({"deid": meta, "ranges": ranges}, meta with "format" and the
    "versions" of the libraries that made it set here) atomically, readable by all (it is package
    data), and say so on stderr."""
    import os
    import sys

    import cv2
    import numpy as np
    import onnx
    import onnxruntime

    out = Path(out)
    versions = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                "numpy": np.__version__, "opencv": cv2.__version__}
    doc = {"deid": {**meta, "versions": versions, "format": CALIBRATION_FORMAT}, "ranges": ranges}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(part, 0o644)  # mkstemp makes it private
        os.replace(part, out)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    r = meta.get("recipe", {})
    print(f"wrote {out} ({len(ranges.get('data', ()))} tensor ranges, {r.get('calibrate_method')}, "
          f"excluded {r.get('nodes_to_exclude')})", file=sys.stderr)
    return out


def add_calibration_options(parser) -> None:
    """The argparse options the research/calibrate_*.py scripts share (see :func:`recipe`)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=("MinMax", "Percentile", "Entropy"), default="Percentile")
    parser.add_argument("--percentile", type=float, default=99.999, help="--method Percentile: the percentile kept")
    parser.add_argument("--activations", choices=("QUInt8", "QInt8"), default="QUInt8")


def recipe(method: str, activations: str = "QUInt8", percentile: float = 99.999) -> dict:
    """A JSON-able quantization recipe (see quantize_kwargs): QDQ, ``activations``, int8 weights
    per output channel, ``method`` ranges; Percentile keeps ``percentile`` and cuts each tail of
    the signed histogram on its own (CalibTensorRangeSymmetric False)."""
    r = {"opset": OPSET, "quant_format": "QDQ", "activation_type": activations, "weight_type": "QInt8",
         "per_channel": True, "reduce_range": False, "calibrate_method": method, "nodes_to_exclude": [],
         "extra_options": {}}
    if method == "Percentile":
        r["extra_options"].update(CalibPercentile=percentile, CalibTensorRangeSymmetric=False)
    return r
