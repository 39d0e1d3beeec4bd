"""What a study is run with, whatever its kind: the command line's options (:class:`StudyOptions`) and what the kind
read from its spec file (:class:`StudyPlan`). No Ray here: a spec file is read, and bad input refused, before Ray
is imported."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .progress import Progress
from .specs import Resources


@dataclass
class StudyOptions:
    """How a study runs (the command line's options), whatever its kind."""

    out_root: Path = Path("runs")
    address: Optional[str] = None
    tracking_uri: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[float] = None
    verbose: bool = False
    progress: Progress = field(default_factory=Progress)
    resume: bool = False
    retrain_phi: bool = False  # grids with a meta stage
    storage: Optional[str] = None  # --storage: overrides the spec file's `storage`


@dataclass
class StudyPlan:
    """What a study kind read from its spec file (once) that the start-up needs."""

    kind: str  # the row of orchestrator/kinds.py
    name: str
    source: Path
    overrides: list[str]
    resources: Resources
    where: Callable[[tuple], str]  # a key path -> "file:line (key)" or "--set key", for messages
    configs: list  # the trials' run configs known in advance (the driver's caches are built for them)
    labels: Optional[list[str]]  # the trials' labels (fault injection); None: not known in advance (a search)
    protocol: str = "lama_ckl"
    meta_cfg: Optional[dict] = None
    baseline: Optional[str] = None
    trials: list[dict] = field(default_factory=list)  # study.json's list: key, label, seed
    view_params: list[str] = field(default_factory=list)  # the MLflow view's parameter columns
    view_order: Optional[tuple[str, bool]] = None
    storage: Optional[str] = None  # the spec file's `storage` key
    has_meta: bool = False  # a meta stage runs before the trials (its request is checked with theirs)
