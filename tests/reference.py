"""A plain float64 for-loop implementation of koala_triton/ALGORITHM.md (KOALA-V, KOALA-M, KOALA++), written independently of
``koala_triton`` (no shared code), as the ground truth of the PyTorch-path tests.

``variant`` is a ``tests.variants.VariantInfo`` or its id (``"V"``, ``"M"``); the loop has the
dynamics of each (identity, or momentum when the variant has a velocity).

It works on a list of parameter groups ``[{"params": [float64 tensors], "lr", "weight_decay",
"eps"}]`` and a list of gradients (None allowed) in the same flat order, with the filter held
in Python floats. Every step is a direct transcription of koala_triton/ALGORITHM.md §2-§4, one tensor at a time.
"""

from __future__ import annotations

import math

import torch


def _finite(loss: float, loss_sq_mean: float | None, grads, r_fixed) -> bool:
    """The package's rule: an update runs only if the loss, every gradient and (while R is
    estimated) the mean squared loss are finite."""
    finite = math.isfinite(loss) and all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    return finite and (r_fixed is not None or math.isfinite(loss_sq_mean))


class ReferenceKoala:
    def __init__(self, groups, *, variant, sigma=0.1, q=1.0, sw=0.1, sc=0.0, sv=0.1,
                 a=0.9, qw=1e-2, qv=1e-2, r=None, alpha_r=0.9, raw_grad_step=False):
        self.groups = [dict(g, params=[p.detach().clone().double() for p in g["params"]]) for g in groups]
        if isinstance(variant, str):
            from tests.variants import VARIANTS

            variant = VARIANTS[variant]
        self.variant = variant
        self.momentum = momentum = variant.has_velocity
        self.q, self.a, self.qv = q, a, qv
        self.r_fixed, self.alpha_r, self.raw_grad_step = r, alpha_r, raw_grad_step
        self.R = 1.0 if r is None else r
        self.skipped = 0
        if momentum:
            self.P = [[sw, sc], [sc, sv]]
            self.qx = qw
            self.u = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]
            self.xavg = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]
        else:
            self.p = sigma

    def params(self):
        return [p for g in self.groups for p in g["params"]]

    def add_group(self, group) -> None:
        """A new param group (float64 copies of its tensors), with zero state."""
        self.groups.append(dict(group, params=[p.detach().clone().double() for p in group["params"]]))
        if self.momentum:
            self.u.append([torch.zeros_like(p) for p in self.groups[-1]["params"]])
            self.xavg.append([torch.zeros_like(p) for p in self.groups[-1]["params"]])

    # ---------------------------------------------------- the state under the optimizer's names
    def filter_values(self) -> dict[str, float]:
        """The filter's float entries, named as ``filter_state`` names them."""
        if not self.momentum:
            return {"p": self.p, "R": self.R}
        (pxx, pxu), (_, puu) = self.P
        return {"Pxx": pxx, "Pxu": pxu, "Puu": puu, "qx": self.qx, "R": self.R}

    def load_filter(self, values) -> None:
        """Set the filter from ``filter_state``-named values (extra keys, e.g. counters, ignored)."""
        self.R = values["R"]
        if self.momentum:
            self.P = [[values["Pxx"], values["Pxu"]], [values["Pxu"], values["Puu"]]]
            self.qx = values["qx"]
        else:
            self.p = values["p"]

    def _state_lists(self, key):
        return {"velocity": self.u, "xavg": self.xavg}[key]

    def state(self, key) -> list:
        """The per-parameter state ``key`` (``"velocity"``, ``"xavg"``), flat, aligned with params()."""
        return [t for group in self._state_lists(key) for t in group]

    def set_state(self, key, values) -> None:
        """Replace the per-parameter state ``key`` by ``values`` (flat, aligned with params())."""
        values = iter(values)
        lists = self._state_lists(key)
        for group in lists:
            for i in range(len(group)):
                group[i] = next(values).double().clone()

    def predict(self):
        if not self.momentum:
            self.p = self.p + self.q
            return
        sq, n = 0.0, 0
        for gi, g in enumerate(self.groups):
            for i, x in enumerate(g["params"]):
                sq += float(((self.xavg[gi][i] - x) ** 2).sum())
                n += x.numel()
        self.qx = 0.9 * self.qx + 0.1 * (math.sqrt(sq) / max(n, 1))
        for gi, g in enumerate(self.groups):
            for i, x in enumerate(g["params"]):
                x += self.u[gi][i]
                self.u[gi][i] *= self.a
        (pxx, pxu), (_, puu) = self.P
        a = self.a
        self.P = [[pxx + 2 * pxu + puu + self.qx, a * (pxu + puu)],
                  [a * (pxu + puu), a * a * puu + self.qv]]

    def update(self, loss: float, loss_sq_mean: float | None, grads):
        """grads: flat list aligned with params() (None = no gradient)."""
        grads = [None if g is None else g.double() for g in grads]
        if not _finite(loss, loss_sq_mean, grads, self.r_fixed):
            self.skipped += 1
            return
        if self.r_fixed is None:
            self.R = self.alpha_r * self.R + (1 - self.alpha_r) * loss_sq_mean
        R = self.R
        pxx = self.P[0][0] if self.momentum else self.p
        pux = self.P[1][0] if self.momentum else 0.0
        h = 0.0
        k = 0
        for gi, g in enumerate(self.groups):
            wd, lr = g["weight_decay"], g["lr"]
            for i, x in enumerate(g["params"]):
                grad = grads[k]
                k += 1
                if grad is None or float(grad.norm()) < g["eps"]:
                    continue
                g_reg = grad + wd * x
                g_sq = float((g_reg ** 2).sum())
                S = pxx * g_sq + R
                layer_loss = loss + 0.5 * wd * float((x ** 2).sum())
                direction = grad if self.raw_grad_step else g_reg
                x -= lr * layer_loss * (pxx / S) * direction
                if self.momentum:
                    self.u[gi][i] -= lr * layer_loss * (pux / S) * direction
                    self.xavg[gi][i] = 0.9 * self.xavg[gi][i] + 0.1 * x
                h = max(h, g_sq / S)
        if self.momentum:
            # P <- P - P diag(h, 0) P^T, written out entry by entry
            (pxx, pxu), (pux, puu) = self.P
            self.P = [[pxx - h * pxx * pxx, pxu - h * pxx * pxu],
                      [pux - h * pux * pxx, puu - h * pux * pxu]]
        else:
            self.p = self.p - self.p ** 2 * h


