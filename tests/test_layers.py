"""The package follows the pipeline: no import circle, and no stage imports a later one.

Stages, earliest first (ARCHITECTURE.md): helpers (errors, expr, files, parallel, config, plotting) < materials < micro
< data < surrogate < laws < macro < localization, hpc, identify < demo < cli. Lazy imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fe2ml"
STAGE = {"errors": 0, "expr": 0, "files": 0, "parallel": 0, "config": 0, "plotting": 0, "materials": 1, "micro": 2,
         "data": 3, "surrogate": 4, "laws": 5, "macro": 6, "localization": 7, "hpc": 7, "identify": 7, "demo": 8,
         "cli": 9}


def _modules():
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(mods):
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m and t != "fe2ml":
                    edges[m].add(t)
    return edges


def _stage(m):
    parts = m.split(".")
    return STAGE[parts[1]] if len(parts) > 1 else None


def test_every_module_belongs_to_a_stage():
    assert all(m == "fe2ml" or m.split(".")[1] in STAGE for m in _modules())


def test_no_stage_imports_a_later_one():
    edges = _imports(_modules())
    bad = sorted(f"{a} -> {b}" for a in edges for b in edges[a]
                 if _stage(a) is not None and _stage(b) is not None and _stage(b) > _stage(a))
    assert not bad, f"imports from a later pipeline stage: {bad}"


def test_no_import_circle():
    edges = _imports(_modules())
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                pytest.fail(f"import circle: {' -> '.join(path[path.index(t):] + [t])}")
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_the_layer_check_finds_a_later_stage_import(tmp_path):
    # the check itself can fail: a micro module importing macro is reported
    fake = {"fe2ml.micro.x": tmp_path / "x.py", "fe2ml.macro.y": tmp_path / "y.py"}
    fake["fe2ml.micro.x"].write_text("from fe2ml.macro.y import Z\n")
    fake["fe2ml.macro.y"].write_text("Z = 1\n")
    edges = _imports(fake)
    assert edges["fe2ml.micro.x"] == {"fe2ml.macro.y"} and _stage("fe2ml.macro.y") > _stage("fe2ml.micro.x")
