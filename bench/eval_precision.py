"""How evaluation's precision moves LAMA-CKL's probe accuracy: the same θ (the untrained model, epoch 0) judged three
ways, fact by fact: (a) fp32 (no autocast), (b) the whole forward under bf16 autocast (what `train.precision: bf16`
evaluated before issue #29), (c) the body under bf16 autocast and only the output head in fp32 (logits upcast: the
alternative to (a)). A fact's accuracy differs from (a) when bf16 rounding creates or breaks a tie, or reorders the
top two logits; ties count as wrong (trainables/metrics.py).

    python bench/eval_precision.py --model smollm2-135m --facts 128 --out bench/results/eval_precision.json

CPU by default (bf16 autocast exists on the CPU too: the same rounding of the matmul outputs, other kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class HeadInFp32(torch.nn.Module):
    """θ's forward with the body under the caller's autocast and the output head outside it (fp32 logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with torch.autocast(device_type=input_ids.device.type, enabled=False):
            logits = base.lm_head(hidden.float())
        return type("Out", (), {"logits": logits})()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=128, help="TO-LEARN and NOT-TO-FORGET facts each")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", default="tailored", help="tailored: NOT-TO-FORGET = facts the model knows in fp32")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_precision.json")
    args = ap.parse_args()
    from trainables.config import load_config
    from trainables.continual import prepare_run
    from trainables.metrics import probe_scores

    cfg = load_config(None, [f"model.name={args.model}", f"data.split={args.split}", f"data.to_learn_size={args.facts}",
                             f"data.ntf_size={args.facts}", f"device={args.device}", "params.kind=lora",
                             "params.r=4", "model.attention=eager"])
    s = prepare_run(cfg)
    probes = s.to_learn_probes + s.ntf_probes
    ways = {"fp32": (s.model, False), "bf16_autocast": (s.model, True), "bf16_body_fp32_head": (HeadInFp32(s.model),
                                                                                                True)}
    scores, seconds = {}, {}
    for name, (model, bf16) in ways.items():
        t0 = time.perf_counter()
        with torch.autocast(device_type=s.device.type, dtype=torch.bfloat16, enabled=bf16):
            scores[name] = probe_scores(model, probes, s.pad_id, 32, s.device, fp32_forward=False)
        seconds[name] = time.perf_counter() - t0
    ref = scores["fp32"]
    n_tl = len(s.to_learn_probes)
    out = {"model": args.model, "facts": {"to_learn": n_tl, "ntf": len(s.ntf_probes)}, "device": args.device,
           "torch": torch.__version__, "ways": {}}
    for name, sc in scores.items():
        acc = [a for a, _ in sc]
        out["ways"][name] = {
            "to_learn_acc": sum(acc[:n_tl]) / n_tl, "ntf_acc": sum(acc[n_tl:]) / max(1, len(acc) - n_tl),
            "facts_differing_from_fp32": sum(a != b for (a, _), (b, _) in zip(sc, ref)),
            "seconds": seconds[name]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
