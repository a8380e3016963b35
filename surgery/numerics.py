"""Portable CPU numerics: torch's own CPU kernels at their AVX2 level and MKL on its AVX2 code path, whatever the CPU
offers beyond it.

The same fp32 computation rounds differently in AVX-512 kernels, and the benchmark's small models amplify that: on an
AVX-512 machine stage 0's first initialisation reached 66.0 % letter accuracy where an AVX2 machine's reached 73.5 %,
and its second 56.5 % against 99.0 %, so every model and number of `surgery demo` differed. Pinned, that machine's
stage 0 reached 73.5 and 99.0 % again (its finished models still differed from the earlier machine's: the README's
Reproducibility section). oneDNN, which runs the tower's patch convolution, picks its kernels by the processor
independently of torch's level: an AVX-512 machine's convolution rounds differently unless oneDNN is held to AVX2 too
(on an AVX2 machine pinning it changes no bit: oneDNN's own choice there is AVX2). The settings are defaults (a
variable already set is kept), and they must be in place before torch picks its kernels: `surgery`'s command line
sets them first thing, before anything imports torch. This module imports nothing else."""
import os

CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_has_avx512() -> bool:
    """Does the processor offer AVX-512 (where the pins above change what torch, MKL and oneDNN compute)?"""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def pin_cpu_numerics() -> None:
    """Set CPU_NUMERICS in the environment where not set (this process and the processes it starts)."""
    for name, value in CPU_NUMERICS.items():
        os.environ.setdefault(name, value)
