"""Derive KOALA++'s recursion from the generic EKF, the directional surrogate and the estimates.

Nothing here writes a KOALA++ formula by hand: the stages run :func:`oracle.ekf.predict` and
:func:`oracle.ekf.update` on a symbolic model and read the forms off, as :mod:`oracle.derive`
does for KOALA. The model is one tensor of n = 3 weights (KOALA++ runs one such filter per
tensor; the decoupling is certified in :mod:`oracle.kpp_certificates`), every entry a symbol:

* P_{k-2}: a general symmetric 3 x 3 matrix (six symbols ``P_ij``); H_{k-1} = h and H_k the
  gradients (rows) of steps k-1 and k; Q the process noise (identity dynamics, Q·I); R_{k-1} and
  R the measurement noises of the two steps;
* the surrogate of step k-1 is v_{k-1} = H_{k-1} P_{k-2} (its definition).

Stages, in EKF order:

1. ``gain`` — step k from P_{k-1} = EKF posterior of step k-1: S_k = v_k·H_k + Q‖H_k‖² + R,
   K_k = (v_k + Q·H_k)ᵀ/S_k and the weight step -lr·L~·K_k, with v_k = H_k P_{k-1}: exact.
2. ``surrogate`` — v_k = H_k P_{k-2} + Q·H_k − λ·(v_{k-1} + Q·h) with
   λ = (H_k·v_{k-1} + Q·H_k·h)/S_{k-1}: exact (it uses the symmetry of P_{k-2}); H_k P_{k-2} is
   the one term v_{k-1} does not determine.
3. ``recursion`` — that term from the least-squares estimate of P_{k-2)
   (:func:`oracle.kpp_assumptions.derive_estimate`): v_k = A·v_{k-1} + B·H_k + C·h, and A, B, C
   read off and written in dot products: A = α − λ, B = Q, C = r − Q·λ with α = H_k·h/‖h‖²,
   r = H_k·v_{k-1}/‖h‖² − (H_k·h)(h·v_{k-1})/‖h‖⁴ (symmetric) or 0 (plain).
4. ``three dots`` — v_k·H_k (hence S_k and the next step's ‖h‖², h·v) from the three new dot
   products H_k·H_k, H_k·h, H_k·v_{k-1} and the stored ‖h‖², h·v_{k-1}, S_{k-1}.
5. ``approximation`` — what the estimate drops: v_k(EKF) − v_k(recursion) = H⊥·P_{k-2}
   (plain) or H⊥·P_{k-2}·(I − h hᵀ/‖h‖²) (symmetric), H⊥ = H_k − α·h; zero when H_k ∥ h; the
   symmetric recursion is exact along h; its S_k is the EKF's minus H⊥ P_{k-2} H⊥ᵀ.
6. ``first step`` — the code's start (H_0 = H_1, v_0 = σ·H_1, S_0 = (σ + Q)‖H_1‖² + R) makes
   v_1 the EKF's H_1·P_0 for P_0 = the posterior of (σ + Q)·I observing H_1 with noise R.

Symbols of the printed forms (:func:`pp_symbols`): HH = H_k·H_k, Hh = H_k·h, Hv = H_k·v_{k-1},
hh = h·h, hv = h·v_{k-1}, S0 = S_{k-1}, Q, R, sigma, lr, Lt = L~ = L + ½·wd·‖x^‖².
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import sympy as sp

from . import ekf
from .assumptions import KOALA_V, fractional_target, loss_observation
from .checks import Check, is_zero, no_float_constants  # noqa: F401 (is_zero: small forms)
from .kpp_assumptions import ESTIMATES, PlusPlusAssumptions, derive_estimate

__all__ = ["PlusPlusDerivation", "derive_pp", "pp_symbols", "first_step_values", "N"]

#: Weights of the symbolic model: three, so that v_{k-1}, h and H_k are generically independent.
N = 3


@functools.lru_cache(maxsize=None)
def pp_symbols() -> SimpleNamespace:
    """The scalar symbols of KOALA++'s forms (see the module docstring)."""
    pos, real, nonneg = dict(positive=True), dict(real=True), dict(nonnegative=True)
    return SimpleNamespace(
        HH=sp.Symbol("HH", **pos), Hh=sp.Symbol("Hh", **real), Hv=sp.Symbol("Hv", **real),
        hh=sp.Symbol("hh", **pos), hv=sp.Symbol("hv", **real), S0=sp.Symbol("S0", **real),
        Q=sp.Symbol("Q", **nonneg), R=sp.Symbol("R", **pos), R0=sp.Symbol("R0", **pos),
        sigma=sp.Symbol("sigma", **nonneg), lr=sp.Symbol("lr", **nonneg), Lt=sp.Symbol("Lt", **real),
        L=sp.Symbol("L", **real), wd=sp.Symbol("wd", **nonneg), t=sp.Symbol("t", **real),
        vH=sp.Symbol("vH", **real),
    )


