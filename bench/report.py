"""Turn pytest-benchmark JSON from ``pytest bench`` into a markdown report and a PNG plot.

    python -m bench.report results.json [more.json ...] --out DIR [--baseline auto]

Writes DIR/report.md and DIR/plot.png and prints a short table. Ratios are to AdamW: the fused
one where the run measured it (torch has a fused AdamW on CUDA and, since torch 2.4, on CPU),
otherwise the foreach one; each table says which. "x floor" is the measured time over the time
the koala_triton/ALGORITHM.md §7 bytes would take at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from bench.providers import PROVIDERS

PROVIDER_ORDER = list(PROVIDERS)
BASELINES = ("adamw_fused", "adamw_foreach")
SGDM = "sgdm_foreach"


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(rows, provenance): one row per benchmark with its extra_info and stats merged."""
    rows, provenance = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        info = dict(data.get("machine_info", {}).get("koala_bench", {}))
        if info.get("device_name"):  # older runs put the torch thread count in the name
            info["device_name"] = re.sub(r" \(\d+ threads\)$", f", {info.get('cpu_count')} CPUs"
                                         if info.get("cpu_count") else "", info["device_name"])
        info.setdefault("date", data.get("datetime"))
        info["file"] = str(path)
        info["commit"] = (data.get("commit_info") or {}).get("id")
        provenance.append(info)
        for b in data.get("benchmarks", []):
            extra = b.get("extra_info", {})
            if "provider" not in extra:
                continue
            stats = b.get("stats", {})
            row = dict(extra)
            row["median_s"] = stats.get("median", extra.get("median_s"))
            row["iqr_s"] = stats.get("iqr", extra.get("iqr_s"))
            row["min_s"] = stats.get("min")
            row["rounds"] = stats.get("rounds")
            rows.append(row)
    return rows, provenance


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["dtype"]), []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: PROVIDER_ORDER.index(r["provider"])
               if r["provider"] in PROVIDER_ORDER else len(PROVIDER_ORDER))
    return groups


def baseline_of(group: list[dict], choice: str = "auto") -> dict | None:
    by = {r["provider"]: r for r in group}
    for name in (BASELINES if choice == "auto" else (choice,)):
        if name in by:
            return by[name]
    return None


def annotate(rows: list[dict], choice: str = "auto") -> dict[tuple[str, str], list[dict]]:
    """Group rows by (set, dtype) and add x_baseline, x_sgdm and x_floor to each."""
    groups = _groups(rows)
    for group in groups.values():
        base = baseline_of(group, choice)
        sgdm = next((r for r in group if r["provider"] == SGDM), None)
        for r in group:
            t = r["median_s"]
            r["baseline"] = base["provider"] if base else None
            r["x_baseline"] = t / base["median_s"] if base else None
            r["x_sgdm"] = t / sgdm["median_s"] if sgdm else None
            floor_s = r["bytes_per_step_floor"] / (r["copy_gbps"] * 1e9)
            r["x_floor"] = t / floor_s
    return groups


