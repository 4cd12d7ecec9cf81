"""Mixed precision with ``torch.amp.GradScaler``: the optimizer declares
``_step_supports_amp_scaling``, so ``scaler.step(opt)`` calls ``step`` with the optimizer's
``grad_scale`` and ``found_inf`` set. Gradients are unscaled inside the passes (exactly, since
the scaler's scales are powers of two), and a step with ``found_inf`` is skipped on the device
and counted, with no second time update afterwards."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_same_steps
from tests.variants import class_params

BOTH = pytest.mark.parametrize("cls", class_params(by_id=True))  # every variant


@pytest.fixture(params=["torch", "triton-interpreter"])
def fused(request, monkeypatch) -> bool:
    if request.param == "torch":
        return False
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return True


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=gen).requires_grad_(), torch.randn(4, generator=gen).requires_grad_()]


@BOTH
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd"])
def test_scaled_gradients_step_exactly_like_unscaled_ones(cls, fused, weight_decay):
    """grad = S·g with S a power of two, grad_scale = S: the same bits as grad = g, for every
    step (the unscaling 1/S·(S·g) is exact)."""
    ref_p, amp_p = _params(), _params()
    ref = cls(ref_p, fused=fused, weight_decay=weight_decay)
    amp = cls(amp_p, fused=fused, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor(2.0 ** 12)
    for _ in range(3):
        grads, losses = [torch.randn(p.shape, generator=gen) for p in ref_p], torch.rand(5, generator=gen)
        for opt, ps, s in ((ref, ref_p, 1.0), (amp, amp_p, float(scale))):
            opt.predict()
            for p, g in zip(ps, grads):
                p.grad = g * s
        ref.step(loss=losses)
        amp.grad_scale, amp.found_inf = scale, torch.tensor(0.0)
        amp.step(loss=losses)
        del amp.grad_scale, amp.found_inf
    assert_same_steps(ref, ref_p, amp, amp_p)


@BOTH
def test_found_inf_skips_the_update_on_the_device_and_counts_it(cls, fused):
    params = _params()
    opt = cls(params, fused=fused)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.predict()
    prior = {k: v.clone() for k, v in opt.filter_state.items()}
    weights = [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(2.0 ** 4), torch.tensor(1.0)
    opt.step(loss=torch.rand(4))
    del opt.grad_scale, opt.found_inf
    for p, w in zip(params, weights):
        assert torch.equal(p, w)
    f = opt.filter_state
    assert int(f["skipped_steps"]) == 1 and int(f["step"]) == 1
    for key in prior:
        if key not in ("step", "skipped_steps"):
            assert torch.equal(f[key], prior[key]), key  # the prior stays (R included)


@BOTH
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grad_scaler_step_trains_with_autocast_and_survives_an_inf(cls, fused, autocast_dtype):
    """The README loop with autocast and a GradScaler (CPU): scaler.step(opt, loss=...) runs
    KOALA's update, an injected inf gradient is skipped and counted (not applied, and the next
    predict() is a single time update), and the loss falls."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = cls(model.parameters(), fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(64, 8)
    y = x[:, :1] * 0.5 - x[:, 1:2]
    first = last = None
    for step in range(12):
        opt.predict()
        with torch.autocast("cpu", dtype=autocast_dtype):
            losses = ((model(x) - y) ** 2).squeeze(1).float()
        opt.zero_grad()
        scaler.scale(losses.mean()).backward()
        if step == 5:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt, loss=losses.detach())
        scaler.update()
        if step == 5:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        first = float(losses.detach().mean()) if first is None else first
        last = float(losses.detach().mean())
    f = opt.filter_state
    assert int(f["skipped_steps"]) == 1 and int(f["step"]) == 12
    assert last < 0.5 * first
