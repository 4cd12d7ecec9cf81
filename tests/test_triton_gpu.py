"""The Triton path on a CUDA device (marker ``gpu``; skipped with a reason without CUDA).

Each test has a CPU twin that runs in CI under Triton's interpreter
(tests/test_triton_interpreter.py):

| here (CUDA)                                   | CPU twin (interpreter)                                   |
|-----------------------------------------------|----------------------------------------------------------|
| test_gpu_matches_pytorch_path                 | test_float32_/test_low_precision_/test_fold_mode_matches_pytorch_path... |
| test_gpu_graph_capture_replays_to_eager       | test_tables_are_cached_while_storages_are_stable, test_filter_reads_between_replayed_iterations_see_each_replayed_predict |
| test_gpu_models_of_one_element_match_pytorch_path | test_models_of_one_element_match_pytorch_path (and the dry-launch test of that name) |
| test_gpu_step_does_not_synchronize            | test_no_host_reads_inside_predict_and_step               |
| test_gpu_launches_do_not_depend_on_tensors    | test_launches_per_step_do_not_depend_on_the_number_of_tensors |
| test_gpu_direct_launches_match_dispatched_launches | test_triton_dry_launch: test_direct_launches_pass_exactly_what_triton_dispatch_passes |
| test_gpu_int64_addressing                     | (none: needs > 2^31 elements)                            |

Run: ``python -m pytest -m gpu tests/test_triton_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from koala_triton import KoalaV  # noqa: E402
from tests.helpers import (  # noqa: E402
    ULP,
    assert_close_scaled,
    assert_state_close_scaled,
    check_one_element_model,
    clone_params,
    compare_states,
    groups,
    magnitude,
    posterior_weights,
    run_pair,
)
from tests.variants import case_params, cases  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
#: Tensors larger than a CUDA chunk (16,384 elements) and than a tile, not multiples of either.
GPU_BIG = [(40_009,), (300, 257), (16_384,), (1_000_003,)]


#: Every variant in every dtype, fold mode in float32.
CASES = ([(c, d) for c in cases(("default",)) for d in (torch.float32, torch.bfloat16, torch.float16)]
         + [(c, torch.float32) for c in cases(("fold",))])


@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c.id}-{str(d)[6:]}" for c, d in CASES])
def test_gpu_matches_pytorch_path(case, dtype):
    """Error model and tolerances: tests/test_triton_interpreter.py's module docstring."""
    fold = case.fold
    steps = 15
    largest: dict[int, float] = {}

    def check(step, ref, tri, rp, tp):
        for i, a in enumerate(rp):
            largest[i] = max(largest.get(i, 0.0), magnitude([a]))
        if dtype == torch.float32 and not fold:
            compare_states(ref, tri, rp, tp, 1e-5, f"step {step}")

    ref, tri, rp, tp = run_pair(case, dtype, 152, steps, per_step=check, device=DEVICE, big=GPU_BIG)
    tol = 1e-5 if dtype == torch.float32 else 2 * steps * ULP[dtype]
    with posterior_weights(tri, fold):
        for i, (a, b) in enumerate(zip(rp, tp)):
            assert_close_scaled(b, a, tol, f"param {i}", largest[i])
    assert_state_close_scaled(ref, tri, rp, tp, tol)
    if not fold:  # fold mode's filter already holds the next prior
        for key, value in ref.filter_state.items():
            torch.testing.assert_close(tri.filter_state[key].double(), value.double(), rtol=max(tol, 1e-6), atol=0.0)
    assert int(tri.filter_state["skipped_steps"]) == 2


#: One case per launch design: each variant's default mode, and fold mode.
DESIGNS = case_params(("default", "fold"))


@pytest.mark.parametrize("case", DESIGNS)
def test_gpu_graph_capture_replays_to_eager(case):
    """A captured predict + update, replayed, gives the eager steps' weights bit for bit.

    Conditions (kernels/NOTES.md): grads keep their storage (copy new values in, never set
    them to None), lr is a device tensor changed in place, the loss is a static device tensor,
    a few eager steps run first (tables, buffers and kernels are built outside the capture),
    and the optimizer is not stepped eagerly between replays. ``filter_state`` is read between
    replays (CPU twin: ``test_filter_reads_between_replayed_iterations_see_each_replayed_predict``)."""
    cls, extra = case.cls, case.kwargs
    torch.manual_seed(0)
    shapes = [(), (7,), (300, 257), (40_009,), (33, 3)]
    eager_params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes]
    graph_params = clone_params(eager_params)
    lr_e = torch.tensor(0.5, device=DEVICE, dtype=torch.float64)
    lr_g = lr_e.clone()
    eager = cls([{"params": eager_params[:2]}, {"params": eager_params[2:], "weight_decay": 0.01}],
                lr=lr_e, fused=True, **extra)
    graphed = cls([{"params": graph_params[:2]}, {"params": graph_params[2:], "weight_decay": 0.01}],
                  lr=lr_g, fused=True, **extra)
    for p in eager_params + graph_params:
        p.grad = torch.zeros_like(p)
    static_loss = torch.zeros(16, device=DEVICE, dtype=torch.float64)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    inputs = [([torch.randn(s, device=DEVICE, generator=gen) for s in shapes],
               torch.rand(16, device=DEVICE, dtype=torch.float64, generator=gen)) for _ in range(12)]

    def feed(params, grads, loss_values):
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        static_loss.copy_(loss_values)

    def eager_step(opt, params, i):
        grads, losses = inputs[i]
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        opt.predict()
        opt.step(loss=losses.clone())

    warmup = 3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            eager_step(eager, eager_params, i)
            feed(graph_params, *inputs[i])
            graphed.predict()
            graphed.step(loss=static_loss)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    feed(graph_params, *inputs[warmup])
    with torch.cuda.graph(graph):
        graphed.predict()
        graphed.step(loss=static_loss)
    for i in range(warmup, len(inputs)):
        if i == 8:  # lr schedule: in place, seen by the replays
            lr_e.fill_(0.25)
            lr_g.fill_(0.25)
        feed(graph_params, *inputs[i])
        graph.replay()  # capture does not run the work: the first replay is iteration `warmup`
        eager_step(eager, eager_params, i)
        if i % 2:  # a read between replays applies what the replay left pending, every time
            for key, value in eager.filter_state.items():
                assert torch.equal(graphed.filter_state[key], value), (i, key)
    torch.cuda.synchronize()
    for a, b in zip(eager_params, graph_params):
        assert torch.equal(a, b)
    for key, value in eager.filter_state.items():
        assert torch.equal(graphed.filter_state[key], value), key
    for a, b in zip(eager_params, graph_params):
        for key in case.variant.state_keys:
            assert torch.equal(eager.state[a][key], graphed.state[b][key])


