"""The identity check's int8 network (IdentityEmbedder, deidcli/quantize.py) against fp32, on
LFW DevTest faces from ../shared aligned by deid's own detector, and its options and report."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import LFW, MODELS, VIDEOS, aligned_lfw_crops, cut_clip
from test_cli import run

from deidcli.generator.embedder import IdentityEmbedder

MODEL = MODELS / "rec_mobilefacenet.onnx"
N_PAIRS = 10  # same-person and different-person pairs each, from pairsDevTest.txt

pytestmark = pytest.mark.skipif(not (MODEL.is_file() and (LFW / "pairsDevTest.txt").is_file()),
                                reason="../shared models or LFW missing")


@pytest.fixture(scope="module")
def fp32() -> IdentityEmbedder:
    return IdentityEmbedder(MODEL, precision="fp32")


@pytest.fixture(scope="module")
def auto() -> IdentityEmbedder:
    return IdentityEmbedder(MODEL, precision="auto")  # auto: int8 with the CPU provider alone


@pytest.fixture(scope="module")
def devtest():
    """LFW DevTest pairs (the first N_PAIRS same and N_PAIRS different of pairsDevTest.txt) as the
    pipeline sees them: generator crops aligned on SCRFD landmarks (deid's detector), their
    ArcFace squares at 112 (Pipeline._embed_squares), and the pair indices."""
    from deidcli.faces.align import arcface_squares
    from deidcli.research.train.prepare import read_pairs

    pairs = read_pairs(LFW / "pairsDevTest.txt")
    pairs = [p for p in pairs if p[2]][:N_PAIRS] + [p for p in pairs if not p[2]][:N_PAIRS]
    names = sorted({n for a, b, _ in pairs for n in (a, b)})
    crops = aligned_lfw_crops(names)
    where = {n: i for i, n in enumerate(names)}
    return {"crops": crops, "squares": arcface_squares(crops),
            "pairs": np.array([(where[x], where[y]) for x, y, _ in pairs])}


def test_auto_is_int8_on_the_cpu_and_descriptors_stay_fp32(fp32, auto, devtest):
    assert auto.check_precision == "int8" and fp32.check_precision == "fp32"
    assert 0 < auto.build_seconds < 30 and fp32.build_seconds is None
    assert auto.check_session.get_modelmeta().producer_name == "onnx.quantize"
    assert auto.check_session is not auto.session and fp32.check_session is fp32.session
    assert auto.check_session.get_providers() == ["CPUExecutionProvider"]
    x = devtest["squares"][:8]
    np.testing.assert_array_equal(auto.embed(x), fp32.embed(x))  # embed: the fp32 network, always
    e = auto.embed_check(x)
    assert e.shape == (8, 128) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert auto.embed_check([]).shape == (0, 128)


def test_fp32_equals_insightface_get_feat(fp32, devtest):
    """The session fed directly gives what InsightFace's ArcFaceONNX.get_feat gives (BGR in)."""
    x = devtest["squares"]
    ref = np.asarray(fp32.model.get_feat([np.ascontiguousarray(c[:, :, ::-1]) for c in x]), np.float32)
    raw = fp32.session.run(None, {fp32.input_name: fp32.to_input(x)})[0]
    np.testing.assert_allclose(raw, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fp32.embed(x), ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5, rtol=0)


def test_int8_agrees_with_fp32_on_lfw_devtest(fp32, auto, devtest):
    """Self-cosine > 0.97, and pair cosines within 0.06, on clean DevTest pairs and on the pairs
    the check compares: (generated face, its input face) and (generated face, fp32 descriptor)."""
    from deidcli import weights
    from deidcli.generator.engine import GeneratorRunner, resolve_runtime
    from deidcli.faces.align import arcface_squares, feather
    from deidcli.generator.model import load_generator

    x, (i, j) = devtest["squares"], devtest["pairs"].T
    e32, e8 = fp32.embed(x), auto.embed_check(x)
    assert np.einsum("nd,nd->n", e32, e8).min() > 0.97
    d = np.abs(np.einsum("nd,nd->n", e8[i], e8[j]) - np.einsum("nd,nd->n", e32[i], e32[j]))
    assert d.max() < 0.06, d
    same = np.einsum("nd,nd->n", e8[i], e8[j])[:N_PAIRS]
    assert np.median(same) > 0.335  # the int8 network still tells people apart

    runner = GeneratorRunner(load_generator(weights.generator_path(None), device="cpu"),
                             resolve_runtime("cpu"), backend="onnxruntime")
    crops = devtest["crops"]
    raw, mask = runner.run(crops, e32)
    m = np.stack([feather(k, runner.size) for k in mask])[..., None]
    gen = np.rint(m * raw + (1 - m) * crops).clip(0, 255).astype(np.uint8)
    g = arcface_squares(gen)
    g32, g8 = fp32.embed(g), auto.embed_check(g)
    assert np.einsum("nd,nd->n", g32, g8).min() > 0.97
    for c32, c8 in ((np.einsum("nd,nd->n", g32, e32), np.einsum("nd,nd->n", g8, e8)),  # (generated, input)
                    (np.einsum("nd,nd->n", g32, e32), np.einsum("nd,nd->n", g8, e32))):  # (generated, descriptor)
        assert np.abs(c8 - c32).max() < 0.06


def test_other_model_file_falls_back_to_fp32_with_one_warning(tmp_path, caplog, devtest):
    """Same name, different bytes: the shipped calibration is not for it."""
    import onnx

    m = onnx.load(str(MODEL))
    m.doc_string = "not the file the calibration was made for"
    other = tmp_path / MODEL.name
    onnx.save(m, str(other))
    for precision in ("auto", "int8"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="deidcli.generator"):
            emb = IdentityEmbedder(other, precision=precision)
        assert emb.check_precision == "fp32" and emb.check_session is emb.session
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "another model file" in warnings[0].getMessage()
        assert "\n" not in warnings[0].getMessage()
    x = devtest["squares"][:2]
    np.testing.assert_array_equal(emb.embed_check(x), emb.embed(x))  # and it runs


def test_no_calibration_and_other_providers_run_fp32(tmp_path, caplog):
    other = tmp_path / "rec_other.onnx"
    other.write_bytes(MODEL.read_bytes())
    with caplog.at_level(logging.INFO, logger="deidcli.generator"):
        assert IdentityEmbedder(other, precision="auto").check_precision == "fp32"
    assert "no int8 calibration" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deidcli.generator"):
        assert IdentityEmbedder(other, precision="int8").check_precision == "fp32"
    assert "no int8 calibration" in caplog.text
    with pytest.raises(ValueError, match="precision"):
        IdentityEmbedder(MODEL, precision="int4")
    from deidcli.options import AnonymizeOptions

    with pytest.raises(ValueError, match="check precision"):
        AnonymizeOptions(check_precision="int4")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available:UserWarning")
def test_int8_is_for_the_cpu_provider_only(caplog):
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="deidcli.generator"):
        assert IdentityEmbedder(MODEL, cuda, precision="int8").check_precision == "fp32"
    assert "CPU execution provider only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deidcli.generator"):
        assert IdentityEmbedder(MODEL, cuda, precision="auto").check_precision == "fp32"
    assert caplog.text == ""


