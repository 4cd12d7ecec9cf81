"""The oracle's KOALA++: its certificates can fail, and its evaluator agrees with a scalar Kalman
filter written here by hand where the recursion is exact (one weight per tensor)."""

from __future__ import annotations

import mpmath
import pytest
import sympy as sp

from oracle import DPS, KoalaPlusPlusOracle, exact
from oracle import kpp_certificates as kc
from oracle.kpp_derive import derive_pp

pytestmark = pytest.mark.conformance


@pytest.mark.parametrize("estimate", ["symmetric", "plain"])
def test_a_wrong_recursion_coefficient_fails_the_exact_ekf_certificate(monkeypatch, estimate):
    d = derive_pp(estimate)
    assert kc.ekf_parallel_gradients(estimate).holds
    monkeypatch.setitem(d.coef, "h", d.coef["h"] * (1 + sp.Rational(1, 10**6)))
    assert not kc.ekf_parallel_gradients(estimate).holds


def test_the_plain_recursion_does_not_pass_for_the_symmetric_one(monkeypatch):
    """The turning-gradient certificate tells the two estimates apart: the plain coefficients
    under the symmetric name miss the symmetric dropped term."""
    sym, plain = derive_pp("symmetric"), derive_pp("plain")
    monkeypatch.setattr(sym, "coef", plain.coef)
    assert not kc.ekf_turning_gradients("symmetric").holds


@pytest.mark.parametrize("symmetric", [True, False])
def test_one_weight_per_tensor_is_the_scalar_kalman_filter(symmetric):
    """With one weight every gradient keeps its direction, so KOALA++ is the exact EKF: per
    tensor the scalar filter p ← p̂·R/S with p̂ = p + Q, S = p̂·H² + R, started from σ and the
    phantom observation of the first gradient, and x ← x − lr·L·p̂·H/S (no weight decay)."""
    sigma, Q, R, lr = 0.25, 0.125, 0.75, 0.5
    x0, grads, losses = [1.5, -0.5], [[0.75, -1.25], [0.5, 0.25], [-1.0, 0.125], [0.375, 2.0]], [1.5, 1.25, 1.0, 2.0]
    oracle = KoalaPlusPlusOracle([[x0[0]], [x0[1]]], lr=lr, sigma=sigma, q=Q, r=R, symmetric=symmetric)
    with mpmath.workdps(DPS):
        sigma_, Q_, R_, lr_ = (exact(v) for v in (sigma, Q, R, lr))
        x = [exact(v) for v in x0]
        p = [None, None]
        for step, (g, L) in enumerate(zip(grads, losses)):
            oracle.update(L, None, [[g[0]], [g[1]]])
            for i in range(2):
                H = exact(g[i])
                if p[i] is None:  # phantom observation of the first gradient
                    prior = sigma_ + Q_
                    p[i] = prior * R_ / (prior * H * H + R_)
                prior = p[i] + Q_
                S = prior * H * H + R_
                x[i] -= lr_ * exact(L) * prior * H / S
                p[i] = prior * R_ / S
                assert abs(oracle.x[i][0] - x[i]) <= mpmath.mpf(10) ** -(DPS - 8), (step, i)
                assert abs(oracle.S[i] - S) <= mpmath.mpf(10) ** -(DPS - 8) * S, (step, i)
