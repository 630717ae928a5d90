"""Distributed point: one training step of ICL-MSR with distributed negatives under W gloo ranks
on this machine, against the single-process run on the same global batch.

    python -m benchmarks.distributed [--n 4096] [--world 2] [--backend auto] [--out DIR]

Each configuration runs in fresh processes (peak RSS per process); every rank holds N/W rows
per view and uses cores/W threads. Reports the median time per forward+backward step (the
slowest rank's, communication included) and the peak memory above the inputs (the largest
rank's), and writes distributed.md to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from icl_msr_kernels import icl_msr_loss

from .measure import RssProbe
from .problem import make_inputs


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    gather = world > 1
    if gather:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    inputs = make_inputs(args.n // world, args.d, args.k, torch.float32, "cpu", seed=rank)

    def step() -> None:
        inputs.clear_grads()
        icl_msr_loss(*inputs.leaves(), backend=args.backend, gather_distributed=gather).backward()

    step()  # warm-up
    probe = RssProbe()
    probe.start()
    step()
    peak_mb = probe.peak_mb()
    times = []
    for _ in range(args.repeats):
        if gather:
            dist.barrier()  # start every rank's step together
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    torch.save({"times": times, "peak_mb": peak_mb}, f"{out}/rank{rank}.pt")
    if gather:
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> tuple[float, float]:
    """(median seconds per step of the slowest rank, largest peak MB) with `world` ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(world, port, args, out), nprocs=world, join=True)
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
    per_step = [max(r["times"][i] for r in ranks) for i in range(args.repeats)]
    return statistics.median(per_step), max(r["peak_mb"] or 0.0 for r in ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="global per-view batch N")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.n % args.world:
        parser.error(f"--n {args.n} must be divisible by --world {args.world}")

    # Read by glibc at process start: freed buffers go back to the OS, so peak RSS is honest
    # (the same setting the sweep's workers use).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = []
    for world in (1, args.world):
        seconds, peak = run(world, args)
        label = "single process" if world == 1 else f"{world} gloo ranks"
        rows.append((label, seconds, peak))
        print(f"{label:>16}: {seconds * 1e3:9.1f} ms/step  peak {peak:8.1f} MB", flush=True)
    table = ["| run | ms per step (median) | peak MB above inputs (per process) |",
             "|---|---:|---:|"]
    table += [f"| {label} | {s * 1e3:.1f} | {p:.1f} |" for label, s, p in rows]
    note = (f"Global per-view N={args.n}, D={args.d}, K={args.k}, float32, backend "
            f"{args.backend!r}, forward+backward; command: python -m benchmarks.distributed "
            f"--n {args.n} --world {args.world} --backend {args.backend}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "distributed.md").write_text("\n".join([note, "", *table, ""]))
    print("\n".join(table))


if __name__ == "__main__":
    main()
