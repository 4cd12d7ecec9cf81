"""KOALA-V, KOALA-M and KOALA++ run the way the authors' code runs them: the baseline to beat.

What makes this "official-style" (and slow on a GPU) is the structure, kept on purpose:

* one global filter whose scalars are 0-dim float64 tensors on the parameters' device;
* a Python loop over the parameter tensors, several small kernels per tensor;
* a per-tensor norm for every step, and a **host-side skip test**
  (``if p.grad.norm() < eps: continue``), which waits for the device once per tensor.

The mathematics is koala_triton/ALGORITHM.md §2-§4 written independently (it is *not* a copy of the authors'
code); ``bench/test_harness.py`` checks it against ``koala_triton``'s PyTorch path. With
``weight_decay = 0`` (the benchmark setting) stepping along ``g~`` or the raw gradient is the
same, so this also matches the official update.
"""

from __future__ import annotations

import torch


class _OfficialStyleBase:
    def __init__(self, params, lr: float, r: float | None, alpha_r: float,
                 weight_decay: float, eps: float):
        self.params = list(params)
        self.lr = lr
        self.weight_decay = weight_decay
        self.eps = eps
        self.alpha_r = alpha_r
        self.fixed_r = r
        self.device = self.params[0].device
        self.state: dict = {}
        self.R = self._scalar(1.0 if r is None else r)

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    def _update_r(self, loss: torch.Tensor) -> torch.Tensor:
        if self.fixed_r is None:
            m2 = (loss.double() ** 2).mean()
            self.R = self.alpha_r * self.R + (1.0 - self.alpha_r) * m2
        return self.R

    def _observations(self, loss: torch.Tensor):
        """Yield (p, g~, ||g~||^2, L~) per tensor that passes the host-side skip test."""
        mean_loss = loss.double().mean()
        wd = self.weight_decay
        for p in self.params:
            # The host-side skip test of the official loop: one device->host wait per tensor.
            if p.grad is None or p.grad.norm() < self.eps:
                continue
            g = p.grad if wd == 0 else p.grad + wd * p
            gn2 = g.norm().double() ** 2
            layer_loss = mean_loss if wd == 0 else mean_loss + 0.5 * wd * p.norm().double() ** 2
            yield p, g, gn2, layer_loss


class OfficialStyleKoalaV(_OfficialStyleBase):
    """KOALA-V, per-tensor loop (koala_triton/ALGORITHM.md §2). No per-parameter state."""

    def __init__(self, params, lr: float = 1.0, *, sigma: float = 0.1, q: float = 1.0,
                 r: float | None = None, alpha_r: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-9):
        super().__init__(params, lr, r, alpha_r, weight_decay, eps)
        self.P = self._scalar(sigma)
        self.q = q

    @torch.no_grad()
    def predict(self) -> None:
        self.P = self.P + self.q

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        R = self._update_r(loss)
        ratios = []
        for p, g, gn2, layer_loss in self._observations(loss):
            S = self.P * gn2 + R
            p.sub_(g * (self.lr * layer_loss * self.P / S))
            ratios.append(gn2 / S)
        if ratios:
            h = torch.stack(ratios).max()
            self.P = self.P - self.P ** 2 * h


class OfficialStyleKoalaM(_OfficialStyleBase):
    """KOALA-M, per-tensor loop (koala_triton/ALGORITHM.md §3): velocity and xavg buffers per tensor, a 2x2
    float64 covariance propagated with small matrix products as in the EKF form."""

    def __init__(self, params, lr: float = 1.0, *, sw: float = 0.1, sc: float = 0.0,
                 sv: float = 0.1, a: float = 0.9, qw: float = 1e-2, qv: float = 1e-2,
                 r: float | None = None, alpha_r: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-9):
        super().__init__(params, lr, r, alpha_r, weight_decay, eps)
        dev = self.device
        self.P = torch.tensor([[sw, sc], [sc, sv]], dtype=torch.float64, device=dev)
        self.F = torch.tensor([[1.0, 1.0], [0.0, a]], dtype=torch.float64, device=dev)
        self.a = a
        self.qx = self._scalar(qw)
        self.qv = qv
        self.n = sum(p.numel() for p in self.params)
        for p in self.params:
            self.state[p] = {"velocity": torch.zeros_like(p), "xavg": torch.zeros_like(p)}

    @torch.no_grad()
    def predict(self) -> None:
        diffs = []
        for p in self.params:
            st = self.state[p]
            diffs.append((st["xavg"] - p).norm().double())
            p.add_(st["velocity"])
            st["velocity"].mul_(self.a)
        D = torch.stack(diffs).norm() / self.n
        self.qx = 0.9 * self.qx + 0.1 * D
        Q = torch.diag(torch.stack([self.qx, self._scalar(self.qv)]))
        self.P = self.F @ self.P @ self.F.T + Q

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        R = self._update_r(loss)
        ratios = []
        for p, g, gn2, layer_loss in self._observations(loss):
            st = self.state[p]
            S = self.P[0, 0] * gn2 + R
            gain = self.lr * layer_loss / S
            p.sub_(g * (gain * self.P[0, 0]))
            st["velocity"].sub_(g * (gain * self.P[1, 0]))
            st["xavg"].mul_(0.9).add_(p, alpha=0.1)
            ratios.append(gn2 / S)
        if ratios:
            h = torch.stack(ratios).max()
            H = torch.diag(torch.stack([h, torch.zeros_like(h)]))
            self.P = self.P - self.P @ H @ self.P.T


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