@pytest.mark.skipif(not VIDEOS.is_dir(), reason="../shared/videos not present")
def test_check_precision_option_and_report(tmp_path):
    """--check-precision fp32 runs fp32 and says so in the report; a bad value is a usage error. (auto
    is int8 on the CPU in the report: tests/test_bench.py, whose generate run uses the default.)"""
    src = cut_clip(VIDEOS / "lp_d12.mp4", tmp_path / "talking.mp4", 0.3)
    p = run("anonymize", src, tmp_path / "fp32.mp4", "--check-precision", "fp32", "--json", check=0)
    rep = json.loads(p.stdout)
    assert rep["options"]["check_precision"] == "fp32" and rep["check_precision"] == "fp32"
    assert rep["files"][0]["faces_checked"] > 0 and "WARNING" not in p.stderr, p.stderr
    p = run("anonymize", src, tmp_path / "bad.mp4", "--check-precision", "int4")
    assert p.returncode == 2 and "int4" in p.stderr and not (tmp_path / "bad.mp4").exists()


def test_doctor_names_the_check_precision():
    from deidcli.cli.doctor import INFO, check_identity_precision

    (c,) = check_identity_precision(MODELS)
    assert c.status == INFO and ("int8 on the CPU" in c.detail or "fp32 on CUDA" in c.detail), c
