"""What users of torch.optim optimizers expect beyond stepping: ``torch.compile(opt.step)``,
``copy.deepcopy`` and ``pickle``, named parameters, ``repr``, and ``load_state_dict`` across
different filter settings."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from koala_triton import KoalaM
from tests.variants import class_params

BOTH = pytest.mark.parametrize("cls", class_params(by_id=True))  # every variant


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=gen).requires_grad_(), torch.randn(3, generator=gen).requires_grad_()]


def _iterate(opt, params, gen, step=None):
    opt.predict()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    (step or opt.step)(loss=torch.rand(8, generator=gen))


@BOTH
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_matches_eager(cls, backend):
    """torch.compile keeps a copy_ into a 1-D input but drops in-place writes into 0-dim
    inputs (and views of them); the filter is one float64 vector written with one copy_, so a
    compiled step updates it (without that, R stays at 1 and p only grows). Error model:
    inductor may fuse and reorder the fp32 norm reductions (15 elements per tensor: relative
    error ≤ 15·2⁻²⁴ ≈ 1e-6 per norm), and every filter scalar and weight depends on those
    norms, over 4 steps: 1e-5 relative."""
    torch._dynamo.reset()
    eager_p, compiled_p = _params(), _params()
    eager, compiled = cls(eager_p, fused=False, weight_decay=0.01), cls(compiled_p, fused=False, weight_decay=0.01)
    step = torch.compile(compiled.step, backend=backend)
    ge, gc = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(4):
        _iterate(eager, eager_p, ge)
        _iterate(compiled, compiled_p, gc, step)
    for a, b in zip(eager_p, compiled_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for key, value in eager.filter_state.items():
        torch.testing.assert_close(compiled.filter_state[key], value, rtol=1e-5, atol=0.0)
    assert int(compiled.filter_state["step"]) == 4


@BOTH
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_continues_exactly_like_the_original(cls, how):
    params = _params()
    opt = cls(params, weight_decay=0.01)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        _iterate(opt, params, gen)
    opt.predict()  # copied between predict and update
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    for p, q in zip(params, clone_params):
        assert torch.equal(p, q) and p is not q
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i in range(3):
        for o, ps, g in ((opt, params, g1), (clone, clone_params, g2)):
            if i:
                o.predict()
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            o.step(loss=torch.rand(8, generator=g))
    for p, q in zip(params, clone_params):
        assert torch.equal(p, q)
    for key, value in opt.filter_state.items():
        assert torch.equal(clone.filter_state[key], value), key


@BOTH
def test_named_parameters_are_accepted(cls):
    model = torch.nn.Linear(3, 2)
    opt = cls(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    opt.predict()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step(loss=torch.rand(4))
    assert "param_names" in opt.state_dict()["param_groups"][0]


def test_repr_shows_the_filter_settings():
    text = repr(KoalaM(_params(), a=0.5, r=0.25))
    assert "Filter:" in text and "a=0.5" in text and "r=0.25" in text and "path=torch" in text
    assert "Parameter Group 0" in text


@BOTH
def test_loading_a_checkpoint_saved_with_other_filter_settings_warns_and_takes_them(cls):
    """The rule: the checkpoint's filter settings replace the constructor's (a run resumes as
    it was saved, as torch.optim's param-group settings do), with a warning naming each."""
    saved_with = {"r": 0.3, "alpha_r": 0.5}
    source = cls(_params(), **saved_with)
    state = source.state_dict()
    target = cls(_params())
    with pytest.warns(UserWarning, match=r"r: None -> 0.3.*alpha_r: 0.9 -> 0.5"):
        target.load_state_dict(state)
    assert target._hyper["r"] == 0.3 and target._hyper["alpha_r"] == 0.5
    same = cls(_params(), **saved_with)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)  # identical settings: no warning


@BOTH
def test_a_checkpoint_from_before_the_loss_floor_loads(cls):
    """Checkpoints written before ``loss_floor`` and ``below_floor_steps`` existed load with
    the values they were saved under (floor 0, count 0)."""
    state = cls(_params()).state_dict()
    del state["koala"]["hyper"]["loss_floor"]
    del state["koala"]["filter"]["below_floor_steps"]
    opt = cls(_params())
    opt.load_state_dict(state)
    assert opt._hyper["loss_floor"] == 0.0 and int(opt.filter_state["below_floor_steps"]) == 0
    with pytest.warns(UserWarning, match="loss_floor: 1.0 -> 0.0"):
        cls(_params(), loss_floor=1.0).load_state_dict(state)


@BOTH
def test_one_cycle_lr_works_without_momentum_cycling(cls):
    """KOALA's param groups have no momentum/betas (KOALA-M's momentum is the filter's a):
    OneCycleLR needs cycle_momentum=False, and says so itself otherwise."""
    params = _params()
    opt = cls(params)
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, cycle_momentum=False)
    gen = torch.Generator().manual_seed(4)
    lrs = []
    for _ in range(5):
        _iterate(opt, params, gen)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] != lrs[-1] and int(opt.filter_state["step"]) == 5
