"""An emulated CUDA accelerator: tensors that say `cuda:N` and compute on the CPU with real values.

Most CI machines have no GPU, yet the device rules of CUDA must be checked there with real values
flowing through the model (MoE routing depends on them). Inside

    with EmulatedCuda(device_count=2):
        model = Mixtral.from_gguf(path, device_map={..., "layers.1": "cuda:1", ...})
        logits = model(tokens)

`torch.zeros(..., device="cuda:1")`, `t.to("cuda:1")`, `t.cuda()`, `torch.tensor(..., device=...)`
make tensors whose `.device` is `cuda:N` (any N below `device_count`), whose values are real (a
CPU tensor inside), and whose ops refuse what CUDA refuses, with CUDA's messages and RuntimeError.
`torch.cuda.is_available()` is True, `device_count()` is `device_count`, `synchronize()`,
`current_device()`, `set_device()`, `torch.cuda.device(n)` and `torch.Generator(device="cuda")`
work, and real CUDA is never initialised (on a CPU-only build every real CUDA call raises).
Everything is put back when the block ends, also on an exception.

How it works:
- `EmulatedTensor` is a wrapper subclass (`_make_wrapper_subclass`) whose device is `cuda:N`,
  holding a CPU tensor with the values (`.data_cpu`, views share its storage);
- one `TorchDispatchMode` sees every aten op: ops without emulated tensors or a CUDA `device=`
  run untouched; the others are checked against CUDA's device rules (`harness.trace.rules`, the
  same module the classifier uses), run on the CPU tensors, and their outputs wrapped with the
  op's device. The mode sits at the bottom of the dispatch-mode stack whichever order contexts are entered in, so a tracer's mode
  (entered before or after) sees each op once, with the emulated devices, before it runs;
- the C++ bindings initialise CUDA lazily before dispatch by calling `torch.cuda._lazy_init`,
  which is a no-op here, so factories with `device="cuda"` reach the dispatch mode; a
  `TorchFunctionMode` builds `torch.tensor` / `as_tensor` / `asarray` / `new_tensor` with a CUDA
  device (their C++ path hides the copy from dispatch modes) and checks generator devices;
- a no-op CUDA device guard stands in for the absent one during the block
  (`harness.trace.emulated_autograd.install_guard`), so C++ bindings that open a device guard
  (indexing, `copy_`, ...) and autograd's graph recording work, also inside functions entered
  through `handle_torch_function` (where the function mode is off); `torch.tensor(...,
  device="cuda")` reached there is made on the CPU and moved by an op the dispatch mode sees;
  where no guard can be installed, the function mode does those bindings with the aten ops
  their C++ code calls (indexing, `copy_`, `contiguous`, `int()`/`float()`, `nonzero`, ...);
- backward passes of graphs that reach a CUDA device run in
  `harness.trace.emulated_autograd.run_backward` (PyTorch's nodes, PyTorch's gradient checks),
  so a training step runs and meets CUDA's device errors;
- where CUDA has a kernel the CPU lacks, the emulation runs PyTorch's decomposition of the op
  (recurrent layers, whose CUDA path uses fused cells, are decomposed above autograd; autocast's
  half-to-float softmax), or the CPU kernel in a wider dtype (a dtype only CUDA's kernel takes,
  e.g. histc of integers); an op it cannot run raises `harness.errors.EmulationUnsupported`
  naming it, never something else;
- torch.nn's fast paths (MultiheadAttention, TransformerEncoder) ask `has_torch_function`, to
  which the emulation's function mode does not count: they take the path real CUDA takes (a
  nested tensor, which the encoder's makes from a padding mask, is not emulated);
- modules whose parameters `Module._apply` cannot swap for emulated ones: a TorchScript module
  gets them as new entries; a lazy module's uninitialized parameters stay lazy when moved and are
  made on the emulated device when the module first runs;
- `torch.cuda.*` queries (`device_count`, `get_device_properties`, `get_device_capability`
  (`capability`, sm_80 by default), `mem_get_info`, ...) and `torch.Generator` are patched for
  the duration;
- GPU-only paths are switched off (`harness.quant.kernels.supports` answers False, so the torch
  dequantizers run on the wrapped CPU data), and the per-device constant tables
  (`harness.device_tables.TABLES`) hold emulated CUDA entries inside a block only: real CUDA
  entries are taken out on entry and given back on exit, and the emulated ones are taken out on
  exit and given back on the next entry (a model loaded in one block keeps the constants it made
  at load when traced in another).

Limits: the emulated backward does not run hooks registered on PyTorch's C++ autograd nodes
themselves (`nn.Module` full backward hooks run: `harness.trace.emulated_autograd`);
`Tensor.as_subclass` of an emulated tensor is refused (it is a wrapper subclass already);
in-place changes of an emulated tensor's storage or size (`resize_` to a new size, `set_`) raise
`EmulationUnsupported` (in-place restrides, `transpose_`, `unsqueeze_`, `as_strided_`, ... are
followed); the CUDA RNG is the CPU one (same values as the CPU, not as a GPU; `get_rng_state` /
`fork_rng` work on it); streams (`torch.cuda.Stream`, `stream()`, `set_stream`, `record_stream`)
and events are stand-ins on which nothing is ever pending (without a GPU); pinned host memory
is ordinary host memory the emulation remembers as pinned; NVTX ranges mark nothing;
`torch.accelerator` answers for CUDA; the patches are process-wide, so one
thread at a time (jobs given to a `concurrent.futures.ThreadPoolExecutor` inside a block run under
it in their worker threads: transformers loads weights so). A bare device number is a CUDA device,
as on a CUDA build (`torch.device(1)`, `module.to(0)`: accelerate's device maps). On a machine with real CUDA the emulation works too: real CUDA tensors made
outside keep working, inside they compute for real until they meet an emulated tensor (then their
values are copied to the CPU for that op); factories and moves to "cuda" inside make emulated
tensors. The CUDA C++ lazy-init flag stays set after the block (on a CPU-only build a later real
CUDA call then fails with "Could not run ... 'CUDA' backend" rather than "Torch not compiled with
CUDA enabled"); `torch.cuda.is_available()` is False again.

`refusal(func, args, kwargs)` applies the rules to a call without running anything and gives
CUDA's error message or None.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import itertools
import sys
import threading
import weakref
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
    _pop_mode,
    _push_mode,
)

from harness.device_tables import TABLES
from harness.errors import EmulationUnsupported
from harness.trace import emulated_autograd, rules, untraced_paths

__all__ = [
    "EmulatedCuda",
    "EmulatedGenerator",
    "EmulatedTensor",
    "active",
    "cpu_data",
    "is_emulated",
    "refusal",
]

CPU = torch.device("cpu")
_Tensor = torch.Tensor
_RealGenerator = torch.Generator


# Ops that change an emulated tensor's shape or strides in place (the wrapper's are fixed).
# fmt: off
_META_MUTATING = frozenset([
    "resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "t_",
    "transpose_", "swapaxes_", "swapdims_", "_resize_output_", "sparse_resize_",
    "sparse_resize_and_clear_",
])
# fmt: on


# ---- state ---------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_ACTIVE: EmulatedCuda | None = None


def active() -> EmulatedCuda | None:
    """The `EmulatedCuda` in effect, or None."""
    return _ACTIVE


# ---- the tensor ----------------------------------------------------------------------------------


@untraced_paths.stands_for_plain  # stands for a CUDA tensor
class EmulatedTensor(torch.Tensor):
    """A tensor on an emulated CUDA device: `.device` is `cuda:N`, the values are in `.data_cpu`."""

    data_cpu: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device | None = None, requires_grad=None):
        if device is None:
            # Called as a parameter's type: a parameter over an emulated tensor is an
            # EmulatedTensor, and code that rebuilds parameters calls `type(param)(value,
            # requires_grad=...)` (accelerate's offload does), which is nn.Parameter's signature.
            return torch.nn.Parameter(data, requires_grad=True if requires_grad is None else requires_grad)
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            data.size(),
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            layout=data.layout,
            device=device,
            requires_grad=False,
        )
        r.data_cpu = data
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    # A traceable wrapper subclass: nn.Module.to() then swaps parameters (swap_tensors) instead of
    # `param.data = ...`, which would leave a plain Parameter claiming a CUDA device.
    def __tensor_flatten__(self):
        return ["data_cpu"], {"device": self.device}

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return EmulatedTensor(inner_tensors["data_cpu"], ctx["device"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached when no EmulatedCuda mode is on the stack (e.g. after the block ended).
        return _emulate(func, args, kwargs or {}, _ACTIVE)

    # Bindings that refuse tensor subclasses in C++, reached also where the function mode is off
    # (inside functions entered through handle_torch_function): CUDA's behaviour.
    def tolist(self):
        return self.to(CPU).tolist()  # CUDA's tolist copies to the host first

    def numpy(self, *, force: bool = False):
        return _numpy(self, force=force)

    def __array__(self, dtype=None, copy=None):
        return _numpy(self)

    def as_subclass(self, cls):
        raise EmulationUnsupported(
            None,
            "Tensor.as_subclass",
            "an emulated tensor is a wrapper subclass and cannot become another one",
        )

    def __repr__(self, *, tensor_contents=None) -> str:
        text = repr(self.data_cpu)
        cut = text.find(", dtype=")
        if cut < 0:
            cut = text.rfind(")")
        return f"{text[:cut]}, device='{self.device}'{text[cut:]}"


def is_emulated(t) -> bool:
    """Whether `t` is a tensor on an emulated CUDA device."""
    return isinstance(t, EmulatedTensor) and t.is_cuda  # (`param.data = cpu_tensor` makes it a CPU one)


def cpu_data(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor holding an emulated tensor's values (shares its storage); `t` itself otherwise."""
    return t.data_cpu if is_emulated(t) else t


