"""The Triton path against the PyTorch path, on CPU tensors under Triton's interpreter.

``fused=True`` on CPU parameters runs the real kernels in ``TRITON_INTERPRET=1`` mode (set per
test with monkeypatch; the kernels pick the interpreter by device, so CUDA tests in the same
session are unaffected). Block sizes are the interpreter's small fixed ones
(``kernels/launch.py``: 64-element tiles, 128-element chunks), so the small tensors here cover
full tiles, masked tails and tensors spanning several chunks.

Every scratch buffer the kernels must write (per-chunk partials, gains, distance partials) is
filled with NaN before each use (``poisoned_scratch``): a slot a kernel forgot to write turns
the step into a skipped one, which the comparison catches.

Tolerances (the error model, per dtype):
- float32: both paths compute the same fp32 elementwise expressions; only the order of the
  norm accumulation differs (fp32 partials per chunk then float64 here, torch's foreach norm
  there), so gains differ by ~1e-7 relative and weights by a few fp32 ulps per step. Over 15
  steps 1e-5 relative to each tensor's magnitude leaves a margin of ~10x; a wrong gain, a
  missed or doubly-updated tensor moves values by > 1e-3.
- bfloat16 / float16: both paths round x − c·d (computed in fp32) once to the storage type.
  With gains equal to ~1e-6 relative the rounded results are identical except where the fp32
  value lies within ~1e-6 of a rounding boundary: then they differ by one ulp (2^-8 relative
  for bf16, 2^-11 for fp16). Such a flip then perturbs later steps' norms by O(ulp/sqrt(n)).
  The flip persists as an absolute offset while the value itself may shrink (KOALA's first
  steps are large), so the bound is in ulps of the tensor's largest magnitude along the
  trajectory: every element within 2 ulps of it per step taken, and at least 99% of all
  elements of each array (weights, velocities, xavg) bitwise equal at the end (measured: all
  weights and velocities, and all but a handful of xavg elements; a missed or wrong update
  changes nearly every element of a tensor). One known difference is modelled rather than
  tolerated: the interpreter's fp32->bf16 conversion truncates where the GPU rounds to
  nearest even (``round_bf16_like_the_gpu``).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytest.importorskip("triton")

from koala_triton import KoalaM, KoalaV  # noqa: E402
from koala_triton import _triton_backend  # noqa: E402
from koala_triton.kernels import tables as _tables  # noqa: E402
from tests.helpers import (  # noqa: E402
    ULP,
    assert_close_scaled,
    assert_state_close_scaled,
    assign,
    check_one_element_model,
    clone_params,
    compare_states,
    grads_for_step,
    groups,
    losses_for_step,
    magnitude,
    make_params,
    round_bf16_like_the_gpu,
    run_pair,
)
from tests.variants import VARIANTS, case_params, variant_params  # noqa: E402

pytestmark = pytest.mark.interpreter

STEPS = 15
#: The real scratch-buffer getter (``poisoned_scratch`` wraps it with a NaN fill per use).
_UNPOISONED_BUFFER = _triton_backend._buffer


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    round_bf16_like_the_gpu(monkeypatch)


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    """Every scratch buffer handed to a kernel is NaN until the kernel writes it."""
    original = _triton_backend._buffer

    def poisoned(cache, name, numel, dtype, device):
        buf = original(cache, name, numel, dtype, device)
        buf.fill_(float("nan"))
        return buf

    monkeypatch.setattr(_triton_backend, "_buffer", poisoned)


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("variant", variant_params())
def test_float32_matches_pytorch_path_on_152_awkward_tensors_over_15_steps(variant):
    def check(step, ref, tri, rp, tp):
        compare_states(ref, tri, rp, tp, 1e-5, f"step {step}")

    ref, tri, _, _ = run_pair(variant.case(), torch.float32, 152, STEPS, per_step=check)
    f = tri.filter_state
    assert int(f["step"]) == STEPS and int(f["skipped_steps"]) == 2  # the NaN grad and the inf loss


def test_fold_mode_matches_pytorch_path_on_152_awkward_tensors_over_10_steps():
    a = 0.9

    def check(step, ref, tri, rp, tp):
        # after the update: the reference holds the posterior, fold mode the next prediction
        with tri.posterior_weights():
            for i, (x, y) in enumerate(zip(rp, tp)):
                assert_close_scaled(y, x, 1e-5, f"step {step}: posterior param {i}")
        u_scale = magnitude(ref.state[x]["velocity"] for x in rp)
        for i, (x, y) in enumerate(zip(rp, tp)):
            assert_close_scaled(tri.state[y]["velocity"], ref.state[x]["velocity"], 1e-5, f"step {step}: u {i}", u_scale)
            assert_close_scaled(tri.state[y]["xavg"], ref.state[x]["xavg"], 1e-5, f"step {step}: xavg {i}")
            # the fold already predicted: x = x⁺ + u⁺
            expected = (x.detach().double() + ref.state[x]["velocity"].double()).float()
            assert_close_scaled(y, expected, 1e-5, f"step {step}: predicted param {i}")
        # and the filter already holds the next prior (compare against a predicted copy)
        shadow = {k: v.clone() for k, v in ref.filter_state.items()}
        numel = sum(p.numel() for p in rp)
        dist = math.sqrt(sum(float(((ref.state[p]["xavg"].double() - p.detach().double()) ** 2).sum()) for p in rp)) / numel
        qx = float(shadow["qx"]) * 0.9 + (1.0 - 0.9) * dist
        pxx, pxu, puu = (float(shadow[k]) for k in ("Pxx", "Pxu", "Puu"))
        prior = {"qx": qx, "Pxx": pxx + 2 * pxu + puu + qx, "Pxu": a * (pxu + puu), "Puu": a * a * puu + 1e-2}
        for key, value in prior.items():
            assert float(tri.filter_state[key]) == pytest.approx(value, rel=1e-5), f"step {step}: prior {key}"

    run_pair(VARIANTS["M"].case("fold"), torch.float32, 152, 10, per_step=check)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", variant_params())
def test_low_precision_matches_pytorch_path_within_the_rounding_error_model(variant, dtype):
    steps = 5
    largest: dict[int, float] = {}  # per tensor, the largest magnitude along the trajectory

    def track(step, ref, tri, rp, tp):
        for i, a in enumerate(rp):
            largest[i] = max(largest.get(i, 0.0), magnitude([a]))

    ref, tri, rp, tp = run_pair(variant.case(), dtype, 152, steps, per_step=track)
    tol = 2 * steps * ULP[dtype]
    for i, (a, b) in enumerate(zip(rp, tp)):
        assert b.dtype == dtype
        # a flip is one ulp of the magnitude the element had when it happened
        assert_close_scaled(b, a, tol, f"param {i}", largest[i])
    assert_state_close_scaled(ref, tri, rp, tp, tol)
    kinds = {"param": (rp, tp)}
    for key in variant.state_keys:
        kinds[key] = ([ref.state[x][key] for x in rp], [tri.state[y][key] for y in tp])
    for kind, (expected, actual) in kinds.items():
        equal = sum(int((a == b).sum()) for a, b in zip(expected, actual))
        total = sum(a.numel() for a in expected)
        assert equal >= 0.99 * total, f"{kind}: only {equal}/{total} elements bitwise equal"
    for key, value in ref.filter_state.items():
        torch.testing.assert_close(tri.filter_state[key].double(), value.double(), rtol=tol, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant, options", [
    (VARIANTS["V"], {"r": 0.5}),
    (VARIANTS["V"], {"raw_grad_step": True}),
    (VARIANTS["M"], {"r": 0.25, "a": 0.5}),
], ids=["V-fixed-R", "V-raw-grad-step", "M-fixed-R-a0.5"])
def test_options_match_pytorch_path(variant, options, dtype):
    rtol = 1e-12 if dtype == torch.float64 else 1e-5

    def check(step, ref, tri, rp, tp):
        compare_states(ref, tri, rp, tp, rtol, f"step {step}")

    run_pair(variant.case(), dtype, 16, 6, per_step=check, **options)


def test_mixed_dtypes_launch_once_per_dtype_and_match():
    ref_params = make_params(30, torch.float32, odd_layouts=False)
    ref_params[3:10] = [p.detach().to(torch.bfloat16).requires_grad_() for p in ref_params[3:10]]
    tri_params = clone_params(ref_params)
    ref, tri = KoalaM(groups(ref_params), fused=False), KoalaM(groups(tri_params), fused=True)
    gen = torch.Generator().manual_seed(3)
    counter = LaunchCounter()
    for step in range(3):
        with counter.counting():
            tri.predict()
        ref.predict()
        grads = grads_for_step(ref_params, step, gen, torch.float32)
        grads = [None if g is None else g.to(p.dtype) for g, p in zip(grads, ref_params)]
        assign(ref_params, grads)
        assign(tri_params, grads)
        loss = losses_for_step(step, gen)
        ref.step(loss=loss)
        with counter.counting():
            tri.step(loss=loss)
    # two dtypes: predict 2 + norms 2 + filter 1 + update 2 per iteration
    assert counter.per_call[-2:] == [2, 5]
    for i, (a, b) in enumerate(zip(ref_params, tri_params)):
        tol = 2 * 3 * ULP[a.dtype] if a.dtype != torch.float32 else 1e-5
        assert_close_scaled(b, a, tol, f"param {i} {a.dtype}")


# ----------------------------------------------------------------------- launch counts
class LaunchCounter:
    """Counts all device work of a scope: Triton launches and torch ops that would be kernels.

    Method: ``_triton_backend.launch`` is wrapped to count each launch, and the launch itself runs
    with every dispatch mode disabled, so the tensor work Triton's interpreter does on the host
    is not counted. Everything else our code issues inside the scope goes through an aten
    ``TorchDispatchMode``, which records each op; ops that never launch a device kernel on a
    GPU (views and metadata: ``detach``, ``alias``, ``view``; ``lift_fresh``, the host-side
    tensor of a ``torch.tensor(...)`` literal; ``empty`` allocations; profiler annotations)
    are left out of ``torch_per_call`` (``torch_ops`` keeps the names of all of them).
    """

    #: aten ops that do not run a device kernel on a GPU.
    NO_KERNEL = ("aten.detach.", "aten.alias.", "aten.view.", "aten.lift_fresh.", "aten.empty.",
                 "aten.empty_strided.", "profiler.")

    def __init__(self):
        self.per_call: list[int] = []
        self.torch_per_call: list[int] = []
        self.torch_ops: list[list[str]] = []

    def counting(self):
        import contextlib

        from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

        counter = self

        class AtenCounter(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops: list[str] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        @contextlib.contextmanager
        def scope():
            original = _triton_backend.launch
            launches = [0]

            def counted(*args, **kwargs):
                launches[0] += 1
                with _disable_current_modes():  # the interpreter's own tensor work is not ours
                    return original(*args, **kwargs)

            _triton_backend.launch = counted
            mode = AtenCounter()
            try:
                with mode:
                    yield
            finally:
                _triton_backend.launch = original
                counter.per_call.append(launches[0])
                counter.torch_ops.append(mode.ops)
                counter.torch_per_call.append(sum(not op.startswith(self.NO_KERNEL) for op in mode.ops))

        return scope()


def _steady_state_counts(cls, n, **kwargs):
    """(Triton launches, kernel-launching torch ops) of one iteration, predict() + step().

    Grads keep their storage (filled in place outside the counted scope), as in a training
    loop with ``zero_grad(set_to_none=False)`` or a CUDA graph: otherwise the pointer tables
    are rebuilt and uploaded (three host-to-device copies per table on a GPU)."""
    params = [torch.randn((i % 5) + 1, requires_grad=True) for i in range(n)]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = cls(params, fused=True, **kwargs)
    counter = LaunchCounter()
    per_iteration = []
    for step in range(3):  # the first iteration builds the tables; count a later one
        for p in params:
            p.grad.copy_(torch.randn_like(p))
        loss = torch.rand(4)
        with counter.counting():
            opt.predict()
            opt.step(loss=loss)
        per_iteration.append((counter.per_call[-1], counter.torch_per_call[-1]))
    return per_iteration[-1], counter.torch_ops[-1]


@pytest.mark.parametrize("case", case_params(rename={"V-fixed-r": "V-r"}))
def test_launches_per_step_do_not_depend_on_the_number_of_tensors(case, monkeypatch):
    """All device work of one iteration: V 3 launches (norms, filter, update; predict is
    counted on the host, the loss moments are taken in the filter kernel), M 4 (predict;
    norms, filter, update), M-fold 3, and no torch op that would launch a device kernel.
    (The test-only NaN poisoning of scratch buffers, a fill per use, is switched off here.)"""
    monkeypatch.setattr(_triton_backend, "_buffer", _UNPOISONED_BUFFER)
    few, ops = _steady_state_counts(case.cls, 20, **case.kwargs)
    many, _ = _steady_state_counts(case.cls, 160, **case.kwargs)
    assert few == many, f"(triton launches, torch kernels) per iteration: 20 tensors {few}, 160 tensors {many}"
    assert few == (case.launches, 0), f"(triton launches, torch kernels) = {few}; torch ops: {ops}"


def test_tables_are_cached_while_storages_are_stable(monkeypatch):
    """The CPU twin of graph capture's precondition: with grads updated in place
    (``zero_grad(set_to_none=False)``) and lr as a tensor, a warmed-up step uploads nothing,
    and changing the lr tensor in place changes the step like a fresh optimizer would."""
    uploads = []
    original = _tables._upload
    monkeypatch.setattr(_tables, "_upload", lambda *a, **k: uploads.append(1) or original(*a, **k))
    params = make_params(20, torch.float32, odd_layouts=False)
    ref_params = clone_params(params)
    lr = torch.tensor(0.5, dtype=torch.float64)
    opt = KoalaM(params, lr=lr, fused=True)
    ref = KoalaM(ref_params, lr=0.5, fused=False)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.zeros_like(p)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, q, g in zip(params, ref_params, grads):
            p.grad.copy_(g)  # static storage
            q.grad = g.clone()
        if step == 1:
            uploads.clear()
        if step == 2:
            lr.fill_(0.25)  # in place: a captured graph would see it
            ref.param_groups[0]["lr"] = 0.25
        loss = torch.rand(4, generator=gen)
        opt.predict()
        ref.predict()
        opt.step(loss=loss)
        ref.step(loss=loss)
    assert uploads == [], "a table was rebuilt although no storage moved"
    for a, b in zip(ref_params, params):
        assert_close_scaled(b, a, 1e-5, "param")


def test_no_host_reads_inside_predict_and_step(monkeypatch):
    """The CPU twin of ``torch.cuda.set_sync_debug_mode("error")``: outside the kernel launches
    (the interpreter itself reads memory on the host) no device value is read on the host."""
    params = make_params(20, torch.float32)
    opt = KoalaM(groups(params), fused=True)
    names = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]
    original_launch = _triton_backend.launch

    def boom(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} inside a step")
        return raiser

    saved = {name: getattr(torch.Tensor, name) for name in names}

    def launch_with_reads_allowed(*args, **kwargs):
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        try:
            return original_launch(*args, **kwargs)
        finally:
            for name in names:
                setattr(torch.Tensor, name, boom(name))

    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = grads_for_step(params, step, gen, torch.float32)
        with monkeypatch.context() as m:
            m.setattr(_triton_backend, "launch", launch_with_reads_allowed)
            for name in names:
                m.setattr(torch.Tensor, name, boom(name))
            opt.predict()
            assign(params, grads)
            opt.step(loss=torch.rand(4, generator=gen))
    assert int(opt.filter_state["step"]) == 3


# ----------------------------------------------------------------------- protocol details
def test_filter_state_read_between_predict_and_update_shows_the_prior():
    params = make_params(20, torch.float32, odd_layouts=False)
    ref_params = clone_params(params)
    tri, ref = KoalaM(params, fused=True), KoalaM(ref_params, fused=False)
    for step in range(2):
        tri.predict()
        ref.predict()
        for key, value in ref.filter_state.items():
            torch.testing.assert_close(tri.filter_state[key], value, rtol=1e-6, atol=0.0)
        # reading again applies nothing twice (the pending flag lives on the device)
        for key, value in ref.filter_state.items():
            torch.testing.assert_close(tri.filter_state[key], value, rtol=1e-6, atol=0.0)
        for p, q in zip(params, ref_params):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        loss = torch.rand(4)
        tri.step(loss=loss)
        ref.step(loss=loss)
    for key, value in ref.filter_state.items():
        torch.testing.assert_close(tri.filter_state[key], value, rtol=1e-6, atol=0.0)


def test_predict_twice_and_step_without_predict_match_pytorch_path():
    params = make_params(20, torch.float32, odd_layouts=False)
    ref_params = clone_params(params)
    tri, ref = KoalaM(params, fused=True), KoalaM(ref_params, fused=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 1:
            tri.predict()
            ref.predict()
        if step != 2:  # step 2: the implicit predict of step()
            tri.predict()
            ref.predict()
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()
        loss = torch.rand(4, generator=gen)
        with pytest.warns(UserWarning) if step == 2 else contextlib.nullcontext():
            tri.step(loss=loss)
        with pytest.warns(UserWarning) if step == 2 else contextlib.nullcontext():
            ref.step(loss=loss)
    compare_states(ref, tri, ref_params, params, 1e-5, "end")


def test_state_dict_round_trip_resumes_like_the_uninterrupted_run(tmp_path):
    def build(params):
        return KoalaM(groups(params), fused=True)

    params = make_params(12, torch.float32, odd_layouts=False)
    twin = clone_params(params)
    opt, other = build(params), build(twin)
    gen = torch.Generator().manual_seed(0)
    schedule = [([torch.randn(p.shape, generator=gen) for p in params], torch.rand(4, generator=gen)) for _ in range(4)]

    def one(o, ps, grads, loss):
        o.predict()
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step(loss=loss)

    for grads, loss in schedule[:2]:
        one(opt, params, grads, loss)
        one(other, twin, grads, loss)
    torch.save(other.state_dict(), tmp_path / "ckpt.pt")
    resumed = build(twin)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for grads, loss in schedule[2:]:
        one(opt, params, grads, loss)
        one(resumed, twin, grads, loss)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)  # same kernels, same order: bitwise
    for key, value in opt.filter_state.items():
        assert torch.equal(resumed.filter_state[key], value)


LOSS_FORMS = {
    "fp32-vector": lambda l: dict(loss=l),
    "fp64-vector": lambda l: dict(loss=l.double()),
    "bf16-vector": lambda l: dict(loss=l.bfloat16()),
    "strided-vector": lambda l: dict(loss=torch.stack([l, -l], 1)[:, 0]),
    "one-sample": lambda l: dict(loss=l[:1]),
    "scalar-tensors": lambda l: dict(loss=l.mean(), loss_var=(l * l).mean()),
    "fp16-scalar-tensors": lambda l: dict(loss=l.mean().half(), loss_var=(l * l).mean().half()),
    "floats": lambda l: dict(loss=float(l.mean()), loss_var=float((l * l).mean())),
    "non-finite": lambda l: dict(loss=torch.cat([l[:-1], torch.tensor([float("nan")])])),
}


@pytest.mark.parametrize("form", list(LOSS_FORMS))
@pytest.mark.parametrize("case", case_params(("default", "fixed-r"), rename={"V-fixed-r": "V-r"}))
def test_loss_forms_match_pytorch_path(case, form):
    """The Triton filter kernel takes the loss moments itself (any float dtype, strided,
    scalar or per-sample); the PyTorch path converts to float64 and uses torch's mean."""
    params = make_params(6, torch.float32, odd_layouts=False)
    ref_params = clone_params(params)
    kwargs = case.kwargs_with(r=0.3)  # fixed R = 0.3
    tri, ref = case.cls(params, fused=True, **kwargs), case.cls(ref_params, fused=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        tri.predict()
        ref.predict()
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()
        loss = torch.rand(5, generator=gen) + 0.5
        tri.step(**LOSS_FORMS[form](loss))
        ref.step(**LOSS_FORMS[form](loss.clone()))
    compare_states(ref, tri, ref_params, params, 1e-5, form)
    assert int(tri.filter_state["skipped_steps"]) == (3 if form == "non-finite" else 0)


def test_koala_v_predict_is_deferred_and_shown_before_the_update(tmp_path):
    """KOALA-V's predict launches nothing on the Triton path; the filter kernel adds q (bit for
    bit the PyTorch path's p += q), once however often predict() is called before the update
    (it is idempotent within an iteration), and filter_state / state_dict show p̂ between
    predict() and the update."""
    params = make_params(8, torch.float32, odd_layouts=False)
    ref_params = clone_params(params)
    tri, ref = KoalaV(params, fused=True, q=0.3), KoalaV(ref_params, fused=False, q=0.3)
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        repeats = {1: 2, 2: 0, 3: 3}.get(step, 1)  # predict twice, implicit predict, three times
        expected = tri.filter_state["p"].clone()
        for _ in range(repeats):
            tri.predict()
            ref.predict()
        if repeats:
            expected += 0.3
        if step in (0, 3):  # read between predict and update: p̂, exactly
            assert torch.equal(tri.filter_state["p"], expected)
            assert torch.equal(tri.filter_state["p"], expected)  # nothing added twice
            torch.testing.assert_close(tri.filter_state["p"], ref.filter_state["p"], rtol=1e-6, atol=0.0)
        if step == 1:
            torch.save(tri.state_dict(), tmp_path / "v.pt")
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()
        loss = torch.rand(4, generator=gen)
        tri.step(loss=loss)
        ref.step(loss=loss)
    compare_states(ref, tri, ref_params, params, 1e-5, "V")
    saved = torch.load(tmp_path / "v.pt")
    assert saved["koala"]["predicted"] is True
    fresh = KoalaV(clone_params(params), fused=True, q=0.3)
    fresh.predict()  # dropped by the load: the checkpoint's p already holds its predicts
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.filter_state["p"], saved["koala"]["filter"]["p"])


