"""``deid doctor``: is this machine ready to run deid? One check record per line, with a fix.

Each ``check_*`` function returns a list of :class:`Check` records and never raises for a
problem it is checking for; :func:`run_checks` runs them all and :func:`exit_code` maps them
to the process exit code (0 all required checks pass, 3 a model file or the generator
checkpoint is missing or does not verify, 1 another required check failed).

Statuses: ``OK``; ``WARN`` (something optional is missing or degraded: deid still runs with
its defaults); ``FAIL`` (a required check: ``deid anonymize`` with its defaults would fail);
``INFO`` (what was found, no judgement: e.g. NVENC in a CPU-only box).

Heavy modules (torch, av, onnxruntime, insightface) are imported inside the checks: this
module is imported by the CLI at start-up and must stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import click

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"

#: Models ``deid anonymize`` needs with its default options (detector, identity network for
#: ``--method generate``); a missing one is a FAIL, a missing other registry file a WARN.
REQUIRED_MODELS = ("det_scrfd_2.5g_kps.onnx", "rec_mobilefacenet.onnx")
#: (import name, distribution names to read the version from); all required by deid.
PACKAGES = (
    ("torch", ("torch",)),
    ("av", ("av",)),
    ("insightface", ("insightface",)),
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    ("numpy", ("numpy",)),
    ("click", ("click",)),
    ("cv2", ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
             "opencv-contrib-python")),
)
# Minimum versions when deid's own package metadata is not available (running from a checkout).
_FALLBACK_MINIMUMS = {"torch": "2.2", "av": "14", "insightface": "0.7.3", "onnxruntime": "1.17",
                      "numpy": "1.24", "click": "8.1", "opencv-python-headless": "4.8"}
_REINSTALL_AV = "pip install --force-reinstall 'av>=14' (the PyPI wheels bundle FFmpeg with these)"


@dataclass
class Check:
    group: str  # python | packages | ffmpeg | models | device | cache
    name: str  # what was checked, e.g. "torch", "encoder libx264", "model det_scrfd_2.5g_kps.onnx"
    status: str  # OK | WARN | FAIL | INFO
    detail: str  # what was found, one line
    fix: Optional[str] = None  # how to fix it (problems only)
    models: bool = False  # a FAIL here is a model problem: exit code 3

    def line(self) -> str:
        s = f"{self.status:5s} {self.name}: {self.detail}"
        return s + (f"; fix: {self.fix}" if self.fix else "")


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _minimums() -> dict[str, str]:
    import importlib.metadata as md

    try:
        reqs = md.requires("deid-video") or []  # the distribution name (the module is deidcli)
    except md.PackageNotFoundError:
        return dict(_FALLBACK_MINIMUMS)
    out = {}
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*$", r)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def check_python() -> list[Check]:
    from .. import __version__

    v = sys.version_info
    ver = f"{v.major}.{v.minor}.{v.micro}"
    if v < (3, 10):
        return [Check("python", "python", FAIL, f"{ver} ({sys.executable}); deid {__version__} needs 3.10+",
                      "install Python 3.10 or newer and reinstall deid into it")]
    return [Check("python", "python", OK, f"{ver} ({sys.executable}); deid {__version__}")]


def check_packages() -> list[Check]:
    """Each package imports, and its version meets deid's minimum."""
    import importlib
    import importlib.metadata as md

    mins = _minimums()
    out = []
    for mod, dists in PACKAGES:
        dist, version = dists[0], None
        for d in dists:
            try:
                version, dist = md.version(d), d
                break
            except md.PackageNotFoundError:
                continue
        try:
            with contextlib.redirect_stdout(sys.stderr):
                importlib.import_module(mod)
        except Exception as e:  # ImportError, or a broken install raising anything
            reason = " ".join(str(e).split()) or type(e).__name__
            out.append(Check("packages", mod, FAIL,
                             f"cannot import {mod} ({reason})" if version else f"{dist} is not installed",
                             f"pip install '{dist}>={mins.get(dist, _FALLBACK_MINIMUMS.get(dist, '0'))}'"))
            continue
        minimum = mins.get(dist) or mins.get(dists[0])
        detail = f"{dist} {version or '(version unknown)'}"
        if version and minimum and _version_tuple(version) < _version_tuple(minimum):
            out.append(Check("packages", mod, FAIL, f"{detail}, deid needs >= {minimum}",
                             f"pip install --upgrade '{dist}>={minimum}'"))
        else:
            out.append(Check("packages", mod, OK, detail))
    return out


