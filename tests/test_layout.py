"""The package's layout by role holds: the product never imports deidcli.research, no import
cycles among deidcli's modules, no module over 800 lines, and `deid --help` imports nothing heavy.

Imports are read from the source (AST), every one of them: module level and deferred inside
functions alike. Strings (the CLI's lazy command map) are not imports.
"""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "deidcli"
MAX_LINES = 800
RESEARCH = "deidcli.research"


def _modules() -> dict[str, Path]:
    """{dotted module name: file} for every .py under deidcli (a package is its __init__)."""
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The deidcli modules that `name` imports, relative imports resolved. `from X import y`
    counts X, and X.y too when y is a submodule (`from . import weights`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods)
    # importing a module runs its packages' __init__ first: `import a.b.c` needs a, a.b too
    closed = set()
    for m in out:
        parts = m.split(".")
        closed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in closed if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _edges_without_ancestors(graph):
    """An edge to one's own ancestor package orders nothing: Python has run that package's
    __init__ before the module itself (`from .. import __version__`)."""
    return {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in graph.items()}


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a list."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_the_packages():
    graph = _graph()
    assert {"deidcli.cli.main", "deidcli.media.transcode", "deidcli.faces.detect", "deidcli.generator.engine",
            "deidcli.pipeline.anonymize", "deidcli.research.evaluate_video",
            "deidcli.research.train.loop"} <= set(graph)
    # relative imports resolve, `from . import x` counts the submodule x, and deferred imports count
    assert "deidcli.pipeline.pipeline" in graph["deidcli.pipeline.anonymize"]
    assert "deidcli.research.train.landmarks" in graph["deidcli.research.train.loop"]
    assert "deidcli.pipeline.anonymize" in graph["deidcli"]  # deferred, inside __getattr__
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_product_never_imports_research():
    bad = [f"{a} -> {b}" for a, bs in _graph().items() if not a.startswith(RESEARCH)
           for b in sorted(bs) if b == RESEARCH or b.startswith(RESEARCH + ".")]
    assert not bad, bad


def test_no_import_cycles():
    cycles = _cycles(_edges_without_ancestors(_graph()))
    assert not cycles, cycles


def test_arrows_between_subpackages_point_one_way():
    """cli, media, faces, generator, pipeline, research (and the shared top-level modules): the
    imports between them form no cycle either, so each folder can be read without the ones above."""
    def folder(m):
        parts = m.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PKG / parts[1]).is_dir()) else m

    packages = {}
    for a, bs in _edges_without_ancestors(_graph()).items():
        packages.setdefault(folder(a), set()).update(folder(b) for b in bs if folder(b) != folder(a))
    cycles = _cycles(packages)
    assert not cycles, cycles


def test_no_module_over_800_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_help_imports_nothing_heavy():
    """`deid --help` lists every command (the research ones by their static help line) without
    importing torch, numpy, OpenCV, ONNX Runtime, InsightFace, PyAV or deidcli.research."""
    code = ("import sys\n"
            "from deidcli.cli import cli\n"
            "try:\n"
            "    cli(['--help'], prog_name='deid')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = ('torch', 'numpy', 'cv2', 'onnxruntime', 'insightface', 'av')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('deidcli.research'))\n"
            "print('IMPORTED', bad)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "IMPORTED []" in p.stdout, p.stdout.splitlines()[-1]
    for name in ("anonymize", "bench", "demo-clip", "doctor", "evaluate", "evaluate-video", "models", "prepare",
                 "train"):
        assert f"\n  {name} " in p.stdout, name
    assert "Frames/s on CLIP per stage" in p.stdout


def test_lazy_commands_resolve_and_their_help_lines_match():
    """Each research command of the lazy map imports, has the name it is listed under, and the
    static help line `deid --help` shows is its own help's first paragraph."""
    import importlib

    import click

    from deidcli.cli.main import RESEARCH_COMMANDS

    for name, (target, short) in RESEARCH_COMMANDS.items():
        mod, attr = target.split(":")
        cmd = getattr(importlib.import_module(mod), attr)
        assert isinstance(cmd, click.Command) and cmd.name == name, target
        assert " ".join(cmd.help.split("\n\n")[0].split()) == short, name
