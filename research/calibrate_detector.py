"""Make the int8 calibration of the SCRFD detector: deidcli/data/<detector stem>.calib.json.

    python research/calibrate_detector.py                       # the default detector and recipe
    python research/calibrate_detector.py --method MinMax --no-exclude-first --out /tmp/c.json

deid ships no quantized model: at load it quantizes the fp32 detector with the activation ranges in
this JSON (deidcli/quantize.py). This script makes the JSON, deterministically for a given seed,
onnxruntime version and LFW copy.

Recipe
------
Calibration images: ``--n`` (default 256) composites built from LFW (deep-funneled) photos of the
*DevTrain* people only (peopleDevTrain.txt), never from ../shared/videos (our evaluation clips) nor
from DevTest people. Each composite is a video-sized frame (1280x720, 720x1280, 512x512 or
480x480, drawn at random) whose background is another DevTrain photo, enlarged and blurred
(sigma 15 px), with 1 to 3 DevTrain photos pasted on it at random places, each scaled so the
250 px photo is 20% to 160% of the frame's shorter side (faces from ~8% to ~70% of it), with
random brightness (x0.6-1.4) and contrast. Each frame goes through the detector's own
pre-processing (deidcli.faces.detect.Detector.input_size_for: longer side to 640, shorter side to the
next multiple of 32; aspect kept, padded bottom/right; (x - 127.5) / 128, RGB) so the ranges are
measured at the input sizes the pipeline uses.

Quantization: the detector at opset 13, through quant_pre_process (deidcli.quantize.prepare_fp32),
then onnxruntime's quantize_static in QDQ format, uint8 activations, int8 weights per output
channel, ``--method`` Percentile calibration (99.999th percentile of |x|, one-sided, 2048 bins;
or MinMax, Entropy), with the stem conv (``--exclude-first``) and the 9 output heads
(``--exclude-heads``: each a Conv and the Transpose/Reshape/Sigmoid after it) left in fp32.

Why this recipe (research/check_detector_int8.py on ../shared/videos, Xeon with AVX512-VNNI):
plain MinMax quantizes the score output too, so scores land on a grid (0.489, 0.499, ...) and
faces near the 0.5 threshold flip: recall at 0.5 was 97.1% on lp_d6.mp4, where a third of the
faces score within 0.05 of 0.5. Leaving the heads in fp32 removes the grid and lowers the
landmark error (lp_d6 median 0.52 -> 0.38% of the inter-ocular distance); the stem conv in fp32
and Percentile ranges gave the smallest landmark and score differences of the recipes tried
(lp_d6: median 0.30%, 95th percentile 0.49%, mean |score difference| 0.004), for 1-3 ms per
frame more than quantizing everything. Recall at exactly 0.5 on lp_d6 stayed between 97% and
99% for every recipe and seed tried (the misses are faces fp32 scores 0.50-0.53); all of them
are found above 0.3, and the tracker's output is the same. Entropy ranges did worse; int8
activations (QInt8) ran about 2x slower than uint8 on this CPU, slower than fp32.

The ranges onnxruntime computes (its calibration-cache JSON) are stored under "ranges";
"deid" records the detector's SHA-256, this recipe and the versions used. Check the result with
research/check_detector_int8.py before shipping it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deidcli import quantize, weights  # noqa: E402

SHARED = ROOT.parent / "shared"
FRAME_SIZES = ((1280, 720), (720, 1280), (512, 512), (480, 480))  # (width, height) of the composites


def train_people(lfw: Path) -> list[Path]:
    """Folders of the LFW DevTrain people (peopleDevTrain.txt: a count, then "name<TAB>n" lines)."""
    lines = (lfw / "peopleDevTrain.txt").read_text().split("\n")[1:]
    images = lfw / "lfw_deepfunneled"
    return [images / ln.split("\t")[0] for ln in lines if ln.strip()]


def composite(rng: np.random.Generator, people: list[Path], crowd: bool = False) -> np.ndarray:
    """One video-sized BGR frame with 1-3 LFW DevTrain faces on a blurred DevTrain background, or,
    ``crowd``, 4-16 small ones (faces of about 20-90 px in a 720 px frame)."""

    def photo() -> np.ndarray:
        folder = people[rng.integers(len(people))]
        files = sorted(folder.glob("*.jpg"))
        return cv2.imread(str(files[rng.integers(len(files))]))

    w, h = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    bg = cv2.resize(photo(), (w, h), interpolation=cv2.INTER_LINEAR)
    frame = cv2.GaussianBlur(bg, (0, 0), 15)
    for _ in range(int(rng.integers(4, 17) if crowd else rng.integers(1, 4))):
        im = photo()
        side = max(8, int(rng.uniform(0.07, 0.31) * min(w, h) if crowd else rng.uniform(0.2, 1.6) * min(w, h)))
        im = cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA if side < im.shape[0] else cv2.INTER_LINEAR)
        gain, bias = rng.uniform(0.6, 1.4), rng.uniform(-30, 30)
        im = np.clip(im.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
        # at least two thirds of the photo inside the frame
        x0 = int(rng.integers(-side // 3, max(w - 2 * side // 3, 1)))
        y0 = int(rng.integers(-side // 3, max(h - 2 * side // 3, 1)))
        xs, ys = slice(max(x0, 0), min(x0 + side, w)), slice(max(y0, 0), min(y0 + side, h))
        frame[ys, xs] = im[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return frame


def detector_blob(bgr: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """SCRFD's pre-processing (as InsightFace's SCRFD.detect): fit, pad bottom/right, normalise."""
    iw, ih = input_size
    scale = min(iw / bgr.shape[1], ih / bgr.shape[0])
    nw, nh = int(bgr.shape[1] * scale), int(bgr.shape[0] * scale)
    canvas = np.zeros((ih, iw, 3), np.uint8)
    canvas[:nh, :nw] = cv2.resize(bgr, (nw, nh))
    return cv2.dnn.blobFromImage(canvas, 1.0 / 128.0, (iw, ih), (127.5, 127.5, 127.5), swapRB=True)


def head_nodes(g) -> list[str]:
    """The output heads of graph ``g``: for each graph output, the nodes from the Conv that
    computes it to the output (Conv, Transpose, Reshape, and Sigmoid for the scores)."""
    producer = {o: n for n in g.node for o in n.output}
    heads = []
    for out in g.output:
        n = producer[out.name]
        heads.append(n.name)
        while n.op_type != "Conv":
            n = producer[n.input[0]]
            heads.append(n.name)
    return heads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", type=Path, default=None, help="fp32 SCRFD ONNX (default: the registry's default, "
                   "found as deid finds it)")
    p.add_argument("--lfw", type=Path, default=SHARED / "data" / "lfw")
    p.add_argument("--n", type=int, default=256, help="calibration composites")
    p.add_argument("--crowd", type=float, default=0.5,
                   help="share of the composites that are crowds of 4-16 small faces (0: the recipe before "
                        "2026-12-06, whose int8 scores of faces under ~60 px fell far below fp32's)")
    quantize.add_calibration_options(p)  # --seed, --method, --percentile, --activations
    p.add_argument("--exclude-first", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the stem conv in fp32")
    p.add_argument("--exclude-heads", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the 9 output heads in fp32")
    p.add_argument("--out", type=Path, default=None, help="default: deidcli/data/<detector stem>.calib.json")
    a = p.parse_args(argv)

    from deidcli.faces.detect import Detector

    detector = a.detector or weights.model_path("det_scrfd_2.5g_kps.onnx")
    out = a.out or quantize.calibration_path(detector)
    people = train_people(a.lfw)
    rng = np.random.default_rng(a.seed)
    sizer = Detector(detector, precision="fp32")  # only for input_size_for (what the pipeline feeds it)
    blobs = []
    for k in range(a.n):
        frame = composite(rng, people, crowd=k < round(a.crowd * a.n))
        blobs.append(detector_blob(frame, sizer.input_size_for(frame.shape)))
    shapes = sorted({b.shape[2:] for b in blobs})
    print(f"{len(blobs)} composites from {len(people)} DevTrain people; detector inputs (h, w): {shapes}",
          file=sys.stderr)

    recipe = quantize.recipe(a.method, a.activations, a.percentile)

    def exclude(graph) -> list[str]:
        convs = [n.name for n in graph.node if n.op_type == "Conv"]
        return ([convs[0]] if a.exclude_first else []) + (head_nodes(graph) if a.exclude_heads else [])

    # one blob per calibration call: blobs differ in shape between input sizes, and the histogram
    # methods stack a call's tensors (and would hold all of them at once)
    recipe, ranges = quantize.calibrate(detector, [{"input.1": b} for b in blobs], recipe, exclude)
    quantize.write_calibration(out, {
        "detector": Path(detector).name,
        "detector_sha256": weights.sha256_file(Path(detector)),
        "recipe": recipe,
        "calibration_set": {"source": "LFW deep-funneled, peopleDevTrain.txt people only", "n": a.n,
                            "crowd": a.crowd,
                            "seed": a.seed, "frame_sizes": FRAME_SIZES,
                            "input_sizes_hw": [list(s) for s in shapes],
                            "script": "research/calibrate_detector.py"},
    }, ranges)
    return 0


if __name__ == "__main__":
    sys.exit(main())