def test_fold_mode_needs_the_triton_path_and_checkpoints_stay_in_their_mode(monkeypatch):
    p = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError, match="fold_predict"):
        KoalaM(p, fused=False, fold_predict=True)
    fold = KoalaM(p, fused=True, fold_predict=True)
    fold.predict()
    p[0].grad = torch.ones(3)
    fold.step(loss=torch.rand(4))
    state = fold.state_dict()
    with pytest.raises(ValueError, match="fold_predict=True"):
        KoalaM([torch.randn(3, requires_grad=True)], fused=True).load_state_dict(state)
    again = KoalaM([p[0].detach().clone().requires_grad_()], fused=True, fold_predict=True)
    again.load_state_dict(state)
    assert again._predict_state.folded and again._predict_state.time_updates == 1


def test_fused_true_without_interpreter_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        KoalaV([torch.randn(3, requires_grad=True)], fused=True)
    assert not KoalaV([torch.randn(3, requires_grad=True)], fused=None).uses_triton


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1"])
@pytest.mark.parametrize("case", case_params(("default", "fold")))
def test_models_of_one_element_match_pytorch_path(case, shape):
    """All parameters together hold one element (compiled Triton makes every integer argument
    equal to 1 a constant; ``tests/compiled_typing.py`` does the same here), with a step
    without a gradient in between. CPU twin of the dry-launch test of the same name."""
    tri, ref = check_one_element_model(case, shape)
    if not case.fold:  # fold mode's filter already holds the next prior
        for key, value in ref.filter_state.items():
            torch.testing.assert_close(tri.filter_state[key].double(), value.double(), rtol=1e-6, atol=0.0)


