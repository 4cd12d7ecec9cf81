"""torch.distributed: DDP and FSDP2 on 2 ranks take the steps of one process on the whole batch.

Two gloo ranks on the CPU (``tests/distributed_launch.py``: spawned processes, a FileStore in a
temporary directory, bounded in time) run every scenario of ``tests/distributed_scenarios.py``
once per module: every variant and mode of the registry under FSDP2 (``fully_shard`` on every
layer) on the PyTorch path and on the Triton path (``fused=True``: the real kernels in
Triton's interpreter, typed as compiled Triton types them; their compile keys join this
session's sm_90 compile check), and under DDP (half a batch per rank; on the Triton path each
variant's default mode); a 5 + 3 split with a loss floor and the ``observe()`` hand-off on each
path; FSDP2 next to a plain replicated layer; the ``reduce_loss=False`` opt-out; checkpoint
round trips with torch.distributed.checkpoint; the example script with FSDP2. On the PyTorch
path every ``predict()`` and update runs with host reads forbidden
(``tests/helpers.forbid_host_reads``), so a rank that synchronised would fail the whole run.
Each scenario's one-process run is computed here; the README's torchrun command runs too.

Error model of "the same weights" (float32 model, 10 steps). The ranks' and the one process's
runs differ only in the order of float32 sums: the forward pass of 4 rows instead of 8 (BLAS
blocking; each logit a few ulps, u = 2⁻²⁴ ≈ 6e-8), the gradient as the average of two
half-batch sums, and FSDP2's per-shard norms. Each is at most ~8u ≈ 5e-7 relative per step on
the quantities a step uses (loss moments, gradients, norms), and KOALA's step x − c·g is a
small correction to x: over 10 steps the weights drift by at most ~10 · 5e-7 = 5e-6 of their
magnitude in the worst case (measured: at most 4.3e-7, DDP KoalaV with fixed R). Hence
``RTOL = 1e-5`` of each tensor's largest |value|, and of each float filter entry; the counters
match exactly. A missing reduction is far outside it: without the loss reduction the ranks'
weights differ from the one process's by 0.15 to 0.24 of their magnitude
(``test_without_loss_reduction_ranks_diverge``). Across ranks the filter (replicated, computed
from the same all-reduced values) and the weights must be identical bit for bit, and a
checkpoint round trip must resume bit for bit.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import compiled_typing
from tests.distributed_launch import run_ranks
from tests.distributed_scenarios import SCENARIOS, Run, rank_main, train
from tests.helpers import assert_close_scaled
from tests.variants import case as case_of

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
#: See the module docstring.
RTOL = 1e-5
#: The whole session's distributed runs (spawn, 2 ranks, every scenario) must end within this.
TIMEOUT_S = 240
#: ``koala_triton/examples/ddp.py`` runs: with FSDP2 inside the spawned ranks (KoalaM, its
#: default, and KoalaPlusPlus); as the README shows it (DDP, under torchrun) in
#: ``test_the_readme_torchrun_example_runs``.
EXAMPLE_ARGVS = {"M": ("--fsdp", "--steps", "10"), "PP": ("--fsdp", "--variant", "PP", "--steps", "10")}

#: The scenarios this machine can run (the Triton path needs triton, for its interpreter).
RUNNABLE = [name for name, s in SCENARIOS.items() if s.path == "torch" or importlib.util.find_spec("triton")]
MATCHED = [name for name, s in SCENARIOS.items() if dict(s.kwargs).get("reduce_loss", True)]
UNREDUCED = [name for name in SCENARIOS if name not in MATCHED]
CHECKPOINTED = [name for name, s in SCENARIOS.items() if s.checkpoint is not None]
_ONE_PROCESS: dict[tuple, Run] = {}  # one-process runs, shared by scenarios that train alike


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks returned (``distributed_scenarios.rank_main``; one spawn)."""
    directory = tmp_path_factory.mktemp("distributed")
    results = run_ranks(rank_main, WORLD, directory, TIMEOUT_S, RUNNABLE, str(directory),
                        tuple(EXAMPLE_ARGVS.values()))
    for result in results:
        compiled_typing.add_keys(result["compile_keys"])
    return results


@pytest.fixture(scope="module")
def ranks(spawned) -> list[dict[str, Run]]:
    """Every runnable scenario's ``Run`` on each of the 2 ranks."""
    return [result["runs"] for result in spawned]


@pytest.fixture
def runs(request, ranks) -> list[Run]:
    """The parametrized scenario's ``Run`` on each rank (skipped where it cannot run)."""
    name = request.node.callspec.params["name"]
    if name not in RUNNABLE:
        pytest.skip("the Triton path needs triton (its interpreter runs the kernels on the CPU)")
    return [r[name] for r in ranks]


