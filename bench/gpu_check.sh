#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what each phase runs), one or more phases per command on the lent GPU
# machine, through the `taalm` CLI and bench/ scripts (no Ray, no MLflow there). ../shared/gpu/README.md's commands:
#   1.  bash .gpu/1/setup.sh && bash bench/gpu_check.sh A             (carrying .gpu/1; phase A needs no SmolLM2:
#                                                                      /tmp/site and /tmp/taalm-cache are used below)
#   2.  bash .gpu/2/stash.sh                                          (carrying .gpu/2)
#   3.  source .gpu/3/env.sh && bash bench/gpu_check.sh B C           (carrying .gpu/3)
# Budgets on one H200: A 90 s, B 180 s, C 150 s (each phase stops by its own deadline; docs/RESULTS.md, "GPU").
# Dry run here (the CPU, small sizes):  GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=dry bash bench/gpu_check.sh A B C
# GPU_CHECK_PLANT=1 adds a case that must fail to every phase (the exit status must then be 1).
# What comes back, in $OUT: summary.json and gpu_check.tgz (every case's log and results, the runs' epochs.jsonl and
# metrics.json, the bench JSON files). Exit status: 0 when every case of every phase passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
PHASES=${*:-A B C}
OUT=${OUT:-/tmp/gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SCALE=${GPU_CHECK_SCALE:-full}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "$DEVICE" = cpu ] && PY=.venv/bin/python
# on the GPU machine: the wheels and the cache ../shared/gpu/ set up (command 1 has no .gpu/3/env.sh to source)
if [ -d /tmp/site/transformers ]; then
  export PYTHONPATH=${PYTHONPATH:-$PWD:/tmp/site} TAALM_CACHE=${TAALM_CACHE:-/tmp/taalm-cache} PYTHONUNBUFFERED=1
fi
total=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from gpu_check import BUDGETS
print(sum(BUDGETS['$SCALE'][p] for p in '$PHASES'.split()))") || exit 2
echo "gpu_check: phases $PHASES on $DEVICE ($SCALE), budget $total s, until $(date -d "+$(( total + 30 )) sec" +%H:%M:%S)"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
timeout -k 10 $(( total + 30 )) "$PY" bench/gpu_check.py $PHASES --out "$WORK" --device "$DEVICE" --scale "$SCALE" \
  ${GPU_CHECK_PLANT:+--plant}
code=$?
cp "$WORK/summary.json" "$OUT/summary.json" 2>/dev/null
find "$WORK" \( -name '*.safetensors' -o -name '*.bin' \) -delete   # weights do not come back (size)
tar -czf "$OUT/gpu_check.tgz" -C "$WORK" . && ls -la "$OUT"
"$PY" - "$OUT/summary.json" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no summary.json")
for name, p in s["phases"].items():
    line = f"{name}: {p.get('status')} in {p.get('wall_s', 0):.0f} s of {p.get('budget_s')}"
    if "gpu_util_mean_pct" in p:
        line += f", GPU utilisation {p['gpu_util_mean_pct']:.0f}%"
    cases = p.get("cases", {})
    line += f" | {sum(c.get('status') == 'ok' for c in cases.values())} ok, failed {p.get('failed')}"
    print(line)
    if name == "A":
        print(f"  epoch 0 fp32 = bf16: {p.get('epoch0_equal')} of {p.get('epoch0_compared')} cases "
              f"(object logits bitwise: {p.get('epoch0_logits_bitwise_equal')})")
    if name == "B":
        print(f"  first epoch {p.get('first_epoch_s')} s, planned {p.get('planned_epochs')} epochs; "
              f"{p.get('gpu_seconds_per_trial_epoch')} GPU s per trial-epoch ({p.get('trial_epochs_in_window')} "
              f"trial-epochs in {p.get('window_s')} s, {p.get('rows_at_once')} rows at once), "
              f"utilisation {p.get('window_gpu_util_mean_pct')}%")
        for row, r in (p.get("rows") or {}).items():
            print(f"  {row}: {r.get('status')}, {r.get('epochs')} epochs, Top {r.get('top_acc')} @ {r.get('top_epoch')}, "
                  f"NF {r.get('nf_acc')}, Total {r.get('total_knowledge')}, epoch 0 {r.get('epoch0')}")
    if name == "C":
        for case, f in (p.get("figures") or {}).items():
            print(f"  {case}: {json.dumps(f)}")
PY
echo "exit $code"
exit $code
