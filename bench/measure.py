"""Device-synchronised timing, copy bandwidth, launch counts and host-sync detection."""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_synced_perf_counter() -> float:
    """``time.perf_counter`` after draining the CUDA queue: pytest-benchmark calls its timer
    before and after each round, so a round then measures the device work it launched."""
    torch.cuda.synchronize()
    return time.perf_counter()


def timer_for(device: torch.device) -> Callable[[], float]:
    return cuda_synced_perf_counter if device.type == "cuda" else time.perf_counter


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    brand = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    brand = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{brand}, {os.cpu_count()} CPUs"


def time_runs(fn: Callable[[], None], device: torch.device, reps: int) -> list[float]:
    """Seconds of each of ``reps`` runs of ``fn`` after one untimed run (CUDA events on a GPU)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def time_median(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    return statistics.median(time_runs(fn, device, reps))


def copy_bandwidth_gbps(device: torch.device, nbytes: int, reps: int = 20) -> float:
    """Device-to-device copy bandwidth: (read + write) bytes / best time of ``dst.copy_(src)``.

    The best of ``reps`` runs, as a ceiling: on a shared CPU other processes only slow it down.
    (A CPU store also reads its cache line first, so optimizers that update in place can beat
    a copy's counted bandwidth there.)"""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    seconds = min(time_runs(lambda: dst.copy_(src), device, reps))
    return 2 * nbytes / seconds / 1e9


def count_launches(fn: Callable[[], None], device: torch.device) -> dict:
    """Launches in one call of ``fn``, from torch.profiler.

    CUDA: device activities (kernels, including Triton's, plus memcpy/memset).
    CPU: top-level ATen operator calls (no aten op above them), the CPU analogue of a launch.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=activities) as prof:
            fn()
            synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        dev = [e for e in events if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)
               and "annotation" not in str(getattr(e, "activity_type", "") or "")]
        copies = sum(1 for e in dev if "memcpy" in e.name.lower() or "memset" in e.name.lower())
        # Host side, for cross-checking: runtime/driver launch and async-copy calls.
        api = sum(1 for e in events if e.device_type == DeviceType.CPU and (
            "LaunchKernel" in e.name or e.name in ("cudaMemcpyAsync", "cudaMemsetAsync")))
        # Device time per kernel name (µs, the 8 longest): e.g. how long KOALA's one-program
        # filter kernel takes next to the bandwidth-bound passes.
        per_kernel: dict[str, float] = {}
        for e in dev:
            name = e.name[:60]
            per_kernel[name] = per_kernel.get(name, 0.0) + e.time_range.elapsed_us()
        longest = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8])
        return {"launches_per_step": len(dev), "kernels_per_step": len(dev) - copies,
                "launch_api_calls_per_step": api, "kernel_us": longest,
                "launches_counted": "CUDA device activities (kernels + memcpy/memset)"}

    def top_level(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
           and top_level(e)]
    return {"launches_per_step": len(ops), "kernels_per_step": None,
            "launches_counted": "top-level ATen ops (CPU)"}


def cuda_kernel_times(fn: Callable[[], None], calls: int) -> dict[str, tuple[float, int]]:
    """Device time of every CUDA kernel that ``calls`` calls of ``fn`` launch, by kernel name:
    (total µs over all the calls, launches), from torch.profiler's CUDA activity.

    Names are as the driver reports them (a Triton kernel under its function's name, e.g.
    ``norms_kernel``); memcpy/memset activities are listed under their names too."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    times: dict[str, tuple[float, int]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        if "annotation" in str(getattr(e, "activity_type", "") or ""):
            continue
        us, n = times.get(e.name, (0.0, 0))
        times[e.name] = (us + e.time_range.elapsed_us(), n + 1)
    return times


def count_host_syncs(fn: Callable[[], None], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by one call of ``fn``, caught by
    ``torch.cuda.set_sync_debug_mode("warn")`` (the counting form of "error").
    None on CPU, where every op is synchronous and the question does not arise."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def paired_ratio(iterate, iterations, reference, device, rounds) -> tuple[float, float]:
    """Median and IQR of (this step / reference step) over rounds that alternate the two
    (ABBA order) on the same parameters, so load that comes and goes hits both alike."""
    ref_one = time_median(reference, device, reps=1)
    ref_iterations = max(1, round(iterations * time_median(iterate, device, reps=1)
                                  / max(ref_one, 1e-9)))

    def timed(fn, n):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return (time.perf_counter() - t0) / n

    ratios = []
    for k in range(rounds):
        if k % 2:
            ref = timed(reference, ref_iterations)
            mine = timed(iterate, iterations)
        else:
            mine = timed(iterate, iterations)
            ref = timed(reference, ref_iterations)
        ratios.append(mine / ref)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[2] - q[0]
