#!/usr/bin/env bash
# Device check for one H100/H200: GPU tests, the full optimizer benchmark, its report.
#
#   OUT=/some/dir bash bench/device_check.sh        # on the device machine $OUT is set already
#
# Installs nothing (the GPU image has torch, triton, pytest, pytest-benchmark, matplotlib).
# Budget: GPU tests <= 120 s, benchmark <= 280 s (it stops starting new cases after 250 s and
# keeps what it measured), report <= 45 s: the whole script stays under ~8 minutes.
# (KOALA_BENCH=smoke KOALA_BENCH_DEVICE=cpu try the script's plumbing on a CPU.)
# Everything is logged to $OUT/device_check.log; the short benchmark table is printed last.
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

log() { echo "== [$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }

log "device check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } 2>&1 | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print("torch", torch.__version__, "| triton", tv, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
EOF

# 1. GPU tests (written by others). Absent or failing tests must not stop the benchmark.
log "GPU tests: python -m pytest -m gpu tests -q"
timeout -s INT -k 15 120 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee -a "$LOG"
gpu_tests=$?
case $gpu_tests in
    0) gpu_tests_msg="passed" ;;
    4|5) gpu_tests_msg="none collected (rc $gpu_tests)" ;;
    124|137) gpu_tests_msg="TIMED OUT (rc $gpu_tests)" ;;
    *) gpu_tests_msg="FAILED (rc $gpu_tests)" ;;
esac
log "GPU tests: $gpu_tests_msg"

# 2. Full benchmark (real model sizes, fp32 then bf16). KOALA_BENCH_BUDGET_S makes it skip the
#    cases it has no time for; the outer timeout is the hard stop (SIGINT still writes the JSON).
log "benchmark: pytest bench --koala-bench=full --benchmark-json $OUT/bench.json"
KOALA_BENCH_BUDGET_S="${KOALA_BENCH_BUDGET_S:-250}" \
timeout -s INT -k 20 280 "$PY" -m pytest bench/test_optimizer_step.py \
    --koala-bench="${KOALA_BENCH:-full}" --koala-device="${KOALA_BENCH_DEVICE:-cuda}" \
    --benchmark-json "$OUT/bench.json" -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name 2>&1 | tee -a "$LOG"
bench_rc=$?
log "benchmark: rc $bench_rc"

# 3. Report: markdown table + plot under $OUT (one folder down, so the files come back).
if [ -s "$OUT/bench.json" ]; then
    log "report: python -m bench.report $OUT/bench.json --out $OUT/report"
    timeout 45 "$PY" -m bench.report "$OUT/bench.json" --out "$OUT/report" >"$OUT/short_table.txt" 2>>"$LOG"
    report_rc=$?
    cat "$OUT/short_table.txt" >>"$LOG"
else
    report_rc=1
    echo "no $OUT/bench.json: nothing to report" | tee -a "$LOG" >"$OUT/short_table.txt"
fi
log "done in $(($(date +%s) - T0)) s: GPU tests $gpu_tests_msg; benchmark rc $bench_rc; report rc $report_rc"
echo
cat "$OUT/short_table.txt"
[ "$bench_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