# ---- devices -------------------------------------------------------------------------------------


def _current_index() -> int:
    return _ACTIVE.current if _ACTIVE is not None else 0


def _resolve(device) -> torch.device:
    """A device argument (torch.device, str, int) -> torch.device; "cuda" -> "cuda:<current>"."""
    if isinstance(device, int):
        return torch.device("cuda", device)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", _current_index())
    return device


def _check_ordinal(device: torch.device) -> None:
    if device.type == "cuda" and _ACTIVE is not None and not 0 <= device.index < _ACTIVE.device_count:
        raise RuntimeError(
            "CUDA error: invalid device ordinal\n"
            f"(emulated CUDA has {_ACTIVE.device_count} device(s); {device} does not exist)"
        )


def _is_accel(device: torch.device) -> bool:
    return device.type != "cpu" and device.type != "meta"


# ---- per-op plan -----------------------------------------------------------------------------------


@dataclass
class _Plan:
    name: str  # overload packet, e.g. "add_"
    op: str  # "aten::add_.Tensor", as rules.refusal takes it
    rule: str
    layout: rules.Layout  # the schema's tensor arguments
    composite: bool  # has a CompositeImplicitAutograd kernel (seen only in inference mode)
    meta_mutating: bool
    view: bool  # the output is a view of the first input


_PLANS: dict = {}


def _plan(func) -> _Plan:
    plan = _PLANS.get(func)
    if plan is None:
        name = func._overloadpacket.__name__
        try:
            composite = torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"
            )
        except Exception:
            composite = False
        plan = _Plan(
            name=name,
            op=func.name(),
            rule=rules.rule_of(name),
            layout=rules.layout(func),
            composite=composite,
            meta_mutating=name in _META_MUTATING,
            view=bool(getattr(func, "is_view", False)),
        )
        _PLANS[func] = plan
    return plan


def _accumulate(plan: _Plan, args, kwargs) -> bool:
    """index_put's `accumulate` flag (its fourth argument); False for other ops."""
    if plan.rule != rules.INDEX_PUT:
        return False
    return bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))


def refusal(func, args=(), kwargs=None) -> str | None:
    """CUDA's error message if real CUDA refuses `func(*args, **kwargs)` for the devices of its
    tensors, else None (`rules.refusal` on the live tensors). Nothing runs; devices are read from
    the tensors (emulated or not)."""
    kwargs = kwargs or {}
    plan = _plan(func)
    operands = rules.live_operands(plan.layout, args, kwargs)
    return rules.refusal(
        plan.op, operands, accumulate=_accumulate(plan, args, kwargs), device_arg=plan.layout.device_arg
    )


# ---- running an op -------------------------------------------------------------------------------


def _unwrap(x, pairs: list):
    if isinstance(x, EmulatedTensor):
        pairs.append((x.data_cpu, x))
        return x.data_cpu
    if isinstance(x, _Tensor):
        if x.device.type == "cuda":  # a real CUDA tensor meeting emulated ones
            return x.cpu()
        pairs.append((x, x))
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(y, pairs) for y in x)
    return x


def _wrap(out, device: torch.device, pairs: list):
    if isinstance(out, _Tensor):
        for inner, outer in pairs:
            if out is inner:
                return outer  # in-place, out=, or an op that returns its input
        if device.type == "cuda" and out.device.type == "cpu":
            return EmulatedTensor(out, device)
        return out
    if isinstance(out, list):
        return [_wrap(o, device, pairs) for o in out]
    if isinstance(out, tuple):
        items = [_wrap(o, device, pairs) for o in out]
        return tuple(items) if type(out) is tuple else type(out)(items)
    return out


# Ops that ask whether CUDA's kernel can use a vendor library (`_use_cudnn_ctc_loss`, ...).
_LIBRARY_QUERIES = ("_use_cudnn", "_use_miopen")

# Softmax and its backward with a half input and a float result (autocast's `half_to_float`):
# CUDA's kernels only; the CPU's refuse them ("not supported on CPU", "expected scalar type").
_HALF_TO_FLOAT = frozenset(
    ("_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data")
)

# Ops whose CUDA kernel returns some outputs on the host: op -> their positions.
_HOST_OUTPUTS = {"_pack_padded_sequence": frozenset({1})}  # batch_sizes


