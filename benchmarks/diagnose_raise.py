"""Which failing op calls raise cleanly on CUDA and which crash (each case in its own process)."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import surgery

CASES = {
    "prune_out_of_range": "ops.prune_neurons_(torch.randn(8,4,device=d), None, torch.randn(4,8,device=d), torch.tensor([9],device=d))",
    "adamw_shape": "ops.masked_adamw_([torch.randn(4,device=d)], [torch.randn(5,device=d)], [torch.zeros(4,device=d)], [torch.zeros(4,device=d)], [torch.ones(4,dtype=torch.bool,device=d)], step=1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.)",
    "adamw_step0": "ops.masked_adamw_([torch.randn(4,device=d)], [torch.randn(4,device=d)], [torch.zeros(4,device=d)], [torch.zeros(4,device=d)], [torch.ones(4,dtype=torch.bool,device=d)], step=0, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.)",
    "aten_check": "torch.ops.aten.mm(torch.randn(2,3,device=d), torch.randn(4,5,device=d))",
}
for dev in ("cpu", "cuda"):
    for env in ({}, {"TORCH_SHOW_CPP_STACKTRACES": "0", "TORCH_DISABLE_ADDR2LINE": "1"}):
        for name, call in CASES.items():
            code = f"import torch, surgery.ops as ops\nd='{dev}'\ntry:\n    {call}\n    print('no error')\nexcept Exception as e:\n    print('raised', type(e).__name__, str(e).splitlines()[0][:90])"
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
            print(dev, bool(env), name, "rc", r.returncode, (r.stdout.strip() or r.stderr.strip().splitlines()[-1:]))

# Where it crashes: a native backtrace of one failing case (gdb, when installed), and what _C links against.

so = glob.glob(os.path.join(os.path.dirname(surgery.__file__), "_C*.so"))
# Suspects, from the crash being a SIGSEGV (a failed catch would abort instead): _C.so's unwind tables (mixed
# compilers: .comment lists more than one), a private copy of the unwinder or libstdc++ inside _C.so (defined
# _Unwind_* / __cxa_throw / __gxx_personality symbols, libgcc_s missing from NEEDED), or _Unwind_* bound to another
# unwinder such as libunwind (LD_DEBUG).
for tool in (["ldd"], ["readelf", "-p", ".comment"], ["readelf", "-lW"], ["readelf", "-d"]):
    if so and shutil.which(tool[0]):
        text = subprocess.run(tool + so[:1], capture_output=True, text=True).stdout
        if tool[-1] == "-lW":
            text = "\n".join(line for line in text.splitlines() if "EH_FRAME" in line or "GNU_STACK" in line)
        if tool[-1] == "-d":
            text = "\n".join(line for line in text.splitlines() if "NEEDED" in line or "RUNPATH" in line)
        print(f"$ {' '.join(tool)} _C.so\n{text}")
if so and shutil.which("nm"):
    defined = subprocess.run(["nm", "-D", "--defined-only", so[0]], capture_output=True, text=True).stdout
    print("unwinder / EH symbols defined inside _C.so (expected: none):\n" + "\n".join(
        line for line in defined.splitlines() if any(k in line for k in ("_Unwind_", "__cxa_throw", "__gxx_personality"))))
code = "import torch, surgery.ops"
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "LD_DEBUG": "bindings"})
print("_Unwind_* / __cxa_throw bindings (LD_DEBUG):\n" + "\n".join(sorted({
    line.split("binding", 1)[-1].strip() for line in r.stderr.splitlines()
    if ("_Unwind_RaiseException" in line or "__cxa_throw" in line or "_Unwind_Find_FDE" in line)})[:20]))
# Control-flow enforcement: Ubuntu's g++ marks objects IBT/SHSTK (-fcf-protection); if the kernel turns the
# shadow stack on for this process, every unwind must keep it in step. Not testable off the device (no CET here).
with open("/proc/cpuinfo") as f:
    flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
print("CPU CET flags:", [x for x in flags if x in ("user_shstk", "shstk", "ibt")] or "none")
r = subprocess.run([sys.executable, "-c", "import torch, surgery.ops\nprint(open('/proc/self/status').read())"],
                   capture_output=True, text=True)
print("process CET state:", [line for line in r.stdout.splitlines() if line.startswith("x86_Thread")] or "not reported")
if so and shutil.which("readelf"):
    import torch
    for lib in so[:1] + glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")):
        notes = subprocess.run(["readelf", "-n", lib], capture_output=True, text=True).stdout
        print(os.path.basename(lib), "x86 feature notes:",
              [line.strip() for line in notes.splitlines() if "x86 feature" in line] or "none")
gdb = shutil.which("gdb") or shutil.which("cuda-gdb")  # the lent machines have cuda-gdb only
if gdb:
    code = f"import torch, surgery.ops as ops\nd='cpu'\n{CASES['adamw_step0']}"
    r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", code],
                       capture_output=True, text=True)
    print("gdb backtrace:\n" + "\n".join(line for line in r.stdout.splitlines() if line.startswith("#")))

# Is it our extension or any extension built here? The same failing TORCH_CHECK in a minimal extension built on
# this machine, called as a TORCH_LIBRARY op (our path) and as a pybind11 function, and a plain C++ throw/catch.
MINIMAL = r"""
#include <torch/extension.h>
void fail(const at::Tensor& t) { TORCH_CHECK(t.dim() == 99, "minimal extension check, dim ", t.dim()); }
TORCH_LIBRARY(minimal_raise, m) { m.def("fail(Tensor t) -> ()"); }
TORCH_LIBRARY_IMPL(minimal_raise, CPU, m) { m.impl("fail", &fail); }
"""
with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "throw.cpp"), "w") as f:
        f.write('#include <stdexcept>\nint main() { try { throw std::runtime_error("x"); } '
                'catch (const std::exception&) { return 0; } return 1; }\n')
    r = subprocess.run([os.environ.get("CXX", "c++"), "-O2", f.name, "-o", os.path.join(tmp, "throw")],
                       capture_output=True, text=True)
    rc = subprocess.run([os.path.join(tmp, "throw")]).returncode if r.returncode == 0 else r.stderr[-300:]
    print("plain C++ throw/catch (expected rc 0): rc", rc)
    build = ("import torch\nfrom torch.utils.cpp_extension import load_inline\n"
             f"mod = load_inline('minimal_raise', {MINIMAL!r}, functions=['fail'], build_directory={tmp!r})\n")
    r = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True)
    print("minimal extension build: rc", r.returncode, r.stderr.strip().splitlines()[-3:] if r.returncode else "")
    if r.returncode == 0:
        for name, call in (("TORCH_LIBRARY op", "torch.ops.minimal_raise.fail(torch.zeros(2))"),
                           ("pybind11 function", "mod.fail(torch.zeros(2))")):
            code = build + (f"try:\n    {call}\n    print('no error')\n"
                            "except Exception as e:\n    print('raised', type(e).__name__)")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            print(f"minimal extension, {name} (expected: raised RuntimeError): rc", r.returncode,
                  r.stdout.strip() or r.stderr.strip().splitlines()[-1:])