def _codec(name: str, mode: str):
    import av

    try:
        return av.Codec(name, mode)
    except Exception:
        return None


def _nvenc_opens(name: str) -> Optional[str]:
    """None when the encoder opens on this machine, else the reason (no GPU, no driver, ...)."""
    from fractions import Fraction

    import av

    try:
        cc = av.CodecContext.create(name, "w")
        cc.width, cc.height, cc.pix_fmt, cc.time_base = 256, 256, "yuv420p", Fraction(1, 25)
        cc.open()
        return None
    except Exception as e:
        return " ".join((getattr(e, "strerror", None) or str(e) or type(e).__name__).split())


def check_ffmpeg() -> list[Check]:
    """The FFmpeg inside PyAV: encoders deid uses, decoders for common inputs, muxers."""
    try:
        import av
    except Exception:
        return [Check("ffmpeg", "ffmpeg", FAIL, "PyAV is not importable: no FFmpeg to check",
                      "pip install 'av>=14'")]
    lavc = ".".join(map(str, av.library_versions.get("libavcodec", ())))
    out = [Check("ffmpeg", "ffmpeg", INFO, f"PyAV {av.__version__}, libavcodec {lavc}")]

    # encoders: (name, required, what deid uses it for)
    for name, required, use in (
        ("libx264", True, "the default --codec"),
        ("libx265", False, "--codec libx265"),
        ("aac", False, "--audio aac"),
    ):
        c = _codec(name, "w")
        if c is not None:
            out.append(Check("ffmpeg", f"encoder {name}", OK, f"present ({use})"))
        else:
            out.append(Check("ffmpeg", f"encoder {name}", FAIL if required else WARN,
                             f"missing from this FFmpeg build ({use} will not work)", _REINSTALL_AV))
    if _codec("h264_nvenc", "w") is None:
        out.append(Check("ffmpeg", "encoder h264_nvenc", INFO, "not in this FFmpeg build (--codec h264_nvenc "
                         "unavailable; libx264 encodes on the CPU)"))
    else:
        why = _nvenc_opens("h264_nvenc")
        out.append(Check("ffmpeg", "encoder h264_nvenc", INFO,
                         "in the build and opens: --codec h264_nvenc encodes on the GPU" if why is None else
                         f"in the build but cannot open here ({why}): needs an NVIDIA GPU and driver"))

    # decoders for common inputs: (codec, decoders to look for, in order)
    for codec, names in (
        ("h264", ("h264",)), ("hevc", ("hevc",)), ("vp9", ("vp9", "libvpx-vp9")),
        ("av1", ("libdav1d", "libaom-av1")), ("aac", ("aac",)), ("mp3", ("mp3", "mp3float")),
        ("opus", ("opus", "libopus")),
    ):
        found = next((n for n in names if _codec(n, "r") is not None), None)
        if found:
            out.append(Check("ffmpeg", f"decoder {codec}", OK, f"present ({found})"))
        elif codec == "av1" and _codec("av1", "r") is not None:
            out.append(Check("ffmpeg", "decoder av1", WARN, "only FFmpeg's native av1 decoder, which needs "
                             "hardware acceleration: AV1 inputs may not decode", _REINSTALL_AV))
        else:
            out.append(Check("ffmpeg", f"decoder {codec}", FAIL if codec == "h264" else WARN,
                             f"missing: {codec} inputs cannot be read", _REINSTALL_AV))

    # muxers: (format, required, what for)
    for fmt, required, use in (
        ("mp4", True, ".mp4/.m4v outputs"),
        ("matroska", True, ".mkv outputs; the default format on a pipe"),
        ("mpegts", False, "--format mpegts on a pipe"),
    ):
        try:
            av.ContainerFormat(fmt, "w")
            out.append(Check("ffmpeg", f"muxer {fmt}", OK, f"present ({use})"))
        except Exception:
            out.append(Check("ffmpeg", f"muxer {fmt}", FAIL if required else WARN, f"missing ({use})",
                             _REINSTALL_AV))
    return out


