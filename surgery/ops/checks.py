"""The ops' argument checks (csrc/checks.h) for the reference twins: the same call is refused on both paths, with
the same message, before anything is written."""
import operator

import torch

WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
             torch.bool: "Bool", torch.int32: "Int", torch.int64: "Long", torch.uint8: "Byte", torch.int8: "Char",
             torch.int16: "Short", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
             torch.uint16: "UInt16", torch.uint32: "UInt32", torch.uint64: "UInt64"}
INFERENCE = ("Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to get a "
             "normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for more details.")


def _text(part) -> str:
    """A part of a message as C++'s ostream writes it: dtypes by their c10 names, doubles to 6 digits."""
    if isinstance(part, torch.dtype):
        return C10_NAMES.get(part, str(part))
    return f"{part:g}" if isinstance(part, float) else str(part)


def _fail(*parts) -> None:
    """RuntimeError with the message TORCH_CHECK builds from the same parts."""
    raise RuntimeError("".join(_text(p) for p in parts))


def _shape(t) -> tuple:
    """The end of a "must be a contiguous [..] matrix, got " message: the shape, and whether it is contiguous."""
    if not isinstance(t, torch.Tensor):
        return (type(t).__name__,)
    return list(t.shape), "" if t.is_contiguous() else " (not contiguous)"


def tensor_list(op: str, name: str, x) -> list:
    """A list argument as a list (a tuple or a generator too); a bare tensor is refused, not iterated over."""
    if isinstance(x, torch.Tensor) or x is None:
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(x).__name__}")
    return list(x)


def entries(op: str, lists) -> None:
    """Every entry of the op's parallel lists is a tensor (None is not a mask of every entry)."""
    for i, entry in enumerate(zip(*lists)):
        if not all(isinstance(t, torch.Tensor) for t in entry):
            raise TypeError(f"{op}: entry {i} holds something that is not a tensor (a mask of every entry is "
                            "torch.ones_like(param, dtype=torch.bool))")


def step_and_betas(op: str, step, beta1: float, beta2: float) -> None:
    """1 - beta**step divides: beta = 1 would give inf or nan."""
    if isinstance(step, bool):
        raise TypeError(f"{op}: step must be an int, got bool")
    try:
        step = operator.index(step)  # an int, or what converts to one without loss (as the op's binding takes)
    except TypeError:
        raise TypeError(f"{op}: step must be an int, got {type(step).__name__}") from None
    if step < 1:
        _fail(op, ": step must be >= 1, got ", step)
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        _fail(op, ": beta1 and beta2 must lie in [0, 1), got ", beta1, " and ", beta2)


