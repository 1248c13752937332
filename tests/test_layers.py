"""The house: every import of duckling's own modules goes down the layers, and the modules' top-level
imports form no cycle (read from the source with ``ast``, nothing is imported)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "duckling"
# bottom to top (README "Layout"); a module may import its own layer and the layers below it
LAYERS = {"config": 0, "errors": 0, "files": 0, "hf": 0, "storage": 0, "data": 1, "recording": 2, "training": 3, "analysis": 4,
          "sweeps": 5, "cli": 6, "cli_args": 6, "notebook": 6, "quickstart": 6, "__init__": 6}
FORBIDDEN = {("analysis", "training")}  # (importer, imported) pairs the ranks alone would allow


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, modules) -> list[tuple[str, int, bool]]:
    """(imported duckling module, line, at the top level of the module) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top = set()

    def walk_top(nodes):  # module-level statements, including those under if / try (not in functions)
        for n in nodes:
            top.add(id(n))
            for field in ("body", "orelse", "finalbody", "handlers"):
                if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                    walk_top(getattr(n, field, []) or [])

    walk_top(tree.body)
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            # ``from duckling.analysis import metrics``: the submodule; ``from duckling.files import X``: files
            names = [f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in modules else n.module for a in n.names]
        else:
            continue
        out += [(m, n.lineno, id(n) in top) for m in names if m == "duckling" or m.startswith("duckling.")]
    return out


def test_no_upward_import():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        here = _layer(name)
        for target, line, _ in _imports(path, modules):
            there = _layer(target)
            if target == "duckling" or LAYERS[there] > LAYERS[here] or (here, there) in FORBIDDEN:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({here}) imports {target} ({there})")
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_no_import_cycle_at_the_top_level():
    modules = _modules()
    graph = {name: sorted({t for t, _, top in _imports(path, modules) if top and t != name and t in modules})
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                path = stack + [m]
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "top-level import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_an_upward_and_a_cyclic_import(tmp_path, monkeypatch):
    """The two tests above fail on what they are for (a package with one upward import and one cycle)."""
    pkg = tmp_path / "duckling"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from duckling.data import vocab\n")  # up: config (0) imports data (1)
    (pkg / "data" / "vocab.py").write_text("import duckling.data.rows\n")
    (pkg / "data" / "rows.py").write_text("def f():\n    import duckling.config\nfrom duckling.data import vocab\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    for test in (test_no_upward_import, test_no_import_cycle_at_the_top_level):
        try:
            test()
        except AssertionError as e:
            msg = str(e)
        else:
            raise AssertionError(f"{test.__name__} passed on a broken package")
        if test is test_no_upward_import:
            assert "config.py:1 (config) imports duckling.data.vocab (data)" in msg
        else:
            assert "duckling.data.rows -> duckling.data.vocab" in msg or "duckling.data.vocab -> duckling.data.rows" in msg