def check_models(models_dir: Optional[os.PathLike] = None) -> list[Check]:
    """Every registry file: where it was found and whether its SHA-256 verifies (weights.status)."""
    from .. import weights

    dirs = weights.search_dirs(models_dir)
    shown = ", ".join(f"{d}{'' if d.is_dir() else ' (no such folder)'}" for d in dirs)
    out = [Check("models", "model search path", INFO, shown)]
    for name in weights.REGISTRY:
        st = weights.status(name, models_dir)
        required = name in REQUIRED_MODELS
        label = f"model {name}"
        use = st.model.purpose
        if st.path is None and not weights.offline():  # fetched on first use
            out.append(Check("models", label, WARN if required else INFO,
                             f"not found; fetched on first use from {weights.source_url(name)}; "
                             f"{'required' if required else 'optional'}: {use}",
                             "run `deid models download` now if this machine will be offline, or set "
                             "DEID_MODELS_URL to a mirror" if required else None))
        elif st.path is None:
            out.append(Check("models", label, FAIL if required else WARN,
                             f"not found; {'required' if required else 'optional'}: {use}",
                             "run `deid models download`, or set DEID_MODELS_DIR (or --models-dir) to a folder "
                             "holding it", models=required))
        elif not st.verified:
            got = weights.sha256_file(st.path)
            out.append(Check("models", label, FAIL,
                             f"{st.path}: SHA-256 mismatch ({got[:12]}..., expected {st.model.sha256[:12]}...)",
                             f"delete {st.path} and run `deid models download`", models=True))
        else:
            out.append(Check("models", label, OK, f"{st.path} (SHA-256 verified)"))
    return out


def check_generator(weights_path: Optional[os.PathLike] = None) -> list[Check]:
    """The generator checkpoint (default: the shipped one) loads with weights_only; its config."""
    from .. import weights
    from ..errors import ModelError

    name = "generator checkpoint"
    try:
        path = weights.generator_path(weights_path)
    except ModelError as e:
        return [Check("models", name, FAIL, str(e).split(";")[0],
                      "pass --weights PATH to a checkpoint from `deid train`, restore "
                      "weights/deid_generator_128.pt (git checkout weights/), or use --method blur", models=True)]
    try:
        import torch  # noqa: F401
    except Exception as e:
        return [Check("models", name, FAIL, f"{path}: cannot check, torch is not importable ({type(e).__name__})",
                      "install torch (see the packages check)")]
    from ..generator.model import load_generator

    try:
        gen = load_generator(path, device="cpu")
    except ModelError as e:
        return [Check("models", name, FAIL, str(e),
                      "pass --weights PATH to a valid checkpoint, restore weights/deid_generator_128.pt, "
                      "or use --method blur", models=True)]
    cfg = ", ".join(f"{k}={v}" for k, v in sorted(gen.config.items()))
    n = sum(p.numel() for p in gen.parameters())
    return [Check("models", name, OK, f"{path} loads (weights_only), {n / 1e6:.2f} M parameters; config: {cfg}")]