def adamw(op: str, params, grads, exp_avgs, exp_avg_sqs, sel, dense: bool, step, beta1: float, beta2: float) -> None:
    """check_adamw of csrc/checks.h, then the memory-overlap check."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(sel) == n):
        _fail(op, ": lists differ in length (params ", n, ", grads ", len(grads), ", exp_avgs ", len(exp_avgs),
              ", exp_avg_sqs ", len(exp_avg_sqs), ", masks " if dense else ", indices ", len(sel), ")")
    step_and_betas(op, step, beta1, beta2)
    entries(op, (params, grads, exp_avgs, exp_avg_sqs, sel))
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, sel)):
        if p.device != params[0].device:
            _fail(op, ": params[", i, "] is on ", p.device, ", params[0] on ", params[0].device)
        if p.dtype not in PARAM_DTYPES:
            _fail(op, ": params[", i, "] must be fp32, bf16 or fp16, got ", p.dtype)
        if g.dtype != p.dtype or g.shape != p.shape:
            _fail(op, ": grads[", i, "] must match params[", i, "] (", list(p.shape), " ", p.dtype, "), got ",
                  list(g.shape), " ", g.dtype)
        state = p.shape if dense else s.shape
        if not (m.dtype == v.dtype == torch.float32 and m.shape == v.shape == state):
            _fail(op, ": exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be fp32 of shape ", list(state))
        if dense and not (s.dtype == torch.bool and s.shape == p.shape):
            _fail(op, ": masks[", i, "] must be bool of shape ", list(p.shape))
        if not dense and not (s.dtype == torch.int32 and s.dim() == 1):
            _fail(op, ": indices[", i, "] must be int32 [nnz]")
        for t in (g, m, v, s):
            if t.device != p.device:
                _fail(op, ": tensors of entry ", i, " are on different devices (", p.device, ", ", t.device, ")")
        for name, t in (("params", p), ("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v),
                        ("masks" if dense else "indices", s)):
            if not t.is_contiguous():
                _fail(op, ": ", name, "[", i, "] must be contiguous")
        if not dense and s.numel() and not (s[0] >= 0 and s[-1] < p.numel() and bool((s[1:] > s[:-1]).all())):
            _fail(op, ": indices[", i, "] must be strictly increasing and in range [0, ", p.numel(), ")")
    written = [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    no_overlap(op, written, [("grads", grads), ("masks" if dense else "indices", sel)])
    writable([t for _, ts in written for t in ts])


def writable(tensors) -> None:
    """As the ops' version-counter bump: an inference tensor is written only in inference mode (torch's own
    in-place ops check this too, but some only after writing)."""
    if not torch.is_inference_mode_enabled() and any(t.is_inference() for t in tensors):
        _fail(INFERENCE)


def no_overlap(op: str, written, read) -> None:
    """No tensor the op writes may share memory with another tensor it writes or reads: the result would depend on
    the order of the updates (and on the GPU they race). Tensors only read may share memory with each other.
    written / read: (name, list of contiguous tensors) pairs."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), w, f"{name}[{i}]")
             for w, lists in ((True, written), (False, read)) for name, ts in lists
             for i, t in enumerate(ts) if t.numel() and t.device.type != "meta"]
    spans.sort(key=lambda s: s[0])  # stable, as the op's std::stable_sort: ties keep this order, so do messages
    end_written = end_any = (0, "")
    for start, end, w, label in spans:
        other = end_written if start < end_written[0] else end_any if w and start < end_any[0] else None
        if other:
            _fail(op, ": ", label, " shares memory with ", other[1], "; the params and the state it writes must not "
                  "share memory with each other or with the grads, masks or indices")
        if end > end_any[0]:  # on a tie the first span to reach that end stays, as in the op
            end_any = (end, label)
        if w and end > end_written[0]:
            end_written = (end, label)


def prune(fc_ins: list, biases: list, fc_out, neurons) -> None:
    """check_prune of csrc/checks.h; the twin also takes None biases in the list."""
    op = "prune_neurons_"
    if not fc_ins:
        _fail(op, ": fc_in is empty")
    if biases and len(biases) != len(fc_ins):
        _fail(op, ": ", len(biases), " biases for ", len(fc_ins), " input projections")
    if not (isinstance(fc_out, torch.Tensor) and fc_out.dim() == 2 and fc_out.is_contiguous()):
        _fail(op, ": fc_out must be a contiguous [D, H] matrix, got ", *_shape(fc_out))
    if fc_out.dtype not in WEIGHT_DTYPES:
        _fail(op, ": fc_out must be fp32, fp64, bf16 or fp16, got ", fc_out.dtype)
    h = fc_out.shape[1]
    for k, (w, b) in enumerate(zip(fc_ins, biases or [None] * len(fc_ins))):
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == h and w.is_contiguous()):
            _fail(op, ": fc_in[", k, "] must be a contiguous [", h, ", D] matrix, got ", *_shape(w))
        if w.dtype not in WEIGHT_DTYPES:
            _fail(op, ": fc_in[", k, "] must be fp32, fp64, bf16 or fp16, got ", w.dtype)
        if w.device != fc_out.device:
            _fail(op, ": fc_in[", k, "] is on ", w.device, ", fc_out on ", fc_out.device)
        if b is not None and not (isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] == h
                                  and b.is_contiguous() and b.device == fc_out.device and b.dtype == w.dtype):
            _fail(op, ": fc_in_bias[", k, "] must be a contiguous [", h, "] ", w.dtype, " vector on ", fc_out.device)
    if neurons.dim() != 1:
        _fail(op, ": neurons must be a contiguous int64 [n] tensor")
    if neurons.numel() and not (0 <= int(neurons.min()) and int(neurons.max()) < h):
        _fail(op, ": neuron index out of range [0, ", h, "): min ", int(neurons.min()), ", max ", int(neurons.max()))
    writable([*fc_ins, *(b for b in biases if b is not None), fc_out])