def _run_wider(func, args, kwargs):
    """`func` with its integer and reduced-precision float tensors widened (to float64, float32),
    its outputs of the widened dtype cast back to the first input's; None if that fails too."""
    first = next((t for t in _tensors(args, kwargs)), None)
    if first is None or first.dtype in (torch.float32, torch.float64):
        return None
    wide = torch.float64 if not first.dtype.is_floating_point else torch.float32

    def widen(x):
        if isinstance(x, _Tensor) and x.dtype not in (torch.bool, torch.float32, torch.float64):
            return x.to(wide)
        if isinstance(x, (list, tuple)):
            return type(x)(widen(y) for y in x)
        return x

    def narrow(x):
        if isinstance(x, _Tensor) and x.dtype == wide:
            return x.to(first.dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(narrow(y) for y in x)
        return x

    try:
        return narrow(func(*widen(args), **{k: widen(v) for k, v in kwargs.items()}))
    except (NotImplementedError, RuntimeError):
        return None


def _decomposition(func):
    from torch._decomp import decomposition_table

    return decomposition_table.get(func)


def _active_mode(ctx: EmulatedCuda | None):
    """The emulation's dispatch mode entered again (inside its own handler it is off)."""
    import contextlib

    return ctx._mode if ctx is not None and ctx._mode is not None else contextlib.nullcontext()


def _tensors(args, kwargs):
    """The tensor arguments of a call, inside lists too."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, _Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, _Tensor))


def _emulate(func, args, kwargs, ctx: EmulatedCuda | None):
    plan = _plan(func)
    if plan.composite:  # only in inference mode: decompose, as the C++ kernel would
        with _active_mode(ctx):
            r = func.decompose(*args, **kwargs)
        if r is not NotImplemented:
            return r

    if plan.name.startswith(_LIBRARY_QUERIES):
        return False  # whether to take a cuDNN/MIOpen path: not here (as CUDA without those libraries)
    device_arg = plan.layout.device_arg
    device = kwargs.get("device") if device_arg else None
    if device is not None:
        device = _resolve(device)
    elif plan.rule == rules.SCATTER:
        device = args[0].device  # a clone of self, whatever src's device
    else:
        device = next((t.device for t in _tensors(args, kwargs) if _is_accel(t.device)), CPU)
        if not device_arg and device.type != "cpu":
            operands = rules.live_operands(plan.layout, args, kwargs)
            error = rules.refusal(plan.op, operands, accumulate=_accumulate(plan, args, kwargs))
            if error is not None:
                raise RuntimeError(error)
    _check_ordinal(device)

    if plan.meta_mutating:
        self = args[0]
        if isinstance(self, EmulatedTensor):
            if plan.name in _INPLACE_VIEWS:
                return _inplace_view(func, plan, self, args, kwargs)
            target = args[1].shape if plan.name == "resize_as_" else args[1]
            if plan.name in ("resize_", "resize_as_") and tuple(target) == tuple(self.shape):
                return self
            raise EmulationUnsupported(
                None,
                plan.op,
                f"would change the shape or strides of a tensor on {self.device} in place, "
                "which the emulation cannot follow",
            )

    pairs: list = []
    uargs = tuple(_unwrap(a, pairs) for a in args)
    ukwargs = {k: _unwrap(v, pairs) for k, v in kwargs.items()}
    if device_arg and ukwargs.get("device") is not None and _resolve(ukwargs["device"]).type == "cuda":
        ukwargs["device"] = CPU
        if ukwargs.get("pin_memory"):
            ukwargs["pin_memory"] = False
    try:
        try:
            out = func(*uargs, **ukwargs)
        except RuntimeError as exc:
            if "not supported on CPU" not in str(exc) and plan.name not in _HALF_TO_FLOAT:
                raise
            # CUDA's kernel takes what the CPU's refuses: as NotImplementedError, decomposed below
            raise NotImplementedError(str(exc)) from None
    except NotImplementedError as exc:
        if "not implemented for '" in str(exc):
            # The CPU kernel lacks a dtype CUDA's has (histc of integers, ...): computed in a
            # wider one, the results given the dtype CUDA's kernel gives them.
            out = _run_wider(func, uargs, ukwargs)
            if out is not None:
                return _wrap(out, device, pairs)
        # CUDA has a kernel the CPU lacks (fused RNN cells, ...): its decomposition if PyTorch
        # has one, run under the emulation; else the emulation says it cannot run the op.
        decomposition = _decomposition(func)
        if decomposition is None:
            raise EmulationUnsupported(
                None,
                plan.op,
                "CUDA has a kernel for this op, the CPU has none and no decomposition to emulate it",
            ) from None
        with _active_mode(ctx):
            return decomposition(*args, **kwargs)
    if any(
        t.is_nested for t in (out if isinstance(out, (list, tuple)) else (out,)) if isinstance(t, _Tensor)
    ):
        raise EmulationUnsupported(
            None,
            plan.op,
            "made a nested tensor, which the emulation cannot hold on an emulated device "
            "(nn.TransformerEncoder's fast path makes them from a padding mask)",
        )
    if plan.view and torch.is_inference_mode_enabled() and not args[0].is_inference():
        # In inference mode a view of a normal tensor is a normal tensor (autograd gives it the
        # base's version counter); a wrapper made here would be an inference tensor.
        with torch._C._InferenceMode(False):
            result = _wrap(out, device, pairs)
    else:
        result = _wrap(out, device, pairs)
    host = _HOST_OUTPUTS.get(plan.name)
    if host:  # outputs CUDA's kernel makes on the host
        result = type(result)(o if i in host else r for i, (o, r) in enumerate(zip(out, result, strict=True)))
    if (
        plan.layout.inplace or plan.layout.outs
    ):  # the wrapper's shape is fixed: an out= resize cannot be followed
        for inner, outer in pairs:
            if outer is not inner and inner.shape != outer.shape:
                raise EmulationUnsupported(
                    None,
                    plan.op,
                    f"resized a tensor on {outer.device} in place from {list(outer.shape)} to "
                    f"{list(inner.shape)}, which the emulation cannot follow",
                )
    return result


# In-place view ops (Tag.inplace_view) that only restride their tensor: done to the CPU data, then
# to the wrapper's own sizes and strides by the op's meta kernel (as PyTorch's
# return_and_correct_aliasing does for wrapper subclasses). stft ends with `out.transpose_(1, 2)`.
_INPLACE_VIEWS = frozenset(
    ["squeeze_", "unsqueeze_", "t_", "transpose_", "swapaxes_", "swapdims_", "as_strided_"]
)


def _inplace_view(func, plan: _Plan, self: EmulatedTensor, args, kwargs) -> EmulatedTensor:
    rest = args[1:]
    func(self.data_cpu, *rest, **kwargs)
    with torch.utils._mode_utils.no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            func(self, *rest, **kwargs)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)
    inner = self.data_cpu
    if (self.shape, self.stride(), self.storage_offset()) != (
        inner.shape,
        inner.stride(),
        inner.storage_offset(),
    ):
        raise EmulationUnsupported(
            None,
            plan.op,
            f"restrided a tensor on {self.device} in place in a way the emulation cannot follow",
        )
    return self


def _names_cuda_device(args, kwargs) -> bool:
    """Whether a call names a CUDA device (`device=`, or by position as `aten.to.device` does)."""
    device = kwargs.get("device")
    if isinstance(device, torch.device) and device.type == "cuda":
        return True
    return any(isinstance(a, torch.device) and a.type == "cuda" for a in args)


@untraced_paths.stands_for_plain
class _EmulationMode(TorchDispatchMode):
    def __init__(self, ctx: EmulatedCuda):
        super().__init__()
        self.ctx = ctx

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.ctx._real_cuda and (func in _PINNING or kwargs.get("pin_memory")):
            return _pinned(func, args, kwargs)
        if EmulatedTensor not in types and not _names_cuda_device(args, kwargs):
            return func(*args, **kwargs)  # nothing emulated (CPU, or real CUDA): run as is
        return _emulate(func, args, kwargs, self.ctx)


# Page-locked host memory is CUDA's allocator's; without a GPU the host tensors the emulation
# "pins" are ordinary ones whose storage it remembers, so `is_pinned()` answers as CUDA would
# (for views of them too).
_PINNING = frozenset({torch.ops.aten._pin_memory.default, torch.ops.aten.is_pinned.default})
_PINNED: dict[int, weakref.ref] = {}  # storage address -> a tensor pinned there


def _storage_address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _pinned(func, args, kwargs):
    if func is torch.ops.aten.is_pinned.default:
        t = args[0]
        if t.device.type != "cpu" or isinstance(t, EmulatedTensor):
            return False
        owner = _PINNED.get(_storage_address(t))
        owner = owner() if owner is not None else None
        return owner is not None and _storage_address(owner) == _storage_address(t)
    if func is torch.ops.aten._pin_memory.default:
        out = args[0].clone()
    else:  # a factory with pin_memory=True
        out = func(*args, **{**kwargs, "pin_memory": False})
        if isinstance(out, EmulatedTensor) or out.device.type != "cpu":
            return out
    _PINNED[_storage_address(out)] = weakref.ref(out)
    return out


# ---- tensors from data, generators ---------------------------------------------------------------

_RealGeneratorMeta = type(_RealGenerator)


class _GeneratorMeta(_RealGeneratorMeta):
    # While `torch.Generator` is EmulatedGenerator, isinstance(g, torch.Generator) holds for all.
    def __instancecheck__(cls, obj):
        return isinstance(obj, _RealGenerator)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, _RealGenerator)


class EmulatedGenerator(_RealGenerator, metaclass=_GeneratorMeta):
    """`torch.Generator(device="cuda:N")` under the emulation: a CPU generator reporting `cuda:N`."""

    def __new__(cls, device="cpu"):
        d = _resolve(device)
        if d.type != "cuda":
            return _RealGenerator(d)
        _check_ordinal(d)
        g = super().__new__(cls)
        g._emulated_device = d
        return g

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self) -> torch.device:
        return self._emulated_device


def _generator_device(g) -> torch.device:
    return getattr(g, "_emulated_device", None) or g.device


_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, _Tensor.new_tensor}


_WATCHING = {_Tensor.register_hook, _Tensor.retain_grad}


# Recurrent layers: for CUDA tensors PyTorch's C++ picks fused kernels (cuDNN, `_thnn_fused_*`)
# that the CPU has not. On emulated devices they run as PyTorch's decompositions instead,
# above autograd so that their backward is made of ordinary ops too.
def _rnn(packet):
    def run(*args, **kwargs):
        # (input, hx, params, has_biases, ...) or, packed, (data, batch_sizes, hx, params, ...)
        overload = packet.data if isinstance(args[3], (list, tuple)) else packet.input
        from torch._decomp import decomposition_table

        return decomposition_table[overload](*args, **kwargs)

    return run


def _gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    i_r, i_z, i_n = torch.nn.functional.linear(input, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = torch.nn.functional.linear(hx, w_hh, b_hh).chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (hx - n)


def _lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    h, c = hx
    gates = torch.nn.functional.linear(input, w_ih, b_ih) + torch.nn.functional.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    cy = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cy), cy


_RECURRENT = {
    torch._VF.gru: _rnn(torch.ops.aten.gru),
    torch._VF.lstm: _rnn(torch.ops.aten.lstm),
    torch._VF.rnn_tanh: _rnn(torch.ops.aten.rnn_tanh),
    torch._VF.rnn_relu: _rnn(torch.ops.aten.rnn_relu),
    torch._VF.gru_cell: _gru_cell,
    torch._VF.lstm_cell: _lstm_cell,
}


class _ConstructorMode(TorchFunctionMode):
    """Builds tensors from data on an emulated device and checks generators' devices."""

    def __init__(self, autograd: bool):
        super().__init__()
        self.autograd = autograd  # autograd can record graphs through emulated devices

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.autograd and torch.is_grad_enabled() and _records_graph(func, args, kwargs):
            raise EmulationUnsupported(
                None,
                getattr(func, "__name__", str(func)),
                "a tensor that requires grad on an emulated cuda device, with grad enabled: this torch "
                "build gives the emulation no CUDA device guard, so autograd cannot record the graph; "
                "run it under torch.no_grad() or torch.inference_mode()",
            )
        if func is _Tensor.as_subclass and args and is_emulated(args[0]):
            raise EmulationUnsupported(
                None,
                "Tensor.as_subclass",
                "an emulated tensor is a wrapper subclass and cannot become another one",
            )
        if func in _WATCHING and args and isinstance(args[0], _Tensor):
            emulated_autograd.watch(args[0])  # its hooks and retained grad, for the emulated backward
        if func in _FROM_DATA:
            return _from_data(func, args, kwargs)
        if func in _RECURRENT and any(is_emulated(t) for t in _tensors(args, kwargs)):
            with self:
                return _RECURRENT[func](*args, **kwargs)
        if args and isinstance(args[0], EmulatedTensor):
            method = _METHODS.get(func)
            if method is not None:
                return method(*args, **kwargs)
        # Give "cuda" (and device numbers) an index here: the C++ side asks a CUDA device guard or
        # the accelerator for the current device, and this build has neither.
        if func is torch.device and args and type(args[0]) is int:  # the accelerator's device n
            return torch.device("cuda", args[0])
        if func is torch._C._nn._parse_to:  # nn.Module.to(...)
            args = tuple(_indexed(a) for a in args)
        if func is _Tensor.to or func is _Tensor.cuda:
            if func is _Tensor.cuda and (len(args) < 2 or args[1] is None) and kwargs.get("device") is None:
                args = args[:1]
                kwargs = dict(kwargs, device=torch.device("cuda", _current_index()))
            args = (args[0], *(_indexed(a) for a in args[1:]))
            if isinstance(args[0], torch.nn.parameter.UninitializedTensorMixin):
                target = _target(args[1:], kwargs)
                if target is not None and target.type == "cuda":
                    return _lazy_to(args[0], target)
        if kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=_indexed(kwargs["device"]))
        g = kwargs.get("generator")
        if g is not None:
            _check_generator(g, args, kwargs)
        return func(*args, **kwargs)


