"""Compare the int8 identity network with the fp32 one where the identity check uses it.

    python research/check_identity_int8.py                          # the shipped calibration
    python research/check_identity_int8.py --calibration /tmp/a.json /tmp/b.json --limit 1000

On LFW *DevTest* faces (cache/lfw_test_<size>_m<margin>.npz, made by `deid prepare`; people never
used by research/calibrate_identity.py) and on their outputs from the shipped generator (with
their cache descriptor ``desc``, colours matched unless --no-colour-match, feathered mask blended
as the pipeline pastes, at ``--passes``),
every face embedded as Pipeline._embed_squares does (ArcFace square, INTER_AREA to 112) by
engine.IdentityEmbedder: ``embed`` (fp32) and ``embed_check`` (int8). Per calibration:

- self-cosine: int8 embedding against the fp32 embedding of the same image (min, mean);
- pair cosines, the distribution of |cos_int8 - cos_fp32| (mean, 95th and 99th percentile, max)
  for: (generated face, its input face), both embedded by the checked network as in the check;
  (generated face, its descriptor ``desc``), the descriptor staying fp32 as in the pipeline; the
  check's own cosine (the higher of the two); and LFW's pairsDevTest.txt (clean faces);
- the pairs the int8 network would let through that fp32 calls the same person: fp32 cosine
  >= 0.335 (the network's verification threshold) but int8 cosine < 0.25 (the check's default
  --check-thresh: it would not act), and < 0.30; and where the check's decision at 0.25 differs
  (fp32 acts and int8 not, the other way round);
- faces/s of embed and embed_check at batch 32 on one thread (median of ``--repeats`` timed
  calls, alternating).

Prints a markdown table on stdout; --json also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_identity import MODEL, SHARED, generated, lfw_crops, load_runner  # noqa: E402

from deidcli import weights  # noqa: E402
from deidcli.faces.align import arcface_squares as squares  # noqa: E402

VERIFY = 0.335  # the identity network verifies a match here (FAR 0.1% on LFW)
ACT = 0.25  # --check-thresh default
NEAR = 0.30


def cos_rows(e32_a, e32_b, e8_a, e8_b) -> dict:
    """Stats of |cos_int8 - cos_fp32| over pairs (a_i, b_i) and the fp32 >= VERIFY / int8 < x counts."""
    c32 = np.einsum("nd,nd->n", e32_a, e32_b)
    c8 = np.einsum("nd,nd->n", e8_a, e8_b)
    return cos_stats(c32, c8)


def cos_stats(c32: np.ndarray, c8: np.ndarray) -> dict:
    d = np.abs(c8 - c32)
    hi = c32 >= VERIFY
    return {"n": int(len(d)), "dcos_mean": round(float(d.mean()), 4), "dcos_p95": round(float(np.percentile(d, 95)), 4),
            "dcos_p99": round(float(np.percentile(d, 99)), 4), "dcos_max": round(float(d.max()), 4),
            "fp32_verified": int(hi.sum()), "lost_below_act": int((hi & (c8 < ACT)).sum()),
            "lost_below_near": int((hi & (c8 < NEAR)).sum()),
            "acts_fp32": int((c32 >= ACT).sum()), "acts_int8": int((c8 >= ACT).sum()),
            "acts_fp32_only": int(((c32 >= ACT) & (c8 < ACT)).sum()),
            "acts_int8_only": int(((c8 >= ACT) & (c32 < ACT)).sum())}


def self_cos(e32, e8) -> dict:
    c = np.einsum("nd,nd->n", e32, e8)
    return {"n": int(len(c)), "self_min": round(float(c.min()), 4), "self_mean": round(float(c.mean()), 4)}


def embed_all(fn, crops112: list, batch: int = 32) -> np.ndarray:
    return np.concatenate([fn(crops112[i:i + batch]) for i in range(0, len(crops112), batch)])


def speed(fns: dict, crops112: list, repeats: int) -> dict:
    """faces/s of each fn on one batch, median of ``repeats`` calls, the fns alternating."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f(crops112)  # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f(crops112)
            times[k].append(time.perf_counter() - t)
    return {k: round(len(crops112) / float(np.median(v)), 1) for k, v in times.items()}


