"""Build script of inplace_abn: one extension, ``inplace_abn._C``, holding every custom op.

Environment knobs:
    INPLACE_ABN_NO_EXTENSION=1  skip the C++ build (the package then runs on its pure-PyTorch path).
    FORCE_CUDA=1                build the CUDA kernels even without a visible GPU (GPU-less build hosts);
                                an error if no CUDA build is possible.
    USE_CUDA=0                  never build the CUDA kernels.
    TORCH_CUDA_ARCH_LIST        CUDA architectures, e.g. "8.0;9.0" (read by torch.utils.cpp_extension).
    CUDA_HOME                   CUDA toolkit root; by default the root nvcc reports (``nvcc --dryrun``).
    MAX_JOBS                    parallel compile jobs for ninja.
    DEBUG=1                     -O0 -g instead of -O3.

A failing compiler does not fail the install: the package is installed without ``_C`` and warns once at
import that it runs on the pure-PyTorch path. Set INPLACE_ABN_REQUIRE_EXTENSION=1 (CI does) to make a
failed build an error instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    with open(os.path.join(ROOT, "inplace_abn", "_version.py")) as f:
        namespace: dict = {}
        exec(f.read(), namespace)
        return namespace["__version__"]


def _toolkit_root_from_nvcc() -> str | None:
    """The CUDA toolkit root as nvcc itself reports it (``TOP=`` of ``nvcc --dryrun``).

    An ``nvcc`` on PATH may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc), which makes
    torch's CUDA_HOME guess its parent folder and the link fail on libcudart.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return os.path.normpath(line.split("TOP=", 1)[1].strip().strip('"'))
    return None


def _extensions():
    if _flag("INPLACE_ABN_NO_EXTENSION"):
        print("inplace_abn: INPLACE_ABN_NO_EXTENSION=1, building no extension (pure-PyTorch path)")
        return [], {}
    import torch

    want_cuda = _flag("USE_CUDA", "1") and torch.version.cuda is not None
    want_cuda = want_cuda and (torch.cuda.is_available() or _flag("FORCE_CUDA"))
    if want_cuda and "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        root = _toolkit_root_from_nvcc()
        if root is not None:
            os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension at import
    from torch.utils import cpp_extension

    debug = _flag("DEBUG")
    use_cuda = want_cuda and cpp_extension.CUDA_HOME is not None
    if _flag("FORCE_CUDA") and not use_cuda:
        raise RuntimeError(
            f"FORCE_CUDA=1 but no CUDA build is possible: torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"CUDA_HOME={cpp_extension.CUDA_HOME}. Install a CUDA build of torch and the CUDA toolkit (nvcc)."
        )

    cpp_sources = sorted(glob.glob("src/*.cpp")) + sorted(glob.glob("src/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("src/cuda/*.cu")) if use_cuda else []
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: ATen's inline at::parallel_for is an OpenMP region compiled into OUR object files; without
    # it every kernel would silently run on one thread. -fopenmp-simd lets `omp simd` reductions vectorise.
    # -fno-trapping-math: without it GCC will not turn the activation's `z >= 0 ? z : s * z` into a vector
    # select (a compare might raise an FP trap), and every loop stays scalar with a mispredicted branch;
    # nothing here relies on FP exceptions.
    cxx = opt + ["-fopenmp", "-fopenmp-simd", "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    # --Werror all-warnings would also fail on torch's own headers; CI greps the log for warnings that
    # point into src/ instead.
    nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fno-trapping-math"]
    define_macros = []  # Py_LIMITED_API comes from py_limited_api=True
    include_dirs = [os.path.join(ROOT, "src")]
    if use_cuda:
        define_macros.append(("WITH_CUDA", None))
        # pip's CUDA torch keeps some CUDA headers (cuBLAS & co., pulled in by a few ATen headers) in the
        # nvidia/cu* wheels rather than in the toolkit.
        nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
        include_dirs += sorted(glob.glob(os.path.join(nvidia, "cu*", "include")))

    print("inplace_abn build configuration:")
    print(f"  torch               {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  python              {sys.version.split()[0]}")
    print(f"  C++ sources         {cpp_sources}")
    print(f"  CUDA kernels        {'yes' if use_cuda else 'no'} {cuda_sources}")
    print(f"  CUDA_HOME           {cpp_extension.CUDA_HOME}")
    print(f"  TORCH_CUDA_ARCH_LIST {os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}")
    print(f"  MAX_JOBS            {os.environ.get('MAX_JOBS', '(ninja default)')}")
    print(f"  debug               {debug}")
    print(f"  cxx flags           {cxx}")
    if use_cuda:
        print(f"  nvcc flags          {nvcc}")

    ext_cls = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    ext = ext_cls(
        name="inplace_abn._C",
        sources=cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if use_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )

    class BuildExt(cpp_extension.BuildExtension):
        """Falls back to the pure-PyTorch package when the compiler fails (unless the build is required)."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                if _flag("INPLACE_ABN_REQUIRE_EXTENSION"):
                    raise
                print(
                    f"inplace_abn: WARNING: building the C++ extension failed ({exc}); installing the "
                    "pure-PyTorch path only. Set INPLACE_ABN_REQUIRE_EXTENSION=1 to make this an error."
                )

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="inplace-abn",
    version=_version(),
    packages=find_packages(include=["inplace_abn", "inplace_abn.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
