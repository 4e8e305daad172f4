"""Package boundaries: the core loads light, and the import graph of src/tokengraft has no circle."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "tokengraft"
HEAVY = ["transformers", "peft", "tokengraft.checkpoint", "tokengraft.export", "tokengraft.train",
         "tokengraft.doctor", "tokengraft.demo", "tokengraft.io"]


def test_core_imports_nothing_heavy():
    """manifest, vocab (with the RowMap), init and hf must not load transformers or the converters:
    a trainer imports them for a row map, not for a model zoo."""
    code = ("import json, sys\n"
            "import tokengraft.manifest, tokengraft.vocab, tokengraft.init, tokengraft.hf\n"
            "from tokengraft.vocab import RowMap\n"
            "from tokengraft import Manifest, RowMap as R2, fingerprint\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "tokengraft.vocab" in loaded and "tokengraft.manifest" in loaded  # the probe itself works
    bad = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not bad, f"importing the core loaded {bad}"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """tokengraft modules ``path`` imports (at any depth: lazy imports inside functions count too),
    resolved to the module files that exist."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from . import x` names a module
        for t in targets:
            while t and t not in modules:  # a name inside a module: the module is what counts
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("tokengraft"):
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    # a package's __init__ is imported on the way to any of its modules: not an edge worth a cycle
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "tokengraft.export.write" in graph and "tokengraft.hf" in graph["tokengraft.export.write"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_circle():
    """The walk can fail: a planted a -> b -> c -> a circle is reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
