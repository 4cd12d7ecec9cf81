"""Runs a plan of (task, optimizer, seed) runs, in this process or on worker processes.

The runs are independent and the small tasks' models are small, so on a CPU the command uses
the cores for runs rather than inside them: by default each core gets a worker process that
trains one run at a time with one torch thread. Every run uses the same thread count however
many workers there are, so the results do not depend on ``workers``.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from concurrent.futures import ProcessPoolExecutor, wait, FIRST_COMPLETED
from dataclasses import dataclass
from typing import Callable

import torch

from . import contenders
from .tasks import TaskSpec
from .train import RunResult, train_run

#: Steps between progress messages from a worker.
_REPORT_EVERY = 10


@dataclass(frozen=True)
class RunSpec:
    """One run: the task, the line-up and its KOALA lr, the optimizer's key, the seed."""

    task: TaskSpec
    lineup: str
    koala_lr: float | None
    optimizer: str
    seed: int


_tasks: dict = {}          # per process: built tasks by (spec, device)
_progress = None           # per worker: the queue progress goes to


def _task(spec: TaskSpec, device: str):
    key = (spec, device)
    if key not in _tasks:
        _tasks[key] = spec.build(torch.device(device))
    return _tasks[key]


def run_one(spec: RunSpec, device: str, on_step: Callable[[], None] = lambda: None) -> RunResult:
    """Build (or reuse) the task, build the optimizer, train."""
    contender, = contenders.lineup(spec.lineup, [spec.optimizer], spec.koala_lr)
    return train_run(_task(spec.task, device), contender, spec.seed, on_step)


def _init_worker(threads: int, progress) -> None:
    global _progress
    torch.set_num_threads(threads)
    _progress = progress


def _run_in_worker(spec: RunSpec, device: str) -> RunResult:
    count = 0

    def on_step():
        nonlocal count
        count += 1
        if count == _REPORT_EVERY:
            _progress.put(count)
            count = 0

    result = run_one(spec, device, on_step)
    if count:
        _progress.put(count)
    return result


def run_plan(plan: list[RunSpec], device: str, workers: int, threads: int,
             on_steps: Callable[[int], None] = lambda n: None) -> list[RunResult]:
    """The results of ``plan``, in plan order. ``workers`` > 1 runs them on that many spawned
    processes (CPU only), each with ``threads`` torch threads; ``on_steps(n)`` is told about
    every n steps done (from this process: safe for a progress bar)."""
    if workers <= 1 or len(plan) <= 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return [run_one(spec, device, lambda: on_steps(1)) for spec in plan]
        finally:
            torch.set_num_threads(previous)
    context = multiprocessing.get_context("spawn")
    results: dict[int, RunResult] = {}
    with context.Manager() as manager, ProcessPoolExecutor(
            min(workers, len(plan)), mp_context=context, initializer=_init_worker,
            initargs=(threads, progress := manager.Queue())) as pool:
        pending = {pool.submit(_run_in_worker, spec, device): i for i, spec in enumerate(plan)}
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress, on_steps)
            for future in done:
                results[pending.pop(future)] = future.result()
        _drain(progress, on_steps)
    return [results[i] for i in range(len(plan))]


def _drain(progress, on_steps) -> None:
    while True:
        try:
            on_steps(progress.get_nowait())
        except queue_module.Empty:
            return
