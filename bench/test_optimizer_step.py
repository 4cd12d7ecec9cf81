"""One whole optimizer iteration per benchmark: KOALA predict + update, or torch.optim step.

Each benchmark records in ``extra_info`` what it measured (parameters, tensors, the koala_triton/ALGORITHM.md §7
bytes floor, achieved GB/s and its fraction of a device-to-device copy measured in the same run,
launches per step, host synchronisations, optimizer-state bytes per parameter); bench/report.py
turns the JSON into a table and a plot.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

from bench import measure, param_sets
from bench.conftest import DTYPES
from bench.providers import (PROVIDERS, ProviderUnavailable, Stepper, floor_bytes_per_param,
                             optimizer_state_bytes)

# The parameter set of the previous benchmark, reused while (set, dtype) stays the same:
# building GPT-2 twice per provider would cost more than timing it. Steps mutate the weights,
# which is fine: the gradients stay the same random, nonzero tensors.
_cache: dict = {}


def _param_copies(name: str, dtype: torch.dtype, device: torch.device) -> list:
    """One parameter set, or several when it would sit in the GPU's L2 cache (the benchmark
    then rotates through them so every step reads from memory, as in training)."""
    key = (name, dtype, device)
    if key not in _cache:
        _cache.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        n_params, _ = param_sets.count(name)
        copies = 1
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
            footprint = 4 * n_params * torch.empty((), dtype=dtype).element_size()  # p, g, 2 states
            copies = min(16, max(1, math.ceil(4 * l2 / footprint)))
        _cache[key] = [param_sets.build(name, dtype, device, seed=i) for i in range(copies)]
    return _cache[key]


def _all_finite(params) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def _rotating(steppers: list[Stepper]):
    if len(steppers) == 1:
        return steppers[0].iterate
    state = {"i": 0}

    def iterate():
        steppers[state["i"]].iterate()
        state["i"] = (state["i"] + 1) % len(steppers)

    return iterate


@pytest.mark.koala_bench
def test_optimizer_step(benchmark, case, device, mode, copy_gbps, within_budget, paired_with):
    set_name, dtype_name, provider_name = case
    provider = PROVIDERS[provider_name]
    dtype = DTYPES[dtype_name]
    if provider.cuda_only and device.type != "cuda":
        pytest.skip(f"{provider.label} runs on CUDA only")
    if device.type == "cuda":  # the previous benchmark's optimizer state goes back first
        gc.collect()
        torch.cuda.empty_cache()

    copies = _param_copies(set_name, dtype, device)
    params = copies[0].params
    n_params, n_tensors = copies[0].numel, len(params)

    measure.synchronize(device)
    alloc_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    try:
        first = provider.build(params)
        first.iterate()  # warm-up: lazy state, Triton compilation
        measure.synchronize(device)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    except NotImplementedError as exc:
        pytest.skip(f"{provider.label}: NotImplementedError: {exc}")
    alloc_after = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    one = measure.time_median(first.iterate, device, reps=1)

    # Rotate through the copies where that fits the case's time: a step too slow for it is
    # launch-bound, and whether its data sat in L2 makes no difference.
    n_rot = min(len(copies), max(1, int(mode.max_case_s / (mode.rounds * max(one, 1e-9)))))
    steppers = [first] + [provider.build(c.params) for c in copies[1:n_rot]]
    for s in steppers[1:]:
        s.iterate()
    iterate = _rotating(steppers)

    # Iterations per round: enough to fill round_s, a multiple of the rotation length; rounds:
    # the mode's number, fewer (never under 3) where that would overrun the case's time.
    iterations = max(1, math.ceil(mode.round_s / max(one, 1e-9)))
    iterations = min(1000, math.ceil(iterations / n_rot) * n_rot)
    rounds = min(mode.rounds, max(3, int(mode.max_case_s / (iterations * max(one, 1e-9)))))

    benchmark.group = f"{set_name} {dtype_name}"
    benchmark._timer = measure.timer_for(device)  # device-synchronised round boundaries
    benchmark.pedantic(iterate, rounds=rounds, iterations=iterations, warmup_rounds=1)

    paired = None
    if paired_with and paired_with != provider_name and benchmark.enabled:
        reference = PROVIDERS[paired_with].build(params)
        reference.iterate()
        paired = measure.paired_ratio(first.iterate, max(1, iterations // n_rot), reference.iterate,
                               device, rounds)
        del reference

    launches = measure.count_launches(steppers[0].iterate, device)
    host_syncs = measure.count_host_syncs(steppers[0].iterate, device)

    itemsize = torch.empty((), dtype=dtype).element_size()
    state_bytes = optimizer_state_bytes(steppers[0].optimizer)
    floor_b = floor_bytes_per_param(provider, dtype)
    info = {
        "set": set_name, "dtype": dtype_name, "provider": provider_name,
        "label": provider.label, "family": provider.family, "impl": provider.impl,
        "params": n_params, "tensors": n_tensors, "copies_rotated": n_rot,
        "bytes_per_param_floor": floor_b, "bytes_per_step_floor": floor_b * n_params,
        "copy_gbps": copy_gbps,
        "iterations_per_round": iterations, "rounds": rounds,
        "state_bytes_per_param": state_bytes / n_params,
        "state_buffers_per_param": state_bytes / n_params / itemsize,
        "host_syncs_per_step": host_syncs,
        "device": str(device), "device_name": measure.device_name(device),
        "torch": torch.__version__, "loadavg_1min": os.getloadavg()[0],
    }
    info.update(launches)
    if paired is not None:
        info["paired_with"] = paired_with
        info["paired_ratio"], info["paired_ratio_iqr"] = paired
    if alloc_before is not None:
        info["allocated_bytes_per_param"] = (alloc_after - alloc_before) / n_params
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info["median_s"] = median
        info["iqr_s"] = benchmark.stats.stats.iqr
        info["achieved_gbps"] = floor_b * n_params / median / 1e9
        info["fraction_of_copy_bw"] = info["achieved_gbps"] / copy_gbps
    benchmark.extra_info.update(info)

    finite = all(_all_finite(c.params) for c in copies[:n_rot])
    del steppers, iterate, first
    if not finite:
        _cache.clear()
    assert finite, f"{provider.label} left non-finite weights on {set_name} {dtype_name}"
