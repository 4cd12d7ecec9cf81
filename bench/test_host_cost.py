"""Host cost of one Triton-path iteration (predict + step), measured without a GPU.

On a GPU, a step of a small model can be bound by the host rather than by memory traffic:
ResNet-18 moves ~0.2 GB per KOALA-V step, ~50 µs on an H100, while Python and Triton prepare
three launches. This benchmark times everything the host does in a real iteration of the
Triton path except the driver's launch call itself: kernels are compiled for sm_90 and handed
to a recording launcher (``tests/dry_launch.py``), so nothing executes and tensor sizes do not
matter (1-element tensors; the tensor count is what host work scales with).

Baselines, same run and machine:
- the same iteration with direct launches off (``KOALA_TRITON_DIRECT_LAUNCH=0``: every launch
  through ``JITFunction.run``), the gain of ``kernels/direct.py``;
- torch's ``AdamW(fused=True)`` step on the same number of 1-element CPU tensors: its Python
  and C++ host work plus one tiny CPU kernel per tensor, so an upper bound of its host cost.

``extra_info`` holds the tensor count, the median in µs and ``paired_ratio``: the median ratio
to the AdamW baseline over 21 rounds that alternate the two (this VM's load drifts between
benchmarks; alternating rounds see the same load).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from bench import measure  # noqa: E402
from koala_triton.kernels import direct  # noqa: E402
from tests import dry_launch  # noqa: E402
from tests.variants import cases  # noqa: E402

#: tensor counts of ResNet-18 and GPT-2 small (bench/param_sets.py)
TENSORS = {"resnet18": 62, "gpt2-small": 148}
#: koala_<case>: each launch design (every variant's default mode, and fold mode), by registry case
KOALA = {f"koala_{c.slug}": c for c in cases(("default", "fold"))}
#: KoalaV again with every launch dispatched through ``JITFunction.run`` (no direct launches)
DISPATCH = "koala_v_dispatch"
BASELINE = "adamw_fused_cpu"
PROVIDERS = [*KOALA, DISPATCH, BASELINE]

_reason = dry_launch.unavailable_reason()


def _build(provider: str, params):
    loss = torch.rand(64)
    if provider == "adamw_fused_cpu":
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        return opt.step
    case = KOALA[provider.removesuffix("_dispatch")]
    opt = case.cls(params, fused=True, **case.kwargs)

    def iterate():
        opt.predict()
        opt.step(loss=loss)

    return iterate


@pytest.mark.koala_bench
@pytest.mark.skipif(_reason is not None, reason=_reason or "")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", list(TENSORS))
def test_host_cost_per_iteration(benchmark, monkeypatch, model, provider):
    n = TENSORS[model]
    params = [torch.zeros(1, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.ones(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused=True on CPU tensors; not used to run
    monkeypatch.setattr(direct, "ENABLED", provider != DISPATCH)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the AdamW baseline's tiny CPU kernels: no thread-pool overhead
    try:
        with dry_launch.dry_cuda(monkeypatch):
            iterate = _build(provider, params)
            for _ in range(3):  # compile, build tables, first direct launches
                iterate()
            benchmark.group = f"host cost per iteration, {model} ({n} tensors)"
            benchmark.pedantic(iterate, rounds=15, iterations=100, warmup_rounds=1)
            info = {"host_provider": provider, "model": model, "tensors": n}
            if benchmark.enabled and provider != BASELINE:
                # alternating rounds against the baseline: this VM's load drifts between cases
                reference = _build(BASELINE, params)
                reference()
                info["paired_with"] = BASELINE
                info["paired_ratio"], info["paired_ratio_iqr"] = measure.paired_ratio(
                    iterate, 50, reference, torch.device("cpu"), rounds=21)
    finally:
        torch.set_num_threads(threads)
    if benchmark.stats is not None:
        info["median_us"] = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(info)


@pytest.mark.koala_bench
@pytest.mark.skipif(_reason is not None, reason=_reason or "")
@pytest.mark.parametrize("provider", list(KOALA))
@pytest.mark.parametrize("model", list(TENSORS))
def test_host_cost_of_the_ordinary_training_loop(benchmark, monkeypatch, model, provider):
    """The loop most users write: ``zero_grad(set_to_none=True)``, then fresh gradients every
    step (here new tensors, as a backward pass makes them), predict, step. Whether a gradient
    lands at its old address is up to the allocator, so the tables may be rebuilt: the
    benchmark reports the host cost per iteration and the table cache's hit rate
    (``cache_info()``) over the timed iterations."""
    n = TENSORS[model]
    params = [torch.zeros(1, requires_grad=True) for _ in range(n)]
    loss = torch.rand(64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused=True on CPU tensors; not used to run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with dry_launch.dry_cuda(monkeypatch):
            case = KOALA[provider]
            opt = case.cls(params, fused=True, **case.kwargs)

            def iterate():
                opt.zero_grad(set_to_none=True)
                for p in params:
                    p.grad = torch.ones(1)
                opt.predict()
                opt.step(loss=loss)

            for _ in range(3):
                iterate()
            before = opt.cache_info()
            benchmark.group = f"host cost of the training loop, {model} ({n} tensors)"
            benchmark.pedantic(iterate, rounds=15, iterations=50, warmup_rounds=1)
            after = opt.cache_info()
    finally:
        torch.set_num_threads(threads)
    hits = after["table_hits"] - before["table_hits"]
    misses = after["table_misses"] - before["table_misses"]
    assert hits + misses > 0
    info = {"host_provider": provider, "model": model, "tensors": n, "table_hits": hits, "table_misses": misses,
            "table_hit_rate": hits / (hits + misses),
            "chunk_layouts_built": after["table_layout_misses"] - before["table_layout_misses"]}
    if benchmark.stats is not None:
        info["median_us"] = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(info)
