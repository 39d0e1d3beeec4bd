"""Synthetic TemporalWiki diff sets of realistic size, for tests and benches (not TemporalWiki data).

The published TWiki-Diffsets (`wikipedia_0910_gpt2.csv`, ...) are CSV files with one column, `text`: each row is
"<title>. <the article's new or changed sentences>", an article longer than 512 GPT-2 tokens cut into 512-token rows
(TemporalWikiDatasets: wikipedia_datasets.py). This writes the same shape, seeded: a `text` column whose rows are
"Synthetic article N. ..." followed by made-up words; ~60 % full-length rows (~540 SmolLM2 tokens, about what a
512-GPT-2-token published row gives) and ~40 % short diffs (log-normal, median ~35 words); ~400 tokens a row on
average, ~1 KB (real rows hold about twice the characters for their tokens: made-up words cut into more tokens);
plus ~3 % rows the TAALM release's filter drops (shorter than 50 characters, a bare "nan", mostly digits), as in the
real files. Formats: csv (the published one), jsonl (the TAALM release's filtered files), parquet.

    .venv/bin/python bench/temporalwiki_generate.py --docs 100000 --seed 0 --out /tmp/tw/0910.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import operator
import sys
from pathlib import Path

import numpy as np

SYLLABLES = ["ka", "lo", "mir", "ten", "vas", "dor", "el", "qui", "ran", "sol", "bex", "nu", "tor", "ila", "zen",
             "pha", "gor", "wen", "ostr", "li"]
FUNCTION = ["the", "of", "in", "and", "was", "a", "to", "by", "is", "for", "on", "with", "as", "from", "after"]
BLOCK = 10_000  # rows generated at a time (bounded memory for any size)


def vocabulary(rng: np.random.Generator, n: int = 4000) -> list[str]:
    words = set()
    while len(words) < n:
        k = int(rng.integers(1, 4))
        words.add("".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), k)))
    return sorted(words)


def rows(n_docs: int, seed: int):
    """The ``text`` of every row, in order, a block at a time."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng) + FUNCTION * 150  # function words ~36 % of the draws, as in English
    for start in range(0, n_docs, BLOCK):
        m = min(BLOCK, n_docs - start)
        full = rng.random(m) < 0.6
        lengths = np.where(full, rng.integers(190, 240, m),
                           np.clip(rng.lognormal(np.log(35), 0.8, m), 8, 190)).astype(int)
        words = rng.integers(0, len(vocab), int(lengths.sum()))
        odd = rng.random(m)
        out, at = [], 0
        for j in range(m):
            i, n = start + j, int(lengths[j])
            if odd[j] < 0.01:
                out.append("nan")
            elif odd[j] < 0.02:
                out.append(f"Synthetic stub {i}.")
            elif odd[j] < 0.03:
                out.append(f"Synthetic table {i}: " + " ".join(str(x) for x in words[at:at + n] % 9973) + ".")
            else:
                body = operator.itemgetter(*words[at:at + n])(vocab) if n > 1 else (vocab[words[at]],)
                sentences = [" ".join(body[k:k + 17]) for k in range(0, n, 17)]
                out.append(f"Synthetic article {i}. " + ". ".join(s.capitalize() for s in sentences) + ".")
            at += n
        yield out


def generate(path: Path, n_docs: int, seed: int = 0, fmt: str = "") -> Path:
    """Write ``n_docs`` rows to ``path`` (format from ``fmt`` or the suffix), atomically."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())])) as w:
            for block in rows(n_docs, seed):
                w.write_table(pa.table({"text": block}), row_group_size=BLOCK)
    else:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if fmt == "csv":
                w = csv.writer(f)
                w.writerow(["text"])
                for block in rows(n_docs, seed):
                    w.writerows([t] for t in block)
            elif fmt == "jsonl":
                for block in rows(n_docs, seed):
                    f.writelines(json.dumps({"text": t}) + "\n" for t in block)
            else:
                raise SystemExit(f"unknown format {fmt!r}: csv, jsonl or parquet")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help=".csv (published format), .jsonl or .parquet")
    ap.add_argument("--format", default="", help="csv | jsonl | parquet (default: from --out's suffix)")
    a = ap.parse_args(argv)
    p = generate(a.out, a.docs, a.seed, a.format)
    print(f"{p}: {a.docs} rows, {p.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
