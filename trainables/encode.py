"""Tokenization of LAMA-CKL documents (with the object's token mask) and probes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .data import Fact
from .metrics import EncodedProbe, encode_probe, object_token_positions


@dataclass(frozen=True)
class EncodedDoc:
    input_ids: list[int]
    object_mask: list[int]  # 1 on the tokens of the object's last occurrence inside the kept text


def encode_document(tokenizer, text: str, obj: str, max_length: int) -> EncodedDoc:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, truncation=True,
                    max_length=max_length)
    offsets = enc["offset_mapping"]
    kept_end = max((e for s, e in offsets), default=0)
    start = text.rfind(obj, 0, kept_end)
    mask = [0] * len(offsets)
    if obj and start >= 0 and start + len(obj) <= kept_end:
        for i in object_token_positions(offsets, start, start + len(obj)):
            mask[i] = 1
    return EncodedDoc(list(enc["input_ids"]), mask)


def encode_documents(tokenizer, facts: Sequence[Fact], max_length: int) -> list[EncodedDoc]:
    return [encode_document(tokenizer, f.evidence, f.object, max_length) for f in facts]


def encode_probes(tokenizer, facts: Sequence[Fact], task: str) -> list[EncodedProbe]:
    return [encode_probe(tokenizer, f.probe(task), f.object, where=f"{f.source}.jsonl:{f.line} (task_{task})")
            for f in facts]


def collate(docs: Sequence[EncodedDoc], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(d.input_ids) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    obj = torch.zeros((len(docs), width), dtype=torch.long)
    for b, d in enumerate(docs):
        n = len(d.input_ids)
        ids[b, :n] = torch.tensor(d.input_ids)
        mask[b, :n] = 1
        obj[b, :n] = torch.tensor(d.object_mask)
    return {"input_ids": ids, "attention_mask": mask, "object_mask": obj}


def doc_token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])
