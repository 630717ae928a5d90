"""The sweep over dtypes × sizes × providers: which points to run, where, and what to skip.

A provider that runs out of memory (or time) at some N is not tried above it; a dense provider
whose estimated peak exceeds the memory free now is recorded as "skipped (memory)" instead of
being started, because on the CPU it would first swap or be killed by the kernel's OOM killer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .problem import DTYPES, dense_bytes_estimate
from .providers import Provider
from .record import (ERROR, OOM, SKIPPED_AFTER, SKIPPED_MEMORY, TIMEOUT, PointSpec, Record)
from .worker import RESULT_PREFIX

ROOT = Path(__file__).resolve().parent.parent

# Only this share of the memory free at decision time is counted on: other processes share it.
MEMORY_HEADROOM = 0.85
# Extrapolating a measured peak by (N'/N)^2 misses allocator rounding; pad it a little.
EXTRAPOLATION_PAD = 1.15


@dataclass
class SweepConfig:
    device: torch.device
    sizes: list[int]
    dtypes: list[str]
    providers: list[Provider]
    d: int = 128
    k: int = 64
    loss: str = "icl-msr"
    bank: int = 0
    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 20
    min_time_s: float = 0.5
    isolate: bool = True  # a fresh worker process per point
    point_timeout_s: float = 900.0

    def points(self) -> Iterator[PointSpec]:
        for dtype in self.dtypes:
            for n in self.sizes:
                for provider in self.providers:
                    yield PointSpec(provider.name, n, self.d, self.k, dtype, str(self.device),
                                    self.loss, self.bank, self.warmup, self.min_repeats,
                                    self.max_repeats, self.min_time_s,
                                    measure_memory=self.isolate or self.device.type != "cpu")


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new point could use now: MemAvailable on the CPU, free device memory on CUDA."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


class Gate:
    """Remembers per (provider, dtype) the last good peak and the first failure."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._failed: dict[tuple[str, str], str] = {}
        self._last_ok: dict[tuple[str, str], tuple[int, float]] = {}

    def skip_reason(self, spec: PointSpec, provider: Provider) -> tuple[str, str] | None:
        """(status, note) when the point should not be run, else None."""
        key = (spec.provider, spec.dtype)
        if key in self._failed:
            return SKIPPED_AFTER, self._failed[key]
        if not provider.dense:
            return None
        need = self.estimate_bytes(spec)
        try:
            free = free_memory_bytes(self.device)
        except OSError:
            return None
        if need > MEMORY_HEADROOM * free:
            return SKIPPED_MEMORY, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return None

    def estimate_bytes(self, spec: PointSpec) -> float:
        key = (spec.provider, spec.dtype)
        if key in self._last_ok:  # scale the largest measured peak: closer than the model
            n0, mem_mb = self._last_ok[key]
            # (2N)² logits grow quadratically in N, N × Q ones linearly.
            power = 1 if spec.bank else 2
            return EXTRAPOLATION_PAD * mem_mb * 2**20 * (spec.n / n0) ** power
        return dense_bytes_estimate(spec.n, DTYPES[spec.dtype], spec.bank)

    def update(self, record: Record) -> None:
        key = (record.provider, record.dtype)
        if record.ok and record.mem_mb:
            self._last_ok[key] = (record.n, record.mem_mb)
        elif record.status in (OOM, TIMEOUT):
            self._failed[key] = f"{record.status} at N={record.n}"


def run_isolated(spec: PointSpec, timeout_s: float) -> Record:
    """Run one point in a fresh `python -m benchmarks.worker` process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # A fixed mmap threshold turns off glibc's adaptive one, under which freed large buffers stay
    # in the heap: RSS before the measured step would then include them and the peak above it
    # would be understated. With it, every large tensor goes back to the kernel when freed.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(asdict(spec))]
    # Own session: on a timeout the whole group goes, inductor's compile workers included.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Record.for_spec(spec, TIMEOUT, f"over {timeout_s:.0f} s")
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return Record(**json.loads(line[len(RESULT_PREFIX):]))
    if proc.returncode == -signal.SIGKILL:
        # Nothing else here sends SIGKILL: this is the kernel's OOM killer.
        return Record.for_spec(spec, OOM, "worker killed by SIGKILL (out of memory)")
    tail = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return Record.for_spec(spec, ERROR, f"worker failed: {tail[0][:200]}")


def run_sweep(cfg: SweepConfig, on_record: Callable[[int, int, Record], None]) -> list[Record]:
    """Measure every point of `cfg`, calling on_record(index, total, record) after each."""
    by_name = {p.name: p for p in cfg.providers}
    points = list(cfg.points())
    gate = Gate(cfg.device)
    records: list[Record] = []
    for index, spec in enumerate(points, 1):
        skip = gate.skip_reason(spec, by_name[spec.provider])
        if skip is not None:
            record = Record.for_spec(spec, *skip)
        elif cfg.isolate:
            record = run_isolated(spec, cfg.point_timeout_s)
        else:
            from .measure import measure_point  # in-process: the GPU default

            record = measure_point(spec)
        gate.update(record)
        records.append(record)
        on_record(index, len(points), record)
    return records
