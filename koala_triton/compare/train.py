"""One training run: a task, an optimizer, a seed -> loss and test curves.

The loop is the README's: KOALA optimizers predict before the forward pass and receive the
per-sample losses (``step(loss=losses)``); torch.optim optimizers get ``step()``. Everything
else (model, data order, evaluation points) is the same for every optimizer of a seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .contenders import Contender
from .tasks import Task


@dataclass
class RunResult:
    """What one run measured.

    train_loss: the minibatch mean loss at every step [steps] (nats; NaN once diverged);
    evals: (step, {"loss": nats, metric: value}) at step 0, every ``eval_every`` steps and at
    the last step; seconds: wall time of the training loop and its evaluations.
    """

    task: str
    optimizer: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0
    diverged: bool = False

    @property
    def final(self) -> dict[str, float]:
        """The last evaluation (NaN entries when the run diverged)."""
        return self.evals[-1][1]


def train_run(task: Task, contender: Contender, seed: int,
              on_step: Callable[[], None] = lambda: None) -> RunResult:
    """Train ``task``'s model from the seed's initialisation with ``contender``.

    The seed fixes the initial weights (``torch.manual_seed``) and the minibatch order (a
    CPU generator), so every optimizer of a seed starts from the same weights and sees the
    same batches. A non-finite minibatch loss stops the run: it is marked ``diverged`` and its
    remaining evaluations are NaN. ``on_step`` is called after every step (progress bars).
    """
    torch.manual_seed(seed)
    model = task.build_model().to(task.device)
    optimizer = contender.build(model.parameters())
    scheduler = (torch.optim.lr_scheduler.MultiStepLR(optimizer, list(task.milestones), task.gamma)
                 if task.milestones else None)
    batches = task.batches(torch.Generator().manual_seed(seed))
    result = RunResult(task.name, contender.name, seed)
    model.train()
    start = time.perf_counter()
    result.evals.append((0, task.evaluate(model)))
    for step in range(1, task.steps + 1):
        x, y = next(batches)
        if contender.koala:
            optimizer.predict()                      # the time update, before the forward pass
        losses = task.per_sample_loss(model, x, y)   # [B]
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        if contender.koala:
            optimizer.step(loss=losses.detach())     # the measurement update
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss = losses.detach().mean().item()
        result.train_loss.append(loss)
        on_step()
        if not math.isfinite(loss):
            result.diverged = True
            nan = {k: math.nan for k in result.evals[0][1]}
            result.evals.append((task.steps, nan))
            for _ in range(step, task.steps):
                on_step()
            break
        if step % task.eval_every == 0 or step == task.steps:
            result.evals.append((step, task.evaluate(model)))
    result.seconds = time.perf_counter() - start
    return result
