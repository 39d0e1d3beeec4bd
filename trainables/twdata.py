"""TemporalWiki data at its real size: diff sets (and probes) read through `datasets`' streaming readers (CSV as
TemporalWiki publishes them, JSON lines as the TAALM release filters them, Parquet), never whole in Python; filtered,
sampled and tokenized once per (file content, tokenizer, max length, long-document rule, filter, sample) into an Arrow
file under ``TAALM_CACHE/temporalwiki/diff/<key>/`` that trials memory-map; read back in batches, the mapping renewed
every ``REMAP_EVERY`` batches so the pages a trial holds are bounded by the batches, not the file.

A cache entry appears whole or not at all (built in a temporary sibling directory, renamed when complete; one builder
at a time per entry, under a file lock; what a builder killed mid-build left is removed by the next builder). `datasets` never reaches the network (offline mode, its own cache under
TAALM_CACHE)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

REMAP_EVERY = 16  # batches read from a cache file before it is mapped anew (releases the pages read so far)
ENTRY_VERSION = 1  # part of every cache key: how an entry is built
TAALM_MIN_CHARS, TAALM_MIN_LETTERS = 50, 0.3  # the release's diff-set filter (preprocess_temporalwiki_dataset.py)




def fingerprint(path: Path) -> str:
    """The content hash of ``path`` (xxh3-128), remembered by (path, size, mtime) so it is computed once per file."""
    import xxhash

    st = path.stat()
    memo = cache_root() / "fingerprints" / (hashlib.sha1(str(path.resolve()).encode()).hexdigest() + ".json")
    try:
        m = json.loads(memo.read_text())
        if (m["size"], m["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            return m["xxh3_128"]
    except (OSError, ValueError, KeyError):
        pass
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    write_json_atomic(memo, {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                             "xxh3_128": h.hexdigest()})
    return h.hexdigest()


_TOKENIZER_FP: dict[int, str] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    if id(tokenizer) not in _TOKENIZER_FP:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                            tokenizer.pad_token_id])
        _TOKENIZER_FP[id(tokenizer)] = hashlib.sha256((body + extra).encode()).hexdigest()[:16]
    return _TOKENIZER_FP[id(tokenizer)]


def keep_mask(texts, rule: str):
    """Which rows train: non-blank ones (``none``), or what the TAALM release kept of TemporalWiki's diff sets
    (``taalm``: at least 50 characters, at least 30 % of them ASCII letters, not a short "nan")."""
    import pyarrow.compute as pc

    stripped = pc.utf8_trim_whitespace(texts)
    n_stripped = pc.utf8_length(stripped)
    keep = pc.greater(n_stripped, 0)
    if rule == "taalm":
        n = pc.utf8_length(texts)
        ratio = pc.divide(pc.cast(_ascii_letters(texts), "float64"), pc.cast(pc.max_element_wise(n, 1), "float64"))
        short_nan = pc.and_(pc.match_substring(stripped, "nan"), pc.less(n_stripped, TAALM_MIN_CHARS))
        keep = pc.and_(pc.and_(keep, pc.greater_equal(n, TAALM_MIN_CHARS)),
                       pc.and_(pc.greater_equal(ratio, TAALM_MIN_LETTERS), pc.invert(short_nan)))
    return keep


def _ascii_letters(texts):
    """[a-zA-Z] per string, counted on the UTF-8 bytes (bytes of a multi-byte character are >= 0x80)."""
    import numpy as np
    import pyarrow as pa

    texts = texts.cast(pa.large_string()) if not pa.types.is_large_string(texts.type) else texts
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset:texts.offset + len(texts) + 1]
    buf = texts.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    low = data | 0x20
    counts = np.concatenate([[0], np.cumsum((low >= ord("a")) & (low <= ord("z")), dtype=np.int64)])
    return pa.array(counts[offsets[1:]] - counts[offsets[:-1]])


def prepare_diff(path: Path, tokenizer, *, text_column: str, max_length: int, long_docs: str, filter: str,
                 sample: Optional[tuple[int, int]], where: str) -> "DiffSet":
    """The tokenized diff set of ``path`` (``sample``: (seed, k), a seeded subsample of k of the rows the filter keeps),
    from the cache or built into it."""
    from filelock import FileLock

    file_format(path, where)
    key = json.dumps({"v": ENTRY_VERSION, "file": fingerprint(path), "tokenizer": tokenizer_fingerprint(tokenizer),
                      "column": text_column, "max_length": max_length, "long_docs": long_docs, "filter": filter,
                      "sample": list(sample) if sample else None}, sort_keys=True)
    entry = cache_root() / "diff" / hashlib.sha256(key.encode()).hexdigest()[:24]
    if not (entry / "manifest.json").is_file():
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):  # a second trial on the same period waits, then reads it
            if not (entry / "manifest.json").is_file():
                for stale in entry.parent.glob(entry.name + ".tmp*"):  # a builder killed mid-build (we hold the lock)
                    shutil.rmtree(stale, ignore_errors=True)
                with atomic_directory(entry) as tmp:
                    _build(path, tokenizer, tmp, json.loads(key), text_column, max_length, long_docs, filter,
                           sample, where)
                return DiffSet(entry, built=True)
    return DiffSet(entry, built=False)


def _build(path, tokenizer, out: Path, key: dict, column, max_length, long_docs, rule, sample, where) -> None:
    import numpy as np
    import pyarrow.compute as pc

    ds_mod = _datasets()
    t0 = time.perf_counter()
    n_rows = n_kept = 0
    chosen = None  # source row -> position in the sample
    if sample is not None:  # first pass: the rows the filter keeps, then the seeded sample of them
        kept = []
        for start, cols in stream(path, [column], where):
            kept.append(start + np.flatnonzero(keep_mask(cols[column], rule).to_numpy(zero_copy_only=False)))
            n_rows = start + len(cols[column])
        kept_rows = np.concatenate(kept)
        n_kept = len(kept_rows)
        seed, k = sample
        picks = random.Random(seed).sample(range(n_kept), k) if k < n_kept else range(n_kept)
        chosen = {int(kept_rows[p]): i for i, p in enumerate(picks)}
        del kept, kept_rows
    big = len(tokenizer) > 65536
    features = ds_mod.Features({"input_ids": ds_mod.List(ds_mod.Value("int32" if big else "uint16")),
                                "row": ds_mod.Value("int64"), "doc": ds_mod.Value("int64")})
    writer = ds_mod.arrow_writer.ArrowWriter(features=features, path=str(out / "tokens.arrow"))
    stats = {"n_docs": 0, "n_sequences": 0, "n_truncated": 0, "n_chunked": 0, "tokens": 0, "tokens_cut": 0}
    try:
        for start, cols in stream(path, [column], where):
            texts = cols[column]
            mask = keep_mask(texts, rule).to_numpy(zero_copy_only=False)
            rows = start + np.flatnonzero(mask)
            if sample is None:
                n_rows, n_kept = start + len(texts), n_kept + len(rows)
            else:
                rows = np.array([r for r in rows.tolist() if r in chosen], dtype=np.int64)
            if not len(rows):
                continue
            picked = texts.take(rows - start)
            if rule == "taalm":  # the release trains on the stripped line
                picked = pc.utf8_trim_whitespace(picked)
            ids, src = _tokenize(tokenizer, picked.to_pylist(), max_length, long_docs, stats)
            docs = [chosen[int(rows[j])] if chosen is not None else stats["n_docs"] - len(rows) + j for j in src]
            writer.write_batch({"input_ids": ids, "row": [int(rows[j]) for j in src], "doc": docs})
        writer.finalize()
    finally:
        writer.close()
    if not stats["n_sequences"]:
        raise InputError(where, f"{path}: no document left after the {rule!r} filter ({n_rows} rows; "
                                "temporalwiki.filter: none keeps every non-blank row)")
    seconds = time.perf_counter() - t0
    write_json_atomic(out / "manifest.json", {
        "key": key, "source": str(path), "n_rows": n_rows, "n_kept": n_kept, "n_filtered": n_rows - n_kept, **stats,
        "build_seconds": seconds, "docs_per_s": stats["n_docs"] / seconds if seconds else None})


def _tokenize(tokenizer, texts: list[str], max_length: int, long_docs: str, stats: dict):
    """Token ids of whole documents (so the cut is counted), then truncated to ``max_length`` (the TAALM release:
    ``truncation=True, max_length=token_max_length``) or chunked into pieces of at most ``max_length`` (a last piece
    of one token predicts nothing: dropped, counted as cut). Returns (sequences, index of each one's document)."""
    out, src = [], []
    for j, ids in enumerate(tokenizer(texts, add_special_tokens=True)["input_ids"]):
        stats["n_docs"] += 1
        if len(ids) > max_length:
            if long_docs == "truncate":
                stats["n_truncated"] += 1
                stats["tokens_cut"] += len(ids) - max_length
                pieces = [ids[:max_length]]
            else:
                stats["n_chunked"] += 1
                pieces = [ids[k:k + max_length] for k in range(0, len(ids), max_length)]
                if len(pieces[-1]) < 2:
                    stats["tokens_cut"] += len(pieces.pop())
        else:
            pieces = [ids]
        for p in pieces:
            out.append(p)
            src.append(j)
            stats["tokens"] += len(p)
        stats["n_sequences"] += len(pieces)
    return out, src


class DiffSet(Sequence):
    """A period's training sequences (EncodedDoc, object mask all 0), memory-mapped from its cache entry in the order
    of the sample (or of the file); ``take(positions)`` reads a batch."""

    def __init__(self, entry: Path, built: bool):
        import numpy as np

        self.entry, self.built = entry, built
        self.manifest = json.loads((entry / "manifest.json").read_text())
        self._open()
        doc = self._table.column("doc").to_numpy()
        self._order = None if bool((np.diff(doc) >= 0).all()) else np.argsort(doc, kind="stable")
        self._reads = 0

    def _open(self) -> None:
        """Map the entry (an Arrow stream `datasets` wrote; read with pyarrow, whose table holds no reference cycle, so
        the previous mapping and the pages read through it are released at once)."""
        import numpy as np
        import pyarrow as pa

        self._table = None
        with pa.memory_map(str(self.entry / "tokens.arrow")) as source:
            self._table = pa.ipc.open_stream(source).read_all()
        self._chunks = self._table.column("input_ids").chunks
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self._reads = 0

    def __len__(self) -> int:
        return self.manifest["n_sequences"]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return self.take([i])[0]

    def take(self, positions: Sequence[int]) -> list:
        import numpy as np

        from .encode import EncodedDoc

        if self._reads >= REMAP_EVERY:  # a new mapping: the pages read through the old one are no longer ours
            self._open()
        self._reads += 1
        rows = [int(p) if self._order is None else int(self._order[p]) for p in positions]
        at = np.searchsorted(self._starts, rows, side="right") - 1  # row -> (record batch, row in it): no concatenation
        ids = [self._chunks[c][r - self._starts[c]].as_py() for r, c in zip(rows, at.tolist())]
        return [EncodedDoc(list(x), [0] * len(x)) for x in ids]

    def stats(self) -> dict:
        m = self.manifest
        return {k: m[k] for k in ("n_rows", "n_kept", "n_filtered", "n_docs", "n_sequences", "n_truncated",
                                  "n_chunked", "tokens", "tokens_cut", "docs_per_s")} | {
            "cache": "built" if self.built else "reused", "cache_entry": self.entry.name}


from .checkpoint import atomic_directory, write_json_atomic  # noqa: E402 (torch: after the light definitions)
from .errors import InputError  # noqa: E402
from .twread import _datasets, cache_root, file_format, stream  # noqa: E402
