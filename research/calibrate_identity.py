"""Make the int8 calibration of the MobileFaceNet identity network: deidcli/data/<model stem>.calib.json.

    python research/calibrate_identity.py                       # the default model and recipe
    python research/calibrate_identity.py --method MinMax --no-exclude-stem --out /tmp/c.json

deid ships no quantized model: at load it quantizes the fp32 identity network with the activation
ranges in this JSON (deidcli/quantize.py) and runs the int8 model for the identity check only
(IdentityEmbedder.embed_check); the descriptors that condition the generator stay fp32.
This script makes the JSON, deterministically for a given seed, onnxruntime version, CPU and LFW
copy (the generator outputs below are rounded to uint8, so a last-bit difference of another CPU's
kernels can move a pixel by one level).

Recipe
------
Calibration images: the identity check embeds two kinds of face (deidcli.pipeline.anonymize,
Pipeline._check_identity): each input face, and each generated face as it will be pasted. So
the set is both, from the same ``--n`` (default 256) aligned generator crops of LFW
(deep-funneled) *DevTrain* people (peopleDevTrain.txt), drawn at random without replacement, never
DevTest people nor ../shared/videos (our evaluation clips):

- the ``--n`` crops as they are;
- the same crops through the shipped generator (deidcli.weights.generator_path(None), run by
  GeneratorRunner on the CPU) with their own descriptor (the cache's ``desc``), blended
  with the feathered mask (align.feather, then mask * raw + (1 - mask) * crop, as the pipeline
  pastes), at 1 pass for three quarters of them and 2 passes for the rest (the check raises a
  face that stays too close to 2 passes or more).

The crops come from the training cache ``cache/lfw_train_<size>_m<margin>.npz`` (``deid
prepare``); where it is missing they are made as ``deid prepare`` makes them (deid's detector and
alignment, deidcli.research.train.prepare.prepare_split), which writes that cache. Every crop is then
embedded as the pipeline does (Pipeline._embed_squares): its ArcFace square
(align.arcface_squares: cv2.resize INTER_AREA to 112), and IdentityEmbedder's input normalisation
((x - 127.5) / 127.5, RGB, NCHW).

Quantization: the network at opset 13 (it ships at opset 12), through quant_pre_process
(deidcli.quantize.prepare_fp32; the BatchNorms are already folded into the Convs of the export, and
what is left is Conv, Clip (ReLU6), Relu, Add and the final Reshape), then onnxruntime's
quantize_static in QDQ format, uint8 activations, int8 weights per output channel, ``--method``
Percentile calibration (99.999th percentile, two-sided, 2048 bins; or MinMax, Entropy), with the
stem (``--exclude-stem``: the stem conv and the depthwise-separable conv after it, the 56x56
layers) and the tail (``--exclude-tail``: everything after the last residual Add, i.e. the 1x1
conv to 512 channels, the global depthwise 7x7 conv, the 128-d embedding conv and the Reshape)
left in fp32.

Why this recipe (research/check_identity_int8.py on all 3708 LFW DevTest faces and their
generator outputs at 1 and 2 passes; faces/s at batch 32 on one thread of a 2-core Xeon with
AVX512-VNNI, shared with other jobs, so +-10%): with everything quantized (as a first experiment
did) the check's cosine (the higher of the cosines of the generated face to its input face and to
its descriptor) moved by 0.0106 on average, 0.066 at most, for 2.3x the fp32 speed. The largest
part of that comes from the tail (quantizing the 512-channel map that the global 7x7 conv averages):
keeping the tail in fp32 brought it to 0.0078 / 0.043 at no measurable cost, and the stem as well
to 0.0062 / 0.030 (self-cosine to fp32 >= 0.994) for 2.0x the fp32 speed instead of 2.3x.
Keeping the first inverted-residual block in fp32 too gained little more (on 800 of the faces,
(generated, input) mean 0.0071 -> 0.0063) for about 17% less speed; the stem conv alone or the
embedding conv alone gained nothing. MinMax and Entropy ranges did worse than Percentile 99.999
(mean 0.0111 for both, with everything quantized), the 99.99th percentile worse (0.0140), the
99.9999th the same; 512 calibration crops instead of 256, another seed, or the clean crops alone
(no generator outputs) moved nothing beyond the spread between seeds (max 0.060-0.066 with
everything quantized). The
generator outputs stay in the set because the check embeds them: they are half of what it sees.
In no run did a pair that fp32 verifies as the same person (cosine >= 0.335) fall below 0.30 in
int8.

The ranges onnxruntime computes (its calibration-cache JSON) are stored under "ranges";
"deid" records the model's SHA-256 (``model_sha256``), this recipe and the versions used. Check
the result with research/check_identity_int8.py before shipping it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deidcli import quantize, weights  # noqa: E402
from deidcli.faces.align import arcface_squares  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = "rec_mobilefacenet.onnx"
BATCH = 32  # images per calibration call


def split_people(lfw: Path, split: str) -> set[str]:
    """The people of an LFW split ("train": peopleDevTrain.txt, "test": peopleDevTest.txt)."""
    from deidcli.research.train.prepare import SPLIT_FILES, read_people

    return {p for p, _ in read_people(lfw / SPLIT_FILES[split])}


def lfw_crops(split: str, size: int, margin: float, lfw: Path, cache_dir: Path) -> dict:
    """The aligned generator crops of one LFW split (deidcli.research.train.prepare's cache; made when
    missing), checked to hold only that split's people."""
    from deidcli.research.train import prepare

    path = prepare.cache_path(split, size, margin, cache_dir)
    if not path.is_file():
        print(f"{path} missing: detecting and aligning LFW {split} (as `deid prepare`)", file=sys.stderr)
        path = prepare.prepare_split(split, lfw_dir=lfw, cache_dir=cache_dir, size=size, margin=margin)
    data = prepare.load_split(path)
    assert (data["size"], data["margin"]) == (size, round(margin, 6)), (path, data["size"], data["margin"])
    others = set(data["people"]) - split_people(lfw, split)
    assert not others, f"{path} holds people outside LFW {split}: {sorted(others)[:3]}"
    return data


