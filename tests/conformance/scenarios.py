"""The trajectories the conformance tests replay (small on purpose: the oracle runs at 60 digits
and the Triton interpreter is slow). Shapes include a 0-dim tensor, an empty tensor and a
non-contiguous one; three param groups with their own lr, weight decay and eps.

Each variant's hyper-parameters and its own extra scenarios are in its registry entry
(``tests/variants.py``: ``scenario_hyper``, ``extra_scenarios``)."""

from __future__ import annotations

from tests.conformance.harness import NONCONTIGUOUS, OMIT, Scenario, Step
from tests.variants import VariantInfo

GROUPS = [
    {"shapes": [(5, 3), (3,)], "lr": 0.5, "weight_decay": 0.05},
    {"shapes": [(7,), ()], "lr": 0.25},
    {"shapes": [(NONCONTIGUOUS, (2, 7)), (4, 4), (0,)], "eps": 1e-6, "weight_decay": 0.01},
]
# flat indices: 0 (5,3)  1 (3,)  2 (7,)  3 ()  4 (2,7)^T  5 (4,4)  6 (0,)

_SCALES = [1.0, 0.5, 2.0, 1.0, 0.25]
_LOSSES = [2.0, 1.5, 1.25, 1.0, 0.75]


def _plain_steps() -> list[Step]:
    return [Step(loss=L, scale=s) for L, s in zip(_LOSSES, _SCALES)]


def scenarios(variant: VariantInfo) -> list[Scenario]:
    hyper = dict(variant.scenario_hyper)
    out = [
        # groups with their own lr / weight decay / eps; R estimated from loss_var
        Scenario("groups-and-weight-decay", GROUPS, hyper, _plain_steps()),
        # the skip rule: None grads, a grad below eps, a frozen tensor, a step where nothing
        # is updated (h = 0, so P+ = P^ while R still moves)
        Scenario("skip-rule", [dict(GROUPS[0]), {**GROUPS[1], "frozen": [1]}, GROUPS[2]], hyper, [
            Step(loss=2.0),
            Step(loss=1.5, grads={1: "none", 2: "tiny", 4: "none", 5: "none"}),
            Step(loss=1.25, grads={i: "none" for i in range(7)}),
            Step(loss=1.0, grads={0: "tiny"}, scale=0.5),
        ]),
        # non-finite inputs skip the whole measurement update and count it; each alone: a NaN
        # (or -inf, as a Python float) loss with a finite loss_var, a grad, an inf loss_var
        Scenario("non-finite-inputs", GROUPS, hyper, [
            Step(loss=2.0),
            Step(loss=float("nan"), loss_var=2.0),
            Step(loss=1.5, grads={0: "inf"}),
            Step(loss=1.5, grads={5: "nan"}),
            Step(loss=1.25, loss_var=float("inf")),
            Step(loss=float("-inf"), loss_var=2.0, python_scalars=True),
            Step(loss=1.0, scale=0.5),
        ]),
        # with a fixed r, loss_var is not an input: omitted, NaN or inf it must not skip the
        # update; a NaN loss or an inf grad still skips it
        Scenario("non-finite-inputs-fixed-r", GROUPS, {**hyper, "r": 0.3}, [
            Step(loss=2.0, loss_var=OMIT),
            Step(loss=1.5, loss_var=float("nan")),
            Step(loss=float("nan"), loss_var=OMIT, python_scalars=True),
            Step(loss=1.25, loss_var=float("inf"), python_scalars=True, scale=0.5),
            Step(loss=1.0, loss_var=OMIT, grads={2: "inf"}),
            Step(loss=0.75, loss_var=OMIT, python_scalars=True),
        ]),
        # fixed R; a scheduler rewriting lr between steps, including lr = 0
        Scenario("fixed-r-and-lr-schedule", GROUPS, {**hyper, "r": 0.3}, [
            Step(loss=2.0, lr={0: 1.0}),
            Step(loss=1.5, lr={0: 0.5, 1: 0.125}),
            Step(loss=1.25, lr={0: 0.0, 1: 0.0, 2: 0.0}),
            Step(loss=1.0, lr={0: 0.25, 1: 0.5, 2: 1.0}),
        ]),
        # a scheduler rewriting weight_decay between steps, to and from 0. Groups without decay
        # take their own code path, so the step layout is cached per zero/non-zero pattern and
        # the per-group vectors on the values: the schedule changes values within a pattern
        # (step 2) and comes back to a cached pattern with other values (step 3)
        Scenario("weight-decay-schedule", GROUPS, hyper, [
            Step(loss=2.0),                                              # (0.05, 0, 0.01)
            Step(loss=1.5, weight_decay={0: 0.0, 1: 0.02}, scale=0.5),   # (0, 0.02, 0.01)
            Step(loss=1.25, weight_decay={1: 0.125, 2: 0.03}),           # (0, 0.125, 0.03)
            Step(loss=1.0, weight_decay={0: 0.1, 1: 0.0}),               # (0.1, 0, 0.03)
            Step(loss=0.75, weight_decay={0: 0.0, 2: 0.0}, scale=2.0),   # every group at 0
        ]),
        # update(float, float) with Python numbers, as users pass loss.item(): values float32
        # cannot hold (a rounding on the way in moves float64 weights far beyond their bounds),
        # and Python ints
        Scenario("python-float-loss", GROUPS, hyper, [
            Step(loss=1.1, python_scalars=True),
            Step(loss=0.7, loss_var=0.9, python_scalars=True, scale=0.5),
            Step(loss=2, loss_var=5, python_scalars=True),
            Step(loss=1.0 / 3.0, python_scalars=True, scale=2.0),
        ]),
        # predict() twice (and three times) before an update: only the first predicts, the
        # others change nothing (predict() is idempotent within an iteration; fold mode's
        # predict after a folded update only acknowledges it)
        Scenario("double-predict", GROUPS, hyper, [
            Step(loss=2.0),
            Step(loss=1.5, predicts=2),
            Step(loss=1.25, predicts=2, scale=0.5),
            Step(loss=1.0, predicts=3),
            Step(loss=0.75),
        ]),
        # step(loss=per-sample losses): the implementation forms mean and mean of squares
        Scenario("per-sample-losses", GROUPS, hyper, [
            Step(per_sample=[2.5, 1.0, 0.5, 3.0, 1.25, 0.75, 2.0, 1.5], scale=s)
            for s in (1.0, 0.5, 2.0)
        ]),
    ]
    # the variant's own: plain steps with its options on top of its hyper-parameters
    for name, options in variant.extra_scenarios.items():
        out.append(Scenario(name, GROUPS, {**hyper, **options}, _plain_steps()[:4]))
    return out


def ids(items: list[Scenario]) -> list[str]:
    return [s.id for s in items]
