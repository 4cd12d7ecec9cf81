"""KOALA with the Hugging Face ``transformers`` Trainer.

Usage::

    from koala_triton import KoalaM
    from koala_triton.integrations.huggingface import KoalaTrainer

    opt = KoalaM(model.parameters())
    trainer = KoalaTrainer(model=model, args=args, train_dataset=train, optimizers=(opt, None))
    trainer.train()

``KoalaTrainer`` is a ``transformers.Trainer`` that

- computes per-sample losses from the model's logits and the labels (``per_sample_loss``:
  cross-entropy per example for ``[B, C]`` logits, squared error for one regression output,
  the mean token cross-entropy per sequence for ``[B, T, V]`` logits, shifted by one token for
  causal language models, ignoring labels of -100), hands them to the optimizer with
  ``observe`` during training, and returns their mean for the backward pass (gradient
  accumulation: the Trainer averages the micro-batches, and the optimizer concatenates their
  losses for one update);
- predicts before each optimization step's first forward pass: the Trainer calls
  ``optimizer.train()`` before every training forward pass, which is KOALA's (idempotent)
  ``predict()``; a callback does the same at each step's start for versions that do not.

Override ``per_sample_loss`` for other heads. A plain ``Trainer`` works too if your
``compute_loss`` calls ``optimizer.observe(per_sample_losses)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from .._optimizer import KoalaOptimizer


def _koala(optimizer) -> KoalaOptimizer | None:
    """The KOALA optimizer inside the wrappers the Trainer puts around it (accelerate's)."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, KoalaOptimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, KoalaOptimizer) else None


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, *, causal_lm: bool) -> torch.Tensor:
    """[B] losses of a batch (float32).

    Args:
        logits: [B, C] (classification; C == 1 with float labels: regression) or [B, T, V].
        labels: [B] or [B, T]; -100 marks positions without a label.
        causal_lm: with [B, T, V] logits, predict token t + 1 from position t (shift by one).
    """
    logits = logits.float()
    if logits.dim() == 2:
        if logits.shape[1] == 1 and labels.is_floating_point():
            return (logits.squeeze(1) - labels.float()) ** 2
        return F.cross_entropy(logits, labels, reduction="none")
    if causal_lm:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)  # [B, T]
    counted = (labels != -100).sum(1).clamp(min=1)
    return tokens.sum(1) / counted


class PredictCallback(TrainerCallback):
    """Predicts at the start of each optimization step (KOALA's time update comes before the
    forward pass). Harmless where the Trainer already calls ``optimizer.train()``."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        koala = _koala(optimizer)
        if koala is not None:
            koala.predict()
        return control


class KoalaTrainer(Trainer):
    """A ``transformers.Trainer`` for KOALA optimizers (see the module docstring)."""

    #: The loss returned by ``compute_loss`` is a per-micro-batch mean: the Trainer divides it
    #: by the accumulation steps, so the gradient is the whole batch's mean loss.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        super().__init__(*args, callbacks=[*callbacks, PredictCallback()], **kwargs)
        if self.optimizer is not None and _koala(self.optimizer) is None:
            raise TypeError("KoalaTrainer needs a KOALA optimizer: optimizers=(KoalaM(model.parameters()), None)")

    def per_sample_loss(self, model, outputs, labels) -> torch.Tensor:
        """[B] losses of this micro-batch (see ``per_sample_loss``); override for other heads."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        causal = bool(getattr(config, "is_decoder", False)) or "CausalLM" in type(
            self.accelerator.unwrap_model(model)).__name__
        return per_sample_loss(logits, labels, causal_lm=causal)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("KoalaTrainer: the batch has no 'labels': KOALA needs the per-sample losses")
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses = self.per_sample_loss(model, outputs, labels)
        if model.training:
            koala = _koala(self.optimizer)
            if koala is None:
                raise TypeError("KoalaTrainer needs a KOALA optimizer")
            koala.observe(losses.detach())
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss
