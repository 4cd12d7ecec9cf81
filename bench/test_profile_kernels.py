"""bench/profile_kernels.py without a GPU: the bytes of each pass, the GB/s arithmetic, the
host-timed (interpreter) path that writes the files, the time budget, the missing-device
record, and bench/check_summary.py's lines about the files."""

from __future__ import annotations

import json

import pytest
import torch

from bench import check_summary, profile_kernels as pk


@pytest.mark.parametrize("optimizer, wd, expected", [
    ("koala_v", 0.0, 16), ("koala_v", 5e-4, 20),
    ("koala_m", 0.0, 52), ("koala_m", 5e-4, 56),
    ("koala_m_fold", 0.0, 32), ("koala_m_fold", 5e-4, 36),
    ("koala_pp", 0.0, 40), ("koala_pp", 5e-4, 44)])
def test_pass_bytes_add_up_to_the_designs_bytes_per_iteration(optimizer, wd, expected):
    """koala_triton/kernels/NOTES.md: KOALA-V 16 B (20 with weight decay), KOALA-M 52 (56),
    KOALA-M with the fold 32 (36), KOALA++ 40 (44) per fp32 parameter and iteration."""
    opt = pk.OPTIMIZERS[optimizer]
    assert sum(pk.pass_bytes_fp32(p, opt.momentum, wd, opt.plusplus) or 0 for p in opt.passes) == expected


def test_pass_rows_divide_bytes_by_device_time():
    times = {"norms_kernel": (200.0, 2),                 # 100 µs per iteration
             "update_kernel_0d1d2d": (600.0, 2),         # older Triton: a signature suffix
             "filter_kernel": (20.0, 2),
             "void at::native::vectorized_elementwise_kernel": (8.0, 4)}
    opt = pk.OPTIMIZERS["koala_v"]
    rows, total, other = pk.pass_rows(times, opt, 0.0, torch.bfloat16, params=10 ** 6,
                                      iterations=2, copy_gbps=40.0)
    by = {r["kernel"]: r for r in rows}
    assert list(by) == ["norms_kernel", "filter_kernel", "update_kernel"]   # PASSES order
    # bf16: norms 4 × 2/4 = 2 B/param; 2e6 B in 100 µs = 20 GB/s; update 6 B, 6e6 B / 300 µs.
    assert by["norms_kernel"]["bytes_per_param"] == 2.0
    assert by["norms_kernel"]["gbps"] == pytest.approx(20.0)
    assert by["update_kernel"]["gbps"] == pytest.approx(20.0)
    assert by["update_kernel"]["us_per_launch"] == 300.0
    assert by["filter_kernel"]["gbps"] is None and by["filter_kernel"]["us_per_iter"] == 10.0
    assert total["us_per_iter"] == 410.0 and total["bytes_per_param"] == 8.0
    assert total["gbps"] == pytest.approx(8e6 / 410e3)
    assert total["fraction_of_copy_bw"] == pytest.approx(8e6 / 410e3 / 40.0)
    assert other == {"void at::native::vectorized_elementwise_kernel": 4.0}


def test_host_run_writes_both_files_with_the_designed_passes(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "profile"
    rc = pk.main(["--out", str(out), "--device", "cpu", "--cases", "many-small-2x1K:bf16",
                  "--optimizers", "koala_m_fold,koala_m", "--weight-decays", "5e-4"])
    assert rc == 0
    doc = json.loads((out / "kernels.json").read_text())
    assert doc["timing"] == "host" and doc["complete"] and doc["iterations"] == 2
    fold, plain = doc["cases"]
    assert [r["kernel"] for r in fold["passes"]] == ["norms_kernel", "filter_kernel", "fold_kernel"]
    assert [r["kernel"] for r in plain["passes"]] == list(pk.OPTIMIZERS["koala_m"].passes)
    norms = fold["passes"][0]
    assert norms["bytes_per_param"] == 4.0          # 8 B with weight decay, halved for bf16
    assert norms["launches_per_iter"] == 1 and norms["us_per_iter"] > 0
    assert fold["total"]["bytes_per_param"] == 18.0 and fold["finite"]
    md = (out / "kernels.md").read_text()
    assert "HOST TIMES, NOT DEVICE TIMES" in md and "GB/s = B/param(fp32)" in md
    assert "| many-small-2x1K | bf16 | 0.0005 | KoalaM(fold_predict=True) |" in md
    assert check_summary.describe(out / "kernels.json") == \
        "2 cases (0 failed), 0 skipped, host times, complete"


def test_budget_skips_the_cases_left_and_says_so(tmp_path):
    out = tmp_path / "profile"
    assert pk.main(["--out", str(out), "--device", "cpu", "--budget-s", "1e-9",
                    "--cases", "many-small-2x1K:fp32", "--weight-decays", "0,5e-4"]) == 0
    doc = json.loads((out / "kernels.json").read_text())
    assert doc["cases"] == [] and len(doc["skipped"]) == 2 * len(pk.OPTIMIZERS)
    assert all("time budget" in s["reason"] for s in doc["skipped"])
    assert "skipped: many-small-2x1K fp32 wd=0.0005 KoalaM(fold_predict=True)" in \
        (out / "kernels.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the record of a missing GPU")
def test_missing_cuda_device_is_recorded_and_fails(tmp_path):
    out = tmp_path / "profile"
    assert pk.main(["--out", str(out), "--device", "cuda"]) == 1
    assert json.loads((out / "kernels.json").read_text())["error"] == "no CUDA device"
    assert check_summary.describe(out / "kernels.json") == "error: no CUDA device"


def test_check_summary_lines(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
                   "</testsuite></testsuites>")
    assert check_summary.describe(xml) == "5 tests: 2 passed, 1 failed, 0 errors, 2 skipped"
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [{}, {}]}))
    assert check_summary.describe(bench) == "2 benchmarks recorded"
    assert check_summary.describe(tmp_path / "absent.xml") == "no absent.xml"
    broken = tmp_path / "broken.xml"
    broken.write_text("<testsuites")
    assert check_summary.describe(broken).startswith("unreadable broken.xml")
