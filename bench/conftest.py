"""pytest options and fixtures for the optimizer benchmarks.

    pytest bench --benchmark-enable                # smoke mode (default): small sizes, CI
    pytest bench --benchmark-enable --koala-bench=full   # full sizes for the device found
    pytest bench --benchmark-enable --koala-bench=full --benchmark-json=results.json

``--benchmark-enable`` is needed because the project's default options disable timing (each
benchmark then runs once as a plain test, with no table in the output).
    pytest bench --koala-sets=gpt2-small --koala-dtypes=fp32 --koala-providers=koala_v_torch,sgdm_foreach

Every option also reads an environment variable (KOALA_BENCH, KOALA_BENCH_DEVICE,
KOALA_BENCH_SETS, KOALA_BENCH_DTYPES, KOALA_BENCH_PROVIDERS, KOALA_BENCH_THREADS,
KOALA_BENCH_ROUNDS, KOALA_BENCH_PAIRED, KOALA_BENCH_BUDGET_S); the command line wins.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass

import pytest
import torch

from bench import measure
from bench.providers import PROVIDERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Mode:
    """Which (set, dtype) pairs run, and how long each benchmark may take."""

    cases: tuple[tuple[str, str], ...]
    rounds: int          # timed rounds per benchmark (the median is over these)
    round_s: float       # target length of one round; iterations per round are sized to it
    max_case_s: float    # timed rounds of one benchmark stop near this (never fewer than 3)
    copy_bytes: int      # buffer size of the device-to-device copy reference


def _pairs(sets, dtypes):
    return tuple((s, d) for s in sets for d in dtypes)


MODES = {
    # CI on a 2-core CPU: every provider runs, tensor counts of the real models kept, sizes small.
    "smoke": Mode(_pairs(["resnet18-w16"], ["fp32", "bf16"])
                  + _pairs(["gpt2-tiny", "many-small-200x1K", "huge-1x4M"], ["fp32"]),
                  rounds=5, round_s=0.005, max_case_s=1.0, copy_bytes=64 * 2 ** 20),
    # Full sizes that a 2-core CPU finishes in ~5 minutes (~10 with --koala-paired), GPT-2
    # small fp32 included.
    "full-cpu": Mode(_pairs(["resnet18", "resnet50", "gpt2-small", "many-small-1000x1K",
                             "huge-1x64M"], ["fp32"])
                     + _pairs(["resnet18"], ["bf16"]),
                     rounds=11, round_s=0.1, max_case_s=60.0, copy_bytes=512 * 2 ** 20),
    # One H100/H200 in a few minutes: the real models in fp32, then in bf16.
    "full-cuda": Mode(_pairs(["gpt2-small", "resnet18", "resnet50", "gpt2-medium",
                              "many-small-1000x1K", "huge-1x256M"], ["fp32"])
                      + _pairs(["gpt2-small", "resnet18", "resnet50", "gpt2-medium",
                                "many-small-1000x1K", "huge-1x256M"], ["bf16"]),
                      rounds=10, round_s=0.01, max_case_s=1.5, copy_bytes=2 ** 30),
}


def pytest_addoption(parser):
    group = parser.getgroup("koala-bench", "KOALA optimizer benchmarks")
    group.addoption("--koala-bench", choices=["smoke", "full"],
                    default=os.environ.get("KOALA_BENCH", "smoke"),
                    help="smoke: small sizes (default, CI); full: real model sizes")
    group.addoption("--koala-device", default=os.environ.get("KOALA_BENCH_DEVICE", "auto"),
                    help="auto (cuda if available), cpu, cuda or cuda:N")
    group.addoption("--koala-sets", default=os.environ.get("KOALA_BENCH_SETS", ""),
                    help="comma-separated parameter sets (overrides the mode's list)")
    group.addoption("--koala-dtypes", default=os.environ.get("KOALA_BENCH_DTYPES", ""),
                    help="comma-separated dtypes among fp32,bf16 (filters the mode's list)")
    group.addoption("--koala-providers", default=os.environ.get("KOALA_BENCH_PROVIDERS", ""),
                    help=f"comma-separated providers among {','.join(PROVIDERS)}")
    group.addoption("--koala-threads", type=int,
                    default=int(os.environ.get("KOALA_BENCH_THREADS", "0")),
                    help="torch.set_num_threads for the run (0: leave torch's default)")
    group.addoption("--koala-paired", default=os.environ.get("KOALA_BENCH_PAIRED", ""),
                    help="also time each provider in alternation with this one (e.g. "
                         "sgdm_foreach) on the same parameters and record the median ratio: "
                         "robust to other load on a shared CPU")
    group.addoption("--koala-rounds", type=int,
                    default=int(os.environ.get("KOALA_BENCH_ROUNDS", "0")),
                    help="timed rounds per benchmark (0: the mode's number)")
    group.addoption("--koala-budget-s", type=float,
                    default=float(os.environ.get("KOALA_BENCH_BUDGET_S", "0")),
                    help="skip the remaining benchmarks once this many seconds have passed "
                         "(0: no budget); the JSON then holds those that ran")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def bench_device(config) -> torch.device:
    name = config.getoption("--koala-device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def bench_mode_name(config) -> str:
    mode = config.getoption("--koala-bench")
    if mode == "full":
        mode = "full-cuda" if bench_device(config).type == "cuda" else "full-cpu"
    return mode


def bench_cases(config) -> list[tuple[str, str, str]]:
    """(set, dtype, provider) triples, grouped by (set, dtype) so the parameters are reused."""
    mode = MODES[bench_mode_name(config)]
    pairs = list(mode.cases)
    sets = _csv(config.getoption("--koala-sets"))
    dtypes = _csv(config.getoption("--koala-dtypes"))
    if sets:
        wanted = dtypes or sorted({d for _, d in pairs}, key=list(DTYPES).index)
        pairs = _pairs(sets, wanted)
    elif dtypes:
        pairs = [(s, d) for s, d in pairs if d in dtypes]
    for _, d in pairs:
        if d not in DTYPES:
            raise pytest.UsageError(f"unknown dtype {d!r}; known: {list(DTYPES)}")
    providers = _csv(config.getoption("--koala-providers")) or list(PROVIDERS)
    paired = config.getoption("--koala-paired")
    for p in providers + ([paired] if paired else []):
        if p not in PROVIDERS:
            raise pytest.UsageError(f"unknown provider {p!r}; known: {list(PROVIDERS)}")
    return [(s, d, p) for s, d in pairs for p in providers]


def pytest_configure(config):
    config.addinivalue_line("markers", "koala_bench: an optimizer-step benchmark (bench/)")
    config.stash[_START_KEY] = time.monotonic()
    config.stash[_LOAD_KEY] = [os.getloadavg()[0]]
    threads = config.getoption("--koala-threads")
    if threads:
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = bench_cases(metafunc.config)
        metafunc.parametrize("case", cases, ids=["-".join(c) for c in cases])


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return bench_device(pytestconfig)


@pytest.fixture(scope="session")
def paired_with(pytestconfig) -> str | None:
    return pytestconfig.getoption("--koala-paired") or None


@pytest.fixture(scope="session")
def mode(pytestconfig) -> Mode:
    mode = MODES[bench_mode_name(pytestconfig)]
    rounds = pytestconfig.getoption("--koala-rounds")
    return dataclasses.replace(mode, rounds=rounds) if rounds else mode


@pytest.fixture(scope="session")
def copy_gbps(pytestconfig, device, mode) -> float:
    """Device-to-device copy bandwidth, measured once per run: the practical ceiling."""
    value = measure.copy_bandwidth_gbps(device, mode.copy_bytes)
    pytestconfig.stash[_COPY_KEY] = value
    return value


_COPY_KEY = pytest.StashKey[float]()
_START_KEY = pytest.StashKey[float]()
_LOAD_KEY = pytest.StashKey[list]()


@pytest.fixture
def within_budget(pytestconfig) -> None:
    """Skip once the run's time budget (--koala-budget-s) is spent."""
    budget = pytestconfig.getoption("--koala-budget-s")
    elapsed = time.monotonic() - pytestconfig.stash[_START_KEY]
    if budget and elapsed > budget:
        pytest.skip(f"time budget of {budget:.0f} s spent ({elapsed:.0f} s)")
    pytestconfig.stash[_LOAD_KEY].append(os.getloadavg()[0])


def pytest_benchmark_update_machine_info(config, machine_info):
    """Provenance for bench/report.py: device, versions, date, mode, copy bandwidth."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import koala_triton
        koala_version = getattr(koala_triton, "__version__", None)
    except ImportError:
        koala_version = None
    device = bench_device(config)
    machine_info["koala_bench"] = {
        "device": str(device),
        "device_name": measure.device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "koala_triton": koala_version,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "mode": bench_mode_name(config),
        "copy_gbps": config.stash.get(_COPY_KEY, None),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_min": min(config.stash.get(_LOAD_KEY, [0.0]) + [os.getloadavg()[0]]),
        "loadavg_1min_max": max(config.stash.get(_LOAD_KEY, [0.0]) + [os.getloadavg()[0]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
