"""`deid doctor`: the real checks on this machine, with model folders built in tmp_path."""

import json
import os
import subprocess
import sys

import pytest

from conftest import MODELS

DEID = [sys.executable, "-m", "deidcli.cli"]
REQUIRED = ("det_scrfd_2.5g_kps.onnx", "rec_mobilefacenet.onnx")


def doctor(*args, models_env, tmp_path, pre=None):
    """Run `deid doctor`; DEID_MODELS_DIR=models_env and an empty cache (nothing found by accident)."""
    env = dict(os.environ, DEID_MODELS_DIR=str(models_env), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cmd = DEID if pre is None else [sys.executable, "-c", pre + "\nfrom deidcli.cli import main; main()"]
    return subprocess.run([*cmd, "doctor", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def lines(p, prefix):
    return [ln for ln in p.stdout.splitlines() if ln.split(":")[0].split(None, 1)[-1] == prefix]


@pytest.fixture
def shared_models():
    if not all((MODELS / n).is_file() for n in REQUIRED):
        pytest.skip("../shared/models not present")
    return MODELS


def test_all_good_with_the_shared_models(shared_models, tmp_path):
    p = doctor(models_env=shared_models, tmp_path=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for name in ("torch", "av", "insightface", "onnxruntime", "numpy", "click"):
        (ln,) = lines(p, name)
        assert ln.startswith("OK ") and name in ln
    for name in ("encoder libx264", "decoder h264", "decoder aac", "muxer mp4", "muxer matroska"):
        (ln,) = lines(p, name)
        assert ln.startswith("OK "), ln
    (nv,) = lines(p, "encoder h264_nvenc")
    assert nv.startswith("INFO ")
    for name in REQUIRED + ("det_scrfd_500m_kps_640.onnx", "rec_mobilefacenet.pt"):
        (ln,) = lines(p, f"model {name}")
        assert ln.startswith("OK ") and f"{shared_models / name} (SHA-256 verified)" in ln, ln
    (gen,) = lines(p, "generator checkpoint")
    assert gen.startswith("OK ") and "weights_only" in gen and "size=128" in gen
    (auto,) = lines(p, "--device auto")
    assert auto.startswith("OK ") and "generator on " in auto
    (prec,) = lines(p, "detector precision")
    assert prec.startswith("INFO ") and ("int8 on the CPU" in prec or "fp32 on CUDA" in prec), prec
    (check,) = lines(p, "identity check precision")
    assert check.startswith("INFO ") and ("int8 on the CPU" in check or "fp32 on CUDA" in check), check
    (cache,) = lines(p, "cache dir")
    assert cache.startswith("OK ") and str(tmp_path / "xdg" / "deid") in cache
    assert "FAIL" not in out and out.rstrip().endswith("exit 0")
    assert "; fix:" not in out  # no problem, no fix


def test_json(shared_models, tmp_path):
    p = doctor("--json", models_env=shared_models, tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)  # stdout holds only the report
    assert rep["exit_code"] == 0 and rep["deid"]
    by_name = {c["name"]: c for c in rep["checks"]}
    assert by_name["model det_scrfd_2.5g_kps.onnx"]["status"] == "OK"
    assert by_name["torch"]["group"] == "packages"
    assert all(c["status"] in ("OK", "WARN", "FAIL", "INFO") for c in rep["checks"])


def test_no_models_anywhere_is_exit_3_with_the_fix(tmp_path):
    empty_env, empty_opt = tmp_path / "env_models", tmp_path / "opt_models"
    empty_env.mkdir()
    empty_opt.mkdir()
    p = doctor("--models-dir", empty_opt, models_env=empty_env, tmp_path=tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    for name in REQUIRED:
        (ln,) = lines(p, f"model {name}")
        assert ln.startswith("FAIL ") and "not found" in ln
        assert "deid models download" in ln and "DEID_MODELS_DIR" in ln
    # files only training/--detector use are warnings, not failures
    (opt,) = lines(p, "model rec_mobilefacenet.pt")
    assert opt.startswith("WARN ") and "optional" in opt
    (path,) = lines(p, "model search path")
    assert str(empty_opt) in path and str(empty_env) in path and "xdg" in path


def test_no_models_but_fetched_on_first_use_is_a_warning(tmp_path, monkeypatch):
    """Where deid may fetch (DEID_OFFLINE unset), a missing model is a warning naming the source."""
    (tmp_path / "env_models").mkdir()
    monkeypatch.delenv("DEID_OFFLINE")
    monkeypatch.setenv("DEID_MODELS_URL", "http://127.0.0.1:9/mirror")
    p = doctor(models_env=tmp_path / "env_models", tmp_path=tmp_path)
    for name in REQUIRED:
        (ln,) = lines(p, f"model {name}")
        assert ln.startswith("WARN ") and f"fetched on first use from http://127.0.0.1:9/mirror/{name}" in ln
    (opt,) = lines(p, "model rec_mobilefacenet.pt")
    assert opt.startswith("INFO ")
    assert not any(ln.startswith("FAIL ") and "model " in ln for ln in p.stdout.splitlines())
    assert p.returncode != 3, p.stdout


def test_corrupt_model_is_reported(shared_models, tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    for f in shared_models.iterdir():
        if f.name.endswith((".onnx", ".pt")):
            (d / f.name).symlink_to(f)
    bad = d / "rec_mobilefacenet.onnx"
    bad.unlink()
    data = bytearray((shared_models / bad.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    p = doctor(models_env=d, tmp_path=tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    (ln,) = lines(p, "model rec_mobilefacenet.onnx")
    assert ln.startswith("FAIL ") and "SHA-256 mismatch" in ln and str(bad) in ln
    assert f"delete {bad}" in ln and "deid models download" in ln
    (ok,) = lines(p, "model det_scrfd_2.5g_kps.onnx")
    assert ok.startswith("OK ")


def test_optional_model_missing_is_only_a_warning(shared_models, tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    for name in REQUIRED:
        (d / name).symlink_to(shared_models / name)
    p = doctor(models_env=d, tmp_path=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    (ln,) = lines(p, "model det_scrfd_500m_kps_640.onnx")
    assert ln.startswith("WARN ") and "deid models download" in ln


def test_bad_generator_checkpoint_is_exit_3(shared_models, tmp_path):
    ckpt = tmp_path / "gen.pt"
    ckpt.write_bytes(b"not a checkpoint")
    p = doctor("--weights", ckpt, models_env=shared_models, tmp_path=tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    (ln,) = lines(p, "generator checkpoint")
    assert ln.startswith("FAIL ") and str(ckpt) in ln and "--method blur" in ln


def test_unimportable_package_is_exit_1(shared_models, tmp_path):
    # cv2 made unimportable in the doctor's own process (None in sys.modules: ImportError)
    p = doctor(models_env=shared_models, tmp_path=tmp_path, pre="import sys; sys.modules['cv2'] = None")
    assert p.returncode == 1, p.stdout + p.stderr
    (ln,) = lines(p, "cv2")
    assert ln.startswith("FAIL ") and "cannot import cv2" in ln and "pip install 'opencv-python-headless>=" in ln


def test_exit_code_precedence():
    from deidcli.cli.doctor import FAIL, OK, WARN, Check, exit_code

    ok = Check("x", "a", OK, "fine")
    warn = Check("x", "b", WARN, "meh", "do this")
    other = Check("packages", "cv2", FAIL, "missing", "pip install")
    model = Check("models", "model m", FAIL, "missing", "download", models=True)
    assert exit_code([ok, warn]) == 0
    assert exit_code([ok, other]) == 1
    assert exit_code([other, model]) == 3


def test_doctor_not_imported_heavily_by_help():
    code = ("import sys, deidcli.cli; assert 'doctor' in deidcli.cli.cli.commands; "
            "print([m for m in ('torch', 'av', 'insightface', 'onnxruntime') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"
