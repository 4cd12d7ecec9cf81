"""The comparison's runs and outputs (``koala_triton/compare``): the optimizer line-ups, one
training run, the summary table, plots and JSON, the command line (argument errors, a tiny
run of each task, worker processes, a fake CIFAR folder with the paper's recipe)."""

from __future__ import annotations

import math

import pytest
import torch

import koala_triton
from koala_triton.compare import cli, contenders, machine, report, tasks
from koala_triton.compare.train import RunResult, train_run
from tests.fake_data import fake_cifar_pickles

def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_sklearn = pytest.mark.skipif(not _has("sklearn"), reason="the compare extra (scikit-learn) is not installed")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The runs here are tiny: one thread is enough, and two are slow on a busy 2-core CI."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------- line-ups
def test_small_lineup_is_koala_at_defaults_and_the_usual_baselines():
    lineup = contenders.lineup("small")
    names = [c.name for c in lineup]
    assert names[:2] == ["KoalaM", "KoalaV"] and names[-2:] == ["SGD-momentum", "AdamW"]
    assert ("KOALA++" in names) == hasattr(koala_triton, "KoalaPlusPlus")
    params = [torch.nn.Parameter(torch.zeros(3))]
    built = {c.name: c.build(params) for c in lineup}
    m = built["KoalaM"]
    assert isinstance(m, koala_triton.KoalaM) and m.param_groups[0]["lr"] == 1.0
    assert m.param_groups[0]["weight_decay"] == 0.0
    assert built["SGD-momentum"].param_groups[0]["lr"] == 0.01 and built["SGD-momentum"].param_groups[0]["momentum"] == 0.9
    assert isinstance(built["AdamW"], torch.optim.AdamW) and built["AdamW"].param_groups[0]["weight_decay"] == 0.01
    assert [c.koala for c in lineup] == [c.name not in ("SGD-momentum", "AdamW") for c in lineup]


def test_paper_lineup_gives_everyone_weight_decay():
    params = [torch.nn.Parameter(torch.zeros(3))]
    lineup = contenders.lineup("paper")
    assert [c.name for c in lineup][-2:] == ["SGD-momentum", "Adam"]
    for c in lineup:
        assert c.build(params).param_groups[0]["weight_decay"] == contenders.PAPER_WEIGHT_DECAY, c.name
    assert type(lineup[-1].build(params)) is torch.optim.Adam


def test_a_new_koala_variant_is_one_entry(monkeypatch):
    class KoalaPlusPlus(koala_triton.KoalaV):  # a stand-in with the same protocol
        pass

    monkeypatch.setattr(koala_triton, "KoalaPlusPlus", KoalaPlusPlus, raising=False)
    entry = {c.name: c for c in contenders.lineup("small")}["KOALA++"]
    assert entry.koala and isinstance(entry.build([torch.nn.Parameter(torch.zeros(2))]), KoalaPlusPlus)
    monkeypatch.delattr(koala_triton, "KoalaPlusPlus")
    assert "KOALA++" not in [c.name for c in contenders.lineup("small")]


