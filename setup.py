"""Packaging: the `surgery` package, `kernels/` installed as `surgery.kernels`, and the `surgery._C` extension.

The CPU extension is always built (`pip install --no-build-isolation -e .`); the CUDA sources are added when
torch has CUDA and CUDA_HOME is set. SURGERY_CUDA=1 forces them, SURGERY_CUDA=0 skips them."""
import glob
import os
import warnings

from setuptools import setup

PACKAGES = ["surgery", "surgery.models", "surgery.data", "surgery.ops", "surgery.bench", "surgery.cli", "surgery.methods", "surgery.kernels"]


def shared_cxx_runtime() -> list[str]:
    """The libstdc++.so this process runs with (loaded by torch), as a link input. A toolchain that ships only
    libstdc++.a (the lent GPU image's CXX, /opt/gcc/bin/g++) links a private copy of the C++ runtime into _C: its own
    __cxa_throw and personality routine beside libc10's, and every failing TORCH_CHECK then crashed the process
    (SIGSEGV) instead of raising. setuptools puts it after the objects, but before the -lstdc++ that g++ appends after
    every user argument, so the shared library satisfies the C++ runtime symbols and the archive adds none."""
    try:
        with open("/proc/self/maps") as f:
            # fields: address perms offset dev inode path (a path may hold spaces; a replaced file ends "(deleted)")
            paths = {fields[5] for fields in (line.rstrip("\n").split(maxsplit=5) for line in f)
                     if len(fields) == 6 and "/libstdc++.so" in fields[5] and not fields[5].endswith("(deleted)")}
            return sorted(paths)[:1]
    except OSError:  # not Linux
        return []


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: surgery._C is not built (the reference path runs); "
                      "install torch first and use `pip install --no-build-isolation`")
        return [], {}
    cpu = sorted(glob.glob("csrc/*.cpp"))
    if not cpu:
        return [], {}
    flag = os.environ.get("SURGERY_CUDA")
    cuda = flag == "1" or (flag != "0" and torch.version.cuda is not None and CUDA_HOME is not None)
    cxx = ["-O3"]  # the C++ standard is left to BuildExtension (torch's own default)
    link = shared_cxx_runtime()  # one C++ runtime in the process
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0")
        # -fmad=false: no contraction into FMA, so the dense and the compact AdamW kernels round alike, bit for bit
        # (they contracted differently); the kernels are bound by memory, not arithmetic.
        ext = CUDAExtension("surgery._C", cpu + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-fmad=false"]}, extra_link_args=link)
    else:
        ext = CppExtension("surgery._C", cpu, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it (tests import the helpers above)
    ext_modules, cmdclass = extensions()
    setup(packages=PACKAGES, package_dir={"surgery.kernels": "kernels"}, ext_modules=ext_modules, cmdclass=cmdclass)
