"""Time and bandwidth of each Triton pass of KOALA, per optimizer and parameter set.

    python -m bench.profile_kernels --out DIR [--device auto|cuda|cpu]
        [--cases gpt2-small:fp32,resnet18:fp32,gpt2-small:bf16] [--weight-decays 0,5e-4]
        [--optimizers koala_v,koala_m,koala_m_fold] [--iters N] [--warmup N] [--budget-s S]

Each case is a parameter set (``bench/param_sets.py``) × dtype × weight decay × optimizer
(``KoalaV``, ``KoalaM``, ``KoalaM(fold_predict=True)``, all ``fused=True``). A case runs
``--warmup`` iterations (``predict()`` + ``step(loss=...)``; the first compiles the kernels,
and fold mode's first differs from the later ones), then ``--iters`` measured iterations, and
records for each pass (``norms_kernel``, ``filter_kernel``, ``predict_kernel``,
``update_kernel``, ``fold_kernel``) its launches and microseconds per iteration and its bandwidth

    GB/s = B/param(fp32) × (element size / 4 B) × parameters / (µs per iteration × 1e3)

with the bytes each pass moves per fp32 parameter by design (``koala_triton/kernels/passes.py``,
each array read or written once; :func:`pass_bytes_fp32`): norms 4 (reads g), 8 with weight
decay (reads g and x); update 12 for KoalaV (reads x, g; writes x), 28 for KoalaM (also reads
and writes u and xavg); predict 20 (reads x, u, xavg; writes x, u); fold 28 (as KoalaM's
update); the one-program filter kernel moves no per-parameter data (no GB/s).

Two kinds of timing:

* **device** (CUDA): each kernel's device time from torch.profiler's CUDA activity
  (:func:`bench.measure.cuda_kernel_times`), summed over the measured iterations and divided by
  their number. Sets that would sit in the GPU's L2 cache are rotated through copies (as the
  benchmarks do), so every iteration reads memory.
* **host** (CPU plumbing): tiny sets, kernels in Triton's CPU interpreter
  (``TRITON_INTERPRET=1``, set here when unset); the wall time of each interpreted launch.
  These are **not device times** and their GB/s mean nothing: the mode exists to run the code
  path that measures and writes the files on a machine without a GPU.

``DIR/kernels.json`` and ``DIR/kernels.md`` are rewritten after every case, so a timeout or a
kill keeps what ran. ``--budget-s`` stops starting new cases once that many seconds have
passed (those left are listed as skipped). Exit status 0 when every case that ran succeeded,
1 when one failed or the requested device is missing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench import measure, param_sets
from bench.providers import koala_stepper

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: The passes, in the order an iteration runs them (KoalaM: predict first).
PASSES = ("predict_kernel", "norms_kernel", "filter_kernel", "update_kernel", "fold_kernel")


@dataclass(frozen=True)
class Optimizer:
    """One profiled optimizer: a ``koala_triton`` class with ``fused=True`` and its options."""

    label: str
    cls: str
    options: tuple[tuple[str, object], ...]
    momentum: bool                  # KOALA-M: the update also moves u and xavg
    passes: tuple[str, ...]         # the passes one iteration launches, by design
    plusplus: bool = False          # KOALA++: norms also read v, h; the update moves v, h


OPTIMIZERS = {
    "koala_v": Optimizer("KoalaV", "KoalaV", (), False,
                         ("norms_kernel", "filter_kernel", "update_kernel")),
    "koala_m": Optimizer("KoalaM", "KoalaM", (), True,
                         ("predict_kernel", "norms_kernel", "filter_kernel", "update_kernel")),
    "koala_m_fold": Optimizer("KoalaM(fold_predict=True)", "KoalaM", (("fold_predict", True),),
                              True, ("norms_kernel", "filter_kernel", "fold_kernel")),
    "koala_pp": Optimizer("KoalaPlusPlus", "KoalaPlusPlus", (), False,
                          ("norms_kernel", "filter_kernel", "update_kernel"), plusplus=True),
}

#: (set, dtype) pairs. Device: GPT-2 small and ResNet-18 in fp32, GPT-2 small in bf16.
#: Host plumbing: four 1,024-element tensors (the interpreter runs ~0.2 s per iteration).
DEVICE_CASES = (("gpt2-small", "fp32"), ("resnet18", "fp32"), ("gpt2-small", "bf16"))
HOST_CASES = (("many-small-4x1K", "fp32"), ("many-small-4x1K", "bf16"))
#: 0 (the benchmarks' setting), then the paper's 5e-4 (norms then also read x).
WEIGHT_DECAYS = (0.0, 5e-4)

BYTES_FORMULA = ("GB/s = B/param(fp32) × (element size / 4 B) × parameters / (µs per iteration "
                 "× 1e3); B/param(fp32) by design (koala_triton/kernels/passes.py): norms 4 "
                 "(reads g), 8 with weight decay (reads g, x), KoalaPlusPlus 8 more (v, h); update 12 "
                 "for KoalaV (reads x, g; writes x), 28 for KoalaM (also u, xavg) and KoalaPlusPlus "
                 "(also v, h); predict 20 (reads x, u, xavg; writes x, u); fold 28; filter: one "
                 "program, no per-parameter traffic (no GB/s)")


def pass_bytes_fp32(kernel: str, momentum: bool, weight_decay: float, plusplus: bool = False) -> float | None:
    """Bytes one pass moves per fp32 parameter (passes.py's design); None for the filter.
    KOALA++ (``plusplus``): norms read g, v, h (and x with weight decay), the update reads x, g,
    v, h and writes x, v, h."""
    if kernel == "norms_kernel":
        return (8.0 if weight_decay else 4.0) + (8.0 if plusplus else 0.0)
    if kernel == "update_kernel":
        return 28.0 if momentum or plusplus else 12.0
    if kernel == "fold_kernel":
        return 28.0
    if kernel == "predict_kernel":
        return 20.0
    if kernel == "filter_kernel":
        return None
    raise KeyError(kernel)


def pass_of(kernel_name: str) -> str | None:
    """The pass a profiled kernel name belongs to (Triton names a kernel after its function;
    older versions append a signature suffix), or None for any other kernel."""
    return next((p for p in PASSES if kernel_name.startswith(p)), None)


# --- timing -----------------------------------------------------------------------------------

Times = dict[str, tuple[float, int]]   # kernel name -> (total µs, launches)


@contextmanager
def _timed_interpreter_launches(times: Times):
    """Record the host wall time of every interpreted launch into ``times`` (CPU only).

    Wraps ``koala_triton.kernels.launch.kernel``, through which each CPU launch gets its
    interpreted kernel; the CUDA path is not touched."""
    from koala_triton.kernels import launch as launch_module

    original = launch_module.kernel

    class _Timed:
        def __init__(self, fn, device):
            self.fn, self.inner = fn, original(fn, device)

        def __getitem__(self, grid):
            run = self.inner[grid]

            def call(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return run(*args, **kwargs)
                finally:
                    us, n = times.get(self.fn.__name__, (0.0, 0))
                    times[self.fn.__name__] = (us + (time.perf_counter() - t0) * 1e6, n + 1)
            return call

    def timed_kernel(fn, device):
        return original(fn, device) if device.type == "cuda" else _Timed(fn, device)

    launch_module.kernel = timed_kernel
    try:
        yield times
    finally:
        launch_module.kernel = original


def host_times(iterate: Callable[[], None], iterations: int) -> Times:
    """Host wall time per interpreted kernel over ``iterations`` calls of ``iterate``."""
    times: Times = {}
    with _timed_interpreter_launches(times):
        for _ in range(iterations):
            iterate()
    return times


def device_times(iterate: Callable[[], None], iterations: int) -> Times:
    """CUDA device time per kernel over ``iterations`` calls of ``iterate``."""
    return measure.cuda_kernel_times(iterate, iterations)


# --- one case ---------------------------------------------------------------------------------

def _copies(set_name: str, dtype: torch.dtype, device: torch.device, momentum: bool) -> int:
    """Parameter-set copies to rotate through so one rotation's arrays exceed 4× the L2."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
    arrays = 4 if momentum else 2    # x, g (+ u, xavg; KOALA++'s v, h)
    footprint = arrays * param_sets.count(set_name)[0] * torch.empty((), dtype=dtype).element_size()
    return min(8, max(1, math.ceil(4 * l2 / footprint)))


def _rotating(steppers: list) -> Callable[[], None]:
    state = {"i": 0}

    def iterate():
        steppers[state["i"]].iterate()
        state["i"] = (state["i"] + 1) % len(steppers)

    return iterate


def pass_rows(times: Times, optimizer: Optimizer, weight_decay: float, dtype: torch.dtype,
              params: int, iterations: int, copy_gbps: float | None) -> tuple[list[dict], dict, dict]:
    """Per-pass rows, the all-passes total and the other kernels (µs per iteration) of one case."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    by_pass: dict[str, list[float]] = {}
    other: dict[str, float] = {}
    for name, (us, n) in times.items():
        p = pass_of(name)
        if p is None:
            other[name[:80]] = round(us / iterations, 3)
        else:
            acc = by_pass.setdefault(p, [0.0, 0])
            acc[0] += us
            acc[1] += n
    rows = []
    for p in PASSES:
        if p not in by_pass:
            continue
        us, n = by_pass[p]
        us_iter = us / iterations
        b_fp32 = pass_bytes_fp32(p, optimizer.momentum, weight_decay, optimizer.plusplus)
        b = None if b_fp32 is None else b_fp32 * itemsize / 4
        gbps = None if b is None or us_iter <= 0 else b * params / (us_iter * 1e3)
        rows.append({"kernel": p, "launches_per_iter": n / iterations, "us_per_iter": us_iter,
                     "us_per_launch": us / n, "bytes_per_param": b,
                     "bytes_per_iter": None if b is None else b * params, "gbps": gbps,
                     "fraction_of_copy_bw": gbps / copy_gbps if gbps and copy_gbps else None})
    us_total = sum(r["us_per_iter"] for r in rows)
    b_total = sum(r["bytes_per_param"] or 0.0 for r in rows)
    gbps_total = b_total * params / (us_total * 1e3) if us_total > 0 else None
    total = {"kernel": "all passes", "launches_per_iter": sum(r["launches_per_iter"] for r in rows),
             "us_per_iter": us_total, "bytes_per_param": b_total,
             "bytes_per_iter": b_total * params, "gbps": gbps_total,
             "fraction_of_copy_bw": gbps_total / copy_gbps if gbps_total and copy_gbps else None}
    return rows, total, other


def profile_case(set_name: str, dtype_name: str, weight_decay: float, opt_name: str,
                 device: torch.device, iterations: int, warmup: int,
                 copy_gbps: float | None) -> dict:
    """Build the set, warm up, time ``iterations`` iterations; one JSON-ready case record."""
    import koala_triton

    optimizer = OPTIMIZERS[opt_name]
    dtype = DTYPES[dtype_name]
    t0 = time.perf_counter()
    n_copies = _copies(set_name, dtype, device, optimizer.momentum or optimizer.plusplus)
    copies = [param_sets.build(set_name, dtype, device, seed=i) for i in range(n_copies)]
    cls = getattr(koala_triton, optimizer.cls)
    steppers = [koala_stepper(cls(c.params, fused=True, weight_decay=weight_decay,
                                  **dict(optimizer.options)), device) for c in copies]
    t_build = time.perf_counter()
    for s in steppers:
        for _ in range(warmup):
            s.iterate()
    measure.synchronize(device)
    t_warm = time.perf_counter()
    iterations = math.ceil(iterations / n_copies) * n_copies
    timer = device_times if device.type == "cuda" else host_times
    times = timer(_rotating(steppers), iterations)
    params = copies[0].numel
    rows, total, other = pass_rows(times, optimizer, weight_decay, dtype, params, iterations,
                                   copy_gbps)
    finite = bool(torch.stack([p.detach().isfinite().all() for c in copies for p in c.params]).all())
    seen = {r["kernel"] for r in rows}
    case = {
        "set": set_name, "dtype": dtype_name, "weight_decay": weight_decay,
        "optimizer": opt_name, "label": optimizer.label, "params": params,
        "tensors": len(copies[0].params), "copies_rotated": n_copies, "iterations": iterations,
        "warmup": warmup, "passes": rows, "total": total, "other_kernels": other,
        "missing_passes": [p for p in optimizer.passes if p not in seen],
        "unexpected_passes": sorted(seen - set(optimizer.passes)),
        "finite": finite,
        "build_s": round(t_build - t0, 3), "warmup_s": round(t_warm - t_build, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    del steppers, copies
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return case


# --- output -----------------------------------------------------------------------------------

def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


#: Table columns, one per pass (PASSES order).
PASS_HEADS = [p.removesuffix("_kernel") for p in PASSES]


def _cell(r: dict | None) -> str:
    """'µs · GB/s' of one pass (or of all of them), '' where it did not launch."""
    if r is None:
        return ""
    text = f"{r['us_per_iter']:.1f}"
    if r["gbps"] is not None:
        text += f" · {r['gbps']:.3g}"
    if r["launches_per_iter"] != 1 and r["kernel"] != "all passes":
        text += f" ({r['launches_per_iter']:g}×)"
    return text


def markdown(doc: dict) -> str:
    host = doc["timing"] == "host"
    lines = ["# KOALA's Triton passes: time and bandwidth per kernel", ""]
    if host:
        lines += ["**HOST TIMES, NOT DEVICE TIMES.** This run had no CUDA device: the kernels ran "
                  "in Triton's CPU interpreter (`TRITON_INTERPRET=1`) on tiny sets, and each "
                  "number is the host wall time of an interpreted launch. The GB/s below are "
                  "meaningless; the run only exercises the code that measures and writes this "
                  "report.", ""]
    if doc.get("error"):
        lines += [f"**Error: {doc['error']}**", ""]
    lines += [
        f"- **Device**: {doc.get('device_name')} (`{doc.get('device')}`); torch {doc.get('torch')}, "
        f"triton {doc.get('triton')}; commit {doc.get('commit')}; date {doc.get('date')}",
        f"- **Timing**: {doc.get('timing_note')}",
        "- **Copy bandwidth** (device-to-device `copy_`, best of 20): "
        f"{_f(doc.get('copy_gbps'), '.1f')} GB/s",
        "",
    ]
    unit = "host µs" if host else "device µs"
    lines += [f"Each cell: {unit} per iteration · GB/s, where **GB/s = B/param(fp32) × (element "
              "size / 4 B) × parameters / (µs per iteration × 1e3)**, B/param(fp32) being what "
              "the pass moves by design (`koala_triton/kernels/passes.py`): predict 20 (reads x, "
              "u, xavg; writes x, u); norms 4 (reads g), 8 with weight decay (also x); filter – "
              "(one program, no per-parameter traffic); update 12 for KoalaV (reads x, g; writes "
              "x), 28 for KoalaM (also u, xavg); fold 28. **all passes**: the sums (KoalaV 16, "
              "KoalaM 52, fold 32 B/param; +4 with weight decay). × copy: all passes' GB/s over "
              "the copy bandwidth. (n×): launches per iteration where not 1.", "",
              "| set | dtype | wd | optimizer | " + " | ".join(PASS_HEADS) + " | **all passes** | × copy |",
              "|---|---|--:|---|" + "--:|" * (len(PASS_HEADS) + 2)]
    for c in doc["cases"]:
        head = f"| {c['set']} | {c['dtype']} | {c['weight_decay']:g} | {c['label']} |"
        if "error" in c:
            lines.append(f"{head} **failed**: {c['error'].strip().splitlines()[-1][:120]} |"
                         + " |" * (len(PASS_HEADS) + 1))
            continue
        by = {r["kernel"]: r for r in c["passes"]}
        cells = [_cell(by.get(p)) for p in PASSES] + [f"**{_cell(c['total'])}**",
                                                      _f(c["total"]["fraction_of_copy_bw"], ".2f")]
        lines.append(head + " " + " | ".join(cells) + " |")
    lines.append("")
    notes = []
    for c in doc["cases"]:
        key = f"{c['set']} {c['dtype']} wd={c['weight_decay']:g} {c['label']}"
        if c.get("other_kernels"):
            cells = ", ".join(f"`{k}` {v:.1f}" for k, v in c["other_kernels"].items())
            notes.append(f"- {key}: other kernels (µs/iter): {cells}")
        if c.get("missing_passes") or c.get("unexpected_passes"):
            notes.append(f"- {key}: **passes not as designed**: missing {c['missing_passes']}, "
                         f"unexpected {c['unexpected_passes']}")
        if c.get("finite") is False:
            notes.append(f"- {key}: **non-finite weights after the run**")
        if c.get("copies_rotated", 1) > 1:
            notes.append(f"- {key}: rotated through {c['copies_rotated']} copies (L2)")
    for s in doc.get("skipped", []):
        notes.append(f"- skipped: {s['set']} {s['dtype']} wd={s['weight_decay']:g} "
                     f"{OPTIMIZERS[s['optimizer']].label}: {s['reason']}")
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    lines.append(f"{len(doc['cases'])} cases in {doc.get('elapsed_s', 0):.1f} s"
                 + ("" if doc.get("complete") else " (incomplete)") + ".")
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict) -> None:
    """Replace DIR/kernels.json and DIR/kernels.md (each written whole, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("kernels.json", json.dumps(doc, indent=1)), ("kernels.md", markdown(doc))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


# --- command line -----------------------------------------------------------------------------

def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "triton": triton_version, "commit": commit or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_kernels",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for kernels.json, kernels.md")
    ap.add_argument("--device", default=os.environ.get("KOALA_BENCH_DEVICE", "auto"),
                    help="auto (cuda if available), cuda or cpu (host-timed plumbing run)")
    ap.add_argument("--cases", default="",
                    help="set:dtype pairs, comma-separated (default: GPT-2 small and ResNet-18 "
                         "fp32, GPT-2 small bf16 on CUDA; tiny sets on the CPU)")
    ap.add_argument("--weight-decays", default=",".join(f"{w:g}" for w in WEIGHT_DECAYS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=",".join(OPTIMIZERS))
    ap.add_argument("--iters", type=int, default=0,
                    help="measured iterations per case (0: 20 on CUDA, 2 on the CPU)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="warm-up iterations per case, the first compiles (0: 3 on CUDA, 1 on the CPU)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new case after this many seconds (0: no budget)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    host = device.type != "cuda"
    doc = {"timing": "host" if host else "device", "device": str(device), **_versions(),
           "bytes_formula": BYTES_FORMULA, "cases": [], "skipped": [], "complete": False}
    if host:
        doc["timing_note"] = ("HOST wall time of each interpreted launch (TRITON_INTERPRET=1 on "
                              "the CPU), not device time")
    else:
        doc["timing_note"] = ("device time of each kernel from torch.profiler (CUDA activity), "
                              "summed over the measured iterations / their number")
    if device.type == "cuda" and not torch.cuda.is_available():
        doc.update(error="no CUDA device", device_name=None, elapsed_s=time.monotonic() - start)
        write(args.out, doc)
        print("profile_kernels: no CUDA device", file=sys.stderr)
        return 1
    with _interpreter(host):
        failed = run(args, device, doc, start)
    print(f"profile_kernels: {len(doc['cases'])} cases, {len(doc['skipped'])} skipped, "
          f"{doc['elapsed_s']:.1f} s; {args.out / 'kernels.md'}")
    return 1 if failed else 0


@contextmanager
def _interpreter(host: bool):
    """``TRITON_INTERPRET=1`` while a host run lasts (koala_triton reads it at each launch)."""
    before = os.environ.get("TRITON_INTERPRET")
    if host and before in (None, "", "0"):
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def run(args: argparse.Namespace, device: torch.device, doc: dict, start: float) -> bool:
    """Every case in turn, ``doc`` rewritten after each; True when one failed."""
    host = device.type != "cuda"
    cases = ([tuple(c.split(":")) for c in _csv(args.cases)] if args.cases
             else list(HOST_CASES if host else DEVICE_CASES))
    decays = [float(w) for w in _csv(args.weight_decays)]
    optimizers = _csv(args.optimizers)
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {o!r}; known: {', '.join(OPTIMIZERS)}")
    for case in cases:
        if len(case) != 2 or case[1] not in DTYPES:
            raise SystemExit(f"bad case {':'.join(case)!r}: want set:dtype, dtype in {list(DTYPES)}")
        param_sets.shapes_of(case[0])        # KeyError naming the known sets
    iterations = args.iters or (2 if host else 20)
    warmup = args.warmup or (1 if host else 3)
    doc.update(iterations=iterations, warmup=warmup)
    doc["device_name"] = measure.device_name(device)
    doc["copy_gbps"] = measure.copy_bandwidth_gbps(device, 16 * 2 ** 20 if host else 2 ** 30)

    failed = False
    for wd in decays:                       # weight decay 0 first: the budget cuts wd rows first
        for set_name, dtype_name in cases:
            for opt_name in optimizers:
                key = {"set": set_name, "dtype": dtype_name, "weight_decay": wd,
                       "optimizer": opt_name}
                elapsed = time.monotonic() - start
                if args.budget_s and elapsed > args.budget_s:
                    doc["skipped"].append({**key, "reason": f"time budget of {args.budget_s:g} s "
                                                            f"spent ({elapsed:.0f} s)"})
                    continue
                try:
                    case = profile_case(set_name, dtype_name, wd, opt_name, device, iterations,
                                        warmup, doc["copy_gbps"])
                    failed |= bool(case["missing_passes"]) or not case["finite"]
                except Exception:    # one failed case must not hide the others
                    case = {**key, "label": OPTIMIZERS[opt_name].label,
                            "error": traceback.format_exc()}
                    failed = True
                    gc.collect()
                    if not host:
                        torch.cuda.empty_cache()
                doc["cases"].append(case)
                doc["elapsed_s"] = time.monotonic() - start
                write(args.out, doc)
                _print_case(case, host)
    doc["complete"] = True
    doc["elapsed_s"] = time.monotonic() - start
    write(args.out, doc)
    return failed


def _print_case(case: dict, host: bool) -> None:
    head = f"{case['set']} {case['dtype']} wd={case['weight_decay']:g} {case['label']}"
    if "error" in case:
        print(f"{head}: FAILED\n{case['error']}", flush=True)
        return
    unit = "host µs" if host else "µs"
    cells = "  ".join(f"{r['kernel'].removesuffix('_kernel')} {r['us_per_iter']:.1f} {unit}"
                      + (f" {r['gbps']:.0f} GB/s" if r["gbps"] and not host else "")
                      for r in case["passes"])
    extra = f"  missing {case['missing_passes']}" if case["missing_passes"] else ""
    print(f"{head}: {cells}{extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
