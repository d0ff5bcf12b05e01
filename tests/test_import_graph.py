"""The package's modules import each other without a cycle.

The graph is read from the sources (``ast``), so every module is checked without importing it:
an edge ``a -> b`` for each ``import llama_mimi_tt.b``, ``from llama_mimi_tt.b import ...``,
``from llama_mimi_tt import b`` and ``from llama_mimi_tt import name`` (``name`` resolved through
the lazy table in ``__init__.py``). Imports at module level must form no cycle at all (one would
make a module's import depend on which module is imported first). Imports inside functions
(lazy ones) must add no cycle beyond the reviewed ones in ``KNOWN_LAZY_CYCLES``, which is to
shrink, not grow.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llama_mimi_tt"

# cycles made by imports inside functions, each with its reason; remove an entry when its cycle
# goes (the test below fails until you do)
KNOWN_LAZY_CYCLES = {
    frozenset({"audio_sources", "code_cache"}): "audio_sources asks code_cache: is it a cache?",
    frozenset({"data", "pack_index"}): "pack_index uses data's split rule (validation_mask)",
}


def lazy_owners(package_dir: Path) -> dict:
    """``{public name: owning module}`` of the PEP 562 table (``_OWNERS``) in ``__init__.py``."""
    init = package_dir / "__init__.py"
    if not init.is_file():
        return {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_OWNERS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    return {}


def import_graph(package_dir: Path, package: str, lazy: bool) -> dict:
    """``{module: {modules it imports}}`` for the package's top-level modules; with ``lazy``,
    imports inside functions count too."""
    modules = {p.stem: p for p in package_dir.glob("*.py") if p.stem != "__init__"}
    owners = lazy_owners(package_dir)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = ast.walk(tree) if lazy else tree.body
        deps = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package and len(parts) > 1:
                        deps.add(parts[1])
            elif isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.level:  # relative: from . import x, from .x import y
                    parts = [package] + [p for p in parts if p]
                if parts[0] != package:
                    continue
                if len(parts) > 1:
                    deps.add(parts[1])
                else:
                    deps.update(owners.get(a.name, a.name) for a in node.names)
        graph[name] = deps & set(modules)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with a cycle (Tarjan), each a frozenset of modules."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_module_level_imports_have_no_cycle():
    graph = import_graph(ROOT / PACKAGE, PACKAGE, lazy=False)
    assert {"judge", "asr", "speaker_similarity", "statistics", "text_metrics"} <= set(graph)
    assert graph["statistics"] == set()  # the leaf every metric module builds on
    assert cycles(graph) == []


def test_lazy_imports_add_no_new_cycle():
    found = set(cycles(import_graph(ROOT / PACKAGE, PACKAGE, lazy=True)))
    new = found - set(KNOWN_LAZY_CYCLES)
    assert not new, f"import cycles through imports inside functions: {sorted(map(sorted, new))}"
    gone = set(KNOWN_LAZY_CYCLES) - found
    assert not gone, f"these cycles are gone: remove them from KNOWN_LAZY_CYCLES: {gone}"


def test_the_check_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('_OWNERS = {"Thing": "c"}\n')
    (pkg / "a.py").write_text("from pkg.b import f\nimport os\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")  # lazy: a -> b -> a
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("from pkg import Thing\n")  # through the lazy table: c -> d -> c
    (pkg / "e.py").write_text("import pkg.e\n")  # itself
    assert import_graph(pkg, "pkg", lazy=False)["b"] == set()
    assert set(cycles(import_graph(pkg, "pkg", lazy=False))) == {
        frozenset({"c", "d"}),
        frozenset({"e"}),
    }
    assert set(cycles(import_graph(pkg, "pkg", lazy=True))) == {
        frozenset({"a", "b"}),
        frozenset({"c", "d"}),
        frozenset({"e"}),
    }
