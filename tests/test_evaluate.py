"""evaluate(): metric helpers and a tiny end-to-end run on a few LFW DevTest faces."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
os.environ.setdefault("DEID_MODELS_DIR", str(SHARED / "models"))


def test_far_threshold_and_rank1():
    from deidcli.research.measures import far_threshold
    from deidcli.research.evaluate import rank1

    rng = np.random.default_rng(0)
    d = rng.normal(size=(6, 8))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    names = [f"n{i}" for i in range(6)]
    pairs = [("n0", "n1", False), ("n2", "n3", False), ("n0", "n0", True)]
    v = far_threshold(d, names, pairs)
    imp = max(float(d[0] @ d[1]), float(d[2] @ d[3]))
    assert v["threshold"] > imp and v["tar_clean"] == 1.0
    labels = np.array([0, 0, 1, 1, 2, 2])
    g = np.repeat(np.eye(3), 2, axis=0)
    assert rank1(g[[0, 2]], g, labels, np.array([0, 2])) == 1.0


def test_classic_on_crops_changes_face_only():
    from deidcli.research.evaluate import classic_on_crops

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, size=(2, 128, 128, 3), dtype=np.uint8)
    for m in ("blur", "pixelate"):
        out = classic_on_crops(crops, m, 128, 0.2)
        assert out.shape == crops.shape and out.dtype == np.uint8
        assert (out[:, 64, 64] != crops[:, 64, 64]).any()
        assert (out[:, 0, 0] == crops[:, 0, 0]).all()


@pytest.mark.skipif(not (SHARED / "data" / "lfw").exists(), reason="shared LFW missing")
def test_evaluate_tiny(tmp_path):
    import torch

    from deidcli.research.evaluate import evaluate
    from deidcli.generator.model import Generator, save_generator
    from deidcli.research.train.prepare import prepare_split

    torch.manual_seed(0)
    w = save_generator(tmp_path / "g.pt", Generator({"size": 64, "base_channels": 8}), {"steps": 0})
    # a tiny test cache: first 6 DevTest people, named as evaluate() expects
    p = prepare_split("test", cache_dir=tmp_path / "cache", size=64, margin=0.2, limit_people=12)
    p.rename(p.with_name("lfw_test_64_m0.2.npz"))
    rep = evaluate(weights=w, out_dir=tmp_path / "ev", cache_dir=tmp_path / "cache", limit=12)
    assert set(rep["methods"]) == {"generate", "blur", "pixelate"}
    for m in rep["methods"].values():
        assert -1 <= m["cos_to_original"] <= 1 and 0 <= m["rank1"] <= 1 and 0 <= m["verified"] <= 1
    assert rep["clean"]["rank1"] > 0.5
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["data"]["faces"] == 12
    assert (tmp_path / "ev" / "report.md").read_text().startswith("| metric")
    assert (tmp_path / "ev" / "contact_sheet.png").stat().st_size > 0


@pytest.mark.skipif(not (SHARED / "data" / "lfw").exists(), reason="shared LFW missing")
def test_dlib_judge_in_evaluate(tmp_path):
    """The independent judge (dlib ResNet, not trained with by deid) tells DevTest people apart on
    deid's own crops, and evaluate() reports its metrics beside MobileFaceNet's."""
    pytest.importorskip("dlib", reason="judge extra not installed (pip install 'deid-video[judge]')")
    import torch

    from deidcli.faces.align import arcface_box
    from deidcli.research.evaluate import evaluate
    from deidcli.research.judges import load_judge, normalise
    from deidcli.generator.model import Generator, save_generator
    from deidcli.research.train.prepare import load_split, prepare_split

    p = prepare_split("test", cache_dir=tmp_path / "cache", size=128, margin=0.2, limit_people=12)
    p = p.rename(p.with_name("lfw_test_128_m0.2.npz"))
    data = load_split(p)
    off, side = arcface_box(128, 0.2)
    raw = load_judge("dlib").describe(data["crops"], (off, off, off + side, off + side))
    assert raw.shape == (len(data["crops"]), 128) and raw.dtype == np.float32
    d = normalise(raw, raw.mean(0))
    sim, same = d @ d.T, data["labels"][:, None] == data["labels"][None]
    off_diag = ~np.eye(len(d), dtype=bool)
    assert (same & off_diag).any()
    # same person: high cosine; different people: around 0
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.4, (sim[same & off_diag].mean(), sim[~same].mean())

    torch.manual_seed(0)
    w = save_generator(tmp_path / "g.pt", Generator({"size": 128, "base_channels": 8}), {"steps": 0})
    rep = evaluate(weights=w, out_dir=tmp_path / "ev", cache_dir=tmp_path / "cache", limit=16,
                   methods=("generate", "blur"), detect=False, judges=("dlib",))
    j = rep["judges"]["dlib"]
    assert set(j["methods"]) == {"generate", "blur"}
    assert j["clean"]["rank1"] > 0.5 and set(j["verification"]) == set(rep["verification"])
    assert j["methods"]["blur"]["cos_to_original"] < j["clean"]["cos_to_original"] == pytest.approx(1.0)
    assert "dlib: rank-1 re-identification" in (tmp_path / "ev" / "report.md").read_text()
    # expression kept, from dlib's 68 points: eye and lip opening of the output vs the input. The
    # reference (the same crops JPEG-compressed) agrees closely; blur leaves nothing to fit
    c, b = rep["clean"], rep["methods"]["blur"]
    assert c["eyes_r"] > 0.8 and c["lips_r"] > 0.8 and c["eyes_absdiff_iod"] < 0.015, c
    assert b["eyes_r"] < c["eyes_r"] - 0.2 and b["lips_absdiff_iod"] > 2 * c["lips_absdiff_iod"], b
    assert "eye opening r across faces" in (tmp_path / "ev" / "report.md").read_text()
