#!/usr/bin/env bash
# Device check for one H100/H200, in five parts, each under its own timeout and each writing
# its results under $OUT as soon as it ends (a part that times out, or a kill of the whole
# script, leaves what the earlier parts wrote):
#
#   part         command                                                   timeout  writes
#   1 gpu-tests  pytest tests/test_triton_gpu.py                            100 s  gpu_tests.xml
#   2 profile    python -m bench.profile_kernels (per-kernel µs and GB/s)    75 s  profile/kernels.{json,md}
#   3 conformance pytest -m conformance tests/conformance -k triton          80 s  conformance.xml
#   4 benchmark  pytest bench/test_optimizer_step.py --koala-bench=full     140 s  bench.json
#   5 report     python -m bench.report                                     25 s  report/report.{md,png}
#
#   OUT=/some/dir bash bench/device_check.sh
#
# Why these timeouts: with a cold Triton cache the GPU tests come first and compile the kernel
# variants they reach (fp32/bf16/fp16 × KoalaV/KoalaM/fold; a configuration took 2.5 s to
# compile on a 2-core CPU with an empty cache), so they get the most time; the profile then
# finds most of its kernels in Triton's on-disk cache (18 cases of well under 0.1 s of device
# work each; no new case after 60 s); the conformance suite adds the float64 variants; the
# benchmark starts no new case after 110 s (KOALA_BENCH_BUDGET_S; GPT-2 small and ResNet-18
# fp32 come first) and keeps what it measured. Timeouts 420 s, + 5 s grace per part, + 15 s
# for the environment lines, + 2 s at most per summary line: 470 s, under 8 minutes even if
# every part runs into its timeout.
#
# Each part gets SIGINT at its timeout (pytest then still writes its XML/JSON) and SIGKILL 5 s
# later. Per-part overrides (seconds): KOALA_CHECK_TIMEOUT_GPU_TESTS, _PROFILE, _CONFORMANCE,
# _BENCHMARK, _REPORT. Installs nothing, changes no GPU setting. Everything is logged to
# $OUT/device_check.log, each part between its "start" and "end" lines; a summary (per part:
# passed / FAILED / TIMED OUT, rc) is logged and printed last. $OUT holds eight files: the log,
# the two JUnit XML files, the profile's JSON and markdown, bench.json, report.md, plot.png.
#
# CPU plumbing run (no GPU): KOALA_BENCH=smoke KOALA_BENCH_DEVICE=cpu bash bench/device_check.sh
# (GPU tests skip; the profile runs tiny sets in Triton's CPU interpreter and says its times
# are host times; the benchmark runs its smoke sizes on the CPU; KOALA_BENCH_SETS and the other
# KOALA_BENCH_* variables narrow it further). Exit status 0 when every part passed, else 1.
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: >"$LOG"
# This run's result files only: nothing a part leaves unwritten may come from an earlier run.
rm -f "$OUT/gpu_tests.xml" "$OUT/conformance.xml" "$OUT/bench.json" \
    "$OUT/profile/kernels.json" "$OUT/profile/kernels.md" "$OUT/report/report.md" "$OUT/report/plot.png"
PY="${PYTHON:-python3}"
DEVICE="${KOALA_BENCH_DEVICE:-cuda}"
GRACE=5
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY=()
FAILURES=0

log() { echo "== [$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }

# run_part NAME TIMEOUT_S COMMAND... : one part under `timeout`, logged, its status recorded.
PART=0
run_part() {
    local name=$1 limit=$2 rc status
    shift 2
    PART=$((PART + 1))
    log "part $PART/5 $name: start (timeout ${limit} s): $*"
    timeout -s INT -k "$GRACE" "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    case $rc in
        0) status="passed" ;;
        124|137) status="TIMED OUT" ;;
        *) status="FAILED" ;;
    esac
    [ "$rc" -eq 0 ] || FAILURES=$((FAILURES + 1))
    LAST_RC=$rc
    LAST_STATUS=$status
    log "part $PART/5 $name: end: $status (rc $rc)"
}

summarise() {  # NAME FILE: the summary line of the part that just ran, with what FILE holds
    local detail
    detail=$(timeout 2 "$PY" -m bench.check_summary "$2" 2>&1 | tail -n 1)
    SUMMARY+=("$(printf '%-12s %-10s rc %-4s %s' "$1" "$LAST_STATUS" "$LAST_RC" "$detail")")
}

