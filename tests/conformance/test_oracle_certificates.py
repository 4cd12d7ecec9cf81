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
    for line in ("KOALA++, symmetric estimate", "KOALA++, plain estimate",  # KOALA++'s forms
                 "λ                            = (Hh*Q + Hv)/S0", "α                            = Hh/hh",
                 "r                            = -Hh*hv/hh**2 + Hv/hh"):
        assert line in out.stdout, line


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


def test_oracle_predicts_twice_in_a_row_as_the_composed_time_update():
    """A double predict (predict() twice before an update) is the time update applied twice:
    x = x0 + (1 + a)·u0, u = a²·u0, P = F (F P0 Fᵀ + Q1) Fᵀ + Q2 with Qk = diag(qx_k, qv), each
    qx_k from the distance D of the weights that predict starts from (KOALA-V: p = p0 + 2q).
    Computed here with SymPy matrices in exact arithmetic; the inputs are dyadic, so the floats
    the oracle gets are these numbers exactly."""
    R_ = sp.Rational
    a, qv, qw, sw, sc, sv = R_(3, 4), R_(1, 64), R_(1, 128), R_(1, 4), R_(1, 32), R_(1, 8)
    x0, u0 = [R_(3, 2), R_(-1, 2), R_(5, 4)], [R_(1, 4), R_(-3, 4), R_(1, 8)]
    oracle = KoalaMOracle([[float(v) for v in x0]], a=float(a), qv=float(qv), qw=float(qw),
                          sw=float(sw), sc=float(sc), sv=float(sv))
    oracle.load(u=[[float(v) for v in u0]])
    F = sp.Matrix([[1, 1], [0, a]])
    P = sp.Matrix([[sw, sc], [sc, sv]])
    x, u, qx = list(x0), list(u0), qw
    for _ in range(2):
        oracle.predict()
        D = sp.sqrt(sum(v * v for v in x)) / len(x)  # xavg = 0 before any update
        qx = R_(9, 10) * qx + R_(1, 10) * D
        P = F * P * F.T + sp.diag(qx, qv)
        x, u = [xi + ui for xi, ui in zip(x, u)], [a * ui for ui in u]
    assert x == [v + (1 + a) * w for v, w in zip(x0, u0)] and u == [a * a * w for w in u0]
    with mpmath.workdps(DPS):
        tol = mpmath.mpf(10) ** -(DPS - 5)

        def gap(got, want):
            return abs(got - mpmath.mpf(str(sp.N(want, DPS + 10))))

        assert max(gap(g, w) for g, w in zip(oracle.x[0] + oracle.u[0], x + u)) <= tol
        for name, want in (("Pxx", P[0, 0]), ("Pxu", P[0, 1]), ("Puu", P[1, 1]), ("qx", qx)):
            assert gap(getattr(oracle, name), want) <= tol, name
    v = KoalaVOracle([[0.5]], sigma=0.25, q=0.125)
    v.predict()
    v.predict()
    assert v.p == mpmath.mpf(0.5)