class ReferencePlusPlus:
    """KOALA++'s reference: the authors'-style loop of ``bench/official_style.py`` (written from the
    paper, checked against the authors' ``koalap.py``; it shares no code with ``koala_triton``) on
    float64 copies, with ``ReferenceKoala``'s interface. The loop recomputes ‖h‖² and h·v from
    the stored vectors every step and forms S from them, where ``koala_triton`` keeps the last
    step's scalars; the package's non-finite skip is modelled here (the authors' code has none).
    """

    def __init__(self, groups, *, variant, sigma=0.1, q=0.1, r=None, alpha_r=0.9, symmetric=True):
        from bench.official_style import OfficialStyleKoalaPlusPlus

        self.variant = variant
        self.loop = OfficialStyleKoalaPlusPlus(
            [dict(g, params=[p.detach().clone().double() for p in g["params"]]) for g in groups],
            sigma=sigma, q=q, r=r, alpha_r=alpha_r, symmetric=symmetric)
        self.groups = self.loop.groups
        self.r_fixed = r
        self.skipped = 0

    def params(self):
        return [p for g in self.groups for p in g["params"]]

    def add_group(self, group) -> None:
        self.groups.append(dict(group, params=[p.detach().clone().double() for p in group["params"]]))

    def filter_values(self) -> dict[str, float]:
        return {"R": float(self.loop.R)}

    def load_filter(self, values) -> None:
        self.loop.R = torch.tensor(float(values["R"]), dtype=torch.float64)

    def state(self, key) -> list:
        """``"v"`` or ``"h"`` of every parameter (zeros before its first step), flat order."""
        return [self.loop.state.setdefault(p, self.loop._fresh(p))[key] for p in self.params()]

    def tensor_values(self) -> dict[str, list[float]]:
        """The per-tensor scalars under ``KoalaPlusPlus.tensor_filters``' names, from the loop's
        vectors (‖h‖², h·v recomputed, as the loop does)."""
        out = {"S": [], "hh": [], "hv": [], "updates": []}
        for p in self.params():
            st = self.loop.state.setdefault(p, self.loop._fresh(p))
            h, v = st["h"].reshape(-1), st["v"].reshape(-1)
            out["S"].append(0.0 if st["S"] is None else float(st["S"]))
            out["hh"].append(float(torch.dot(h, h)))
            out["hv"].append(float(torch.dot(h, v)))
            out["updates"].append(float(st["steps"]))
        return out

    def predict(self):
        self.loop.predict()

    def update(self, loss: float, loss_sq_mean: float | None, grads):
        """grads: flat list aligned with params() (None = no gradient)."""
        grads = [None if g is None else g.double() for g in grads]
        if not _finite(loss, loss_sq_mean, grads, self.r_fixed):
            self.skipped += 1
            return
        for p, g in zip(self.params(), grads):
            p.grad = None if g is None else g.clone()
        var = None if loss_sq_mean is None else torch.tensor(loss_sq_mean, dtype=torch.float64)
        self.loop.update(torch.tensor(loss, dtype=torch.float64), var)
