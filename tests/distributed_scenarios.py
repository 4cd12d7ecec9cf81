"""Training runs for the distributed tests: one scenario, on one rank or on one process.

A *scenario* (``Scenario``) trains a small MLP (two param groups, one with weight decay) for a
few steps with one KOALA case of the registry (``tests/variants.py``), wrapped as the scenario
says (DDP, FSDP2's ``fully_shard``, or FSDP2 on one layer with a plain replicated one), each rank
on its share of a fixed batch per step. ``train`` runs it on one rank of an initialised process
group (``tests/distributed_launch.py`` spawns them) or, with ``world=1`` and no process group, as
the one process on the whole batch that the ranks must match.

Each rank's backward uses ``losses.sum() · world / B`` (B the whole batch): DDP and FSDP2
average the ranks' gradients, so every run's gradient is the mean over the whole batch, also
when the batch is split unevenly.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import forbid_host_reads
from tests.variants import case as case_of

BATCH = 8
STEPS = 10
#: Ranks' shares of the batch: equal halves, or 5 and 3 samples.
SPLITS = {"even": (4, 4), "uneven": (5, 3)}


@dataclass(frozen=True)
class Scenario:
    """One distributed training run.

    Attributes:
        name: the test id (``"ddp-V-torch"``).
        case: the registry case id (``"V"``, ``"V-fixed-r"``, ``"M"``, ``"M-fold"``).
        wrap: ``"ddp"``, ``"fsdp"`` (every layer and the root ``fully_shard``), or
            ``"fsdp-mixed"`` (the first layer sharded, the last a plain tensor whose gradients
            are averaged by hand: a replicated parameter next to sharded ones).
        path: ``"torch"`` or ``"triton"`` (``fused=True`` on CPU: Triton's interpreter).
        split: ``"even"`` or ``"uneven"`` (``SPLITS``).
        handoff: ``"step"`` (``step(loss=losses)``) or ``"observe"`` (``observe(losses)``, then
            ``step()``).
        kwargs: more optimizer kwargs (``loss_floor``, ``reduce_loss``).
        checkpoint: save with torch.distributed.checkpoint after ``checkpoint`` steps, then
            resume a new model and optimizer from it (``train`` returns both runs).
    """

    name: str
    case: str
    wrap: str
    path: str = "torch"
    split: str = "even"
    handoff: str = "step"
    kwargs: tuple = ()
    checkpoint: int | None = None
    steps: int = STEPS

    @property
    def one_process(self) -> tuple:
        """What the one-process run depends on (not the wrapping, the split or a checkpoint)."""
        return self.case, self.path, self.handoff, self.kwargs, self.steps

    @property
    def optimizer_kwargs(self) -> dict:
        case = case_of(self.case)
        fused = self.path == "triton"
        return {**(case.kwargs if fused else case.twin_kwargs), "fused": fused, **dict(self.kwargs)}


@dataclass
class Run:
    """What one rank (or the one process) ends with.

    Attributes:
        params: the full weights, in ``model.parameters()`` order (FSDP2's gathered).
        filter: the optimizer's ``filter_state`` (clones).
        collectives: per iteration, the c10d collectives ``predict()`` and the update issued,
            as (op, dtype, numel) per tensor.
        resumed: with a checkpoint, the run resumed from it (params and filter as above).
        seconds: wall time of the run.
    """

    params: list
    filter: dict
    collectives: list = field(default_factory=list)
    resumed: dict | None = None
    seconds: float = 0.0


def build_model(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def share(step: int, split: str, rank: int, world: int):
    """This rank's samples of the step's batch (the whole batch for one process)."""
    x, y = batch(step)
    if world == 1:
        return x, y
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]], y[start:start + sizes[rank]]


def wrap(model: nn.Module, how: str, world: int) -> nn.Module:
    if world == 1:
        return model
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    if how == "fsdp":
        fully_shard(model[2])
        fully_shard(model)
    return model


def optimizer(scenario: Scenario, model: nn.Module):
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr": 0.7},
              {"params": params[2:], "lr": 0.4, "weight_decay": 0.01}]
    return case_of(scenario.case).cls(groups, **scenario.optimizer_kwargs)


def _average_plain_grads(model: nn.Module, world: int) -> None:
    """fsdp-mixed: the plain layer's gradients averaged over ranks, as DDP would."""
    import torch.distributed as dist

    for p in model[2].parameters():
        dist.all_reduce(p.grad)
        p.grad /= world


def iterate(scenario: Scenario, model, opt, step: int, rank: int, world: int, counter=None) -> None:
    """One training iteration: predict, forward, backward, update (``counter``: a context,
    entered around predict and around the update, e.g. to count their collectives)."""
    count = counter if counter is not None else contextlib.nullcontext()
    with count:
        opt.predict()
    x, y = share(step, scenario.split, rank, world)
    losses = F.cross_entropy(model(x), y, reduction="none")
    opt.zero_grad()
    (losses.sum() * (world / BATCH)).backward()
    if world > 1 and scenario.wrap == "fsdp-mixed":
        _average_plain_grads(model, world)
    with count:
        if scenario.handoff == "observe":
            opt.observe(losses.detach())
            opt.step()
        else:
            opt.step(loss=losses.detach())


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """The full weights (gathered from the shards of DTensor parameters)."""
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


def snapshot(model, opt) -> dict:
    return {"params": full_params(model), "filter": {k: v.clone() for k, v in opt.filter_state.items()}}


def train(scenario: Scenario, rank: int = 0, world: int = 1, *, counter=None, checkpoint_dir: str | None = None) -> Run:
    """Run ``scenario`` on this rank (``world`` > 1: the process group is initialised) or as one
    process on the whole batch (``world == 1``). ``counter()``: a new context per iteration
    with a ``count`` (``iterate``)."""
    t0 = time.perf_counter()
    model = wrap(build_model(0), scenario.wrap, world)
    opt = optimizer(scenario, model)
    counts = []
    resumed = None
    for step in range(scenario.steps):
        if scenario.checkpoint == step and world > 1:
            resumed = _resume_later(scenario, model, opt, rank, world, checkpoint_dir)
        calls = counter() if counter is not None else None
        iterate(scenario, model, opt, step, rank, world, calls)
        counts.append(calls.count if calls is not None else 0)
    end = snapshot(model, opt)
    if resumed is not None:
        resumed = resumed()
    return Run(params=end["params"], filter=end["filter"], collectives=counts, resumed=resumed,
               seconds=time.perf_counter() - t0)


def _resume_later(scenario, model, opt, rank, world, checkpoint_dir):
    """Save model and optimizer with torch.distributed.checkpoint now; return a function that
    (after the original run ended) builds a new model and optimizer from another seed, loads the
    checkpoint into them and runs the remaining steps on the same data."""
    import torch.distributed.checkpoint as dcp

    start = scenario.checkpoint
    path = os.path.join(checkpoint_dir, scenario.name)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)

    def resume() -> dict:
        model2 = wrap(build_model(1), scenario.wrap, world)
        opt2 = optimizer(scenario, model2)
        state = {"model": model2.state_dict(), "optim": opt2.state_dict()}
        dcp.load(state, checkpoint_id=path)
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["optim"])
        for step in range(start, scenario.steps):
            iterate(scenario, model2, opt2, step, rank, world)
        return snapshot(model2, opt2)

    return resume


