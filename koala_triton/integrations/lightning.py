"""KOALA with PyTorch Lightning.

Automatic optimization: add the callback and hand the per-sample losses to the optimizer in
``training_step`` (Lightning's closure runs it inside KOALA's ``step``)::

    from koala_triton.integrations.lightning import KoalaCallback

    class Model(lightning.LightningModule):
        def configure_optimizers(self):
            return KoalaM(self.parameters())

        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self(x), y, reduction="none")
            self.optimizers().observe(losses.detach())
            return losses.mean()

    lightning.Trainer(callbacks=[KoalaCallback()], ...).fit(Model(), data)

Manual optimization (``self.automatic_optimization = False``): ``opt.predict()`` before the
forward pass, then ``self.manual_backward(losses.mean())`` and ``opt.step(loss=losses)`` (or
``opt.observe(losses)`` and ``opt.step()``). Step through ``self.optimizers()`` (Lightning's
wrapper), not ``.optimizer``, so that Lightning counts the step.

``KoalaCallback`` predicts at the start of every training batch, before the forward pass
(``predict()`` is idempotent, so gradient accumulation predicts once per update, and
``step(closure)`` does not predict again). The predict state is one object shared with
Lightning's optimizer wrapper, which copies the optimizer's attributes.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from .._optimizer import KoalaOptimizer


def _koala(optimizer) -> KoalaOptimizer | None:
    while optimizer is not None and not isinstance(optimizer, KoalaOptimizer):
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return optimizer


class KoalaCallback(Callback):
    """Predicts (KOALA's time update) at the start of each training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for optimizer in trainer.optimizers:
            koala = _koala(optimizer)
            if koala is not None:
                koala.predict()
