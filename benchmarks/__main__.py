"""Benchmark of the ICL-MSR loss: `python -m benchmarks [options]` (what `make bench` runs).

Times forward, backward and forward+backward of every available backend of icl_msr_kernels,
plus torch.compile of the reference ("reference-compiled"), for per-view N growing to large,
and measures each point's peak memory above the inputs. It also measures this machine's GEMM
rate in the same run and reports, for the fused backends, the fraction of the GEMM floor
reached and their ratios against the eager and compiled reference.

Options:
  --quick              a short sweep (CPU: N=256, 1024, under 2 minutes; GPU: N=1024..16384)
  --device D           cpu, cuda or auto (default: cuda when available)
  --sizes A,B,...      per-view N values (default: 256, 512, ... up to --max-n)
  --max-n N            largest default N (default 8192 on the CPU, 65536 on a GPU)
  --dtypes A,B         float32, bfloat16, float16 (default float32; float32,bfloat16 on a GPU)
  --providers A,B      a subset of: reference, reference-compiled, cpp, triton, cuda
                       (default: every one available on the device)
  --d D, --k K         embedding width and number of prototypes (default 128, 64)
  --loss L             icl-msr (default) or ntxent (plain NT-Xent; with --bank, MoCo's loss,
                       which is what lightly's NTXentLoss computes: provider "lightly")
  --bank Q             memory-bank mode: N anchors against Q bank negatives (default 0: in-batch)
  --warmup W           warm-up steps before measuring (default 2: a compiled function still
                       allocates once on its second call); the first is timed apart
  --repeats R          at least R timed repeats (default 5, quick 3) ...
  --min-time S         ... and more, up to 20, until they add up to S seconds (default 1.0)
  --isolation MODE     process: a fresh worker process per point; none: in this process
                       (on the CPU without memory figures: peak RSS needs a fresh process);
                       auto (default): process on the CPU, none on a GPU
  --point-timeout S    give up on a point after S seconds, recorded as "timeout" (default 900)
  --out DIR            where results go (default benchmarks/results/)
  --append             merge into DIR/results.csv, replacing rows of the same points

Outputs in DIR: results.csv (one row per point), results.md (tables), time.png and
memory.png (log-log against N). One progress line is printed per point.

A point that runs out of memory is recorded as "oom" and its provider is not tried at larger
N; a provider that materialises the (2N)² logits (the reference, eager or compiled) is recorded
as "skipped (memory)" where its estimated peak exceeds the free memory.

Examples:
  python -m benchmarks --quick
  python -m benchmarks --sizes 4096 --providers reference,reference-compiled,cpp
  python -m benchmarks --sizes 32768 --providers cpp --append
  python -m benchmarks --sizes 4096 --bank 65536 --loss ntxent --providers lightly,reference,cpp
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import providers as prov
from .gemm import best_gemm_rate
from .problem import DTYPES, LOSSES
from .record import Record
from .report import (merge, method_notes, progress_line, read_csv, write_csv, write_markdown,
                     write_plots)
from .sweep import SweepConfig, run_sweep

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Two CPU sizes: each torch.compile point costs 10-30 s of cold compilation on two cores.
QUICK_SIZES = {"cpu": [256, 1024], "cuda": [1024, 4096, 16384]}
MAX_N = {"cpu": 8192, "cuda": 65536}
FIRST_N = 256


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in _csv_list(s)])
    parser.add_argument("--max-n", type=int)
    parser.add_argument("--dtypes", type=_csv_list)
    parser.add_argument("--providers", type=_csv_list)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--loss", default="icl-msr", choices=list(LOSSES))
    parser.add_argument("--bank", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--min-time", type=float)
    parser.add_argument("--isolation", default="auto", choices=["auto", "process", "none"])
    parser.add_argument("--point-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args(argv)
    for dtype in args.dtypes or []:
        if dtype not in DTYPES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if args.bank < 0:
        parser.error("--bank must be >= 0")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first call is never timed as a repeat)")
    return args


def _device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    return torch.device(choice)


def _sizes(args: argparse.Namespace, device: torch.device) -> list[int]:
    if args.sizes:
        return sorted(set(args.sizes))
    if args.quick:
        return QUICK_SIZES[device.type]
    sizes, n = [], FIRST_N
    while n <= (args.max_n or MAX_N[device.type]):
        sizes.append(n)
        n *= 2
    return sizes


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
        return (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                f"TF32 matmul {tf32}")
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def _load() -> str:
    """Other processes' load skews every CPU time; say how busy the machine was."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def _config(args: argparse.Namespace, device: torch.device,
            providers: list[prov.Provider]) -> SweepConfig:
    return SweepConfig(
        device=device, sizes=_sizes(args, device),
        dtypes=args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"]),
        providers=providers, d=args.d, k=args.k, loss=args.loss, bank=args.bank,
        warmup=args.warmup,
        min_repeats=args.repeats or (3 if args.quick else 5),
        min_time_s=args.min_time if args.min_time is not None else (0.3 if args.quick else 1.0),
        isolate={"auto": device.type == "cpu", "process": True, "none": False}[args.isolation],
        point_timeout_s=args.point_timeout,
    )