def first_step_values() -> dict:
    """The stored scalars a tensor's first step uses (the code's phantom start H_0 = H_1,
    v_0 = σ·H_1, S_0 = (σ + Q)·‖H_1‖² + R), as {symbol: value in HH, sigma, Q, R}."""
    s = pp_symbols()
    return {s.hh: s.HH, s.Hh: s.HH, s.Hv: s.sigma * s.HH, s.hv: s.sigma * s.HH,
            s.S0: (s.sigma + s.Q) * s.HH + s.R}


@dataclass(frozen=True)
class _Model:
    """The symbolic model (columns [N, 1]; rows are their transposes)."""

    h: sp.Matrix    # H_{k-1}
    Hk: sp.Matrix   # H_k
    P2: sp.Matrix   # P_{k-2}, symmetric
    v: sp.Matrix    # v_{k-1} = H_{k-1} P_{k-2} (a column)
    x: sp.Matrix    # x^ (weights at step k)
    g: sp.Matrix    # data-loss gradient at x^ (H_k = g + wd·x^)

    def dots(self, Hk=None, h=None, v=None) -> dict:
        """{symbol: value}: the dot-product symbols evaluated on (these) vectors."""
        s = pp_symbols()
        Hk = self.Hk if Hk is None else Hk
        h = self.h if h is None else h
        v = self.v if v is None else v
        d = lambda a, b: (a.T * b)[0, 0]  # noqa: E731
        return {s.HH: d(Hk, Hk), s.Hh: d(Hk, h), s.Hv: d(Hk, v), s.hh: d(h, h), s.hv: d(h, v)}


@functools.lru_cache(maxsize=None)
def _model() -> _Model:
    h = sp.Matrix(sp.symbols(f"h0:{N}", real=True))
    Hk = sp.Matrix(sp.symbols(f"H0:{N}", real=True))
    P2 = _symmetric("P")
    return _Model(h=h, Hk=Hk, P2=P2, v=P2 * h, x=sp.Matrix(sp.symbols(f"x0:{N}", real=True)),
                  g=sp.Matrix(sp.symbols(f"g0:{N}", real=True)))


@dataclass
class PlusPlusDerivation:
    """KOALA++'s forms for one estimate, in the symbols of :func:`pp_symbols`.

    lam, alpha, r   λ, α and r of the recursion (r = 0 for the plain estimate)
    coef            {"v": A, "H": B, "h": C}: v_k = A·v_{k-1} + B·H_k + C·h
    vH              v_k·H_k from the three new dot products and the stored scalars
    S               S_k = v_k·H_k + Q·HH + R
    step            c with Δx = -c·(v_k + Q·H_k): lr·Lt/S_k
    S_prev          S_{k-1} = hv + Q·hh + R0 (what the previous step stored)
    checks          the certificates, in stage order
    """

    estimate: str
    assumptions: PlusPlusAssumptions
    lam: sp.Expr
    alpha: sp.Expr
    r: sp.Expr
    coef: dict
    vH: sp.Expr
    S: sp.Expr
    step: sp.Expr
    S_prev: sp.Expr
    checks: list = field(default_factory=list)

    def stages(self) -> dict:
        """The derived forms grouped by stage (as ``python -m oracle`` prints them)."""
        s = pp_symbols()
        return {
            "gain": {"S_k (vH = v_k·H_k)": s.vH + s.Q * s.HH + s.R,
                     "step c (Δx = -c·(v_k + Q·H_k))": self.step},
            "surrogate": {"λ": self.lam, "S_{k-1}": self.S_prev},
            "recursion": {"α": self.alpha, "r": self.r, "A (of v_{k-1})": self.coef["v"],
                          "B (of H_k)": self.coef["H"], "C (of H_{k-1})": self.coef["h"]},
            "three dots": {"v_k·H_k": self.vH, "S_k": self.S},
        }

    def forms(self) -> dict:
        return {name: expr for group in self.stages().values() for name, expr in group.items()}