def _one_process(name: str, monkeypatch) -> Run:
    """The scenario's run as one process on the whole batch (no process group)."""
    scenario = SCENARIOS[name]
    if scenario.one_process not in _ONE_PROCESS:
        if scenario.path == "triton":
            pytest.importorskip("triton")
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        _ONE_PROCESS[scenario.one_process] = train(scenario)
    return _ONE_PROCESS[scenario.one_process]


def _assert_identical_across_ranks(runs: list[Run], what: str) -> None:
    first = runs[0]
    for rank, run in enumerate(runs[1:], start=1):
        for key, value in first.filter.items():
            assert torch.equal(run.filter[key], value), f"{what}: filter {key} differs on rank {rank}"
        for i, (a, b) in enumerate(zip(first.params, run.params)):
            assert torch.equal(a, b), f"{what}: weights {i} differ on rank {rank}"


def _max_relative_gap(params, reference) -> float:
    return max(float((a.double() - b.double()).abs().max() / b.double().abs().max()) for a, b in zip(params, reference))


@pytest.mark.parametrize("name", MATCHED)
def test_ranks_take_the_steps_of_one_process_on_the_whole_batch(name, runs, monkeypatch):
    _assert_identical_across_ranks(runs, name)
    one = _one_process(name, monkeypatch)
    for i, (p, q) in enumerate(zip(runs[0].params, one.params)):
        assert_close_scaled(p, q, RTOL, f"{name}: weights {i}")
    for key, value in one.filter.items():
        if value.dtype == torch.int64:
            assert torch.equal(runs[0].filter[key], value), f"{name}: filter {key}"
        else:
            torch.testing.assert_close(runs[0].filter[key], value, rtol=RTOL, atol=0.0,
                                       msg=lambda m: f"{name}: filter {key}: {m}")


def _expected_collectives(name: str, iteration: int) -> list[tuple[str, str, int]]:
    """The documented collectives of one iteration (``koala_triton/_distributed.py``): DDP one
    all-reduce of the [3] loss sums per update; DTensor parameters one of [ck + 3] (k = 4
    tensors with a gradient, c the variant's ``tensor_sums``: 3, KOALA++ 5; [ck] with
    ``reduce_loss=False``) per update and, for KOALA-M, one [1] distance sum per predict (fold
    mode: in the update instead, and in its first predict)."""
    scenario = SCENARIOS[name]
    case = case_of(scenario.case)
    reduce_loss = dict(scenario.kwargs).get("reduce_loss", True)
    sums = case.variant.tensor_sums * 4 + 3 * reduce_loss
    loss, norms, distance = [("allreduce_", "torch.float64", n) for n in (3, sums, 1)]
    if scenario.wrap == "ddp":
        return [loss] if reduce_loss else []
    if not case.variant.has_velocity:
        return [norms]
    if case.fold:
        return ([distance] if iteration == 0 else []) + [norms, distance]
    return [distance, norms]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_collectives_per_iteration_are_the_documented_few(name, runs):
    for rank, run in enumerate(runs):
        for iteration, calls in enumerate(run.collectives):
            assert calls == _expected_collectives(name, iteration), f"{name}: rank {rank}, iteration {iteration}"


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_a_distributed_checkpoint_round_trip_resumes_bit_for_bit(name, runs):
    for rank, run in enumerate(runs):
        assert run.resumed is not None, f"{name}: no resumed run on rank {rank}"
        for key, value in run.filter.items():
            assert torch.equal(run.resumed["filter"][key], value), f"{name}: filter {key} on rank {rank}"
        for i, (a, b) in enumerate(zip(run.resumed["params"], run.params)):
            assert torch.equal(a, b), f"{name}: weights {i} on rank {rank}"


@pytest.mark.parametrize("name", UNREDUCED)
def test_without_loss_reduction_ranks_diverge(name, runs, monkeypatch):
    """``reduce_loss=False`` (the opt-out): each rank observes its own half batch, as before
    this feature (under FSDP2 the shards' norms are still reduced): the ranks' filters part,
    and the weights leave the one process's far outside ``RTOL``."""
    assert any(not torch.equal(runs[0].filter[k], runs[1].filter[k]) for k in runs[0].filter)
    one = _one_process(name, monkeypatch)
    for run in runs:
        assert _max_relative_gap(run.params, one.params) > 100 * RTOL


@pytest.mark.parametrize("index", range(len(EXAMPLE_ARGVS)), ids=list(EXAMPLE_ARGVS))
def test_the_fsdp_example_trains_on_spawned_ranks(spawned, index):
    losses = [result["examples"][index] for result in spawned]
    assert all(isinstance(loss, float) for loss in losses), losses  # else the error it raised
    assert losses[0] == losses[1] and math.isfinite(losses[0]) and losses[0] < 1.0


def test_the_readme_torchrun_example_runs():
    """The README's command, with fewer steps: torchrun on 2 CPU processes (gloo, loopback)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "koala_triton.examples.ddp", "--steps", "10"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 ranks, DDP: filters identical on all ranks: True" in done.stdout, done.stdout
