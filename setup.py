"""Build icl_msr_kernels and its torch extension icl_msr_kernels._C.

The C++ CPU kernels (csrc/cpu) are always built. The CUDA kernels (csrc/cuda) are compiled into
the same extension when the installed torch is a CUDA build and nvcc is found (CUDA_HOME, else
nvcc on PATH), for the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0");
ICL_MSR_NO_CUDA=1 builds the CPU kernels only. The extension is compiled against the installed
torch's headers and ABI, so build without isolation: `pip install --no-build-isolation .`.
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    # Parsed rather than imported: importing the package needs torch and the extension being built.
    with open(os.path.join(ROOT, "icl_msr_kernels", "_version.py")) as f:
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("icl_msr_kernels/_version.py does not define __version__")
    return match.group(1)


def note(message):
    print(f"icl_msr_kernels build: {message}", file=sys.stderr, flush=True)


def find_nvcc(cuda_home):
    """nvcc under cuda_home, or None: torch reports CUDA_HOME even when nothing is there."""
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
    return nvcc if os.path.isfile(nvcc) else None


def aten_parallel_is_openmp(cpp_extension):
    """Whether the installed torch's ATen parallel backend is OpenMP (ATen/Config.h)."""
    for include in cpp_extension.include_paths():
        config = os.path.join(include, "ATen", "Config.h")
        if os.path.isfile(config):
            with open(config) as f:
                text = f.read()
            return re.search(r"^#define AT_PARALLEL_OPENMP 1\b", text, re.MULTILINE) is not None
    return True  # the Linux wheels' backend: assume it when the header cannot be read


def extensions():
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # The kernels (.cu, nvcc) and their registration (.cpp: host code only, the host compiler).
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) +
                          glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not cpu_sources:
        return [], {}
    with_cuda = False
    if not cuda_sources:
        pass
    elif os.environ.get("ICL_MSR_NO_CUDA") == "1":
        note("ICL_MSR_NO_CUDA=1: building the CPU kernels only")
    elif torch.version.cuda is None:
        note(f"torch {torch.__version__} is not a CUDA build: building the CPU kernels only")
    elif find_nvcc(cpp_extension.CUDA_HOME) is None:
        where = (f"no bin/nvcc under CUDA_HOME={cpp_extension.CUDA_HOME}"
                 if cpp_extension.CUDA_HOME
                 else "CUDA_HOME is not set and no nvcc is on PATH or in /usr/local/cuda")
        note(f"nvcc not found ({where}): building the CPU kernels only, without backend 'cuda'; "
             "set CUDA_HOME to a CUDA toolkit to build the CUDA kernels")
    else:
        with_cuda = True
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if with_cuda:
        note(f"building the CPU and CUDA kernels with {find_nvcc(cpp_extension.CUDA_HOME)} for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    # No -std flag: torch picks the standard its headers need (C++20 from torch 2.13 on).
    # -fno-trapping-math -fno-math-errno (as torch itself is built; results are unchanged): the
    # CPU kernels' elementwise tile passes (exp, max, sums) are written for gcc to vectorise, and
    # it will not if-convert a clamp in front of floating-point arithmetic that "could trap".
    cxx = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    # The kernels' own OpenMP use is `#pragma omp simd` only (-fopenmp-simd, no runtime). But
    # at::parallel_for is a header template: with torch's OpenMP backend its `#pragma omp
    # parallel` is compiled into this extension, and without -fopenmp every parallel_for here
    # would run on one thread. The libgomp.so.1 that -fopenmp links resolves, by soname, to the
    # copy torch has already loaded, so there is still one OpenMP runtime in the process.
    openmp = aten_parallel_is_openmp(cpp_extension)
    cxx.append("-fopenmp" if openmp else "-fopenmp-simd")
    link_args = ["-fopenmp"] if openmp else []
    # No -march/-mavx2: the build must run on any CPU of its architecture. The vectorised tile
    # passes are compiled for AVX2 + FMA as well (a target pragma in csrc/cpu/tile_passes_avx2.cpp)
    # and chosen at run time (csrc/cpu/tile_passes.h).
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "icl_msr_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("ICL_MSR_WITH_CUDA", "1")],
            # No --use_fast_math: float32 must meet the 1e-5; the kernels call the fast exp
            # where its accuracy suffices (tile_math.h, fast_exp).
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_args,
            py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension(
            "icl_msr_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link_args,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="icl_msr_kernels",
    version=read_version(),
    description="Fused ICL-MSR and NT-Xent contrastive losses for PyTorch: reference, C++, "
                "Triton and CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["icl_msr_kernels", "icl_msr_kernels.*"]),
    install_requires=["torch>=2.11"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
