"""The shape the three loops share: a report protocol, callback hooks, and resumable state.

Every loop is a plain function of a validated config, built the same way (torchtune's recipe shape):

    setup = prepare_run(cfg)              | prepare_meta(cfg)      | prepare_temporalwiki(cfg)
    continual_update(cfg, out_dir, callbacks, resume, setup)     # θ learns TO-LEARN documents, epoch by epoch
    meta_train(cfg, out_dir, callbacks, resume, setup)           # φ learns where to focus, check by check
    temporalwiki_run(cfg, out_dir, callbacks, resume, setup)     # θ through the periods

A typed setup is built once (θ, φ, data, components); the loop only uses it. At every evaluation point the
loop writes its checkpoint (OUT/checkpoint: safetensors + JSON, :mod:`trainables.checkpoint`) and then
reports; with ``resume`` it continues from OUT/checkpoint, and an interrupted + resumed run equals an
uninterrupted one. The outside world (the CLI, the orchestrator's trial session) hangs off three hooks:

    on_start(info)                        once; ``info["resumed_from"]``: the index resumed from, or None
    on_step(unit, step, n_steps, loss)    after every optimisation step (where a time budget is checked)
    on_report(report)                     at every evaluation point, after its checkpoint is written

The continual loop also appends each epoch's numbers to OUT/epochs.jsonl as the epoch ends (:class:`EpochLog`), so
a run stopped at any point (a time limit, a kill) still reports every finished epoch.

:class:`Report` says which loop and where: ``kind`` "epoch" (the continual loop; index 0 is the evaluation
before training), "check" (meta-training; index = the meta-step validated), "period" (TemporalWiki; index =
the period, 0 the first).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .errors import InputError
from .files import write_bytes_atomic

ReportKind = Literal["epoch", "check", "period"]
# what a report's index counts, for messages and tags
UNIT = {"epoch": "epoch", "check": "step", "period": "period"}


@dataclass
class Report:
    kind: ReportKind
    index: int  # the epoch, the meta-step of the check, the period
    total: Optional[int]  # the index the run ends at (epochs, meta-steps, periods - 1), for progress
    metrics: dict  # this point's numbers (None where undefined, e.g. epoch 0's training loss)
    summary: dict  # the run's summary so far (Top Acc ..., best validation accuracy, average perplexities)
    wall_seconds: float  # since the run started, time before a resume included
    checkpoint_dir: Optional[str] = None  # written at this point: a resumed run continues after it
    per_fact: dict = field(default_factory=dict)  # continual: this epoch's accuracy of every fact
    label: str = ""  # a name for the point (a TemporalWiki period)

    @property
    def unit(self) -> str:
        return UNIT[self.kind]

    def flat(self) -> dict:
        """The scalar view (what Tune and MLflow receive): kind, index, total, the metrics, the summary and
        wall time; None becomes NaN."""
        out = {"kind": self.kind, "index": self.index, "total": self.total, **self.metrics, **self.summary,
               "wall_seconds": self.wall_seconds}
        if self.label:
            out["label"] = self.label
        return {k: (float("nan") if v is None else v) for k, v in out.items()}


class Callback:
    """Hooks of every loop; subclass and override what you need."""

    def on_start(self, info: dict) -> None: ...

    def on_step(self, unit: int, step: int, n_steps: int, loss: float) -> None:
        """``unit``: the epoch (continual), the period (TemporalWiki) or 0 (meta-training, whose steps are counted
        over the whole run); ``step`` (from 0) of ``n_steps`` within it; ``loss``: the step's loss (meta-training:
        the meta-batch's objective; the continual loop on a GPU: the latest step's loss that has reached the host,
        a step or two behind, since no step waits for the device; NaN before the first)."""

    def on_report(self, report: Report) -> None: ...


def check_resumable(saved_config: dict, config: dict, ignored: tuple[str, ...], where: str) -> None:
    """A checkpoint resumes only the configuration that wrote it, up to the dotted keys in ``ignored`` (e.g. the
    number of epochs, which a resumed run may extend)."""

    def comparable(d: dict) -> dict:
        d = copy.deepcopy(d)
        for dotted in ignored:
            *parents, key = dotted.split(".")
            section = d
            for name in parents:
                section = section.get(name, {})
            section.pop(key, None)
        return d

    if comparable(saved_config) != comparable(config):
        raise InputError(where, "checkpoint was written by a different configuration (only "
                                f"{', '.join(ignored)} may change on resume)")


class EpochLog:
    """OUT/epochs.jsonl: one JSON line per finished epoch, appended (and flushed to disk) when the epoch ends. A
    resumed run keeps the lines before the epoch it resumes at (the ones after its checkpoint are run again); a
    fresh run starts the file over. A reader skips a last line cut short by a kill (:func:`read_epochs`)."""

    def __init__(self, path: Path, start_epoch: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_epochs(self.path) if r.get("index", 1e9) < start_epoch] if start_epoch else []
        write_bytes_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_epochs(path: Path) -> list[dict]:
    """The records of an epochs.jsonl (none when it is missing; a last line cut short is skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)


def device_memory(device) -> dict:
    """The device's peak memory since the last call (CUDA: allocated and reserved by PyTorch's allocator, then the
    peak is reset) and the process's peak resident memory, in GB."""
    import torch

    out = {"peak_rss_gb": peak_rss_gb()}
    if torch.device(device).type == "cuda":
        out.update(gpu_peak_allocated_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3),
                   gpu_peak_reserved_gb=round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 3))
        torch.cuda.reset_peak_memory_stats(device)
    return out
