"""Triton kernel launches with less host time: `launch(kernel, grid, *args, **kwargs)` does what
`kernel[grid](*args, **kwargs)` does.

Triton's launch (`JITFunction.run`) binds and specializes every argument, builds a cache key and
looks the compiled kernel up again at every call: tens of microseconds of host time a launch,
which an eager decode step (hundreds of launches) is bound by. Here the first launch of each
(kernel, current device, keyword arguments, what Triton specializes the positional arguments
on) goes through Triton, which compiles and launches it and returns its compiled kernel; the
later ones call that kernel's launcher directly, as the end of `JITFunction.run` does (the same
arguments in the kernel's parameter order, stream, launch metadata and hooks; the tensors as their
data pointers, which the launcher takes as they are, where no launch hook may see them). What Triton
specializes on is taken as a superset: a tensor's dtype and 16-byte alignment, an integer's
value where it is 1 and else its divisibility by 16 and size class, a bool's value; so two
calls that share a key always share Triton's compiled kernel. (The keyword arguments stand in
the key as a number per distinct set of them; `bind` works it out once for launches whose
keywords are fixed.)

The direct call applies only where it is known to end as Triton's own launch: Triton 3.6 to 3.9
(read: both ends of that range), NVIDIA's backend (not ROCm, whose backend specializes on more),
not under the interpreter, no pre-run hooks on the kernel, grids given as tuples, arguments of
the types above. Everything else (`fast_path` False included) is `kernel[grid](...)`. Triton's
compile settings (`triton.knobs`) and the kernel's global values are read at the first launch
of a key, not at each call (the launch hooks at each call, as Triton reads them: while both
are Triton's empty hook chains, as they are unless a profiler adds one, the launcher is given
no metadata and no hooks, which it then skips, instead of the metadata only a hook reads).
"""

from __future__ import annotations

import inspect
import os

import torch

from harness.quant import kernels

triton = kernels.triton

# Triton's chain of launch hooks (the type of `triton.knobs.runtime.launch_enter_hook`), and its
# driver's settings (the active driver may change; this object does not).
_HOOK_CHAIN = getattr(getattr(triton, "knobs", None), "HookChain", None)
_DRIVER = triton.runtime.driver if triton is not None else None

# The Triton versions whose `JITFunction.run` ends in the launch `_direct` repeats.
KNOWN_TRITON = ((3, 6), (3, 7), (3, 8), (3, 9))


def _known_triton() -> bool:
    if triton is None:
        return False
    try:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return version in KNOWN_TRITON


# Whether launches may skip Triton's per-call work (tests and benchmarks may set it;
# HARNESS_DIRECT_LAUNCH=0 turns it off).
fast_path = (
    os.environ.get("HARNESS_DIRECT_LAUNCH", "1") != "0"
    and _known_triton()
    and not kernels.interpreting()
    and torch.version.hip is None
)

# Whether a host tensor may be launched directly (as its pointer): never on a GPU, where the
# launcher given an int does not ask the driver about it (Triton's own launch asks, and refuses a
# host pointer with "cpu tensor?"); tests whose stand-in launchers take host tensors set it.
host_tensors_direct = False

# (id of the kernel, device, the keyword arguments' number (`_keywords_code`), the positional
# arguments' count and specialization) ->
# (the kernel, its compiled kernel, the parameters after the positional ones in order: keyword
# values and defaults).
_COMPILED: dict[tuple, tuple] = {}


_I32 = range(-(1 << 31), 1 << 31)
_I64 = range(-(1 << 63), 1 << 63)

# int -> its code in the key (see `_int_code`), for the ints launches pass again and again
# (sizes, strides, positions); at most _INT_CODES_KEPT of them.
_INT_CODES: dict[int, int] = {}
_INT_CODES_KEPT = 1 << 14


def _int_code(a: int) -> int:
    """1 for 1, else 2 + divisible by 16 + 2 * within int32 + 4 * within int64."""
    code = 1 if a == 1 else 2 + (not a & 15) + 2 * (a in _I32) + 4 * (a in _I64)
    if len(_INT_CODES) < _INT_CODES_KEPT:
        _INT_CODES[a] = code
    return code


def _specialization(args: tuple, tensor=torch.Tensor, codes=_INT_CODES, int_code=_int_code) -> tuple | None:
    """(key, values): what the compiled kernel for `args` depends on (a superset of Triton's),
    flat, and `args` with each tensor as its data pointer, as the launcher takes them (an int
    pointer is used as it is: no `data_ptr` call and no driver query of it a tensor); None for
    an argument of another type. The key: a tensor's dtype and whether it is 16-byte aligned;
    an int's code (`_int_code`); a bool as "i1" and its value; a float as 0.0; None. Two
    argument tuples of one kernel with one key have the same types at every position (a dtype,
    a str, 0.0, None and an int code never equal one another). None for a host tensor too,
    unless `host_tensors_direct`. (One flat loop, no call an
    argument but a tensor's pointer and a new int's code: it runs at every launch.)"""
    out = []
    add = out.append
    values = []
    put = values.append
    for a in args:
        kind = a.__class__
        if kind is tensor:
            if a.is_cpu and not host_tensors_direct:
                return None  # (Triton's own launch then refuses it: no pointer it cannot read)
            pointer = a.data_ptr()
            add(a.dtype)
            add(not pointer & 15)
            put(pointer)
            continue
        if kind is int:
            code = codes.get(a)
            add(int_code(a) if code is None else code)
        elif kind is bool:
            add("i1")  # (True == 1: apart from the int 1)
            add(a)
        elif kind is float:
            add(0.0)
        elif a is None:
            add(None)
        elif isinstance(a, tensor):  # (a subclass)
            if a.is_cpu and not host_tensors_direct:
                return None
            pointer = a.data_ptr()
            add(a.dtype)
            add(not pointer & 15)
            put(pointer)
            continue
        else:
            return None
        put(a)
    return out, values