@pytest.mark.parametrize("case", DESIGNS)
def test_gpu_step_does_not_synchronize(case):
    cls, extra = case.cls, case.kwargs
    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in [(), (5,), (300, 257), (1_000_003,)]]
    opt = cls(groups(params), fused=True, **extra)

    def step():
        opt.predict()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step(loss=torch.rand(16, device=DEVICE))

    for _ in range(2):  # compile the kernels, build the tables
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(opt.filter_state["step"]) == 5


def _kernels_per_iteration(cls, n, **extra):
    """(all CUDA kernels, our Triton kernels) of one predict() + step(), grads in place and the
    loss made before the profiled region (as in a training loop: those belong to the model)."""
    from torch.profiler import ProfilerActivity, profile

    params = [torch.randn((i % 5) + 1, device=DEVICE, requires_grad=True) for i in range(n)]
    opt = cls(params, fused=True, **extra)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        opt.predict()
        opt.step(loss=torch.rand(8, device=DEVICE))
    loss = torch.rand(8, device=DEVICE)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.predict()
        opt.step(loss=loss)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = {"norms_kernel", "filter_kernel", "update_kernel", "fold_kernel", "predict_kernel"}
    triton = [e for e in kernels if e.name in ours]
    return len(kernels), len(triton)


@pytest.mark.parametrize("case", DESIGNS)
def test_gpu_launches_do_not_depend_on_tensors(case):
    """All device work of an iteration is our Triton kernels: V 3, M 4, M-fold 3 (KOALA-V's
    predict is counted on the host, the loss moments are taken inside the filter kernel;
    ``tests/variants.py``)."""
    few = _kernels_per_iteration(case.cls, 20, **case.kwargs)
    many = _kernels_per_iteration(case.cls, 160, **case.kwargs)
    assert few == many, f"(all kernels, triton kernels) per iteration: 20 tensors {few}, 160 tensors {many}"
    assert few == (case.launches, case.launches), f"(all kernels, triton kernels) per iteration: {few}"


@pytest.mark.parametrize("case", DESIGNS)
def test_gpu_direct_launches_match_dispatched_launches(case, monkeypatch):
    """Two copies stepped alike, one with direct launches (``kernels/direct.py``), one with every
    launch through ``JITFunction.run``: bitwise equal weights and velocities, and the first
    copy's launches after its first iteration were direct."""
    from koala_triton.kernels import direct

    cls, extra = case.cls, case.kwargs
    gen = torch.Generator().manual_seed(7)
    shapes = [(), (5,), (300, 257), (40_009,), (16_384,)]
    a = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a, opt_b = cls(a, fused=True, **extra), cls(b, fused=True, **extra)
    for step in range(6):
        grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        loss = torch.rand(8, generator=gen).to(DEVICE)
        for opt, params, enabled in ((opt_a, a, True), (opt_b, b, False)):
            monkeypatch.setattr(direct, "ENABLED", enabled)
            before = direct.STATS["direct"]
            opt.predict()
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step(loss=loss)
            if enabled and step >= 1:
                assert direct.STATS["direct"] - before >= 3
    torch.cuda.synchronize()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        if case.variant.has_velocity:
            assert torch.equal(opt_a.state[pa]["velocity"], opt_b.state[pb]["velocity"])


def test_gpu_int64_addressing():
    """A tensor of more than 2^31 elements: the last elements are updated like the first."""
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2 + (2 << 30):
        pytest.skip(f"needs ~{3 * n * 2 >> 30} GiB of free GPU memory")
    x = torch.zeros(n, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    opt = KoalaV([x], fused=True)
    opt.predict()
    x.grad = torch.ones_like(x)
    opt.step(loss=torch.full((4,), 2.0, device=DEVICE))
    first = x[0].item()
    assert first < 0
    for i in (2**31 - 1, 2**31, 2**31 + 1, n - 1):
        assert x[i].item() == first, i
    del x, opt
    torch.cuda.empty_cache()


@pytest.mark.parametrize("case", DESIGNS)
def test_gpu_models_of_one_element_match_pytorch_path(case):
    """One element in all (every integer argument equal to 1 is a compile-time constant) and a
    step without any gradient (the filter kernel's no-tensor launch)."""
    check_one_element_model(case, (), DEVICE)