class OfficialStyleKoalaPlusPlus:
    """KOALA++ run the way the authors' ``koalap.py`` runs it (github.com/Sumxiaa/KOALA_Plus_Plus,
    ``Task1_Image_Classification/koalap.py``), written here from the paper's recursion:

    * a Python loop over the tensors, a **host-side skip test** per tensor
      (``grad.norm() < eps`` read on the host), small kernels per tensor;
    * per tensor the vectors v (the surrogate) and H of its last step and the 0-dim S; every step
      recomputes ‖h‖² and h·v from the stored vectors and forms S from the new v
      (``koala_triton`` keeps those scalars from the last step instead);
    * a tensor's first step starts from h = H, v = σ·H, S0 = h·v + Q·‖h‖² + R;
    * R: the mean squared loss's EMA (updated before use, from 1) or a fixed r;
    * ``predict()`` does nothing.

    Param groups may set lr, weight_decay and eps (the authors' code has one global weight decay
    and eps = 1e-9, and overwrites every group's lr with the constructor's; one group with the
    constructor's values is exactly that). ``update(loss, loss_var)`` is the authors' API
    (``loss_var``: the mean of squared per-sample losses); ``step(per_sample_losses)`` forms both.
    Gradients are read from ``p.grad``. ``bench/test_harness.py`` and ``tests/test_koala_pp_parity.py``
    check ``koala_triton.KoalaPlusPlus`` against this loop.
    """

    def __init__(self, params, lr: float = 1.0, *, sigma: float = 0.1, q: float = 0.1, r: float | None = None,
                 alpha_r: float = 0.9, weight_decay: float = 0.0, eps: float = 1e-9, symmetric: bool = True):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.groups = [{"lr": lr, "weight_decay": weight_decay, "eps": eps, **g, "params": list(g["params"])}
                       for g in groups]
        self.sigma, self.q, self.symmetric = sigma, q, symmetric
        self.alpha_r, self.fixed_r = alpha_r, r
        first = self.groups[0]["params"][0]
        self.R = torch.tensor(1.0 if r is None else r, dtype=torch.float64, device=first.device)
        #: per tensor: {"v", "h", "S", "steps"}: the surrogate and the last H (the parameter's
        #: shape and dtype; zeros before its first step), the last S (0-dim) and the steps taken
        self.state: dict = {p: self._fresh(p) for g in self.groups for p in g["params"]}

    @staticmethod
    def _fresh(p: torch.Tensor) -> dict:
        return {"v": torch.zeros_like(p), "h": torch.zeros_like(p), "S": None, "steps": 0}

    @torch.no_grad()
    def predict(self) -> None:
        pass

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        losses = loss.double()
        self.update(losses.mean(), (losses ** 2).mean())

    @torch.no_grad()
    def update(self, loss, loss_var) -> None:
        if self.fixed_r is None:
            self.R = self.alpha_r * self.R + (1.0 - self.alpha_r) * loss_var
        R, Q = self.R, self.q
        for group in self.groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or p.grad.norm(2) < group["eps"]:  # host read per tensor
                    continue
                H = _flat(p.grad) + wd * _flat(p)
                st = self.state.setdefault(p, self._fresh(p))
                steps = st["steps"]
                if steps == 0:
                    v_prev, h_prev, S_prev = H * self.sigma, H, None
                else:
                    v_prev, h_prev, S_prev = _flat(st["v"]), _flat(st["h"]), st["S"]
                hh, hv = torch.dot(h_prev, h_prev), torch.dot(h_prev, v_prev)
                if S_prev is None:
                    S_prev = hv + Q * hh + R
                Hh, Hv = torch.dot(H, h_prev), torch.dot(H, v_prev)
                lam = (Hv + Q * Hh) / S_prev
                alpha = Hh / hh
                rk = Hv / hh - Hh * hv / (hh ** 2) if self.symmetric else 0.0
                v = (alpha - lam) * v_prev + Q * (H - lam * h_prev) + rk * h_prev
                S = torch.dot(v + Q * H, H) + R
                layer_loss = loss + 0.5 * wd * torch.dot(_flat(p), _flat(p))
                p.add_((-group["lr"] * layer_loss * (v + Q * H) / S).view(p.shape))
                self.state[p] = {"v": v.view(p.shape), "h": H.view(p.shape), "S": S, "steps": steps + 1}


#: The official-style loop of each KOALA variant, by its id in ``tests/variants.py``.
OFFICIAL_STYLE = {"V": OfficialStyleKoalaV, "M": OfficialStyleKoalaM, "PP": OfficialStyleKoalaPlusPlus}
