"""Read-off stage: tensor 0's gain, step and contraction renamed into the invariants G, X2, Lt."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..checks import Check, is_zero
from ..symbolic_model import SymbolicModel

__all__ = ["GenericForms", "derive_generic_forms"]


@dataclass
class GenericForms:
    """Tensor 0's forms renamed into the generic symbols G, X2 and Lt = L~.

    observed_loss  L~ = L + wd*X2/2;  gain, step  dicts as in :class:`GainAndStep`;
    S              G*p^ + R (KOALA-V) or G*Pxx^ + R;  h  the contraction G/S
    """

    observed_loss: sp.Expr
    gain: dict
    step: dict
    S: sp.Expr
    h: sp.Expr
    checks: list


def derive_generic_forms(m: SymbolicModel, observations: list, steps: list,
                         covariances: list) -> GenericForms:
    """Read the closed forms off tensor 0 and certify that every tensor gets the same ones.

    Starts from the per-tensor results of :func:`derive_gain_and_step` (S, K, x) and
    :func:`derive_covariance` (h). Renames G_0 -> G, X2_0 -> X2 and L -> Lt - wd*X2/2; certifies
    that tensor i ≥ 1 (another size) has the same S, steps and h in its own G_i, X2_i, and that
    no coordinate of g, g~ or x^ survives: the forms depend on the gradient only through G.
    """
    s = m.s
    checks: list[Check] = []
    observed_loss = m.generic(observations[0].L_tilde, 0)
    to_Lt = {s.L: s.Lt - (observed_loss - s.L)}

    def final(expr, i):
        return sp.factor(sp.expand(m.generic(expr, i)).subs(to_Lt))

    for i in range(1, len(m.sizes)):
        agree = (
            is_zero(final(steps[i].S, i) - final(steps[0].S, 0))
            and all(is_zero(final(steps[i].steps[nm], i) - final(steps[0].steps[nm], 0))
                    for nm in m.names)
            and is_zero(final(covariances[i].h, i) - final(covariances[0].h, 0)))
        checks.append(Check(
            f"{m.variant}.tensors-{i}-same-forms",
            f"tensor {i} (size {m.sizes[i]}) gets the same closed forms as tensor 0 "
            f"(size {m.sizes[0]}) in its own G_i, X2_i", agree))

    gain = {nm: final(steps[0].gains[nm], 0) for nm in m.names}
    step = {nm: final(steps[0].steps[nm], 0) for nm in m.names}
    h = final(covariances[0].h, 0)
    S = final(steps[0].S, 0)
    coordinates = set(m.tau) | set(m.xh) | set(m.g)
    invariants_only = all(not (sp.sympify(e).free_symbols & coordinates)
                          for e in [*gain.values(), *step.values(), h, S])
    checks.append(Check(
        f"{m.variant}.depends-on-norms-only",
        "gain, step and contraction depend on the gradient only through G = ‖g~‖² "
        "(and on the weights only through L~)", invariants_only, f"S = {S}"))
    return GenericForms(observed_loss=observed_loss, gain=gain, step=step, S=S, h=h,
                        checks=checks)