def generated(runner, crops: np.ndarray, desc: np.ndarray, passes) -> np.ndarray:
    """Generator outputs as the pipeline pastes them: feathered mask, mask * raw + (1 - mask) * crop
    (anonymize._blend_crops), (N, S, S, 3) uint8 RGB."""
    from deidcli.faces.align import feather

    raw, mask = runner.run(crops, desc, passes)
    m = np.stack([feather(x, runner.size) for x in mask])[..., None]
    return np.rint(m * raw + (1 - m) * crops.astype(np.float32)).clip(0, 255).astype(np.uint8)


def load_runner(batch_size: int = 32, colour_match: bool = False):
    """The shipped generator on the CPU (onnxruntime backend, one thread: reproducible);
    ``colour_match`` as `deid anonymize --colour-match` (its default since 2026-11-29)."""
    from deidcli.generator.engine import GeneratorRunner, resolve_runtime
    from deidcli.generator.model import load_generator

    os.environ["DEID_ORT_THREADS"] = "1"
    gen = load_generator(weights.generator_path(None), device="cpu")
    return GeneratorRunner(gen, resolve_runtime("cpu"), batch_size, backend="onnxruntime",
                           colour_match=colour_match)


def stem_nodes(graph) -> list[str]:
    """The stem: the nodes before the first inverted-residual block ("/features/..."), i.e. the
    stem conv and the depthwise-separable conv after it, all at 56x56."""
    out = []
    for n in graph.node:
        if n.name.startswith("/features/"):
            return out
        out.append(n.name)
    raise ValueError("no /features/ block in this graph: not deid's MobileFaceNet export")


