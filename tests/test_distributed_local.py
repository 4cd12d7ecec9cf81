"""The distributed code within one process: the loss reduction's arithmetic, argument checks,
copies, and DTensor parameters on a process group of one rank (``koala_triton/_distributed.py``).

The 2-rank runs are in ``test_distributed.py``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist

from koala_triton import _distributed
from koala_triton._loss import LossInput
from tests.variants import variant_params

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

#: Σ over ranks then / n, against torch's mean over the whole vector: the same float64 terms
#: added in another order (n = 13 terms of magnitude ≤ 4: a few ulps of the sum).
MOMENT_RTOL = 1e-14


def _ranks_losses():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, generator=g) * 3, torch.rand(5, generator=g) * 3  # uneven: 8 and 5 samples


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive-R", "fixed-R"])
@pytest.mark.parametrize("floor", [0.0, -0.5, 1.25])
def test_the_ranks_loss_sums_give_the_whole_batch_moments_above_the_floor(adaptive, floor):
    a, b = _ranks_losses()
    reduced = _distributed.loss_sums(LossInput(a, None, adaptive, floor)) + \
        _distributed.loss_sums(LossInput(b, None, adaptive, floor))
    got = _distributed.global_loss(reduced, adaptive)
    mean, second = LossInput(torch.cat([a, b]), None, adaptive, floor).moments()
    assert got.floor == 0.0 and not got.per_sample
    got_mean, got_second = got.moments()
    torch.testing.assert_close(got_mean, mean, rtol=MOMENT_RTOL, atol=0.0)
    if adaptive:
        torch.testing.assert_close(got_second, second, rtol=MOMENT_RTOL, atol=0.0)
    else:
        assert got_second is None and second is None
    # The hand-off is exact: the floor is subtracted once, before the sums; the backends'
    # floor arithmetic with f = 0 returns the reduced moments bit for bit.
    assert torch.equal(got_mean, reduced[0] / reduced[2])
    if adaptive:
        assert torch.equal(got_second, reduced[1] / reduced[2])


def test_a_scalar_loss_counts_as_one_sample_with_its_own_second_moment():
    a, b = _ranks_losses()
    floor = 0.5
    scalar = LossInput(a.double().mean(), (a.double() ** 2).mean(), True, floor)
    reduced = _distributed.loss_sums(scalar) + _distributed.loss_sums(LossInput(b, None, True, floor))
    assert float(reduced[2]) == 1 + 5
    expected_mean = ((a.double().mean() - floor) + (b.double() - floor).sum()) / 6
    torch.testing.assert_close(_distributed.global_loss(reduced, True).moments()[0], expected_mean,
                               rtol=MOMENT_RTOL, atol=0.0)


@pytest.mark.parametrize("variant", variant_params())
def test_bad_distributed_arguments_name_themselves(variant):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="process_group"):
        variant.cls([p], process_group="world")
    with pytest.raises(TypeError, match="reduce_loss"):
        variant.cls([p], reduce_loss=1)


@pytest.mark.parametrize("variant", variant_params())
def test_without_a_process_group_nothing_is_reduced_and_copies_keep_the_choice(variant):
    assert not dist.is_initialized()
    p = torch.zeros(3, requires_grad=True)
    opt = variant.cls([p], reduce_loss=False)
    assert opt._collectives.loss_group() is None
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._collectives.reduce_loss is False and clone._collectives.process_group is None


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one rank in this process (destroyed afterwards), and its mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` as ``p`` is: a DTensor with ``p``'s mesh and placements, or a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(t, p.device_mesh, p.placements) if isinstance(p, DTensor) else t


def _train(cls, params, steps=4):
    """A few steps on fixed gradients and losses; returns the weights (local) and the filter."""
    g = torch.Generator().manual_seed(1)
    opt = cls([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.1}])
    for _ in range(steps):
        opt.predict()
        for p in params:
            p.grad = _like(torch.randn(p.shape, generator=g), p)
        opt.step(loss=torch.rand(6, generator=g))
    local = _distributed.local_tensors(params)
    return [t.detach().clone() for t in local], {k: v.clone() for k, v in opt.filter_state.items()}


@pytest.mark.parametrize("variant", variant_params())
def test_dtensor_parameters_on_one_rank_step_as_plain_tensors_bit_for_bit(variant, one_rank):
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(5, 3, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()]
    sharded = [distribute_tensor(p.detach().clone(), one_rank, [Shard(0)]).requires_grad_() for p in plain]
    want_params, want_filter = _train(variant.cls, plain)
    got_params, got_filter = _train(variant.cls, sharded)
    for a, b in zip(got_params, want_params):
        assert torch.equal(a, b)
    for key, value in want_filter.items():
        assert torch.equal(got_filter[key], value), key


@pytest.mark.parametrize("variant", variant_params())
def test_a_partial_dtensor_parameter_is_refused_naming_it(variant, one_rank):
    from torch.distributed.tensor import DTensor, Partial

    p = DTensor.from_local(torch.zeros(3), one_rank, [Partial()]).requires_grad_()
    with pytest.raises(ValueError, match=r"params: parameter 1 of param group 0 is a DTensor with placement Partial"):
        variant.cls([torch.zeros(2, requires_grad=True), p])


def test_row_sums_add_each_tensors_chunk_partials_in_slot_order_across_dtype_groups():
    """The Triton path's per-tensor sums of a rank's chunk partials (``kernels/shards.py``):
    rows of three dtypes interleaved (chunks are grouped by dtype, slots are not), an empty
    tensor, tensors of one and of several chunks. Integer-valued partials: every order of
    addition is exact, so the sums must equal the slot table's ranges bit for bit."""
    pytest.importorskip("triton")
    from koala_triton.kernels import shards, tables
    from koala_triton.kernels.launch import INTERPRETER_BLOCKS

    specs = [(300, torch.float32), (5, torch.float64), (0, torch.float32), (129, torch.bfloat16),
             (1, torch.float64), (257, torch.float32), (128, torch.bfloat16)]
    rows = [{"x": torch.zeros(n, dtype=dtype)} for n, dtype in specs]
    k = len(rows)
    table = tables.table(rows, list(range(k)), k, INTERPRETER_BLOCKS, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    partials = torch.randint(-50, 50, (table.n_chunks, 3), generator=g).double()
    ranges = table.slot_chunks.view(k, 2).tolist()
    expected = torch.stack([partials[first:first + count].sum(0) for first, count in ranges])
    assert len(table.groups) == 3 and table.row_order != list(range(k))
    assert torch.equal(shards.row_sums(table, partials.reshape(-1)), expected)
    flags = (True, False, True, False, True, True, False)
    mask = shards.chunk_mask(table, flags, torch.device("cpu"))
    expected_mask = torch.zeros(table.n_chunks, dtype=torch.bool)
    for (first, count), flag in zip(ranges, flags):
        expected_mask[first:first + count] = flag
    assert torch.equal(mask, expected_mask)
    one = shards.one_chunk_per_slot(table, k, torch.device("cpu")).view(k, 2)
    assert one.tolist() == [[i, 1] for i in range(k)]