def check_device() -> list[Check]:
    """torch CUDA, ONNX Runtime providers, and what `--device auto` resolves to."""
    out = []
    try:
        import torch
    except Exception:
        return [Check("device", "device", FAIL, "torch is not importable: device not checked",
                      "install torch (see the packages check)")]
    build = f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda} build" if torch.version.cuda
                                               else "CPU-only build")
    has_gpu = shutil.which("nvidia-smi") is not None
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out.append(Check("device", "torch CUDA", OK, f"{len(names)} device(s): {', '.join(names)} ({build})"))
    elif has_gpu:
        out.append(Check("device", "torch CUDA", WARN, f"nvidia-smi is present but torch sees no CUDA device ({build})",
                         "install the CUDA build of PyTorch (`make install` on this machine does), or check the "
                         "NVIDIA driver with nvidia-smi"))
    else:
        out.append(Check("device", "torch CUDA", INFO, f"no CUDA device ({build}): deid runs on the CPU"))

    ort_cuda = False
    try:
        import onnxruntime

        avail = onnxruntime.get_available_providers()
        ort_cuda = "CUDAExecutionProvider" in avail
        if torch.cuda.is_available() and not ort_cuda:
            out.append(Check("device", "onnxruntime providers", WARN,
                             f"{', '.join(avail)}: no CUDAExecutionProvider, the detector runs on the CPU",
                             "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"))
        else:
            out.append(Check("device", "onnxruntime providers", OK if ort_cuda or not torch.cuda.is_available()
                             else WARN, ", ".join(avail)))
    except Exception as e:
        out.append(Check("device", "onnxruntime providers", FAIL, f"onnxruntime is not importable ({type(e).__name__})",
                         "pip install onnxruntime (or onnxruntime-gpu)"))
        return out

    from ..generator.engine import onnx_providers, resolve_runtime

    try:
        rt = resolve_runtime("auto")
        providers = onnx_providers(rt)
        detail = f"generator on {rt.device} ({rt.dtype}), detector on {providers[0]}"
        if rt.device.startswith("cuda") and providers[0] != "CUDAExecutionProvider":
            out.append(Check("device", "--device auto", WARN, detail + " (no CUDA provider in onnxruntime)",
                             "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"))
        else:
            out.append(Check("device", "--device auto", OK, detail))
    except Exception as e:
        out.append(Check("device", "--device auto", FAIL, f"cannot resolve: {e}", "check the torch installation"))
    return out


