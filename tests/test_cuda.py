"""CUDA code paths: the generator in fp16 on the GPU, and `deid anonymize --device cuda --fp16` and
`deid bench --device cuda --fp16` end to end on real clips. Marked ``cuda``: skipped where torch
sees no CUDA device (CI and the CPU machines); research/gpu_check.sh runs them on a GPU machine."""

import json

import numpy as np
import pytest

from conftest import MODELS, VIDEOS, decode_rgb, frame_pts
from test_cli import run

pytestmark = pytest.mark.cuda


def _frame_crops(path, n_frames: int = 6):
    """Generator crops (N, 128, 128, 3) uint8 RGB of every face of the first ``n_frames`` frames of
    ``path``, with their MobileFaceNet descriptors (N, 128) float32."""
    from deidcli.faces.align import arcface_squares, estimate_transform, warp_crop
    from deidcli.generator.embedder import IdentityEmbedder
    from deidcli.faces.detect import Detector

    det = Detector(MODELS / "det_scrfd_2.5g_kps.onnx")
    crops = [warp_crop(img, estimate_transform(k, 128, 0.2), 128)
             for img in decode_rgb(path, n_frames) for k in det.detect(img).kps]
    crops = np.stack(crops)
    desc = IdentityEmbedder(MODELS / "rec_mobilefacenet.onnx", precision="fp32").embed(
        arcface_squares(crops))
    return crops, desc


def test_fp16_generator_on_cuda_gives_the_cpu_faces(shared):
    """Shipped generator, the faces of ghost_2person's first frames: the CUDA fp16 runner (torch on
    the device) draws the same faces as the CPU default (fp32, ONNX Runtime): at 1 and 3 passes
    within a grey level on average, masks within 0.01; and faces the CPU changes it changes too."""
    from deidcli import weights
    from deidcli.generator.engine import GeneratorRunner, resolve_runtime
    from deidcli.generator.model import load_generator

    crops, desc = _frame_crops(VIDEOS / "ghost_2person.mp4")
    assert len(crops) >= 10
    cpu = GeneratorRunner(load_generator(weights.generator_path(None), device="cpu"),
                          resolve_runtime("cpu"), colour_match=True)
    rt = resolve_runtime("cuda", fp16=True)
    assert rt.device == "cuda:0" and rt.dtype == "float16"
    gpu = GeneratorRunner(load_generator(weights.generator_path(None), device="cpu"), rt, batch_size=4,
                          colour_match=True)
    assert gpu.backend == "torch" and next(gpu.generator.parameters()).is_cuda
    for passes in (1, 3):
        raw_c, mask_c = cpu.run(crops, desc, passes)
        raw_g, mask_g = gpu.run(crops, desc, passes)
        assert raw_g.dtype == np.uint8 and raw_g.shape == raw_c.shape
        assert mask_g.dtype == np.float32 and mask_g.shape == mask_c.shape
        d = np.abs(raw_g.astype(np.float32) - raw_c)[mask_c > 0.5]
        assert d.mean() < 1.0 and np.percentile(d, 99) < 8, (passes, d.mean(), np.percentile(d, 99))
        assert np.abs(mask_g - mask_c).mean() < 0.01
        assert np.abs(raw_g.astype(np.float32) - crops)[mask_c > 0.5].mean() > 5  # the face did change


def test_anonymize_on_cuda_fp16(clips, tmp_path):
    """`deid anonymize --device cuda --fp16` on the two-person clip: every frame out, the report
    says it ran fp16 on the GPU with the torch generator, every face generated, none exposed to
    the identity check's blur fallback."""
    out, rep = tmp_path / "out.mp4", tmp_path / "rep.json"
    p = run("anonymize", clips["two_person"], out, "--device", "cuda", "--fp16", "--report", rep, check=0)
    r = json.loads(rep.read_text())
    assert r["device"].startswith("cuda") and r["dtype"] == "float16" and r["generator_backend"] == "torch", p.stderr
    f = r["files"][0]
    assert f["status"] == "ok" and f["faces_anonymized"] >= f["faces_detected"] > 0
    assert len(frame_pts(out)) == len(frame_pts(clips["two_person"]))
    assert f["faces_blurred_fallback"] == 0
    a = np.stack(decode_rgb(clips["two_person"], 5)).astype(np.int16)
    b = np.stack(decode_rgb(out, 5)).astype(np.int16)
    assert np.abs(a - b).mean() > 0.2  # faces were replaced


def test_bench_on_cuda(clips, tmp_path):
    """`deid bench --device cuda --fp16`: generate and the generator alone run on the GPU in fp16."""
    js = tmp_path / "bench.json"
    run("bench", clips["two_person"], "--device", "cuda", "--fp16", "--batch-size", "64", "--config", "generate",
        "--config", "generator", "--json", js, check=0)
    rows = {r["config"]: r for r in json.loads(js.read_text())["runs"]}
    assert rows["generator"]["device"].startswith("cuda") and rows["generator"]["dtype"] == "float16"
    assert rows["generator"]["faces_per_s"] > 0 and rows["generate"]["frames"] == len(frame_pts(clips["two_person"]))
