"""`PointSpec` (what to measure at one point) and `Record` (what came out), both plain data that
travel as JSON between the sweep and its worker processes and as rows of results.csv."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .problem import fused_flops

# Record.status values. The "skipped" ones are decided by the sweep without running anything.
OK = "ok"
OOM = "oom"
TIMEOUT = "timeout"
ERROR = "error"
SKIPPED_MEMORY = "skipped (memory)"
SKIPPED_AFTER = "skipped (failed below)"


@dataclass
class PointSpec:
    """One (provider, dtype, N) measurement and how hard to try."""

    provider: str
    n: int
    d: int
    k: int
    dtype: str
    device: str
    loss: str = "icl-msr"  # or "ntxent"
    bank: int = 0  # Q rows of memory-bank negatives, 0 for in-batch negatives
    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 20
    # Repeats are added until their total reaches this, so fast points get a stable median.
    min_time_s: float = 0.5
    # Peak RSS means something only in a fresh process (sweep.run_isolated): in a long-lived
    # one, the step reuses freed heap pages and its peak reads as ~0.
    measure_memory: bool = True


@dataclass
class Record:
    """One row of results.csv. Times are medians in ms; memory is MiB above the inputs."""

    device: str
    dtype: str
    n: int
    d: int
    k: int
    provider: str
    loss: str = "icl-msr"
    bank: int = 0
    status: str = OK
    note: str = ""
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    mem_fwd_mb: float | None = None
    mem_mb: float | None = None
    first_call_s: float | None = None
    repeats: int | None = None
    gemm_gflops: float | None = None
    floor_fwd: float | None = None
    floor_bwd: float | None = None
    floor_fwdbwd: float | None = None

    @classmethod
    def for_spec(cls, spec: PointSpec, status: str = OK, note: str = "") -> "Record":
        return cls(spec.device, spec.dtype, spec.n, spec.d, spec.k, spec.provider, spec.loss,
                   spec.bank, status, note)

    def problem(self) -> tuple:
        """What was computed, whoever computed it."""
        return (self.device, self.dtype, self.n, self.d, self.k, self.loss, self.bank)

    def key(self) -> tuple:
        """Identity of a point: --append replaces an old row with the same key."""
        return (*self.problem(), self.provider)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def add_floor(self, gemm_flops_per_s: float) -> None:
        """Fraction of the GEMM floor reached: (fused FLOPs / GEMM rate) / measured time.

        Filled for every row so rows compare on one scale; for the dense reference it reads as
        "how close to what a fused kernel could reach", not as its own efficiency.
        """
        self.gemm_gflops = gemm_flops_per_s / 1e9
        for phase in ("fwd", "bwd", "fwdbwd"):
            ms = getattr(self, f"{phase}_ms")
            flops = fused_flops(self.n, self.d, phase, self.loss, self.bank, self.provider,
                                self.dtype)
            if ms and flops:  # a phase without products has no floor
                setattr(self, f"floor_{phase}", flops / gemm_flops_per_s / (ms / 1e3))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "Record":
        """Inverse of a csv row: empty cells are None, numbers get their field's type."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            text = row.get(field.name, "")
            if field.type in ("str",):
                values[field.name] = text or (field.default if isinstance(field.default, str)
                                              else "")
            elif text == "":
                values[field.name] = field.default if field.type == "int" else None
            elif field.type in ("int", "int | None"):
                values[field.name] = int(float(text))
            else:
                values[field.name] = float(text)
        return cls(**values)


CSV_FIELDS = [f.name for f in fields(Record)]
