"""Measuring one point: time of forward, backward and both, and peak memory above the inputs.

`measure_point` runs in whatever process calls it; the sweep calls it in a fresh worker process
per point on the CPU (so that peak RSS belongs to that point alone) and in-process on a GPU.
"""

from __future__ import annotations

import gc
import math
import re
import statistics
import time
from typing import Protocol

import torch

from .problem import DTYPES, Inputs, make_inputs
from .providers import Step, by_name
from .record import ERROR, OOM, PointSpec, Record

MIB = 2.0 ** 20


# ---------------------------------------------------------------------------------- clocks

class Clock(Protocol):
    def mark(self) -> object: ...
    def seconds(self, start: object, end: object) -> float: ...
    def sync(self) -> None: ...


class CpuClock:
    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def sync(self) -> None:
        pass


class CudaClock:
    """CUDA events: marks cost no host synchronisation, so forward and backward are launched
    back to back exactly as in training, and each still gets its own device time."""

    def mark(self) -> "torch.cuda.Event":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: "torch.cuda.Event", end: "torch.cuda.Event") -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def sync(self) -> None:
        torch.cuda.synchronize()


def clock_for(device: torch.device) -> Clock:
    return CudaClock() if device.type == "cuda" else CpuClock()


# ------------------------------------------------------------------------------ memory

class MemoryProbe(Protocol):
    def start(self) -> None: ...
    def peak_mb(self) -> float | None: ...


class RssProbe:
    """Peak resident set size of this process since `start`, minus the RSS at `start`.

    Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so
    the peak of just the measured step can be read without sampling. Returns None where that
    is not possible (no /proc, or the kernel refuses).
    """

    _STATUS = "/proc/self/status"

    def __init__(self) -> None:
        self._base_kb: int | None = None

    @classmethod
    def _read_kb(cls, field: str) -> int:
        with open(cls._STATUS) as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
        if match is None:
            raise OSError(f"no {field} in {cls._STATUS}")
        return int(match.group(1))

    def start(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self._base_kb = self._read_kb("VmRSS")
        except OSError:
            self._base_kb = None

    def peak_mb(self) -> float | None:
        if self._base_kb is None:
            return None
        return (self._read_kb("VmHWM") - self._base_kb) / 1024.0


class CudaProbe:
    """Peak of the caching allocator's allocated bytes since `start`, above what was live."""

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize()
        self._base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self._base) / MIB


def probe_for(device: torch.device) -> MemoryProbe:
    return CudaProbe() if device.type == "cuda" else RssProbe()


# ---------------------------------------------------------------------------- one point

def timed_step(step: Step, inputs: Inputs, clock: Clock) -> tuple[float, float]:
    """(forward s, backward s) of one training step, the graph rebuilt from scratch.

    Forward is timed with autograd recording, as in training. The two times come from one step
    (three marks), so forward+backward is their sum and no step is run twice.
    """
    inputs.clear_grads()
    clock.sync()  # nothing queued earlier may leak into this step's time
    t0 = clock.mark()
    loss = step(inputs)
    t1 = clock.mark()
    loss.backward()
    t2 = clock.mark()
    return clock.seconds(t0, t1), clock.seconds(t1, t2)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    # Allocation failures also arrive wrapped (e.g. by torch.compile) or as plain RuntimeError.
    text = str(err).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory",
                                   "cannot allocate memory"))


def _describe(err: BaseException, oom: bool) -> str:
    """A short note for the table: allocator messages run to several lines."""
    text = str(err).strip()
    size = re.search(r"tried to allocate [\d.]+ ?[A-Za-z]*", text, re.IGNORECASE)
    if oom and size:
        return size.group(0)
    lines = text.splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:160]


def _measure(spec: PointSpec, record: Record) -> None:
    device = torch.device(spec.device)
    provider = by_name(spec.provider)
    if provider.world_size != 1:
        raise NotImplementedError("distributed providers are not measured yet (providers.py)")
    inputs = make_inputs(spec.n, spec.d, spec.k, DTYPES[spec.dtype], device, bank=spec.bank)
    step = provider.make_step(spec.loss)
    clock = clock_for(device)

    # First call on the wall clock: for torch.compile it is the compile time, reported apart.
    clock.sync()
    start = time.perf_counter()
    timed_step(step, inputs, clock)
    clock.sync()
    record.first_call_s = time.perf_counter() - start
    for _ in range(spec.warmup - 1):
        timed_step(step, inputs, clock)

    # Memory after warm-up, so lazy initialisation and compilation are not counted. This step
    # also gives the estimate that sets the number of repeats.
    inputs.clear_grads()
    probe = probe_for(device) if spec.measure_memory else None
    if probe:
        probe.start()
    start = time.perf_counter()
    loss = step(inputs)
    record.mem_fwd_mb = probe.peak_mb() if probe else None
    loss.backward()
    del loss
    record.mem_mb = probe.peak_mb() if probe else None
    clock.sync()
    estimate = time.perf_counter() - start

    wanted = math.ceil(spec.min_time_s / max(estimate, 1e-9))
    repeats = min(spec.max_repeats, max(spec.min_repeats, wanted))
    samples = [timed_step(step, inputs, clock) for _ in range(repeats)]
    record.fwd_ms = 1e3 * statistics.median(f for f, _ in samples)
    record.bwd_ms = 1e3 * statistics.median(b for _, b in samples)
    record.fwdbwd_ms = 1e3 * statistics.median(f + b for f, b in samples)
    record.repeats = repeats


def measure_point(spec: PointSpec) -> Record:
    """Measure one point; running out of memory or failing gives a record, never an exception."""
    record = Record.for_spec(spec)
    try:
        _measure(spec, record)
    except Exception as err:  # noqa: BLE001 - any failure of a kernel is a result to record
        oom = is_oom(err)
        record.status = OOM if oom else ERROR
        record.note = _describe(err, oom)
    # The failed step's tensors die with the exception; hand the memory back for the next point.
    gc.collect()
    if spec.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record
