"""How the loss reaches the update, and the predict/update protocol that frameworks drive:
``observe()``, ``step(closure)`` with observed losses, idempotent ``predict()``, and the loss
floor. Compared with the same optimizer driven the README way (``step(loss=...)``), which the
rest of the suite holds to the reference and the oracle: both must give identical bits."""

from __future__ import annotations

import pytest
import torch

from koala_triton import KoalaM
from tests.helpers import assert_same_steps
from tests.variants import class_params

BOTH = pytest.mark.parametrize("cls", class_params(by_id=True))  # every variant


@pytest.fixture(params=["torch", "triton-interpreter"])
def fused(request, monkeypatch) -> bool:
    """Each test runs on the PyTorch path and on the Triton path (kernels in Triton's CPU
    interpreter)."""
    if request.param == "torch":
        return False
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return True


def _pair(cls, fused=False, **kwargs):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    a = [b.clone().requires_grad_() for b in base]
    b = [t.clone().requires_grad_() for t in base]
    return cls(a, fused=fused, **kwargs), a, cls(b, fused=fused, **kwargs), b


def _grads(params, gen):
    return [torch.randn(p.shape, generator=gen) for p in params]


@BOTH
def test_observe_then_step_is_step_with_the_loss(cls, fused):
    ref, rp, opt, op = _pair(cls, fused)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads, losses = _grads(rp, gen), torch.rand(6, generator=gen)
        for o, ps in ((ref, rp), (opt, op)):
            o.predict()
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        ref.step(loss=losses)
        opt.observe(losses)
        assert opt.step() is None
    assert_same_steps(ref, rp, opt, op)


@BOTH
def test_observations_of_one_update_are_combined(cls, fused):
    """Gradient accumulation: per-sample vectors concatenated, scalar (loss, loss_var) pairs
    averaged with equal weights."""
    ref, rp, opt, op = _pair(cls, fused)
    gen = torch.Generator().manual_seed(2)
    for form in ("vector", "scalar"):
        grads, first, second = _grads(rp, gen), torch.rand(4, generator=gen), torch.rand(4, generator=gen)
        for o, ps in ((ref, rp), (opt, op)):
            o.predict()
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        both = torch.cat([first, second]).double()
        if form == "vector":
            ref.step(loss=both)
            opt.observe(first)
            opt.observe(second)
        else:
            m1, m2 = first.double().mean(), second.double().mean()
            v1, v2 = (first.double() ** 2).mean(), (second.double() ** 2).mean()
            ref.step(loss=(m1 + m2) / 2, loss_var=(v1 + v2) / 2)
            opt.observe(m1, v1)
            opt.observe(m2, v2)
        opt.step()
    assert_same_steps(ref, rp, opt, op)
    with pytest.raises(ValueError, match="cannot be combined"):
        opt.observe(torch.rand(3))
        opt.observe(torch.tensor(0.5), torch.tensor(0.3))


@BOTH
def test_step_with_a_closure_uses_the_losses_the_closure_observed(cls, fused):
    """What a framework's closure does (Lightning): it runs the forward pass, hands the
    per-sample losses to observe(), and returns the mean loss the framework expects."""
    ref, rp, opt, op = _pair(cls, fused)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        grads, losses = _grads(rp, gen), torch.rand(6, generator=gen)

        def closure():
            for p, g in zip(op, grads):
                p.grad = g.clone()
            opt.observe(losses)
            return losses.mean()

        ref.predict()
        for p, g in zip(rp, grads):
            p.grad = g.clone()
        ref.step(loss=losses)
        assert torch.equal(opt.step(closure), losses.mean())
    assert_same_steps(ref, rp, opt, op)


def test_the_loss_is_handed_over_one_way_and_its_absence_is_a_clear_error():
    opt = KoalaM([torch.randn(3, requires_grad=True)])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.predict()
    with pytest.raises(ValueError, match="observe"):
        opt.step()
    opt.observe(torch.rand(4))
    with pytest.raises(ValueError, match="one way"):
        opt.step(loss=torch.rand(4))
    opt.step()  # the observation is still there, and used once
    opt.predict()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()


@BOTH
def test_predict_is_idempotent_within_an_iteration(cls, fused):
    """A second predict() before the update does nothing, so a framework that predicts in a
    hook and again in step(closure), or a skipped update, never applies two time updates."""
    ref, rp, opt, op = _pair(cls, fused)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        grads, losses = _grads(rp, gen), torch.rand(6, generator=gen)
        ref.predict()
        opt.predict()
        before = {k: v.clone() for k, v in opt.filter_state.items()}
        weights = [p.detach().clone() for p in op]
        opt.predict()  # again: nothing changes
        for key, value in before.items():
            assert torch.equal(opt.filter_state[key], value), (step, key)
        for p, w in zip(op, weights):
            assert torch.equal(p, w)
        for o, ps in ((ref, rp), (opt, op)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        ref.step(loss=losses)
        opt.step(lambda: losses)  # step(closure) does not predict again either
    assert_same_steps(ref, rp, opt, op)


@BOTH
def test_the_loss_floor_shifts_the_observed_loss_and_counts_steps_below_it(cls, fused):
    """With loss_floor f the update observes l − f: the same bits as a floor-0 optimizer fed the
    shifted losses (float64, so the shift is the same operation); a step whose mean loss is
    below f is counted, and a skipped step is not."""
    floor = -1.5
    shifted_ref, rp, opt, op = _pair(cls, fused)
    opt = cls(op, fused=fused, loss_floor=floor)
    gen = torch.Generator().manual_seed(5)
    means = []
    for step in range(5):
        grads = _grads(rp, gen)
        losses = (torch.rand(6, generator=gen, dtype=torch.float64) * 2 - 2.5)  # some below the floor
        if step == 3:
            losses[0] = float("nan")  # skipped: not counted
        means.append(float(losses.mean()))
        for o, ps in ((shifted_ref, rp), (opt, op)):
            o.predict()
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        shifted_ref.step(loss=losses - floor)
        opt.step(loss=losses)
    assert_same_steps(shifted_ref, rp, opt, op)
    expected = sum(1 for i, m in enumerate(means) if m < floor and i != 3)
    assert int(opt.filter_state["below_floor_steps"]) == expected
    assert int(opt.filter_state["skipped_steps"]) == 1
    assert int(shifted_ref.filter_state["below_floor_steps"]) == expected


@BOTH
def test_the_loss_floor_shifts_a_scalar_loss_and_its_second_moment(cls, fused):
    """Scalar form: L − f and mean((l − f)²) = loss_var − 2f·L + f², the expressions the
    per-sample form reduces to (compared to 1e-12: the two orders round differently)."""
    floor = 0.25
    a, pa, b, pb = _pair(cls, fused, loss_floor=floor)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        grads, losses = _grads(pa, gen), torch.rand(6, generator=gen, dtype=torch.float64)
        for o, ps in ((a, pa), (b, pb)):
            o.predict()
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        a.step(loss=losses)
        b.step(loss=losses.mean(), loss_var=(losses * losses).mean())
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
