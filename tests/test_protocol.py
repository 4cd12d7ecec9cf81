"""predict/update/step: the loss forms, closures, hooks, schedulers and the skip rules."""

from __future__ import annotations

import warnings

import pytest
import torch

from koala_triton import KoalaM, KoalaV
from tests.variants import VARIANTS, variant_params

BOTH = pytest.mark.parametrize("variant", variant_params())


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, x[:, :1] - 2 * x[:, 1:2]


def _per_sample(model, x, y):
    return ((model(x) - y) ** 2).squeeze(1)


def _snapshot(opt, model):
    return [p.detach().clone() for p in model.parameters()], {k: v.clone() for k, v in opt.filter_state.items()}


@BOTH
def test_per_sample_losses_equal_update_with_mean_and_second_moment(variant):
    x, y = _data()
    runs = []
    for form in ("per-sample", "update"):
        model = _model()
        opt = variant.cls(model.parameters())
        for _ in range(3):
            opt.predict()
            losses = _per_sample(model, x, y)
            opt.zero_grad()
            losses.mean().backward()
            if form == "per-sample":
                opt.step(loss=losses)
            else:
                opt.update(losses.mean(), (losses ** 2).mean())
        runs.append(_snapshot(opt, model))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


@BOTH
def test_step_closure_is_a_whole_iteration(variant):
    """step(closure) = predict, closure (with grad enabled), update; same as the manual loop."""
    x, y = _data()
    manual, closed = _model(), _model()
    opt_m, opt_c = variant.cls(manual.parameters()), variant.cls(closed.parameters())
    for _ in range(3):
        opt_m.predict()
        losses = _per_sample(manual, x, y)
        opt_m.zero_grad()
        losses.mean().backward()
        opt_m.step(loss=losses)

        def closure():
            assert torch.is_grad_enabled()
            opt_c.zero_grad()
            out = _per_sample(closed, x, y)
            out.mean().backward()
            return out

        returned = opt_c.step(closure)
        assert returned.shape == (16,)
    for a, b in zip(manual.parameters(), closed.parameters()):
        assert torch.equal(a, b)


@BOTH
def test_step_closure_after_explicit_predict_does_not_predict_twice(variant):
    x, y = _data()
    a, b = _model(), _model()
    opt_a, opt_b = variant.cls(a.parameters()), variant.cls(b.parameters())

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            out = _per_sample(model, x, y)
            out.mean().backward()
            return out
        return closure

    opt_a.predict()
    opt_a.step(closure_for(a, opt_a))
    opt_b.step(closure_for(b, opt_b))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@BOTH
def test_missing_or_malformed_loss_is_a_clear_error_and_changes_nothing(variant):
    model = _model()
    opt = variant.cls(model.parameters())
    weights, filt = _snapshot(opt, model)
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="loss_var"):
        opt.step(loss=torch.tensor(1.0))  # scalar without loss_var while R is estimated
    with pytest.raises(ValueError, match="1-D"):
        opt.step(loss=torch.ones(2, 2))
    with pytest.raises(ValueError, match="empty"):
        opt.step(loss=torch.ones(0))
    with pytest.raises(ValueError, match="loss_var"):
        opt.step(loss=torch.ones(3), loss_var=torch.tensor(1.0))
    with pytest.raises(TypeError, match="loss"):
        opt.step(loss="1.0")
    after_w, after_f = _snapshot(opt, model)
    assert all(torch.equal(a, b) for a, b in zip(weights, after_w))
    assert all(torch.equal(filt[k], after_f[k]) for k in filt)
    # A closure runs at the predicted weights, so predict has happened when it fails; the
    # update stays pending and the next step does not predict a second time.
    with pytest.raises(ValueError, match="closure must return"):
        opt.step(lambda: None)
    with pytest.raises(ValueError, match="either"):  # a loss from the closure and loss=...
        opt.step(lambda: torch.ones(3), loss=torch.ones(3))
    predicted = {k: v.clone() for k, v in opt.filter_state.items()}
    opt.step(loss=torch.rand(3))
    cov = variant.weight_variance_key
    if cov is not None:  # a global covariance (KOALA++'s filters are per tensor)
        assert float(opt.filter_state[cov]) <= float(predicted[cov])
    assert int(opt.filter_state["step"]) == 1


