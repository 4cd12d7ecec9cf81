"""torch.distributed: data-parallel (DDP) and sharded (FSDP2) training take one process's steps.

KOALA's step depends on more than the gradient: on the loss statistics (the minibatch mean L
and, with adaptive R, the mean of the squared per-sample losses) and on per-tensor squared
norms (‖g‖², ‖g̃‖², ‖x‖²; KOALA-M's predict also on D = ‖xavg − x‖₂ / n over all parameters).
DDP averages the gradients, but each rank sees only its share of the batch; FSDP2 shards every
tensor, so a norm is a sum over ranks. This module makes both global, with sums only (one
all-reduce of a short float64 vector per update), on the device and without a host sync:

- **Loss statistics** (over the loss group: ``process_group``, by default the default group):
  each rank contributes [Σ(l − f), Σ(l − f)², n], its per-sample losses above the loss floor f
  and their count (``loss_sums``; a scalar loss counts as one sample, weighted like a rank's
  gradient in DDP's average). The global mean and mean of squares go to the backend in the
  scalar form (loss, loss_var) with floor 0, the floor being already subtracted
  (``global_loss``): ``LossInput.moments`` and the Triton filter kernel then compute
  (L − 0, (M2 − 0·L) + 0) = (L, M2) exactly, and count ``below_floor_steps`` from L − f as on
  one process.
- **Per-tensor sums of DTensor parameters** (over the norm group: the ranks of their device
  mesh): a sharded tensor's local sums add up to the tensor's. A tensor replicated along a mesh
  dimension (a plain tensor, or a DTensor with a ``Replicate`` placement) is counted once: only
  its *owner* (coordinate 0 along each replicated dimension; rank 0 of the norm group for a
  plain tensor) contributes, every other rank adds exactly 0 (``Sharding.owner``). KOALA-M's
  distance sum likewise, and its n is the global element count.

When the two groups have the same ranks (FSDP2 on one mesh over all ranks) the loss sums ride
along with the norms in one all-reduce. Collectives per iteration, each one ``all_reduce`` of a
float64 vector (k: the tensors with a gradient):

- plain parameters (DDP): the update 1 ([3] loss sums), the predict 0 (replicas: KOALA-M's D is
  the same on every rank);
- DTensor parameters (FSDP2): the update 1 ([3k + 3]; [3k] with ``reduce_loss`` off; [3k] and
  [3] when the loss group has other ranks than the mesh), KOALA-M's predict 1 ([1] distance
  sum; in fold mode the update reduces the distance instead: 2 per update, 0 per predict but
  the first);
- none on one process, with groups of one rank, or with ``reduce_loss`` off and no DTensor.

All ranks must make the same calls (every rank steps with the same set of gradients, as DDP
and FSDP2 guarantee). The filter is replicated: every rank computes it from the same reduced
values, so it is identical on all ranks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ._loss import LossInput

FLOAT = torch.float64


# ---------------------------------------------------------------------------- DTensors
def _dtensor_class():
    """``DTensor``, once ``torch.distributed.tensor`` is imported (no DTensor exists before)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def any_dtensor(tensors) -> bool:
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensors(tensors: list) -> list:
    """Each DTensor replaced by this rank's local shard (a view of its storage: updating it
    updates the DTensor); other entries (tensors, None) as they are."""
    cls = _dtensor_class()
    if cls is None:
        return tensors
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]


def check_param(name: str, p: Tensor) -> None:
    """A DTensor parameter KOALA can step: each mesh dimension is ``Shard`` or ``Replicate``.

    Raises:
        ValueError: a ``Partial`` (or other) placement, naming the parameter (``name``).
    """
    cls = _dtensor_class()
    if cls is None or not isinstance(p, cls):
        return
    for placement in p.placements:
        if not (placement.is_shard() or placement.is_replicate()):
            raise ValueError(f"params: {name} is a DTensor with placement {placement!r}; KOALA steps parameters "
                             "that are sharded (Shard) or replicated (Replicate) on each mesh dimension")


def check_process_group(group):
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be None or a torch.distributed ProcessGroup, got {type(group).__name__}")
    return group


# ---------------------------------------------------------------------------- loss statistics
def loss_sums(loss: LossInput) -> Tensor:
    """[3] float64: this rank's Σ(l − f), Σ(l − f)² and sample count n (l the per-sample
    losses, f the loss floor). A scalar loss L (with loss_var, the mean of l²) counts as one
    sample: (L − f, mean of (l − f)², 1) as ``LossInput.moments`` forms them; with a fixed R the
    second entry is 0 (unused)."""
    if loss.per_sample:
        shifted = loss.loss.to(FLOAT) - loss.floor
        count = torch.full((), float(shifted.numel()), dtype=FLOAT, device=shifted.device)
        return torch.stack([shifted.sum(), (shifted * shifted).sum(), count])
    mean, second = loss.moments()
    return torch.stack([mean, second if second is not None else torch.zeros_like(mean), torch.ones_like(mean)])


