"""float32, bfloat16 and float16 params against the float64 reference, one step at a time.

Each step starts the reference (tests/reference.py) from the implementation's exact current
state (upcast to float64, so both see identical inputs), runs predict + update in both, and
compares. Error model for the implementation (koala_triton/ALGORITHM.md; koala_triton/_torch_backend.py):
  * norms accumulate n <= 257 products in float32: relative error <= n·u32 (u32 = 2^-24),
    which moves every gain, and so every step c·g, by at most that factor (float64 filter);
  * the elementwise update is computed in float32 and rounded once to the param dtype, and
    KOALA-M's predict adds u in the param dtype: each rounding <= u_dtype·|value|
    (u = 2^-8 bfloat16, 2^-11 float16, 2^-24 float32);
  * KOALA-M only: the measurement sees the predicted weights x̂ already rounded to the dtype,
    so g̃ = grad + wd·x̂, ‖g̃‖² and L̃ = L + ½wd‖x̂‖² carry a relative error <= u_dtype each,
    which moves the step c·g̃ by <= 4·u_dtype·|c·g̃| (first order, with margin);
so per element |x - x_ref| <= u_dtype·(|x̂| + |u| + 2|x_ref|) + ((n + 8)·u32 + 4·u_dtype·[M])·|c·g|
(velocity alike); the filter scalars agree to (n + 8)·u32 (+ 4·u_dtype for M) relative.
"""

from __future__ import annotations

import pytest
import torch

from tests.variants import VARIANTS, variant_params

U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
U32 = 2.0 ** -24
SHAPES = [(16, 8), (8,), (), (257,), (3, 5)]
N_MAX = 257


def _setup(variant, dtype):
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]
    groups = [{"params": params[:3], "weight_decay": 0.0}, {"params": params[3:], "weight_decay": 0.02, "lr": 0.5}]
    return params, groups, variant.cls(groups)


def _reference_from(opt, params, variant):
    groups = [
        {"params": [p.detach().double() for p in g["params"]], "lr": g["lr"], "weight_decay": g["weight_decay"], "eps": g["eps"]}
        for g in opt.param_groups
    ]
    ref = variant.reference(groups)
    ref.load_filter({k: float(v) for k, v in opt.filter_state.items()})
    flat = [p for g in opt.param_groups for p in g["params"]]
    for key in variant.state_keys:
        ref.set_state(key, [opt.state[p][key] for p in flat])
    return ref


def _check(actual, expected, before, step_size, dtype, what, momentum):
    u = U[dtype]
    actual = actual.double()
    gain_error = (N_MAX + 8) * U32 + (4 * u if momentum else 0.0)
    tol = u * (before.abs() + 2 * expected.abs()) + gain_error * step_size.abs() + 1e-30
    err = (actual - expected).abs()
    worst = (err - tol).max() if err.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"{what}: error {err.max():.3e} exceeds the error-model bound (dtype {dtype})"


@pytest.mark.parametrize("dtype", list(U), ids=str)
@pytest.mark.parametrize("variant", variant_params(where=lambda v: v.global_covariance))
def test_low_precision_steps_stay_within_the_error_model(variant, dtype):
    """KOALA-V and KOALA-M (this error model is theirs); KOALA++'s per-dtype error model is in
    tests/conformance/error_model_pp.py."""
    momentum = variant.has_velocity  # the error model's KOALA-M terms: predict moves the weights
    params, groups, opt = _setup(variant, dtype)
    g = torch.Generator().manual_seed(11)
    for step in range(6):
        ref = _reference_from(opt, params, variant)
        before = [p.detach().double().clone() for p in params]
        vel_before = [opt.state[p]["velocity"].double().clone() for p in params] if momentum else None
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
        losses = torch.rand(8, generator=g) + 0.5
        opt.predict()
        ref.predict()
        predicted = [x.clone() for x in ref.params()]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step(loss=losses)
        ref.update(float(losses.double().mean()), float((losses.double() ** 2).mean()), grads)
        for i, (p, x) in enumerate(zip(params, ref.params())):
            _check(p.detach(), x, before[i] + (vel_before[i].abs() if momentum else 0), x - predicted[i], dtype,
                   f"step {step} param {i}", momentum)
        f, expected = opt.filter_state, ref.filter_values()
        for k in (*variant.covariance_keys, "R"):
            v = expected[k]
            rel = (N_MAX + 8) * U32 + (4 * U[dtype] if momentum else 0.0)
            assert abs(float(f[k]) - v) <= rel * abs(v) + 1e-300, (step, k)
        if momentum:
            flat_u = ref.state("velocity")
            for i, p in enumerate(params):
                du = flat_u[i] - vel_before[i] * ref.a
                _check(opt.state[p]["velocity"], flat_u[i], vel_before[i], du, dtype, f"step {step} velocity {i}", momentum)


@pytest.mark.parametrize("dtype", list(U), ids=str)
def test_state_and_params_keep_their_dtype(dtype):
    params, _, opt = _setup(VARIANTS["M"], dtype)
    opt.predict()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step(loss=torch.rand(4))
    assert all(p.dtype == dtype for p in params)
    assert all(opt.state[p][k].dtype == dtype for p in params for k in VARIANTS["M"].state_keys)
    assert all(v.dtype in (torch.float64, torch.int64) for v in opt.filter_state.values())
