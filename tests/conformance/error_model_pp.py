"""The error model of KOALA++'s conformance tests (``test_koala_pp_conformance.py``).

Same standard model and contract as ``error_model.py`` (every operation rounds by at most u of
the arithmetic it runs in; dot products and squared norms in the compute dtype, float64 for
float64 parameters and float32 otherwise, in any summation order; the scalar filter in float64;
elementwise work in the compute dtype, rounded once to the parameter dtype), applied to what
KOALA++ computes (``koala_triton/_kalman_pp.py``, ``kernels/passes.py``):

1. **Inputs of the filter** (per tensor, from the update's exact inputs): H = g + wd·x, the three
   dot products H·H, H·h, H·v, and ‖x‖². Their error bounds are the table's (``ROUNDINGS_PP``;
   a dot of N terms of any order is within γ(N)·Σ|terms|), plus, in a free-running comparison,
   what earlier errors in x, v and h contribute (first order).
2. **The scalar filter**: the implementation's float64 straight-line program (λ, α, r, the
   coefficients a, b, c, v·H, S, the step) is re-run on the exact values with a running error
   bound (``Err``): each operation propagates its operands' bounds to first order and adds
   u·|result| for its own rounding. So a cancellation (α − λ, r's difference) costs what it
   costs, and no derivative is written by hand.
3. **Elementwise**: v⁺ = (a·v + b·H) + c·h, x⁺ = x − step·(v⁺ + q·H), h⁺ = H, each term with its
   coefficient's error, the input errors, and the chain's roundings (the table), then the store.

Second-order terms are covered by ``Precision.slack`` on every first-order bound. The restarted
comparison (the oracle restarted from the implementation's exact state before each update)
uses zero carried errors; the free-running float64 one carries the bounds from step to step
(``StateErrors``), so its tolerance is the same model run along the trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mpmath

from oracle import DPS
from tests.conformance.error_model import Precision, ScalarInputErrors, gamma, noise_error, norm_error

#: Roundings of KOALA++'s elementwise and dot-product work (compute dtype) beyond the shared
#: table of ``error_model.ROUNDINGS``; N (the tensor's element count) is added where a sum runs
#: over the tensor.
ROUNDINGS_PP = {
    "H":         (3, "g + wd·x: wd cast to the compute dtype, wd·x, + g (0 when wd = 0)"),
    "dot":       (3, "H·h and H·v: N products and N − 1 sums of any order in one chain (γ(N)) on "
                     "H's own 3 roundings -> γ(N + 3) on Σ(|g| + |wd·x|)·|h|"),
    "surrogate": (4, "(a·v + b·H) + c·h: each coefficient cast (1), its product (1), at most two sums "
                     "(2) -> γ(4) on |a·v| + |b·H| + |c·h|"),
    "direction": (3, "v⁺ + q·H: q cast, product, sum"),
    "step":      (3, "x − step·d: step cast, product, difference"),
}


def g_pp(prec: Precision, name: str, extra: float = 0) -> mpmath.mpf:
    """γ(count + extra) in the compute arithmetic."""
    return gamma(ROUNDINGS_PP[name][0] + extra, prec.u_compute)


class Err:
    """A float64 value the implementation computes: its exact value and a bound on |computed − exact|.

    ``Err`` ∘ ``Err`` (or an exact number) propagates the bounds to first order and adds one
    rounding, u·|result|, u the unit roundoff of ``u``'s arithmetic (float64: the filter)."""

    __slots__ = ("value", "bound", "u")

    def __init__(self, value, bound=0, u=0):
        self.value, self.bound, self.u = mpmath.mpf(value), mpmath.mpf(bound), mpmath.mpf(u)

    @staticmethod
    def _parts(other):
        return (other.value, other.bound) if isinstance(other, Err) else (mpmath.mpf(other), mpmath.mpf(0))

    def _result(self, value, bound) -> Err:
        return Err(value, bound + self.u * abs(value), self.u)

    def __add__(self, other):
        v, b = self._parts(other)
        return self._result(self.value + v, self.bound + b)

    __radd__ = __add__

    def __sub__(self, other):
        v, b = self._parts(other)
        return self._result(self.value - v, self.bound + b)

    def __rsub__(self, other):
        v, b = self._parts(other)
        return self._result(v - self.value, self.bound + b)

    def __mul__(self, other):
        v, b = self._parts(other)
        return self._result(self.value * v, abs(v) * self.bound + abs(self.value) * b)

    __rmul__ = __mul__

    def __truediv__(self, other):
        v, b = self._parts(other)
        q = self.value / v
        return self._result(q, (self.bound + abs(q) * b) / abs(v))

    def __rtruediv__(self, other):
        v, b = self._parts(other)
        q = v / self.value
        return self._result(q, (b + abs(q) * self.bound) / abs(self.value))

    def __neg__(self):
        return Err(-self.value, self.bound, self.u)


@dataclass
class StateErrors:
    """Bounds on |implementation − oracle| of the state, per tensor (lists per element for x, v,
    h; one number for S, hh, hv) and R. ``zero`` for a restarted comparison."""

    x: list
    v: list
    h: list
    S: list
    hh: list
    hv: list
    R: mpmath.mpf = field(default_factory=lambda: mpmath.mpf(0))

    @classmethod
    def zero(cls, oracle) -> StateErrors:
        z = mpmath.mpf(0)
        n = [len(x) for x in oracle.x]
        return cls(x=[[z] * k for k in n], v=[[z] * k for k in n], h=[[z] * k for k in n],
                   S=[z] * len(n), hh=[z] * len(n), hv=[z] * len(n))