# ---- Python bindings that need a CUDA device guard or refuse subclasses --------------------------
# These C++ bindings open a CUDA DeviceGuard (absent from a CPU-only build) before dispatching, or
# refuse tensor subclasses; for emulated tensors they are done here with the aten ops the C++ code
# would call, so dispatch modes (a tracer) see the same ops.

_aten = torch.ops.aten


def _item(self: torch.Tensor):
    return _aten._local_scalar_dense.default(self)


def _index(self):
    if self.dtype.is_floating_point or self.dtype.is_complex or self.dtype == torch.bool or self.numel() != 1:
        raise TypeError("only integer tensors of a single element can be converted to an index")
    return int(_item(self))


def _contiguous(self, memory_format=torch.contiguous_format):
    if self.is_contiguous(memory_format=memory_format):
        return self
    return _aten.clone.default(self, memory_format=memory_format)


def _nonzero(self, *, as_tuple=False, out=None):
    if as_tuple:
        return tuple(_aten.nonzero_numpy.default(self))
    return _aten.nonzero.default(self) if out is None else _aten.nonzero.out(self, out=out)


def _numpy(self, *, force=False):
    if force:
        return self.cpu().numpy(force=True)
    raise TypeError(
        f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
    )


def _index_parts(self: torch.Tensor, index) -> tuple[torch.Tensor, list]:
    """Basic indexing (ints, slices, None, ...) applied with aten view ops; the tensor indices left
    for advanced indexing, by dimension (at::indexing::applySlicing)."""
    if not isinstance(index, tuple):
        index = (index,)
    items = []
    for i in index:
        if isinstance(i, (list, range)) or (hasattr(i, "__array__") and not isinstance(i, _Tensor)):
            # A sequence becomes a long (or bool) index tensor on the tensor's device: made on the
            # host and uploaded without dispatch, then lifted on the device, the one op dispatch
            # modes see (indexing_tensor_from_data; an H100 showed the lift_fresh).
            with torch._C.DisableTorchFunction(), torch._C._DisableTorchDispatch():
                t = torch.as_tensor(list(i) if isinstance(i, range) else i)
                if t.dtype not in (torch.bool, torch.uint8):
                    t = t.to(torch.long)
            i = _aten.lift_fresh.default(EmulatedTensor(t, self.device))
        items.append(i)

    def width(i) -> int:
        if i is None or i is Ellipsis or isinstance(i, bool):
            return 0
        if isinstance(i, _Tensor) and i.dtype in (torch.bool, torch.uint8):
            return i.dim()
        return 1

    specified = sum(width(i) for i in items)
    if specified > self.dim():
        raise IndexError(f"too many indices for tensor of dimension {self.dim()}")
    result, dim, tensors = self, 0, []

    def record(t: torch.Tensor) -> None:
        nonlocal dim
        tensors.extend([None] * (dim + 1 - len(tensors)))
        tensors[dim] = t
        dim += t.dim() if t.dtype in (torch.bool, torch.uint8) else 1

    for i in items:
        if i is None:
            result = _aten.unsqueeze.default(result, dim)
            dim += 1
        elif i is Ellipsis:
            dim += self.dim() - specified
        elif isinstance(i, bool):
            result = _aten.unsqueeze.default(result, dim)
            with torch._C.DisableTorchFunction(), torch._C._DisableTorchDispatch():
                t = torch.zeros(1 if i else 0, dtype=torch.long)  # boolToIndexingTensor
            record(EmulatedTensor(t, self.device))
        elif isinstance(i, slice):
            start, stop, step = i.start, i.stop, 1 if i.step is None else int(i.step)
            if step <= 0:
                raise ValueError("step must be greater than zero")
            size = result.shape[dim]
            if (start in (None, 0)) and (stop is None or stop >= size) and step == 1:
                dim += 1  # a full slice is no op (applySlice's shortcut)
                continue
            result = _aten.slice.Tensor(result, dim, start, stop, step)
            dim += 1
        elif isinstance(i, _Tensor):
            if i.dim() == 0 and not i.dtype.is_floating_point and not i.dtype.is_complex:
                if i.dtype in (torch.bool, torch.uint8):
                    result = _aten.unsqueeze.default(result, dim)
                    record(i.reshape(1))
                else:
                    result = _aten.select.int(result, dim, int(_item(i)))
            else:
                record(i)
        else:
            result = _aten.select.int(result, dim, _operator_index(i))
    return result, tensors


