#!/usr/bin/env python3
"""Generator throughput on the CPU: torch vs ONNX Runtime, same checkpoint, same inputs.

    python research/bench_generator_backends.py [--weights weights/deid_generator_128.pt]
        [--batch-size 32] [--threads 1] [--batches 10]

Prints faces/s for each backend and the largest difference between their outputs (uint8 raw
image and mask). deid picks onnxruntime on the CPU and torch on CUDA (deidcli/generator/engine.py). Each
backend runs as the pipeline runs it: torch a batch per call, onnxruntime the exported
``model.for_export`` module one face per intra-op thread per call (``GeneratorRunner.network_batch``).
To measure another source tree, run the script with ``PYTHONPATH=<tree>`` (else the installed
``deidcli`` is imported).
"""

import argparse
import os
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each backend")
    ap.add_argument("--batches", type=int, default=10)
    a = ap.parse_args()
    os.environ["DEID_ORT_THREADS"] = os.environ["DEID_TORCH_THREADS"] = str(a.threads)

    from deidcli import weights
    from deidcli.generator.engine import GeneratorRunner, resolve_runtime
    from deidcli.generator.model import load_generator

    rt = resolve_runtime("cpu")
    rng = np.random.default_rng(0)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        gen = load_generator(weights.generator_path(a.weights), device="cpu")
        t = time.perf_counter()
        runner = GeneratorRunner(gen, rt, a.batch_size, backend=backend)
        setup = time.perf_counter() - t
        S = runner.size
        crops = rng.integers(0, 256, (a.batch_size, S, S, 3), dtype=np.uint8) if not outs else outs["crops"]
        desc = rng.normal(size=(a.batch_size, gen.config["id_dim"])).astype(np.float32) if not outs else outs["desc"]
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        outs.update(crops=crops, desc=desc)
        runner.run(crops, desc)  # warm-up
        t = time.perf_counter()
        for _ in range(a.batches):
            raw, mask = runner.run(crops, desc)
        wall = time.perf_counter() - t
        outs[backend] = (raw, mask)
        print(f"{backend:12s} {a.batch_size * a.batches / wall:7.1f} faces/s  (batch {a.batch_size}, "
              f"{a.threads} thread(s), setup {setup:.2f} s)")
    (r0, m0), (r1, m1) = outs["torch"], outs["onnxruntime"]
    print(f"max |raw| difference {int(np.abs(r0.astype(int) - r1).max())} (uint8), "
          f"max |mask| difference {float(np.abs(m0 - m1).max()):.2e}")


if __name__ == "__main__":
    main()