class ReplayedLaunches:
    """A CUDA graph as the Triton path sees it: capture records an iteration's kernel launches
    (here they also run: the iteration a real capture would leave to the first replay), and a
    replay re-issues them with the same arguments (same tensors, same scalars) and no host code
    of the optimizer at all."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.launches: list = []

    def capture(self):
        import contextlib

        original = _triton_backend.launch

        def recording(fn, grid, device, **kwargs):
            self.launches.append((fn, grid, device, kwargs))
            return original(fn, grid, device, **kwargs)

        @contextlib.contextmanager
        def scope():
            self.monkeypatch.setattr(_triton_backend, "launch", recording)
            try:
                yield
            finally:
                self.monkeypatch.setattr(_triton_backend, "launch", original)

        return scope()

    def replay(self):
        for fn, grid, device, kwargs in self.launches:
            _triton_backend.launch(fn, grid, device, **kwargs)


#: KOALA-M: its predict leaves a tail (qx from the distance to xavg, the covariance) pending on
#: the device for the next filter kernel.
@pytest.mark.parametrize("case", case_params(("default", "fold"), where=lambda c: c.variant.has_velocity))
def test_filter_reads_between_replayed_iterations_see_each_replayed_predict(case, monkeypatch):
    """Under CUDA-graph replays the host never learns that a replayed pass raised the pending
    predict flag; ``filter_state`` and ``state_dict()`` must still apply it, at every read, not
    only at the first read after the capture. The replayed optimizer is compared with an eager
    one (same kernels, same order: bitwise) after every replay, reading its filter once or
    twice, or through ``state_dict()``. CPU twin of ``test_gpu_graph_capture_replays_to_eager``
    (which also reads the filter between replays)."""
    monkeypatch.setattr(_triton_backend, "_buffer", _UNPOISONED_BUFFER)  # replays run no host fills
    eager_params = make_params(10, torch.float32, odd_layouts=False)
    graph_params = clone_params(eager_params)
    eager = case.cls(groups(eager_params), fused=True, **case.kwargs)
    graphed = case.cls(groups(graph_params), fused=True, **case.kwargs)
    for p in eager_params + graph_params:
        p.grad = torch.zeros_like(p)
    static_loss = torch.zeros(6)
    gen = torch.Generator().manual_seed(9)
    inputs = [([torch.randn(p.shape, generator=gen) for p in eager_params], torch.rand(6, generator=gen))
              for _ in range(8)]

    def feed(params, i):
        for p, g in zip(params, inputs[i][0]):
            p.grad.copy_(g)
        static_loss.copy_(inputs[i][1])

    def iteration(opt, params, i):
        feed(params, i)
        opt.predict()
        opt.step(loss=static_loss)

    graph = ReplayedLaunches(monkeypatch)
    for i in range(2):  # warm-up: tables, buffers and kernels are built outside the capture
        iteration(eager, eager_params, i)
        iteration(graphed, graph_params, i)
    iteration(eager, eager_params, 2)
    with graph.capture():
        iteration(graphed, graph_params, 2)
    assert graph.launches
    for i in range(3, len(inputs)):
        iteration(eager, eager_params, i)
        feed(graph_params, i)
        graph.replay()
        reads = [graphed.filter_state] if i % 3 else [graphed.state_dict()["koala"]["filter"], graphed.filter_state]
        for filt in reads:
            for key, value in eager.filter_state.items():
                assert torch.equal(filt[key], value), f"iteration {i}: filter {key}"
        for a, b in zip(eager_params, graph_params):
            assert torch.equal(a, b), f"iteration {i}: weights"
