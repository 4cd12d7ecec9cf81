"""The CUDA launch path, without a GPU: real optimizer steps on CPU tensors launch through
``JITFunction.run`` and the direct launches of ``kernels/direct.py`` into a stand-in driver for an
sm_90 device (``tests/dry_launch.py``). Kernels are compiled to cubins with ptxas; nothing
executes, so these tests check what reaches the launcher, not what the kernels compute (the
interpreter tests do that).

The GPU twin is ``tests/test_triton_gpu.py``, which runs the same steps on a real device.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from koala_triton import KoalaM, KoalaV  # noqa: E402
from koala_triton.kernels import direct  # noqa: E402
from tests import dry_launch  # noqa: E402
from tests.variants import case_params  # noqa: E402

_reason = dry_launch.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

#: Every variant in every mode (ids V, V-fixed-r, M, M-fold).
CASES = case_params()


@pytest.fixture
def dry(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # only so that fused=True accepts CPU tensors
    with dry_launch.dry_cuda(monkeypatch) as recorder:
        yield recorder


def _params(dtype, n=12):
    """Sizes below, at and above one CUDA chunk (16,384), a 0-dim and an empty tensor, two groups."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (0,), (3,), (64, 3, 3), (16384,), (16385,), (40000,), (7, 5)] + [(33,)] * (n - 8)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    return [{"params": params[:5]}, {"params": params[5:], "weight_decay": 0.01}], params


def _iterate(opt, params, gen, loss_form):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.predict()
    if loss_form == "per-sample":
        opt.step(loss=torch.rand(16, generator=gen))
    elif loss_form == "bf16-per-sample":
        opt.step(loss=torch.rand(16, generator=gen).to(torch.bfloat16))
    elif loss_form == "misaligned-per-sample":  # a view 4 bytes into its storage
        opt.step(loss=torch.rand(17, generator=gen)[1:])
    elif loss_form == "fp64-per-sample":
        opt.step(loss=torch.rand(16, generator=gen, dtype=torch.float64))
    else:
        loss = torch.rand(16, generator=gen, dtype=torch.float64)
        opt.step(loss=loss.mean(), loss_var=(loss * loss).mean())


