"""The PyTorch path against the plain float64 for-loop reference (tests/reference.py).

Error model: both compute the same float64 expressions in a different order (foreach norms vs
per-tensor sums, stable vs naive covariance form), so they agree to a few ulps per operation;
over 16 steps with norms of <= 257 terms the relative difference stays below ~1e-13. 1e-12 is
that bound with margin, far below any real bug (a wrong gain or a missed tensor moves values
by > 1e-3).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_matches_reference, reference_grads, reference_groups, reference_params
from tests.variants import VARIANTS

STEPS = 16
V, M = VARIANTS["V"], VARIANTS["M"]


def _losses(gen):
    per_sample = torch.rand(8, generator=gen, dtype=torch.float64) * 2
    return per_sample


def _run(variant, hyper, lr_schedule):
    """The optimizer of ``variant`` against the reference loop, both with ``hyper``; every
    weight, state and filter entry compared after every step (1e-12)."""
    params = reference_params(torch.float64)
    ref = variant.reference(reference_groups(params), **hyper)
    opt = variant.cls(reference_groups(params), **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        for g_opt, g_ref, base in zip(opt.param_groups, ref.groups, (0.7, 0.4)):
            g_opt["lr"] = g_ref["lr"] = base * lr_schedule(step)
        opt.predict()
        ref.predict()
        grads = reference_grads(params, step, gen)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        losses = _losses(gen)
        opt.step(loss=losses)
        ref.update(float(losses.mean()), float((losses ** 2).mean()), grads)
        assert_matches_reference(opt, params, ref, f"step {step}")
        assert int(opt.filter_state["step"]) == step + 1
    return params


def cosine(step):
    import math

    return 0.5 * (1 + math.cos(math.pi * step / STEPS))


@pytest.mark.parametrize("raw_grad_step", [False, True], ids=["regularised-step", "raw-grad-step"])
def test_koala_v_matches_reference_loop(raw_grad_step):
    _run(V, dict(raw_grad_step=raw_grad_step), cosine)


def test_koala_v_fixed_r_matches_reference_loop():
    _run(V, dict(r=0.3, sigma=0.5, q=0.2), cosine)


def test_koala_m_matches_reference_loop():
    _run(M, {}, cosine)


def test_koala_m_nondefault_filter_matches_reference_loop():
    _run(M, dict(sw=0.3, sc=0.05, sv=0.2, a=0.5, qw=0.02, qv=0.03, alpha_r=0.5), lambda s: 1.0 if s < 8 else 0.1)


def test_raw_grad_step_changes_the_trajectory_under_weight_decay():
    """The official KOALA-V steps along the raw gradient: with weight decay the weights differ
    from the default (regularised) step, so the option is really wired in (both runs match
    the reference above)."""
    a = _run(V, dict(raw_grad_step=True), cosine)
    b = _run(V, {}, cosine)
    assert not torch.allclose(a[4], b[4], rtol=1e-6)
