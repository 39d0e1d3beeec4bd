"""Reading TemporalWiki files through `datasets`' streaming readers (offline, its cache under TAALM_CACHE): diff sets
and probes as CSV (TWiki-Diffsets' published format), JSON lines (the TAALM release's) or Parquet, a batch of rows at a
time; a file that cannot be read is an InputError naming the file and its first bad row (found by reading it again
row by row, only after a reader failed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .errors import InputError

FORMATS = {".csv": "csv", ".jsonl": "json", ".parquet": "parquet"}
ROWS_PER_READ = 1000  # rows per streamed batch: parse, filter, tokenize, write


def cache_root() -> Path:
    return Path(os.environ.get("TAALM_CACHE", Path.home() / ".cache" / "taalm")) / "temporalwiki"


def _datasets():
    """`datasets`, offline, its cache under TAALM_CACHE, quiet (imported here only: it costs a trial ~1 s). Only
    `datasets`' own settings change (HF_HUB_OFFLINE is the user's: transformers reads it, model.allow_download)."""
    hf = cache_root() / "hf_datasets"
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(hf))
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_CACHE = hf
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def file_format(path: Path, where: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(where, f"{path}: unknown file type {path.suffix!r} (TemporalWiki's .csv, .jsonl or .parquet)")
    if not path.is_file():
        raise InputError(where, f"{path}: data file not found")
    if path.stat().st_size == 0:
        raise InputError(str(path), "the file is empty")
    return fmt


# ---- reading ------------------------------------------------------------------------------------------------------

def stream(path: Path, columns: Sequence[str], where: str) -> Iterator[tuple[int, dict]]:
    """(index of the batch's first row, {column: pyarrow string array}) per ``ROWS_PER_READ`` rows of ``path``, through
    `datasets`' streaming readers. Any problem is an InputError naming the file and the row (or line)."""
    import pyarrow as pa

    fmt = file_format(path, where)
    ds_mod = _datasets()
    opts = {"csv": {"usecols": list(columns), "na_filter": False, "chunksize": 2 * ROWS_PER_READ},
            "json": {"chunksize": 1 << 20}, "parquet": {"columns": list(columns)}}.get(fmt, {})
    row = 0
    try:
        ds = ds_mod.load_dataset(fmt, data_files=str(path), split="train", streaming=True,
                                 cache_dir=str(cache_root() / "hf_datasets"), **opts)
        for batch in ds.with_format("arrow").iter(batch_size=ROWS_PER_READ):
            cols = {}
            for c in columns:
                col = batch.column(c) if c in batch.column_names else None
                if col is not None and fmt == "csv" and not pa.types.is_string(col.type):
                    col = col.cast(pa.string())  # a CSV column of numbers is text
                if col is None or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) \
                        or col.null_count:
                    raise _Invalid()
                col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                try:
                    col.validate(full=True)  # UTF-8 (a JSON reader may pass bytes that are not)
                except pa.ArrowInvalid:
                    raise _Invalid() from None
                cols[c] = col
            yield row, cols
            row += batch.num_rows
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 (any reader's error, or _Invalid: find the row ourselves)
        raise diagnose(path, fmt, columns, row, e) from None
    if row == 0:
        raise InputError(str(path), "the file holds no rows")


class _Invalid(Exception):
    """A batch whose column is missing, null or not text: the row-by-row scan says where and why."""


def read_rows(path: Path, columns: Sequence[str], where: str) -> list[dict]:
    """Every row of a small file (probes) as dicts of ``columns``."""
    rows = []
    for _, cols in stream(path, columns, where):
        lists = {c: a.to_pylist() for c, a in cols.items()}
        rows += [dict(zip(lists, vals)) for vals in zip(*lists.values())]
    return rows


def row_location(path: Path, row: int) -> str:
    """``file:line`` of data row ``row`` (from 0) of a JSON-lines or CSV file (blank lines skipped), ``file (row N)``
    of a Parquet file."""
    if path.suffix.lower() == ".parquet":
        return f"{path} (row {row + 1})"
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            for i, _ in enumerate(reader):
                if i == row:
                    return f"{path}:{reader.line_num}"
        return f"{path} (row {row + 1})"
    with open(path, "rb") as f:
        seen = -1
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return f"{path}:{lineno}"
    return f"{path} (row {row + 1})"


def diagnose(path: Path, fmt: str, columns: Sequence[str], row: int, error: Exception) -> "InputError":
    """The first bad row of ``path``, found by reading it again row by row (only after a reader failed)."""
    try:
        found = {"json": _scan_jsonl, "csv": _scan_csv, "parquet": _scan_parquet}[fmt](path, columns)
    except OSError as e:
        found = (str(path), f"cannot read: {e}")
    if found:
        return InputError(*found)
    return InputError(f"{path} (row {row + 1} or after)", f"cannot read: {type(error).__name__}: {error}")


def _scan_jsonl(path: Path, columns: Sequence[str]) -> Optional[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                return where, f"not UTF-8 text: byte {e.start} of the line is 0x{raw[e.start]:02x}"
            except json.JSONDecodeError as e:
                return where, f"malformed JSON: {e.msg} (column {e.colno})"
            if not isinstance(obj, dict):
                return where, "each line must be a JSON object"
            for c in columns:
                if c not in obj or obj[c] is None:
                    return where, f"field {c!r}: missing field (fields: {', '.join(obj) or 'none'})"
                if not isinstance(obj[c], str):
                    return where, f"field {c!r}: must be a string, not {type(obj[c]).__name__}"
    return None


def _scan_csv(path: Path, columns: Sequence[str]) -> Optional[tuple[str, str]]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return str(path), "the file holds no header"
            missing = [c for c in columns if c not in header]
            if missing:
                return f"{path}:1", f"no column {missing[0]!r} in the header (columns: {', '.join(header)})"
            for row in reader:
                if len(row) < len(header):
                    return f"{path}:{reader.line_num}", f"{len(row)} fields, the header has {len(header)}"
        except UnicodeDecodeError as e:
            return f"{path}:{reader.line_num + 1}", f"not UTF-8 text ({e.reason}: 0x{e.object[e.start]:02x})"
        except csv.Error as e:
            return f"{path}:{reader.line_num}", f"malformed CSV: {e}"
    return None


def _scan_parquet(path: Path, columns: Sequence[str]) -> Optional[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        return str(path), f"not a readable Parquet file (truncated?): {e}"
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        return str(path), f"no column {missing[0]!r} (columns: {', '.join(names)})"
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            t = pf.read_row_group(g, columns=list(columns))
        except (pa.ArrowException, OSError) as e:
            return f"{path} (rows {start + 1}-{start + n})", f"row group {g} unreadable: {e}"
        for c in columns:
            col = t.column(c)
            if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                return str(path), f"column {c!r} holds {col.type}, not text"
            if col.null_count:
                first = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
                return f"{path} (row {start + first + 1})", f"column {c!r}: missing value"
        start += n
    return None
