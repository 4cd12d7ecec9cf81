"""KoalaPlusPlus (PyTorch path): parity with the authors'-style loop, and what only KOALA++ has.

Parity: ``bench/official_style.OfficialStyleKoalaPlusPlus`` runs KOALA++ as the authors'
``koalap.py`` does (dot products recomputed from the stored vectors every step, S formed from
them); it was run side by side with the real ``koalap.py`` (float64, both estimates, weight decay
0 / 5e-4 / 0.05, adaptive and fixed R, None and below-eps gradients, 25 steps) and agreed bit for
bit. Here the package runs against that loop free-running for 16 steps and must stay within the
issue's parity target, 1e-9 relative to each quantity's magnitude. Error model: both evaluate the
derived recursion in float64 and differ only in the order of operations (stored ‖h‖², h·v and
an algebraic S against recomputed dot products): a few ulps times the N ≤ 257 terms of a dot
product per step, ~3e-14 relative, carried forward by the recursion (measured: ≤ 1e-14 after 25
steps against the authors' code); the tolerance of each step's arithmetic against the 60-digit
oracle is the conformance suite's (tests/conformance/error_model_pp.py).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from koala_triton import KoalaPlusPlus
from tests.helpers import reference_grads, reference_groups, reference_params
from tests.variants import VARIANTS

PP = VARIANTS["PP"]
STEPS = 16
PARITY = 1e-9  # the issue's target: float64 steps match the authors' code to 1e-9 relative


def _close(actual, expected, what, rtol=PARITY):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=0.0, atol=rtol * scale + 1e-300,
                               msg=lambda m: f"{what}: {m}")


def _run_against_the_loop(hyper, weight_decay, steps=STEPS, fused=False):
    """Two groups (lr 0.7 / 0.4; weight decay ``weight_decay`` / 0.05)."""
    params = reference_params(torch.float64)

    def groups():
        gs = reference_groups(params)
        gs[0]["weight_decay"] = weight_decay
        return gs

    ref = PP.reference(groups(), **hyper)
    opt = KoalaPlusPlus(groups(), fused=fused, **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.predict()
        ref.predict()
        grads = reference_grads(params, step, gen, scale=0.5 + step % 3)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        losses = torch.rand(8, generator=gen, dtype=torch.float64) * 2 + 0.25
        opt.step(loss=losses)
        ref.update(float(losses.mean()), float((losses ** 2).mean()), grads)
        for i, (p, x) in enumerate(zip(params, ref.params())):
            _close(p, x, f"step {step} param {i}")
        for key in PP.state_keys:
            for i, (p, expected) in enumerate(zip(params, ref.state(key))):
                _close(opt.state[p][key], expected, f"step {step} {key} {i}")
        expected = ref.tensor_values()
        for key in PP.tensor_keys:
            for i, value in enumerate(expected[key]):
                _close(opt.tensor_filters[key][i], value, f"step {step} {key} {i}")
        _close(opt.filter_state["R"], ref.filter_values()["R"], f"step {step} R")
    return params, opt


@pytest.mark.parametrize("r", [None, 0.5], ids=["adaptive-R", "fixed-R"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd0.05"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "plain"])
def test_pytorch_path_matches_the_authors_style_loop(symmetric, weight_decay, r):
    """Two groups, skipped and absent gradients, a step without any gradient; every weight, v, h,
    per-tensor scalar and R after every step."""
    _run_against_the_loop(dict(symmetric=symmetric, r=r, sigma=0.1, q=0.1), weight_decay=weight_decay)


@pytest.mark.interpreter
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "plain"])
def test_triton_path_matches_the_authors_style_loop(monkeypatch, symmetric):
    """The Triton kernels (Triton's CPU interpreter, float64) against the same loop, 8 steps,
    at the same target: they evaluate the same float64 filter from dot products summed in
    another (fixed) order."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _run_against_the_loop(dict(symmetric=symmetric, r=None, sigma=0.1, q=0.1), weight_decay=0.05, steps=8,
                          fused=True)


