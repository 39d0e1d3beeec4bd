#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it runs): under 8 minutes on one GPU, through `taalm run` / the bench
# scripts (no Ray, no MLflow on that machine). On the lent GPU machine, after ../shared/gpu/README.md's first two
# commands:   source .gpu/3/env.sh && bash bench/gpu_check.sh          (carrying .gpu/3)
# Dry run here (the CPU, small sizes):   GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=dry bash bench/gpu_check.sh
# What comes back, in $OUT: summary.json and gpu_check.tgz (every run's metrics.json and log, the bench JSON files).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SCALE=${GPU_CHECK_SCALE:-full}
BUDGET=${GPU_CHECK_BUDGET:-470}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "$DEVICE" = cpu ] && PY=.venv/bin/python
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
timeout $(( ${BUDGET%.*} + 30 )) "$PY" bench/gpu_check.py --out "$WORK" --device "$DEVICE" --scale "$SCALE" --budget "$BUDGET"
echo "exit $?"
cp "$WORK/summary.json" "$OUT/summary.json" 2>/dev/null
find "$WORK" -name '*.safetensors' -delete   # weights do not come back (size)
tar -czf "$OUT/gpu_check.tgz" -C "$WORK" . && ls -la "$OUT"
"$PY" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for name, p in s["phases"].items():
    line = f"{name}: {p.get('status')} {p.get('wall_s', 0):.0f}s"
    if "gpu_util_mean_pct" in p:
        line += f" util {p['gpu_util_mean_pct']:.0f}%"
    if p.get("gpu_seconds_per_trial_epoch"):
        line += f" | {p['trial_epochs']} trial-epochs, {p['gpu_seconds_per_trial_epoch']:.2f} s each"
    if name == "correctness":
        line += f" | passed {p.get('passed')}, failed {p.get('failed')}, skipped {p.get('skipped')}"
    print(line)
    for row, r in (p.get("rows") or {}).items():
        print(f"  {row}: epochs {r.get('epochs_reached')}, Top {r.get('top_acc')} @ {r.get('top_epoch')}, NF {r.get('nf_acc')}, Total {r.get('total_knowledge')}")
PY
