"""The symbols the derivation works in: scalar symbols of the closed forms, and the small model.

Two things live here, both plumbing and no mathematics:

* :func:`scalar_symbols` — the scalars the closed forms are written in (p, q, G, R, Lt, ...).
* :class:`SymbolicModel` — the symbolic model every derivation stage of :mod:`oracle.stages`
  shares: ``SIZES = (2, 1)`` tensors (n = 3 weights), every entry a symbol, plus the change of
  variables that turns entries into the per-tensor invariants G_i = ‖g~_i‖² and X2_i = ‖x^_i‖².

Shapes: the state is [k·n, 1] with k = 1 (KOALA-V: x) or k = 2 (KOALA-M: [x; u]); covariances
are [k·n, k·n] and claimed to be ``B ⊗ I_n`` with a k x k block B.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import sympy as sp

from .assumptions import Assumptions, kron_identity, tensor_slices

__all__ = ["SIZES", "scalar_symbols", "SymbolicModel", "symbolic_model"]

# The symbolic model: two tensors, one with two weights (so "same scalar for every coordinate"
# means something) and one with a single weight (so layer-wise observations mean something).
SIZES = (2, 1)


@functools.lru_cache(maxsize=None)
def scalar_symbols() -> SimpleNamespace:
    """The scalar symbols the closed forms are written in."""
    pos = dict(positive=True)
    nonneg = dict(nonnegative=True)
    real = dict(real=True)
    return SimpleNamespace(
        # loss, target fraction, weight decay, measurement noise, per-tensor invariants
        L=sp.Symbol("L", **real), lr=sp.Symbol("lr", **nonneg), wd=sp.Symbol("wd", **nonneg),
        R=sp.Symbol("R", **pos), G=sp.Symbol("G", **pos), X2=sp.Symbol("X2", **nonneg),
        Lt=sp.Symbol("Lt", **real), Gmax=sp.Symbol("Gmax", **nonneg),
        # elementwise quantities of one coordinate
        x=sp.Symbol("x", **real), u=sp.Symbol("u", **real), g=sp.Symbol("g", **real),
        # KOALA-V: previous posterior p, process noise q, prior p^
        p=sp.Symbol("p", **pos), q=sp.Symbol("q", **pos), ph=sp.Symbol("ph", **pos),
        # KOALA-M: posterior block, process noise, velocity decay, prior block, its determinant
        Pxx=sp.Symbol("Pxx", **pos), Pxu=sp.Symbol("Pxu", **real), Puu=sp.Symbol("Puu", **nonneg),
        qx=sp.Symbol("qx", **nonneg), qu=sp.Symbol("qu", **nonneg), a=sp.Symbol("a", **real),
        Pxx_h=sp.Symbol("Pxx_h", **pos), Pxu_h=sp.Symbol("Pxu_h", **real),
        Puu_h=sp.Symbol("Puu_h", **nonneg), det_h=sp.Symbol("det_h", **nonneg),
    )


@dataclass(frozen=True)
class SymbolicModel:
    """The symbolic model every derivation stage works on (one per variant).

    assumptions  the switches applied (:data:`oracle.assumptions.KOALA_V` or ``KOALA_M``)
    variant      "V" or "M" (the prefix of every certificate name)
    k            Kronecker block size: 1 (x) or 2 (x, u)
    names        the state blocks, ["x"] or ["x", "u"]
    sizes, n     tensor sizes and the number of weights n = sum(sizes)
    blocks       index range of every tensor inside x
    s            :func:`scalar_symbols`
    x, u         previous posterior mean, [n, 1] each (symbols x0.., u0..)
    xh, uh       predicted mean x^, u^, [n, 1] each (symbols xh0.., uh0..)
    g            data-loss gradient at x^, [n, 1] (symbols g0..)
    tau          H's entries g~ = g + wd·x^, [n, 1] (symbols tau0..)
    Gs, X2s      per-tensor invariants G_i = ‖g~_i‖², X2_i = ‖x^_i‖² (symbols G_i, X2_i)
    to_tau       the change of variables g_j -> tau_j - wd·xh_j
    """

    assumptions: Assumptions
    variant: str
    k: int
    names: tuple
    sizes: tuple
    n: int
    blocks: tuple
    s: SimpleNamespace
    x: sp.Matrix
    u: sp.Matrix
    xh: sp.Matrix
    uh: sp.Matrix
    g: sp.Matrix
    tau: sp.Matrix
    Gs: tuple
    X2s: tuple
    to_tau: dict

    @property
    def state(self) -> sp.Matrix:
        """The previous posterior state, [k·n, 1]: x, or [x; u]."""
        return self.x if self.k == 1 else self.x.col_join(self.u)

    @property
    def s_hat(self) -> sp.Matrix:
        """The predicted state the update starts from, [k·n, 1]: x^, or [x^; u^]."""
        return self.xh if self.k == 1 else self.xh.col_join(self.uh)

    def kron(self, block: sp.Matrix) -> sp.Matrix:
        """``block ⊗ I_n``: a k x k block spread over the n weights, [k·n, k·n]."""
        return kron_identity(block, self.n)

    def block_of(self, M: sp.Matrix) -> sp.Matrix:
        """The k x k block B of a [k·n, k·n] matrix claimed to be B ⊗ I_n (read at coordinate 0)."""
        n = self.n
        return sp.Matrix(self.k, self.k, lambda r, c: M[r * n, c * n])

    def invariants(self, expr) -> sp.Expr:
        """Write ``expr`` in g~ and then in the invariants: eliminate each tensor's last coordinate.

        g_j -> tau_j - wd·xh_j first; then tau_last = sqrt(G_i - Σ other tau²) and
        xh_last = sqrt(X2_i - Σ other xh²) for every tensor i. A coordinate that survives means
        the form depends on more than the norms (checked by the stages).
        """
        subs = {}
        for b, G in zip(self.blocks, self.Gs):
            taus = list(self.tau[b, 0])
            subs[taus[-1]] = sp.sqrt(G - sum(t**2 for t in taus[:-1]))
        for b, X2 in zip(self.blocks, self.X2s):
            xs = list(self.xh[b, 0])
            subs[xs[-1]] = sp.sqrt(X2 - sum(v**2 for v in xs[:-1]))
        out = sp.sympify(expr).subs(self.to_tau).subs(subs)
        return sp.factor(sp.cancel(out))

    def generic(self, expr, i: int) -> sp.Expr:
        """Tensor i's form in the generic symbols: G_i -> G, X2_i -> X2."""
        return sp.sympify(expr).subs({self.Gs[i]: self.s.G, self.X2s[i]: self.s.X2})