T_GPU=${KOALA_CHECK_TIMEOUT_GPU_TESTS:-100}
T_PROFILE=${KOALA_CHECK_TIMEOUT_PROFILE:-75}
T_CONF=${KOALA_CHECK_TIMEOUT_CONFORMANCE:-80}
T_BENCH=${KOALA_CHECK_TIMEOUT_BENCHMARK:-140}
T_REPORT=${KOALA_CHECK_TIMEOUT_REPORT:-25}
budget() { local b=$(($1 - $2)); [ "$b" -ge 1 ] && echo "$b" || echo 1; }

log "device check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), device $DEVICE"
log "plan: gpu-tests ${T_GPU} s, profile ${T_PROFILE} s, conformance ${T_CONF} s, benchmark ${T_BENCH} s, report ${T_REPORT} s"
{ timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } 2>&1 | tee -a "$LOG"
timeout 10 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
cache = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
entries = len(os.listdir(cache)) if os.path.isdir(cache) else 0
print("torch", torch.__version__, "| triton", tv, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE",
      f"| Triton cache {cache}: {entries} entries")
EOF

# 1. The Triton path's GPU tests (on a CPU they skip with a reason).
run_part gpu-tests "$T_GPU" "$PY" -m pytest tests/test_triton_gpu.py -q -ra -p no:cacheprovider \
    --junitxml "$OUT/gpu_tests.xml"
summarise gpu-tests "$OUT/gpu_tests.xml"

# 2. Per-kernel profile (device µs and GB/s of each pass); on a CPU: host-timed plumbing in
#    Triton's interpreter (bench.profile_kernels sets TRITON_INTERPRET=1 for itself there).
run_part profile "$T_PROFILE" "$PY" -m bench.profile_kernels --out "$OUT/profile" \
    --device "$DEVICE" --budget-s "$(budget "$T_PROFILE" 15)"
summarise profile "$OUT/profile/kernels.json"

# 3. The oracle conformance suite, the Triton implementations only (on CUDA they join it; the
#    PyTorch path's half runs in CI on every commit, and the oracle's CPU time is what fills
#    this part's budget). KOALA_CONFORMANCE_ALL=1 runs both halves.
if [ "${KOALA_CONFORMANCE_ALL:-0}" = "1" ] || [ "$DEVICE" = "cpu" ]; then CONF_SELECT=(); else CONF_SELECT=(-k triton); fi
run_part conformance "$T_CONF" "$PY" -m pytest -m conformance tests/conformance "${CONF_SELECT[@]}" -q -ra \
    -p no:cacheprovider --junitxml "$OUT/conformance.xml"
summarise conformance "$OUT/conformance.xml"

# 4. The full benchmark (real model sizes, fp32 then bf16). KOALA_BENCH_BUDGET_S makes it skip
#    the cases it has no time for; the timeout is the hard stop (SIGINT still writes the JSON).
export KOALA_BENCH_BUDGET_S="${KOALA_BENCH_BUDGET_S:-$(budget "$T_BENCH" 30)}"
run_part benchmark "$T_BENCH" "$PY" -m pytest bench/test_optimizer_step.py \
    --koala-bench="${KOALA_BENCH:-full}" --koala-device="$DEVICE" \
    --benchmark-enable --benchmark-json "$OUT/bench.json" -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name
summarise benchmark "$OUT/bench.json"

# 5. Its report: markdown table + plot under $OUT/report; the short table goes to the log.
if [ -s "$OUT/bench.json" ]; then
    run_part report "$T_REPORT" "$PY" -m bench.report "$OUT/bench.json" --out "$OUT/report"
else
    PART=$((PART + 1)); LAST_RC=1; LAST_STATUS=FAILED; FAILURES=$((FAILURES + 1))
    log "part $PART/5 report: start (timeout ${T_REPORT} s): nothing to report"
    log "part $PART/5 report: end: FAILED (rc 1): no $OUT/bench.json"
fi
summarise report "$OUT/report/report.md"

log "summary after $(($(date +%s) - T0)) s ($FAILURES of 5 parts not passed):"
printf '  %s\n' "${SUMMARY[@]}" | tee -a "$LOG"
[ "$FAILURES" -eq 0 ]
