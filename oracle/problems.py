"""The problems the certificates replay: float problems for the evaluators (weights, gradients and
losses from a seeded generator, with the awkward cases every evaluator must handle) and small
random Rationals for the exact ones."""

from __future__ import annotations

import random

import mpmath
import sympy as sp

#: Three tensors in the certificates' groups: the first with its own lr and weight decay.
GROUPS = [{"lr": 0.75, "wd": 0.125, "eps": 1e-9}, {"lr": 0.5, "wd": 0.0, "eps": 1e-9},
          {"lr": 0.5, "wd": 0.0, "eps": 1e-9}]


def float_problem(seed: int, sizes: tuple[int, ...], n_steps: int):
    """(x0, steps, groups): x0 the flat initial weights in ±2; per step (loss, mean of squared
    losses, one gradient per tensor in ±1), where step 1 has no gradient for tensor 2 and step 2
    a gradient below eps for tensor 0 (skipped); ``GROUPS``' settings per tensor."""
    rng = random.Random(seed)
    x0 = [rng.uniform(-2, 2) for _ in range(sum(sizes))]
    steps = []
    for step in range(n_steps):
        grads = [[rng.uniform(-1, 1) for _ in range(sz)] for sz in sizes]
        if step == 1:
            grads[2] = None                 # a tensor without a gradient this step
        if step == 2:
            grads[0] = [1e-12]              # below its group's eps: skipped
        steps.append((rng.uniform(0.5, 2.0), rng.uniform(0.5, 4.0), grads))
    return x0, steps, [dict(g) for g in GROUPS]


def small_rational(rng: random.Random, lo: int = -9, hi: int = 9, positive: bool = False) -> sp.Rational:
    """A small non-zero Rational (numerator in [lo, hi], denominator in 1..7); positive when asked."""
    while True:
        num = rng.randint(1 if positive else lo, hi)
        if num != 0:
            return sp.Rational(num, rng.randint(1, 7))


def group_spec(params: list, groups: list[dict]) -> list[dict]:
    """An evaluator's param groups for a float problem's tensors ``params``: tensor 0 with group
    0's lr and weight decay, the others with group 1's lr."""
    return [{"params": [params[0]], "lr": groups[0]["lr"], "weight_decay": groups[0]["wd"]},
            {"params": params[1:], "lr": groups[1]["lr"]}]


def exact_groups(groups: list[dict]) -> list[dict]:
    """The groups' settings as Rationals (for the exact implementations)."""
    return [{k: sp.Rational(v) for k, v in g.items()} for g in groups]


def worst_relative_gap(pairs, worst, dps: int) -> mpmath.mpf:
    """``worst`` raised to the largest |got − want|/max(|want|, 1) over ``pairs`` (got an mpf,
    want an exact SymPy number evaluated at ``dps`` digits)."""
    for got, want in pairs:
        w = mpmath.mpf(sp.N(want, dps))
        worst = max(worst, abs(got - w) / max(abs(w), mpmath.mpf(1)))
    return worst
