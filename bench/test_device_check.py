"""bench/device_check.sh on the CPU (plumbing mode): part order, per-part timeouts, results.

One run of the whole script (~30 s on 2 cores) with the conformance part's timeout forced to
1 s: the parts must start in the order the script's header documents, the conformance part
must be cut and reported as TIMED OUT, the benchmark and report after it must still run, and
what the GPU tests and the profile wrote before it must be under $OUT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import check_summary

SCRIPT = Path(__file__).with_name("device_check.sh")
FORCED = "conformance"          # the part whose timeout the test forces down
FORCED_S = 1
GRACE_S = 5                     # the script's SIGKILL grace after SIGINT

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="needs bash and coreutils' timeout")


def documented_parts() -> list[tuple[str, int]]:
    """(name, timeout s) of each part, from the table in the script's header comment."""
    parts = []
    for line in SCRIPT.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s+(\d) (\S+)\s.*?\s(\d+) s\s", line)
        if m:
            assert int(m.group(1)) == len(parts) + 1, line
            parts.append((m.group(2), int(m.group(3))))
    return parts


@pytest.fixture(scope="module")
def plumbing_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check_out")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KOALA_BENCH", "KOALA_CHECK_")) and k != "TRITON_INTERPRET"}
    env.update({
        "OUT": str(out), "PYTHON": sys.executable,
        "KOALA_BENCH": "smoke", "KOALA_BENCH_DEVICE": "cpu",
        # a narrow benchmark: the point is that it runs after the timed-out part
        "KOALA_BENCH_SETS": "many-small-8x1K", "KOALA_BENCH_DTYPES": "fp32",
        "KOALA_BENCH_PROVIDERS": "koala_v_torch,sgdm_foreach,adamw_fused",
        "KOALA_BENCH_ROUNDS": "3",
        f"KOALA_CHECK_TIMEOUT_{FORCED.upper()}": str(FORCED_S),
    })
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=240)
    log = (out / "device_check.log").read_text()
    return proc, out, log


def _events(log: str) -> list[tuple[int, str, str, str]]:
    """(seconds, part, 'start' | 'end', rest of the line) for every part line of the log."""
    pattern = re.compile(r"^== \[(\d+) s\] part \d/5 (\S+): (start|end)(.*)$")
    return [(int(m.group(1)), m.group(2), m.group(3), m.group(4))
            for m in map(pattern.match, log.splitlines()) if m]


def test_header_documents_five_parts_within_eight_minutes():
    parts = documented_parts()
    assert [p for p, _ in parts] == ["gpu-tests", "profile", "conformance", "benchmark", "report"]
    # Timeouts, SIGKILL graces, the environment lines (5 + 10 s) and the summary lines (2 s
    # each) fit in 8 minutes.
    text = SCRIPT.read_text()
    assert f"GRACE={GRACE_S}\n" in text and "timeout 2 " in text
    assert "timeout 5 nvidia-smi" in text and 'timeout 10 "$PY" -' in text
    assert sum(t for _, t in parts) + len(parts) * (GRACE_S + 2) + 15 <= 480
    for name, t in parts:
        var = "KOALA_CHECK_TIMEOUT_" + name.upper().replace("-", "_")
        assert f"{var}:-{t}" in text, f"{var} default differs from the header"


def test_parts_run_in_the_documented_order(plumbing_run):
    _, _, log = plumbing_run
    events = _events(log)
    assert [(p, kind) for _, p, kind, _ in events] == [
        (p, kind) for p, _ in documented_parts() for kind in ("start", "end")]
    plan = next(line for line in log.splitlines() if "plan:" in line)
    expected = [(p, FORCED_S if p == FORCED else t) for p, t in documented_parts()]
    assert re.findall(r"(\S+) (\d+) s", plan.split("plan:")[1]) == [(p, str(t)) for p, t in expected]


def test_forced_timeout_is_reported_and_cuts_the_part(plumbing_run):
    proc, _, log = plumbing_run
    events = {(p, kind): (t, rest) for t, p, kind, rest in _events(log)}
    t_start, _ = events[(FORCED, "start")]
    t_end, rest = events[(FORCED, "end")]
    assert re.match(r": TIMED OUT \(rc (124|137)\)", rest), rest
    # Cut at its timeout (the suite alone runs ~20 s here); the log has whole seconds.
    assert t_end - t_start <= FORCED_S + GRACE_S + 2
    summary = log[log.rindex("summary after"):]
    line = next(s for s in summary.splitlines() if s.strip().startswith(FORCED))
    assert "TIMED OUT" in line and re.search(r"rc (124|137)\b", line), line
    assert "1 of 5 parts not passed" in summary
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert summary.strip() in proc.stdout  # the summary is also printed last


def test_parts_after_the_timeout_still_ran(plumbing_run):
    _, out, log = plumbing_run
    events = {(p, kind): rest for _, p, kind, rest in _events(log)}
    for part in ("benchmark", "report"):
        assert events[(part, "end")].startswith(": passed (rc 0)"), events[(part, "end")]
    bench = json.loads((out / "bench.json").read_text())
    assert {b["extra_info"]["provider"] for b in bench["benchmarks"]} == {
        "koala_v_torch", "sgdm_foreach", "adamw_fused"}
    assert "KoalaV (PyTorch)" in (out / "report" / "report.md").read_text()


def test_results_of_the_parts_before_are_under_out(plumbing_run):
    _, out, log = plumbing_run
    events = {(p, kind): rest for _, p, kind, rest in _events(log)}
    for part in ("gpu-tests", "profile"):
        assert events[(part, "end")].startswith(": passed (rc 0)"), events[(part, "end")]
    counts = check_summary.describe(out / "gpu_tests.xml")   # on a CPU they all skip
    m = re.fullmatch(r"(\d+) tests: 0 passed, 0 failed, 0 errors, (\d+) skipped", counts)
    assert m and int(m.group(1)) == int(m.group(2)) > 0, counts
    profile = json.loads((out / "profile" / "kernels.json").read_text())
    assert profile["timing"] == "host" and profile["complete"]
    assert len(profile["cases"]) == 16 and not profile["skipped"]  # 4 optimizers x 2 sets x 2 weight decays
    for case in profile["cases"]:
        assert "error" not in case and not case["missing_passes"], case
    assert "HOST TIMES, NOT DEVICE TIMES" in (out / "profile" / "kernels.md").read_text()
    # At most eight result files (the timed-out part may have left its XML), one folder deep.
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files - {"conformance.xml"} == {
        "device_check.log", "gpu_tests.xml", "profile/kernels.json", "profile/kernels.md",
        "bench.json", "report/report.md", "report/plot.png"}
