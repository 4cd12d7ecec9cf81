"""The host-side caches of a step against uncached ground truth, through every event that must
invalidate them.

A step reuses, between calls: the flat parameter list, the *layout* (which tensors have a
gradient, zero-weight-decay groups first), the per-tensor device vectors of the group values,
KOALA-M's lists of state tensors (``_optimizer._plan``, ``koala_m._state_lists``) and, on the
Triton path, the pointer and chunk tables under a per-step signature of the storages
(``kernels/tables.prepare``). A stale cache would update the wrong tensors, with old group
values, or through stale addresses. These tests change each input a cache depends on between
steps and compare with something that caches nothing:

- the PyTorch path (float64) against the plain float64 loop of ``tests/reference.py`` at the
  same 1e-12 as ``test_matches_reference`` (same error model: identical float64 expressions in
  another order);
- the Triton path (float32, interpreter) against the PyTorch path at
  ``test_triton_interpreter``'s 1e-5 (same error model: fp32 norm accumulation order);
- how often tables are built (a cache that never hits would pass the tests above).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from koala_triton import KoalaV
from tests.helpers import assert_matches_reference, reference_groups, reference_params
from tests.variants import variant_params

STEPS = 14


def _new_group_params(gen):
    return [torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(2, 3, generator=gen, dtype=torch.float64).requires_grad_()]


def _change_groups(step, opt, ref, params, gen):
    """Between steps, change what the layout and the group vectors are cached under."""
    groups = list(zip(opt.param_groups, ref.groups))
    for (g_opt, g_ref), base in zip(groups, (0.7, 0.4, 0.5)):
        g_opt["lr"] = g_ref["lr"] = base * (0.5 + 0.5 * math.cos(step))  # every step
    if step == 2:  # group 1 loses its weight decay: its tensors join the plain part
        for g in groups[1]:
            g["weight_decay"] = 0.0
    if step == 4:  # group 0 gains one: the layout reorders
        for g in groups[0]:
            g["weight_decay"] = 0.02
    if step == 6:  # a larger skip threshold in group 1: a value change, same layout
        for g in groups[1]:
            g["eps"] = 3.0
    if step == 8:  # a new group: a longer flat list
        new = _new_group_params(gen)
        opt.add_param_group({"params": new, "lr": 0.5, "weight_decay": 0.01})
        ref.add_group({"params": new, "lr": 0.5, "weight_decay": 0.01, "eps": 1e-9})
        params.extend(new)
    if step == 10:  # a checkpoint round trip replaces the state tensors (KOALA-M's lists)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _grads(params, step, gen):
    """Random gradients; the set with a gradient changes from step to step, until step 11
    (from then on the layout stays while the lr keeps changing)."""
    grads = []
    for i, p in enumerate(params):
        if step < 11 and ((i + step) % 5 == 0 or step == 7):
            grads.append(None)
        else:
            grads.append(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return grads


@pytest.mark.parametrize("variant", variant_params())
def test_pytorch_path_matches_reference_while_groups_and_grads_change(variant):
    params = reference_params(torch.float64)
    ref = variant.reference(reference_groups(params))
    opt = variant.cls(reference_groups(params), fused=False)
    gen = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        _change_groups(step, opt, ref, params, gen)
        opt.predict()
        ref.predict()
        grads = _grads(params, step, gen)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        losses = torch.rand(8, generator=gen, dtype=torch.float64) * 2
        opt.step(loss=losses)
        ref.update(float(losses.mean()), float((losses ** 2).mean()), grads)
        # the weights, the first state array (the velocity; KOALA++'s v) and the weights' variance
        assert_matches_reference(opt, params, ref, f"step {step}", state_keys=variant.state_keys[:1],
                                 filter_keys=variant.covariance_keys[:1])
    # the events really changed the trajectory's inputs: the eps change skipped tensors
    assert len(opt.param_groups) == 3


def test_eps_change_takes_effect_on_the_next_step():
    """A changed group value reaches the device vectors (the layout itself is unchanged)."""
    p = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = KoalaV([p], fused=False)
    for eps, moves in ((1e-9, True), (10.0, False), (1e-9, True)):
        opt.param_groups[0]["eps"] = eps
        before = p.detach().clone()
        opt.predict()
        p.grad = torch.ones(4, dtype=torch.float64)
        opt.step(loss=torch.tensor(1.0, dtype=torch.float64), loss_var=torch.tensor(1.0, dtype=torch.float64))
        assert (not torch.equal(p.detach(), before)) == moves, f"eps={eps}"