def dev_test_pairs(lfw: Path, names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) into ``names`` of the pairsDevTest.txt pairs whose two faces are in the cache."""
    from deidcli.research.train.prepare import read_pairs

    where = {str(n): k for k, n in enumerate(names)}
    pairs = [(where[a], where[b]) for a, b, _ in read_pairs(lfw / "pairsDevTest.txt") if a in where and b in where]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


COLUMNS = [("set", "set"), ("n", "n"), ("self_min", "self-cos min"), ("self_mean", "self-cos mean"),
           ("dcos_mean", "mean |dcos|"), ("dcos_p95", "p95"), ("dcos_p99", "p99"), ("dcos_max", "max"),
           ("fp32_verified", "fp32 >= 0.335"), ("lost_below_act", "of which int8 < 0.25"),
           ("lost_below_near", "of which int8 < 0.30"), ("acts_fp32", "fp32 >= 0.25"),
           ("acts_fp32_only", "of which int8 < 0.25"), ("acts_int8_only", "int8 >= 0.25, fp32 < 0.25")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"fp32 identity ONNX (default: {MODEL})")
    p.add_argument("--calibration", type=Path, nargs="*", default=None,
                   help="int8 calibration JSON(s) (default: the shipped one)")
    p.add_argument("--lfw", type=Path, default=SHARED / "data" / "lfw")
    p.add_argument("--cache", type=Path, default=ROOT / "cache")
    p.add_argument("--passes", type=int, nargs="*", default=[1, 2], help="generator passes to check")
    p.add_argument("--limit", type=int, default=0, help="first N DevTest faces (0: all)")
    p.add_argument("--no-colour-match", dest="colour_match", action="store_false",
                   help="generated faces with the generator's own colours (default: matched, as deid anonymize)")
    p.add_argument("--repeats", type=int, default=30, help="timed batches per network")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    from deidcli.generator.embedder import IdentityEmbedder

    model = a.model or weights.model_path(MODEL)
    runner = load_runner(colour_match=a.colour_match)  # sets DEID_ORT_THREADS=1: the embedders below run on one thread too
    S, margin = runner.size, runner.margin
    data = lfw_crops("test", S, margin, a.lfw, a.cache)
    n = min(a.limit or len(data["crops"]), len(data["crops"]))
    crops, desc, names = data["crops"][:n], data["desc"][:n].astype(np.float32), data["names"][:n]
    ref = IdentityEmbedder(model, precision="fp32")
    own = squares(crops, S, margin)
    e32_own = embed_all(ref.embed, own)
    gens = {}
    for k in a.passes:
        t = time.perf_counter()
        g = squares(generated(runner, crops, desc, k), S, margin)
        gens[k] = (g, embed_all(ref.embed, g))
        print(f"generated {n} DevTest faces at {k} pass(es) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    pi, pj = dev_test_pairs(a.lfw, names)

    results = []
    for cal in a.calibration or [None]:
        emb = IdentityEmbedder(model, precision="int8", calibration=cal)
        label = cal.name if cal else "shipped"
        if emb.check_precision != "int8":
            print(f"{label}: the int8 network could not be built (see the warning above)", file=sys.stderr)
            return 1
        e8_own = embed_all(emb.embed_check, own)
        rows = [{"set": "DevTest faces", **self_cos(e32_own, e8_own)},
                {"set": "pairsDevTest.txt (clean pairs)", **cos_rows(e32_own[pi], e32_own[pj], e8_own[pi], e8_own[pj])}]
        for k, (g, e32_g) in gens.items():
            e8_g = embed_all(emb.embed_check, g)
            c32_in, c8_in = np.einsum("nd,nd->n", e32_g, e32_own), np.einsum("nd,nd->n", e8_g, e8_own)
            c32_d, c8_d = np.einsum("nd,nd->n", e32_g, desc), np.einsum("nd,nd->n", e8_g, desc)
            rows += [{"set": f"generated, {k} pass", **self_cos(e32_g, e8_g)},
                     {"set": f"(generated {k}, its input)", **cos_stats(c32_in, c8_in)},
                     {"set": f"(generated {k}, desc)", **cos_stats(c32_d, c8_d)},
                     {"set": f"check cos {k} (max of both)", **cos_stats(np.maximum(c32_in, c32_d),
                                                                          np.maximum(c8_in, c8_d))}]
        fps = speed({"fp32": ref.embed, "int8": emb.embed_check}, own[:32], a.repeats)
        results.append({"calibration": str(cal or "shipped"), "build_seconds": emb.build_seconds,
                        "faces_per_s": fps, "rows": rows})
        print(f"\n### {label}: faces/s at batch 32, one thread: fp32 {fps['fp32']}, int8 {fps['int8']} "
              f"(x{fps['int8'] / fps['fp32']:.2f}); int8 built in {emb.build_seconds:.2f} s\n")
        print("| " + " | ".join(h for _, h in COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for r in rows:
            print("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c, _ in COLUMNS) + " |")
        sys.stdout.flush()
    if a.json:
        a.json.write_text(json.dumps({"faces": n, "cpu": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
