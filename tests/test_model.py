"""Model shapes, checkpoint round trip, and the torch/ONNX identity-network match."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
LFW = SHARED / "data" / "lfw" / "lfw_deepfunneled"

os.environ.setdefault("DEID_MODELS_DIR", str(MODELS))

from deidcli.errors import ModelError  # noqa: E402
from deidcli.generator.model import Discriminator, Generator, load_generator, save_generator  # noqa: E402


def _desc(b, d=128):
    return torch.nn.functional.normalize(torch.randn(b, d), dim=1)


@pytest.mark.parametrize("size", [128, 256])
def test_generator_shapes(size):
    g = Generator({"size": size}).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        raw, mask = g(x, _desc(2))
    assert raw.shape == (2, 3, size, size) and mask.shape == (2, 1, size, size)
    assert raw.min() >= -1 and raw.max() <= 1 and mask.min() >= 0 and mask.max() <= 1
    assert g.config["size"] == size and g.config["margin"] == 0.2
    d = Discriminator()
    assert d(x).shape == (2, 1, size // 8, size // 8)


def test_generator_is_small():
    g = Generator()
    assert sum(p.numel() for p in g.parameters()) < 2_000_000


def test_generator_bad_config():
    with pytest.raises(ValueError):
        Generator({"size": 100})
    with pytest.raises(ValueError):
        Generator({"nope": 1})


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    g = Generator({"size": 128, "base_channels": 8}).eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    d = _desc(2)
    p = save_generator(tmp_path / "g.pt", g, {"steps": 7, "train_fingerprint": "abc"})
    assert not list(tmp_path.glob("*.deid-tmp*"))
    ck = torch.load(p, map_location="cpu", weights_only=True)
    assert ck["format"] == "deid-generator" and ck["version"] == 1
    assert all(v.dtype == torch.float16 for v in ck["state_dict"].values() if v.is_floating_point())
    g2 = load_generator(p)
    assert g2.config == g.config and g2.meta["steps"] == 7
    with torch.no_grad():
        r1, m1 = g(x, d)
        r2, m2 = g2(x, d)
    assert (r1 - r2).abs().max() < 2e-2 and (m1 - m2).abs().max() < 2e-2  # fp16 storage
    p32 = save_generator(tmp_path / "g32.pt", g, {}, half=False)
    with torch.no_grad():
        r3, _ = load_generator(p32)(x, d)
    assert torch.equal(r1, r3)


def test_load_generator_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="corrupt"):
        load_generator(bad)
    other = tmp_path / "other.pt"
    torch.save({"format": "something"}, other)
    with pytest.raises(ModelError, match="not a deid generator"):
        load_generator(other)
    g = Generator({"base_channels": 8})
    p = save_generator(tmp_path / "g.pt", g, {})
    ck = torch.load(p, weights_only=True)
    ck["config"]["base_channels"] = 16
    torch.save(ck, p)
    with pytest.raises(ModelError, match="does not fit"):
        load_generator(p)


def _lfw_crops(n=8):
    """ArcFace 112 crops of LFW images, aligned on SCRFD landmarks (deid's detector)."""
    import cv2
    from deidcli.faces.align import arcface_crop
    from deidcli.faces.detect import Detector

    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx", det_size=320)
    crops = []
    for p in sorted(LFW.glob("A*/*_0001.jpg"))[:n]:
        img = np.ascontiguousarray(cv2.imread(str(p))[:, :, ::-1])
        dets = det.detect(img)
        assert len(dets)
        crops.append(arcface_crop(img, dets.kps[0]))
    return np.stack(crops)


@pytest.mark.skipif(not (MODELS / "rec_mobilefacenet.onnx").exists(), reason="shared models missing")
def test_identity_matches_onnx():
    import onnxruntime as ort
    from deidcli.generator.identity import FEATURE_LEVELS, load_identity_net, to_input

    net = load_identity_net(MODELS)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    state = torch.load(MODELS / "rec_mobilefacenet.pt", map_location="cpu", weights_only=True)
    assert len(state) == 307
    x = to_input(_lfw_crops())
    sess = ort.InferenceSession(str(MODELS / "rec_mobilefacenet.onnx"),
                                providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        out = net(x).numpy()
        maps, emb = net.feature_maps(x, list(FEATURE_LEVELS), with_embedding=True)
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(emb.numpy() - ref).max() < 1e-4
    for m, (c, s) in zip(maps, FEATURE_LEVELS.values()):
        assert m.shape == (len(x), c, s, s)
    # different people are far apart, the same crop is identical
    e = torch.nn.functional.normalize(torch.from_numpy(out), dim=1)
    sim = e @ e.T
    assert sim.diagonal().min() > 0.999 and (sim - torch.eye(len(e))).max() < 0.7


def test_identity_differentiable():
    from deidcli.generator.identity import crop_to_id_input, load_identity_net

    net = load_identity_net(MODELS)
    x = (torch.rand(2, 3, 128, 128) * 2 - 1).requires_grad_(True)
    net(crop_to_id_input(x, 0.2)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_export_module_is_the_same_function():
    """for_export (what the CPU backend exports) swaps 1x1 conv + PixelShuffle, and the 3x3 head,
    for transposed convs: same outputs, every sub-pixel (the ICNR init makes the 4 sub-pixels equal, so the
    weights are scrambled first, or a wrong sub-pixel order would pass), source left as it was."""
    from deidcli.generator.model import HeadAsDeconv, SubPixelDeconv, for_export

    torch.manual_seed(0)
    gen = Generator({"size": 64}).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    exp = for_export(gen)
    assert all(isinstance(b.expand, SubPixelDeconv) for b in exp.up) and isinstance(exp.head, HeadAsDeconv)
    assert all(isinstance(b.expand, torch.nn.Conv2d) for b in gen.up)  # the source is not changed
    assert isinstance(gen.head, torch.nn.Conv2d)
    x, d = torch.rand(3, 3, 64, 64) * 2 - 1, torch.nn.functional.normalize(torch.randn(3, 128), dim=1)
    with torch.no_grad():
        (ra, ma), (rb, mb) = gen(x, d), exp(x, d)
        h = gen.up[0].shuffle(gen.up[0].expand(torch.randn(2, gen.chans[-1], 4, 4)))
        assert h.std() > 0.1 and h[:, :, 0::2, 0::2].sub(h[:, :, 1::2, 1::2]).abs().max() > 1e-3
    assert (ra - rb).abs().max() < 1e-5 and (ma - mb).abs().max() < 1e-5
    assert ra.std() > 0.05


def test_generator_backends_agree():
    """The CPU default (the module exported to ONNX Runtime) gives the torch module's output."""
    from deidcli.generator.engine import GeneratorRunner, resolve_runtime

    torch.manual_seed(0)
    gen = Generator({"size": 128}).eval()
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (5, 128, 128, 3), dtype=np.uint8)
    desc = rng.normal(size=(5, 128)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    rt = resolve_runtime("cpu")
    ort_runner = GeneratorRunner(gen, rt, batch_size=2)  # 3 batches, the last one short
    assert ort_runner.backend == "onnxruntime"
    raw_o, mask_o = ort_runner.run(crops, desc)
    raw_t, mask_t = GeneratorRunner(gen, rt, batch_size=4, backend="torch").run(crops, desc)
    assert raw_o.shape == raw_t.shape == (5, 128, 128, 3) and raw_o.dtype == np.uint8
    assert mask_o.shape == mask_t.shape == (5, 128, 128) and mask_o.dtype == np.float32
    assert np.abs(raw_o.astype(int) - raw_t).max() <= 1
    assert np.abs(mask_o - mask_t).max() < 1e-4
    assert raw_o.std() > 1  # not a constant image
    empty = ort_runner.run(crops[:0], desc[:0])
    assert empty[0].shape == (0, 128, 128, 3) and empty[1].shape == (0, 128, 128)
    with pytest.raises(ValueError):
        GeneratorRunner(gen, rt, backend="tensorrt")


@pytest.mark.parametrize("res_conv", ["ds", "full"])
def test_widened_generator_is_the_same_function(res_conv):
    """model.widen_state_dict (Net2Net): more channels per level, the same outputs (weights
    scrambled first, so that a wrong copy or a missing division shows); noise moves them a little;
    other changes, or counts that are not multiples, are refused."""
    from deidcli.generator.model import widen_state_dict

    torch.manual_seed(0)
    old = {"size": 64, "base_channels": 8, "max_channels": 32, "res_conv": res_conv, "final_res": True}
    g = Generator(old).eval()
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    new = {**old, "base_channels": 16, "max_channels": 64}
    w = Generator(new).eval()
    assert w.chans == [16, 32, 64, 64] and g.chans == [8, 16, 32, 32]
    w.load_state_dict(widen_state_dict(g.state_dict(), old, new))
    x, d = torch.rand(3, 3, 64, 64) * 2 - 1, _desc(3)
    with torch.no_grad():
        (ra, ma), (rb, mb) = g(x, d), w(x, d)
        assert ra.std() > 0.05 and ma.std() > 0.01
        assert (ra - rb).abs().max() < 1e-4 and (ma - mb).abs().max() < 1e-4
        w.load_state_dict(widen_state_dict(g.state_dict(), old, new, noise=0.01))
        rc, _ = w(x, d)
        assert 1e-4 < (ra - rc).abs().mean() < 0.05
    with pytest.raises(ValueError, match="multiple"):
        widen_state_dict(g.state_dict(), old, {**old, "base_channels": 12})
    with pytest.raises(ValueError, match="film"):
        widen_state_dict(g.state_dict(), old, {**new, "film": False})