# ----------------------------------------------------------------------------------------------
# stage 1 and 2: the exact EKF in the surrogate


def _exact_two_steps(m: _Model):
    """P_{k-1} and S_{k-1} from P_{k-2} (step k-1: predict with Q·I, observe h with R0)."""
    s = pp_symbols()
    eye = sp.eye(N)
    prior = ekf.predict(lambda st: st, eye, m.x, m.P2, s.Q * eye)
    upd = ekf.update(m.x, prior.P, lambda st: sp.Matrix([[(m.h.T * st)[0, 0]]]), sp.Matrix([[s.R0]]),
                     sp.Matrix([[0]]))
    return prior.P, upd.P, upd.S[0, 0]


def vanishes(expr) -> bool:
    """Exact zero test for rational expressions (or matrices of them): the numerator of the
    combined fraction expands to 0. Faster than :func:`oracle.checks.is_zero` on the large
    rational functions of this derivation, and as exact."""
    if isinstance(expr, sp.MatrixBase):
        return all(vanishes(e) for e in expr)
    return sp.expand(sp.numer(sp.together(sp.sympify(expr)))) == 0


def _symmetric(name: str) -> sp.Matrix:
    P = sp.zeros(N, N)
    for i in range(N):
        for j in range(i, N):
            P[i, j] = P[j, i] = sp.Symbol(f"{name}{i}{j}", real=True)
    return P