_one_device: bool | None = None


def _current_device() -> int:
    global _one_device
    if _one_device is None:
        _one_device = torch.cuda.device_count() <= 1
    return 0 if _one_device else torch.cuda.current_device()


def cached_launches() -> int:
    """How many kinds of launch have a compiled kernel kept for direct calls."""
    return len(_COMPILED)


def current_stream(device: int):
    """The stream Triton launches on for `device` (its driver's current stream, read at every
    launch: a `torch.cuda.stream` block changes it)."""
    return _DRIVER.active.get_current_stream(device)


class Bound:
    """A kernel with its keyword arguments bound (`bind`), for launches whose keywords are
    fixed (a plan's constexprs and launch options): `launch(bound, grid, *args)` is
    `launch(kernel, grid, *args, **kwargs)`, with the keywords' part of the key worked out
    once, here, rather than at every launch."""

    __slots__ = ("kernel", "kwargs", "code")

    def __init__(self, kernel, kwargs: dict):
        self.kernel = kernel
        self.kwargs = kwargs
        self.code = _keywords_code(kwargs)


def bind(kernel, **kwargs) -> Bound:
    """`kernel` with `kwargs` bound, to pass to `launch` in its place (see `Bound`)."""
    return Bound(kernel, kwargs)


# The keyword arguments of launches (their count, names, values and the values' types: True == 1
# == 1.0, which Triton tells apart) -> a number that stands for them in `_COMPILED`'s keys, one
# per distinct set, never reused.
_KEYWORDS: dict[tuple, int] = {}


def _keywords_code(kwargs: dict) -> int | None:
    """The number standing for `kwargs` in the key (None for an unhashable value)."""
    values = kwargs.values()
    key = (len(kwargs), *kwargs, *values, *map(type, values))
    try:
        code = _KEYWORDS.get(key)
    except TypeError:
        return None
    if code is None:
        code = _KEYWORDS[key] = len(_KEYWORDS)
    return code


def unbound(kernel, kwargs: dict) -> tuple:
    """(the kernel, all its keyword arguments) that `launch(kernel, grid, *args, **kwargs)`
    launches: a `Bound` unwrapped (for code that wraps `launch`, as tests counting launches do)."""
    if kernel.__class__ is Bound:
        return kernel.kernel, {**kernel.kwargs, **kwargs}
    return kernel, kwargs


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, with the per-call work of Triton skipped after the
    first launch of the same kind (see the module's docstring). `kernel` may be a `Bound`
    (then with no `kwargs`: they are its own)."""
    if kernel.__class__ is Bound:
        if kwargs:
            raise TypeError("launch: a Bound kernel takes its keyword arguments from `bind`")
        code, kwargs, kernel = kernel.code, kernel.kwargs, kernel.kernel
    else:
        code = _keywords_code(kwargs) if fast_path else None
    if not fast_path or grid.__class__ is not tuple or code is None:
        kernel[grid](*args, **kwargs)
        return
    made = _specialization(args)
    if made is None:
        kernel[grid](*args, **kwargs)
        return
    device = 0 if _one_device else _current_device()
    key = (id(kernel), device, code, len(args), *made[0])
    known = _COMPILED.get(key)
    if known is None or known[0] is not kernel or kernel.pre_run_hooks:
        compiled = kernel[grid](*args, **kwargs)
        _remember(key, kernel, compiled, len(args), kwargs)
        return
    _direct(known[1], grid, current_stream(device), args, made[1], known[2])


def _remember(key: tuple, kernel, compiled, n_args: int, kwargs: dict) -> None:
    """Keep `compiled` for `key` where its launcher can be called directly: the parameters past
    the positional arguments all given by keyword or by their defaults."""
    if not isinstance(kernel, triton.runtime.jit.JITFunction) or not hasattr(compiled, "packed_metadata"):
        return
    tail = []
    for param in kernel.params[n_args:]:
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            return
    _COMPILED[key] = (kernel, compiled, tuple(tail))


def _direct(compiled, grid: tuple, stream, args: tuple, values: list, tail: tuple) -> None:
    """The launch at the end of Triton's `JITFunction.run` (3.6 to 3.9) of the positional
    arguments `args` (`values`: the same with the tensors as their data pointers) and then `tail`,
    the values of the kernel's other parameters in order. Where both launch hooks are Triton's
    empty chains, the launcher gets `values`, and no launch metadata (only ever read by a hook)
    nor hooks, which it then skips, as calling an empty chain does nothing; else the tensors
    and both, as Triton gives them."""
    hooks = triton.knobs.runtime
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    g = (*grid, 1, 1)
    if (
        enter.__class__ is _HOOK_CHAIN
        and leave.__class__ is _HOOK_CHAIN
        and not enter.calls
        and not leave.calls
    ):
        compiled.run(
            g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *values, *tail,
        )  # fmt: skip
        return
    bound = args + tail
    metadata = compiled.launch_metadata(grid, stream, *bound)
    compiled.run(
        g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *bound,
    )  # fmt: skip