def _f(x, fmt: str, none: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def _syncs(r: dict) -> str:
    s = r.get("host_syncs_per_step")
    return "n/a (CPU)" if s is None else str(s)


def markdown(groups, provenance: list[dict], choice: str) -> str:
    lines = ["# KOALA optimizer-step benchmark", ""]
    for p in provenance:
        lines += [
            f"- **Device**: {p.get('device_name')} (`{p.get('device')}`); torch {p.get('torch')}, "
            f"triton {p.get('triton')}, koala_triton {p.get('koala_triton')}; "
            f"{p.get('threads')} torch threads; mode `{p.get('mode')}`; date {p.get('date')}; "
            f"commit {str(p.get('commit'))[:10]}; file `{Path(p['file']).name}`",
            f"- **Copy bandwidth** (device-to-device `copy_`, best of 20, measured in the same run): "
            f"{_f(p.get('copy_gbps'), '.1f')} GB/s",
        ]
        if p.get("loadavg_1min_max") is not None:
            lines.append(
                f"- **Machine load** (1-minute load average while it ran, this run included): "
                f"{p['loadavg_1min_min']:.2f} to {p['loadavg_1min_max']:.2f} on "
                f"{p.get('cpu_count')} CPUs; other processes competing for the cores make "
                f"CPU timings noisy")
    lines += [
        "- **Time**: one whole iteration (KOALA: `predict()` + `step(loss)`; torch.optim: "
        "`step()`), device-synchronised; median over the rounds, IQR as spread. Gradients are "
        "random and nonzero; the loss is a random positive vector of 32 per-sample losses.",
        "- **× AdamW**: time over AdamW's in the same table — the fused AdamW where it was "
        "measured, else the foreach one (named in each table). **× SGD-m**: over SGD with "
        "momentum (foreach). **× floor**: time over (koala_triton/ALGORITHM.md §7 bytes per parameter × "
        "parameters ÷ copy bandwidth); GB/s counts those floor bytes, not what an implementation "
        "really moves. On a CPU a copy's stores also read their cache lines, so in-place "
        "updates can exceed 100 % of the copy bandwidth there.",
        "- **Alternating** (when the run used `--koala-paired`): each step's time over the "
        "reference's, timed in alternating rounds (ABBA) on the same parameters, median ± half "
        "the IQR of the per-round ratios; other load on a shared machine hits both alike. (On "
        "sets that fit in a CPU's cache the two also evict each other's data, which the "
        "separate timings do not see.)",
        "- **Launches**: per step from torch.profiler (CUDA: kernels + memcpy/memset on the "
        "device; CPU: top-level ATen ops). **Host syncs**: synchronising CUDA calls in one step "
        "(`torch.cuda.set_sync_debug_mode`).",
        "",
    ]
    for (set_name, dtype), group in groups.items():
        r0 = group[0]
        base = group[0]["baseline"]
        base_label = PROVIDERS[base].label if base in PROVIDERS else (base or "none measured")
        paired = next((r.get("paired_with") for r in group if r.get("paired_with")), None)
        paired_head = f" × {PROVIDERS[paired].label}, alternating |" if paired in PROVIDERS else ""
        lines += [
            f"## {set_name} {dtype} — {r0['params']:,} parameters in {r0['tensors']:,} tensors",
            "",
            f"Baseline for × AdamW: **{base_label}**"
            + (" (no fused AdamW was measured in this run)" if base == "adamw_foreach" else ""),
            "",
            "| optimizer | median ms | IQR ms | min ms | × AdamW | × SGD-m |" + paired_head
            + " floor B/param | GB/s | % copy BW | × floor | launches/step | host syncs "
            "| state B/param |",
            "|---|--:|--:|--:|--:|--:|" + ("--:|" if paired_head else "")
            + "--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in group:
            if not paired_head:
                paired_cell = ""
            elif r["provider"] == paired:
                paired_cell = " 1 (reference) |"
            elif r.get("paired_ratio") is not None:
                paired_cell = f" {r['paired_ratio']:.2f} ± {r['paired_ratio_iqr'] / 2:.2f} |"
            else:
                paired_cell = " – |"
            lines.append(
                f"| {r['label']} | {_f(r['median_s'] * 1e3, '.3f')} | {_f(r['iqr_s'] * 1e3, '.3f')} "
                f"| {_f(r['min_s'] * 1e3 if r.get('min_s') else None, '.3f')} "
                f"| {_f(r['x_baseline'], '.2f')} | {_f(r['x_sgdm'], '.2f')} |{paired_cell}"
                f" {_f(r['bytes_per_param_floor'], 'g')} | {_f(r.get('achieved_gbps'), '.1f')} "
                f"| {_f(100 * r['fraction_of_copy_bw'] if r.get('fraction_of_copy_bw') else None, '.1f')} "
                f"| {_f(r['x_floor'], '.2f')} | {r.get('launches_per_step', '–')} | {_syncs(r)} "
                f"| {_f(r.get('state_bytes_per_param'), '.2f')} |")
        lines.append("")
    lines += memory_table(groups)
    lines += kernel_table(groups)
    return "\n".join(lines) + "\n"


def kernel_table(groups) -> list[str]:
    """Device time per kernel in the profiled step of each Triton-path row (CUDA runs only)."""
    rows = [(key, r) for key, group in groups.items() for r in group
            if r.get("kernel_us") and r.get("impl") == "triton"]
    if not rows:
        return []
    lines = ["## Kernel time per step (CUDA, one profiled iteration, µs)", "",
             "| set | dtype | optimizer | kernels (µs) |", "|---|---|---|---|"]
    for (set_name, dtype), r in rows:
        cells = ", ".join(f"{name} {us:.1f}" for name, us in r["kernel_us"].items())
        lines.append(f"| {set_name} | {dtype} | {r['label']} | {cells} |")
    return lines + [""]


def memory_table(groups) -> list[str]:
    """Optimizer-state bytes per parameter, measured from each optimizer's ``state``."""
    seen: dict[tuple[str, str], dict] = {}
    for (_, dtype), group in groups.items():
        for r in group:
            seen.setdefault((r["provider"], dtype), r)
    if not seen:
        return []
    lines = ["## Optimizer state (measured from `optimizer.state`)", "",
             "| optimizer | dtype | state B/param | buffers per parameter |", "|---|---|--:|--:|"]
    for (prov, dtype), r in sorted(seen.items(), key=lambda kv: (
            PROVIDER_ORDER.index(kv[0][0]) if kv[0][0] in PROVIDER_ORDER else 99, kv[0][1])):
        lines.append(f"| {r['label']} | {dtype} | {_f(r.get('state_bytes_per_param'), '.2f')} "
                     f"| {_f(r.get('state_buffers_per_param'), '.2f')} |")
    return lines + [""]


SHORT = {"koala_v_triton": "kV-tri", "koala_v_torch": "kV-pt", "koala_m_triton": "kM-tri",
         "koala_m_fold_triton": "kMf-tri",
         "koala_m_torch": "kM-pt", "official_v": "offV", "official_m": "offM",
         "koala_pp_triton": "kPP-tri", "koala_pp_torch": "kPP-pt", "official_pp": "offPP",
         "sgdm_foreach": "sgd-fe", "sgdm_fused": "sgd-fu", "adam_foreach": "adam-fe",
         "adam_fused": "adam-fu", "adamw_foreach": "adamw-fe", "adamw_fused": "adamw-fu"}
SHORT.update({name + "_wd": short + "+wd" for name, short in list(SHORT.items())})  # paper-recipe rows


def short_table(groups) -> str:
    """Compact matrices (one row per set and dtype, one column per provider) for a terminal:
    x AdamW, x bytes floor, and launches/host syncs per step. Printed last by device_check.sh."""
    provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for g in groups.values() for r in g)]
    head = f"{'set dtype':<24}{'AdamW ms':>10} " + "".join(f"{SHORT.get(p, p)[:11]:>11}" for p in provs)

    def matrix(title, cell):
        out = [title, head]
        for (set_name, dtype), group in groups.items():
            by = {r["provider"]: r for r in group}
            base = next((r for r in group if r["provider"] == group[0]["baseline"]), None)
            out.append(f"{set_name + ' ' + dtype:<24}"
                       f"{_f(base['median_s'] * 1e3 if base else None, '.3f'):>10} "
                       + "".join(f"{cell(by[p]) if p in by else '-':>11}" for p in provs))
        return out

    def syncs(r):
        s = r.get("host_syncs_per_step")
        return f"{r.get('launches_per_step', '?')}/{'-' if s is None else s}"

    lines = matrix("step time / AdamW baseline (fused where measured, else foreach)",
                   lambda r: _f(r["x_baseline"], ".2f"))
    lines += [""] + matrix("step time / bytes-floor time (koala_triton/ALGORITHM.md §7 bytes at the copy bandwidth)",
                           lambda r: _f(r["x_floor"], ".2f"))
    lines += [""] + matrix("launches per step / host syncs per step", syncs)
    if any(r.get("paired_ratio") is not None for g in groups.values() for r in g):
        lines += [""] + matrix("step time / reference, alternating rounds (--koala-paired)",
                               lambda r: _f(r.get("paired_ratio"), ".2f", "ref"))
    return "\n".join(lines)