@BOTH
def test_fixed_r_accepts_a_scalar_loss_alone(variant):
    model = _model()
    opt = variant.cls(model.parameters(), r=0.5)
    x, y = _data()
    opt.predict()
    losses = _per_sample(model, x, y)
    losses.mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(loss=losses.mean().item())  # a Python float works too
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert float(opt.filter_state["R"]) == 0.5


@BOTH
def test_update_runs_step_hooks_and_satisfies_lr_schedulers(variant):
    model = _model()
    opt = variant.cls(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        for _ in range(2):
            opt.predict()
            losses = _per_sample(model, x, y)
            opt.zero_grad()
            losses.mean().backward()
            opt.update(losses.mean(), (losses ** 2).mean())
            sched.step()
    assert calls == ["pre", "post", "pre", "post"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_lr_is_read_from_the_group_every_step():
    """lr = 0 in a group leaves its weights bitwise unchanged while the filter still contracts."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = KoalaV([{"params": [a], "lr": 0.0}, {"params": [b]}])
    opt.predict()
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step(loss=torch.tensor([1.0, 2.0]))
    assert torch.equal(a.detach(), torch.ones(3))
    assert not torch.equal(b.detach(), torch.ones(2))
    assert float(opt.filter_state["p"]) < 0.1 + 1.0


def test_koala_m_warns_once_when_predict_was_skipped():
    p = torch.ones(3, requires_grad=True)
    opt = KoalaM([p])
    with pytest.warns(UserWarning, match="without predict"):
        p.grad = torch.ones(3)
        opt.step(loss=torch.rand(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.grad = torch.ones(3)
        opt.step(loss=torch.rand(4))
    assert int(opt.filter_state["step"]) == 2


def test_koala_v_step_without_predict_is_exactly_predict_then_update():
    """KOALA-V's predict is scalar only, so the implicit predict is the paper's algorithm."""
    runs = []
    for explicit in (True, False):
        p = torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_()
        opt = KoalaV([p])
        for i in range(3):
            if explicit:
                opt.predict()
            p.grad = torch.sin(torch.arange(5.0, dtype=torch.float64) + i)
            opt.step(loss=torch.tensor([0.5, 1.5], dtype=torch.float64))
        runs.append((p.detach().clone(), opt.filter_state["p"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@BOTH
def test_step_with_no_gradient_at_all_is_a_no_op_update(variant):
    """The official code crashes (max of an empty list); here weights stay as predicted and
    the covariance stays at its prior."""
    model = _model()
    opt = variant.cls(model.parameters())
    opt.predict()
    weights, prior = _snapshot(opt, model)
    opt.step(loss=torch.rand(4))
    after_w, after_f = _snapshot(opt, model)
    for a, b in zip(weights, after_w):
        assert torch.equal(a, b)
    for k in variant.covariance_keys:
        assert torch.equal(prior[k], after_f[k]), k
    assert int(after_f["skipped_steps"]) == 0 and int(after_f["step"]) == 1


BAD = [float("nan"), float("inf"), float("-inf")]


@BOTH
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["loss", "loss_var", "grad"])
def test_non_finite_input_skips_the_measurement_on_the_device(variant, bad, where):
    model = _model()
    opt = variant.cls(model.parameters())
    x, y = _data()
    # one healthy step first so velocities and averages are non-trivial
    opt.predict()
    losses = _per_sample(model, x, y)
    losses.mean().backward()
    opt.step(loss=losses)

    opt.predict()
    opt.zero_grad()
    losses = _per_sample(model, x, y)
    losses.mean().backward()
    loss, loss_var = losses.mean().detach(), (losses ** 2).mean().detach()
    if where == "loss":
        loss = torch.tensor(bad, dtype=torch.float64)
    elif where == "loss_var":
        loss_var = torch.tensor(bad, dtype=torch.float64)
    else:
        next(model.parameters()).grad[0, 0] = bad
    weights, prior = _snapshot(opt, model)
    state = {k: opt.state[p][k].clone() for p in model.parameters() for k in variant.state_keys}
    opt.update(loss, loss_var)
    after_w, after_f = _snapshot(opt, model)
    for a, b in zip(weights, after_w):
        assert torch.equal(a, b)
    for k in prior:
        if k == "step":
            assert int(after_f[k]) == int(prior[k]) + 1
        elif k == "skipped_steps":
            assert int(after_f[k]) == int(prior[k]) + 1
        else:
            assert torch.equal(prior[k], after_f[k]), k
    after_state = {k: opt.state[p][k] for p in model.parameters() for k in variant.state_keys}
    for k in state:
        assert torch.equal(state[k], after_state[k])
    # and the optimizer keeps working afterwards
    opt.predict()
    opt.zero_grad()
    losses = _per_sample(model, x, y)
    losses.mean().backward()
    opt.step(loss=losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(opt.filter_state["skipped_steps"]) == 1


@BOTH
def test_tensor_below_eps_is_skipped(variant):
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = variant.cls([a, b], eps=1e-3)
    opt.predict()
    a_pred = a.detach().clone()
    a.grad = torch.full((3,), 1e-4)  # norm 1.7e-4 < eps
    b.grad = torch.ones(3)
    opt.step(loss=torch.rand(4))
    assert torch.equal(a.detach(), a_pred)
    assert not torch.equal(b.detach(), torch.ones(3))
    if "xavg" in variant.state_keys:
        assert torch.equal(opt.state[a]["xavg"], torch.zeros(3))
        assert not torch.equal(opt.state[b]["xavg"], torch.zeros(3))


@BOTH
def test_frozen_zero_dim_empty_and_noncontiguous_params_work(variant):
    frozen = torch.ones(4)  # requires_grad=False: never gets a grad
    scalar = torch.tensor(2.0, requires_grad=True)
    empty = torch.zeros(0, 3, requires_grad=True)
    strided = torch.empty_strided((3, 2), (1, 3)).copy_(torch.randn(3, 2)).requires_grad_()
    opt = variant.cls([frozen, scalar, empty, strided])
    for _ in range(3):
        opt.predict()
        loss = (scalar - 1) ** 2 + (strided ** 2).sum() + empty.sum()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach().reshape(1))
    assert torch.equal(frozen, torch.ones(4))
    assert abs(float(scalar.detach()) - 1.0) < 1.0
    assert not strided.is_contiguous()
    assert all(torch.isfinite(t).all() for t in (scalar, strided))


def test_training_reduces_the_loss():
    """KOALA-V and KOALA-M fit a small regression (a smoke check of the whole loop; KOALA++'s
    is in test_koala_pp.py)."""
    x, y = _data()
    for variant in (v for v in VARIANTS.values() if v.global_covariance):
        cls = variant.cls
        model = _model()
        opt = cls(model.parameters())
        first = float(_per_sample(model, x, y).mean().detach())
        for _ in range(60):
            opt.predict()
            losses = _per_sample(model, x, y)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
        assert float(_per_sample(model, x, y).mean().detach()) < 0.2 * first, cls.__name__


@BOTH
def test_add_param_group_after_construction_joins_the_same_filter(variant):
    a = torch.ones(3, requires_grad=True)
    opt = variant.cls([a])
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt.add_param_group({"params": [b], "lr": 0.5})
    if variant.has_velocity:
        assert torch.equal(opt.state[b]["velocity"], torch.zeros(2, dtype=torch.float64))
    opt.predict()
    a.grad, b.grad = torch.ones(3), torch.ones(2, dtype=torch.float64)
    opt.step(loss=torch.rand(4))
    assert not torch.equal(b.detach(), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.ones(2, device="meta", requires_grad=True)]})
