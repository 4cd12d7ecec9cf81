"""A certificate: a named statement, whether it holds, and what was compared."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

__all__ = ["Check", "is_zero", "no_float_constants", "subtraction_free"]


@dataclass(frozen=True)
class Check:
    name: str
    statement: str
    holds: bool
    detail: str = ""

    def line(self) -> str:
        verdict = "holds" if self.holds else "FAILS"
        tail = f"  [{self.detail}]" if self.detail else ""
        return f"{verdict:5}  {self.name}: {self.statement}{tail}"


def is_zero(expr) -> bool:
    """Exact zero test for a SymPy expression or matrix (cancel, then simplify if needed)."""
    if isinstance(expr, sp.MatrixBase):
        return all(is_zero(e) for e in expr)
    expr = sp.sympify(expr)
    if expr == 0:
        return True
    if sp.cancel(sp.together(expr)) == 0:
        return True
    return sp.simplify(expr) == 0


def no_float_constants(expr) -> bool:
    """True when no SymPy Float (a silently rounded constant) occurs in the expression."""
    if isinstance(expr, sp.MatrixBase):
        return all(no_float_constants(e) for e in expr)
    return not sp.sympify(expr).atoms(sp.Float)


def subtraction_free(expr, gens) -> bool:
    """Numerator and denominator are polynomials in ``gens`` with non-negative coefficients.

    With non-negative generators every term is ≥ 0, so evaluating the form in floating point
    never subtracts and cannot cancel catastrophically.
    """
    num, den = sp.fraction(sp.together(expr))
    for part in (num, den):
        poly = sp.Poly(sp.expand(part), *gens)
        if any(c.is_negative for c in poly.coeffs()) or not all(c.is_number for c in poly.coeffs()):
            return False
    return True
