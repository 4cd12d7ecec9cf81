"""The optimizers the comparison trains with: one table entry each.

KOALA variants are listed once (``KOALA``) and take part in every line-up at their defaults;
the baselines are listed per line-up with their usual settings:

- ``small`` (the digits and standard-library tasks): SGD with momentum and AdamW, each at the
  settings most code uses unchanged (no learning-rate schedule for anyone);
- ``paper`` (a CIFAR folder): the KOALA authors' CIFAR recipe, in which every optimizer,
  KOALA included, gets weight decay 5e-4 and SGD and Adam are the baselines (values below).

A KOALA variant that this installation lacks (an older ``koala_triton`` without
``KoalaPlusPlus``) is left out, so adding a variant is one line in ``KOALA``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

import koala_triton

Params = Iterable[torch.nn.Parameter]


@dataclass(frozen=True)
class Contender:
    """One optimizer of a line-up.

    name: the label in tables and plots; settings: what it is run with, in words;
    build(params): the optimizer; koala: whether it follows KOALA's protocol (``predict()``
    before the forward pass, ``step(loss=per_sample_losses)``) instead of ``step()``;
    key: the name ``--optimizers`` selects it by (the label without its settings).
    """

    name: str
    settings: str
    build: Callable[[Params], torch.optim.Optimizer]
    koala: bool
    key: str = ""

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", self.name)


#: KOALA variants, as (label, attribute of ``koala_triton``). Built with their defaults
#: (plus the line-up's weight decay).
KOALA = [
    ("KoalaM", "KoalaM"),
    ("KoalaV", "KoalaV"),
    ("KOALA++", "KoalaPlusPlus"),
]

#: Weight decay every optimizer gets in the paper's recipe (the authors' train.py default).
PAPER_WEIGHT_DECAY = 5e-4


def _koala(label: str, cls, weight_decay: float, lr: float | None) -> Contender:
    kwargs = {k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v}
    settings = ", ".join(f"{k}={v:g}" for k, v in kwargs.items()) or "defaults"
    shown = f"{label} (lr={lr:g})" if lr is not None else label
    return Contender(shown, settings, lambda p: cls(p, **kwargs), koala=True, key=label)


def _baselines(lineup: str) -> list[Contender]:
    if lineup == "small":
        return [
            Contender("SGD-momentum", "lr=0.01, momentum=0.9",
                      lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), koala=False),
            Contender("AdamW", "lr=1e-3, weight_decay=0.01 (torch defaults)",
                      lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), koala=False),
        ]
    if lineup == "paper":
        wd = PAPER_WEIGHT_DECAY
        return [
            Contender("SGD-momentum", f"lr=0.01, momentum=0.9, weight_decay={wd:g}",
                      lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=wd), koala=False),
            Contender("Adam", f"lr=1e-3, weight_decay={wd:g}",
                      lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=wd), koala=False),
        ]
    raise ValueError(f"unknown line-up {lineup!r}; known: small, paper")


def lineup(name: str = "small", only: Iterable[str] | None = None, koala_lr: float | None = None) -> list[Contender]:
    """The contenders of a line-up (``small`` or ``paper``): the KOALA variants this
    installation has, then the baselines. ``only``: keep these names (case-insensitive);
    an unknown name raises ``ValueError`` listing the known ones. ``koala_lr``: run the KOALA
    variants with this ``lr`` instead of their default (their labels then say so)."""
    wd = PAPER_WEIGHT_DECAY if name == "paper" else 0.0
    entries = [_koala(label, getattr(koala_triton, attr), wd, koala_lr)
               for label, attr in KOALA if getattr(koala_triton, attr, None) is not None]
    entries += _baselines(name)
    if only is None:
        return entries
    wanted = [o.strip().lower() for o in only if o.strip()]
    known = {c.key.lower(): c for c in entries}
    missing = [o for o in wanted if o not in known]
    if missing:
        raise ValueError(f"unknown optimizer(s) {missing}; known here: {[c.key for c in entries]}")
    return [known[o] for o in wanted]