def _operator_index(i) -> int:
    import operator

    try:
        return operator.index(i)
    except TypeError:
        raise IndexError(
            "only integers, slices (`:`), ellipsis (`...`), None and long or byte Variables are valid indices "
            f"(got {type(i).__name__})"
        ) from None


def _getitem(self, index):
    result, tensors = _index_parts(self, index)
    if tensors:
        return _aten.index.Tensor(result, tensors)
    return _aten.alias.default(result) if result is self else result


def _setitem(self, index, value) -> None:
    if not isinstance(value, _Tensor):
        # CUDA's setitem makes a Python number a 0-dim CPU tensor of self's dtype (no dispatch).
        with torch._C.DisableTorchFunction(), torch._C._DisableTorchDispatch():
            value = torch.scalar_tensor(value, dtype=self.dtype)
    result, tensors = _index_parts(self, index)
    if tensors:
        _aten.index_put_.default(result, tensors, _strip_leading_ones(value))
    elif tuple(result.shape) == tuple(value.shape):
        _aten.copy_.default(result, value)
    elif value.dim() == 0 and value.device.type == "cpu":
        _aten.fill_.Tensor(result, value)
    else:
        _aten.copy_.default(result, _aten.expand.default(_strip_leading_ones(value), list(result.shape)))


def _strip_leading_ones(value: torch.Tensor) -> torch.Tensor:
    shape = list(value.shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    return value if len(shape) == value.dim() else _aten.view.default(value, shape)


_METHODS: dict = {
    _Tensor.tolist: lambda self: self.to(CPU).tolist(),  # CUDA's tolist copies to the host first
    _Tensor.__int__: lambda self: int(_item(self)),
    _Tensor.__float__: lambda self: float(_item(self)),
    _Tensor.__complex__: lambda self: complex(_item(self)),
    _Tensor.__index__: _index,
    _Tensor.__invert__: lambda self: _aten.bitwise_not.default(self),
    _Tensor.contiguous: _contiguous,
    _Tensor.copy_: lambda self, src, non_blocking=False: _aten.copy_.default(self, src, non_blocking),
    _Tensor.nonzero: _nonzero,
    torch.nonzero: _nonzero,
    _Tensor.numpy: _numpy,
    _Tensor.__array__: lambda self, dtype=None, copy=None: _numpy(self),
    _Tensor.__getitem__: _getitem,
    _Tensor.__setitem__: _setitem,
}


# Calls that never record an autograd node, allowed on emulated tensors that require grad.
# fmt: off
_GRAD_FREE = frozenset([
    "detach", "detach_", "requires_grad_", "retain_grad", "size", "dim", "numel", "stride",
    "element_size", "is_contiguous", "data_ptr", "storage_offset", "get_device",
    "is_floating_point", "is_complex", "__repr__", "__format__", "__len__", "__hash__",
    "__deepcopy__", "__reduce_ex__", "_has_compatible_shallow_copy_type",
])
# fmt: on


def _records_graph(func, args, kwargs) -> bool:
    """Whether `func` could record an autograd node touching an emulated device: an input that
    requires grad, and an emulated input or a move to "cuda"."""
    if type(func).__name__ == "method-wrapper" or getattr(func, "__name__", "") in _GRAD_FREE:
        return False  # property getters and setters, metadata
    grad = cuda = False
    for a in (*args, *kwargs.values()):
        for x in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(x, _Tensor):
                grad = grad or x.requires_grad
                cuda = cuda or x.is_cuda
            elif func is _Tensor.to or func is _Tensor.cuda:
                cuda = cuda or _names_cuda(x)
    return grad and (cuda or func is _Tensor.cuda)


def _names_cuda(x) -> bool:
    if isinstance(x, torch.device):
        return x.type == "cuda"
    if isinstance(x, str):
        return x.startswith("cuda")
    return type(x) is int


def _indexed(a):
    """A device argument naming "cuda" without an index -> the current emulated device; n -> cuda:n."""
    if type(a) is int:
        return torch.device("cuda", a)
    if isinstance(a, str) and a == "cuda":
        return torch.device("cuda", _current_index())
    if isinstance(a, torch.device) and a.type == "cuda" and a.index is None:
        return torch.device("cuda", _current_index())
    return a


def _target(args, kwargs) -> torch.device | None:
    """The device a `.to(...)` / `.cuda(...)` call names (by position or `device=`), or None."""
    for a in (kwargs.get("device"), *args):
        if isinstance(a, (torch.device, str)):
            return _resolve(a)
        if isinstance(a, _Tensor):
            return a.device
    return None


def _check_generator(g, args, kwargs) -> None:
    device = kwargs.get("device")
    if device is not None:
        device = _resolve(device)
    else:
        device = next((a.device for a in args if isinstance(a, _Tensor)), CPU)
    gdev = _generator_device(g)
    if device.type != gdev.type:
        raise RuntimeError(f"Expected a '{device.type}' device type for generator but found '{gdev.type}'")


def _from_data(func, args, kwargs):
    device = kwargs.get("device")
    if func is _Tensor.new_tensor and device is None and isinstance(args[0], EmulatedTensor):
        device = args[0].device
    target = _resolve(device) if device is not None else None
    data = (
        args[1]
        if func is _Tensor.new_tensor
        else (args[0] if args else kwargs.get("data", kwargs.get("obj")))
    )
    if isinstance(data, _Tensor) and func in (torch.as_tensor, torch.asarray):
        dtype = kwargs.get("dtype")
        if target is None and dtype is None and not kwargs.get("copy"):
            return data
        out = data.to(device=target or data.device, dtype=dtype or data.dtype, copy=bool(kwargs.get("copy")))
        if kwargs.get("requires_grad"):
            out.requires_grad_(True)
        return out
    if target is None or target.type != "cuda":
        return func(*args, **kwargs)
    _check_ordinal(target)
    kw = dict(kwargs, device=CPU)
    requires_grad = kw.pop("requires_grad", False)
    pairs: list = []
    cargs = tuple(_unwrap(a, pairs) for a in args)
    with torch._C.DisableTorchFunction(), torch._C._DisableTorchDispatch():
        values = func(*cargs, **kw)  # on the CPU, unseen by dispatch modes (as CUDA's upload is)
    out = torch.ops.aten.lift_fresh.default(EmulatedTensor(values.detach(), target))
    if requires_grad:
        out.requires_grad_(True)
    return out


# ---- modules whose parameters cannot be swapped ----------------------------------------------------
# nn.Module._apply swaps a parameter for its emulated copy (swap_tensors: the copy is a wrapper
# subclass). A TorchScript module's C++ side holds its parameters too, so they cannot be swapped, and
# a lazy module's uninitialized parameters would lose what makes them lazy. On real CUDA both take
# `param.data = ...`; here they get what that path would leave.


def _script_module_apply(self, fn, recurse=True):
    """`RecursiveScriptModule._apply`: emulated parameters and buffers are set as new entries (the
    C++ module takes them), as `Module._apply` does for parameters it can neither swap nor set."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is None:
            continue
        with torch.no_grad():
            applied = fn(param)
        if isinstance(applied, EmulatedTensor):
            new = torch.nn.Parameter(applied, requires_grad=param.requires_grad)
            if param.grad is not None:
                with torch.no_grad():
                    new.grad = fn(param.grad)
            self._parameters[key] = new
        elif applied is not param:
            param.data = applied
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


def _lazy_to(t, device: torch.device):
    """`.to(emulated device)` of an uninitialized (lazy) parameter or buffer: it stays itself, and
    is materialized on that device."""
    t._emulated_device = device
    return t


def _materialize(real):
    """`UninitializedTensorMixin.materialize`: a lazy tensor moved to an emulated device is made on
    the CPU (its data can only be a CPU tensor), and `_move_materialized` moves it then."""

    def materialize(self, shape, device=None, dtype=None):
        target = device if device is not None else getattr(self, "_emulated_device", None)
        if target is None or _resolve(target).type != "cuda":
            return real(self, shape, device=device, dtype=dtype)
        with torch._C._DisableTorchDispatch():  # CUDA would make it on the device: no op to see here
            real(self, shape, device=CPU, dtype=dtype)
        self._emulated_device = _resolve(target)
        # The module whose `initialize_parameters` asks (as torch's lazy modules do) gets the
        # tensor on its device now, before it initializes the values.
        owner = sys._getframe(1).f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            _move_to_emulated(owner)

    return materialize


def _move_to_emulated(module: torch.nn.Module) -> None:
    """A lazy module's parameters and buffers materialized for an emulated device, moved there
    (set as new entries, as `Module._apply` does: other code may hold the old ones)."""
    for table in (module._parameters, module._buffers):
        for key, t in table.items():
            device = getattr(t, "_emulated_device", None)
            if device is None or isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
                continue
            moved = EmulatedTensor(t.detach(), device)
            if isinstance(t, torch.nn.Parameter):
                moved = torch.nn.Parameter(moved, requires_grad=t.requires_grad)
            table[key] = moved


def _move_materialized(real):
    """`LazyModuleMixin.has_uninitialized_params`, which a lazy module asks right after it has
    made its parameters: any made for an emulated device and still on the CPU are moved first."""

    def has_uninitialized_params(self):
        _move_to_emulated(self)
        return real(self)

    return has_uninitialized_params


def _has_torch_function(real):
    """`torch.overrides.has_torch_function`, which torch.nn's fast paths ask (MultiheadAttention,
    TransformerEncoder(Layer)): the emulation's own function mode does not count, so they take the
    path they take on real CUDA."""

    def has_torch_function(relevant_args) -> bool:
        stack = torch.overrides._get_current_function_mode_stack()
        if len(stack) == 1 and isinstance(stack[0], _ConstructorMode):
            with torch.overrides._pop_mode_temporarily():
                return real(relevant_args)
        return real(relevant_args)

    return has_torch_function


# ---- the context ---------------------------------------------------------------------------------

# The emulated CUDA entries of the per-device constant tables, kept between blocks.
_EMULATED_TABLES: dict[tuple, object] = {}
# GPU-only code paths switched off under the emulation: (module, attribute, replacement).
_GPU_ONLY = (("harness.quant.kernels", "supports", lambda *args, **kwargs: False),)


class EmulatedStream:
    """A stream of an emulated device: `torch.cuda.Stream(device, priority)`, each device's default
    one (`torch.cuda.current_stream()` until `torch.cuda.set_stream` / `torch.cuda.stream(s)`
    picks another). The emulation runs every op when it is called, so nothing is ever pending
    and no graph is being captured: waiting and querying are no-ops that answer "done"."""

    device_type = 1  # DeviceType.CUDA, as a real stream's

    def __init__(self, device=None, priority: int = 0, *, stream_id: int | None = None, **kwargs):
        self.device = _resolve(device if device is not None else "cuda")
        _check_ordinal(self.device)
        self.priority = priority
        self.stream_id = next(_STREAM_IDS) if stream_id is None else stream_id

    @property
    def device_index(self) -> int:
        return self.device.index

    @property
    def cuda_stream(self) -> int:
        return self.stream_id

    def __eq__(self, other) -> bool:
        return isinstance(other, EmulatedStream) and (self.device, self.stream_id) == (
            other.device,
            other.stream_id,
        )

    def __hash__(self) -> int:
        return hash((self.device, self.stream_id))

    def __repr__(self) -> str:
        return f"<EmulatedStream device={self.device} stream_id={self.stream_id}>"

    def __enter__(self):  # `with stream:` (torch.Stream's own context manager)
        self._previous = _ACTIVE._stream(self.device)
        _ACTIVE._set_stream(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE._set_stream(self._previous)

    def is_capturing(self) -> bool:
        return False

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event if event is not None else EmulatedEvent()
        event.record(self)
        return event

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return 0, -1  # (lowest, highest), as CUDA answers


_STREAM_IDS = itertools.count(1)  # 0: each device's default stream


class EmulatedEvent:
    """`torch.cuda.Event()` of the emulation: recorded on a stream of an emulated device, always
    complete (nothing is pending), `elapsed_time` 0 ms (the emulation keeps no device clock)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self.device: torch.device | None = None

    def record(self, stream=None) -> None:
        self.device = (stream if stream is not None else _ACTIVE._stream()).device

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event) -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        return 0.0


