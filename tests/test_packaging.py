"""Packaging: the sdist builds a working wheel away from the repository.

End to end, as a user without the clone would: build the sdist from the repository
(`python -m build --sdist --no-isolation`), unpack it into a clean directory, build a CPU-only
wheel from it (ICL_MSR_NO_CUDA=1, `pip wheel --no-build-isolation --no-deps`), install that wheel
into a fresh virtual environment, and there, from a directory outside the repository, import the
package and compare backend "cpp" with the reference. This catches files missing from the sdist
(headers, _version.py, README.md) and a wheel that only works next to the source tree.

The fresh environment sees the already-installed torch through a .pth file naming the directory
that holds it, so nothing is downloaded; the repository is not on its path, so the import must
come from the wheel. Slow (it compiles the C++ kernels): about a minute on two cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CSRC_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")

SMOKE = textwrap.dedent("""
    import importlib.util
    import sys
    from pathlib import Path

    import torch

    import icl_msr_kernels as icl

    prefix, repo, expected_version = Path(sys.prefix).resolve(), Path(sys.argv[1]), sys.argv[2]
    for name in ("icl_msr_kernels", "icl_msr_kernels._C"):
        origin = Path(importlib.util.find_spec(name).origin).resolve()
        print(name, "from", origin)
        assert origin.is_relative_to(prefix), f"{name} not imported from the new venv: {origin}"
        assert not origin.is_relative_to(repo), f"{name} imported from the repository: {origin}"
    status = icl.backend_status()
    print("backend_status:", status)
    assert status["cpp"] is None, f"backend 'cpp' unavailable: {status['cpp']}"
    assert icl.__version__ == expected_version, (icl.__version__, expected_version)

    torch.manual_seed(0)
    n, d, k = 12, 8, 5
    z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    prototypes = torch.randn(k, d, dtype=torch.float64)
    prior_logits = torch.randn(k, dtype=torch.float64)
    losses = {}
    for backend in ("cpp", "reference"):
        losses[backend] = icl.icl_msr_loss(z1, z2, prototypes, prior_logits, backend=backend)
    rel = ((losses["cpp"] - losses["reference"]).abs() / losses["reference"].abs()).item()
    print("losses:", {b: v.item() for b, v in losses.items()}, "relative error:", rel)
    assert rel <= 1e-10, rel
    print("SMOKE OK")
""")


def _run(cmd, *, timeout, **kwargs):
    """Runs cmd, failing the test with its output when it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _version_in_source() -> str:
    text = (REPO / "icl_msr_kernels" / "_version.py").read_text()
    return re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE).group(1)


def _torch_site_dir() -> Path:
    import torch

    return Path(torch.__file__).resolve().parent.parent


def _clean_env(**extra) -> dict[str, str]:
    # Nothing from the calling environment may put the repository (or another package copy) on
    # the path of the processes started here.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_REQUIRE_VIRTUALENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


@pytest.mark.slow
def test_sdist_builds_a_working_cpu_wheel(tmp_path):
    """sdist -> clean unpack -> CPU-only wheel -> fresh venv -> import and backend "cpp" works."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("the `build` package is not installed: install the dev requirements "
                    "(pip install -r requirements-dev.txt)")
    version = _version_in_source()
    build_env = _clean_env(ICL_MSR_NO_CUDA="1")
    build_env.setdefault("MAX_JOBS", "2")

    # 1. The sdist, from the repository; it must carry every kernel source and header.
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dist, REPO],
         timeout=300, env=build_env, cwd=tmp_path)
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    wanted = {p.relative_to(REPO).as_posix() for p in (REPO / "csrc").rglob("*")
              if p.suffix in CSRC_SUFFIXES}
    wanted |= {"README.md", "setup.py", "pyproject.toml", "icl_msr_kernels/_version.py"}
    assert not wanted - members, f"missing from the sdist: {sorted(wanted - members)}"

    # 2. Unpacked where nothing else is, and built into a wheel from there.
    src = tmp_path / "src"
    with tarfile.open(sdist) as tar:
        # The "data" filter (refuse links and paths out of src) exists from Python 3.11.4/3.12.
        tar.extractall(src, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = src.iterdir()
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
          "--wheel-dir", wheels, unpacked], timeout=600, env=build_env, cwd=tmp_path)
    (wheel,) = wheels.glob("icl_msr_kernels-*.whl")

    # 3. A fresh venv. The wheel goes in before torch's directory is made visible, so that pip
    # sees only the new environment (the calling one has this package installed too).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120, cwd=tmp_path)
    venv_python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", venv_python, "install", "--no-deps",
          "--no-index", wheel], timeout=300, env=_clean_env(), cwd=tmp_path)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(_run([venv_python, "-c", purelib], timeout=60,
                              env=_clean_env()).stdout.strip())
    # Only that directory: the .pth files in it (this package's editable install among them)
    # are not processed, since it is not a site directory of the new venv.
    (site_packages / "_outer_torch.pth").write_text(f"{_torch_site_dir()}\n")

    # 4. The smoke run, from a directory outside the repository.
    work = tmp_path / "work"
    work.mkdir()
    script = work / "smoke.py"
    script.write_text(SMOKE)
    proc = _run([venv_python, script, REPO, version], timeout=300, env=_clean_env(), cwd=work)
    print(proc.stdout)
    assert "SMOKE OK" in proc.stdout
