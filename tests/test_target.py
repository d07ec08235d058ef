"""`deid anonymize --target` (pipeline/people.py, docs/target.md): generated faces steered towards
outside faces. Real clips from ../shared/videos, real photos from LFW (../shared/data/lfw), nothing
mocked."""

import json
import shutil

import numpy as np
import pytest

from conftest import LFW, MODELS, VIDEOS, cut_clip, decode_rgb, run_deid
from deidcli.pipeline.people import LFW_FAR_THRESHOLD

#: Two LFW DevTest photos with one face each; in a folder, targets go in name order: AJ_Cook first.
PHOTOS = ("Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "AJ_Cook/AJ_Cook_0001.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 1 s cut of ghost_2person (two people), a targets/ folder of the two LFW photos, a photo
    without a face and one with two faces (cut from the clip), and the models."""
    from deidcli import weights
    from deidcli.faces.detect import Detector
    from deidcli.generator.embedder import IdentityEmbedder
    from deidcli.media.images import write_image

    d = tmp_path_factory.mktemp("target")
    for p in PHOTOS:
        if not (LFW / "lfw_deepfunneled" / p).is_file():
            pytest.skip(f"{p} not in ../shared/data/lfw")
    (d / "targets").mkdir()
    for p in PHOTOS:
        shutil.copy(LFW / "lfw_deepfunneled" / p, d / "targets")
    clip = cut_clip(VIDEOS / "ghost_2person.mp4", d / "two.mp4", 1.0, audio=False)
    frame = decode_rgb(clip, 1)[0]
    write_image(d / "background.jpg", frame[480:720, 0:240])
    write_image(d / "both.jpg", frame)
    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx")
    emb = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", MODELS))
    return {"dir": d, "clip": clip, "det": det, "emb": emb}


def test_target_folder_steers_each_track_towards_its_photo(data):
    """--target DIR of two photos on two people: the report names the targets in name order and
    gives track 0 the first, track 1 the second; in the output frames each face moves towards its
    own target (cosine up by more than 0.1 against the same run without --target, and more than
    towards the other target), and stays far from its person (the identity check's cosine, the
    input face's embedding, under the LFW FAR 0.1% threshold in every frame)."""
    from deidcli.faces.align import arcface_crop
    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.pipeline.people import load_targets

    d, det, emb = data["dir"], data["det"], data["emb"]
    plain = anonymize(data["clip"], d / "own.mp4", AnonymizeOptions(models_dir=MODELS))
    report = anonymize(data["clip"], d / "target.mp4", AnonymizeOptions(target=(d / "targets",), models_dir=MODELS))
    names = [p.split("/")[1][:-4] for p in sorted(PHOTOS)]
    assert [t["name"] for t in report["targets"]] == names and plain["targets"] == []
    (f,) = report["files"]
    assert f["status"] == "ok" and f["track_targets"] == [{"track": 0, "target": names[0]},
                                                          {"track": 1, "target": names[1]}], f["track_targets"]
    assert f["faces_checked"] > 0  # the identity check ran, against the person

    targets = np.stack([t.descriptor for t in load_targets([d / "targets"], det, emb)])  # (2, 128)
    kps = []
    for im in decode_rgb(data["clip"]):
        di = det.detect(im)
        assert len(di) == 2
        kps.append([di.kps[k] for k in np.argsort(di.boxes[:, 0])])

    def faces(path):  # (frames, 2 faces, 128)
        return np.stack([emb.embed([arcface_crop(im, k) for k in ks]) for im, ks in zip(decode_rgb(path), kps)])

    own, steered, person = faces(d / "own.mp4"), faces(d / "target.mp4"), faces(data["clip"])
    gain = (np.einsum("fpd,kd->pk", steered, targets) - np.einsum("fpd,kd->pk", own, targets)) / len(own)
    match = [0, 1] if gain[0, 0] + gain[1, 1] >= gain[0, 1] + gain[1, 0] else [1, 0]  # face -> its target
    assert match[0] != match[1]
    for p, k in enumerate(match):
        assert gain[p, k] > 0.1 and gain[p, k] > gain[p, 1 - k], gain
    assert np.einsum("fpd,fpd->fp", steered, person).max() < LFW_FAR_THRESHOLD


def test_targets_order_assignment_and_the_person_as_target(data, tmp_path):
    """list_targets: a file is one target, a folder's photos one each (name order), then its
    name/ subfolders one each; target_of is the track id modulo their count; a target that is
    the person (cosine >= LFW_FAR_THRESHOLD) is not steered into: the face keeps its own
    descriptor."""
    from deidcli.pipeline.people import list_targets, steer_descriptor, target_of

    d = data["dir"]
    (tmp_path / "t" / "zoe").mkdir(parents=True)
    for p in PHOTOS:
        shutil.copy(d / "targets" / p.split("/")[1], tmp_path / "t")
        shutil.copy(d / "targets" / p.split("/")[1], tmp_path / "t" / "zoe")
    got = list_targets([tmp_path / "t", d / "background.jpg"])
    want = [("AJ_Cook_0001", 1), ("Aaron_Eckhart_0001", 1), ("zoe", 2), ("background", 1)]
    assert [(t.name, len(t.files)) for t in got] == want
    assert [target_of(i, got).name for i in (0, 3, 4, 9)] == [want[k][0] for k in (0, 3, 0, 1)]
    rng = np.random.default_rng(0)
    own = rng.standard_normal((2, 128)).astype(np.float32)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    other = rng.standard_normal(128).astype(np.float32)
    other /= np.linalg.norm(other)
    near = own[0] + 0.3 * other
    tgt = np.stack([near / np.linalg.norm(near), other])  # the person (cosine ~0.96), a stranger
    out = steer_descriptor(own, tgt)
    assert np.allclose(out[0], own[0])  # the person as target: own kept
    want = own[1] - tgt[1]
    assert np.allclose(out[1], want / np.linalg.norm(want), atol=1e-6)


@pytest.mark.parametrize("case", ["no face", "several faces", "missing", "blur"])
def test_bad_target_fails_before_anything_is_written(data, case, tmp_path):
    """A bad --target: exit 2, one line naming it, no output folder made; --target with a method
    that draws no face (blur) is a usage error too."""
    d = data["dir"]
    ref = {"no face": d / "background.jpg", "several faces": d / "both.jpg", "missing": tmp_path / "nope.jpg",
           "blur": d / "targets"}[case]
    dst = tmp_path / "out" / "two.mp4"
    extra = ["--method", "blur"] if case == "blur" else []
    p = run_deid("anonymize", data["clip"], dst, "--target", d / "targets", "--target", ref, *extra, check=2)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    want = {"no face": "no face", "several faces": "2 faces", "missing": "no such file", "blur": "method generate"}
    assert any(want[case] in ln for ln in lines), p.stderr
    if case != "blur":
        assert len(lines) == 1 and str(ref) in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_targets_in_order(data, tmp_path):
    """--dry-run --json: the targets in the order tracks get them, no photo read, nothing written."""
    d = data["dir"]
    p = run_deid("anonymize", data["clip"], tmp_path / "o.mp4", "--target", d / "targets", "--target",
                 d / "background.jpg", "--dry-run", "--json", check=0)
    assert [t["name"] for t in json.loads(p.stdout)["targets"]] == ["AJ_Cook_0001", "Aaron_Eckhart_0001",
                                                                    "background"]
    assert not (tmp_path / "o.mp4").exists()
