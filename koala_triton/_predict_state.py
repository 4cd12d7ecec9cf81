"""Where an iteration stands between KOALA's time update (predict) and its measurement update.

Everything the host knows about predicts lives in one ``PredictState`` per optimizer, changed
only through its named transitions. The optimizer holds it by reference and hands it to its
backend inside the backend's state, so a wrapper that copies the optimizer's ``__dict__`` (as
some training frameworks do) shares it instead of forking it.

The only predict state elsewhere is on the device: the Triton backend's ``pending`` flag of
KOALA-M's deferred predict tail, which a CUDA-graph replay raises without any host code
running (the host never reads it; a kernel applies a pending tail exactly once).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._loss import LossInput, combine


@dataclass
class PredictState:
    """The host side of the predict/update protocol.

    Attributes:
        requested: ``predict()`` was called since the last measurement update (the user's side
            of the protocol: a ``step`` without it predicts first).
        time_updates: time updates applied to the weights since the last measurement update
            (j). Fold mode uses it for the deferred velocity (the buffer holds u⁺; the predicted
            velocity is a^j·u⁺).
        folded: fold mode: the last measurement update also performed the next time update,
            so the next ``predict()`` only acknowledges it.
        deferred: time updates whose scalar (covariance) part a backend has deferred into its
            next filter kernel: KOALA-V's ``p += q``, or KOALA-M's pending predict tail.
        observed: the losses handed to ``observe()`` for the coming update, or None.
    """

    requested: bool = False
    time_updates: int = 0
    folded: bool = False
    deferred: int = 0
    observed: LossInput | None = None

    # ------------------------------------------------------------------ transitions
    def to_prior(self, *, by_update: bool = False) -> None:
        """A ``predict()`` was answered: the weights (and, unless deferred, the filter) now
        hold the prior. ``by_update``: the answer is the time update the last (folded)
        measurement update already performed."""
        self.requested = True
        if by_update:
            self.folded = False
        else:
            self.time_updates += 1

    def to_posterior(self, *, folded: bool = False) -> None:
        """A measurement update ran (it used the observed losses, if any). ``folded``: it also
        performed the next time update."""
        self.requested = False
        self.folded = folded
        self.time_updates = 1 if folded else 0
        self.observed = None

    def observe(self, loss: LossInput) -> None:
        """Losses for the coming update (combined with those observed before it)."""
        self.observed = loss if self.observed is None else combine(self.observed, loss)

    # ------------------------------------------------------------------ deferred scalar work
    def defer(self) -> None:
        """A backend deferred one time update's covariance part into its next filter kernel."""
        self.deferred += 1

    def take_deferred(self) -> int:
        """How many deferred covariance parts to apply now (the caller applies them)."""
        n, self.deferred = self.deferred, 0
        return n

    # ------------------------------------------------------------------ checkpoints
    def to_checkpoint(self, *, fold: bool) -> dict:
        out = {"predicted": self.requested}
        if fold:
            out["fold"] = {"pending": self.folded, "predicts": self.time_updates}
        return out

    def load_checkpoint(self, koala: dict) -> None:
        """Restore from a state dict's ``"koala"`` entry (deferred work was settled before
        saving)."""
        self.requested = bool(koala.get("predicted", False))
        fold = koala.get("fold")
        self.folded = bool(fold["pending"]) if fold else False
        self.time_updates = int(fold["predicts"]) if fold else (1 if self.requested else 0)
        self.deferred = 0
