"""The code's shape: no import cycle inside trainables/ (module-level and function-level imports alike), the
learning code imports no Ray, and the config schema imports no implementation module."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "trainables"


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """module of the package ``pkg`` -> the package's modules it imports anywhere in its file (``from . import x``,
    ``from .x import y``, ``import pkg.x``, ``from pkg.x import y``). ``__init__`` is left out: nothing imports it
    by name, so it can close no cycle."""
    name = pkg.name
    modules = {p.stem for p in pkg.glob("*.py")} - {"__init__"}
    graph = {}
    for p in pkg.glob("*.py"):
        if p.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
                elif node.level == 0 and (node.module or "").split(".")[0] == name:
                    rest = node.module.split(".")[1:]
                    deps.update(rest[:1] if rest else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith(name + "."))
        graph[p.stem] = {d for d in deps if d in modules and d != p.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_trainables():
    graph = import_graph()
    assert {"config", "continual", "meta", "registry", "theta", "weighting"} <= set(graph)
    assert cycles(graph) == []


def test_the_schema_and_the_registries_import_no_implementation():
    graph = import_graph()
    assert graph["config"] <= {"errors", "registry", "configio"}  # configio: YAML, overrides, validation
    assert graph["configio"] <= {"errors"}
    assert graph["registry"] <= {"errors"}


def test_trainables_import_no_ray():
    for p in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{p.name} imports Ray"


def test_no_module_of_the_learning_code_is_over_400_lines():
    """The learning code stays in modules one can read at once (issue 19: meta.py had grown to 549 lines)."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}
