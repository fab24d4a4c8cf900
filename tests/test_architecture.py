"""The package's structure: no import cycles (function-local imports count), and a runtime
that loads neither ONNX nor the code generators."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: package name -> folder (pyproject's package-dir mapping)
FOLDERS = {"bscompile": ROOT / "bscompile", "bscompile.passes": ROOT / "passes", "bscompile.codegen": ROOT / "codegen",
           "bscompile.runtime": ROOT / "runtime", "bscompile.models": ROOT / "models"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if not any(name.startswith(other + ".") and other != pkg and other.startswith(pkg + ".")
                       for other in FOLDERS):
                mods[name] = path
    return mods


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every bscompile module ``name`` imports, anywhere in the file (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(name.split(".")[:-node.level] + [node.module])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "bscompile":
                out.add(t)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(p, m, set(mods)) for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 30  # the walk saw the whole package


def test_runtime_loads_neither_onnx_nor_code_generators():
    code = ("import sys, bscompile.runtime.module, bscompile.runtime.artifact; import bscompile; bscompile.load; "
            "bad = [m for m in sys.modules if m == 'onnx' or m.startswith(('onnx.', 'bscompile.codegen', "
            "'bscompile.frontend', 'bscompile.passes', 'tvm.relax.frontend.onnx'))]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_remote_client_loads_no_kernel_generator():
    """The tuner's device client (and the server bundle's Python side) names targets and runs
    modules: of the compiler it loads the machine models only, not the generators or passes."""
    code = ("import sys, bscompile.runtime.remote; "
            "bad = [m for m in sys.modules if m == 'onnx' or m.startswith(('onnx.', 'bscompile.frontend', "
            "'bscompile.passes', 'bscompile.codegen.')) and m not in ('bscompile.codegen.cpu_cost', "
            "'bscompile.codegen.tvmscript')]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
