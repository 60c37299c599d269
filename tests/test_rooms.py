"""The house rules on imports, read from the source (every import, also those inside functions):
no room imports a room above it, and no two files import each other, directly or round a circle.
Rooms, bottom to top: common, coel_model, topologies, nodes, controller, testbed, benchmarks, coel
(the command)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("common", "coel_model", "topologies", "nodes", "controller", "testbed", "benchmarks", "coel")


def module_files() -> dict[str, Path]:
    out = {}
    for room in ROOMS:
        for f in sorted((REPO / room).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(mod: str, path: Path, files: dict[str, Path]) -> list[tuple[str, int]]:
    """(project module, line) of every import in `path`; `from pkg import name` counts as pkg.name
    when that is a module."""
    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = base.strip(".")
            names = [f"{base}.{a.name}" if owner(f"{base}.{a.name}") == f"{base}.{a.name}" else base
                     for a in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in map(owner, names) if t and t != mod]
    return sorted(set(found))


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    files = module_files()
    return files, {m: imports_of(m, f, files) for m, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_room_imports_a_room_above_it():
    files, graph = import_graph()
    assert {m.split(".")[0] for m in files} >= set(ROOMS) - {"benchmarks"}, "a room is missing: fix ROOMS"
    rank = {room: i for i, room in enumerate(ROOMS)}
    upward = [f"{files[m].relative_to(REPO)}:{line} ({m.split('.')[0]}) imports {t} ({t.split('.')[0]})"
              for m, targets in graph.items() for t, line in targets
              if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert not upward, "imports from a lower room to a higher one:\n" + "\n".join(upward)


def test_no_import_circle_between_files():
    files, graph = import_graph()
    found = cycles({m: {t for t, _ in targets} for m, targets in graph.items()})
    lines = []
    for comp in found:
        lines.append(" <-> ".join(comp))
        lines += [f"    {files[m].relative_to(REPO)}:{line} imports {t}"
                  for m in comp for t, line in graph[m] if t in comp]
    assert not found, "import circles:\n" + "\n".join(lines)


def test_the_checks_see_imports_inside_functions_relative_imports_and_circles(tmp_path):
    src = tmp_path / "agent.py"
    src.write_text("from . import protocol\n"
                   "def f():\n"
                   "    from testbed.traces import merge\n"
                   "    import coel_model.quant as q\n")
    files = {"nodes.agent": src, "nodes.protocol": src, "testbed.traces": src, "coel_model.quant": src}
    assert sorted(imports_of("nodes.agent", src, files)) == [("coel_model.quant", 4), ("nodes.protocol", 1),
                                                             ("testbed.traces", 3)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