@functools.lru_cache(maxsize=None)
def _exact() -> SimpleNamespace:
    """Stages 1-2 (shared by both estimates)."""
    s, m = pp_symbols(), _model()
    checks: list[Check] = []
    eye = sp.eye(N)
    dots = m.dots()

    # stage 1, step k from any symmetric P_{k-1}: the full loss observation of KOALA (fractional
    # target, weight decay), H_k = g + wd·x^
    P1 = _symmetric("B")
    v1 = (m.Hk.T * P1).T
    prior = ekf.predict(lambda st: st, eye, m.x, P1, s.Q * eye)
    observe = loss_observation(KOALA_V, (N,), 0, s.L, m.g, m.x, s.wd)
    z = sp.Matrix([[fractional_target(KOALA_V, s.lr, observe(m.x)[0, 0])]])
    upd = ekf.update(m.x, prior.P, observe, sp.Matrix([[s.R]]), z)
    to_H = {m.g[j]: m.Hk[j] - s.wd * m.x[j] for j in range(N)}  # g = H_k - wd·x^
    S_k = upd.S[0, 0].subs(to_H)
    vH = (v1.T * m.Hk)[0, 0]
    checks.append(Check("PP.innovation-exact", "S_k = v_k·H_k + Q·‖H_k‖² + R with v_k = H_k P_{k-1} (EKF)",
                        vanishes(S_k - (vH + s.Q * dots[s.HH] + s.R))))
    direction = v1 + s.Q * m.Hk
    checks.append(Check("PP.gain-exact", "K_k = (v_k + Q·H_k)ᵀ / S_k (EKF)",
                        vanishes(upd.K.subs(to_H) - direction / S_k)))
    Lt = s.L + s.wd / 2 * (m.x.T * m.x)[0, 0]
    checks.append(Check(
        "PP.step-exact", "x_k - x^ = -lr·L~·(v_k + Q·H_k)ᵀ/S_k, L~ = L + ½·wd·‖x^‖² (EKF, KOALA's observation)",
        vanishes((upd.x - m.x).subs(to_H) + s.lr * Lt * direction / S_k)))

    # stage 2: P_{k-1} from P_{k-2} (step k-1: predict with Q·I, observe h with R0)
    P_hat_prev = ekf.predict(lambda st: st, eye, m.x, m.P2, s.Q * eye).P
    step_prev = ekf.update(m.x, P_hat_prev, lambda st: sp.Matrix([[(m.h.T * st)[0, 0]]]), sp.Matrix([[s.R0]]),
                           sp.Matrix([[0]]))
    S_prev = step_prev.S[0, 0]
    checks.insert(0, Check(
        "PP.innovation-from-surrogate",
        "S_{k-1} = v_{k-1}·h + Q·‖h‖² + R_{k-1} with v_{k-1} = h P_{k-2} (the step's S, one step back)",
        vanishes(S_prev - (dots[s.hv] + s.Q * dots[s.hh] + s.R0))))
    v_exact = (m.Hk.T * step_prev.P).T  # the surrogate of step k, a column
    # v_k = H_k P^_{k-1} - λ (h P^_{k-1}), λ = H_k P^_{k-1} hᵀ / S_{k-1}
    lam_exact = (m.Hk.T * P_hat_prev * m.h)[0, 0] / S_prev
    lam_form = (s.Hv + s.Q * s.Hh) / s.S0
    checks.append(Check(
        "PP.lambda-exact", "λ = H_k P^_{k-1} hᵀ / S_{k-1} = (H_k·v_{k-1} + Q·H_k·h)/S_{k-1} (P_{k-2} symmetric)",
        vanishes(lam_exact - lam_form.subs(dots).subs({s.S0: S_prev}))))
    split = (m.Hk.T * m.P2).T + s.Q * m.Hk - lam_exact * (m.v + s.Q * m.h)
    checks.append(Check(
        "PP.surrogate-exact", "v_k = H_k P_{k-2} + Q·H_k − λ·(v_{k-1} + Q·h): only H_k P_{k-2} needs more than v_{k-1}",
        vanishes(v_exact - split)))
    return SimpleNamespace(v_exact=v_exact, S_prev=S_prev, lam_form=lam_form, dots=dots, checks=checks)


# ----------------------------------------------------------------------------------------------
# stage 3: the recursion, read off in a frame and written in dot products


def _frame():
    """Coordinates where h = (a, 0, 0), v = (b, c, 0), H_k = (d, e, f), and their dot products:
    every configuration is one of these after a rotation (the forms are rotation-invariant;
    :func:`_recursion` certifies the result in general coordinates)."""
    a, c = sp.symbols("_fa _fc", positive=True)
    b, d, e, f = sp.symbols("_fb _fd _fe _ff", real=True)
    s = pp_symbols()
    h, v, Hk = sp.Matrix([a, 0, 0]), sp.Matrix([b, c, 0]), sp.Matrix([d, e, f])
    # frame coordinates in terms of the dot products (f and c stay: a form that keeps them
    # depends on more than the dot products)
    to_dots = {a: sp.sqrt(s.hh), b: s.hv / sp.sqrt(s.hh), d: s.Hh / sp.sqrt(s.hh)}
    to_dots[e] = (s.Hv - s.Hh * s.hv / s.hh) / c
    return h, v, Hk, (a, b, c, d, e, f), to_dots


