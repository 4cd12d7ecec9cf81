"""The Triton path's cached tables (``kernels/tables.prepare``) through storage events, under
Triton's interpreter: the CPU twin of a training loop whose gradients are reallocated each
step and whose parameters are occasionally moved or restrided.

Compared with the PyTorch path at ``test_triton_interpreter``'s 1e-5 (its error model: the
same fp32 expressions, norms accumulated in another order), and by counting table builds (a
cache that never hits would pass the comparison). The PyTorch-path twin of these tests, for the
optimizer's own caches, is ``test_host_cache.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from koala_triton.kernels import tables as _tables  # noqa: E402
from tests.helpers import assert_close, clone_params, posterior_weights, reference_groups  # noqa: E402
from tests.helpers import round_bf16_like_the_gpu  # noqa: E402
from tests.variants import case_params  # noqa: E402

pytestmark = pytest.mark.interpreter

@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    round_bf16_like_the_gpu(monkeypatch)


def _fp32_params(gen):
    shapes = [(5, 3), (3,), (), (4, 4), (131,), (7, 2), (6, 6), (257,)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _storage_event(step, params, grads):
    """Between steps, move or restride storages the tables point to (applied to both copies).

    ``grads`` are this step's gradient values; returns them as they should be assigned."""
    if step == 3:  # a parameter gets a new storage (as model.to() or p.data = ... do)
        params[1].data = params[1].data.clone()
    if step == 5:  # a square gradient at the same address with other strides: must be staged
        grads[3] = grads[3].t()
    if step == 7:  # a parameter becomes non-dense (strided view of a larger buffer): staged
        p = params[7]
        big = torch.zeros(2 * p.numel())
        big[::2] = p.detach()
        p.data = big[::2]
    if step == 9:  # ... and dense again
        params[7].data = params[7].data.clone()
    return grads


#: One case per launch design: each variant's default mode, and fold mode.
DESIGNS = case_params(("default", "fold"))


@pytest.mark.parametrize("case", DESIGNS)
def test_triton_path_matches_pytorch_path_while_storages_move(interpreter, case):
    gen = torch.Generator().manual_seed(5)
    ref_params = _fp32_params(gen)
    tri_params = clone_params(ref_params)
    ref = case.cls(reference_groups(ref_params), fused=False, **case.twin_kwargs)
    tri = case.cls(reference_groups(tri_params), fused=True, **case.kwargs)
    for step in range(12):
        ref.predict()
        tri.predict()
        values = [None if (i + step) % 6 == 0 else torch.randn(p.shape, generator=gen) for i, p in enumerate(ref_params)]
        ref_grads = _storage_event(step, ref_params, [None if v is None else v.clone() for v in values])
        tri_grads = _storage_event(step, tri_params, [None if v is None else v.clone() for v in values])
        tri.zero_grad(set_to_none=True)
        for rp, tp, rg, tg in zip(ref_params, tri_params, ref_grads, tri_grads):
            rp.grad, tp.grad = rg, tg
        if step == 5:
            assert tri_params[3].grad.stride() == (1, 4)
        losses = torch.rand(8, generator=gen)
        ref.step(loss=losses)
        tri.step(loss=losses)
        if step == 8:
            tri.load_state_dict(copy.deepcopy(tri.state_dict()))  # new state tensors
        with posterior_weights(tri, case.fold):
            for i, (a, b) in enumerate(zip(ref_params, tri_params)):
                assert_close(b, a, f"step {step} param {i}", rtol=1e-5)
        if case.variant.has_velocity:
            for i, (a, b) in enumerate(zip(ref_params, tri_params)):
                assert_close(tri.state[b]["velocity"], ref.state[a]["velocity"], f"step {step} velocity {i}",
                             rtol=1e-5)


@pytest.mark.parametrize("case", DESIGNS)
def test_steady_steps_build_no_tables(interpreter, monkeypatch, case):
    """With gradient storages that stay put, tables are built in the first iteration only, and
    again (once) after a parameter moves."""
    builds = []
    original = _tables.table
    monkeypatch.setattr(_tables, "table", lambda *a, **k: builds.append(1) or original(*a, **k))
    gen = torch.Generator().manual_seed(0)
    params = _fp32_params(gen)
    opt = case.cls(params, fused=True, **case.kwargs)
    for p in params:
        p.grad = torch.zeros_like(p)
    counts = []
    for step in range(6):
        if step == 4:
            params[2].data = params[2].data.clone()
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen))
        opt.predict()
        opt.step(loss=torch.rand(4, generator=gen))
        counts.append(len(builds))
        builds.clear()
    first = counts[0]
    assert first >= 1
    assert counts[1:4] == [0, 0, 0], f"tables built per iteration: {counts}"
    # fold mode's own predict launches nothing, so only its update tables are rebuilt
    assert counts[4] >= 1 and counts[5] == 0, f"tables built per iteration: {counts}"


