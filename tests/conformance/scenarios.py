"""The trajectories the conformance tests replay (small on purpose: the oracle runs at 60 digits
and the Triton interpreter is slow). Shapes include a 0-dim tensor, an empty tensor and a
non-contiguous one; three param groups with their own lr, weight decay and eps."""

from __future__ import annotations

from tests.conformance.harness import NONCONTIGUOUS, Scenario, Step

GROUPS = [
    {"shapes": [(5, 3), (3,)], "lr": 0.5, "weight_decay": 0.05},
    {"shapes": [(7,), ()], "lr": 0.25},
    {"shapes": [(NONCONTIGUOUS, (2, 7)), (4, 4), (0,)], "eps": 1e-6, "weight_decay": 0.01},
]
# flat indices: 0 (5,3)  1 (3,)  2 (7,)  3 ()  4 (2,7)^T  5 (4,4)  6 (0,)

HYPER_V = {"sigma": 0.2, "q": 0.5, "alpha_r": 0.8}
HYPER_M = {"sw": 0.2, "sc": 0.02, "sv": 0.1, "a": 0.9, "qw": 1e-2, "qv": 2e-2, "alpha_r": 0.8}

_SCALES = [1.0, 0.5, 2.0, 1.0, 0.25]
_LOSSES = [2.0, 1.5, 1.25, 1.0, 0.75]


def _plain_steps() -> list[Step]:
    return [Step(loss=L, scale=s) for L, s in zip(_LOSSES, _SCALES)]


def scenarios(variant: str) -> list[Scenario]:
    hyper = HYPER_V if variant == "V" else HYPER_M
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
        # non-finite inputs skip the whole measurement update and count it
        Scenario("non-finite-inputs", GROUPS, hyper, [
            Step(loss=2.0),
            Step(loss=float("nan")),
            Step(loss=1.5, grads={0: "inf"}),
            Step(loss=1.5, grads={5: "nan"}),
            Step(loss=1.25, loss_var=float("inf")),
            Step(loss=1.0, scale=0.5),
        ]),
        # fixed R; a scheduler rewriting lr between steps, including lr = 0
        Scenario("fixed-r-and-lr-schedule", GROUPS, {**hyper, "r": 0.3}, [
            Step(loss=2.0, lr={0: 1.0}),
            Step(loss=1.5, lr={0: 0.5, 1: 0.125}),
            Step(loss=1.25, lr={0: 0.0, 1: 0.0, 2: 0.0}),
            Step(loss=1.0, lr={0: 0.25, 1: 0.5, 2: 1.0}),
        ]),
        # step(loss=per-sample losses): the implementation forms mean and mean of squares
        Scenario("per-sample-losses", GROUPS, hyper, [
            Step(per_sample=[2.5, 1.0, 0.5, 3.0, 1.25, 0.75, 2.0, 1.5], scale=s)
            for s in (1.0, 0.5, 2.0)
        ]),
    ]
    if variant == "V":
        # the official KOALA-V: step along the raw gradient, S and h from g~ (KOALA.md §2)
        out.append(Scenario("raw-grad-step", GROUPS, {**hyper, "raw_grad_step": True},
                            _plain_steps()[:4]))
    else:
        # the reduction regime of KOALA.md §6 run through the general code path
        out.append(Scenario("momentum-off", GROUPS,
                            {**hyper, "a": 0.0, "sv": 0.0, "sc": 0.0, "qv": 0.0},
                            _plain_steps()[:4]))
    return out


def ids(items: list[Scenario]) -> list[str]:
    return [s.id for s in items]