def _recursion(kind: str, exact: SimpleNamespace) -> SimpleNamespace:
    s, m = pp_symbols(), _model()
    est = derive_estimate(kind, N)
    checks: list[Check] = list(est.checks)
    hs, vs = sp.Matrix(sp.symbols(f"h0:{N}", real=True)), sp.Matrix(sp.symbols(f"v0:{N}", real=True))

    def recursion_vector(h, v, Hk):
        P_est = est.P.subs(dict(zip(list(hs) + list(vs), list(h) + list(v))), simultaneous=True)
        return (Hk.T * P_est).T + s.Q * Hk - exact.lam_form * (v + s.Q * h)

    # read A, B, C off in the frame: solve [v, H_k, h]·(A, B, C)ᵀ = v_k(recursion)
    h, v, Hk, coords, to_dots = _frame()
    rec = recursion_vector(h, v, Hk).applyfunc(sp.cancel)
    A, B, C = sp.symbols("_A _B _C")
    sol = sp.solve(list(A * v + B * Hk + C * h - rec), [A, B, C], dict=True)
    if len(sol) != 1:
        raise AssertionError(f"{kind}: the recursion is not a unique combination of v, H_k and h")
    coef = {}
    for name, sym in (("v", A), ("H", B), ("h", C)):
        form = sp.factor(sp.cancel(sol[0][sym].subs(to_dots)))
        if form.free_symbols & set(coords):
            raise AssertionError(f"{kind}: coefficient {name} depends on more than the dot products")
        coef[name] = form
    checks.append(Check(
        f"PP.{kind}-recursion-in-dot-products",
        "v_k = A·v_{k-1} + B·H_k + C·h with A, B, C functions of the dot products (no coordinate survives)",
        True, f"A = {coef['v']}, B = {coef['H']}, C = {coef['h']}"))
    # certify in general coordinates (the read-off was in a frame)
    general = recursion_vector(m.h, m.v, m.Hk).subs(exact.dots)
    combo = sum(((coef[k].subs(exact.dots)) * vec for k, vec in (("v", m.v), ("H", m.Hk), ("h", m.h))),
                sp.zeros(N, 1))
    checks.append(Check(f"PP.{kind}-recursion-general", "the read-off is valid in general coordinates",
                        vanishes(general - combo)))
    alpha = s.Hh / s.hh
    r = s.Hv / s.hh - s.Hh * s.hv / s.hh**2 if kind == "symmetric" else sp.Integer(0)
    lam = exact.lam_form
    checks.append(Check(
        f"PP.{kind}-recursion-named",
        "A = α − λ, B = Q, C = r − Q·λ with α = Hh/hh and r = " + (
            "Hv/hh − Hh·hv/hh² (the paper's and the code's symmetric form)" if kind == "symmetric"
            else "0 (the plain form)"),
        is_zero(coef["v"] - (alpha - lam)) and is_zero(coef["H"] - s.Q) and is_zero(coef["h"] - (r - s.Q * lam))))
    return SimpleNamespace(coef=coef, alpha=alpha, r=r, lam=lam, general=general, checks=checks,
                           recursion_vector=recursion_vector)


# ----------------------------------------------------------------------------------------------
# stages 4-6


def _three_dots(kind: str, rec: SimpleNamespace, exact: SimpleNamespace) -> SimpleNamespace:
    s, m = pp_symbols(), _model()
    A, B, C = rec.coef["v"], rec.coef["H"], rec.coef["h"]
    vH = sp.expand(A * s.Hv + B * s.HH + C * s.Hh)
    S = vH + s.Q * s.HH + s.R
    direct = (rec.general.T * m.Hk)[0, 0]
    checks = [Check(
        f"PP.{kind}-three-dot-products",
        "v_k·H_k = A·Hv + B·HH + C·Hh: S_k and the next step's (‖h‖², h·v) = (HH, v_k·H_k) need only the "
        "new dot products H_k·H_k, H_k·h, H_k·v_{k-1} and the stored ‖h‖², h·v_{k-1}, S_{k-1}",
        vanishes(direct - vH.subs(exact.dots)))]
    return SimpleNamespace(vH=vH, S=S, checks=checks)


