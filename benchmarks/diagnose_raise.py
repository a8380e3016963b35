"""Which failing op calls raise cleanly on CUDA and which crash (each case in its own process)."""
import subprocess
import sys

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
            import os
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
            print(dev, bool(env), name, "rc", r.returncode, (r.stdout.strip() or r.stderr.strip().splitlines()[-1:]))

# Where it crashes: a native backtrace of one failing case (gdb, when installed), and what _C links against.
import glob
import os
import shutil

import surgery

so = glob.glob(os.path.join(os.path.dirname(surgery.__file__), "_C*.so"))
for tool in (["ldd"], ["readelf", "-p", ".comment"]):
    if so and shutil.which(tool[0]):
        print(f"$ {' '.join(tool)} _C.so\n" + subprocess.run(tool + so[:1], capture_output=True, text=True).stdout)
if shutil.which("gdb"):
    code = f"import torch, surgery.ops as ops\nd='cpu'\n{CASES['adamw_step0']}"
    r = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", code],
                       capture_output=True, text=True)
    print("gdb backtrace:\n" + "\n".join(line for line in r.stdout.splitlines() if line.startswith("#")))