def _filter_program(t, hyper: dict, u, inputs: dict) -> dict:
    """``_kalman_pp.measure_pp`` for one updated tensor, expression for expression, on ``Err``
    inputs (HH, Hh, Hv, hh, hv, S0, R, L, X2); σ, q, lr, wd are exact (the same doubles)."""
    sigma, q, symmetric = hyper["sigma"], hyper["q"], hyper["symmetric"]
    HH, R = inputs["HH"], inputs["R"]
    if t.first:  # the code's start: h = H, v = σ·H
        sHH = sigma * HH
        hh, Hh, Hv, hv = HH, HH, sHH, sHH
        S0 = (sHH + q * HH) + R
    else:
        hh, Hh, Hv, hv, S0 = (inputs[k] for k in ("hh", "Hh", "Hv", "hv", "S0"))
    lam = (Hv + q * Hh) / S0
    alpha = Hh / hh
    a = alpha - lam
    c = Err(-q, 0, u) * lam
    if symmetric:
        c = (Hv / hh - (Hh * hv) / (hh * hh)) + c
    vH = (a * Hv + q * HH) + c * Hh
    S = (vH + q * HH) + R
    reg = inputs["L"] + (0.5 * t.wd) * inputs["X2"] if t.wd != 0 else inputs["L"]
    step = (t.lr * reg) / S
    if t.first:
        b = (a * sigma + q) + c
        a = c = Err(0)
    else:
        b = Err(q)
    return {"a": a, "b": b, "c": c, "vH": vH, "S": S, "step": step}


def update_bounds(prec: Precision, oracle, trace, hyper: dict, *, adaptive: bool, alpha_r,
                  carried: StateErrors, inputs: ScalarInputErrors | None = None) -> StateErrors:
    """Bounds of the state after one update (``oracle`` after its update, ``trace`` its
    ``last_update``; ``carried`` the bounds before it). Returns the new ``StateErrors``."""
    inputs = inputs or ScalarInputErrors()
    slack = prec.slack()
    u_f = mpmath.mpf(prec.u_filter)
    with mpmath.workdps(DPS):
        dR = carried.R if trace.skipped else (
            noise_error(prec, trace.R, alpha_r, adaptive, inputs) + (mpmath.mpf(alpha_r) if adaptive else 1) * carried.R)
        out = StateErrors(x=[list(e) for e in carried.x], v=[list(e) for e in carried.v],
                          h=[list(e) for e in carried.h], S=list(carried.S), hh=list(carried.hh),
                          hv=list(carried.hv), R=dR * slack)
        for t in trace.tensors:
            if not t.updated:
                continue
            i, N = t.index, t.numel
            ex, ev, eh = carried.x[i], carried.v[i], carried.h[i]
            wd = t.wd
            # 1. the inputs of the filter
            mag_H = [abs(g) + abs(wd * x) for g, x in zip(t.grad, t.x_prior)]
            # H = g + wd·x rounds (none when wd = 0: H is g) and carries wd times x's error
            dH = [(g_pp(prec, "H") * m if wd else 0) + wd * e for m, e in zip(mag_H, ex)]
            A = mpmath.fsum(m * m for m in mag_H)
            dHH = norm_error(prec, N, A) + 2 * mpmath.fsum(abs(H) * wd * e for H, e in zip(t.H, ex))
            err = {"HH": Err(t.HH, dHH, u_f), "R": Err(trace.R, dR, u_f), "L": Err(trace.loss, inputs.loss, u_f),
                   "X2": Err(t.X2, prec.g("param_sq", N) * t.X2 + 2 * mpmath.fsum(abs(x) * e for x, e in zip(t.x_prior, ex)), u_f)}
            if not t.first:
                for name, other, e_other in (("Hh", t.h_prior, eh), ("Hv", t.v_prior, ev)):
                    rounding = g_pp(prec, "dot", N) * mpmath.fsum(m * abs(o) for m, o in zip(mag_H, other))
                    carried_part = mpmath.fsum((wd * e) * abs(o) + abs(H) * eo
                                               for H, e, o, eo in zip(t.H, ex, other, e_other))
                    err[name] = Err(getattr(t, name), rounding + carried_part, u_f)
                for name in ("hh", "hv"):
                    err[name] = Err(getattr(t, name), getattr(carried, name)[i], u_f)
                err["S0"] = Err(t.S0, carried.S[i], u_f)
            f = _filter_program(t, hyper, u_f, err)
            # 2. the new stored scalars
            out.S[i] = f["S"].bound * slack
            out.hh[i] = dHH * slack
            out.hv[i] = f["vH"].bound * slack
            # 3. elementwise
            a, b, c, step = f["a"], f["b"], f["c"], f["step"]
            q = mpmath.mpf(hyper["q"])
            new_x, new_v, new_h = [], [], []
            for j in range(N):
                v, H, h = t.v_prior[j], t.H[j], t.h_prior[j]
                terms = abs(a.value * v) + abs(b.value * H) + abs(c.value * h)
                e_v1 = (a.bound * abs(v) + abs(a.value) * (0 if t.first else ev[j]) + b.bound * abs(H)
                        + abs(b.value) * dH[j] + c.bound * abs(h) + abs(c.value) * (0 if t.first else eh[j])
                        + g_pp(prec, "surrogate") * terms)
                v1 = t.v_new[j]
                d = t.direction[j]
                e_d = e_v1 + abs(q) * dH[j] + g_pp(prec, "direction") * (abs(v1) + abs(q * H))
                x1 = oracle.x[i][j]
                e_x = ex[j] + step.bound * abs(d) + abs(step.value) * e_d + g_pp(prec, "step") * (
                    abs(step.value * d) + abs(x1))
                new_v.append(prec.stored(v1, e_v1))
                new_x.append(prec.stored(x1, e_x))
                new_h.append(prec.stored(H, dH[j]))
            out.x[i], out.v[i], out.h[i] = new_x, new_v, new_h
        return out
