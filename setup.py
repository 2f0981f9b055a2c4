"""Build of astrea's compiled extension ``astrea._C``.

The C++ CPU kernels are always built. The CUDA kernels are built too when

* ``FORCE_CUDA=1`` or ``TORCH_CUDA_ARCH_LIST`` is set, or
* the installed torch is a CUDA build and ``nvcc`` is found (``CUDA_HOME``),

never because a GPU happens to be visible: build machines often have none.
``ASTREA_NO_CUDA=1`` forces a CPU-only build. ``TORCH_CUDA_ARCH_LIST`` defaults to
``8.0;9.0``. ``MAX_JOBS`` bounds the parallel compile jobs (default: from cores and
free memory). The C++ standard is the one the installed torch's cpp_extension
requires (C++20 for recent torch), so no ``-std`` flag is forced here.

Install with ``pip install --no-build-isolation -e .`` so that the build uses the
torch already installed instead of downloading another one.
"""

import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCH_LIST = "8.0;9.0"
# Rough peak memory of one nvcc/g++ job compiling against the torch headers.
GIB_PER_COMPILE_JOB = 3


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(free_gib // GIB_PER_COMPILE_JOB)))


def _want_cuda(torch_cuda_version, cuda_home):
    """Returns (build_cuda, reason) without looking at whether a GPU is present."""
    if _flag("ASTREA_NO_CUDA"):
        return False, "ASTREA_NO_CUDA=1"
    if _flag("FORCE_CUDA") or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if cuda_home is None:
            sys.exit("astrea: FORCE_CUDA/TORCH_CUDA_ARCH_LIST is set but no CUDA toolkit was found; "
                     "set CUDA_HOME to the toolkit root (the folder holding bin/nvcc).")
        return True, "FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST set"
    if torch_cuda_version is None:
        return False, "the installed torch is a CPU build"
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch built with CUDA {torch_cuda_version} and nvcc found"


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    build_cuda, reason = _want_cuda(torch.version.cuda, CUDA_HOME)
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    # -fopenmp: at::parallel_for is a header template that runs serially without it.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    # Limited API: one wheel for every CPython >= 3.10 (_C has no Python functions).
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        cuda_dir = ROOT / "csrc" / "cuda"
        sources += [str(p.relative_to(ROOT)) for p in sorted(cuda_dir.glob("*.cpp"))]
        sources += [str(p.relative_to(ROOT)) for p in sorted(cuda_dir.glob("*.cu"))]
        define_macros.append(("ASTREA_WITH_CUDA", "1"))
        extension = CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}
    else:
        extension = CppExtension
        extra = {"cxx": cxx_flags}

    build_info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": build_cuda,
        "cuda_reason": reason,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
        "nvcc": shutil.which("nvcc") if build_cuda else None,
        "max_jobs": os.environ["MAX_JOBS"],
    }
    (ROOT / "astrea" / "_build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")
    print(f"astrea: building _C with{'' if build_cuda else 'out'} CUDA ({reason}); "
          f"MAX_JOBS={os.environ['MAX_JOBS']}", file=sys.stderr)

    return [
        extension(
            name="astrea._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            # _C is loaded for its TORCH_LIBRARY registrations; it exposes no Python API.
            py_limited_api=True,
        )
    ], build_cuda


def main():
    from torch.utils.cpp_extension import BuildExtension

    ext_modules, _ = _extensions()
    setup(
        packages=find_packages(include=["astrea", "astrea.*"]) + ["astrea.kernels"],
        package_dir={"astrea.kernels": "kernels"},
        package_data={"astrea": ["_build_info.json"]},
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