def test_the_parity_comparison_sees_the_estimate():
    """The plain and the symmetric estimate give different trajectories (so the comparison above
    can fail): the plain loop against the symmetric package misses by far more than 1e-9."""
    params = reference_params(torch.float64)
    ref = PP.reference(reference_groups(params), symmetric=False)
    opt = KoalaPlusPlus(reference_groups(params), fused=False, symmetric=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = reference_grads(params, step + 1, gen)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        losses = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
        opt.step(loss=losses)
        ref.update(float(losses.mean()), float((losses ** 2).mean()), grads)
    gap = max(float((p.detach() - x).abs().max()) for p, x in zip(params, ref.params()) if p.numel())
    assert gap > 1e-4


def test_predict_does_nothing_and_skipping_it_changes_nothing():
    runs = []
    for explicit in (True, False):
        p = torch.linspace(-1, 1, 7, dtype=torch.float64).requires_grad_()
        opt = KoalaPlusPlus([p])
        for i in range(4):
            if explicit:
                before = (p.detach().clone(), {k: v.clone() for k, v in opt.tensor_filters.items()})
                opt.predict()
                assert torch.equal(p.detach(), before[0])
                assert all(torch.equal(opt.tensor_filters[k], v) for k, v in before[1].items())
            p.grad = torch.sin(torch.arange(7.0, dtype=torch.float64) * (i + 1))
            opt.step(loss=torch.tensor([0.5, 1.5], dtype=torch.float64))
        runs.append((p.detach().clone(), opt.state[p]["v"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_a_skipped_tensor_keeps_its_state_bit_for_bit():
    a, b = torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = KoalaPlusPlus([a, b], eps=1e-3)
    for step in range(3):
        a.grad = torch.randn(5, dtype=torch.float64) if step != 1 else torch.full((5,), 1e-5, dtype=torch.float64)
        b.grad = torch.randn(3, dtype=torch.float64)
        before = {k: opt.state[a][k].clone() for k in PP.state_keys}, opt._tensors[0].clone(), a.detach().clone()
        opt.step(loss=torch.rand(4, dtype=torch.float64) + 0.5)
        if step == 1:  # ‖grad‖ = 2.2e-5 < eps
            assert all(torch.equal(opt.state[a][k], v) for k, v in before[0].items())
            assert torch.equal(opt._tensors[0], before[1]) and torch.equal(a.detach(), before[2])
    assert [int(u) for u in opt.tensor_filters["updates"]] == [2, 3]


def test_training_reduces_the_loss():
    """The regression of test_protocol in 40 steps. (KOALA++'s surrogate is not kept positive
    semi-definite: on this full-batch problem, once the loss is near 0, h·v turns negative, S
    approaches 0 and a step overshoots around step 55, in the authors' code as here; hence 40.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = x[:, :1] - 2 * x[:, 1:2]

    def losses():
        return ((model(x) - y) ** 2).squeeze(1)

    opt = KoalaPlusPlus(model.parameters())
    first = float(losses().mean().detach())
    for _ in range(40):
        opt.predict()
        out = losses()
        opt.zero_grad()
        out.mean().backward()
        opt.step(loss=out.detach())
    assert float(losses().mean().detach()) < 0.2 * first


def test_tensor_filters_are_float64_per_tensor_and_grow_with_param_groups():
    a = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    opt = KoalaPlusPlus([a])
    assert set(opt.tensor_filters) == set(PP.tensor_keys)
    assert all(v.dtype == torch.float64 and v.shape == (1,) for v in opt.tensor_filters.values())
    a.grad = torch.ones(3, dtype=torch.bfloat16)
    opt.step(loss=torch.rand(4))
    s_before = opt.tensor_filters["S"].clone()
    b = torch.ones(2, requires_grad=True)
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert opt.tensor_filters["S"].shape == (2,)
    assert float(opt.tensor_filters["S"][0]) == float(s_before[0]) and float(opt.tensor_filters["updates"][1]) == 0
    b.grad = torch.ones(2)
    opt.step(loss=torch.rand(4))
    assert [int(u) for u in opt.tensor_filters["updates"]] == [2, 1]


def test_checkpoint_keeps_float64_tensor_filters_and_refuses_another_model():
    p = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    opt = KoalaPlusPlus([p])
    p.grad = torch.randn(4).to(torch.bfloat16)
    opt.step(loss=torch.tensor([0.3, 0.7]))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = KoalaPlusPlus([p.detach().clone().requires_grad_()])
    opt2.load_state_dict(copy.deepcopy(sd))
    for k in PP.tensor_keys:
        assert torch.equal(opt2.tensor_filters[k], opt.tensor_filters[k])  # not rounded to bfloat16
    assert float(opt.tensor_filters["S"][0]) != float(opt.tensor_filters["S"][0].to(torch.bfloat16))
    with pytest.raises(ValueError, match="per-tensor filters"):
        KoalaPlusPlus([torch.zeros(4, requires_grad=True), torch.zeros(2, requires_grad=True)]).load_state_dict(sd)


@pytest.mark.parametrize("kwargs, name", [
    ({"sigma": -0.1}, "sigma"), ({"q": -1.0}, "q"), ({"q": float("nan")}, "q"), ({"r": -0.5}, "r"),
    ({"alpha_r": 1.0}, "alpha_r"), ({"weight_decay": -1e-4}, "weight_decay"), ({"eps": -1.0}, "eps"),
    ({"lr": -1.0}, "lr"), ({"loss_floor": float("inf")}, "loss_floor"),
])
def test_bad_hyperparameter_raises_value_error_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        KoalaPlusPlus([torch.zeros(3, requires_grad=True)], **kwargs)


def test_symmetric_must_be_a_bool_and_filter_settings_are_global():
    with pytest.raises(TypeError, match="symmetric"):
        KoalaPlusPlus([torch.zeros(3, requires_grad=True)], symmetric=1)
    with pytest.raises(ValueError, match="sigma"):
        KoalaPlusPlus([{"params": [torch.zeros(3, requires_grad=True)], "sigma": 0.5}])
