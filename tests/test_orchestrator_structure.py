"""The orchestrator's shape (issue 28): its modules in layers, each importing only modules of lower layers
(module-level and function-level imports alike: no import cycle, nothing reaching up), and no module over 350
lines. ``LAYERS`` is the one list docs/DESIGN.md's picture of the orchestrator is drawn from."""

import ast
from pathlib import Path

from test_structure import cycles
from test_structure import import_graph as package_import_graph

PKG = Path(__file__).resolve().parents[1] / "orchestrator"

# lowest first; a module imports only modules of the layers before its own
LAYERS = [
    # a trial's share of a GPU (the memory estimates and the trial driver read it)
    ["gpu_plan"],
    # the records, the storage, the estimates, the faults' words, logging, the progress protocol, MLflow's views
    ["specs", "storage", "memory", "placement", "faults", "logs", "progress", "mlflow_views"],
    # what a study runs with (options, the plan a kind read from its spec file)
    ["options"],
    # what a study is made of: spec files, the MLflow store, Ray (local instance, cluster), the trial driver,
    # the driver's caches, the report's numbers, the `mlflow server` supervision
    ["grid", "mlflow_store", "local_ray", "cluster", "ray_trainables", "caches", "report",
     "mlflow_server"],
    # Tune's callbacks and the Tuner; the report's files; search spaces (a grid's base config)
    ["tracking", "tuning", "console", "report_files", "search_space"],
    # opening and running a study (every kind)
    ["session"],
    # the grid's meta stage
    ["phi_stage"],
    # the study kinds
    ["ablation", "search"],
    # the table of kinds
    ["kinds"],
    # the command line
    ["cli_runs"],
    ["cli"],
]


def import_graph() -> dict[str, set[str]]:
    """orchestrator module -> the orchestrator modules it imports anywhere in its file."""
    return package_import_graph(PKG)


def layer_of() -> dict[str, int]:
    return {m: i for i, layer in enumerate(LAYERS) for m in layer}


def upward(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    return [f"{m} (layer {layers[m]}) imports {d} (layer {layers[d]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if layers[d] >= layers[m]]


def test_every_module_has_a_layer():
    graph, layers = import_graph(), layer_of()
    assert set(graph) == set(layers), {"no layer": sorted(set(graph) - set(layers)),
                                       "no module": sorted(set(layers) - set(graph))}


def test_no_import_cycle_in_the_orchestrator():
    assert cycles(import_graph()) == []


def test_no_module_imports_upward_or_sideways():
    assert upward(import_graph(), layer_of()) == []


def test_the_checker_finds_an_upward_import():
    assert upward({"a": {"b"}, "b": set()}, {"a": 0, "b": 1}) == ["a (layer 0) imports b (layer 1)"]


def test_no_module_of_the_orchestrator_is_over_350_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert max(sizes.values()) <= 350, {k: v for k, v in sizes.items() if v > 350}


def test_reading_a_study_and_its_report_imports_no_ray():
    """Bad input in a spec file is refused, and `taalm report` / `taalm ui` read a study, before (without) Ray's
    import: a fresh interpreter importing the CLI and the kinds, reading a grid and a search through their rows,
    and the report's modules, has no ``ray`` module."""
    import subprocess
    import sys

    root = PKG.parent
    code = ("import sys; import orchestrator.cli, orchestrator.report_files, orchestrator.mlflow_server; "
            "from orchestrator.kinds import load; "
            f"load('grid', '{root / 'ablations' / 'smoke_tiny.yaml'}'); "
            f"load('search', '{root / 'search_spaces' / 'tiny_search.yaml'}'); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout[-2000:]


def test_the_low_layers_import_no_ray_at_module_level():
    """The MLflow store, the spec files and the report's numbers load without Ray (a report or `taalm ui` on a
    machine that only reads a study)."""
    for name in ("mlflow_store", "grid", "search_space", "report", "report_files", "specs", "storage",
                 "mlflow_views"):
        tree = ast.parse((PKG / f"{name}.py").read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{name}.py imports Ray"
