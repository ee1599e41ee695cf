"""Build dalle_fast and its extension dalle_fast._C.

The CPU sources are always built. The CUDA sources are built when torch has CUDA and nvcc is
found, unless DALLE_FAST_SKIP_CUDA=1. TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0a": Ampere
and Hopper). The source list lives in csrc/sources.txt, shared with CMakeLists.txt.

Environment:
  DALLE_FAST_SKIP_CUDA=1       build the CPU part only
  DALLE_FAST_CPU_ARCH=native   -march value for the CPU kernels ("none" for a portable build)
  MAX_JOBS                     parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_sources():
    sources = {"cpu": [], "cuda": [], "python": []}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tag, path = line.split()
        if tag not in sources:
            raise ValueError(f"csrc/sources.txt: unknown tag {tag!r} in line {line!r}")
        sources[tag].append(path)
    return sources


def nvidia_include_dirs():
    """CUDA library headers shipped in torch's nvidia pip packages (cusparse.h, cublas_v2.h, ...)."""
    dirs = []
    for entry in sys.path:
        for inc in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include"))):
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


def find_cuda_home():
    """The CUDA toolkit root, for torch.utils.cpp_extension (which otherwise takes the parent of the
    `nvcc` found on PATH: wrong when that nvcc is a wrapper script outside the toolkit)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ["CUDA_PATH"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        try:  # a wrapper script that execs the real nvcc: ask nvcc where it lives
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    candidates.append(Path(line.split("TOP=", 1)[1].strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for c in candidates:
        if (c / "include" / "cuda_runtime.h").is_file() and (c / "bin" / "nvcc").is_file():
            return str(c)
    return None


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    src = read_sources()
    skip_cuda = os.environ.get("DALLE_FAST_SKIP_CUDA", "0") not in ("", "0")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not skip_cuda
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"

    arch = os.environ.get("DALLE_FAST_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
    if arch and arch != "none":
        cxx.append(f"-march={arch}")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    define_macros = [("WITH_CUDA", None)] if with_cuda else []
    sources = src["cpu"] + src["python"] + (src["cuda"] if with_cuda else [])
    include_dirs = [str(ROOT / "csrc")] + (nvidia_include_dirs() if with_cuda else [])
    Ext = CUDAExtension if with_cuda else CppExtension
    ext = Ext(
        name="dalle_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # kernels/ (top level, DESIGN.md) is installed as dalle_fast.kernels; in a checkout the
    # symlink dalle_fast/kernels -> ../kernels gives the same import path.
    packages=sorted(
        {"dalle_fast", "dalle_fast.kernels"}
        | {f"dalle_fast.{p}" for p in find_packages("dalle_fast") if not p.startswith("kernels")}
    ),
    package_dir={"dalle_fast": "dalle_fast", "dalle_fast.kernels": "kernels"},
)
