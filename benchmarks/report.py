"""Outputs: the progress line, results.csv, results.md and the log-log plots."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from .problem import (BANK_PRODUCTS, FULL_SWEEP_BANK_PRODUCTS, FULL_SWEEP_PRODUCTS,
                      FULL_SWEEP_PROVIDERS, PRODUCTS)
from .providers import COMPILED, EAGER, LIGHTLY, by_name
from .record import CSV_FIELDS, Record


def _fused(provider: str) -> bool:
    try:
        return by_name(provider).fused
    except ValueError:  # a row from an older run whose backend no longer exists
        return False


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "—"
    return f"{num / den:.2f}×"


# --------------------------------------------------------------------------------- progress

def progress_line(index: int, total: int, r: Record) -> str:
    width = len(str(total))
    bank = f" Q={r.bank}" if r.bank else ""
    head = (f"[{index:>{width}}/{total}] {r.device} {r.dtype} {r.loss}{bank} N={r.n:<6} "
            f"{r.provider:<19}")
    if not r.ok:
        return f"{head} {r.status}" + (f": {r.note}" if r.note else "")
    peak = "not measured" if r.mem_mb is None else f"{r.mem_mb:8.1f} MB"
    line = (f"{head} fwd {_ms(r.fwd_ms):>6} ms  bwd {_ms(r.bwd_ms):>6} ms  "
            f"fwd+bwd {_ms(r.fwdbwd_ms):>6} ms  peak {peak}  "
            f"first call {r.first_call_s:.2f} s  ×{r.repeats}")
    if _fused(r.provider):
        line += f"  floor {_pct(r.floor_fwdbwd)} (fwd {_pct(r.floor_fwd)}, bwd {_pct(r.floor_bwd)})"
    return line


# -------------------------------------------------------------------------------------- csv

def read_csv(path: Path) -> list[Record]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [Record.from_row(row) for row in csv.DictReader(handle)]


def merge(old: list[Record], new: list[Record]) -> list[Record]:
    """Old rows, each replaced by a new row of the same point; then the new points."""
    fresh = {r.key(): r for r in new}
    kept = [fresh.pop(r.key(), r) for r in old]
    return kept + [r for r in new if r.key() in fresh]


def write_csv(records: list[Record], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})


# --------------------------------------------------------------------------------- markdown

def _sorted(records: list[Record]) -> list[Record]:
    order = {name: i for i, name in enumerate([LIGHTLY, EAGER, COMPILED])}
    return sorted(records, key=lambda r: (r.device, r.dtype, r.loss, r.bank, r.n,
                                          order.get(r.provider, 9), r.provider))


def _problem(r: Record) -> str:
    return r.loss + (f", bank Q={r.bank}" if r.bank else "")


def results_table(records: list[Record]) -> list[str]:
    lines = ["| device | dtype | loss | N | provider | fwd ms | bwd ms | fwd+bwd ms | peak MB | "
             "floor | first call s | status |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in _sorted(records):
        status = r.status + (f": {r.note}" if r.note else "")
        floor = _pct(r.floor_fwdbwd) if _fused(r.provider) else ""
        first = f"{r.first_call_s:.2f}" if r.first_call_s is not None else "—"
        lines.append(f"| {r.device} | {r.dtype} | {_problem(r)} | {r.n} | {r.provider} | "
                     f"{_ms(r.fwd_ms)} | {_ms(r.bwd_ms)} | {_ms(r.fwdbwd_ms)} | "
                     f"{_mb(r.mem_mb)} | {floor} | {first} | {status} |")
    return lines


def ratio_tables(records: list[Record]) -> list[str]:
    """Per fused provider: how it compares with the eager and compiled reference (and lightly,
    where it ran the same problem), point by point."""
    index = {r.key(): r for r in records}
    lines: list[str] = []
    with_lightly = any(r.provider == LIGHTLY for r in records)
    for provider in sorted({r.provider for r in records if _fused(r.provider)}):
        head = "| device | dtype | loss | N | time eager/this | time compiled/this | "
        head += "time lightly/this | memory lightly/this | " if with_lightly else ""
        lines += ["", f"## {provider} against the eager baselines (forward+backward)", "",
                  head + "memory eager/this | floor |",
                  "|---|---|---|---:|---:|---:|" + ("---:|---:|" if with_lightly else "")
                  + "---:|---:|"]
        for r in _sorted([r for r in records if r.provider == provider and r.ok]):
            eager = index.get((*r.problem(), EAGER))
            compiled = index.get((*r.problem(), COMPILED))
            lightly = index.get((*r.problem(), LIGHTLY))

            def cell(other: Record | None, attr: str) -> str:
                if other is None:
                    return "not run"
                if not other.ok:
                    return other.status
                return _ratio(getattr(other, attr), getattr(r, attr))

            lightly_cells = (f"{cell(lightly, 'fwdbwd_ms')} | {cell(lightly, 'mem_mb')} | "
                             if with_lightly else "")
            lines.append(f"| {r.device} | {r.dtype} | {_problem(r)} | {r.n} | "
                         f"{cell(eager, 'fwdbwd_ms')} | {cell(compiled, 'fwdbwd_ms')} | "
                         f"{lightly_cells}{cell(eager, 'mem_mb')} | {_pct(r.floor_fwdbwd)} |")
    return lines


def write_markdown(records: list[Record], meta: list[str], path: Path) -> str:
    text = "\n".join(["# ICL-MSR loss benchmark", "", *meta, "", "## Results", "",
                      *results_table(records), *ratio_tables(records), ""])
    path.write_text(text)
    return text


def method_notes(d: int, k: int, loss: str = "icl-msr", bank: int = 0) -> list[str]:
    """What the numbers mean, for the head of results.md."""
    def counts(model):
        return ", ".join(f"{phase} {count}" for phase, count in model.items())

    def bank_counts(models):
        return "; ".join(f"{name}: {counts(model)}" for name, model in models.items())

    full_sweep = " and ".join(FULL_SWEEP_PROVIDERS)
    what = ("the default ICL-MSR options" if loss == "icl-msr" else "plain NT-Xent, τ = 0.07")
    problem = (f"Problem: per-view N anchors against a memory bank of Q={bank} negatives, D={d}, "
               f"K={k}, {what}." if bank else
               f"Problem: per-view N rows (2N stacked), D={d}, K={k}, {what}.")
    return [
        problem,
        "Times: median over repeats after warm-up, each repeat a fresh forward (autograd "
        "recording) and backward; fwd+bwd is the median of their per-repeat sums. "
        "'first call' is the first forward+backward, compilation included.",
        "Peak: memory above the inputs during one forward+backward after warm-up (CPU: VmHWM "
        "of a fresh process per point, reset before the step; CUDA: max_memory_allocated).",
        f"Floor: (FLOPs / GEMM rate) / time; FLOPs = products × 2·(2N)²·D in-batch, or "
        f"products × 2·N·Q·D with a bank (ICL-MSR in its default \"concat\" mode). "
        f"Products: what {full_sweep} multiply (every tile: {counts(FULL_SWEEP_PRODUCTS)}; bank "
        f"{bank_counts(FULL_SWEEP_BANK_PRODUCTS)}), else the least a fused kernel must do, cpp's "
        f"({counts(PRODUCTS)}; bank {bank_counts(BANK_PRODUCTS)}); shown for fused backends.",
    ]


# ------------------------------------------------------------------------------------ plots

def _series(records: list[Record]) -> dict[str, list[Record]]:
    devices = {r.device for r in records}
    series: dict[str, list[Record]] = defaultdict(list)
    for r in _sorted([r for r in records if r.ok]):
        label = (f"{r.provider} {r.dtype}" + (f" {r.device}" if len(devices) > 1 else "")
                 + (f" {r.loss}" if r.loss != "icl-msr" else "")
                 + (f" Q={r.bank}" if r.bank else ""))
        series[label].append(r)
    return series


def write_plots(records: list[Record], out: Path) -> list[Path]:
    """time.png (forward, backward, forward+backward) and memory.png, log-log against N."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    series = _series(records)
    if not series:
        return []
    paths = [out / "time.png", out / "memory.png"]

    fig, axes = plt.subplots(1, 3, figsize=(16, 5), sharey=True)
    for ax, (attr, title) in zip(axes, [("fwd_ms", "forward"), ("bwd_ms", "backward"),
                                        ("fwdbwd_ms", "forward+backward")]):
        for label, rows in series.items():
            style = "--" if "float32" not in label else "-"
            ax.plot([r.n for r in rows], [getattr(r, attr) for r in rows], style, marker="o",
                    label=label)
        _log_axes(ax, title)
    _plot_floor(axes[2], records)
    axes[0].set_ylabel("time (ms)")
    axes[2].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, rows in series.items():
        rows = [r for r in rows if r.mem_mb and r.mem_mb > 0]  # log axis: drop zero peaks
        style = "--" if "float32" not in label else "-"
        ax.plot([r.n for r in rows], [r.mem_mb for r in rows], style, marker="o", label=label)
    _log_axes(ax, "peak memory above the inputs, forward+backward")
    ax.set_ylabel("MB")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _log_axes(ax, title: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    # Base-2 x axis: the sizes are powers of two, so every tick is a measured N.
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.set(title=title, xlabel="per-view N")
    ax.grid(True, which="both", alpha=0.3)


def _plot_floor(ax, records: list[Record]) -> None:
    """The GEMM floor of a fused forward+backward, per device and dtype, for scale."""
    floors: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.ok and r.floor_fwdbwd and r.fwdbwd_ms:
            floors[(r.device, r.dtype)][r.n] = r.floor_fwdbwd * r.fwdbwd_ms
    several_devices = len({device for device, _ in floors}) > 1
    for (device, dtype), points in sorted(floors.items()):
        sizes = sorted(points)
        ax.plot(sizes, [points[n] for n in sizes], ":", color="grey",
                label=f"GEMM floor {dtype}" + (f" {device}" if several_devices else ""))