def plot(groups, provenance: list[dict], path: Path) -> None:
    """Two log-scale panels over every (set, dtype): step time relative to the AdamW baseline,
    and relative to the koala_triton/ALGORITHM.md §7 bytes floor at the measured copy bandwidth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    keys = list(groups)
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p
                                                  for g in groups.values() for r in g)]
    fig, axes = plt.subplots(2, 1, figsize=(max(9, 1.9 * len(keys) + 3.5), 8.5), sharex=True)
    cmap = plt.get_cmap("tab20")
    width = 0.8 / max(1, len(providers))
    panels = (("x_baseline", "step time / AdamW baseline"),
              ("x_floor", "step time / bytes-floor time"))
    for ax, (field, ylabel) in zip(axes, panels):
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, key in enumerate(keys):
                r = next((r for r in groups[key] if r["provider"] == prov), None)
                if r is not None and r.get(field):
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(r[field])
            if xs:
                ax.bar(xs, ys, width=width, color=cmap(j % 20), label=PROVIDERS[prov].label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_ylabel(ylabel + " (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_xlim(-0.6, len(keys) - 0.4)
    bases = sorted({g[0]["baseline"] for g in groups.values() if g[0]["baseline"]})
    axes[0].set_title("baseline: " + ", ".join(PROVIDERS[b].label for b in bases if b in PROVIDERS),
                      fontsize=9)
    axes[1].set_title("bytes floor: koala_triton/ALGORITHM.md §7 bytes per parameter at the measured copy bandwidth",
                      fontsize=9)
    axes[1].set_xticks(range(len(keys)))
    axes[1].set_xticklabels([f"{s}\n{d}, {groups[(s, d)][0]['tensors']} tensors" for s, d in keys],
                            fontsize=8)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    p = provenance[0] if provenance else {}
    fig.suptitle(f"One optimizer iteration on {p.get('device_name')} — torch {p.get('torch')}, "
                 f"triton {p.get('triton')}, {str(p.get('date'))[:10]}, mode {p.get('mode')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    ap.add_argument("--out", type=Path, required=True, help="directory for report.md and plot.png")
    ap.add_argument("--baseline", default="auto", choices=("auto",) + BASELINES,
                    help="AdamW to divide by (auto: fused if measured, else foreach)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = ap.parse_args(argv)

    rows, provenance = load(args.json)
    if not rows:
        print("no KOALA benchmark rows in " + ", ".join(map(str, args.json)), file=sys.stderr)
        return 1
    groups = annotate(rows, args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(markdown(groups, provenance, args.baseline))
    if not args.no_plot:
        plot(groups, provenance, args.out / "plot.png")
    print(short_table(groups))
    print(f"\nwrote {args.out / 'report.md'}" + ("" if args.no_plot else f" and {args.out / 'plot.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
