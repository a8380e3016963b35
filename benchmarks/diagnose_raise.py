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