# ---------------------------------------------------------------------------- the scenarios
def _scenarios() -> list[Scenario]:
    """Every registry case under FSDP2 on both paths (the PyTorch path: the cases it has),
    and under DDP on the PyTorch path; DDP on the Triton path in each variant's default mode
    (the Triton backend sees only a reduced scalar loss there, whatever the mode). FSDP2 runs
    of default modes and of the fold mode also round-trip a checkpoint after 5 steps. Then:
    an uneven split with a loss floor and the ``observe()`` hand-off on each path, FSDP2 next to
    a plain replicated layer, and the ``reduce_loss=False`` opt-out under DDP and FSDP2."""
    from tests.variants import DEFAULT, VARIANTS, cases

    out = []
    for path in ("torch", "triton"):
        for c in cases(where=lambda c: path == "triton" or not c.mode.triton_only):
            if path == "torch" or c.mode.name == DEFAULT:
                out.append(Scenario(f"ddp-{c.id}-{path}", c.id, "ddp", path))
            checkpoint = 5 if (path == "torch" and c.mode.name == DEFAULT) or c.fold else None
            out.append(Scenario(f"fsdp-{c.id}-{path}", c.id, "fsdp", path, checkpoint=checkpoint))
    first = next(iter(VARIANTS))
    momentum = next(v.id for v in VARIANTS.values() if v.has_velocity)  # a predict with a distance
    for variant, path in ((momentum, "torch"), (first, "triton")):
        out.append(Scenario(f"ddp-{variant}-uneven-floor-observe-{path}", variant, "ddp", path, split="uneven",
                            handoff="observe", kwargs=(("loss_floor", -0.5),)))
    out.append(Scenario(f"fsdp-mixed-{momentum}-torch", momentum, "fsdp-mixed"))
    for how in ("ddp", "fsdp"):
        out.append(Scenario(f"{how}-{first}-no-reduce-loss-torch", first, how, kwargs=(("reduce_loss", False),)))
    return out


SCENARIOS = {s.name: s for s in _scenarios()}


# ---------------------------------------------------------------------------- on each rank
class StepProbe(TorchDispatchMode):
    """Entered around ``predict()`` and around the update: records every c10d collective as
    (op, dtype, numel) in ``count`` and, with ``forbid_host_reads``, makes every host read of a
    tensor raise (``tests/helpers.forbid_host_reads``: the PyTorch path never reads a device
    value on the host inside a step)."""

    def __init__(self, forbid_host_reads: bool):
        super().__init__()
        self.count: list[tuple[str, str, int]] = []
        self.forbid = forbid_host_reads
        self._guard = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "c10d" in func.namespace:
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.count.extend((func.overloadpacket.__name__, str(t.dtype), t.numel()) for t in tensors)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        if self.forbid:
            self._guard = forbid_host_reads()
            self._guard.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._guard is not None:
                self._guard.__exit__(*exc)
                self._guard = None


def rank_main(rank: int, world: int, names: list[str], checkpoint_dir: str, examples: tuple = ()) -> dict:
    """Run the named scenarios on this rank (``tests/distributed_launch.run_ranks``), then
    ``koala_triton.examples.ddp.main(argv)`` for each argv of ``examples``: the scenarios'
    ``Run``s by name, the examples' final losses (or the error an example raised), and the
    compile keys of the interpreted Triton launches."""
    from koala_triton.examples import ddp
    from tests import compiled_typing

    os.environ["TRITON_INTERPRET"] = "1"  # fused=True on CPU tensors: Triton's interpreter
    keys = compiled_typing.record_in_this_process()
    runs = {}
    for name in names:
        scenario = SCENARIOS[name]
        counter = lambda: StepProbe(forbid_host_reads=scenario.path == "torch")  # noqa: E731
        runs[name] = train(scenario, rank, world, counter=counter, checkpoint_dir=checkpoint_dir)
    losses = []
    for argv in examples:
        try:
            losses.append(ddp.main(list(argv)))
        except (Exception, SystemExit) as error:  # reported by the test, not the whole run
            losses.append(repr(error))
    return {"runs": runs, "examples": losses, "compile_keys": dict(keys)}