@dataclass(frozen=True)
class EmulatedDeviceProperties:
    """`torch.cuda.get_device_properties()` of an emulated device."""

    name: str
    major: int
    minor: int
    total_memory: int
    index: int
    multi_processor_count: int = 1
    is_integrated: bool = False
    is_multi_gpu_board: bool = False


class EmulatedCuda:
    """`with EmulatedCuda(device_count=2):` CUDA devices cuda:0..cuda:N-1 emulated on the CPU.

    See the module doc. `device_count` >= 1. Not re-entrant; one at a time per process.
    """

    def __init__(self, device_count: int = 1, capability: tuple[int, int] = (8, 0), memory_gib: float = 16.0):
        if not isinstance(device_count, int) or device_count < 1:
            raise ValueError(f"EmulatedCuda: device_count must be a positive integer, got {device_count!r}")
        self.device_count = device_count
        self.capability = tuple(capability)  # what get_device_capability() answers (sm_80 by default)
        self.total_memory = int(memory_gib * (1 << 30))  # what get_device_properties/mem_get_info say
        self.current = 0
        self._streams: dict[int, EmulatedStream] = {}  # each device's current stream, if not its default
        self._mode: _EmulationMode | None = None
        self._fmode: _ConstructorMode | None = None
        self._patches: list[tuple[object, str, object]] = []
        self._real_tables: dict[tuple, object] = {}  # real CUDA constant tables, aside while active
        self._real_cuda = False
        self._autograd = False
        self._engine = None
        self._untraced_paths = False  # untraced_paths installed by this block
        self._only_lift_cpu: bool | None = None

    # -- torch.cuda stand-ins --------------------------------------------------------------------

    def _set_device(self, device) -> None:
        d = _resolve(device)
        if d.type == "cuda":
            _check_ordinal(d)
            self.current = d.index

    def _exchange_device(self, index: int) -> int:
        prev = self.current
        if index is not None and index >= 0:
            self._set_device(index)
        return prev

    def _stream(self, device=None) -> EmulatedStream:
        index = self._device_index(device)
        return self._streams.get(index) or EmulatedStream(index, stream_id=0)

    def _default_stream(self, device=None) -> EmulatedStream:
        return EmulatedStream(self._device_index(device), stream_id=0)

    def _set_stream(self, stream) -> None:
        if stream is not None:
            self._streams[stream.device.index] = stream

    @contextlib.contextmanager
    def _current_within(self, index):
        """`torch.accelerator.device_index(i)`: device i is the current one inside (None: no change)."""
        before = self._exchange_device(index if index is not None else -1)
        try:
            yield
        finally:
            self.current = before

    def _synchronize(self, device=None) -> None:
        if self._real_cuda:
            self._real["synchronize"]()

    def _get_device_name(self, device=None) -> str:
        return "Emulated CUDA (CPU)"

    def _device_index(self, device) -> int:
        if device is None:
            return self.current
        d = _resolve(device)
        _check_ordinal(d)
        return d.index

    def _get_device_properties(self, device=None) -> EmulatedDeviceProperties:
        index = self._device_index(device)
        major, minor = self.capability
        return EmulatedDeviceProperties(
            name=self._get_device_name(),
            major=major,
            minor=minor,
            total_memory=self.total_memory,
            index=index,
        )

    def _get_device_capability(self, device=None) -> tuple[int, int]:
        self._device_index(device)
        return self.capability

    def _mem_get_info(self, device=None) -> tuple[int, int]:
        self._device_index(device)
        return self.total_memory, self.total_memory

    # -- entering and leaving ----------------------------------------------------------------------

    def __enter__(self) -> EmulatedCuda:
        global _ACTIVE
        with _LOCK:
            if _ACTIVE is not None:
                raise RuntimeError("EmulatedCuda is already active; it does not nest")
            _ACTIVE = self
        try:
            self._enter()
        except BaseException:
            self._exit()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._exit()

    def _patch(self, obj, name: str, value) -> None:
        self._patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def _enter(self) -> None:
        cuda = torch.cuda
        self._real = {"synchronize": cuda.synchronize}
        self._real_cuda = torch.backends.cuda.is_built() and cuda.is_available()
        if self._real_cuda:
            cuda.init()  # so the C++ lazy-init flag is set by a real initialisation
        else:
            self._patch(cuda, "_lazy_init", lambda: None)
        self._patch(cuda, "is_available", lambda: True)
        self._patch(cuda, "device_count", lambda: self.device_count)
        self._patch(cuda, "current_device", lambda: self.current)
        self._patch(cuda, "set_device", self._set_device)
        self._patch(cuda, "_exchange_device", self._exchange_device)
        self._patch(cuda, "_maybe_exchange_device", self._exchange_device)
        self._patch(cuda, "synchronize", self._synchronize)
        # Without a GPU each device has one stand-in stream; with one, real streams keep ordering real work.
        stream = cuda.current_stream if self._real_cuda else self._stream
        if not self._real_cuda:
            self._patch(cuda, "current_stream", self._stream)
            self._patch(cuda, "default_stream", self._default_stream)
            self._patch(cuda, "set_stream", self._set_stream)
            self._patch(cuda, "Stream", EmulatedStream)
            self._patch(cuda, "Event", EmulatedEvent)
            self._patch(cuda, "is_current_stream_capturing", lambda: False)
            self._patch(_Tensor, "record_stream", _record_stream(_Tensor.record_stream))
            self._patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
            self._patch(cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
            self._patch(cuda, "get_rng_state_all", lambda: [torch.get_rng_state()] * self.device_count)
            self._patch(cuda, "reset_peak_memory_stats", lambda device=None: None)
            self._patch(cuda, "memory_summary", lambda device=None, abbreviated=False: "")
            for name in ("range_push", "range_pop", "mark", "range_start", "range_end"):
                self._patch(cuda.nvtx, name, lambda *args, **kwargs: 0)  # profiler marks: nothing to mark
        self._patch(cuda, "get_device_name", self._get_device_name)
        self._patch(cuda, "get_device_properties", self._get_device_properties)
        self._patch(cuda, "get_device_capability", self._get_device_capability)
        self._patch(cuda, "mem_get_info", self._mem_get_info)
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
            self._patch(cuda, name, lambda device=None: 0)  # the values live in host memory
        self._patch(cuda, "empty_cache", lambda: None)
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None:  # the device-generic API (torch >= 2.6) answers for CUDA
            for name, value in (
                ("current_accelerator", lambda check_available=False: torch.device("cuda")),
                ("is_available", lambda: True),
                ("device_count", lambda: self.device_count),
                ("current_device_index", lambda: self.current),
                ("current_device_idx", lambda: self.current),
                ("set_device_index", self._set_device),
                ("set_device_idx", self._set_device),
                ("device_index", self._current_within),
                ("synchronize", self._synchronize),
                ("current_stream", stream),
                *((("set_stream", self._set_stream),) if not self._real_cuda else ()),
                ("get_memory_info", self._mem_get_info),
                ("empty_cache", lambda: None),
            ):
                if hasattr(accelerator, name):
                    self._patch(accelerator, name, value)
        self._patch(torch, "Generator", EmulatedGenerator)
        self._patch(torch.jit.RecursiveScriptModule, "_apply", _script_module_apply)
        self._patch(
            torch.overrides, "has_torch_function", _has_torch_function(torch.overrides.has_torch_function)
        )
        lazy = torch.nn.parameter.UninitializedTensorMixin
        self._patch(lazy, "materialize", _materialize(lazy.materialize))
        mixin = torch.nn.modules.lazy.LazyModuleMixin
        self._patch(mixin, "has_uninitialized_params", _move_materialized(mixin.has_uninitialized_params))
        for module, name, value in _GPU_ONLY:
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            self._patch(mod, name, value)
        pool = concurrent.futures.ThreadPoolExecutor
        self._patch(pool, "submit", _submit_in_emulation(self, pool.submit))
        self._real_tables = TABLES.take("cuda")
        # Emulated entries of an earlier block are valid again (a model loaded there may be
        # traced here, its constants made at load).
        TABLES.give(_EMULATED_TABLES)
        # torch.tensor(data, device="cuda") outside the function mode: made on the CPU, lifted, then
        # moved by an op the dispatch mode sees (PyTorch's path for FakeTensorMode).
        self._only_lift_cpu = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        self._autograd = emulated_autograd.install_guard()
        self._engine = emulated_autograd.install_engine()
        untraced_paths.install()
        self._untraced_paths = True
        self._fmode = _ConstructorMode(self._autograd)
        self._fmode.__enter__()
        self._mode = _EmulationMode(self)
        _enter_at_bottom(self._mode)

    def _exit(self) -> None:
        global _ACTIVE
        try:
            if self._mode is not None:
                _exit_from_stack(self._mode)
                self._mode = None
            if self._fmode is not None:
                self._fmode.__exit__(None, None, None)
                self._fmode = None
        finally:
            if self._only_lift_cpu is not None:
                torch._C._set_only_lift_cpu_tensors(self._only_lift_cpu)
                self._only_lift_cpu = None
            if self._untraced_paths:
                untraced_paths.uninstall()
                self._untraced_paths = False
            if self._engine is not None:
                emulated_autograd.remove_engine(self._engine)
                self._engine = None
            if self._autograd:
                emulated_autograd.remove_guard()
                self._autograd = False
            for obj, name, value in reversed(self._patches):
                setattr(obj, name, value)
            self._patches.clear()
            self._streams.clear()
            _EMULATED_TABLES.update(TABLES.take("cuda"))
            TABLES.give(self._real_tables)
            self._real_tables = {}
            self.current = 0
            with _LOCK:
                if _ACTIVE is self:
                    _ACTIVE = None


def _record_stream(real):
    """`Tensor.record_stream(stream)`: the emulation frees nothing early, so there is nothing to
    record for an emulated tensor or stream; real ones go to PyTorch."""

    def record_stream(self, stream):
        if isinstance(self, EmulatedTensor) or isinstance(stream, EmulatedStream):
            return None
        return real(self, stream)

    return record_stream


def _submit_in_emulation(ctx: EmulatedCuda, submit):
    """ThreadPoolExecutor.submit inside a block: the job runs under the block's modes in its worker
    thread too (torch's mode stacks are per thread, and transformers' from_pretrained moves weights
    to their devices in a thread pool)."""

    def submit_emulated(pool, fn, /, *args, **kwargs):
        def job(*a, **k):
            if _ACTIVE is not ctx:  # the block has ended
                return fn(*a, **k)
            with _ConstructorMode(ctx._autograd), _EmulationMode(ctx):
                return fn(*a, **k)

        return submit(pool, job, *args, **kwargs)

    return submit_emulated


def _plain_stack() -> list | None:
    """The dispatch-mode stack, bottom first, if it holds only ordinary modes (no infra modes)."""
    try:
        stack = list(_get_current_dispatch_mode_stack())
    except Exception:
        return None
    if any(getattr(m, "_mode_key", None) is not None or getattr(m, "_dispatch_key", None) for m in stack):
        return None
    return stack


def _enter_at_bottom(mode: TorchDispatchMode) -> None:
    """Enter `mode` and move it below the modes already on the stack (e.g. a tracer entered first)."""
    mode.__enter__()
    stack = _plain_stack()
    if not stack or len(stack) == 1 or stack[-1] is not mode:
        return
    others = [_pop_mode() for _ in range(len(stack))][1:]  # popped top first; drop `mode`
    _push_mode(mode)
    for m in reversed(others):
        _push_mode(m)


def _exit_from_stack(mode: TorchDispatchMode) -> None:
    """Leave `mode` wherever it is in the stack, keeping the others in their order."""
    stack = _plain_stack()
    if stack is None or mode not in stack or stack[-1] is mode:
        mode.__exit__(None, None, None)
        return
    above = []
    while True:
        top = _pop_mode()
        if top is mode:
            break
        above.append(top)
    _push_mode(mode)
    mode.__exit__(None, None, None)
    for m in reversed(above):
        _push_mode(m)