def _cpu_int8_flags() -> Optional[list[str]]:
    """The CPU's 8-bit dot-product extensions from /proc/cpuinfo (Linux x86), None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return [x for x in ("avx512_vnni", "avx_vnni", "amx_int8") if x in flags]


def _int8_check(name: str, label: str, what: str, uses: str, script: str, option: str,
                models_dir: Optional[os.PathLike]) -> list[Check]:
    """What ``auto`` precision runs for the model file ``name``: int8 built on the CPU (timed), fp32
    on CUDA. what: the int8 model in words; uses: what int8 runs for; script: the calibration
    script (research/<script>.py) and option: the opt-out."""
    from .. import quantize, weights
    from ..generator.engine import onnx_providers, resolve_runtime

    st = weights.status(name, models_dir)
    if not st.ok:
        return [Check("device", label, INFO, f"not checked: {name} is missing or does not verify (see above)")]
    try:
        providers = onnx_providers(resolve_runtime("auto"))
    except Exception as e:  # torch or onnxruntime missing: reported by the checks above
        return [Check("device", label, INFO, f"not checked ({type(e).__name__})")]
    if providers[0] != "CPUExecutionProvider":
        return [Check("device", label, INFO, f"auto: fp32 on {providers[0]} (int8 is for the CPU provider only)")]
    try:
        _, info = quantize.build_int8(st.path, sha256=st.model.sha256)
    except Exception as e:  # NoCalibration, Int8Error, onnx/onnxruntime errors
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        return [Check("device", label, WARN, f"auto: int8 {what} unavailable ({reason}); {uses} runs fp32, "
                      "about 2x slower on the CPU",
                      "reinstall deid (deidcli/data/*.calib.json is package data), or rerun "
                      f"research/calibrate_{script}.py with this onnxruntime")]
    flags = _cpu_int8_flags()
    detail = (f"auto: int8 on the CPU for {uses} (built at load in {info['seconds']:.2f} s from "
              f"{Path(info['calibration']).name})")
    if flags == []:  # not known to be worse: said, not judged
        detail += ("; this CPU has no VNNI/AMX and int8 was checked against fp32 on AVX512-VNNI only: "
                   f"research/check_{script}_int8.py compares them here ({option} fp32 to opt out)")
    elif flags:
        detail += f"; CPU: {', '.join(flags)}"
    return [Check("device", label, INFO, detail)]


def check_detector_precision(models_dir: Optional[os.PathLike] = None) -> list[Check]:
    """What ``--detector-precision auto`` runs: the int8 detector built on the CPU (timed), fp32 on CUDA."""
    from ..options import DetectOptions

    return _int8_check(DetectOptions().detector, "detector precision", "detector", "the detector", "detector",
                       "--detector-precision", models_dir)


def check_identity_precision(models_dir: Optional[os.PathLike] = None) -> list[Check]:
    """What ``--check-precision auto`` runs: the identity check's int8 network built on the CPU
    (timed), fp32 on CUDA; the per-track descriptors stay fp32."""
    return _int8_check("rec_mobilefacenet.onnx", "identity check precision", "identity network",
                       "the identity check (descriptors: fp32)", "identity", "--check-precision", models_dir)


def check_cache() -> list[Check]:
    """The download cache ($XDG_CACHE_HOME/deid) is writable (or can be created)."""
    from .. import weights

    d = weights.cache_dir()
    p = d
    while not p.exists() and p != p.parent:
        p = p.parent
    fix = ("set XDG_CACHE_HOME to a writable folder, or `deid models download --dest DIR` and set "
           "DEID_MODELS_DIR=DIR")
    if not p.is_dir():
        return [Check("cache", "cache dir", WARN, f"{d}: {p} is not a folder", fix)]
    try:
        with tempfile.NamedTemporaryFile(dir=p, prefix=".deid-doctor-"):
            pass
    except OSError as e:
        return [Check("cache", "cache dir", WARN, f"{d} is not writable ({e.strerror or e}): "
                      "`deid models download` cannot save there", fix)]
    return [Check("cache", "cache dir", OK, f"{d} writable" + ("" if p == d else " (will be created)"))]


def run_checks(models_dir: Optional[os.PathLike] = None, weights: Optional[os.PathLike] = None) -> list[Check]:
    """Every check, in display order. Anything a library prints while loading goes to stderr."""
    checks: list[Check] = []
    with contextlib.redirect_stdout(sys.stderr):
        for fn in (check_python, check_packages, check_ffmpeg):
            checks += fn()
        checks += check_models(models_dir)
        checks += check_generator(weights)
        checks += check_device()
        checks += check_detector_precision(models_dir)
        checks += check_identity_precision(models_dir)
        checks += check_cache()
    return checks


def exit_code(checks: list[Check]) -> int:
    """3 if a model check failed, else 1 if any other required check failed, else 0."""
    from ..errors import EXIT_FAILED, EXIT_MODELS, EXIT_OK

    if any(c.status == FAIL and c.models for c in checks):
        return EXIT_MODELS
    if any(c.status == FAIL for c in checks):
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------


@click.command()
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder searched first for model files (as for `deid anonymize`).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Generator checkpoint to check (default: the one shipped in weights/).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON on stdout.")
def doctor(models_dir, weights, as_json):
    """Check this installation: Python and packages, FFmpeg in PyAV, models, devices, cache.

    One line per check (OK, WARN, FAIL, INFO), with how to fix each problem. Exit codes:
    0 all required checks pass (warnings allowed), 3 a model file or the generator checkpoint
    is missing or does not verify, 1 another required check failed.
    """
    from .. import __version__

    checks = run_checks(models_dir, weights)
    code = exit_code(checks)
    if as_json:
        click.echo(json.dumps({"deid": __version__, "exit_code": code, "checks": [asdict(c) for c in checks]},
                              indent=2))
    else:
        for c in checks:
            click.echo(c.line())
        n = {s: sum(c.status == s for c in checks) for s in (FAIL, WARN)}
        click.echo(f"deid doctor: {n[FAIL]} failed, {n[WARN]} warning(s); exit {code}")
    sys.exit(code)
