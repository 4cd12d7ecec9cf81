"""KOALA++ trajectories in mpmath at ``DPS`` (≥ 50) significant digits.

The recursion is the derived forms of :mod:`oracle.kpp_derive` (λ, A, B, C, v_k·H_k, S_k and the
step coefficient, turned into mpmath functions by ``sympy.lambdify``); the observation (the
direction H = g + wd·x and L~ = L + ½·wd·‖x‖²) is KOALA's derived observation
(:mod:`oracle.derive`). What the EKF does not give is written here, marked (code) when it
restates the authors' ``koalap.py`` (github.com/Sumxiaa/KOALA_Plus_Plus) and (package) when it
is this package's own rule:

* the skip rule: a tensor whose grad is None or ‖grad‖₂ < eps is skipped and its state (v, the
  previous H, S) untouched (code; eps per parameter group: package);
* a tensor's first step starts from H_0 = H_1, v_0 = σ·H_1, S_0 = (σ + Q)‖H_1‖² + R
  (:func:`oracle.kpp_derive.first_step_values`) (code);
* the R estimator R ← β_R·R + (1 − β_R)·m2, updated before use, starting at 1; a fixed r (code);
* the stored scalars of a tensor after its step: S_k, ‖H_k‖² and v_k·H_k (the previous step's
  ‖h‖² and h·v of the next step: certified equal to the dot products the code recomputes);
* a non-finite loss, gradient or (while R is estimated) loss_var skips the whole update and is
  counted in ``skipped_steps``; ``step`` counts update calls (package);
* ``predict()`` does nothing (code).

Same constructor as ``koala_triton.KoalaPlusPlus``. Per tensor i: ``x[i]``, ``v[i]``, ``h[i]``
(lists of mpf, flattened), and ``S[i]``, ``hh[i]``, ``hv[i]`` (mpf), ``updates[i]`` (int).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import mpmath

from .evaluator import DPS, UpdateTrace, _forms_v, _KoalaOracle, _lambdify, exact, vector
from .kpp_derive import derive_pp, first_step_values, pp_symbols

__all__ = ["KoalaPlusPlusOracle", "PlusPlusTensorTrace"]


@functools.lru_cache(maxsize=None)
def _forms(estimate: str) -> SimpleNamespace:
    d, s = derive_pp(estimate), pp_symbols()
    stored = (s.HH, s.Hh, s.Hv, s.hh, s.hv, s.S0, s.Q)
    first = first_step_values()
    return SimpleNamespace(
        lam=_lambdify(stored, d.lam),
        A=_lambdify(stored, d.coef["v"]), B=_lambdify(stored, d.coef["H"]), C=_lambdify(stored, d.coef["h"]),
        vH=_lambdify(stored, d.vH),
        S=_lambdify((s.vH, s.HH, s.Q, s.R), d.stages()["gain"]["S_k (vH = v_k·H_k)"]),
        step=_lambdify((s.lr, s.Lt, s.vH, s.HH, s.Q, s.R), d.step.subs(d.S, s.vH + s.Q * s.HH + s.R)),
        first={str(k): _lambdify((s.HH, s.sigma, s.Q, s.R), v) for k, v in first.items()},
    )


@dataclass
class PlusPlusTensorTrace:
    """What one tensor did in one KOALA++ update (exact values; the error model reads these)."""

    index: int
    numel: int
    updated: bool
    reason: str = ""                 # "none", "small-grad", "skipped-step" when skipped
    first: bool = False              # the tensor's first step (phantom start)
    lr: mpmath.mpf | None = None
    wd: mpmath.mpf | None = None
    x_prior: list = field(default_factory=list)
    grad: list = field(default_factory=list)
    H: list = field(default_factory=list)        # g + wd·x
    v_prior: list = field(default_factory=list)  # v_{k-1} (σ·H on a first step)
    h_prior: list = field(default_factory=list)  # H_{k-1} (H on a first step)
    HH: mpmath.mpf | None = None
    Hh: mpmath.mpf | None = None
    Hv: mpmath.mpf | None = None
    hh: mpmath.mpf | None = None
    hv: mpmath.mpf | None = None
    S0: mpmath.mpf | None = None
    X2: mpmath.mpf | None = None
    L_tilde: mpmath.mpf | None = None
    lam: mpmath.mpf | None = None
    A: mpmath.mpf | None = None      # v_k = A·v_{k-1} + B·H_k + C·H_{k-1}
    B: mpmath.mpf | None = None
    C: mpmath.mpf | None = None
    vH: mpmath.mpf | None = None
    S: mpmath.mpf | None = None
    c: mpmath.mpf | None = None      # Δx = -c·(v_k + Q·H_k)
    v_new: list = field(default_factory=list)
    direction: list = field(default_factory=list)  # v_k + Q·H_k


class KoalaPlusPlusOracle(_KoalaOracle):
    """KOALA++ at ``DPS`` digits (see the module docstring)."""

    def __init__(self, params, lr=1.0, *, sigma=0.1, q=0.1, r=None, alpha_r=0.9, weight_decay=0.0,
                 eps=1e-9, symmetric=True, loss_floor=0.0):
        super().__init__(params, lr, weight_decay, eps, r, alpha_r)
        if loss_floor != 0.0:
            raise ValueError("the oracle observes L itself (loss_floor = 0)")
        self.estimate = "symmetric" if symmetric else "plain"
        with mpmath.workdps(DPS):
            self.sigma, self.Q = exact(sigma), exact(q)
            self.v = [[mpmath.mpf(0)] * len(x) for x in self.x]
            self.h = [[mpmath.mpf(0)] * len(x) for x in self.x]
            zero = mpmath.mpf(0)
            self.S, self.hh, self.hv = [zero] * len(self.x), [zero] * len(self.x), [zero] * len(self.x)
        self.updates = [0] * len(self.x)

    @property
    def filter_state(self) -> dict:
        return {"R": self.R, "step": self.step_count, "skipped_steps": self.skipped_steps}

    def load(self, *, v=None, h=None, S=None, hh=None, hv=None, updates=None, **kwargs) -> None:
        """Overwrite state with exact copies (per-tensor lists; see the module docstring)."""
        super().load(**kwargs)
        with mpmath.workdps(DPS):
            if v is not None:
                self.v = [vector(t) for t in v]
            if h is not None:
                self.h = [vector(t) for t in h]
            for name, values in (("S", S), ("hh", hh), ("hv", hv)):
                if values is not None:
                    setattr(self, name, [exact(x) for x in values])
        if updates is not None:
            self.updates = [int(exact(u)) for u in updates]

    def predict(self) -> None:
        """KOALA++'s time update lives inside its update (P^ = P + Q·I enters S and K): nothing here."""

    def update(self, loss, loss_var, grads: Sequence) -> None:
        f, fv = _forms(self.estimate), _forms_v()
        with mpmath.workdps(DPS):
            L, m2, g, run = self._measure(loss, loss_var, grads)
            Q, R = self.Q, self.R
            traces = []
            for t, lr, wd, H, HH, X2 in self._observations(g, run, traces, PlusPlusTensorTrace):
                i, x = t.index, self.x[t.index]
                t.first = self.updates[i] == 0
                if t.first:  # the code's phantom start (first_step_values)
                    v_prev, h_prev = [self.sigma * e for e in H], list(H)
                    Hh, Hv, hh, hv, S0 = (f.first[k](HH, self.sigma, Q, R) for k in ("Hh", "Hv", "hh", "hv", "S0"))
                else:
                    v_prev, h_prev = self.v[i], self.h[i]
                    Hh = mpmath.fsum(a * b for a, b in zip(H, h_prev))
                    Hv = mpmath.fsum(a * b for a, b in zip(H, v_prev))
                    hh, hv, S0 = self.hh[i], self.hv[i], self.S[i]
                args = (HH, Hh, Hv, hh, hv, S0, Q)
                A, B, C, vH = f.A(*args), f.B(*args), f.C(*args), f.vH(*args)
                S = f.S(vH, HH, Q, R)
                Lt = fv.observed_loss(L, wd, X2)
                c = f.step(lr, Lt, vH, HH, Q, R)
                v_new = [A * a + B * b + C * e for a, b, e in zip(v_prev, H, h_prev)]
                direction = [a + Q * b for a, b in zip(v_new, H)]
                t.lr, t.wd, t.x_prior, t.grad, t.H = lr, wd, list(x), g[i], H
                t.v_prior, t.h_prior = list(v_prev), list(h_prev)
                t.HH, t.Hh, t.Hv, t.hh, t.hv, t.S0, t.X2, t.L_tilde = HH, Hh, Hv, hh, hv, S0, X2, Lt
                t.lam, t.A, t.B, t.C, t.vH, t.S, t.c = f.lam(*args), A, B, C, vH, S, c
                t.v_new, t.direction = v_new, direction
                self.x[i] = [xj - c * dj for xj, dj in zip(x, direction)]
                self.v[i], self.h[i] = v_new, H
                self.S[i], self.hh[i], self.hv[i] = S, HH, vH
                self.updates[i] += 1
            self.last_update = UpdateTrace(skipped=not run, loss=L, loss_var=m2, R=R, tensors=traces,
                                           h=mpmath.mpf(0), Gmax=mpmath.mpf(0))
