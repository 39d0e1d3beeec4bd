"""LAMA-CKL data: validated loading, hashing, and the TO-LEARN / NOT-TO-FORGET / Train-Attention split.

Every record is validated line by line before anything trains: a malformed line or a missing field
stops with ``file:line`` and the field. Records become :class:`Fact` objects.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from . import seeds
from .errors import InputError, read_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAMA_DIR = REPO_ROOT / "data" / "lama_ckl"
LAMA_FILES = ("variant.jsonl", "invariant_descriptive.jsonl", "invariant_schematic.jsonl")


class LamaRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    uuid: str
    relation_code: str
    relation_label: str
    subject: str
    object: str
    evidence: str
    task_descriptive: str
    task_schematic: str
    invariant: bool
    scores: dict = {}

    @field_validator("uuid", "object", "evidence", "task_descriptive", "task_schematic")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


@dataclass(frozen=True)
class Fact:
    uuid: str
    subject: str
    relation: str
    object: str
    evidence: str
    task_descriptive: str
    task_schematic: str
    source: str  # file stem the fact came from
    line: int
    release_scores: dict = field(default_factory=dict, compare=False, hash=False)

    def probe(self, task: str) -> str:
        return self.task_descriptive if task == "descriptive" else self.task_schematic


def read_jsonl_validated(path: Path, schema: type[BaseModel]) -> list[tuple[int, BaseModel]]:
    """Parse and validate a JSON-lines file; errors name ``file:line`` and the field."""
    if not path.is_file():
        raise InputError(str(path), "data file not found")
    rows = []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}", f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}", "each line must be a JSON object")
        try:
            rows.append((lineno, schema.model_validate(obj)))
        except ValidationError as e:
            err = e.errors()[0]
            fld = ".".join(str(x) for x in err["loc"]) or "?"
            msg = "missing field" if err["type"] == "missing" else err["msg"]
            raise InputError(f"{path}:{lineno}", f"field {fld!r}: {msg}") from None
    if not rows:
        raise InputError(str(path), "file holds no records")
    return rows


def data_hash(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class LamaCKL:
    """The three LAMA-CKL files: their facts (by file stem) and the data hash."""

    dir: Path
    facts: dict[str, list[Fact]]
    hash: str

    def all_facts(self) -> list[Fact]:
        """Every fact once (the two invariant files share some uuids: the first one wins)."""
        seen: dict[str, Fact] = {}
        for name in ("variant", "invariant_descriptive", "invariant_schematic"):
            for f in self.facts[name]:
                seen.setdefault(f.uuid, f)
        return list(seen.values())


def load_lama(directory: Optional[str | Path] = None) -> LamaCKL:
    d = Path(directory) if directory else DEFAULT_LAMA_DIR
    if not d.is_dir():
        raise InputError(str(d), "LAMA-CKL data directory not found")
    paths = [d / f for f in LAMA_FILES]
    facts = {}
    for p in paths:
        rows = read_jsonl_validated(p, LamaRecord)
        stem = p.stem
        uuids = set()
        for lineno, r in rows:
            if r.uuid in uuids:
                raise InputError(f"{p}:{lineno}", f"field 'uuid': duplicate uuid {r.uuid!r}")
            uuids.add(r.uuid)
        facts[stem] = [
            Fact(r.uuid, r.subject, r.relation_label, r.object, r.evidence, r.task_descriptive,
                 r.task_schematic, stem, lineno, r.scores)
            for lineno, r in rows
        ]
    return LamaCKL(d, facts, data_hash(paths))


# --------------------------------------------------------------------------------------------
# The split (ALGORITHM.md §3, "Tailoring")


@dataclass
class Split:
    to_learn: list[Fact]
    ntf: list[Fact]
    ta_pool: list[Fact]
    scores: dict[str, float]  # uuid -> probe accuracy of the base model (task probe)
    origin: str  # "tailored:<model key>", "release:<model>", "file:<path>"

    def summary(self) -> dict:
        return {"to_learn": len(self.to_learn), "ntf": len(self.ntf), "ta_pool": len(self.ta_pool),
                "origin": self.origin}

    def to_json(self) -> dict:
        return {
            "origin": self.origin,
            "to_learn": [f.uuid for f in self.to_learn],
            "ntf": [f.uuid for f in self.ntf],
            "ta_pool": [f.uuid for f in self.ta_pool],
            "scores": self.scores,
        }


def make_split(lama: LamaCKL, scores: dict[str, float], task: str, origin: str,
               to_learn_size: Optional[int] = None, ntf_size: Optional[int] = None,
               ta_pool_size: Optional[int] = None, seed: int = 0, keep=None) -> Split:
    """TO-LEARN = variant facts with accuracy 0; NTF = invariant facts (of the task's file) with
    accuracy 1; Train-Attention pool = any other fact with accuracy < 0.5. ``keep(fact)`` filters
    the trained-on sets (TO-LEARN, pool) before the seeded subsampling."""
    keep_given = keep is not None
    keep = keep or (lambda f: True)
    inv = lama.facts["invariant_descriptive" if task == "descriptive" else "invariant_schematic"]
    to_learn = [f for f in lama.facts["variant"] if scores.get(f.uuid) == 0.0 and keep(f)]
    ntf = [f for f in inv if scores.get(f.uuid) == 1.0]
    taken = {f.uuid for f in to_learn} | {f.uuid for f in ntf}
    pool = [f for f in lama.all_facts()
            if f.uuid not in taken and f.uuid in scores and scores[f.uuid] < 0.5 and keep(f)]

    def sample(xs: list[Fact], n: Optional[int], salt: int, key: str, what: str, length_filtered: bool) -> list[Fact]:
        xs = sorted(xs, key=lambda f: f.uuid)
        # never shrink silently: a table would claim a size it did not run (an empty set is left to the
        # caller, whose message says which split setting to change)
        if n is not None and n > len(xs) > 0:
            note = "; after the data.max_doc_tokens filter" if length_filtered and keep_given else ""
            raise InputError(key, f"requested {n} facts, but only {len(xs)} {what} exist for this model and "
                                  f"data ({origin}{note})")
        if n is None or n >= len(xs):
            return xs
        return sorted(random.Random(seeds.split_sample(seed, salt)).sample(xs, n), key=lambda f: f.uuid)

    return Split(sample(to_learn, to_learn_size, 1, "data.to_learn_size", "TO-LEARN facts", True),
                 sample(ntf, ntf_size, 2, "data.ntf_size", "NOT-TO-FORGET facts", False),
                 sample(pool, ta_pool_size, 3, "meta.pool_size", "Train-Attention pool facts", True),
                 dict(scores), origin)


def release_scores(lama: LamaCKL, task: str, model: str) -> dict[str, float]:
    """The accuracies the release recorded for its own models (field `scores`)."""
    out = {}
    for f in lama.all_facts():
        try:
            out[f.uuid] = float(f.release_scores[task][model])
        except (KeyError, TypeError):
            raise InputError(f"{lama.dir / (f.source + '.jsonl')}:{f.line}",
                             f"field 'scores.{task}.{model}' missing (data.release_model)") from None
    return out


def load_split_file(lama: LamaCKL, path: str | Path) -> Split:
    p = Path(path)
    if not p.is_file():
        raise InputError(str(p), "split file not found (data.split_file)")
    try:
        obj = json.loads(read_text(p))
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}", f"malformed JSON: {e.msg}") from None
    by_uuid = {f.uuid: f for f in lama.all_facts()}
    sets = {}
    for key in ("to_learn", "ntf", "ta_pool"):
        if not isinstance(obj.get(key), list):
            raise InputError(str(p), f"field {key!r} missing or not a list")
        missing = [u for u in obj[key] if u not in by_uuid]
        if missing:
            raise InputError(str(p), f"field {key!r}: uuid {missing[0]!r} is not in {lama.dir}")
        sets[key] = [by_uuid[u] for u in obj[key]]
    return Split(sets["to_learn"], sets["ntf"], sets["ta_pool"], dict(obj.get("scores", {})),
                 str(obj.get("origin", f"file:{p}")))
