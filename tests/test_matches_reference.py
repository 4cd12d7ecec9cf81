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

from koala_triton import KoalaM, KoalaV
from tests.conftest import make_params
from tests.reference import ReferenceKoala

RTOL = 1e-12
STEPS = 16


def _groups(params):
    # two groups: different lr and weight decay; the second has a stricter skip threshold
    return [
        {"params": params[:4], "lr": 0.7, "weight_decay": 0.0, "eps": 1e-9},
        {"params": params[4:], "lr": 0.4, "weight_decay": 0.05, "eps": 1e-9},
    ]


def _grads_for_step(params, step, gen):
    """Random grads with a schedule of the awkward cases:
    - params[1] has no grad on even steps (None);
    - params[5] gets a tiny gradient (norm < eps) on every third step: skipped;
    - on step 7 no tensor has a gradient at all (a no-op update)."""
    grads = []
    for i, p in enumerate(params):
        if step == 7 or (i == 1 and step % 2 == 0):
            grads.append(None)
        elif i == 5 and step % 3 == 0:
            grads.append(torch.full(p.shape, 1e-12, dtype=torch.float64))
        else:
            grads.append(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return grads


def _losses(gen):
    per_sample = torch.rand(8, generator=gen, dtype=torch.float64) * 2
    return per_sample


def _assert_close(actual, expected, what):
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=torch.float64)
    # Elementwise x - c*g can cancel, so the error is relative to the tensor's magnitude, not
    # to each (possibly tiny) element: atol = RTOL * max|expected|.
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=RTOL, atol=RTOL * scale + 1e-300, msg=lambda m: f"{what}: {m}"
    )


def _run(opt_cls, ref_kwargs, opt_kwargs, lr_schedule):
    params = make_params(torch.float64)
    ref = ReferenceKoala(_groups(params), **ref_kwargs)
    opt = opt_cls(_groups(params), **opt_kwargs)
    gen = torch.Generator().manual_seed(1)
    momentum = opt_cls is KoalaM
    for step in range(STEPS):
        for g_opt, g_ref, base in zip(opt.param_groups, ref.groups, (0.7, 0.4)):
            g_opt["lr"] = g_ref["lr"] = base * lr_schedule(step)
        opt.predict()
        ref.predict()
        grads = _grads_for_step(params, step, gen)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        losses = _losses(gen)
        opt.step(loss=losses)
        ref.update(float(losses.mean()), float((losses ** 2).mean()), grads)
        for i, (p, x) in enumerate(zip(params, ref.params())):
            _assert_close(p.detach(), x, f"step {step} param {i}")
        f = opt.filter_state
        _assert_close(f["R"], ref.R, f"step {step} R")
        if momentum:
            flat_u = [u for g in ref.u for u in g]
            flat_avg = [v for g in ref.xavg for v in g]
            for i, p in enumerate(params):
                _assert_close(opt.state[p]["velocity"], flat_u[i], f"step {step} velocity {i}")
                _assert_close(opt.state[p]["xavg"], flat_avg[i], f"step {step} xavg {i}")
            _assert_close(f["Pxx"], ref.P[0][0], f"step {step} Pxx")
            _assert_close(f["Pxu"], ref.P[0][1], f"step {step} Pxu")
            _assert_close(f["Puu"], ref.P[1][1], f"step {step} Puu")
            _assert_close(f["qx"], ref.qx, f"step {step} qx")
        else:
            _assert_close(f["p"], ref.p, f"step {step} p")
        assert int(f["step"]) == step + 1
    return params


def cosine(step):
    import math

    return 0.5 * (1 + math.cos(math.pi * step / STEPS))


@pytest.mark.parametrize("raw_grad_step", [False, True], ids=["regularised-step", "raw-grad-step"])
def test_koala_v_matches_reference_loop(raw_grad_step):
    _run(KoalaV, dict(momentum=False, raw_grad_step=raw_grad_step), dict(raw_grad_step=raw_grad_step), cosine)


def test_koala_v_fixed_r_matches_reference_loop():
    _run(KoalaV, dict(momentum=False, r=0.3, sigma=0.5, q=0.2), dict(r=0.3, sigma=0.5, q=0.2), cosine)


def test_koala_m_matches_reference_loop():
    _run(KoalaM, dict(momentum=True), {}, cosine)


def test_koala_m_nondefault_filter_matches_reference_loop():
    kw = dict(sw=0.3, sc=0.05, sv=0.2, a=0.5, qw=0.02, qv=0.03, alpha_r=0.5)
    _run(KoalaM, dict(momentum=True, **kw), kw, lambda s: 1.0 if s < 8 else 0.1)


def test_raw_grad_step_changes_the_trajectory_under_weight_decay():
    """The official KOALA-V steps along the raw gradient: with weight decay the weights differ
    from the default (regularised) step, so the option is really wired in (both runs match
    the reference above)."""
    a = _run(KoalaV, dict(momentum=False, raw_grad_step=True), dict(raw_grad_step=True), cosine)
    b = _run(KoalaV, dict(momentum=False), {}, cosine)
    assert not torch.allclose(a[4], b[4], rtol=1e-6)