def _approximation(kind: str, rec: SimpleNamespace, exact: SimpleNamespace) -> list[Check]:
    s, m = pp_symbols(), _model()
    S0_value = {s.S0: exact.S_prev}
    gap = exact.v_exact - rec.general.subs(S0_value)
    hh = (m.h.T * m.h)[0, 0]
    H_perp = m.Hk - (m.Hk.T * m.h)[0, 0] / hh * m.h
    if kind == "plain":
        predicted = (H_perp.T * m.P2).T
        what = "H⊥·P_{k-2}"
    else:
        predicted = ((H_perp.T * m.P2) * (sp.eye(N) - m.h * m.h.T / hh)).T
        what = "H⊥·P_{k-2}·(I − h hᵀ/‖h‖²)"
    checks = [Check(
        f"PP.{kind}-dropped-term",
        f"v_k(EKF) − v_k(recursion) = {what} exactly, H⊥ = H_k − α·h (given the exact v_{{k-1}}, S_{{k-1}})",
        vanishes(gap - predicted))]
    # the corollaries below are read off the certified form of the gap (equal as rational
    # functions, and much smaller)
    parallel = {m.Hk[j]: s.t * m.h[j] for j in range(N)}
    checks.append(Check(
        f"PP.{kind}-exact-on-span",
        "the recursion is the exact EKF whenever H_k = t·H_{k-1} (gradient direction unchanged)",
        vanishes(predicted.subs(parallel, simultaneous=True))))
    if kind == "symmetric":
        checks.append(Check(
            "PP.symmetric-exact-along-h", "(v_k(EKF) − v_k(recursion))·H_{k-1} = 0: exact along the previous gradient",
            vanishes((predicted.T * m.h)[0, 0])))
        checks.append(Check(
            "PP.symmetric-S-drops-quadratic-form",
            "S_k(EKF) − S_k(recursion) = H⊥ P_{k-2} H⊥ᵀ (≥ 0 for a PSD P_{k-2}: the recursion never "
            "overestimates the innovation variance)",
            vanishes((predicted.T * m.Hk)[0, 0] - (H_perp.T * m.P2 * H_perp)[0, 0])))
    return checks


def _first_step(kind: str, rec: SimpleNamespace) -> list[Check]:
    """The code's start: h = H_1, v_0 = σ·H_1, S_0 = (σ + Q)‖H_1‖² + R (R0 = R)."""
    s, m = pp_symbols(), _model()
    H1 = m.Hk
    v0 = s.sigma * H1
    S0 = (s.sigma + s.Q) * (H1.T * H1)[0, 0] + s.R
    coef = {k: e.subs(m.dots(Hk=H1, h=H1, v=v0)).subs({s.S0: S0}) for k, e in rec.coef.items()}
    v1 = coef["v"] * v0 + coef["H"] * H1 + coef["h"] * H1
    # the EKF that starts from P = σ·I and observes H_1 twice (step 0: the phantom, step 1: real)
    eye = sp.eye(N)
    prior = ekf.predict(lambda st: st, eye, m.x, s.sigma * eye, s.Q * eye)
    phantom = ekf.update(m.x, prior.P, lambda st: sp.Matrix([[(H1.T * st)[0, 0]]]), sp.Matrix([[s.R]]),
                         sp.Matrix([[0]]))
    v1_ekf = (H1.T * phantom.P).T
    return [Check(
        f"PP.{kind}-first-step-is-phantom-ekf",
        "the code's first step (H_0 = H_1, v_0 = σ·H_1, S_0 = (σ + Q)‖H_1‖² + R) gives v_1 = H_1 P_0, "
        "P_0 the EKF posterior of P = σ·I predicted (Q·I) and observing H_1 with noise R: "
        "the EKF from σ·I that observes the first gradient twice",
        vanishes(v1 - v1_ekf))]


@functools.lru_cache(maxsize=None)
def derive_pp(estimate: str = "symmetric") -> PlusPlusDerivation:
    """KOALA++'s recursion for the ``estimate`` ("plain" or "symmetric"), derived and certified."""
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    s = pp_symbols()
    exact = _exact()
    rec = _recursion(estimate, exact)
    dots = _three_dots(estimate, rec, exact)
    checks = list(exact.checks) + rec.checks + dots.checks
    checks += _approximation(estimate, rec, exact)
    checks += _first_step(estimate, rec)
    d = PlusPlusDerivation(
        estimate=estimate, assumptions=PlusPlusAssumptions(estimate=estimate), lam=rec.lam, alpha=rec.alpha,
        r=rec.r, coef=rec.coef, vH=dots.vH, S=dots.S, step=s.lr * s.Lt / dots.S,
        S_prev=s.hv + s.Q * s.hh + s.R0, checks=checks)
    checks.append(Check(f"PP.{estimate}-no-float-constants", "no SymPy Float in any derived form",
                        all(no_float_constants(e) for e in d.forms().values())))
    return d
