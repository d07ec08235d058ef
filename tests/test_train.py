"""Training smoke run: data preparation on a tiny LFW subset, a few steps, checkpoint + resume."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
os.environ.setdefault("DEID_MODELS_DIR", str(MODELS))

pytestmark = pytest.mark.skipif(not (SHARED / "data" / "lfw").exists(), reason="shared LFW missing")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from deidcli.research.train.prepare import prepare_split

    d = tmp_path_factory.mktemp("cache")
    for split in ("train", "test"):
        prepare_split(split, cache_dir=d, size=64, margin=0.2, limit_people=4 if split == "test" else 6)
    return d


def test_prepare_cache(cache_dir):
    from deidcli.generator.identity import ID_DIM
    from deidcli.research.train.prepare import load_split, read_people

    files = sorted(cache_dir.glob("lfw_train_64_*.npz"))
    assert len(files) == 1
    d = load_split(files[0])
    n = len(d["names"])
    assert n >= 6 and d["crops"].shape == (n, 64, 64, 3) and d["crops"].dtype == np.uint8
    assert d["desc"].shape == (n, ID_DIM)
    assert np.allclose(np.linalg.norm(d["desc"], axis=1), 1, atol=1e-4)
    assert d["size"] == 64 and d["margin"] == 0.2 and len(d["fingerprint"]) == 64
    # eyes land where the crop template puts them
    from deidcli.faces.align import crop_template

    assert np.abs(d["crop_kps"][:, :2] - crop_template(64, 0.2)[:2]).mean() < 3
    train_people = {p for p, _ in read_people(SHARED / "data/lfw/peopleDevTrain.txt")}
    assert {x.split("/")[0] for x in d["names"]} <= train_people


def _cfg(tmp_path, cache_dir, steps):
    return {"name": "smoke", "runs_dir": str(tmp_path / "runs"), "cache_dir": str(cache_dir),
            "limit_people": 6, "batch_size": 2, "steps": steps, "threads": 2,
            "generator": {"size": 64, "base_channels": 8, "max_channels": 32},
            "discriminator": {"channels": 8, "n_layers": 2, "spectral": True},
            "weights": {"colour_l1": 1.0}, "log_every": 1, "eval_every": 2, "eval_size": 4, "sample_every": 2,
            "save_every_s": 1e9}


def test_train_smoke_and_resume(tmp_path, cache_dir):
    from deidcli.generator.model import load_generator
    from deidcli.research.train.loop import train

    s1 = train(_cfg(tmp_path, cache_dir, 3))
    run = Path(s1["run_dir"])
    assert s1["step"] == 3 and (run / "last.pt").exists()
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["kind"] == "train"]
    assert all(np.isfinite(r["loss"]) for r in tr) and all("colour_l1" in r for r in tr)
    assert any(r["kind"] == "eval" for r in recs)
    assert list((run / "samples").glob("*.png"))
    g = load_generator(run / "generator.pt")
    assert g.config["size"] == 64 and g.meta["steps"] == 3 and g.meta["train_fingerprint"]
    st = torch.load(run / "last.pt", weights_only=True)
    assert st["step"] == 3
    s2 = train(_cfg(tmp_path, cache_dir, 5))
    assert s2["step"] == 5
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps[:3] == [1, 2, 3] and steps[3:] == [4, 5]
    # compact committable state: G + D in fp16, fresh optimisers
    from deidcli.research.train.loop import export_train_state

    small = export_train_state(run / "last.pt", tmp_path / "state.pt")
    cfg = _cfg(tmp_path, cache_dir, 6)
    cfg.update(name="from_state", init_from=str(small))
    assert train(cfg)["step"] == 6
    # a wider generator starts from the state's, widened: step 0's outputs are the state's
    from deidcli.errors import DeidError
    from deidcli.generator.model import Generator

    wide = _cfg(tmp_path, cache_dir, 7)
    wide.update(name="wider", init_from=str(small), init_widen_noise=0.0, lr_g=0.0)
    wide["generator"] = {**wide["generator"], "base_channels": 16, "max_channels": 64}
    assert train(wide)["step"] == 7
    gw = load_generator(Path(wide["runs_dir"]) / "wider" / "generator.pt")
    assert gw.chans == [16, 32, 64, 64]
    g0 = Generator(_cfg(tmp_path, cache_dir, 0)["generator"]).eval()
    g0.load_state_dict({k: v.float() for k, v in torch.load(small, weights_only=True)["G"].items()})
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    dsc = torch.nn.functional.normalize(torch.randn(2, 128), dim=1)
    with torch.no_grad():  # lr_g 0: the saved wide generator is the widened state (fp16 round trip)
        assert (g0(x, dsc)[0] - gw.float()(x, dsc)[0]).abs().max() < 2e-2
    bad = {**wide, "name": "bad", "generator": {**wide["generator"], "base_channels": 12}}
    with pytest.raises(DeidError, match="does not fit this config"):
        train(bad)


def test_resume_takes_the_runs_own_config(tmp_path, cache_dir):
    """`deid train --name RUN` resumes RUN with the config it was started with (not the defaults,
    whose networks do not fit its checkpoint); entries given again override it; a change of the
    networks is refused in one line."""
    from click.testing import CliRunner

    from deidcli.cli.main import cli
    from deidcli.errors import DeidError
    from deidcli.research.train.config import load_config
    from deidcli.research.train.loop import train

    cfg = _cfg(tmp_path, cache_dir, 2)
    cfg.update(name="again", max_minutes=30.0)
    cfg["weights"] = {**cfg["weights"], "eye_adv": 1.0}
    train(cfg)
    where = {"name": "again", "runs_dir": cfg["runs_dir"]}
    fresh = load_config(None, {"name": "never", "runs_dir": cfg["runs_dir"]})
    assert fresh["discriminator"]["channels"] == 32 and fresh["generator"] == {}  # the defaults
    again = load_config(None, {**where, "steps": 3})
    assert again["generator"] == cfg["generator"] and again["discriminator"] == cfg["discriminator"]
    assert again["weights"]["eye_adv"] == 1.0 and again["limit_people"] == 6 and again["steps"] == 3
    assert again["max_minutes"] is None  # where and how long: this invocation's
    assert load_config(None, {**where, "weights": {"adv": 0.5}})["weights"]["eye_adv"] == 1.0
    assert train(again)["step"] == 3
    # a learning rate given on resuming is used, not the one in the saved optimiser state
    last = Path(cfg["runs_dir"]) / "again" / "last.pt"
    g3 = torch.load(last, weights_only=True)["G"]
    assert train({**again, "steps": 4, "lr_g": 0.0})["step"] == 4
    g4 = torch.load(last, weights_only=True)["G"]
    assert all(torch.equal(g3[k], g4[k]) for k in g3)
    assert train({**again, "steps": 5})["step"] == 5
    g5 = torch.load(last, weights_only=True)["G"]
    assert any(not torch.equal(g4[k], g5[k]) for k in g4 if g4[k].is_floating_point())
    with pytest.raises(DeidError, match="does not fit the networks"):
        train(load_config(None, {**where, "discriminator": {"channels": 16}}))
    res = CliRunner().invoke(cli, ["train", "--name", "again", "--runs-dir", cfg["runs_dir"],
                                    "--set", "discriminator.channels=16"])
    assert res.exit_code == 1 and res.output.startswith("deid: ERROR: ") and len(res.output.splitlines()) == 1
    assert "does not fit the networks" in res.output and "size mismatch" in res.output
    res = CliRunner().invoke(cli, ["train", "--name", "again", "--runs-dir", cfg["runs_dir"], "--set", "nope=1"])
    assert res.exit_code == 2 and "unknown config key 'nope'" in res.output


def test_training_commands_refuse_bad_input_in_one_line(tmp_path):
    """`deid train`, `evaluate` and `prepare`: a missing or broken config file, a config value of the
    wrong kind, an unusable device, a missing checkpoint or LFW folder are one line and an exit
    code (2 usage, 3 model, 1 other), never a traceback; nothing is written."""
    import torch
    from click.testing import CliRunner

    from deidcli.cli.main import cli

    def run(*args):
        res = CliRunner().invoke(cli, [str(a) for a in args])
        assert "Traceback" not in res.output and not isinstance(res.exception, Exception) or \
            isinstance(res.exception, SystemExit), res.output
        return res.exit_code, res.output

    runs = tmp_path / "runs"
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": ')
    code, out = run("train", "--config", tmp_path / "nope.json", "--runs-dir", runs)
    assert code == 2 and "does not exist" in out
    code, out = run("train", "--config", bad, "--runs-dir", runs)
    assert code == 2 and f"{bad}: not valid JSON" in out
    code, out = run("train", "--set", "steps=abc", "--runs-dir", runs)
    assert code == 2 and "config key 'steps': expected a number, got 'abc'" in out
    code, out = run("train", "--set", "weights.adv=[1]", "--runs-dir", runs)
    assert code == 2 and "config key 'adv': expected a number" in out
    if not torch.cuda.is_available():
        code, out = run("train", "--device", "cuda", "--runs-dir", runs)
        assert code == 2 and "CUDA is not available" in out
        code, out = run("evaluate", "--device", "cuda", "--out", tmp_path / "ev")
        assert code == 2 and "CUDA is not available" in out
    code, out = run("evaluate", "--weights", tmp_path / "nope.pt", "--out", tmp_path / "ev")
    assert code == 3 and out == f"deid: ERROR: generator checkpoint {tmp_path / 'nope.pt'} not found\n"
    code, out = run("prepare", "--lfw-dir", tmp_path / "nolfw", "--split", "test", "--cache-dir", tmp_path / "c")
    assert code == 1 and out == f"deid: ERROR: {tmp_path / 'nolfw' / 'peopleDevTest.txt'}: no such file or directory\n"
    assert not runs.exists() and not (tmp_path / "ev").exists() and not (tmp_path / "c").exists()


def test_train_second_pass(tmp_path, cache_dir):
    """second_pass: the generator also trains on its own blended output (as --passes 2 runs it)."""
    from deidcli.research.train.loop import train

    first = {}
    for sp in (0.0, 1.0):
        cfg = _cfg(tmp_path, cache_dir, 2)
        cfg.update(name=f"sp{sp}", second_pass=sp)
        run = Path(train(cfg)["run_dir"])
        rec = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        tr = [r for r in rec if r["kind"] == "train"]
        assert len(tr) == 2 and all(np.isfinite(r["loss"]) for r in tr)
        first[sp] = tr[0]
    # same seed, same batch: only the generator's input and the blend base differ
    assert first[0.0]["attractor"] != first[1.0]["attractor"]


def test_landmark_net_matches_detector(cache_dir):
    """The torch copy of the detector graph gives deid's detector's landmarks (ONNX Runtime +
    InsightFace decoding, as deid evaluate runs it on crops), and the loss moves with them."""
    from deidcli.research.evaluate import detect_crops
    from deidcli.faces.detect import Detector
    from deidcli.research.train.landmarks import PAD, Keypoints, landmark_loss
    from deidcli.research.train.prepare import DETECTOR, load_split

    d = load_split(sorted(cache_dir.glob("lfw_test_64_*.npz"))[0])
    crops = d["crops"][:6]
    side = crops.shape[1] + 2 * PAD
    ref = detect_crops(Detector(MODELS / DETECTOR, det_thresh=0.5, det_size=side), crops)
    assert ref["found"].all()
    kp = Keypoints(MODELS / DETECTOR)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        scores, kps = kp(x)
    best = scores.argmax(1)
    assert np.allclose(scores.max(1).values.numpy(), ref["score"], atol=1e-3)
    assert np.abs(kps[torch.arange(len(x)), best].numpy() - ref["kps"]).max() < 0.05

    assert float(landmark_loss(kp, x, x)) == 0.0
    shifted = torch.roll(x, shifts=2, dims=3).requires_grad_(True)  # 2 px to the right
    loss = landmark_loss(kp, shifted, x)
    iod = np.linalg.norm(ref["kps"][:, 1] - ref["kps"][:, 0], axis=1).mean()
    assert 0.5 * 2 / iod < float(loss.detach()) < 1.5 * 2 / iod
    loss.backward()
    assert shifted.grad is not None and float(shifted.grad.abs().sum()) > 0


def test_train_landmark_loss(tmp_path, cache_dir):
    """weights.landmarks (and .mouth, .structure, .eye_adv, .eye_rep, .feat_adv) > 0 train with those losses
    and log them (train and held-out); the eye and feature discriminators are saved with the run,
    resumed, and kept by the compact state."""
    from deidcli.research.train.loop import export_train_state
    from deidcli.research.train.loop import train

    cfg = _cfg(tmp_path, cache_dir, 2)
    cfg.update(name="lm")
    cfg["weights"] = {**cfg["weights"], "landmarks": 1.0, "mouth": 1.0, "structure": 1.0, "eye_adv": 1.0,
                      "eye_rep": 1.0, "feat_adv": 1.0}
    run = Path(train(cfg)["run_dir"])
    st = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert "D_eye" in st and "opt_de" in st and "D_feat" in st and "opt_df" in st
    d_feat = {k: v.clone() for k, v in st["D_feat"].items()}
    assert train({**cfg, "steps": 3, "eye_adv_on_raw": True})["step"] == 3  # resumes G, D and the eye D
    st = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert any(not torch.equal(d_feat[k], v) for k, v in st["D_feat"].items())  # the feature D trains
    compact = torch.load(export_train_state(run / "last.pt", tmp_path / "c.pt"), weights_only=True)
    assert set(compact["D_feat"]) == set(st["D_feat"])
    rec = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    tr = [r for r in rec if r["kind"] == "train"]
    ev = [r for r in rec if r["kind"] == "eval"]
    assert len(tr) == 3 and all(np.isfinite(r[k]) and r[k] > 0 for r in tr
                                for k in ("landmarks", "mouth", "structure", "eye_adv", "d_eye_loss", "eye_rep",
                                          "feat_adv", "d_feat_loss"))
    assert all(-1 <= r["eye_cos"] <= 1 for r in tr)
    assert ev and np.isfinite(ev[-1]["landmarks"]) and ev[-1]["mouth"] > 0 and ev[-1]["structure"] > 0


def test_mouth_loss_sees_the_mouth_only(cache_dir):
    """weights.mouth: the weight map covers the template's mouth corners and lips, not the eyes
    or nose; the loss is 0 on the input itself, grows when the lips of a real LFW crop are
    painted over, and ignores the same change made to the eyes."""
    import torch

    from deidcli.faces.align import crop_template
    from deidcli.research.train import losses as L
    from deidcli.research.train.prepare import load_split

    d = load_split(sorted(Path(cache_dir).glob("lfw_test_*.npz"))[0])
    S, m = int(d["size"]), float(d["margin"])
    w = L.mouth_weights(S, m)
    assert w.shape == (1, 1, S, S) and abs(float(w.sum()) - 1) < 1e-5
    t = np.round(crop_template(S, m)).astype(int)
    u = S // 32  # 4 px at the 128 crop
    for x, y in t[3:]:  # mouth corners, and the lower lip below them
        assert w[0, 0, y, x] > 0 and w[0, 0, y + 2 * u, x] > 0
    for x, y in t[:3]:  # eyes, nose tip
        assert w[0, 0, y, x] == 0
    x = torch.from_numpy(d["crops"][:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert float(L.mouth_l1(x, x, w)) == 0
    (mx, my), (ex, ey) = t[3], t[0]
    lips, eyes = x.clone(), x.clone()
    lips[..., my - u:my + u + 1, mx:mx + 5 * u] = 0.5
    eyes[..., ey - u:ey + u + 1, ex - u:ex + 4 * u] = 0.5
    assert float(L.mouth_l1(lips, x, w)) > 0.05
    assert float(L.mouth_l1(eyes, x, w)) == 0


def test_structure_loss_sees_eyes_and_mouth_edges(cache_dir):
    """weights.structure: the map covers both eyes (and brows) and the mouth, not the nose tip or
    the cheeks; the loss is 0 on the input, and on real LFW crops it grows when the eyes are
    smudged (blurred) but hardly when only the colour changes (a flat offset) or when a cheek
    far from the features is painted over."""
    import torch
    import torch.nn.functional as F

    from deidcli.faces.align import crop_template
    from deidcli.research.train import losses as L
    from deidcli.research.train.prepare import load_split

    d = load_split(sorted(Path(cache_dir).glob("lfw_test_*.npz"))[0])
    S, m = int(d["size"]), float(d["margin"])
    w = L.feature_weights(S, m)
    assert w.shape == (1, 1, S, S) and abs(float(w.sum()) - 1) < 1e-5
    t = np.round(crop_template(S, m)).astype(int)
    iod = t[1, 0] - t[0, 0]
    for x, y in t[[0, 1, 3, 4]]:  # eyes, mouth corners
        assert w[0, 0, y, x] > 0
    for x, y in t[:2]:  # the brows above the eyes
        assert w[0, 0, y - iod // 3, x] > 0
    nx, ny = t[2]
    assert w[0, 0, ny, nx] == 0  # nose tip
    lids = L.feature_weights(S, m, brows=False)  # structure_brows false: lids and iris, no brows
    assert abs(float(lids.sum()) - 1) < 1e-5
    for x, y in t[:2]:
        assert lids[0, 0, y, x] > 0 and lids[0, 0, y - iod // 8, x] > 0
        assert w[0, 0, y - iod // 2, x] > 0 and lids[0, 0, y - iod // 2, x] == 0
    x = torch.from_numpy(d["crops"][:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert float(L.structure_l1(x, x, w)) == 0
    (ex, ey) = t[0]
    r = iod // 3
    smudged = x.clone()
    smudged[..., ey - r:ey + r, ex - r:ex + r] = F.avg_pool2d(x, 7, 1, 3)[..., ey - r:ey + r, ex - r:ex + r]
    tinted = (x + 0.2).clamp(-1, 1)
    cheek = x.clone()
    cheek[..., ny - 4:ny + 4, 2:14] = 0.5
    s_smudge = float(L.structure_l1(smudged, x, w))
    assert s_smudge > 0.02
    assert float(L.structure_l1(tinted, x, w)) < 0.2 * s_smudge
    assert float(L.structure_l1(cheek, x, w)) == 0


def test_eye_repeller_sees_only_the_eye_band(cache_dir):
    """weights.eye_rep: the descriptor is taken of the input with only its eye band from the
    output. Output = input gives the photo's own descriptor (cosine near 1); another person's
    eyes in the band lower the cosine clearly, but less than that person's whole face does; the
    gradient reaches the output's pixels in the band and nowhere else."""
    import torch

    from deidcli.generator.engine import eye_pass_weight
    from deidcli.generator.identity import load_identity_net
    from deidcli.research.train import losses as L
    from deidcli.research.train.prepare import load_split

    d = load_split(sorted(Path(cache_dir).glob("lfw_test_*.npz"))[0])
    S, m = int(d["size"]), float(d["margin"])
    names = np.asarray(d["names"])
    i = np.array([int(np.flatnonzero(names == n)[0]) for n in np.unique(names)])  # one face each
    j = np.roll(i, 1)  # someone else's face for each
    assert (names[i] != names[j]).all()
    x = torch.from_numpy(d["crops"][i]).permute(0, 3, 1, 2).float() / 127.5 - 1
    other = torch.from_numpy(d["crops"][j]).permute(0, 3, 1, 2).float() / 127.5 - 1
    own = torch.from_numpy(d["desc"][i])
    net = load_identity_net(MODELS)
    band = torch.from_numpy(eye_pass_weight(S, m))
    _, cos_same = L.eye_repeller(net, x, x, band, own, m)
    assert float(cos_same.min()) > 0.9
    out = other.clone().requires_grad_(True)
    rep, cos_eyes = L.eye_repeller(net, out, x, band, own, m)
    _, cos_face = L.eye_repeller(net, other, x, torch.ones_like(band), own, m)
    assert float((cos_same - cos_eyes).mean()) > 0.1
    assert float(cos_eyes.mean()) > float(cos_face.mean()) + 0.1
    rep.backward()
    g = out.grad.abs().sum((0, 1))
    assert float(g[band[0, 0] == 0].max()) == 0 and float(g[band[0, 0] > 0.5].mean()) > 0


