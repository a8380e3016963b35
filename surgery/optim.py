"""MaskedAdamW: AdamW that leaves masked-out entries (params and state) untouched."""
import torch

from . import ops

COMPACT_BELOW = 0.25  # mask density under which state is stored only for the masked entries
INT32_MAX = 2**31 - 1  # compact state's indices are int32


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW on the entries where `masks[i]` is True (one bool tensor per param, None = all).

    Masked-out entries get no weight decay and no moment decay: pruned weights stay exactly zero. State is
    dense (fp32 moments shaped like the param) or compact (int32 indices + fp32 moments of the masked
    entries only: 12 bytes per masked entry), chosen per param by mask density unless `compact` is given.
    """

    def __init__(self, params, masks=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, compact=None):
        params = list(params)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        masks = masks if masks is not None else [None] * len(params)
        if len(masks) != len(params):
            raise ValueError(f"MaskedAdamW: {len(masks)} masks for {len(params)} params")
        for p, m in zip(params, masks):
            m = torch.ones_like(p, dtype=torch.bool) if m is None else m.to(p.device, torch.bool)
            if m.shape != p.shape:
                raise ValueError(f"MaskedAdamW: mask of shape {list(m.shape)} for a param of shape {list(p.shape)}")
            if compact and p.numel() > INT32_MAX:
                raise ValueError(f"MaskedAdamW: compact state addresses entries with int32 indices; a param of "
                                 f"{p.numel()} entries needs dense state (compact=None or False)")
            dense = p.numel() > INT32_MAX or \
                not (compact if compact is not None else m.float().mean().item() < COMPACT_BELOW)
            st = self.state[p]
            st["step"] = torch.zeros((), dtype=torch.int64)
            if dense:  # state in the param's logical (row-major) order, whatever the param's strides
                st["mask"] = m.contiguous()
                st["exp_avg"] = torch.zeros(p.shape, device=p.device)
                st["exp_avg_sq"] = torch.zeros(p.shape, device=p.device)
            else:
                st["indices"] = torch.nonzero(m.reshape(-1)).flatten().to(torch.int32)
                st["exp_avg"] = torch.zeros(st["indices"].numel(), device=p.device)
                st["exp_avg_sq"] = torch.zeros(st["indices"].numel(), device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            batches = {}  # one op call per (kind, device, dtype, step)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                kind = "mask" if "mask" in st else "indices"
                key = (kind, p.device, p.dtype, int(st["step"]) + 1)
                lists = batches.setdefault(key, ([], [], [], [], [], []))
                # the ops take contiguous tensors: a strided param is updated through a contiguous copy
                work = p if p.is_contiguous() else p.contiguous()
                for lst, t in zip(lists, (p, work, p.grad.contiguous(), st["exp_avg"], st["exp_avg_sq"], st[kind])):
                    lst.append(t)
            for (kind, _, _, step), (owners, *lists) in batches.items():
                op = ops.masked_adamw_ if kind == "mask" else ops.sparse_adamw_
                op(*lists, step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"])
                for p, work in zip(owners, lists[0]):  # the step counts once the update has happened
                    if work is not p:
                        p.copy_(work)
                    self.state[p]["step"] += 1
        return loss

    def load_state_dict(self, state_dict):
        """As Optimizer's, but state tensors keep their own dtypes (bool masks, int32 indices, fp32 moments)
        instead of being cast to the param's dtype."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, saved in state_dict["state"].items():
            p = params[i]
            for k, v in saved.items():
                if k != "step":
                    self.state[p][k] = v.to(p.device).clone()

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments, masks or indices) across all params."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items() if k != "step")
