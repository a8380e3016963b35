"""How surgery._C is linked: with the process's one C++ runtime. A _C that carries its own copy of libstdc++ (a
compiler that links it statically) crashed with SIGSEGV on every failing TORCH_CHECK on the lent GPU image. The last
test builds a small library as that image's compiler did (`-static-libstdc++`), with and without setup.py's link
input, so the fix is checked on any machine with g++, not only on one whose compiler is static-only."""
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from surgery import ops

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not ops.HAS_EXTENSION
                                or not shutil.which("readelf") or not shutil.which("nm"),
                                reason="needs the built extension on Linux, with readelf and nm")


def library() -> str:
    from surgery import _C
    return _C.__file__


RUNTIME = {"__cxa_throw", "__gxx_personality_v0", "__cxa_allocate_exception", "__cxa_begin_catch"}


def needed(lib) -> list[str]:
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


def own_runtime(lib) -> set[str]:
    """The C++ runtime symbols that `lib` defines itself (a private copy of libstdc++)."""
    return RUNTIME & set(subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                                        check=True).stdout.split())


def test_extension_links_the_shared_cxx_runtime():
    libraries = needed(library())
    assert any(n.startswith("libstdc++.so") for n in libraries), libraries


def test_extension_defines_no_cxx_runtime_of_its_own():
    own = own_runtime(library())
    assert not own, f"_C defines {sorted(own)}: it carries a private copy of libstdc++"


def static_archive() -> bool:
    if not shutil.which("g++"):
        return False
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return Path(archive).is_absolute() and Path(archive).is_file()


@pytest.mark.skipif(not static_archive(), reason="needs g++ with libstdc++.a")
def test_link_input_keeps_a_static_toolchain_off_the_runtime(tmp_path):
    """A library that throws, linked as a static-only toolchain links (-static-libstdc++): alone it carries its own
    __cxa_throw and personality routine (the crash); with setup.py's link input it needs the shared libstdc++ and
    defines none."""
    link = runpy.run_path(str(Path(__file__).parents[2] / "setup.py"), run_name="setup")["shared_cxx_runtime"]()
    assert len(link) == 1 and "/libstdc++.so" in link[0], link  # this process runs torch's libstdc++
    source = tmp_path / "throws.cpp"
    source.write_text('#include <stdexcept>\nextern "C" void f(int x) { if (x) throw std::runtime_error("x"); }\n')
    for name, extra in (("alone", []), ("linked", link)):
        subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(tmp_path / f"{name}.so"),
                        "-static-libstdc++", *extra], check=True, capture_output=True)
    assert own_runtime(tmp_path / "alone.so"), "-static-libstdc++ no longer reproduces the private runtime"
    assert not own_runtime(tmp_path / "linked.so")
    assert any(n.startswith("libstdc++.so") for n in needed(tmp_path / "linked.so"))