class Outputs:
    """results.csv and results.md rewritten after every point, so that a run killed part-way
    (a timeout, a crash) still leaves its tables; the plots are drawn at the end."""

    def __init__(self, out: Path, append: bool, header: list[str]) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.previous = read_csv(out / "results.csv") if append else []
        self.header = header
        self.done: list[Record] = []

    def add(self, record: Record) -> None:
        self.done.append(record)
        self.write(footer=["- Incomplete: the run is still going or was stopped."])

    def write(self, footer: list[str]) -> str:
        records = merge(self.previous, self.done)
        write_csv(records, self.out / "results.csv")
        appended = ["- Rows of earlier runs kept (--append)."] if self.previous else []
        return write_markdown(records, self.header + appended + footer, self.out / "results.md")

    def finish(self, seconds: float) -> str:
        text = self.write(footer=[f"- Run time: {seconds:.0f} s; at the end {_load()}."])
        try:
            plots = write_plots(merge(self.previous, self.done), self.out)
        except ImportError as err:  # a GPU machine may lack matplotlib: the tables still count
            print(f"plots skipped: {err}")
            plots = []
        return text + "\n" + "wrote " + ", ".join(
            str(p) for p in [self.out / "results.csv", self.out / "results.md", *plots])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = _device(args.device)
    try:
        providers, unavailable = prov.discover(device, args.providers, args.loss)
    except ValueError as err:
        sys.exit(str(err))
    if not providers:
        sys.exit("no provider to benchmark: " + "; ".join(f"{k}: {v}" for k, v in
                                                           unavailable.items()))
    cfg = _config(args, device, providers)
    started = time.perf_counter()

    machine = _machine(device)
    print(f"device: {device.type} ({machine}); torch {torch.__version__}; {_load()}")
    print(f"providers: {', '.join(p.name for p in providers)}")
    for name, reason in unavailable.items():
        print(f"not benchmarked: {name}: {reason}")
    # Measured before the sweep, while nothing else of ours runs: the floor's yardstick.
    gemm: dict[str, float] = {}
    gemm_shapes: dict[str, str] = {}
    for dtype in cfg.dtypes:
        gemm[dtype], gemm_shapes[dtype] = best_gemm_rate(device, DTYPES[dtype])
        print(f"GEMM {dtype}: {gemm_shapes[dtype]}; yardstick {gemm[dtype] / 1e9:.1f} GFLOP/s")
    print(f"sizes: {', '.join(map(str, cfg.sizes))}; D={cfg.d}, K={cfg.k}; loss {cfg.loss}"
          f"{f', bank Q={cfg.bank}' if cfg.bank else ''}; "
          f"{'a process per point' if cfg.isolate else 'in-process'}", flush=True)

    gemm_text = "; ".join(f"{d}: {gemm_shapes[d]}, yardstick {r / 1e9:.1f} GFLOP/s"
                          for d, r in gemm.items())
    header = [
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: "
        f"`python -m benchmarks {' '.join(argv)}`.",
        f"Machine: {device.type}, {machine}; torch {torch.__version__}; at start {_load()}.",
        f"GEMM rate (M×N×K, same run; the faster one is the floor's yardstick): {gemm_text}.",
        *method_notes(cfg.d, cfg.k, cfg.loss, cfg.bank),
    ]
    if unavailable:
        header.append("Not benchmarked: " + "; ".join(f"{k} ({v})" for k, v in
                                                      unavailable.items()) + ".")
    outputs = Outputs(args.out, args.append, [f"- {line}" for line in header])

    def on_record(index: int, total: int, record: Record) -> None:
        record.add_floor(gemm[record.dtype])
        print(progress_line(index, total, record), flush=True)
        outputs.add(record)

    run_sweep(cfg, on_record)
    print()
    print(outputs.finish(time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
