"""Build spikingir._C from csrc/: the C++ CPU kernels always, the CUDA kernels
when nvcc and a CUDA-enabled torch are present.

Environment flags
  SPIKINGIR_FORCE_CUDA=1   build the CUDA kernels even when no GPU is visible
                           (needs nvcc and a CUDA torch; fails loudly otherwise)
  SPIKINGIR_SKIP_CUDA=1    build the CPU kernels only
  SPIKINGIR_CUDA_ARCHS     e.g. "80;90" (default "80;90+PTX"): -gencode flags
  MAX_JOBS                 parallel compile jobs (default: from free memory)
"""
import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    # torch is deliberately not a build requirement (pyproject.toml): pip's isolated build
    # would download the newest torch (a multi-GB CUDA wheel on Linux) and compile the
    # extension against it, which then fails to load under the torch the user runs.
    sys.exit("spikingir: building its C++/CUDA kernels needs the torch they will run with: "
             "install torch first, then `pip install --no-build-isolation .` (or -e .)")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_arch_flags():
    archs = os.environ.get("SPIKINGIR_CUDA_ARCHS", "80;90+PTX")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        num = arch.replace("+PTX", "").replace(".", "").replace("sm_", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _want_cuda():
    if _flag("SPIKINGIR_SKIP_CUDA"):
        return False
    has_nvcc = CUDA_HOME is not None
    has_cuda_torch = torch.version.cuda is not None
    if _flag("SPIKINGIR_FORCE_CUDA"):
        if not (has_nvcc and has_cuda_torch):
            sys.exit("SPIKINGIR_FORCE_CUDA=1 but nvcc or a CUDA-enabled torch is missing "
                     f"(CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})")
        return True
    if has_nvcc and has_cuda_torch:
        return True
    warnings.warn("spikingir: building the CPU kernels only "
                  f"(nvcc found: {has_nvcc}, CUDA torch: {has_cuda_torch}); "
                  "the Triton backend still works on a GPU when triton is installed.")
    return False


def _max_jobs():
    if "MAX_JOBS" not in os.environ:
        try:  # each nvcc/c++ job of torch headers takes ~1.5 GB
            free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
            os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb / 1.5))))
        except (ValueError, OSError):
            pass


def _openmp_flags():
    """The OpenMP flag of the compiler torch's parallel backend expects (OpenMP on
    Linux and Windows builds of torch); none where torch runs its native pool."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    if sys.platform.startswith("linux"):
        return ["-fopenmp"]
    if sys.platform == "win32":
        return ["/openmp"]
    return []  # macOS: Apple clang has no -fopenmp; kernels run on one thread


def extensions():
    _max_jobs()
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets gcc if-convert float compares, so the neuron loops vectorise.
    # -g0: Python's CFLAGS add -g, 9 of the extension's 10 MB (a wheel ships it).
    # No -std: when none is given, BuildExtension adds the standard the installed torch's
    # headers need, for g++ and nvcc alike (C++17 in older torch, C++20 in torch 2.13).
    # The sources compile as either. A fixed -std=c++20 broke the CUDA build on torch
    # 2.6's CUDA 11.8 toolchain: nvcc knows C++20 only from CUDA 12.0.
    cxx = ["-O3", "-fno-trapping-math", "-g0"]
    # at::parallel_for is a header template: without the compiler's OpenMP flag
    # (_OPENMP undefined) it silently runs every CPU kernel on one thread.
    # Linked with -fopenmp, the extension shares the libgomp.so.1 torch loaded.
    omp = _openmp_flags()
    cxx += omp
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + _cuda_arch_flags()
        return [CUDAExtension("spikingir._C", sources,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                              extra_link_args=omp)]
    return [CppExtension("spikingir._C", sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=omp)]


setup(
    packages=find_packages(include=["spikingir", "spikingir.*"]) + ["spikingir.kernels"],
    package_dir={"spikingir.kernels": "kernels"},
    package_data={"spikingir": ["weights/*.pt", "weights/*.json", "weights/*.md"],
                  "spikingir.weights": ["*.pt", "*.json", "*.md"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
