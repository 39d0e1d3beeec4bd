"""The study kinds, one row each: how a kind reads its spec file (once), its headline, how it runs and resumes,
and which columns its MLflow view shows. `taalm ablate` / `taalm tune` run a row; `taalm resume` and the MLflow
view of an older study read the row that ``study.json`` names.

Adding a study kind: a module with ``run(loaded, StudyOptions) -> dict`` (through orchestrator/session.py's
``open_study`` and ``run_stage``; ``options.resume`` continues an interrupted one), named here by its path (imported
when the study runs: Ray and the learning code load then, not when the spec file is read); ``load(path,
overrides) -> loaded`` (validated; ``loaded.spec.name``), ``headline(loaded)`` and ``view_columns(loaded)`` from a
module that imports no Ray (bad input is refused, and `taalm report` / `taalm ui` read old studies, without it);
one row in :data:`KINDS` (docs/DESIGN.md, "Add a study kind").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trainables.errors import InputError

from . import grid, search_space
from .mlflow_views import ensure_trials_view, view_links
from .options import StudyOptions
from .specs import StudyRecord


@dataclass(frozen=True)
class StudyKind:
    name: str
    load: Callable[[Any, Optional[list[str]]], Any]  # (spec file, --set overrides) -> the spec, validated
    headline: Callable[[Any], str]  # the line saying what the study will run
    view_columns: Callable[[Any], tuple[list[str], Optional[tuple[str, bool]]]]  # MLflow view: params, sort
    runner: str  # "module:function" run(loaded, StudyOptions) -> dict (options.resume: continue it)

    def run(self, loaded, options: StudyOptions) -> dict:
        import importlib

        module, _, fn = self.runner.partition(":")
        return getattr(importlib.import_module(module), fn)(loaded, options)


KINDS: dict[str, StudyKind] = {
    "grid": StudyKind("grid", grid.read_grid, grid.headline, grid.view_columns, "orchestrator.ablation:run_grid"),
    "search": StudyKind("search", search_space.read_search, search_space.headline, search_space.view_columns,
                        "orchestrator.search:run_space"),
}


@dataclass
class Loaded:
    """A study's spec file, read and validated once, ready to run."""

    kind: StudyKind
    spec: Any

    @property
    def name(self) -> str:
        return self.spec.spec.name

    def run(self, options: StudyOptions) -> dict:
        return self.kind.run(self.spec, options)


def load(kind: str, path, overrides: Optional[list[str]] = None) -> Loaded:
    k = KINDS[kind]
    return Loaded(k, k.load(path, overrides))


def for_resume(study_dir: Path) -> tuple[StudyRecord, Loaded]:
    """An interrupted study's record and its spec file, read again as it was run (its --set overrides)."""
    record = StudyRecord.read(study_dir)
    if not record.source or not record.out_root:
        raise InputError(str(Path(study_dir) / StudyRecord.FILE),
                         "this study's record names no grid or search file to resume")
    if record.kind not in KINDS:
        raise InputError(str(Path(study_dir) / StudyRecord.FILE),
                         f"unknown study kind {record.kind!r} (known: {', '.join(KINDS)})")
    return record, load(record.kind, record.source, record.overrides)


def view_columns(record: StudyRecord) -> Optional[tuple[list[str], Optional[tuple[str, bool]]]]:
    """The view columns of a study's kind, from its spec file as it was run; None when the file moved or changed
    since (the view then falls back on what the trials logged)."""
    k = KINDS.get(record.kind)
    if k is None or not record.source:
        return None
    try:
        return k.view_columns(k.load(record.source, record.overrides))
    except Exception:  # noqa: BLE001 (the grid file moved or changed since: what the trials logged will do)
        return None


def study_links(study_dir: Path, base: str) -> Optional[tuple[str, str, int]]:
    """(the study's trials view URL, MLflow's compare URL of its trials, number of trials) under ``base``; the
    view is saved first if the study has none yet (studies run before views existed). None when the study's
    experiment is not in its store."""
    from mlflow.tracking import MlflowClient

    record = StudyRecord.read(study_dir)
    client = MlflowClient(record.tracking_uri)
    exp = client.get_experiment_by_name(record.name)
    if exp is None:
        return None
    ensure_trials_view(client, exp.experiment_id, record, lambda: view_columns(record))
    return view_links(client, exp.experiment_id, record.protocol, base)
