"""What the compiled CUDA kernels look like, read without a GPU: `python -m benchmarks.sass`.

For every kernel of the built extension (icl_msr_kernels._C) and one architecture it prints
the registers, stack (spill) bytes and local memory from `cuobjdump -res-usage`, and, from the
SASS (`cuobjdump -sass`, which needs nvdisasm), the instruction mix of each MMA loop body: the
global, shared and async-copy memory instructions against the tensor-core MMAs, and the widths
of the global loads. A loop is the span from a backward branch's target to the branch; its
innermost spans holding MMAs are the main loops of the products. Where a loop body holds no
inner loop its static counts are also what one iteration executes.

The CUDA tools come from CUDA_HOME/bin, PATH, or the pip wheels nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm (in requirements-dev.txt).

Options:
  --arch sm_XX     the architecture (default sm_90)
  --kernels TEXT   only kernels whose demangled name contains TEXT
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Instruction classes, by the opcode's first part.
GLOBAL = ("LDG", "STG", "ATOMG", "RED")
SHARED = ("LDS", "STS", "LDSM", "STSM")
GENERIC = ("LD", "ST")  # generic addresses: shared memory the compiler could not prove shared
ASYNC = ("LDGSTS", "UBLKCP", "UTMALDG")
MEMORY = GLOBAL + SHARED + GENERIC + ASYNC
MMA = ("HMMA", "IMMA", "HGMMA", "DMMA")


def tool(name: str) -> str | None:
    """A CUDA binary utility: CUDA_HOME/bin, PATH, or the nvidia-cuda-* pip wheels."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [os.path.join(cuda_home, "bin", name), shutil.which(name)]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += [str(p) for p in Path(root).glob(f"*/bin/{name}")]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def extension_library() -> str | None:
    spec = importlib.util.find_spec("icl_msr_kernels._C")
    return spec.origin if spec else None


def _run(args: list[str]) -> str:
    env = dict(os.environ)
    nvdisasm = tool("nvdisasm")
    if nvdisasm:  # cuobjdump -sass runs nvdisasm from PATH
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True,
                         text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """`contrastive_forward_kernel<BFloat16>` from the demangled signature."""
    name = demangled.replace("(anonymous namespace)::", "").replace("c10::", "")
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(.*$", "", name)
    return name.split("::")[-1]


def architectures(library: str) -> set[str]:
    """The sm_XX architectures the library holds machine code for."""
    text = _run([tool("cuobjdump") or "cuobjdump", "--list-elf", library])
    return set(re.findall(r"\.(sm_\d+a?)\.cubin", text))


def resource_usage(library: str, arch: str) -> dict[str, dict[str, int]]:
    """kernel short name -> {"REG", "STACK", "SHARED", "LOCAL"} for `arch`."""
    text = _run([tool("cuobjdump") or "cuobjdump", "-res-usage", "-arch", arch, library])
    usage = {}
    names = re.findall(r"Function (\S+):", text)
    full = demangle(names)
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        values = dict(re.findall(r"(\w+):(\d+)", fields))
        usage[short_name(full[name])] = {k: int(values.get(k, 0))
                                         for k in ("REG", "STACK", "SHARED", "LOCAL")}
    return usage


@dataclass
class Instruction:
    address: int
    opcode: str  # e.g. "LDG.E.128.CONSTANT"
    target: int | None = None  # a branch's target address


@dataclass
class LoopMix:
    start: int
    end: int
    nested: bool  # the body holds an inner loop: static counts are not one iteration's
    counts: Counter = field(default_factory=Counter)

    @property
    def memory(self) -> int:
        return sum(n for op, n in self.counts.items() if op in MEMORY)

    @property
    def mma(self) -> int:
        return sum(n for op, n in self.counts.items() if op in MMA)


# address, guard predicate (optional), opcode, operands
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass(library: str, arch: str) -> dict[str, list[Instruction]]:
    """kernel short name -> its instructions, for `arch`."""
    text = _run([tool("cuobjdump") or "cuobjdump", "-sass", "-arch", arch, library])
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    full = demangle(parts[1::2])
    kernels = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        instructions = []
        for address, guard, opcode, operands in _LINE.findall(body):
            if guard.strip() == "@!PT":
                continue  # never executes: padding ptxas puts beside LDGSTS
            target = None
            if opcode.startswith("BRA"):
                found = re.search(r"0x([0-9a-f]+)", operands)
                target = int(found.group(1), 16) if found else None
            instructions.append(Instruction(int(address, 16), opcode, target))
        kernels[short_name(full[name])] = instructions
    return kernels


def mma_loops(instructions: list[Instruction]) -> list[LoopMix]:
    """The innermost loops whose bodies hold MMAs, with their instruction counts by class."""
    spans = sorted({(i.target, i.address) for i in instructions
                    if i.target is not None and i.target <= i.address})

    def body(span):
        return [i for i in instructions if span[0] <= i.address <= span[1]]

    def has_mma(span):
        return any(i.opcode.split(".")[0] in MMA for i in body(span))

    loops = []
    for span in spans:
        if not has_mma(span):
            continue
        inner = [s for s in spans if s != span and span[0] <= s[0] and s[1] <= span[1]]
        if any(has_mma(s) for s in inner):
            continue  # an inner loop holds the MMAs: that one is reported
        counts = Counter(i.opcode.split(".")[0] for i in body(span))
        loops.append(LoopMix(span[0], span[1], nested=bool(inner), counts=counts))
    return loops


def global_load_widths(instructions: list[Instruction]) -> Counter:
    """Global loads by width: "16" (bits, e.g. LDG.E.U16), "32" (LDG.E), "64", "128"."""
    widths = Counter()
    for i in instructions:
        if not i.opcode.startswith("LDG"):
            continue
        parts = i.opcode.split(".")
        width = next((p.lstrip("SU") for p in parts[1:] if p.lstrip("SU") in
                      ("8", "16", "64", "128")), "32")
        widths[width] += 1
    return widths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--kernels", default="")
    args = parser.parse_args()
    library = extension_library()
    if library is None or tool("cuobjdump") is None:
        raise SystemExit("needs the built extension and cuobjdump (see the module docstring)")
    usage = resource_usage(library, args.arch)
    code = sass(library, args.arch)
    print(f"{library}, {args.arch}")
    for name in sorted(code):
        if args.kernels not in name:
            continue
        u = usage.get(name, {})
        widths = global_load_widths(code[name])
        print(f"{name}: {u.get('REG')} registers, stack {u.get('STACK')} B, local "
              f"{u.get('LOCAL')} B; global loads by width {dict(sorted(widths.items()))}")
        for loop in mma_loops(code[name]):
            ratio = loop.memory / loop.mma
            what = "static, holds inner loops" if loop.nested else "one iteration"
            memory = ", ".join(f"{op} {n}" for op, n in sorted(loop.counts.items())
                               if op in MEMORY)
            print(f"  loop 0x{loop.start:x}-0x{loop.end:x} ({what}): {loop.memory} memory "
                  f"instructions ({memory}) for {loop.mma} MMA: {ratio:.2f}:1")


if __name__ == "__main__":
    main()