def test_selecting_optimizers_and_koala_lr():
    chosen = contenders.lineup("small", ["adamw", " KoalaV"], koala_lr=0.1)
    assert [c.name for c in chosen] == ["AdamW", "KoalaV (lr=0.1)"] and chosen[1].key == "KoalaV"
    assert chosen[1].build([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="unknown optimizer.*'lion'.*known here"):
        contenders.lineup("small", ["Lion"])
    with pytest.raises(ValueError, match="unknown line-up"):
        contenders.lineup("large")


# ------------------------------------------------------------------------------ one run
@needs_sklearn
def test_a_run_records_curves_and_is_reproducible():
    task = tasks.digits_task("cpu", steps=12, eval_every=5)
    koala, sgd = contenders.lineup("small", ["KoalaM", "SGD-momentum"])
    calls = []
    a = train_run(task, koala, seed=3, on_step=lambda: calls.append(1))
    assert len(calls) == 12 and len(a.train_loss) == 12
    assert [s for s, _ in a.evals] == [0, 5, 10, 12] and set(a.final) == {"loss", "accuracy"}
    assert a.seconds > 0 and not a.diverged
    b = train_run(task, koala, seed=3)
    assert a.train_loss == b.train_loss and a.evals == b.evals
    c = train_run(task, sgd, seed=3)
    assert c.evals[0] == a.evals[0]  # same initial weights for every optimizer of a seed
    assert c.train_loss[0] == a.train_loss[0]  # and the same first batch
    assert train_run(task, koala, seed=4).evals[0] != a.evals[0]


@needs_sklearn
def test_a_diverging_run_is_marked_and_finishes_its_steps():
    task = tasks.digits_task("cpu", steps=30, eval_every=10)
    wild = contenders.Contender("SGD-wild", "lr=1e12", lambda p: torch.optim.SGD(p, lr=1e12), koala=False)
    calls = []
    r = train_run(task, wild, seed=0, on_step=lambda: calls.append(1))
    assert r.diverged and len(calls) == 30
    assert r.evals[-1][0] == 30 and math.isnan(r.final["accuracy"]) and math.isnan(r.final["loss"])


def test_language_model_task_shapes_and_metric():
    task = tasks.stdlib_lm_task("cpu", steps=2, batch_size=4, context=16)
    x, y = next(task.batches(torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    torch.manual_seed(0)
    model = task.build_model()
    assert task.per_sample_loss(model, x, y).shape == (4,)
    result = task.evaluate(model)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert 60 < result["perplexity"] < 200  # an untrained model: about the vocabulary size (97)


def test_cifar_task_scales_the_recipes_milestones(tmp_path):
    fake_cifar_pickles(tmp_path, hundred=False, n_train=(10, 10))  # 23 training images
    task = tasks.TaskSpec.of("cifar", root=str(tmp_path), epochs=10, batch_size=4).build(torch.device("cpu"))
    assert task.steps == 10 * 5 and task.eval_every == 5
    assert task.milestones == (15, 30, 45) and task.gamma == 0.2  # epochs 3, 6, 9 of 10
    x, y = next(task.batches(torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    full = tasks.TaskSpec.of("cifar", root=str(tmp_path), epochs=100, batch_size=4).build(torch.device("cpu"))
    assert full.milestones == (150, 300, 450)  # epochs 30, 60, 90
    with pytest.raises(ValueError, match="unknown task"):
        tasks.TaskSpec.of("mnist")


# ------------------------------------------------------------------------------- report
def _run(name, seed, acc, loss, diverged=False):
    r = RunResult("digits", name, seed, train_loss=[2.0] * 9 + [loss], seconds=1.0 + seed, diverged=diverged)
    r.evals = [(0, {"loss": 2.3, "accuracy": 10.0}), (10, {"loss": loss, "accuracy": acc})]
    return r


def test_summary_mean_std_and_table():
    runs = [_run("A", 0, 90.0, 0.3), _run("A", 1, 94.0, 0.5), _run("B", 0, 95.0, 0.2), _run("B", 1, 97.0, 0.2),
            _run("C", 0, math.nan, math.nan, diverged=True), _run("C", 1, 50.0, 1.0)]
    summaries = report.summarise(runs, "accuracy", {"A": "lr=1"})
    a, b, c = summaries
    assert (a.metric_mean, a.metric_std) == (92.0, pytest.approx(2 * math.sqrt(2)))
    assert (a.loss_mean, a.seconds, a.settings, a.seeds) == (0.4, 1.5, "lr=1", 2)
    assert a.train_loss == 0.4  # the last tenth of 10 losses: the last one
    assert math.isnan(c.metric_mean) and c.diverged == 1
    text = report.table(summaries)
    assert "| A | lr=1 | 92.00 ± 2.83 | 0.400 ± 0.141 |" in text
    assert "**96.00 ± 1.41**" in text and "| C |  | diverged | diverged |" in text


def test_table_marks_the_lowest_perplexity_and_omits_std_for_one_seed():
    runs = []
    for name, ppl in (("A", 12.0), ("B", 11.0)):
        r = RunResult("lm", name, 0, train_loss=[2.5], seconds=2.0)
        r.evals = [(0, {"loss": 4.6, "perplexity": 97.0}), (5, {"loss": math.log(ppl), "perplexity": ppl})]
        runs.append(r)
    text = report.table(report.summarise(runs, "perplexity", {}))
    assert "| **11.000** |" in text and "| 12.000 |" in text and "±" not in text


def test_plot_and_json_round_trip(tmp_path):
    runs = [_run("A", 0, 90.0, 0.3), _run("A", 1, 94.0, 0.5), _run("C", 0, math.nan, math.nan, diverged=True)]
    report.plot(runs, "accuracy", "title", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.write_json(runs, {"label": "m"}, {"seeds": 2}, tmp_path / "r.json")
    back = report.read_runs(tmp_path / "r.json")
    assert [r.optimizer for r in back] == ["A", "A", "C"] and back[1].evals == runs[1].evals
    assert back[2].diverged and math.isnan(back[2].final["loss"])


def test_machine_names_the_cpu_model_cores_and_vm():
    name, vm = machine.cpu_model("processor : 0\nmodel name\t: AMD EPYC  7B13\nflags : fpu hypervisor avx2\n")
    assert (name, vm) == ("AMD EPYC 7B13", True)
    assert machine.cpu_model("model name : Intel(R) Xeon(R)\nflags : fpu avx2\n") == ("Intel(R) Xeon(R)", False)
    info = machine.describe(torch.device("cpu"), workers=2)
    assert f"{info['cores']}-core" in info["label"] and "2 runs at a time" in info["label"]
    assert info["torch"] == torch.__version__


# ------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv,message", [
    (["--tasks", "mnist"], "--tasks: unknown ['mnist']"),
    (["--tasks", ","], "--tasks: unknown empty list"),
    (["--optimizers", "Lion"], "--optimizers: unknown optimizer"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--workers", "-1"], "--workers and --threads must be at least 0"),
    (["--cifar", "/nonexistent/cifar", "--epochs", "0"], "--epochs must be at least 1"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_cifar_folder_names_the_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no CIFAR data.*cifar-10-batches-py"):
        cli.main(["--cifar", str(tmp_path), "--no-progress"])


@needs_sklearn
def test_tiny_comparison_writes_table_json_and_plots(tmp_path, capsys):
    out = cli.main(["--steps", "2", "--seeds", "2", "--optimizers", "KoalaM,AdamW", "--workers", "1",
                    "--threads", "1", "--out", str(tmp_path), "--no-progress"])
    assert list(out) == ["digits", "stdlib-lm"]
    assert [s.optimizer for s in out["digits"]] == ["KoalaM", "AdamW"] and out["digits"][0].seeds == 2
    page = (tmp_path / "results.md").read_text()
    assert "## digits" in page and "## stdlib-lm" in page and "| KoalaM | defaults |" in page
    assert "Machine: " in page and "`python -m koala_triton.compare --steps 2" in page
    for name in ("digits.png", "stdlib-lm.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    runs = report.read_runs(tmp_path / "results.json")
    assert len(runs) == 2 * 2 * 2 and all(len(r.train_loss) == 2 for r in runs)
    assert "| AdamW |" in capsys.readouterr().out


@needs_sklearn
def test_worker_processes_give_the_same_results(tmp_path):
    argv = ["--tasks", "digits", "--steps", "3", "--seeds", "2", "--optimizers", "KoalaV,SGD-momentum",
            "--no-progress", "--threads", "1"]
    one = cli.main(argv + ["--workers", "1", "--out", str(tmp_path / "one")])
    two = cli.main(argv + ["--workers", "2", "--out", str(tmp_path / "two")])
    strip = lambda summaries: [(s.optimizer, s.metric_mean, s.loss_mean, s.train_loss) for s in summaries]
    assert strip(one["digits"]) == strip(two["digits"])


def test_cifar_recipe_on_a_fake_folder(tmp_path):
    fake_cifar_pickles(tmp_path / "data", hundred=True, n_train=(8, 0), n_test=4)
    out = cli.main(["--cifar", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "4", "--threads", "1",
                    "--optimizers", "KoalaM,Adam", "--seeds", "1", "--out", str(tmp_path / "out"), "--no-progress"])
    (summaries,) = out.values()
    assert [s.optimizer for s in summaries] == ["KoalaM", "Adam"]
    assert summaries[0].settings == "weight_decay=0.0005" and "weight_decay=0.0005" in summaries[1].settings
    assert all(math.isfinite(s.loss_mean) for s in summaries)
    assert "cifar100 (100 classes), ResNet-18" in (tmp_path / "out" / "results.md").read_text()
