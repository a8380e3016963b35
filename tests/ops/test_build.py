"""How surgery._C is linked: with the process's one C++ runtime. A _C that carries its own copy of libstdc++ (a
compiler that links it statically) crashed with SIGSEGV on every failing TORCH_CHECK on the lent GPU image."""
import shutil
import subprocess
import sys

import pytest

from surgery import ops

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not ops.HAS_EXTENSION
                                or not shutil.which("readelf") or not shutil.which("nm"),
                                reason="needs the built extension on Linux, with readelf and nm")


def library() -> str:
    from surgery import _C
    return _C.__file__


def test_extension_links_the_shared_cxx_runtime():
    dynamic = subprocess.run(["readelf", "-d", library()], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), needed


def test_extension_defines_no_cxx_runtime_of_its_own():
    defined = subprocess.run(["nm", "-D", "--defined-only", library()], capture_output=True, text=True,
                             check=True).stdout.split()
    own = {"__cxa_throw", "__gxx_personality_v0", "__cxa_allocate_exception", "__cxa_begin_catch"} & set(defined)
    assert not own, f"_C defines {sorted(own)}: it carries a private copy of libstdc++"
