"""Distributed point: one training step of ICL-MSR with distributed negatives under W gloo ranks
on this machine, against the single-process run on the same global batch.

    python -m benchmarks.distributed [--n 4096] [--world 2] [--backend auto] [--out DIR]

Each configuration runs in fresh processes (peak RSS per process); every rank holds N/W rows
per view and uses cores/W threads. Reports the median time per forward+backward step (the
slowest rank's, communication included), the peak memory above the inputs (the largest rank's)
and the bytes one rank sends per step (counted on the collectives it calls, as a ring
implementation sends them: all_gather (W-1)·n, all_reduce 2(W-1)/W·n, reduce_scatter
(W-1)/W·n), plus the same byte count modelled at W=64, N=65536 for gloo and NCCL; writes
distributed.md to --out (default benchmarks/results/).
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


class _SentBytes:
    """Bytes this rank sends through the collectives it calls (ring-algorithm volumes)."""

    def __init__(self) -> None:
        self.total = 0
        self._real = {}

    def install(self, world: int) -> None:
        def wrap(name, factor):
            real = getattr(dist, name)
            self._real[name] = real

            def counted(*args, **kwargs):
                # all_gather(list, local) and reduce_scatter_tensor(out, full): the second
                tensor = args[1] if name in ("all_gather", "reduce_scatter_tensor") else args[0]
                self.total += int(factor * tensor.numel() * tensor.element_size())
                return real(*args, **kwargs)

            setattr(dist, name, counted)

        wrap("all_gather", world - 1)
        wrap("all_reduce", 2 * (world - 1) / world)
        wrap("reduce_scatter_tensor", (world - 1) / world)


def modelled_bytes(n: int, world: int, d: int, nccl: bool) -> float:
    """Bytes one rank sends per step of the split sweep ("concat": features 2D wide), float32:
    the features' gather, the two statistics all-reduces, the upstream gradients' gather and the
    gradient rows' reduction (reduce-scatter on NCCL, all-reduce on gloo)."""
    rows = 2 * n // world  # per rank
    total_rows = rows * world
    features = (world - 1) * rows * 2 * d * 4
    statistics = 2 * (2 * (world - 1) / world) * 2 * total_rows * 4
    upstream = (world - 1) * 2 * 4
    reduce = ((world - 1) / world if nccl else 2 * (world - 1) / world) * total_rows * 2 * d * 4
    return features + statistics + upstream + reduce


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    gather = world > 1
    sent = _SentBytes()
    if gather:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        sent.install(world)
    inputs = make_inputs(args.n // world, args.d, args.k, torch.float32, "cpu", seed=rank)

    def step() -> None:
        inputs.clear_grads()
        icl_msr_loss(*inputs.leaves(), backend=args.backend, gather_distributed=gather).backward()

    step()  # warm-up: the batch check's one-off collective happens here
    probe = RssProbe()
    probe.start()
    before = sent.total
    step()
    peak_mb = probe.peak_mb()
    sent_bytes = sent.total - before
    times = []
    for _ in range(args.repeats):
        if gather:
            dist.barrier()  # start every rank's step together
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    torch.save({"times": times, "peak_mb": peak_mb, "sent": sent_bytes}, f"{out}/rank{rank}.pt")
    if gather:
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """(median seconds per step of the slowest rank, largest peak MB, largest bytes sent per
    step) with `world` ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(world, port, args, out), nprocs=world, join=True)
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
    per_step = [max(r["times"][i] for r in ranks) for i in range(args.repeats)]
    return (statistics.median(per_step), max(r["peak_mb"] or 0.0 for r in ranks),
            max(r["sent"] for r in ranks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="global per-view batch N")
    parser.add_argument("--world", type=int, nargs="+", default=[2],
                        help="rank counts to run (each against the single process)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    for world in args.world:
        if args.n % world:
            parser.error(f"--n {args.n} must be divisible by --world {world}")

    # Read by glibc at process start: freed buffers go back to the OS, so peak RSS is honest
    # (the same setting the sweep's workers use).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = []
    single = None
    for world in (1, *args.world):
        seconds, peak, sent = run(world, args)
        single = seconds if world == 1 else single
        label = "single process" if world == 1 else f"{world} gloo ranks"
        rows.append((label, seconds, peak, sent, seconds / single))
        print(f"{label:>16}: {seconds * 1e3:9.1f} ms/step ({seconds / single:.2f}× single)  "
              f"peak {peak:8.1f} MB  sent {sent / 2**20:8.2f} MiB/step", flush=True)
    table = ["| run | ms per step (median) | × single process | peak MB above inputs "
             "(per process) | MiB sent per rank per step |", "|---|---:|---:|---:|---:|"]
    table += [f"| {label} | {s * 1e3:.1f} | {ratio:.2f}× | {p:.1f} | {b / 2**20:.2f} |"
              for label, s, p, b, ratio in rows]
    model = [f"Modelled bytes sent per rank per step at W=64, N=65536, D={args.d} ('concat', "
             f"float32): gloo {modelled_bytes(65536, 64, args.d, False) / 2**20:.1f} MiB, NCCL "
             f"{modelled_bytes(65536, 64, args.d, True) / 2**20:.1f} MiB."]
    note = (f"Global per-view N={args.n}, D={args.d}, K={args.k}, float32, backend "
            f"{args.backend!r}, forward+backward; command: python -m benchmarks.distributed "
            f"--n {args.n} --world {' '.join(map(str, args.world))} --backend {args.backend}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "distributed.md").write_text("\n".join([note, "", *table, "", *model, ""]))
    print("\n".join(table + [""] + model))


if __name__ == "__main__":
    main()