@pytest.mark.parametrize("loss_form", ["per-sample", "bf16-per-sample", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("case", CASES)
def test_steps_compile_for_sm90_once_and_launch_a_fixed_number_of_kernels(dry, case, dtype, loss_form):
    """Every launch binds and compiles for sm_90 with the arguments the optimizer really passes;
    the first iteration compiles each kernel variant it needs and later ones compile nothing;
    launches per iteration are the design's (NOTES.md); no kernel spills to local memory."""
    cls, kwargs, expected = case.cls, case.kwargs, case.launches
    groups, params = _params(dtype)
    opt = cls(groups, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    compiled, per_iteration = [], []
    for _ in range(4):
        before = len(dry.launches)
        _iterate(opt, params, gen, loss_form)
        per_iteration.append(len(dry.launches) - before)
        compiled.append(sum(len(v) for v in dry.loaded.values()))
    # fold mode's first predict is a separate pass (later ones are folded into the update)
    first = expected + 1 if case.fold else expected
    assert per_iteration == [first] + [expected] * 3, per_iteration
    assert compiled[0] >= 3 and compiled[1:] == [compiled[1]] * 3, f"kernels compiled after each iteration: {compiled}"
    assert compiled[1] - compiled[0] <= 1 if case.fold else compiled[1] == compiled[0]
    for name, cubins in dry.loaded.items():
        for cubin in cubins:
            usage = dry_launch.resource_usage(cubin)
            if not usage:
                pytest.skip("cuobjdump is not available to read the cubins")
            assert usage.get("local", 0) == 0, f"{name} spills: {usage}"
            if name != "filter_kernel":  # the one-program float64 filter may call subroutines
                assert usage.get("stack", 0) == 0, f"{name} uses a stack frame: {usage}"
                assert usage["registers"] <= 128, f"{name}: {usage}"  # >= 4 warps' occupancy


@pytest.mark.parametrize("case", CASES)
def test_direct_launches_pass_exactly_what_triton_dispatch_passes(dry, monkeypatch, case):
    """Each launch is made twice: through ``JITFunction.run`` (direct launches off) and then
    directly; both must reach the launcher with the same compiled variant, grid and arguments.
    After the first iteration every launch is a direct one."""
    pairs = []
    real = direct.launch

    def both(fn, jit, grid, kwargs):
        monkeypatch.setattr(direct, "ENABLED", False)
        real(fn, jit, grid, kwargs)
        monkeypatch.setattr(direct, "ENABLED", True)
        before = dict(direct.STATS)
        real(fn, jit, grid, kwargs)
        pairs.append((dry.launches[-2], dry.launches[-1], direct.STATS["direct"] - before["direct"]))

    monkeypatch.setattr(direct, "launch", both)
    cls, kwargs, expected = case.cls, case.kwargs, case.launches
    groups, params = _params(torch.float32)
    opt = cls(groups, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(2)
    # loss forms that differ from a neighbour in one thing only: the loss's dtype (fp32 / bf16
    # vector), its address alignment (fp32 vector / the same 4 bytes in), its shape alone
    # (fp64 scalar / fp64 vector)
    forms = ["misaligned-per-sample", "per-sample", "bf16-per-sample", "scalar", "fp64-per-sample"]
    for step in range(2 * len(forms)):
        start = len(pairs)
        _iterate(opt, params, gen, forms[step % len(forms)])
        if step >= len(forms):  # every form seen once: every launch is direct
            assert [d for _, _, d in pairs[start:]] == [1] * (len(pairs) - start)
    assert len(pairs) >= 2 * len(forms) * expected
    for dispatched, direct_launch, _ in pairs:
        assert direct_launch.kernel == dispatched.kernel and direct_launch.compiled == dispatched.compiled
        assert direct_launch.grid == dispatched.grid
        assert len(direct_launch.args) == len(dispatched.args)
        for a, b in zip(dispatched.args, direct_launch.args):
            assert a is b or (type(a) is type(b) and a == b), (dispatched.kernel, a, b)


def test_direct_launches_can_be_turned_off(dry, monkeypatch):
    monkeypatch.setattr(direct, "ENABLED", False)
    groups, params = _params(torch.float32)
    opt = KoalaM(groups, fused=True)
    before = dict(direct.STATS)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        _iterate(opt, params, gen, "per-sample")
    assert direct.STATS["direct"] == before["direct"]
    assert direct.STATS["dispatched"] - before["dispatched"] == 12


def test_direct_launches_are_kept_per_device(dry):
    """A kernel compiled (and loaded) for one device is never launched directly on another."""
    groups, params = _params(torch.float32)
    opt = KoalaV(groups, fused=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        _iterate(opt, params, gen, "per-sample")
    driver = dry_launch._driver_config.active
    before = dict(direct.STATS)
    driver.set_current_device(1)
    try:
        _iterate(opt, params, gen, "per-sample")
    finally:
        driver.set_current_device(0)
    assert direct.STATS["direct"] == before["direct"]
    assert direct.STATS["dispatched"] - before["dispatched"] == 3


def _step(opt, params, gen, grads: bool):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if grads else None
    opt.predict()
    opt.step(loss=torch.rand(8, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES)
def test_steps_without_any_gradient_compile_and_launch(dry, case, dtype):
    """A step in which no parameter has a gradient (a frozen phase, a skipped backward) runs
    the filter kernel with no tensor to measure: its stand-in arguments must have the real
    ones' types (a float64 stand-in for the int64 slot table made a loop bound fp64).
    First step, and after gradient steps (tables and kernels already built)."""
    cls, kwargs = case.cls, case.kwargs
    groups, params = _params(dtype)
    opt = cls(groups, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(5)
    for grads in (False, True, False, True, False):
        before = len(dry.launches)
        _step(opt, params, gen, grads)
        assert len(dry.launches) > before


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "1", "1x1"])
@pytest.mark.parametrize("case", CASES)
def test_models_of_one_element_compile_and_launch(dry, case, shape):
    """All parameters together hold one element: compiled Triton turns every integer argument
    equal to 1 (the element count, the number of tensors) into a compile-time constant."""
    cls, kwargs, expected = case.cls, case.kwargs, case.launches
    params = [torch.randn(shape).requires_grad_()]
    opt = cls(params, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(6)
    per_iteration = []
    for _ in range(3):
        before = len(dry.launches)
        _step(opt, params, gen, grads=True)
        per_iteration.append(len(dry.launches) - before)
    assert per_iteration[1:] == [expected, expected]


@pytest.mark.parametrize("case", CASES)
def test_float_arguments_reach_the_kernels_in_float64(dry, case):
    """Compiled Triton passes an undeclared Python float argument as fp32 (the interpreter
    keeps the double): every float scalar parameter of every compiled kernel must be declared
    fp64, or float64 parameters would step with fp32(0.9) and fp32(0.1)."""
    cls, kwargs = case.cls, case.kwargs
    groups, params = _params(torch.float64)
    opt = cls(groups, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        _iterate(opt, params, gen, "per-sample")
    opt.predict()  # fold mode: a second predict before the update runs the deferred predict pass
    _iterate(opt, params, gen, "per-sample")
    scalars = {}
    for name, signatures in dry.signatures.items():
        for signature in signatures:
            for param, ty in signature.items():
                if isinstance(ty, str) and not ty.startswith("*") and ty.startswith(("fp", "bf")):
                    scalars.setdefault(name, set()).add((param, ty))
    assert scalars, "no compiled kernel took a float scalar (the test lost its subject)"
    wrong = {name: sorted(p for p in found if p[1] != "fp64") for name, found in scalars.items()}
    assert not any(wrong.values()), f"float scalar parameters compiled as non-fp64: {wrong}"


def test_direct_launches_only_on_the_triton_versions_whose_launcher_was_checked():
    """The launcher is called positionally: a Triton release whose launcher takes other
    arguments would read an integer as an address. Unchecked releases (older or newer) and
    ``KOALA_TRITON_DIRECT_LAUNCH=0`` dispatch every launch through ``JITFunction.run``."""
    for version in ("3.6.0", "3.7.1", "3.8.0", "3.9.0", "3.9.1+git1234"):
        assert direct.enabled_for(version, None)
        assert direct.enabled_for(version, "1")
        assert not direct.enabled_for(version, "0")
        assert not direct.enabled_for(version, None, has_knobs=False)
    for version in ("3.4.0", "3.5.1", "3.10.0", "4.0.0", "main", ""):
        assert not direct.enabled_for(version, None), version
    import triton

    major_minor = tuple(int(v) for v in triton.__version__.split(".")[:2])
    assert direct.ENABLED == (major_minor in direct.CHECKED_VERSIONS and
                              __import__("os").environ.get("KOALA_TRITON_DIRECT_LAUNCH") != "0")


def test_a_compiled_kernel_whose_signature_is_not_the_kernels_parameters_is_never_launched_directly(dry, monkeypatch):
    """A compiled kernel is launched directly only if its signature (what its launcher was
    generated from) lists exactly the kernel's parameters in order; here every kernel seems to
    have one parameter more than its compiled form, so every launch is dispatched."""
    if not direct.ENABLED:
        pytest.skip(f"direct launches are off with this triton ({__import__('triton').__version__})")
    real = direct._parameter_names
    monkeypatch.setattr(direct, "_parameter_names", lambda fn: real(fn) + ["an_extra_argument"])
    groups, params = _params(torch.float32)
    opt = KoalaV(groups, fused=True)
    gen = torch.Generator().manual_seed(8)
    before = dict(direct.STATS)
    for _ in range(3):
        _iterate(opt, params, gen, "per-sample")
    assert direct.STATS["direct"] == before["direct"]
    assert direct.STATS["dispatched"] - before["dispatched"] == 9
