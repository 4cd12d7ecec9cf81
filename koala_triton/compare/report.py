"""Turns runs into the comparison's outputs: a markdown table (mean ± std over seeds), PNG
plots of the curves, and a JSON file with every curve (so tables and plots can be remade)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .train import RunResult

#: How each task metric is shown: column title, format, and whether higher is better.
METRICS = {
    "accuracy": ("test accuracy (%)", "{:.2f}", True),
    "perplexity": ("test perplexity (per char)", "{:.3f}", False),
}


@dataclass(frozen=True)
class Summary:
    """One optimizer on one task, over its seeds: mean and sample std (0 for one seed) of the
    final test metric and loss, the mean of the last tenth of the training losses, and the mean
    wall time of a run (seconds). ``diverged`` runs count as NaN."""

    task: str
    optimizer: str
    settings: str
    seeds: int
    metric: str
    metric_mean: float
    metric_std: float
    loss_mean: float
    loss_std: float
    train_loss: float
    seconds: float
    diverged: int


def _mean_std(values: list[float]) -> tuple[float, float]:
    if any(not math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[RunResult], metric: str, settings: dict[str, str]) -> list[Summary]:
    """One ``Summary`` per optimizer, in the order the optimizers first appear in ``runs``."""
    names = list(dict.fromkeys(r.optimizer for r in runs))
    out = []
    for name in names:
        mine = [r for r in runs if r.optimizer == name]
        m, ms = _mean_std([r.final[metric] for r in mine])
        loss, ls = _mean_std([r.final["loss"] for r in mine])
        tails = [statistics.fmean(r.train_loss[-max(len(r.train_loss) // 10, 1):]) for r in mine]
        train, _ = _mean_std(tails)
        out.append(Summary(mine[0].task, name, settings.get(name, ""), len(mine), metric, m, ms, loss, ls, train,
                           statistics.fmean(r.seconds for r in mine), sum(r.diverged for r in mine)))
    return out


def _pm(mean: float, std: float, fmt: str, seeds: int) -> str:
    if not math.isfinite(mean):
        return "diverged"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if seeds > 1 else "")


def table(summaries: list[Summary]) -> str:
    """A markdown table of one task's summaries; the best mean metric is in bold."""
    metric = summaries[0].metric
    title, fmt, higher = METRICS[metric]
    finite = [s.metric_mean for s in summaries if math.isfinite(s.metric_mean)]
    best = (max(finite) if higher else min(finite)) if finite else None
    lines = [f"| optimizer | settings | {title} | test loss (nats) | train loss, last 10 % | s / run |",
             "|---|---|--:|--:|--:|--:|"]
    for s in summaries:
        cell = _pm(s.metric_mean, s.metric_std, fmt, s.seeds)
        if best is not None and s.metric_mean == best:
            cell = f"**{cell}**"
        train = "diverged" if not math.isfinite(s.train_loss) else f"{s.train_loss:.3f}"
        lines.append(f"| {s.optimizer} | {s.settings} | {cell} | {_pm(s.loss_mean, s.loss_std, '{:.3f}', s.seeds)} "
                     f"| {train} | {s.seconds:.1f} |")
    return "\n".join(lines)


def markdown(sections: list[tuple[str, str, list[Summary]]], machine: dict, command: str) -> str:
    """The whole results page: machine, command, then per task its heading, a line saying what
    ran, its table and its plot. ``sections``: (task name, description, summaries)."""
    lines = ["# KOALA against SGD and AdamW", "",
             f"Machine: {machine['label']}. Command: `{command}`.", ""]
    for name, description, summaries in sections:
        lines += [f"## {name}", "", description, "", table(summaries), "", f"![{name}]({name}.png)", ""]
    return "\n".join(lines)


def plot(runs: list[RunResult], metric: str, title: str, path: Path) -> None:
    """Three panels against the training step: the training loss (a running mean over a
    twentieth of the run), the test loss and the test metric; per optimizer the mean over
    seeds, with the range of the seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r.optimizer for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for color, name in zip(plt.cm.tab10.colors, names):
        mine = [r for r in runs if r.optimizer == name]
        losses = np.array([r.train_loss for r in mine if not r.diverged] or [[np.nan]])
        window = max(losses.shape[1] // 20, 1)
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve(row, kernel, mode="valid") for row in losses])
        steps = np.arange(window, window + smooth.shape[1])
        curves = [(axes[0], steps, smooth)]
        for ax, key in ((axes[1], "loss"), (axes[2], metric)):
            evals = [r for r in mine if not r.diverged]
            if evals:
                x = np.array([s for s, _ in evals[0].evals])
                y = np.array([[e[key] for _, e in r.evals] for r in evals])
                curves.append((ax, x, y))
        for ax, x, y in curves:
            ax.plot(x, y.mean(0), color=color, label=name + (f" ({sum(r.diverged for r in mine)} diverged)"
                                                          if any(r.diverged for r in mine) else ""))
            if y.shape[0] > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.2)
    axes[0].set_title("training loss (running mean)")
    axes[1].set_title("test loss (nats)")
    axes[2].set_title(METRICS[metric][0])
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    if metric == "perplexity":
        axes[2].set_yscale("log")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(runs: list[RunResult], machine: dict, config: dict, path: Path) -> None:
    """Every run (curves included), the machine and the configuration, as JSON."""
    doc = {"machine": machine, "config": config, "runs": [asdict(r) for r in runs]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=True))


def read_runs(path: Path) -> list[RunResult]:
    """The runs of a ``write_json`` file."""
    doc = json.loads(Path(path).read_text())
    return [RunResult(**{**r, "evals": [(s, e) for s, e in r["evals"]]}) for r in doc["runs"]]
