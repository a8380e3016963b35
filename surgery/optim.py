"""MaskedAdamW: AdamW that leaves masked-out entries (params and state) untouched."""
import torch

from . import ops


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW on the entries where `masks[i]` is True (one bool tensor per param, None = all).

    Entries with mask False get no weight decay and no moment decay: pruned weights stay exactly zero.
    """

    def __init__(self, params, masks=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        params = list(params)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        masks = masks if masks is not None else [None] * len(params)
        for p, m in zip(params, masks, strict=True):
            self.state[p]["mask"] = torch.ones_like(p, dtype=torch.bool) if m is None else m.to(p.device, torch.bool)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params, grads, m, v, masks = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                params.append(p); grads.append(p.grad); m.append(st["exp_avg"]); v.append(st["exp_avg_sq"]); masks.append(st["mask"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            ops.masked_adamw_(params, grads, m, v, masks, step=self.state[params[0]]["step"], lr=group["lr"],
                              beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return loss