def symbolic_model(assumptions: Assumptions, sizes: tuple = SIZES) -> SymbolicModel:
    """Build the symbols of the model for one bundle of assumptions."""
    s = scalar_symbols()
    n = sum(sizes)
    k = assumptions.block
    xh = sp.Matrix(sp.symbols(f"xh0:{n}", real=True))
    g = sp.Matrix(sp.symbols(f"g0:{n}", real=True))
    tau = sp.Matrix(sp.symbols(f"tau0:{n}", real=True))  # will stand for g~ = H's entries
    return SymbolicModel(
        assumptions=assumptions, variant="V" if assumptions.dynamics == "identity" else "M",
        k=k, names=("x", "u")[:k], sizes=tuple(sizes), n=n, blocks=tuple(tensor_slices(sizes)),
        s=s,
        x=sp.Matrix(sp.symbols(f"x0:{n}", real=True)),
        u=sp.Matrix(sp.symbols(f"u0:{n}", real=True)),
        xh=xh, uh=sp.Matrix(sp.symbols(f"uh0:{n}", real=True)), g=g, tau=tau,
        Gs=tuple(sp.Symbol(f"G_{i}", positive=True) for i in range(len(sizes))),
        X2s=tuple(sp.Symbol(f"X2_{i}", nonnegative=True) for i in range(len(sizes))),
        to_tau={g[j]: tau[j] - s.wd * xh[j] for j in range(n)},
    )