def test_losses_basic():
    from deidcli.research.train import losses as L

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = L.augment(x, gen)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert L.gradient_l1(x, x) == 0 and L.total_variation(torch.ones(1, 1, 8, 8)) == 0
    real, fake = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert L.d_loss(real, fake, "lsgan") == 0 and L.g_adv_loss(real, "lsgan") == 0
    assert L.d_loss(real, -real, "hinge") == 0
    # colour loss: zero for the same colours, blind to shapes with the same block means, and
    # only counted under the mask
    m = torch.ones(3, 1, 32, 32)
    assert L.colour_l1(x, x, m) == 0
    shuffled = x.reshape(3, 3, 8, 4, 8, 4).flip(3).reshape(3, 3, 32, 32)  # rows moved inside 4x4 blocks
    assert L.colour_l1(shuffled, x, m) < 1e-6 and L.gradient_l1(shuffled, x) > 0.1
    darker = x - 0.5
    assert abs(float(L.colour_l1(darker, x, m)) - 0.5) < 1e-5
    assert L.colour_l1(darker, x, torch.zeros_like(m)) == 0


def test_commands_import_without_torch():
    import subprocess
    import sys

    code = ("import sys; import deidcli.research.train.commands as c; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "print(c.prepare_command.name, c.train_command.name, c.evaluate_command.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["prepare", "train", "evaluate"]


def test_train_validates_on_held_out_people_and_keeps_the_best(tmp_path, cache_dir):
    """val_people: whole DevTrain people leave training (fixed draw, disjoint, own fingerprints);
    they are validated at the start and every val_every steps; best_generator.pt holds the
    lowest validation cosine, also across a resume; with ema the exported generator is the
    weights' moving average, not the last step's weights."""
    from deidcli.errors import DeidError
    from deidcli.generator.model import load_generator
    from deidcli.research.train.loop import split_people, train
    from deidcli.research.train.prepare import load_split

    d = load_split(sorted(cache_dir.glob("lfw_train_64_*.npz"))[0])
    tr, va = split_people(d, 2)
    tr2, va2 = split_people(d, 2)
    assert np.array_equal(va["labels"], va2["labels"]) and va["fingerprint"] == va2["fingerprint"]
    assert not set(tr["labels"].tolist()) & set(va["labels"].tolist())
    assert len(tr["labels"]) + len(va["labels"]) == len(d["labels"])
    _, counts = np.unique(va["labels"], return_counts=True)
    assert len(counts) == 2 and (counts >= 2).all()
    assert va["crops"].shape[0] == va["desc"].shape[0] == len(va["names"]) == counts.sum()
    assert len({d["fingerprint"], tr["fingerprint"], va["fingerprint"]}) == 3
    with pytest.raises(DeidError, match="two or more images"):
        split_people(d, 10_000)

    cfg = _cfg(tmp_path, cache_dir, 4)
    cfg.update(name="val", val_people=2, val_every=2, val_size=8, ema=0.5)
    s = train(cfg)
    run = Path(s["run_dir"])
    vals = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    vals = [r for r in vals if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [0, 2, 4]
    assert all(0 <= r["verified"] <= 1 and 0 <= r["rank1"] <= 1 and r["n"] > 0 for r in vals)
    low = min(vals, key=lambda r: r["cos"])
    assert s["best"]["step"] == low["step"] and vals[-1]["best_step"] == low["step"]
    best = load_generator(run / "best_generator.pt")
    assert best.meta["steps"] == low["step"] and best.meta["val_cos"] == pytest.approx(low["cos"])
    assert best.meta["val_people"] == 2 and best.meta["val_fingerprint"] == va["fingerprint"]
    assert load_generator(run / "generator.pt").meta["train_fingerprint"] == tr["fingerprint"]
    state = torch.load(run / "best_state.pt", weights_only=True)  # restartable from the best point
    assert state["step"] == low["step"] and {"G", "G_ema", "D"} <= set(state)
    # with dlib (the test extra), each validation also gives the eye and inner-lip opening
    # agreement with the probes: the last one's equals evaluate's on the outputs of the weights
    # it validated (last.pt's moving average, fp32) for those probes and targets
    assert all({"eyes_r", "lips_r", "eyes_absdiff_iod", "lips_absdiff_iod"} <= set(r) for r in vals)
    from deidcli.research.evaluate import opening_agreement, openings_on_crops
    from deidcli.research.measures import _lip_opening
    from deidcli.generator.model import Generator
    from deidcli.research.train.loop import VAL_SEED, _Data

    g = Generator(best.config).eval()
    g.load_state_dict(torch.load(run / "last.pt", weights_only=True)["G_ema"])
    idx = np.sort(np.random.default_rng(VAL_SEED).choice(len(va["labels"]), size=min(8, len(va["labels"])), replace=False))
    tgt, _ = _Data(va, torch.device("cpu")).targets(idx, np.random.default_rng(VAL_SEED + 1), True)
    x = torch.from_numpy(va["crops"][idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw, mask = g(x, torch.from_numpy(va["desc"][tgt]))
    out = ((mask * raw + (1 - mask) * x).clamp(-1, 1) + 1) * 127.5
    lo = _lip_opening()
    got = opening_agreement(openings_on_crops(lo, va["crops"][idx], va["crop_kps"][idx]),
                            openings_on_crops(lo, out.round().byte().permute(0, 2, 3, 1).numpy(), va["crop_kps"][idx]))
    assert got == pytest.approx({k: vals[-1][k] for k in got}, abs=1e-3)
    ref = best.state_dict()
    assert all(torch.equal(state["G_ema"][n].float(), ref[n].float()) for n in ref)
    # generator.pt is the moving average (saved fp16), which differs from the trained weights
    st = torch.load(run / "last.pt", weights_only=True)
    exported = torch.load(run / "generator.pt", weights_only=True)["state_dict"]
    k = next(n for n, v in st["G"].items() if v.is_floating_point() and v.numel() > 16)
    assert torch.equal(exported[k].float(), st["G_ema"][k].half().float())
    assert not torch.equal(st["G_ema"][k], st["G"][k])
    # resume: no second validation of step 4; the best is remembered
    s2 = train({**cfg, "steps": 6})
    vals = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in vals if r["kind"] == "val"] == [0, 2, 4, 6]
    assert s2["best"]["cos"] <= low["cos"]
    # a validation more than val_stop above the best stops the run with an error naming the way back
    with pytest.raises(DeidError, match=r"training diverged: .* at step 8, .*best_state\.pt"):
        train({**cfg, "steps": 20, "val_stop": -1.0})
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 8  # saved where it stopped


def test_config_files_are_valid_training_configs():
    """Every file in configs/ merges into the loop's DEFAULTS (no unknown or mistyped key), and the
    structure-loss branch's recipe (weights/MODEL_CARD.md, 2026-11-30) is the shipped step's
    recipe with only the structure weight (and the name) changed."""
    from deidcli.research.train.config import DEFAULTS, merge

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.json"))
    assert len(files) >= 3
    cfgs = {f.stem: merge(DEFAULTS, json.loads(f.read_text())) for f in files}
    a, b = cfgs["train_128_branch36500"], cfgs["train_128_struct"]
    assert b["weights"]["structure"] == 4.0 and a["weights"]["structure"] == 0.0
    a["weights"]["structure"] = 4.0
    assert {k for k in a if a[k] != b[k]} == {"name"}


# ------------------------------------------------------------------ in-the-wild degradations

OPS = ("occlusion", "colour_cast", "low_light", "blur", "motion_blur", "downscale", "noise", "jpeg")


@pytest.fixture(scope="module")
def crops128(tmp_path_factory):
    """Real aligned 128 px LFW crops (the first 6 DevTrain people), (N, 3, 128, 128) in [-1, 1]."""
    from deidcli.research.train.prepare import load_split, prepare_split

    d = load_split(prepare_split("train", cache_dir=tmp_path_factory.mktemp("cache128"), size=128,
                                 margin=0.2, limit_people=6))
    return torch.from_numpy(d["crops"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _only(op, **kw):
    """degrade's arguments for ``op`` alone, on every sample."""
    return {"p": 1.0, **{o: 1.0 if o == op else 0.0 for o in OPS}, **kw}


def _hf(x):
    """Per-sample mean |Laplacian| (fine detail energy)."""
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3)
    return torch.nn.functional.conv2d(x, k, groups=3).abs().mean((1, 2, 3))


def test_degrade_shape_range_determinism_and_off(crops128):
    from deidcli.research.train import losses as L

    x = crops128
    y, ops = L.degrade(x, torch.Generator().manual_seed(3), p=1.0, return_ops=True)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= -1 and y.max() <= 1
    assert all(1 <= len(o) <= 3 for o in ops) and not torch.equal(y, x)
    assert all(list(o) == [n for n in L.DEGRADATIONS if n in o] for o in ops)  # applied in order
    assert torch.equal(y, L.degrade(x, torch.Generator().manual_seed(3), p=1.0))  # deterministic
    assert not torch.equal(y, L.degrade(x, torch.Generator().manual_seed(4), p=1.0))
    one = L.degrade(x, torch.Generator().manual_seed(3), p=1.0, max_ops=1, return_ops=True)[1]
    assert all(len(o) == 1 for o in one)
    # every op on every sample still keeps shape and range
    every = {**_only(None), **{o: 1.0 for o in OPS}, "max_ops": 8}
    z = L.degrade(x, torch.Generator().manual_seed(5), **every)
    assert z.shape == x.shape and z.min() >= -1 and z.max() <= 1 and torch.isfinite(z).all()
    # p 0 (the shipped recipe) is the identity and draws nothing from the generator
    g = torch.Generator().manual_seed(7)
    st = g.get_state()
    assert L.degrade(x, g, p=0.0) is x and torch.equal(g.get_state(), st)
    # partly on: the others are left exactly as they were
    y, ops = L.degrade(x, torch.Generator().manual_seed(0), p=0.5, return_ops=True)
    clean = [i for i, o in enumerate(ops) if not o]
    assert clean and len(clean) < len(x) and torch.equal(y[clean], x[clean])


def test_degrade_each_does_what_it_says(crops128):
    from deidcli.faces.align import crop_template
    from deidcli.research.train import losses as L

    x = crops128
    n, s = x.shape[0], x.shape[-1]

    def run(op, seed=0, **kw):
        y, ops = L.degrade(x, torch.Generator().manual_seed(seed), return_ops=True, **_only(op, **kw))
        assert all(o == [op] for o in ops)
        return y

    hf = _hf(x)
    assert (_hf(run("downscale")) < 0.9 * hf).all()  # faces of 24-64 px: crops of 44-116 px
    assert (_hf(run("downscale", face_px=[24, 24])) < 0.5 * hf).all()
    assert (_hf(run("blur")) < 0.8 * hf).all() and (_hf(run("motion_blur")) < 0.8 * hf).all()
    noisy = run("noise")
    assert (_hf(noisy) > 1.2 * hf).all() and ((noisy - x).mean((1, 2, 3)).abs() < 0.02).all()
    assert (run("low_light").mean((1, 2, 3)) < x.mean((1, 2, 3)) - 0.1).all()

    def ratio(t, a, b):
        t = (t + 1) / 2
        return t[:, a].mean((1, 2)) / t[:, b].mean((1, 2)).clamp(min=1e-3)

    assert (ratio(run("colour_cast", cast_gains=[[1.0, 0.3, 0.3]]), 0, 1) > 1.25 * ratio(x, 0, 1)).all()
    assert (ratio(run("colour_cast", cast_gains=[[0.3, 0.45, 1.0]]), 2, 1) > 1.25 * ratio(x, 2, 1)).all()
    assert (ratio(run("colour_cast", cast_gains=[[0.35, 1.0, 0.4]]), 1, 0) > 1.25 * ratio(x, 1, 0)).all()

    # JPEG: 8x8 blockiness (the steps across the block grid's columns, at whichever offset it
    # was drawn, against the mean step) ...
    def blockiness(t):
        d = (t[..., :, 1:] - t[..., :, :-1]).abs().mean((1, 2))  # (N, S-1) per column step
        per = torch.stack([d[:, ph::8].mean(1) for ph in range(8)], 1)  # (N, 8) per grid phase
        return per.max(1).values / per.mean(1)

    assert (blockiness(run("jpeg", jpeg_quality=[20, 30])) > blockiness(x) + 0.2).all()

    # ... and the fine detail gone: the high frequencies (u + v >= 6) of the blocks' DCT
    def fine(t):
        c = L._dct8(t.device)
        blk = t.mean(1).reshape(n, s // 8, 8, s // 8, 8).permute(0, 1, 3, 2, 4)
        hi = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) >= 6
        return ((c @ blk @ c.T) ** 2)[..., hi].mean((1, 2, 3))

    z = (x + 1) / 2
    assert (fine(L.jpeg_approx(z, 25)) < 0.5 * fine(z)).all()
    # and the torch approximation is close to a real JPEG (cv2) at the same quality
    import cv2

    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for q in (20, 40, 60):
        ours = L.jpeg_approx(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255, q)
        ours = (ours * 255).permute(0, 2, 3, 1).numpy()
        enc = [cv2.imencode(".jpg", im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])[1] for im in u8]
        real = np.stack([cv2.imdecode(e, cv2.IMREAD_COLOR)[:, :, ::-1] for e in enc]).astype(float)
        err_real = np.abs(real - u8).mean()
        assert np.abs(ours - real).mean() < 0.4 * err_real, q

    # occlusion: one rectangle of 10-30% of the crop, nothing changed outside it, covering at
    # most one of the eyes and the mouth
    t = crop_template(s, 0.2)
    kp = [t[0], t[1], (t[3] + t[4]) / 2]  # eye centres and the mouth's
    covers = []
    for seed in range(4):
        oc = run("occlusion", seed=seed)
        for i in range(n):
            ch = (oc[i] != x[i]).any(0)
            ys, xs = torch.nonzero(ch, as_tuple=True)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            area = (y1 - y0) * (x1 - x0) / s / s
            assert 0.09 <= area <= 0.31 and float(ch[y0:y1, x0:x1].float().mean()) > 0.9
            covers.append(sum(x0 <= px < x1 and y0 <= py < y1 for px, py in kp))
    assert np.mean(np.array(covers) <= 1) >= 0.9


def test_wild_config_is_the_shipped_recipe_with_degradations():
    """configs/train_128_wild.json: the recipe of the shipped state (train_128_branch36500.json),
    started from that state, with the degradations on; off in DEFAULTS (shipped recipe unchanged)."""
    from deidcli.research.train.config import DEFAULTS, merge

    root = Path(__file__).resolve().parents[1]
    load = lambda n: merge(DEFAULTS, json.loads((root / "configs" / f"{n}.json").read_text()))  # noqa: E731
    wild, shipped = load("train_128_wild"), load("train_128_branch36500")
    assert DEFAULTS["degrade"]["p"] == 0.0 and shipped["degrade"]["p"] == 0.0
    assert wild["degrade"]["p"] == 0.5 and wild["init_from"] == "weights/train_state/last.pt"
    assert (root / wild["init_from"]).is_file()
    assert {k for k in wild if wild[k] != shipped[k]} == {"name", "init_from", "degrade"}
    st = torch.load(root / wild["init_from"], map_location="cpu", weights_only=True)
    saved = merge(DEFAULTS, {k: v for k, v in json.loads(st["config"]).items() if k in DEFAULTS})
    assert {k for k in saved if saved[k] != shipped[k]} <= {"name", "runs_dir"}


def test_train_with_degradations(tmp_path, cache_dir):
    from deidcli.research.train.loop import train

    cfg = _cfg(tmp_path, cache_dir, 2)
    cfg.update(name="wild", degrade={"p": 1.0})
    s = train(cfg)
    run = Path(s["run_dir"])
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert s["step"] == 2 and all(np.isfinite(r["loss"]) for r in recs if r["kind"] == "train")
    assert json.loads((run / "config.json").read_text())["degrade"]["p"] == 1.0
