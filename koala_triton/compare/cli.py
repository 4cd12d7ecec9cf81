"""The command line of ``python -m koala_triton.compare`` (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import contenders, machine, report, tasks
from .runner import RunSpec, run_plan

#: Default steps of the small tasks, and those of ``--short``.
STEPS = {"digits": 600, "stdlib-lm": 400}
SHORT_STEPS = {"digits": 300, "stdlib-lm": 150}
SMALL_TASKS = ("digits", "stdlib-lm")


def parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="python -m koala_triton.compare", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true",
                   help=f"the quick-start size: fewer steps ({SHORT_STEPS}) and one seed unless --seeds is given")
    p.add_argument("--seeds", type=int, default=None, help="seeds per optimizer and task (default 3; --short: 1)")
    p.add_argument("--tasks", default=",".join(SMALL_TASKS), help=f"comma-separated, among {','.join(SMALL_TASKS)}")
    p.add_argument("--steps", type=int, default=None, help="training steps of every small task (overrides the defaults)")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated names to keep (default: all of the line-up; e.g. KoalaM,AdamW)")
    p.add_argument("--koala-lr", type=float, default=None,
                   help="lr of the KOALA variants (the fraction of the loss a step aims to remove; default: theirs, 1)")
    p.add_argument("--cifar", type=Path, default=None, metavar="DIR",
                   help="train ResNet-18 on this CIFAR-10/100 folder with the paper's recipe instead of the small tasks")
    p.add_argument("--epochs", type=int, default=100, help="--cifar: epochs (default 100, the recipe's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="minibatch size (default: 32 for the small tasks, 128 for --cifar)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0,
                   help="processes training runs side by side (0: one per CPU core on a CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (0: 1 when runs go to workers, torch's default otherwise)")
    p.add_argument("--out", type=Path, default=Path("koala_compare"), help="folder for results.md, results.json and the plots")
    p.add_argument("--machine", default=None, help="how to name this machine in the results (default: detected)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def task_specs(args: argparse.Namespace) -> tuple[str, list[tasks.TaskSpec]]:
    """(line-up name, task specs) for the parsed arguments; an argument error exits through
    ``parser().error`` (status 2, message on stderr)."""
    if args.cifar is not None:
        if args.epochs < 1:
            parser().error("--epochs must be at least 1")
        return "paper", [tasks.TaskSpec.of("cifar", root=str(args.cifar), epochs=args.epochs,
                                           batch_size=args.batch_size or 128)]
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in SMALL_TASKS]
    if unknown or not names:
        parser().error(f"--tasks: unknown {unknown or 'empty list'}; known: {','.join(SMALL_TASKS)}")
    specs = []
    for name in names:
        steps = args.steps or (SHORT_STEPS if args.short else STEPS)[name]
        specs.append(tasks.TaskSpec.of(name, steps=steps, batch_size=args.batch_size or 32,
                                       eval_every=max(steps // 12, 1)))
    return "small", specs


def main(argv: list[str] | None = None) -> dict[str, list[report.Summary]]:
    """Run the comparison; returns the summaries per task (and writes them under ``--out``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.short else 3)
    if seeds < 1:
        parser().error("--seeds must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser().error("--steps must be at least 1")
    if args.workers < 0 or args.threads < 0:
        parser().error("--workers and --threads must be at least 0")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    lineup_name, specs = task_specs(args)
    try:
        lineup = contenders.lineup(lineup_name, args.optimizers.split(",") if args.optimizers else None,
                                   args.koala_lr)
    except ValueError as e:
        parser().error(f"--optimizers: {e}")
    task_list = [spec.build(device) for spec in specs]
    plan = [RunSpec(spec, lineup_name, args.koala_lr, c.key, seed)
            for spec in specs for seed in range(seeds) for c in lineup]
    workers = args.workers or (1 if device.type == "cuda" or args.cifar is not None else (os.cpu_count() or 1))
    threads = args.threads or (1 if workers > 1 else torch.get_num_threads())
    if threads > 0:
        torch.set_num_threads(threads)  # so that describe() reports the threads of a run
    settings = {c.name: c.settings for c in lineup}
    info = machine.describe(device, min(workers, len(plan)))
    if args.machine:
        info["label"] = args.machine
    command = " ".join(["python -m koala_triton.compare", *argv])
    print(f"{info['label']}; {len(task_list)} task(s) x {len(lineup)} optimizers x {seeds} seed(s) on {device}, "
          f"{info['workers']} worker(s) of {threads} thread(s)", file=sys.stderr)

    from tqdm.auto import tqdm

    total = sum(t.steps for t in task_list) * len(lineup) * seeds
    started = time.perf_counter()
    with tqdm(total=total, unit="step", disable=args.no_progress, dynamic_ncols=True) as bar:
        runs = run_plan(plan, str(device), workers, threads, on_steps=bar.update)
    info["seconds_total"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        info["load_average_after"] = round(os.getloadavg()[0], 2)

    args.out.mkdir(parents=True, exist_ok=True)
    sections, out = [], {}
    for task in task_list:
        mine = [r for r in runs if r.task == task.name]
        summaries = report.summarise(mine, task.metric, settings)
        out[task.name] = summaries
        description = (f"{task.title}: {task.steps} steps of {task.batch_size}, evaluated every "
                       f"{task.eval_every} steps; " + (f"mean ± std over {seeds} seeds." if seeds > 1 else "one seed."))
        sections.append((task.name, description, summaries))
        report.plot(mine, task.metric, f"{task.title} ({info['label']})", args.out / f"{task.name}.png")
    page = report.markdown(sections, info, command)
    (args.out / "results.md").write_text(page)
    report.write_json(runs, info, {"argv": argv, "seeds": seeds, "lineup": lineup_name, "settings": settings,
                                   "tasks": {t.name: {"steps": t.steps, "batch_size": t.batch_size,
                                                      "eval_every": t.eval_every} for t in task_list}},
                      args.out / "results.json")
    print(page)
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}, "
          + ", ".join(str(args.out / f'{t.name}.png') for t in task_list), file=sys.stderr)
    return out