def test_signature_tells_apart_what_the_tables_depend_on():
    """Same address, other strides or element count: another signature (else stale tables)."""
    x = torch.zeros(4, 4)
    g = torch.zeros(4, 4)
    base = _tables.signature({"x": [x], "g": [g]}, ("x", "g"))
    assert _tables.signature({"x": [x], "g": [g]}, ("x", "g")) == base
    assert _tables.signature({"x": [x], "g": [g.t()]}, ("x", "g")) != base  # same data_ptr
    assert _tables.signature({"x": [x.view(-1)[:8]], "g": [g]}, ("x", "g")) != base  # same data_ptr
    assert _tables.signature({"x": [x], "g": [g.clone()]}, ("x", "g")) != base
    assert _tables.signature({"x": [x], "g": [None]}, ("x", "g")) != base


def _snapshot(opt, params):
    """Weights, every state tensor and the filter, as exact copies."""
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    filt = {k: v.clone() for k, v in opt._filter.items()}  # the raw filter: reading filter_state settles
    return [p.detach().clone() for p in params], state, filt


def _assert_untouched(opt, params, before):
    weights, state, filt = before
    for p, w in zip(params, weights):
        assert torch.equal(p.detach(), w)
    for i, p in enumerate(params):
        for k, v in state[i].items():
            assert torch.equal(opt.state[p][k], v), f"state {i} {k}"
    for k, v in filt.items():
        assert torch.equal(opt._filter[k], v), f"filter {k}"


@pytest.mark.parametrize("case", DESIGNS)
@pytest.mark.parametrize("change", ["dtype", "resized"])
def test_tables_refuse_arrays_that_no_longer_match_their_parameter(interpreter, case, change):
    """A model converted to another dtype, or a parameter replaced by one of another size, after
    the optimizer was built: the gradient or KOALA-M's state no longer matches the parameter,
    and a kernel would read and write them past their ends. Refused with an error that names
    the tensor and what changed; weights, state and filter untouched."""
    gen = torch.Generator().manual_seed(11)
    params = _fp32_params(gen)
    opt = case.cls(reference_groups(params), fused=True, **case.kwargs)
    stateful = bool(case.variant.state_keys)  # KOALA-V has no state arrays to mismatch
    for _ in range(2):
        opt.predict()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(loss=torch.rand(4, generator=gen))
    if change == "dtype":  # as model.double() does to the parameters (KOALA-V: the grads stay)
        for p in params:
            p.data = p.data.double()
        for p in params if stateful else ():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        message = "float32 but the parameter is torch.float64" if stateful else "gradient.*float32"
    else:  # a parameter replaced by a larger one (its old gradient dropped)
        params[4].data = torch.randn(200, generator=gen)
        params[4].grad = torch.randn(200, generator=gen)
        message = "131 elements but the parameter has 200" if stateful else None
    if message is None:  # KOALA-V has no state: its gradient matches the new parameter
        opt.step(loss=torch.rand(4, generator=gen))
        return
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.predict()
        opt.step(loss=torch.rand(4, generator=gen))
    _assert_untouched(opt, params, before)


@pytest.mark.parametrize("case", DESIGNS)
def test_cache_info_counts_hits_and_misses_and_new_addresses_rebuild_only_rows(interpreter, monkeypatch, case):
    """``cache_info()``: steady steps are table hits; a gradient that moves to a new address (as
    ``zero_grad(set_to_none=True)`` can do) is a miss that reuses the chunk layout (only the
    rows are uploaded again); a parameter of a new size also lays out the chunks anew."""
    uploads = []
    original = _tables._upload
    monkeypatch.setattr(_tables, "_upload", lambda values, *a, **k: uploads.append(len(values)) or original(values, *a, **k))
    gen = torch.Generator().manual_seed(3)
    params = _fp32_params(gen)
    opt = case.cls(params, fused=True, **case.kwargs)
    for p in params:
        p.grad = torch.zeros_like(p)

    def iteration(fresh_grads=False):
        for p in params:
            if fresh_grads:
                p.grad = torch.randn(p.shape, generator=gen)  # a new storage
            else:
                p.grad.copy_(torch.randn(p.shape, generator=gen))
        opt.predict()
        opt.step(loss=torch.rand(4, generator=gen))

    iteration()
    iteration()
    warm = opt.cache_info()
    assert warm["layout_misses"] >= 1 and warm["table_misses"] >= 1 and warm["table_layout_misses"] >= 1
    uploads.clear()
    iteration()
    steady = opt.cache_info()
    assert steady["table_misses"] == warm["table_misses"] and steady["table_hits"] > warm["table_hits"]
    assert steady["layout_hits"] > warm["layout_hits"] and uploads == []
    keep = [p.grad for p in params]  # hold the old grads: the new ones cannot reuse their storage
    iteration(fresh_grads=True)
    moved = opt.cache_info()
    assert moved["table_misses"] > steady["table_misses"]
    assert moved["table_layout_misses"] == steady["table_layout_misses"], "new addresses re-laid the chunks out"
    rows_only = sum(uploads)
    assert rows_only and all(n % 8 == 0 for n in uploads), f"uploads after a move: {uploads}"  # rows: 8 ints each
    del keep
    params.append(torch.randn(300, generator=gen).requires_grad_())  # a new size: a new chunk layout
    opt.add_param_group({"params": [params[-1]]})
    iteration(fresh_grads=True)
    assert opt.cache_info()["table_layout_misses"] > moved["table_layout_misses"]
