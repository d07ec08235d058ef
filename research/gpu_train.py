"""Train the generator on a lent GPU machine in one call of the device tool (issue 3).

That machine has PyTorch with CUDA, ONNX, OpenCV and Click, but no network, no ../shared and no
InsightFace (deidcli.faces.align imports it); only the repository's working tree travels, with at most
64 MiB of carried ignored paths. So, on a machine without a GPU, first:

    python research/gpu_train.py pack            # -> .kit_train/ (about 55 MB, never committed)

  .kit_train/lfw_train_128_m0.2.q90.npz  the prepared DevTrain cache (`deid prepare`) with every
                                         crop JPEG-encoded (quality 90, ~5 KB; PSNR ~40 dB
                                         against the cached crop); the descriptors are
                                         recomputed from the decoded crops where it is unpacked
  .kit_train/models/                     the detector and identity network the losses run
  .kit_train/*.whl                       InsightFace (pure Python) for CPython 3.12

then, from the device tool (the time left on the machine decides --minutes; startup, the
unpacking and the final saves take about 2 minutes more):

    run(command="python3 research/gpu_train.py run --minutes 7", carry=[".kit_train"], timeout_s=600)

`run` decodes the cache into --cache-dir (default /tmp/deid_kit_cache: outside .kit_train, which
the device tool carries whole), trains with ``deid train --device cuda`` from
the committed state (weights/train_state/last.pt) with the recipe the shipped checkpoint was
trained with (configs/train_128_branch36500.json; another with --config: with
configs/train_128_wide.json the generator has twice the channels at 128, 64 and 32 px and starts
from the shipped one widened, the same function at step 0) at --batch-size (default 32), and writes to
$OUT (default out/gpu_train; the device tool brings back 8 files): best_generator.pt (lowest
validation cosine with landmarks in bounds), generator.pt and state.pt (the last step: the
generator, and the compact state to go on from with init_from), best_state.pt, log.jsonl,
config.json, samples_last.png (the last sample grid) and train.log. If validation finds the run
diverged (``val_stop``), it restarts once from best_state.pt for the minutes left, and what comes
back is the first run's best_generator.pt, best_state.pt and log.jsonl, the restart's
best_generator_restart.pt, state_restart.pt and log_restart.jsonl, its last sample grid and
train.log. Then, back on the CPU machine, measure the candidate as any other:
``deid evaluate --weights OUT/best_generator.pt --methods generate --judge dlib``.

Rehearse on a CPU machine (same steps, a minute of training, batch 8):

    python research/gpu_train.py run --device cpu --minutes 1 --batch-size 8 --out out/gpu_train_rehearsal
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".kit_train"
SPLIT = "lfw_train_128_m0.2"
MODELS = ("det_scrfd_2.5g_kps.onnx", "rec_mobilefacenet.pt")
CONFIG = ROOT / "configs" / "train_128_branch36500.json"
START = ROOT / "weights" / "train_state" / "last.pt"
LIMIT = 64 * 2 ** 20  # what the device tool carries: working tree + carried paths


def pack(args) -> None:
    import cv2
    import numpy as np

    cache = Path(args.cache_dir or ROOT / "cache") / f"{SPLIT}.npz"
    if not cache.exists():
        sys.exit(f"{cache}: not found; run `deid prepare --split train` first")
    (KIT / "models").mkdir(parents=True, exist_ok=True)
    with np.load(cache, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    blobs, se = [], 0.0
    for c in d["crops"]:  # RGB uint8
        ok, b = cv2.imencode(".jpg", np.ascontiguousarray(c[:, :, ::-1]),
                             [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        if not ok:
            sys.exit("JPEG encoding failed")
        blobs.append(b.ravel())
        se += float(((cv2.imdecode(b, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32) - c) ** 2).mean())
    psnr = 10 * np.log10(255.0 ** 2 / (se / len(blobs)))
    out = {k: v for k, v in d.items() if k != "crops"}
    out["jpeg"] = np.concatenate(blobs)
    out["jpeg_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    out["jpeg_quality"] = np.int32(args.quality)
    del out["desc"]  # recomputed from the decoded crops where they are unpacked (2.4 MB less to carry)
    dst = KIT / f"{SPLIT}.q{args.quality}.npz"
    tmp = dst.with_name(dst.name + ".tmp.npz")
    np.savez_compressed(tmp, **out)  # the JPEG bytes do not shrink; the names do
    os.replace(tmp, dst)
    shared = Path(args.shared)
    for m in MODELS:
        shutil.copyfile(shared / "models" / m, KIT / "models" / m)
    for w in glob.glob(str(KIT / "*.whl")):
        os.remove(w)
    import importlib.metadata as md

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(KIT), f"insightface=={md.version('insightface')}"], check=True)
    kit = sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tree = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    print(f"{dst.name}: {len(blobs)} crops, {out['jpeg'].nbytes / 2**20:.1f} MiB of JPEG at quality "
          f"{args.quality}, PSNR {psnr:.1f} dB against the cached crops")
    print(f"kit {kit / 2**20:.1f} MiB + tracked tree {tree / 2**20:.1f} MiB = {(kit + tree) / 2**20:.1f} MiB "
          f"(the device tool carries at most {LIMIT / 2**20:.0f} MiB)")
    if kit + tree > LIMIT:
        sys.exit("too large for the device tool: lower --quality")


def unpack(kit_npz: Path, cache_dir: Path, device: str = "cpu") -> Path:
    """Decode the kit's JPEG cache into a cache file `deid train` reads, with the descriptors of
    the decoded crops computed as `deid prepare` computes them (its fingerprint says the crops
    went through JPEG, so a checkpoint trained on it says so in meta)."""
    import cv2
    import numpy as np

    from deidcli.research.measures import describe
    from deidcli.generator.identity import load_identity_net

    dst = cache_dir / f"{SPLIT}.npz"
    if dst.exists():
        return dst
    with np.load(kit_npz, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    jpeg, off = d.pop("jpeg"), d.pop("jpeg_offsets")
    q = int(d.pop("jpeg_quality"))
    d["crops"] = np.stack([cv2.imdecode(jpeg[off[i]:off[i + 1]], cv2.IMREAD_COLOR)[:, :, ::-1]
                           for i in range(len(off) - 1)])
    net = load_identity_net(KIT / "models", device=device)
    d["desc"] = describe(net, d["crops"], float(d["margin"]), device).astype(np.float32)
    d["fingerprint"] = np.array(f"{d['fingerprint']}+jpeg-q{q}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.npz")
    np.savez(tmp, **d)
    os.replace(tmp, dst)
    return dst


def run(args) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT / "out" / "gpu_train")
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "a")

    def say(msg):
        line = f"== {time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", DEID_MODELS_DIR=str(KIT / "models"))
    try:
        import insightface  # noqa: F401
    except ImportError:
        site = Path("/tmp/deid_site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--target", str(site),
                        *glob.glob(str(KIT / "*.whl"))], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sys.path.insert(0, str(ROOT))
    kit_npz = sorted(KIT.glob(f"{SPLIT}.q*.npz"))
    if not kit_npz:
        sys.exit(f"no {SPLIT}.q*.npz in {KIT}: run `python research/gpu_train.py pack` first")
    cache_dir = Path(args.cache_dir)
    unpack(kit_npz[-1], cache_dir, args.device)
    say(f"cache decoded in {time.time() - t0:.0f} s")
    subprocess.run([sys.executable, "-c", "import torch; print('torch', torch.__version__, 'cuda', "
                    "torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"],
                   env=env, stdout=log, stderr=subprocess.STDOUT)
    runs = Path(args.runs_dir)
    name, start = args.name, str(START)
    deadline = t0 + 60 * args.minutes
    for attempt in (1, 2):
        minutes = (deadline - time.time()) / 60
        if minutes < 0.5:
            break
        cmd = [sys.executable, "-m", "deidcli.cli", "train", "--config", str(args.config), "--name", name,
               "--device", args.device, "--runs-dir", str(runs), "--cache-dir", str(cache_dir),
               "--models-dir", str(KIT / "models"), "--max-minutes", f"{minutes:.2f}",
               "--set", f"batch_size={args.batch_size}", "--set", f"init_from={json.dumps(start)}",
               "--set", "save_every_s=120", *sum((["--set", s] for s in args.set), [])]
        say(f"train ({attempt}): {' '.join(cmd[2:])}")
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        say(f"exit {rc}")
        run_dir = runs / name
        if rc == 0 or not (run_dir / "best_state.pt").exists():
            break
        start, name = str(run_dir / "best_state.pt"), f"{args.name}_restart"  # diverged: go on from its best
    # what comes back ($OUT: at most 8 files)
    from deidcli.research.train.loop import export_train_state

    first, again = runs / args.name, runs / f"{args.name}_restart"
    if again.exists():  # the first run's best and log, the restart's best, last state and log
        files = [(first, "best_generator.pt", "best_generator.pt"), (first, "best_state.pt", "best_state.pt"),
                 (first, "log.jsonl", "log.jsonl"), (again, "best_generator.pt", "best_generator_restart.pt"),
                 (again, "last.pt", "state_restart.pt"), (again, "log.jsonl", "log_restart.jsonl")]
    else:
        files = [(first, f, f) for f in ("best_generator.pt", "generator.pt", "best_state.pt", "log.jsonl",
                                         "config.json")] + [(first, "last.pt", "state.pt")]
    last_run = again if again.exists() else first
    for rd, src, dst in files:
        if not (rd / src).exists():
            continue
        if src == "last.pt":  # the compact state (networks in fp16; the full one is 19 MB)
            export_train_state(rd / src, out / dst)
        else:
            shutil.copy2(rd / src, out / dst)
    samples = sorted((last_run / "samples").glob("*.png"))
    if samples:
        shutil.copy2(samples[-1], out / "samples_last.png")
    say(f"done in {(time.time() - t0) / 60:.1f} min; {sorted(p.name for p in out.iterdir())}")
    log.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="build .kit_train/ on this machine")
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--cache-dir", default=None, help="where `deid prepare` wrote the cache (default <repo>/cache)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the carried crops")
    r = sub.add_parser("run", help="decode the kit and train (on the GPU machine)")
    r.add_argument("--minutes", type=float, default=7.0, help="wall time for everything, training the most of it")
    r.add_argument("--device", default="cuda")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--config", default=str(CONFIG),
                   help="training recipe; a generator with more channels than the committed state's starts "
                        "from it widened (configs/train_128_wide.json)")
    r.add_argument("--name", default="gpu")
    r.add_argument("--runs-dir", default="/tmp/deid_runs")
    r.add_argument("--cache-dir", default="/tmp/deid_kit_cache", help="where the decoded cache goes (not in .kit_train)")
    r.add_argument("--out", default=None, help="default $OUT, else out/gpu_train")
    r.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="more `deid train --set`")
    a = ap.parse_args(argv)
    return pack(a) or 0 if a.cmd == "pack" else run(a)


if __name__ == "__main__":
    sys.exit(main())
