"""Typed records that cross a boundary: a trial going into Ray, and a study going to disk.

* :class:`TrialSpec`: everything one trial needs, built by the orchestrator (grid, search, meta stage) and
  read back, validated, by the trial driver inside Ray (``param_space={"t": ...}``).
* :class:`StudyRecord`: ``OUT/<name>/study.json``, written when a study starts and read by `taalm report`,
  `taalm resume` and `taalm ui` (the protocol decides the report's columns: no guessing from the data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainables.checkpoint import write_json_atomic
from trainables.errors import InputError, read_text

Protocol = Literal["lama_ckl", "temporalwiki"]


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(1, ge=1)  # Ray Train workers per trial (data parallel)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0)  # retries of a failed trial
    time_budget_s: Optional[float] = Field(None, gt=0)  # a trial running longer fails (checked every step)
    torch_threads: int = Field(1, ge=1)
    # CPUs (and torch threads) of the meta-training stage's single worker; default: what the grid
    # uses at once (cpus_per_worker x workers x max_concurrent), since the stage runs alone
    meta_cpus: Optional[float] = Field(None, gt=0)
    # single-worker trials run inside their Tune trial process (one warm process per concurrent slot, the
    # model's weights loaded once per process) instead of a Ray Train run of their own; multi-worker trials
    # always run as Ray Train workers. Same learning code, same metrics (tested)
    lean: bool = True
    # lean trials: base weights up to this size stay loaded in the warm trial process from one trial to the
    # next (0: every trial reads them again)
    keep_weights_gb: float = Field(2.0, ge=0)
    # memory one trial worker needs at its peak, in GB (a lean trial is one worker): told to Ray's scheduler, and
    # the study runs only as many trials at once as fit. Default: estimated from the model and the batch
    # (orchestrator/memory.py)
    memory_gb: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _gpu_shares(self):
        from trainables.config import ConfigKeyError

        g = self.gpus_per_worker
        if g > 1 and g != int(g):
            raise ConfigKeyError(("gpus_per_worker",), f"{g:g} GPUs: above one GPU a worker takes whole GPUs")
        if 0 < g < 1 and not self.runs_lean():
            raise ConfigKeyError(("gpus_per_worker",), f"a fraction of a GPU ({g:g}) packs several trials on one "
                                                       "GPU: only for single-worker lean trials (resources.workers "
                                                       "1, resources.lean true); Ray Train's workers each need a "
                                                       "GPU of their own for NCCL")
        return self

    def meta_cpu_count(self) -> float:
        return self.meta_cpus or self.cpus_per_worker * self.workers * self.max_concurrent

    def runs_lean(self) -> bool:
        return self.lean and self.workers == 1


class TrialSpec(BaseModel):
    """One trial as it crosses into Ray."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["continual", "temporalwiki", "meta"]
    trial_key: str  # stable id (grid: hash of the axis values and seed; search: Tune's trial id)
    label: str  # the method name in reports
    config: dict[str, Any]  # the validated run / TemporalWiki / meta-training config, as JSON
    resources: Resources
    storage_path: str  # where Ray Train keeps checkpoints (under the study's storage)
    storage: Optional[str] = None  # the study's storage (orchestrator/storage.py): φ, the epoch-0 evaluations
    phi_dir: Optional[str] = None  # meta: the directory φ is written to (its cache directory on the trial's node)
    phi_key: Optional[str] = None  # meta: where φ is published in the storage (phi/<key>); trials: the φ to fetch
    inject_fault: Optional[int] = None  # TAALM_INJECT_FAULT for this trial (a testing hook)

    @classmethod
    def from_tune(cls, config: dict) -> "TrialSpec":
        return cls.model_validate(config["t"])


class StudyRecord(BaseModel):
    """``study.json``: what a study is, so it can be reported, browsed and resumed."""

    model_config = ConfigDict(extra="forbid")
    kind: str  # a row of the study kinds table (orchestrator/kinds.py): grid, search
    protocol: Protocol = "lama_ckl"
    name: str
    tracking_uri: str
    source: Optional[str] = None  # the grid or search-space file (what `taalm resume` re-reads)
    overrides: list[str] = []
    out_root: Optional[str] = None
    baseline: Optional[str] = None  # the row the report's paired differences are taken against
    storage: Optional[str] = None  # the study's storage (a path or a URI); None: the study directory
    trials: list[dict[str, Any]] = []  # grids: key, label, seed of every trial, in grid order

    FILE: ClassVar[str] = "study.json"

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data):
        """study.json files written before this record named the grid or search file by its kind, or the
        report's baseline row ``reference``."""
        if isinstance(data, dict) and "source" not in data:
            for k in ("grid", "search"):
                if k in data:
                    data = {**{x: y for x, y in data.items() if x != k}, "source": data[k]}
        if isinstance(data, dict) and "reference" in data and "baseline" not in data:
            data = {**{x: y for x, y in data.items() if x != "reference"}, "baseline": data["reference"]}
        return data

    def write(self, study_dir: Path) -> None:
        write_json_atomic(Path(study_dir) / self.FILE, self.model_dump(mode="json"))

    @classmethod
    def read(cls, study_dir: Path) -> "StudyRecord":
        f = Path(study_dir) / cls.FILE
        if not f.is_file():
            raise InputError(str(study_dir), "not a study directory (no study.json): run `taalm ablate` first")
        try:
            data = json.loads(read_text(f))
        except json.JSONDecodeError as e:
            raise InputError(f"{f}:{e.lineno}", f"corrupt study file: {e.msg}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(x) for x in err["loc"]) or "?"
            what = "missing" if err["type"] == "missing" else err["msg"]
            raise InputError(str(f), f"corrupt study file: {key}: {what}") from None


def study_tracking(study_dir: Path) -> tuple[str, str]:
    """(tracking URI, experiment name) of a study directory."""
    s = StudyRecord.read(study_dir)
    return s.tracking_uri, s.name
