"""The training problems of the comparison: data on a device, a model builder, per-sample
losses and a test evaluation. A task knows nothing about optimizers (``train.py`` does).

- ``digits``: scikit-learn's handwritten digits, a small CNN; metric: test accuracy (%).
- ``stdlib-lm``: a character-level transformer on the standard library's source files;
  metric: test perplexity (per character).
- ``cifar``: a user's CIFAR-10/100 folder, ResNet-18, the authors' recipe (``cifar_task``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import cifar, data, models

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ClassificationTask:
    """Images and labels held on ``device``; minibatches drawn per epoch without replacement
    (a fresh permutation each epoch, the last incomplete batch dropped).

    ``prepare`` turns stored inputs into model inputs (augmentation, normalisation); it gets
    the batch and the run's CPU generator (None at evaluation).
    """

    name: str
    title: str
    split: data.Split
    build_model: Callable[[], nn.Module]
    batch_size: int
    steps: int
    eval_every: int
    device: torch.device
    prepare: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] = lambda x, g: x.float()
    milestones: tuple[int, ...] = ()   # steps at which every group's lr is multiplied by gamma
    gamma: float = 1.0
    metric: str = "accuracy"           # test accuracy in %, higher is better
    eval_batch: int = 1000
    _on_device: data.Split | None = field(default=None, repr=False)

    def _data(self) -> data.Split:
        if self._on_device is None:
            s = self.split
            self._on_device = data.Split(*(t.to(self.device) for t in (s.x_train, s.y_train, s.x_test, s.y_test)))
        return self._on_device

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """Endless training minibatches (x, y [B]) on the device; order from ``generator``."""
        d = self._data()
        n = d.y_train.shape[0]
        if n < self.batch_size:
            raise ValueError(f"{self.name}: {n} training examples, fewer than one batch of {self.batch_size}")
        while True:
            order = torch.randperm(n, generator=generator).to(self.device)
            for i in range(n // self.batch_size):
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                yield self.prepare(d.x_train[idx], generator), d.y_train[idx]

    def per_sample_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each example, [B] (nats)."""
        return F.cross_entropy(model(x), y, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean test cross-entropy (``loss``, nats) and ``accuracy`` (%) over the whole test set."""
        d = self._data()
        was_training = model.training
        model.eval()
        total, correct = 0.0, 0
        for i in range(0, d.y_test.shape[0], self.eval_batch):
            x, y = self.prepare(d.x_test[i:i + self.eval_batch], None), d.y_test[i:i + self.eval_batch]
            logits = model(x).float()
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        model.train(was_training)
        n = d.y_test.shape[0]
        return {"loss": total / n, "accuracy": 100.0 * correct / n}


@dataclass
class CharLMTask:
    """Next-character prediction on character-id streams (``data.TextSplit``).

    Training windows of ``context + 1`` characters start at uniformly drawn positions; the test
    set is ``eval_windows`` evenly spaced windows of the test stream (the same for every run).
    """

    name: str
    title: str
    text: data.TextSplit
    context: int
    batch_size: int
    steps: int
    eval_every: int
    device: torch.device
    eval_windows: int = 256
    width: int = 64
    layers: int = 2
    milestones: tuple[int, ...] = ()
    gamma: float = 1.0
    metric: str = "perplexity"         # exp(mean test cross-entropy per character), lower is better
    _streams: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def build_model(self) -> nn.Module:
        return models.CharTransformer(data.VOCAB, self.context, self.width, layers=self.layers)

    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._streams is None:
            self._streams = (self.text.train.to(self.device).long(), self.text.test.to(self.device).long())
        return self._streams

    def _windows(self, stream: torch.Tensor, starts: torch.Tensor) -> Batch:
        idx = starts.to(self.device)[:, None] + torch.arange(self.context + 1, device=self.device)
        w = stream[idx]                                                  # [B, context + 1]
        return w[:, :-1], w[:, 1:]

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """Endless minibatches (ids [B, T], next ids [B, T]) on the device."""
        train, _ = self._data()
        last = train.shape[0] - self.context - 1
        if last <= 0:
            raise ValueError(f"{self.name}: a training stream of {train.shape[0]} characters is shorter than one window")
        while True:
            yield self._windows(train, torch.randint(0, last, (self.batch_size,), generator=generator))

    def per_sample_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per character of each window, [B] (nats)."""
        logits = model(x)                                                # [B, T, V]
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean test cross-entropy per character (``loss``, nats) and ``perplexity`` = exp(loss)."""
        _, test = self._data()
        starts = torch.linspace(0, test.shape[0] - self.context - 1, self.eval_windows).long()
        was_training = model.training
        model.eval()
        total = 0.0
        for chunk in starts.split(64):
            x, y = self._windows(test, chunk)
            total += F.cross_entropy(model(x).float().transpose(1, 2), y, reduction="sum").item()
        model.train(was_training)
        loss = total / (self.eval_windows * self.context)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


Task = ClassificationTask | CharLMTask


def digits_task(device: torch.device, steps: int = 600, batch_size: int = 32, eval_every: int = 50) -> ClassificationTask:
    """Handwritten digits (1347 training, 450 test images), ``models.digits_cnn``; 600 steps of
    32 images are about 14 epochs."""
    return ClassificationTask("digits", "scikit-learn digits, small CNN", data.load_digits(), models.digits_cnn,
                              batch_size, steps, eval_every, torch.device(device))


def stdlib_lm_task(device: torch.device, steps: int = 400, batch_size: int = 32, eval_every: int = 50,
                   context: int = 64) -> CharLMTask:
    """A 2-layer, width-64 character transformer (116,705 parameters) on the standard library's
    top-level modules (every 10th file held out); 400 steps of 32 windows of 64 characters."""
    return CharLMTask("stdlib-lm", "character LM on the Python standard library", data.load_stdlib_text(),
                      context, batch_size, steps, eval_every, torch.device(device))


def cifar_task(device: torch.device, root, epochs: int = 100, batch_size: int = 128) -> ClassificationTask:
    """The authors' CIFAR recipe: ResNet-18 (CIFAR stem), ``epochs`` epochs of ``batch_size``
    images (last incomplete batch dropped), random crop + flip, every lr multiplied by 0.2 at
    30 %, 60 % and 90 % of training (epochs 30, 60 and 90 of 100); evaluated once per epoch."""
    c = cifar.load_cifar(root)
    per_epoch = c.split.y_train.shape[0] // batch_size
    if per_epoch == 0:
        raise ValueError(f"{root}: {c.split.y_train.shape[0]} training images, fewer than one batch of {batch_size}")
    steps = epochs * per_epoch
    milestones = tuple(sorted({round(epochs * f) * per_epoch for f in (0.3, 0.6, 0.9)} - {0}))

    def prepare(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return cifar.normalise(x if generator is None else cifar.augment(x, generator), c.mean, c.std)

    return ClassificationTask(c.name, f"{c.name} ({c.num_classes} classes), ResNet-18",
                              c.split, lambda: models.resnet18_cifar(c.num_classes), batch_size, steps, per_epoch,
                              torch.device(device), prepare=prepare, milestones=milestones, gamma=0.2, eval_batch=500)


#: The task builders by name (``TaskSpec.kind``).
BUILDERS = {"digits": digits_task, "stdlib-lm": stdlib_lm_task, "cifar": cifar_task}


@dataclass(frozen=True)
class TaskSpec:
    """A task by name and builder arguments: what a worker process needs to build the task
    itself (tasks hold data tensors and closures, which are not sent between processes).
    ``options``: keyword arguments of the builder, as sorted (name, value) pairs."""

    kind: str
    options: tuple[tuple[str, object], ...] = ()

    @staticmethod
    def of(kind: str, **options) -> "TaskSpec":
        if kind not in BUILDERS:
            raise ValueError(f"unknown task {kind!r}; known: {', '.join(BUILDERS)}")
        return TaskSpec(kind, tuple(sorted(options.items())))

    def build(self, device: torch.device) -> Task:
        return BUILDERS[self.kind](device=torch.device(device), **dict(self.options))
