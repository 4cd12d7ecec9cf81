"""One line about a result file of ``bench/device_check.sh``, for its summary.

    python -m bench.check_summary FILE

JUnit XML (pytest ``--junitxml``): test counts. ``kernels.json`` (``bench.profile_kernels``):
cases run, failed and skipped, and whether the times are device or host times. pytest-benchmark
JSON: benchmarks recorded. Anything else: its size. A missing or unreadable file says so; the
exit status is always 0 (the summary must not fail the check).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit(path: Path) -> str:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return (f"{n['tests']} tests: {passed} passed, {n['failures']} failed, {n['errors']} errors, "
            f"{n['skipped']} skipped")


def profile(doc: dict) -> str:
    if doc.get("error"):
        return f"error: {doc['error']}"
    cases = doc.get("cases", [])
    failed = sum(1 for c in cases if "error" in c or c.get("missing_passes"))
    state = "complete" if doc.get("complete") else "INCOMPLETE"
    return (f"{len(cases)} cases ({failed} failed), {len(doc.get('skipped', []))} skipped, "
            f"{doc.get('timing')} times, {state}")


def describe(path: Path) -> str:
    """The summary line for one result file."""
    if not path.is_file() or path.stat().st_size == 0:
        return f"no {path.name}"
    try:
        if path.suffix == ".xml":
            return junit(path)
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            if "bytes_formula" in doc:
                return profile(doc)
            if "benchmarks" in doc:
                return f"{len(doc['benchmarks'])} benchmarks recorded"
        return f"{path.name}: {path.stat().st_size:,} bytes"
    except (ET.ParseError, json.JSONDecodeError, OSError, KeyError, TypeError, ValueError) as exc:
        return f"unreadable {path.name}: {exc}"


def main(argv: list[str]) -> int:
    print("; ".join(describe(Path(a)) for a in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
