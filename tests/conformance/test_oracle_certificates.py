"""The oracle itself: its certificates hold, they can fail, and its arithmetic is what it claims."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mpmath
import pytest
import sympy as sp

from oracle import DPS, KoalaMOracle, KoalaVOracle, exact
from oracle import certificates
from oracle.checks import no_float_constants
from oracle.derive import derive_m, derive_v

pytestmark = pytest.mark.conformance

ROOT = Path(__file__).resolve().parents[2]
TITLES = [title for title, _ in certificates.CERTIFICATES]


@pytest.mark.parametrize("title", TITLES)
def test_oracle_certificate_group_holds(title):
    checks = dict(certificates.all_checks())[title]
    failing = [c.line() for c in checks if not c.holds]
    assert checks and not failing, "\n".join(failing)


def test_python_m_oracle_prints_the_forms_and_every_certificate_and_exits_zero():
    out = subprocess.run([sys.executable, "-m", "oracle"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    total = sum(len(checks) for _, checks in certificates.all_checks())
    assert f"{total} certificates, ALL HOLD" in out.stdout
    assert "stable p+                    = R*ph/(G*ph + R)" in out.stdout
    assert "stable Puu+                  = (G*det_h + Puu_h*R)/(G*Pxx_h + R)" in out.stdout
    assert out.stdout.count("holds ") == total


def test_a_wrong_step_coefficient_fails_the_exact_ekf_certificate(monkeypatch):
    d = derive_v()
    monkeypatch.setitem(d.step, "x", d.step["x"] * (1 + sp.Rational(1, 10**6)))
    state, _, _ = certificates.full_ekf_against_closed_forms("V")
    assert not state.holds


def test_a_sum_over_tensors_instead_of_a_max_fails_the_exact_covariance_certificate(monkeypatch):
    import oracle.certificates as c

    real_max = max
    monkeypatch.setattr(c, "max", lambda xs, *a, **k: sum(xs) if isinstance(xs, list) else real_max(xs, *a, **k),
                        raising=False)
    checks = c.full_ekf_against_closed_forms("M")
    gap = [ch for ch in checks if ch.name.endswith("covariance-gap")][0]
    assert not gap.holds


def test_derived_forms_hold_no_sympy_float_and_the_oracle_refuses_one():
    for d in (derive_v(), derive_m()):
        for name, expr in d.forms().items():
            assert no_float_constants(expr), name
    with pytest.raises(TypeError, match="Rational"):
        exact(sp.Float("0.1"))


def test_oracle_converts_floats_exactly_and_computes_with_at_least_50_digits():
    assert DPS >= 50
    # 0.1 as a double is 3602879701896397/2^55, not 1/10: the oracle must keep that value.
    with mpmath.workdps(DPS):
        assert exact(0.1) == mpmath.mpf(3602879701896397) / 2**55
    # p+ = p^·R/(p^·G + R) with p^ = 1, G = 1, R = 2 is 2/3: right to DPS digits.
    oracle = KoalaVOracle([[0.5]], sigma=1.0, q=0.0, r=2.0)
    oracle.predict()
    oracle.update(1.0, None, [[1.0]])
    with mpmath.workdps(DPS + 10):
        assert abs(oracle.p - mpmath.mpf(2) / 3) < mpmath.mpf(10) ** -(DPS - 2)


def test_oracle_koala_m_counts_every_element_in_the_distance_d():
    """n in D = ‖xavg - x‖/n counts every element of every tensor, frozen or empty ones too."""
    oracle = KoalaMOracle([[3.0, 4.0], [0.0] * 0, [0.0] * 3], qw=0.0)
    oracle.predict()
    with mpmath.workdps(DPS):
        assert oracle.last_D == mpmath.mpf(5) / 5
        assert abs(oracle.qx - mpmath.mpf(1) / 10) < mpmath.mpf(10) ** -(DPS - 2)