def global_loss(sums: Tensor, adaptive: bool) -> LossInput:
    """The observation of all ranks from the all-reduced ``loss_sums``: the mean and mean of
    squares above the floor, as a scalar ``LossInput`` with floor 0 (the floor is already
    subtracted). Fresh 0-dim tensors (not views: a kernel argument is then 16-byte aligned)."""
    mean = sums[0] / sums[2]
    return LossInput(mean, sums[1] / sums[2] if adaptive else None, adaptive, 0.0)


def all_reduce(vector: Tensor, group) -> Tensor:
    """Sum ``vector`` over ``group`` in place (one collective; on CUDA with NCCL the current
    stream waits for it, the host does not) and return it."""
    dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group)
    return vector


# ---------------------------------------------------------------------------- reductions
def upload_mask(flags, device: torch.device) -> Tensor:
    """A bool device vector of host ``flags`` (pinned source, asynchronous copy on CUDA)."""
    host = torch.tensor(list(flags), dtype=torch.bool)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@dataclass
class SumReduction:
    """A sum over all parameters of per-tensor (or per-chunk) values, over the norm group:
    KOALA-M's ‖xavg − x‖².

    Attributes:
        group: the norm group.
        owner: [n] host flags of the parameters (``Sharding.owner``).
        numel: n of D = ‖xavg − x‖₂ / n: the global element count of all parameters.
    """

    group: object
    owner: tuple[bool, ...]
    numel: int
    _masks: dict = field(default_factory=dict)

    def mask(self, device: torch.device) -> Tensor:
        """[n] bool device vector of ``owner`` (uploaded once)."""
        m = self._masks.get(device)
        if m is None:
            m = upload_mask(self.owner, device)
            self._masks[device] = m
        return m

    def total(self, values: Tensor, mask: Tensor) -> Tensor:
        """[1] float64: Σ values where ``mask`` (the owned entries), summed over the group."""
        return all_reduce(torch.where(mask, values, 0.0).sum().reshape(1), self.group)


@dataclass
class StepReduction:
    """What an update with DTensor parameters reduces: the per-tensor sums of the step's
    tensors (over the norm group) and, when reduced at all, the loss sums (over the loss group,
    in the same all-reduce when the groups have the same ranks).

    Attributes:
        mask: [k] bool device vector: this rank owns the step's tensor i (``Sharding.owner``).
        predict: the sum over all parameters (fold mode reduces its distance in the update).
    """

    norm_group: object
    loss_group: object | None
    fused: bool
    mask: Tensor
    predict: SumReduction

    def reduce(self, loss: LossInput, sums: Tensor) -> tuple[LossInput, Tensor]:
        """(the global loss, [k, c] global sums) from this rank's loss and its [k, c] float64
        local sums of each tensor: ‖g‖², ‖g̃‖², ‖x‖² (c = 3), and for KOALA++ also g̃·h and g̃·v
        (c = 5). Every column is a sum over the tensor's elements, so the shards' sums add up
        to the whole tensor's. The result is a contiguous view of the reduced vector, at its
        start (16-byte aligned)."""
        k, c = sums.shape
        local = torch.where(self.mask[:, None], sums, 0.0).reshape(-1)
        if self.loss_group is not None and self.fused:
            vector = all_reduce(torch.cat([local, loss_sums(loss)]), self.norm_group)
            return global_loss(vector[c * k:], loss.adaptive), vector[:c * k].view(k, c)
        vector = all_reduce(local, self.norm_group)
        if self.loss_group is not None:
            loss = global_loss(all_reduce(loss_sums(loss), self.loss_group), loss.adaptive)
        return loss, vector.view(k, c)


