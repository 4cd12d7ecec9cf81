"""Regimes where the naive covariance update breaks and the stable forms (koala_triton/ALGORITHM.md §3) must not.

Each test first evaluates the naive form on the very inputs of the step, in the precision named,
and asserts that it fails (so the case is a real hazard, not a comfortable one), then holds
the implementation to the oracle within the one-phase error model and to the invariant the
naive form lost.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from koala_triton import KoalaM, KoalaV
from oracle import KoalaMOracle, KoalaVOracle
from tests.conformance import error_model as em
from tests.conformance import harness
from tests.variants import VARIANTS

pytestmark = pytest.mark.conformance


def _naive_p(p_hat: float, G: float, R: float, dtype) -> float:
    """p+ = p^ - p^²·h with h = G/(p^·G + R), every operation in ``dtype``."""
    p, G, R = dtype(p_hat), dtype(G), dtype(R)
    h = G / (p * G + R)
    return float(p - p * p * h)


def _restarted_update(opt, oracle, params, variant, grads, loss):
    """Predict on the implementation, restart the oracle from it, update both; return bounds."""
    opt.predict()
    mid = harness.snapshot(opt, params, variant)
    harness.restart_oracle(oracle, mid, variant)
    for p, g in zip(params, grads):
        p.grad = g
    opt.update(torch.tensor(loss, dtype=torch.float64), None)
    oracle.update(loss, None, grads)
    prior = harness.exact_state(mid, variant)
    bounds = em.update_bounds(em.Precision(params[0].dtype), oracle, oracle.last_update,
                              variant=variant, adaptive=False, alpha_r=0.9, prior=prior)
    return bounds, mid["filter"]


@pytest.mark.parametrize("ratio_exp,naive_dtype", [(8, np.float32), (12, np.float32), (17, np.float64)],
                         ids=["G/R=1e8-naive-f32", "G/R=1e12-naive-f32", "G/R=1e17-naive-f64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_koala_v_variance_stays_positive_and_exact_when_the_gradient_dwarfs_R(
        impl, device, dtype, ratio_exp, naive_dtype):
    r = 10.0 ** -ratio_exp
    params = [torch.tensor([0.5, -1.0, 0.75, 1.25], dtype=dtype, device=device).requires_grad_()]
    grads = [torch.tensor([1.0, -0.5, 0.25, 0.75], dtype=dtype, device=device)]
    opt = KoalaV(params, sigma=1.0, q=0.0, r=r, **impl)
    oracle = KoalaVOracle([params[0].detach()], sigma=1.0, q=0.0, r=r)
    G = float(grads[0].double().pow(2).sum())
    naive = _naive_p(1.0, G, r, naive_dtype)
    assert naive <= 0.0 or abs(naive - r / G) > 0.5 * r / G, "the naive form survives: not a hazard"
    bounds, _ = _restarted_update(opt, oracle, params, VARIANTS["V"], grads, 1.0)
    post = opt.filter_state["p"].item()
    assert post > 0.0
    harness.compare_scalar("p+", post, oracle.p, bounds["p"])
    harness.compare_tensor("x+", params[0], oracle.x[0], bounds["x"][0])


def test_koala_v_covariance_recovers_after_a_collapse_scale_step(impl, device):
    """Two steps at ‖g‖²/R = 1e12 then ordinary ones: p must stay positive, so that the next
    predict (p^ = p + q) and update remain informative; the naive float32 form would hold p = 0
    and freeze the variance at q forever after."""
    params = [torch.tensor([0.5, -1.0, 0.75], dtype=torch.float32, device=device).requires_grad_()]
    opt = KoalaV(params, sigma=1.0, q=1e-3, r=1e-12, **impl)
    oracle = KoalaVOracle([params[0].detach()], sigma=1.0, q=1e-3, r=1e-12)
    for k, scale in enumerate([1.0, 1.0, 1e-6, 1e-6]):
        grads = [torch.tensor([1.0, -0.5, 0.25], dtype=torch.float32, device=device) * scale]
        bounds, _ = _restarted_update(opt, oracle, params, VARIANTS["V"], grads, 1.0)
        harness.compare_scalar(f"step {k} p+", opt.filter_state["p"].item(), oracle.p, bounds["p"])
        assert opt.filter_state["p"].item() > 0.0


def _naive_m(P: dict, G: float, R: float, dtype) -> dict:
    """P+ = P^ - P^ diag(h, 0) P^ entrywise in ``dtype``."""
    pxx, pxu, puu, G, R = (dtype(P["Pxx"]), dtype(P["Pxu"]), dtype(P["Puu"]), dtype(G), dtype(R))
    h = G / (pxx * G + R)
    return {"Pxx": float(pxx - pxx * pxx * h), "Pxu": float(pxu - pxx * pxu * h),
            "Puu": float(puu - pxu * pxu * h)}


def _det(P: dict) -> Fraction:
    return Fraction(P["Pxx"]) * Fraction(P["Puu"]) - Fraction(P["Pxu"]) ** 2


@pytest.mark.parametrize("ratio_exp", [10, 14], ids=["G/R=1e10", "G/R=1e14"])
def test_koala_m_covariance_stays_psd_from_a_near_singular_prior(impl, device, ratio_exp):
    """Singular initial P (sc² = sw·sv) with a = 1, qv = 0 and tiny weights (so qx ≈ 1e-8):
    det P^ ≈ 1e-8·P^xx·P^uu. The naive float32 P+ loses that determinant to cancellation
    (negative, collapsed to 0, or at least 50% off); the implementation must keep det P+ = ρ·det P^ ≥ 0 and match
    the oracle within the error model."""
    r = 10.0 ** -ratio_exp
    x0 = torch.tensor([2e-7, -1e-7, 3e-7, 1e-7], dtype=torch.float32, device=device)
    params = [x0.clone().requires_grad_()]
    hyper = dict(sw=0.5, sc=0.5, sv=0.5, a=1.0, qw=0.0, qv=0.0, r=r)
    opt = KoalaM(params, **hyper, **impl)
    oracle = KoalaMOracle([params[0].detach()], **hyper)
    grads = [torch.tensor([1.0, -0.5, 0.25, 0.75], dtype=torch.float32, device=device)]
    bounds, P_hat = _restarted_update(opt, oracle, params, VARIANTS["M"], grads, 1.0)
    G = float(oracle.last_update.Gmax)
    naive = _naive_m(P_hat, G, r, np.float32)
    exact_puu = float(oracle.Puu)
    assert _det(naive) < 0 or abs(naive["Puu"] - exact_puu) >= 0.5 * exact_puu, (
        f"the naive float32 update survives ({naive}): not a hazard")
    got = {k: opt.filter_state[k].item() for k in ("Pxx", "Pxu", "Puu")}
    assert got["Pxx"] > 0 and got["Puu"] > 0 and _det(got) >= 0, got
    for name in ("Pxx", "Pxu", "Puu"):
        harness.compare_scalar(f"{name}+", got[name], getattr(oracle, name), bounds[name])

