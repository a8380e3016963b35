"""Packaging: the `surgery` package, `kernels/` installed as `surgery.kernels`, and the `surgery._C` extension.

The CPU extension is always built (`pip install --no-build-isolation -e .`); the CUDA sources are added when
torch has CUDA and CUDA_HOME is set. SURGERY_CUDA=1 forces them, SURGERY_CUDA=0 skips them."""
import glob
import os
import warnings

from setuptools import setup

PACKAGES = ["surgery", "surgery.models", "surgery.data", "surgery.ops", "surgery.bench", "surgery.cli", "surgery.methods", "surgery.kernels"]


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
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0")
        ext = CUDAExtension("surgery._C", cpu + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    else:
        ext = CppExtension("surgery._C", cpu, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(packages=PACKAGES, package_dir={"surgery.kernels": "kernels"}, ext_modules=ext_modules, cmdclass=cmdclass)