def tail_nodes(graph) -> list[str]:
    """The tail: the nodes after the last residual Add, i.e. the 1x1 expansion conv to 512 channels
    and its ReLU6, the global depthwise 7x7 conv, the 128-d embedding conv and the Reshape."""
    last_add = max(i for i, n in enumerate(graph.node) if n.op_type == "Add")
    return [n.name for n in graph.node[last_add + 1:]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"fp32 identity ONNX (default: {MODEL}, found as deid "
                   "finds it)")
    p.add_argument("--lfw", type=Path, default=SHARED / "data" / "lfw")
    p.add_argument("--cache", type=Path, default=ROOT / "cache", help="where `deid prepare` keeps its LFW crops")
    p.add_argument("--n", type=int, default=256, help="DevTrain crops (each also generated: 2n images)")
    quantize.add_calibration_options(p)  # --seed, --method, --percentile, --activations
    p.add_argument("--exclude-stem", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the stem (the nodes before the first inverted-residual block) in fp32")
    p.add_argument("--exclude-tail", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the tail (the nodes after the last residual Add) in fp32")
    p.add_argument("--generated", action=argparse.BooleanOptionalAction, default=True,
                   help="add the generator outputs of the crops to the calibration set")
    p.add_argument("--out", type=Path, default=None, help="default: deidcli/data/<model stem>.calib.json")
    a = p.parse_args(argv)
    if a.n % BATCH:
        p.error(f"--n must be a multiple of {BATCH}")

    from deidcli.generator.embedder import IdentityEmbedder

    model = a.model or weights.model_path(MODEL)
    out = a.out or quantize.calibration_path(model)
    runner = load_runner()
    S, margin = runner.size, runner.margin
    data = lfw_crops("train", S, margin, a.lfw, a.cache)
    rng = np.random.default_rng(a.seed)
    idx = np.sort(rng.choice(len(data["crops"]), a.n, replace=False))
    crops, desc = data["crops"][idx], data["desc"][idx].astype(np.float32)
    passes = np.where(rng.random(a.n) < 0.75, 1, 2)
    images = np.concatenate([crops, generated(runner, crops, desc, passes)]) if a.generated else crops
    embedder = IdentityEmbedder(model, precision="fp32")  # only for its input normalisation
    blob = embedder.to_input(arcface_squares(images, S, margin))
    batches = [blob[i:i + BATCH] for i in range(0, len(blob), BATCH)]
    what = f"{a.n} DevTrain crops of {len(set(data['labels'][idx]))} people"
    if a.generated:
        what += (f", and their generator outputs ({int((passes == 1).sum())} at 1 pass, "
                 f"{int((passes == 2).sum())} at 2)")
    print(what, file=sys.stderr)

    recipe = quantize.recipe(a.method, a.activations, a.percentile)

    def exclude(graph) -> list[str]:
        return (stem_nodes(graph) if a.exclude_stem else []) + (tail_nodes(graph) if a.exclude_tail else [])

    # batches of BATCH images, one per calibration call: the calibrator keeps a call's activations
    recipe, ranges = quantize.calibrate(model, [{embedder.input_name: b} for b in batches], recipe, exclude)
    quantize.write_calibration(out, {
        "model": Path(model).name,
        "model_sha256": weights.sha256_file(Path(model)),
        "recipe": recipe,
        "calibration_set": {"source": "LFW deep-funneled, peopleDevTrain.txt people only: aligned crops and "
                                      "their generator outputs", "n": a.n, "seed": a.seed,
                            "generator": Path(weights.generator_path(None)).name if a.generated else None,
                            "generator_passes": {"1": int((passes == 1).sum()), "2": int((passes == 2).sum())}
                            if a.generated else None,
                            "crop": {"size": S, "margin": margin}, "script": "research/calibrate_identity.py"},
    }, ranges)
    return 0


if __name__ == "__main__":
    sys.exit(main())
