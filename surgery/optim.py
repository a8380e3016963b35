"""MaskedAdamW: AdamW that leaves masked-out entries (params and state) untouched."""
import copy
import math
import numbers

import torch

from . import ops

UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")  # AdamW options this optimizer does not have
COMPACT_BELOW = 0.25  # mask density under which state is stored only for the masked entries
INT32_MAX = 2**31 - 1  # compact state's indices are int32
OFFLOAD_CHUNK_BYTES = 256 * 2**20  # offload: state bytes brought to the device at once in step (at least one param's)


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW on the entries where a param's mask is True (a bool tensor of its shape; None = all).

    `params` is what torch.optim.AdamW takes: tensors, or param-group dicts with their own lr, betas, eps,
    weight_decay and compact. `masks` lists one mask per param, in the order the params appear across the groups;
    a group may carry its own "masks" list instead, and so may a group added later with `add_param_group`.

    Masked-out entries get no weight decay and no moment decay: pruned weights stay exactly zero. State is
    dense (fp32 moments shaped like the param) or compact (int32 indices + fp32 moments of the masked
    entries only: 12 bytes per masked entry, and the param's shape), chosen per param by mask density unless
    `compact` is given. The update is torch.optim.AdamW's, in DESIGN.md's order of operations: on the compiled
    path params and moments may differ from torch's in the last bits (ATen's kernels round in another order).

    `offload`: the state of CUDA params lives in pinned host memory and `step` brings it to the device
    OFFLOAD_CHUNK_BYTES at a time (at least one param's), updates, and copies the moments back; the same
    update, bit for bit, for 9 bytes per entry less device memory (12 per masked entry when compact)
    and two host transfers of the state per step. `step` returns once the state is back on the host.
    """

    def __init__(self, params, masks=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, compact=None,
                 offload=False):
        if isinstance(params, torch.Tensor):
            raise TypeError("MaskedAdamW: params must be an iterable of tensors or of dicts, got a tensor")
        groups = _tensor_list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [dict(g, params=_tensor_list(g["params"])) for g in groups]
        if isinstance(masks, torch.Tensor):
            raise TypeError("MaskedAdamW: masks must be a list with one bool tensor (or None) per param, got a tensor")
        if masks is not None:
            masks, n = list(masks), sum(len(g["params"]) for g in groups)
            if len(masks) != n:
                raise ValueError(f"MaskedAdamW: {len(masks)} masks for {n} params")
            if any("masks" in g for g in groups):
                raise ValueError("MaskedAdamW: masks given both as an argument and in a param group")
            left = iter(masks)
            groups = [dict(g, masks=[next(left) for _ in g["params"]]) for g in groups]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, compact=compact)
        _check_hyperparameters(defaults)
        self.offload = bool(offload)  # before the groups: add_param_group places their state
        super().__init__(groups, defaults)

    def __getstate__(self):
        return {**super().__getstate__(), "offload": self.offload}  # torch's keeps defaults, state and groups only

    def __setstate__(self, state):
        state = dict(state)
        self.offload = state.pop("offload", getattr(self, "offload", False))
        super().__setstate__(state)

    def reset_state(self) -> None:
        """Every param back to step 0 with zero moments, under the mask it has now (its mask is part of its state:
        replacing `self.state` or a param's entry with an empty dict, as one resets torch's AdamW, would lose it)."""
        fresh = {}
        for i, p in enumerate(p for group in self.param_groups for p in group["params"]):
            st = self.state.get(p, {})
            if not {"mask", "indices"} & st.keys():
                raise ValueError(f"MaskedAdamW.reset_state: param {i} has no state to take its mask from (it was "
                                 f"replaced): make a new MaskedAdamW with the masks, or load a saved state_dict")
            fresh[p] = _new_state(p, _mask(st, p), "indices" in st, self.offload)
        self.state.update(fresh)        # all or nothing

    def add_param_group(self, param_group: dict) -> None:
        """As Optimizer's; the group may hold "masks", one per param (None or missing = all True)."""
        group = dict(param_group)
        masks = group.pop("masks", None)
        group["params"] = _tensor_list(group["params"])
        params = [p[1] if isinstance(p, tuple) else p for p in group["params"]]  # (name, param) pairs, as torch's
        masks = [None] * len(params) if masks is None else list(masks)
        if len(masks) != len(params):
            raise ValueError(f"MaskedAdamW: {len(masks)} masks for the {len(params)} params of a param group")
        if len({id(p) for p in params}) != len(params):  # torch only warns; two updates would share one step count
            raise ValueError("MaskedAdamW: a param group lists a param twice")
        if any(group.get(k) for k in UNSUPPORTED):
            raise ValueError(f"MaskedAdamW: {', '.join(k for k in UNSUPPORTED if group.get(k))} not supported")
        _check_hyperparameters({**self.defaults, **group})
        states = [_new_state(p, m, group.get("compact", self.defaults["compact"]), self.offload)
                  for p, m in zip(params, masks)]
        super().add_param_group(group)  # checks the params themselves (leaf tensors, each in one group only)
        for p, st in zip(params, states):
            self.state[p] = st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():  # the closure runs its own backward
                loss = closure()
        self._check_step()      # every param, before any is updated: a bad one must not leave a step half done
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
            for (kind, device, _, step), (owners, *lists) in batches.items():
                op = ops.masked_adamw_ if kind == "mask" else ops.sparse_adamw_
                for part in self._chunks(owners, lists, device):
                    op(*part[1:], step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"])
                    for p, work in zip(part[0], part[1]):  # a param's step counts once its update has happened
                        if work is not p:
                            p.copy_(work)
                        self.state[p]["step"] += 1
                    del part  # offload: this chunk's device copies go before the next chunk's come
        return loss

    def _check_step(self) -> None:
        """What the ops would refuse part-way through a step, checked for every param first, each named by its
        position across the groups (as state_dict numbers them)."""
        for g, group in enumerate(self.param_groups):
            _check_hyperparameters({**self.defaults, **group}, f"param group {g}: ")
        positions = ((i, g, p) for i, (g, p) in enumerate((g, p) for g, group in enumerate(self.param_groups)
                                                           for p in group["params"]))
        for i, g, p in positions:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{_label(i, g, p)}: sparse gradients are not supported")
            if p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
                raise RuntimeError(f"{_label(i, g, p)}: its grad is {list(p.grad.shape)} {p.grad.dtype} on "
                                   f"{p.grad.device}; expected the param's shape, dtype and device ({p.device})")
            if "step" not in self.state.get(p, {}):
                raise RuntimeError(f"{_label(i, g, p)}: no optimizer state (its mask lives there, and was replaced): "
                                   f"make a new MaskedAdamW with the masks, or load a saved state_dict; to restart "
                                   f"from zero moments, keep the state and call reset_state()")

    def _chunks(self, owners, lists, device):
        """(params, work, grads, exp_avg, exp_avg_sq, mask or indices) for the op: all at once, or with offload in
        chunks of about OFFLOAD_CHUNK_BYTES of state, the chunk's state brought to `device` for the op; after each
        chunk its moments are copied back (asynchronously, in stream order), and when the last has been, the host
        waits for the copies. A chunk that raises leaves its params, their state and their step counts as they were;
        the chunks before it have stepped."""
        if not self.offload:
            yield [owners, *lists]
            return
        n, start, size, copied = len(owners), 0, 0, False
        try:
            for i in range(n):
                size += sum(t.numel() * t.element_size() for t in (lists[2][i], lists[3][i], lists[4][i]))
                if size < OFFLOAD_CHUNK_BYTES and i < n - 1:
                    continue
                cut = slice(start, i + 1)
                here = [[t.to(device, non_blocking=True) for t in lst[cut]] for lst in lists[2:]]
                yield [owners[cut], lists[0][cut], lists[1][cut], *here]
                for home, used in zip(lists[2][cut] + lists[3][cut], here[0] + here[1]):
                    if used is not home:
                        home.copy_(used, non_blocking=True)
                        copied = True
                here = used = None  # freed in stream order: the next chunk's copies may take their memory
                start, size = i + 1, 0
        finally:
            if copied:
                torch.cuda.synchronize(device)

    def load_state_dict(self, state_dict):
        """As Optimizer's (load-state-dict hooks included), but state tensors keep their own dtypes (bool masks, int32
        indices, fp32 moments) instead of being cast to the param's dtype, and go straight to where this optimizer
        keeps them (with offload: pinned host memory, never the device). The saved masks (or indices) are state and
        replace those this optimizer was made with; each must fit its param, or nothing is loaded. A param without
        saved state starts afresh (step 0, zero moments) under the mask it has here."""
        state_dict = dict(state_dict)  # shallow, as torch's: a pre-hook may replace it
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        groups, saved_groups = self.param_groups, copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(f"MaskedAdamW.load_state_dict: {len(saved_groups)} param groups saved, "
                             f"{len(groups)} here")
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"MaskedAdamW.load_state_dict: param group {i} has {len(sg['params'])} params "
                                 f"saved, {len(g['params'])} here")
            if any(sg.get(k) for k in UNSUPPORTED):
                raise ValueError(f"MaskedAdamW.load_state_dict: param group {i} was saved with "
                                 f"{', '.join(k for k in UNSUPPORTED if sg.get(k))}, which this optimizer does not have")
            _check_hyperparameters({**self.defaults, **sg}, f"load_state_dict: param group {i}: ")
        params = dict(zip((i for sg in saved_groups for i in sg["params"]), (p for g in groups for p in g["params"])))
        placed = {}
        for i, saved in state_dict["state"].items():  # every state checked before any is placed
            if i not in params:
                raise ValueError(f"MaskedAdamW.load_state_dict: state saved for param {i}, which no group lists")
            p = params[i]
            tensors = _saved_state(i, p, saved)
            # copies, so that the saved state_dict and this optimizer do not share
            placed[p] = {"step": torch.tensor(int(saved["step"]), dtype=torch.int64),
                         **(_pinned(tensors) if self.offload and p.is_cuda else
                            {k: v.to(p.device, copy=True).contiguous() for k, v in tensors.items()})}
        for p in params.values():
            if p not in placed:
                placed[p] = _new_state(p, _mask(self.state[p], p), "indices" in self.state[p], self.offload)
        for g, sg in zip(groups, saved_groups):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
        self.__setstate__({"state": placed, "param_groups": saved_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments, masks or indices) across all params."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items() if k != "step")


def _new_state(p: torch.Tensor, m, compact, offload: bool = False) -> dict:
    """Fresh state of param p under mask m (None = all True): dense, or compact by density unless `compact` says;
    in pinned host memory when `offload` and p is on a CUDA device."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"MaskedAdamW: params must be tensors, got {type(p).__name__}")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"MaskedAdamW: params must be fp32, bf16 or fp16 (the ops' dtypes), got {p.dtype}")
    if m is not None and not (isinstance(m, torch.Tensor) and m.dtype == torch.bool):
        # refused, not cast: the index tensor [0, 2, 0] would become the mask [False, True, False]
        got = getattr(m, "dtype", type(m).__name__)
        raise TypeError(f"MaskedAdamW: a mask must be a bool tensor or None, got {got}")
    # a copy: the caller may reuse its mask tensor, and compact state (built from it) would not see the change
    m = torch.ones_like(p, dtype=torch.bool) if m is None else m.to(p.device, copy=True)
    if m.shape != p.shape:
        raise ValueError(f"MaskedAdamW: mask of shape {list(m.shape)} for a param of shape {list(p.shape)}")
    if compact and p.numel() > INT32_MAX:
        raise ValueError(f"MaskedAdamW: compact state addresses entries with int32 indices; a param of "
                         f"{p.numel()} entries needs dense state (compact=None or False)")
    dense = p.numel() > INT32_MAX or not (compact if compact is not None else m.float().mean().item() < COMPACT_BELOW)
    if dense:  # state in the param's logical (row-major) order, whatever the param's strides
        sel, n = {"mask": m.contiguous()}, p.shape
    else:
        # flat indices; the param's shape beside them lets a loaded state be checked against its param
        sel = {"indices": torch.nonzero(m.reshape(-1)).flatten().to(torch.int32),
               "shape": torch.tensor(p.shape, dtype=torch.int64)}
        n = sel["indices"].numel()
    step = torch.zeros((), dtype=torch.int64)
    if offload and p.is_cuda:
        return {"step": step, **_pinned(sel, zeros={"exp_avg": n, "exp_avg_sq": n})}
    return {"step": step, **sel, "exp_avg": torch.zeros(n, device=p.device),
            "exp_avg_sq": torch.zeros(n, device=p.device)}


def _mask(st: dict, p: torch.Tensor) -> torch.Tensor:
    """The bool mask that param p's state selects (dense: its mask; compact: its indices, scattered)."""
    if "mask" in st:
        return st["mask"]
    return torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, st["indices"].long().cpu(), True).view(p.shape)


def _saved_state(i, p: torch.Tensor, saved: dict) -> dict:
    """The tensors of param i's saved state (all but its step), refused unless they fit param p."""
    where = f"MaskedAdamW.load_state_dict: param {i} (shape {list(p.shape)})"
    kinds = sorted({"mask", "indices"} & saved.keys())
    if len(kinds) != 1 or set(saved) - {"shape"} != {"step", "exp_avg", "exp_avg_sq", *kinds} \
            or ("shape" in saved and kinds != ["indices"]):
        raise ValueError(f"{where}: saved state has keys {sorted(saved)}, not a MaskedAdamW state (step, exp_avg, "
                         f"exp_avg_sq, and mask or indices)")
    step = saved["step"]
    if not (torch.is_tensor(step) and step.numel() == 1 or isinstance(step, (int, float))) \
            or not 0 <= float(step) < math.inf or float(step) != int(step):
        raise ValueError(f"{where}: saved step {step!r} is not a whole number >= 0")
    tensors = {k: v for k, v in saved.items() if k != "step"}
    bad = next((k for k, v in tensors.items() if not isinstance(v, torch.Tensor)), None)
    if bad:
        raise ValueError(f"{where}: saved {bad} is a {type(tensors[bad]).__name__}, not a tensor")
    if kinds == ["mask"]:
        mask = tensors["mask"]
        if mask.dtype != torch.bool or mask.shape != p.shape:
            raise ValueError(f"{where}: saved mask is {mask.dtype} of shape {list(mask.shape)}; "
                             f"expected torch.bool of the param's shape")
        n = p.shape
    else:
        idx = tensors["indices"]
        if idx.dtype != torch.int32 or idx.dim() != 1:
            raise ValueError(f"{where}: saved indices are {idx.dtype} of shape {list(idx.shape)}; expected 1-D int32")
        shape = tensors.setdefault("shape", torch.tensor(p.shape, dtype=torch.int64))  # none before 2026-12-04
        if shape.dtype != torch.int64 or shape.tolist() != list(p.shape):
            raise ValueError(f"{where}: state saved for a param of shape {shape.tolist()}")
        if idx.numel() and not (int(idx.min()) >= 0 and int(idx.max()) < p.numel()):
            raise ValueError(f"{where}: saved indices span [{int(idx.min())}, {int(idx.max())}], outside the "
                             f"param's {p.numel()} entries")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{where}: saved indices are not strictly increasing")
        n = idx.shape
    for k in ("exp_avg", "exp_avg_sq"):
        if tensors[k].dtype != torch.float32 or tensors[k].shape != n:
            raise ValueError(f"{where}: saved {k} is {tensors[k].dtype} of shape {list(tensors[k].shape)}; "
                             f"expected torch.float32 of shape {list(n)}")
    return tensors


def _pinned(tensors: dict, zeros: dict | None = None, pin: bool = True) -> dict:
    """Copies of `tensors` and fp32 zeros of the lengths (or shapes) in `zeros`, all views of one block of pinned host
    memory (torch's pinned allocator rounds each block up to a power of two: one block per param, not per tensor).
    pin=False: the same layout in ordinary host memory (tests without a GPU)."""
    shapes = {**{k: (t.shape, t.dtype) for k, t in tensors.items()},
              **{k: (torch.Size(n) if isinstance(n, torch.Size) else torch.Size([n]), torch.float32)
                 for k, n in (zeros or {}).items()}}
    sizes = {k: -(-math.prod(shape) * dtype.itemsize // 16) * 16 for k, (shape, dtype) in shapes.items()}  # 16-aligned
    block = torch.empty(sum(sizes.values()), dtype=torch.uint8, pin_memory=pin)
    out, at = {}, 0
    for k, (shape, dtype) in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        out[k] = block[at:at + nbytes].view(dtype).view(shape)
        at += sizes[k]
        if k in tensors:
            out[k].copy_(tensors[k])
        else:
            out[k].zero_()
    return out


def _tensor_list(params) -> list:
    """Params (all, or a group's) as a list, in a defined order (a set has none: masks could not be matched to it)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError("MaskedAdamW: params must be an ordered collection (a list), not a set")
    return list(params)


def _label(i: int, g: int, p: torch.Tensor) -> str:
    """A param in step's messages: its position across the groups (as state_dict numbers them), group, shape, dtype."""
    return f"MaskedAdamW.step: param {i} (group {g}, shape {list(p.shape)}, {p.dtype})"


def _number(value) -> bool:
    return not isinstance(value, bool) and (isinstance(value, numbers.Real) or
                                            isinstance(value, torch.Tensor) and value.numel() == 1)


def _check_hyperparameters(group: dict, where: str = "") -> None:
    """torch.optim.AdamW's checks (and `compact` is None, True or False), made when a group is added and before
    each step."""
    for name in ("lr", "eps", "weight_decay"):
        if not _number(group[name]):
            raise ValueError(f"MaskedAdamW: {where}invalid {name}: {group[name]!r} (a number)")
    betas = group["betas"]
    if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != 2 \
            or not all(_number(b) for b in betas):
        raise ValueError(f"MaskedAdamW: {where}invalid betas: {betas!r} (two numbers, (beta1, beta2))")
    if not (group["compact"] is None or isinstance(group["compact"], bool)):
        raise ValueError(f"MaskedAdamW: {where}invalid compact: {group['compact']!r} (None, True or False)")
    lr, (beta1, beta2), eps, wd = float(group["lr"]), betas, group["eps"], group["weight_decay"]
    for name, value, ok in (("lr", lr, lr >= 0), ("eps", eps, eps >= 0), ("weight_decay", wd, wd >= 0),
                            ("betas[0]", beta1, 0 <= beta1 < 1), ("betas[1]", beta2, 0 <= beta2 < 1)):
        if not ok:
            raise ValueError(f"MaskedAdamW: {where}invalid {name}: {value}")