@dataclass(frozen=True)
class Sharding:
    """The distributed facts of the optimizer's parameters (computed once per parameter list).

    Attributes:
        owner: [n] per parameter: this rank adds its local sums into the group's (every shard
            of a sharded tensor; a replicated copy only on its owner).
        numel: the global element count of all parameters (a DTensor's ``numel`` is global).
        norm_group: the group over which per-tensor sums are added: the ranks of the DTensors'
            mesh; None without DTensor parameters or with a mesh of one rank.
    """

    owner: tuple[bool, ...]
    numel: int
    norm_group: object | None


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def _mesh_group(mesh, index: int):
    """The process group of every rank of ``mesh``."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(f"params: parameter {index} lives on a {mesh.ndim}-D device mesh over some of the ranks; "
                     "KOALA adds per-tensor sums over one group of all the mesh's ranks (a 1-D mesh, or an N-D "
                     "mesh over all ranks)")


def describe(params: list[Tensor]) -> Sharding:
    """The ``Sharding`` of ``params`` (the optimizer's flat list).

    Raises:
        ValueError: DTensor parameters on meshes with different ranks, naming one.
    """
    numel = sum(p.numel() for p in params)
    cls = _dtensor_class()
    dtensors = [(i, p) for i, p in enumerate(params) if cls is not None and isinstance(p, cls)]
    if not dtensors:
        return Sharding(owner=(True,) * len(params), numel=numel, norm_group=None)
    first = dtensors[0][0]
    group = _mesh_group(dtensors[0][1].device_mesh, first)
    ranks = _ranks(group)
    for i, p in dtensors:
        if _ranks(_mesh_group(p.device_mesh, i)) != ranks:
            raise ValueError(f"params: parameters {first} and {i} are DTensors on device meshes over different "
                             "ranks; KOALA's one global filter needs all of them on the same ranks")
    if dist.get_world_size(group) == 1:
        return Sharding(owner=(True,) * len(params), numel=numel, norm_group=None)
    lead = dist.get_rank(group) == 0
    owner = []
    for p in params:
        if isinstance(p, cls):
            coordinate = p.device_mesh.get_coordinate()
            owner.append(all(c == 0 for c, pl in zip(coordinate, p.placements) if pl.is_replicate()))
        else:
            owner.append(lead)
    return Sharding(owner=tuple(owner), numel=numel, norm_group=group)


class Collectives:
    """One optimizer's collectives: which groups, and the per-step reductions (runtime state,
    never checkpointed; rebuilt with the default group after pickling).

    Args:
        process_group: the loss group; None: the default group once torch.distributed is
            initialised.
        reduce_loss: False: each rank's update observes its own losses (independent replicas,
            or losses the caller already reduced). DTensor parameters' sums are still reduced.
    """

    def __init__(self, process_group=None, reduce_loss: bool = True):
        self.process_group = check_process_group(process_group)
        self.reduce_loss = reduce_loss
        self._params: list | None = None
        self._sharding: Sharding | None = None
        self._predict: SumReduction | None = None
        self._steps: dict = {}  # id(layout) -> (layout, loss group, StepReduction)

    def loss_group(self):
        """The group the loss statistics are reduced over, or None (not reduced)."""
        if not self.reduce_loss:
            return None
        group = self.process_group
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                return None
            group = dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def sharding(self, params: list[Tensor]) -> Sharding:
        """``describe(params)``, cached while the optimizer's flat list is the same object."""
        if self._params is not params:
            self._sharding = describe(params)
            self._params = params
            self._predict = None
            self._steps = {}
        return self._sharding

    def observed_loss(self, loss: LossInput, params: list[Tensor]) -> LossInput:
        """The loss an update observes: reduced now (one all-reduce of [3]) when the loss is
        reduced and no parameter's sums are; else as given (with DTensor parameters the
        update's ``StepReduction`` reduces it along with their sums)."""
        group = self.loss_group()
        if group is None or self.sharding(params).norm_group is not None:
            return loss
        return global_loss(all_reduce(loss_sums(loss), group), loss.adaptive)

    def predict_reduction(self, params: list[Tensor]) -> SumReduction | None:
        """KOALA-M's distance sum over all ``params``, or None (no DTensor parameters)."""
        sharding = self.sharding(params)
        if sharding.norm_group is None:
            return None
        if self._predict is None:
            self._predict = SumReduction(sharding.norm_group, sharding.owner, sharding.numel)
        return self._predict

    def step_reduction(self, layout, params: list[Tensor], device: torch.device) -> StepReduction | None:
        """The reduction of an update over ``layout``'s tensors (``_plan.StepLayout``), or
        None (no DTensor parameters)."""
        predict = self.predict_reduction(params)
        if predict is None:
            return None
        loss_group = self.loss_group()
        hit = self._steps.get(id(layout))
        if hit is not None and hit[0] is layout and hit[1] is loss_group:
            return hit[2]
        owner = self._sharding.owner
        mask = upload_mask([owner[i] for i in layout.indices], device)
        fused = loss_group is not None and _ranks(loss_group) == _ranks(predict.group)
        reduction = StepReduction(predict.group, loss_group, fused, mask, predict)
        if len(self._steps) >= 16:
            self._steps = {}
        self._steps[id(layout)] = (layout, loss_group, reduction)
        return reduction
