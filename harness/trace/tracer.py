"""The tracer: every aten op of a run, with its module, weights, source line and devices.

A `TorchDispatchMode` sees each op; a stand-in for `nn.Module.__call__` while the tracer runs
(`_module_call`: what global forward hooks with `always_call=True` would do, around every module
call, without taking module calls off torch's hook-free fast path; the module stack stays right
when an op raises) says which module it belongs to. The event is made
before the op runs (an op that raises is recorded with its exception, which is re-raised
unchanged), classified when it is done, streamed to the trace file and dropped: the tracer keeps
counters, the first offence and small aggregates, never the events (unless `keep_events`).

Weights are known by identity: at the start the model's buffers are mapped to their GGUF names
(QMatMul, Embedding and RMSNorm by `gguf_name`, Experts by `gguf_names`), and the names follow a
weight through views and copies (`.T`, `raw[e]` picks one expert of a stack, `index_select` of a
stack keeps the stack's names, `.to()`), so the op that reads it names it.

Where modules should compute comes from a `ModulePlacement` (`harness.trace.placement`): given,
the model's own, or where its weights are when tracing starts. A copy across devices is allowed
only where something declares it (`Classifier.why_allowed`): the tracer tells the classifier
whether a copy moves the forward call's inputs or a weight (`Event.role`), and whether an
offloading hook made it (`Event.hook`). A download in the model's own forward is held until the
call returns: the result handed to the host if the call returns it (or a host tensor or numpy
array made from it), else a sync; such an event is written when the call ends. A TorchScript
model takes no hooks of its own: `_module_call` sees its calls. Under inference mode, autograd's decomposition of
composite ops does not happen before a dispatch mode sees them; the tracer runs their composite
kernels itself, so it sees the same ops, and gives the same verdict, in every grad mode.

A run is `clean` only when it ran ops inside the model, has no offence, and no error but device
errors left the model's forward or the `with` block (`summary.error`, verdict `error`); with no op
inside the model it is `inconclusive`. While a tracer records, `is_tracing()` is True.

Sampled mode (`sample_every=N`): forward call i of the model (0 is the prefill, then one per
decode step) is traced when i % N == 0. The ops of the other calls, up to the next call, are
skipped (`unsampled="skip"`: the mode and the module-call watch are taken off, nothing is paid
per op or module call) or only counted (`unsampled="count"`).
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import math
import os
import platform
import re
import sys
import sysconfig
import time
import weakref
from collections.abc import Callable, Mapping
from threading import get_ident
from typing import Any

import torch
from torch import Tensor
from torch._C import _pop_torch_dispatch_stack, _push_on_torch_dispatch_stack
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode,
    _pop_mode,
    _push_mode,
)

from harness.errors import UsageError
from harness.trace import untraced_paths
from harness.trace.classify import (
    HOST_WAIT,
    K_COPY_FROM,
    K_COPY_INTO,
    K_COPY_TO,
    K_INDEX_GET,
    K_INDEX_PUT,
    K_OTHER,
    K_UPLOAD,
    SYNC_UNLESS,
    Classifier,
    base_name,
    is_device_error,
    op_kind,
)
from harness.trace.events import (
    ALLOWED,
    CLASSES,
    CLEAN,
    DIRECTIONS,
    DIRTY,
    ERROR,
    INCONCLUSIVE,
    OFFENDING,
    OK,
    RAISED,
    Event,
    Summary,
    TensorSpec,
    direction,
    first_offence,
)
from harness.trace.placement import ModulePlacement, own_tensors
from harness.trace.routing import collect_routing
from harness.trace.store import BATCH, LINE_OPEN, TraceWriter, step_text

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TRACE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_HARNESS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_REPO_DIR = os.path.dirname(os.path.dirname(_HARNESS_DIR)) + os.sep
_STDLIB_DIRS = tuple(
    {
        os.path.join(sysconfig.get_paths()[k], "")
        for k in ("stdlib", "platstdlib")
        if sysconfig.get_paths().get(k)
    }
)

# Ops whose output is (a view or copy of) their first input: weight names follow them.
_FOLLOW = frozenset(
    {
        "_to_copy",
        "to",
        "clone",
        "contiguous",
        "alias",
        "detach",
        "lift_fresh",
        "lift_fresh_copy",
        "numpy_T",
        "t",
        "T",
        "mT",
        "reshape",
        "flatten",
        "unflatten",
        "index_select",
        "_unsafe_view",
        "view_as",
        "reshape_as",
        "expand_as",
    }
)
_SEQUENCES = (list, tuple)
_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


def _tensors_in(x, limit: int = 1 << 12, depth: int = 6):
    """The tensors a forward call's arguments or result hold, as deep as a user nests them:
    in dicts and other mappings (transformers' BatchEncoding, ModelOutput), lists, tuples, sets
    and dataclasses (a user's batch); numpy arrays are yielded too, in the order they stand.
    Other objects are not looked into: a cache object passed in (transformers' past_key_values)
    holds the model's state, whose uploads are the model's own, not the caller's inputs."""
    seen: set[int] = set()
    todo = [(x, 0)]
    while todo and len(seen) < limit:
        x, level = todo.pop()
        if isinstance(x, _LEAVES) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Tensor) or isinstance(getattr(x, "__array_interface__", None), dict):
            yield x
            continue
        if level >= depth or isinstance(x, (torch.nn.Module, type)) or callable(x):
            continue
        if isinstance(x, Mapping):
            items = x.values()
        elif isinstance(x, (list, tuple, set, frozenset)):
            items = x
        elif dataclasses.is_dataclass(x):
            items = (getattr(x, f.name, None) for f in dataclasses.fields(x))
        else:
            continue  # (not other objects' attributes: a KV cache passed in is state, not input)
        todo.extend((item, level + 1) for item in reversed(list(items)))  # (in their order)


_inference_mode_enabled = torch.is_inference_mode_enabled
_getframe = sys._getframe
_OUTSIDE = (None, None)  # (module path, expected device) outside the model
_MAX_STACK_FRAMES = 40
_SEEN_LIMIT = 1 << 14  # kinds of ok events whose line is kept (a few MiB at most)
_ACTIVE: list[Tracer] = []  # the tracers inside their `with` block


def is_tracing() -> bool:
    """Whether a `Tracer` is recording now. Code that would run CUDA graphs, Triton custom ops
    or other paths that hide aten ops from a dispatch mode runs eager instead while this is
    True, so that the trace sees every op (traces say `"eager": true` in their header)."""
    return bool(_ACTIVE)


def _grad_mode() -> str:
    if torch.is_inference_mode_enabled():
        return "inference_mode"
    return "grad" if torch.is_grad_enabled() else "no_grad"


# Ops that may copy across devices: the tracer tells the classifier what they copy.
_COPY_KINDS = frozenset((K_COPY_TO, K_COPY_INTO, K_COPY_FROM, K_UPLOAD, K_INDEX_GET, K_INDEX_PUT))


def _is_model_code(filename: str) -> bool:
    """A frame worth naming as the source: not torch, not the tracer, not the standard library."""
    if filename.startswith("<") or filename.startswith(_TORCH_DIR) or filename.startswith(_TRACE_DIR):
        return False
    return not (filename.startswith(_STDLIB_DIRS) and "site-packages" not in filename)


def _short_path(filename: str) -> str:
    if filename.startswith(_REPO_DIR):
        return filename[len(_REPO_DIR) :]
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return platform.processor() or platform.machine() or "cpu"
    if device.type == "cuda":
        try:
            if torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count():
                return torch.cuda.get_device_name(device.index or 0)
        except Exception:  # an emulated accelerator may answer in its own way
            return "unknown"
        return "emulated"
    return device.type


# Ops that return their input itself when there is nothing to do (else a new tensor).
_MAYBE_SELF = frozenset({"to", "contiguous", "_to_copy", "clone", "lift_fresh"})
# In-place ops that compute nothing (`torch.tensor(...)` under inference mode ends with `detach_`).
_NO_COMPUTE = frozenset({"detach_", "requires_grad_"})

_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_BACKEND_KERNEL: dict[tuple[str, str], bool] = {}  # (op, device type) -> has a kernel of its own


def _backend_kernel(func, device_type: str) -> bool:
    """Whether `func` has a kernel of its own for the device type, which autograd runs rather
    than its composite kernel (as torch's `autograd_would_have_decomposed` tells)."""
    key = (func.name(), device_type)
    found = _BACKEND_KERNEL.get(key)
    if found is None:
        backend = torch._C._parse_dispatch_key(torch._C._dispatch_key_for_device(device_type))
        found = _BACKEND_KERNEL[key] = bool(
            backend is not None and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), backend)
        )
    return found


class _SpecCache(dict):
    """(device, dtype, shape) -> the interned TensorSpec."""

    def __missing__(self, key):
        if len(self) > 1 << 16:
            self.clear()
        device, dtype, shape = key
        nbytes = math.prod(shape) * dtype.itemsize
        spec = self[key] = TensorSpec(str(device), str(dtype).removeprefix("torch."), shape, nbytes)
        return spec

    def of(self, raw) -> tuple[TensorSpec, ...]:
        """The specs of tensors given flat, as the hot path gathers them: device, dtype, shape of
        each, one after another."""
        it = iter(raw)
        return tuple([self[key] for key in zip(it, it, it, strict=True)])


# Shared by every tracer of the process (a spec depends on its key alone): a tracer started again
# on the same model makes none anew.
_SPECS = _SpecCache()

_TENSOR, _LIST = 1, 2


class _ArgKinds(dict):
    """An argument's class -> _TENSOR (torch.Tensor or a subclass), _LIST (exactly a list or a
    tuple, which may hold tensors) or 0, worked out once per class: `isinstance(x, Tensor)`
    takes a slow path for every object that is not exactly a torch.Tensor (an int, a
    Parameter), about 80 ns."""

    def __missing__(self, cls):
        if len(self) > 1 << 12:
            self.clear()
        kind = self[cls] = _TENSOR if issubclass(cls, Tensor) else _LIST if cls in _SEQUENCES else 0
        return kind


_KINDS = _ArgKinds()


_DEVICE_NAME = re.compile(r"\b(?:cpu|meta|cuda:\d+)\b")


def _frame_text(code, lineno: int) -> str:
    """ "file:line in function: the line's code" of a stack frame."""
    text = _source_text(code, lineno)
    line = linecache.getline(code.co_filename, lineno).strip()
    return f"{text}: {line}" if line else text


def _caller(depth: int):
    """The frame `depth` calls above the function that calls this (`sys._getframe(depth)` there),
    or None where the stack is not that deep: ops that autograd's device threads run straight
    from C++ (a backward on CUDA) have no Python caller."""
    try:
        return sys._getframe(depth + 1)
    except ValueError:
        return None


def _live_frames(frame) -> list[tuple[Any, int]]:
    """(code, line) of `frame` and its callers, outermost first."""
    frames = []
    while frame is not None:
        frames.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    frames.reverse()
    return frames


def _stack_text(frames: list[tuple[Any, int]]) -> list[str]:
    """The innermost frames as text, outermost first, without torch and tracer frames."""
    kept = [(c, n) for c, n in frames if not c.co_filename.startswith((_TORCH_DIR, _TRACE_DIR))]
    return [_frame_text(c, n) for c, n in kept[-_MAX_STACK_FRAMES:]]


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:2000]}"


def _source_text(code, lineno: int) -> str:
    return f"{_short_path(code.co_filename)}:{lineno} in {getattr(code, 'co_qualname', code.co_name)}"


class _OpInfo:
    """What the hot path needs to know of an op, worked out once per op.

    `alias`: the op only makes a view (computes nothing), `maybe_self`: it does when it returns
    its input, `follow`: weight names go from its first input to its output, `plain`: an op
    with no rule of its own (not a copy, sync or index op), classified by devices alone."""

    __slots__ = (
        "name",
        "op",
        "call",
        "alias",
        "maybe_self",
        "follow",
        "copy_to",
        "plain",
        "sync_unless",
        "kind",
        "copies",
        "non_blocking_at",
        "composite",
        "backend_kernel",
    )

    def __init__(self, func):
        self.name = str(func)
        self.op = func  # (kept alive: `_OPS` is keyed by its id)
        self.call = getattr(func, "_op", func)  # OpOverload.__call__ is a Python frame around _op
        base = base_name(self.name)
        try:
            is_view = bool(func.is_view)
        except Exception:
            is_view = False
        in_place = base.endswith("_") and not base.endswith("__")
        self.maybe_self = base in _MAYBE_SELF
        self.alias = (is_view and not in_place and not self.maybe_self) or base in _NO_COMPUTE
        # A CompositeImplicitAutograd op (`aten.linear`, `aten.to`, ...): autograd decomposes it
        # before a dispatch mode sees it, except under inference mode, where the tracer does.
        # (Its C++ kernel, as autograd runs it; Python decompositions some ops also have, such as
        # one_hot's, differ: they check on the host.)
        try:
            self.composite = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE)
        except Exception:
            self.composite = False
        self.backend_kernel: dict[torch.device, bool] = {}  # device -> `_backend_kernel`, worked out once
        self.follow = (is_view and not in_place) or base in _FOLLOW
        kind = op_kind(self.name)
        self.copy_to = kind == K_COPY_TO
        # With every tensor on the module's own device, these are ok without further ado (a copy
        # that crosses no device is no transfer); sync and index ops are, on the CPU.
        self.plain = kind in (K_OTHER, K_COPY_TO, K_COPY_INTO, K_COPY_FROM)
        self.sync_unless = SYNC_UNLESS.get(self.name)  # (args, kwargs) -> whether it reads the device
        self.kind = kind
        self.copies = kind in _COPY_KINDS
        # where `non_blocking` sits among the positional arguments (`aten.to.device` has it
        # third; under inference mode the dispatch mode sees `aten.to` rather than `_to_copy`)
        self.non_blocking_at = None
        try:
            names = [a.name for a in func._schema.arguments if not a.kwarg_only]
            self.non_blocking_at = names.index("non_blocking")
        except (AttributeError, ValueError):
            pass


_OPS: dict[int, _OpInfo] = {}  # id(op) -> its _OpInfo, for every tracer (`_op_info`)


def _op_info(func) -> _OpInfo:
    """The `_OpInfo` of an op, worked out once per process (it keeps the op, so the id stays its
    own: a custom op of a library that is gone is not mistaken for a new one)."""
    info = _OPS[id(func)] = _OpInfo(func)
    return info


@untraced_paths.stands_for_plain
class Tracer(TorchDispatchMode):
    """Records every aten op run inside `with Tracer(model, path=...) as tracer:`.

    - `model`: the model (a `Mixtral`, or any module; its submodule paths name the events);
    - `placement`: where each module should compute (`harness.trace.placement`): a device, a
      dict {module-path prefix: device}, a harness `Placement`; by default the model's own
      (a Mixtral's) or where each module's parameters and buffers are when tracing starts;
      `{}` for no expectations (no op is then stray);
    - `allow_transfers`: copies across devices the user declares: module-path prefixes, or a
      predicate `(event) -> bool` (`harness.trace.classify.allowance`);
    - `path`: JSON Lines file written as the run goes (header, events, summary); None for none;
    - `sample_every`, `unsampled`: sampled mode (see the module doc);
    - `keep_events`: also keep the events in `tracer.events` (small runs, tests);
    - `max_stacks`: the Python stack is kept for the first this many offending events;
    - `routing`: also count tokens per expert per layer (`harness.trace.routing`), for every
      forward call, sampled or not, into `summary.routing`;
    - `header`: extra fields for the header record.

    After the block, `tracer.summary` is the `Summary`; `tracer.verdict` its `Verdict`: "clean",
    "dirty", "error" (the run raised an error that is not a device error) or "inconclusive" (no op
    ran inside the model).
    The tracer is itself the dispatch mode (a mode calling back into it costs a call per op).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps __torch_dispatch__ in a dynamo-disabling shim (about 0.5 us an op); the
        # tracer traces eager runs, where there is no dynamo to keep out.
        return False

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        placement=None,
        path: str | os.PathLike | None = None,
        *,
        sample_every: int = 1,
        unsampled: str = "skip",
        keep_events: bool = False,
        max_stacks: int = 64,
        header: dict[str, Any] | None = None,
        routing: bool = False,
        allow_transfers=None,
    ):
        if not isinstance(sample_every, int) or sample_every < 1:
            raise UsageError(None, "sample_every", f"must be a positive integer, got {sample_every!r}")
        if unsampled not in ("skip", "count"):
            raise UsageError(None, "unsampled", f"must be 'skip' or 'count', got {unsampled!r}")
        super().__init__()
        self.model = model
        self.placement_given = placement
        # Resolved when tracing starts (a default placement is where the weights are then).
        self.placement: ModulePlacement | None = None
        self.allow_transfers = allow_transfers
        self.path = path
        self.sample_every = sample_every
        self.unsampled = unsampled
        self.keep_events = keep_events
        self.max_stacks = max_stacks
        self.routing = routing
        self._routing = None  # (context manager, RoutingCounts) while the block runs
        self.extra_header = dict(header or {})
        self.classifier = Classifier(None, allow_transfers)  # checks allow_transfers now
        prefixes = [p for p in getattr(self.classifier.allow, "prefixes", ()) if p]
        if model is not None and prefixes:
            paths = {path for path, _ in model.named_modules()}
            for p in prefixes:
                if p not in paths:
                    raise UsageError(None, f"allow_transfers[{p!r}]", "the model has no module of that path")
        self.events: list[Event] = []
        self._summary: Summary | None = None
        self._active = False
        self._reset()

    # -- state ---------------------------------------------------------------------------

    def _reset(self) -> None:
        self._seq = 0
        self._step = 0
        self._step_text = step_text(0)  # the piece of an event line after its seq (`_set_step`)
        self._calls = 0
        self._stack: list[tuple[str | None, str | None]] = []  # (module path, its device)
        self._recording = True
        self._skipping = False
        self._mode_popped = False
        self._unrecorded = 0
        self._steps_traced = 0
        self._steps_skipped = 0
        self._counts = dict.fromkeys(CLASSES, 0)
        self._first: dict | None = None
        self._stacks_kept = 0
        self._transfers: dict[tuple, list[int]] = {}
        self._modules: dict[tuple, int] = {}
        self._weights: dict[int, tuple] = {}
        # id(code) -> {lasti: text}, False where not model code; `_codes` keeps those codes alive
        self._sources: dict[int, dict[int, str] | bool] = {}
        self._codes: list = []
        self._expected: dict[str | None, str | None] = {}
        self._hooks: list = []
        self._watching = False  # whether module calls go through `_module_call` to this tracer
        self._resumed_root = False  # `_resume` pushed the model's path: `_root_post` pops it
        self._writer: TraceWriter | None = None
        self._write: Callable[[str], None] | None = None
        self._lines: list[str] | None = None  # the writer's line buffer
        self._encode: Callable[[Event], str] | None = None
        self._specs = _SPECS
        self._seen: dict[tuple, list | bool] = {}  # kinds of event: [line body, count] of ok ones, else False
        self._last: dict[
            tuple, tuple
        ] = {}  # (op, module, source, ...) -> (raw, its `_seen` entry), the latest
        self._fast = not self.keep_events
        self._t0 = 0.0
        self._thread: int | None = None  # the thread that entered the tracer
        self._seen_errors: set[int] = set()  # ids of exceptions already recorded
        self._routing_record: dict | None = None
        self._inputs: dict[int, weakref.ref] = {}  # the tensors of the current forward call's arguments
        self._error: dict | None = None  # an error (not a device error) that the run raised
        self._last_error: tuple[int, dict] | None = None  # the latest one seen leaving a module
        self._hooked = False  # whether some module has an offloading hook (accelerate's)
        self._root_by_global = False  # a TorchScript model: its calls are seen by `_module_call`
        self._patched: list[tuple[object, str, object]] = []  # (owner, name, the real one)
        self._grad_mode = _grad_mode()
        # Bytes copied inside the model: direction -> bytes, in the first traced call and after it.
        self._moved = {"first": dict.fromkeys(DIRECTIONS, 0), "later": dict.fromkeys(DIRECTIONS, 0)}
        self._offload = 0
        self._tokens = {"first": 0, "later": 0, "calls_later": 0}
        # Downloads in the model's own forward, held until the call returns: allowed if it
        # returns them (or tensors the forward made from them on the host), else offences.
        self._downloads: list[tuple[Event, list[str]]] = []
        self._downloaded: dict[int, tuple[weakref.ref, int]] = {}  # tensor id -> (tensor, download)

    def _build_maps(self) -> None:
        self._paths: dict[torch.nn.Module, tuple[str, str | None]] = {}  # module -> (path, device)
        self._activation_outputs: set[torch.nn.Module] = set()  # those whose outputs_activations is set
        self._params: dict[int, weakref.ref] = {}  # every parameter and buffer of the model
        self._n_weights = 0
        model = self.model
        self.placement = ModulePlacement.of(model, self.placement_given)
        self.classifier = Classifier(self.placement, self.allow_transfers)
        if model is None:
            return
        for path, module in model.named_modules():
            self._paths[module] = (path, self._expected_device(path))
            if _module_attr(module, "outputs_activations", False):
                self._activation_outputs.add(module)
            if _module_attr(module, "_hf_hook") is not None:
                self._hooked = True
            names = _module_attr(module, "gguf_names")
            if isinstance(names, dict):
                for attr, ns in names.items():
                    t = getattr(module, attr, None)
                    if isinstance(t, torch.Tensor):
                        self._remember(t, tuple(ns))
            name = _module_attr(module, "gguf_name")
            if isinstance(name, str):
                for _, t in own_tensors(module):
                    self._remember(t, (name,))
        # Every parameter and buffer is a weight to the transfer policy; a model without GGUF
        # names has its weights named by their state-dict names.
        named = bool(self._weights)
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if t is not None:
                self._params[id(t)] = weakref.ref(t)
                if not named:
                    self._remember(t, (name,))
        self._n_weights = len(self._weights)

    def _remember(self, t: torch.Tensor, names: tuple[str, ...]) -> None:
        # A dead entry is harmless (its weakref no longer gives the tensor of that id) and is
        # swept at the end of a forward call.
        self._weights[id(t)] = (weakref.ref(t), names)

    def _sweep_weights(self) -> None:
        if len(self._weights) > 2 * self._n_weights + 256:
            self._weights = {k: e for k, e in self._weights.items() if e[0]() is not None}

    def _expected_device(self, module: str | None) -> str | None:
        if module in self._expected:
            return self._expected[module]
        device = self.placement.device_of(module) if module and self.placement is not None else None
        self._expected[module] = device
        return device

    def _header(self) -> dict[str, Any]:
        model, placement = self.model, self.placement
        config = getattr(model, "config", None)
        header: dict[str, Any] = {
            "model": getattr(model, "gguf_path", None),
            "model_class": type(model).__name__ if model is not None else None,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "sample_every": self.sample_every,
            "unsampled": self.unsampled,
            "grad_mode": self._grad_mode,
            "eager": True,  # under a tracer, `is_tracing()` is True: the model runs eager
        }
        if self.allow_transfers is not None:
            prefixes = getattr(self.classifier.allow, "prefixes", None)
            header["allow_transfers"] = list(prefixes) if prefixes is not None else repr(self.allow_transfers)
        if placement is not None:
            header["placement"] = placement.describe()
            # "inferred": where the weights were when tracing started (a weight left on the wrong
            # device is then where it is expected; give `placement=` to say where it belongs)
            header["placement_source"] = (
                "given"
                if self.placement_given is not None
                else "model"
                if hasattr(model, "placement")
                else "inferred"
            )
            header["devices"] = {d: _device_name(torch.device(d)) for d in placement.devices}
        mixtral = (
            self.placement_given if self.placement_given is not None else getattr(model, "placement", None)
        )
        if all(hasattr(mixtral, a) for a in ("embed", "layers", "head")):
            # a Mixtral's placement, as the report draws it
            header["placement"] = mixtral.describe()
            header["placement_full"] = {
                "embed": str(mixtral.embed),
                "layers": [str(d) for d in mixtral.layers],
                "head": str(mixtral.head),
            }
        header.update(self.extra_header)
        return header

    # -- entering and leaving ------------------------------------------------------------

    def __enter__(self) -> Tracer:
        if self._active:
            raise RuntimeError("this Tracer is already active")
        self._reset()
        self.events = []
        self._summary = None
        if isinstance(self.model, torch.jit.ScriptModule) and self.sample_every > 1:
            raise UsageError(
                None,
                "sample_every",
                "sampled mode needs forward hooks on the model, which a TorchScript module refuses",
            )
        self._build_maps()
        _warm_constants(self._params)
        self._thread = get_ident()
        if self.path is not None:
            self._writer = TraceWriter(self.path)
            self._writer.header(self._header())
            self._write = self._writer.write
            self._lines = self._writer.lines
            self._encode = self._writer.encode
        self._watch_modules()
        self._watch_host_waits()
        self._watch_backward()
        self._root_by_global = isinstance(self.model, torch.jit.ScriptModule)
        if self.model is not None and not self._root_by_global:
            self._hooks.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
            self._hooks.append(self.model.register_forward_hook(self._root_post, always_call=True))
        if self.routing and self.model is not None:
            collection = collect_routing(self.model)
            self._routing = (collection, collection.__enter__())
        self._t0 = time.perf_counter()
        untraced_paths.install()
        self._active = True
        super().__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None:
                self._escaped(exc)  # (raised outside every module of the model, if not recorded yet)
            if self._downloads:
                self._settle_downloads(None)
            if self._mode_popped:
                _push_mode(self)
                self._mode_popped = False
            super().__exit__(exc_type, exc, tb)
        finally:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            if self._active:
                untraced_paths.uninstall()
            self._active = False
            self._unwatch_modules()
            for owner, name, real in reversed(self._patched):
                setattr(owner, name, real)
            self._patched = []
            for h in self._hooks:
                h.remove()
            self._hooks = []
            if self._routing is not None:
                (collection, counts), self._routing = self._routing, None
                collection.__exit__(None, None, None)  # counts made now, outside the mode
                self._routing_record = counts.record()
            self._summary = self._make_summary()
            if self._writer is not None:
                self._writer.summary(self._summary)
                self._writer.close()
                self._write = None
                self._lines = None
            self._weights = {}
            self._paths = {}
            self._activation_outputs = set()
            self._params = {}
            self._inputs = {}

    def _watch_modules(self) -> None:
        if not self._watching:
            _watch_module_calls(self)
            self._watching = True

    def _watch_host_waits(self) -> None:
        """`torch.cuda.synchronize()`, `torch.accelerator.synchronize()` and a stream's or an
        event's `synchronize()` make the host wait for the device without a tensor op: while the
        tracer records, each call is an event (`HOST_WAIT`: a sync inside the model)."""
        cuda = torch.cuda
        accelerator = getattr(torch, "accelerator", None)
        owners = [(cuda, "synchronize"), (cuda.Stream, "synchronize"), (cuda.Event, "synchronize")]
        for owner, name in owners + [(accelerator, "synchronize")] * (accelerator is not None):
            real = getattr(owner, name, None)
            if real is None:
                continue

            def waits(*args, _real=real, **kwargs):
                if self._recording and get_ident() == self._thread:
                    self._host_wait(args[0] if args else kwargs.get("device"))
                return _real(*args, **kwargs)

            self._patched.append((owner, name, real))
            setattr(owner, name, waits)

    def _watch_backward(self) -> None:
        """A backward pass runs outside every module's forward: a device error raised there
        other than by an op (autograd's own checks of a gradient's device, of a hook's result)
        is recorded where `backward()` / `torch.autograd.grad()` was called, also when the caller
        catches it inside the `with` block."""
        for name in ("backward", "grad"):
            real = getattr(torch.autograd, name)

            def runs(*args, _real=real, **kwargs):
                try:
                    return _real(*args, **kwargs)
                except Exception as exc:
                    if self._recording and get_ident() == self._thread and is_device_error(_error_text(exc)):
                        self._raised(exc)
                    raise

            self._patched.append((torch.autograd, name, real))
            setattr(torch.autograd, name, runs)

    def _host_wait(self, on) -> None:
        """Records a host wait; `on`: the device, a stream or an event waited for, or None."""
        module, expected = self._stack[-1] if self._stack else _OUTSIDE
        frames = _live_frames(_caller(2))
        model = [(c, n) for c, n in frames if _is_model_code(c.co_filename)]
        source = _source_text(*model[-1]) if model else None
        ev = Event(self._seq, self._step, HOST_WAIT, module, expected, None, source, [])
        self._seq += 1
        ev.outputs = []
        device = getattr(on, "device", on)
        try:
            device = (
                torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
            )
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            ev.named_devices = [str(device)]
        except (RuntimeError, TypeError):
            ev.named_devices = []
        self._finish(ev, stack=_stack_text(frames))

    def _unwatch_modules(self) -> None:
        if self._watching:
            _unwatch_module_calls(self)
            self._watching = False

    # -- module hooks --------------------------------------------------------------------

    def _watched_call(self, call, module, args, kwargs):
        """`call(module, *args, **kwargs)` (the real `nn.Module.__call__`, or the next tracer's
        watch) with the module's path on this tracer's stack while it runs: what a global
        forward pre-hook and an always-called forward hook (`_post_hook`) would do, inline."""
        if get_ident() != self._thread:
            # (module calls of every thread come here; the mode sees only this thread's ops)
            return call(module, *args, **kwargs)
        entry = self._paths.get(module)
        stack = self._stack
        stack.append(entry if entry is not None else stack[-1] if stack else _OUTSIDE)
        if self._root_by_global and module is self.model:
            self._root_pre(module, args, {})  # a TorchScript model takes no hooks of its own
        try:
            output = call(module, *args, **kwargs)
        except Exception:
            # (as an always-called forward hook: the error is in `sys.exc_info()`; not if the
            # tracer stopped watching during the call, as a hook taken off is not called)
            if self._watching:
                self._post_hook(module, args, None)
            raise
        if self._watching:
            if output is None or self._root_by_global:
                self._post_hook(module, args, output)
            else:  # (`_post_hook`'s work for a call that returned, inline)
                if isinstance(output, Tensor) and (
                    module in self._activation_outputs
                    if entry is not None
                    else _module_attr(module, "outputs_activations", False)
                ):
                    self._weights.pop(id(output), None)
                if stack:
                    stack.pop()
        return output

    def _post_hook(self, module, args, output) -> None:
        if get_ident() != self._thread:
            return
        if output is None and self._recording:
            exc = sys.exc_info()[1]  # torch calls always_call hooks inside its `except` when forward raised
            if exc is not None:
                self._raised(exc, args)
        if isinstance(output, torch.Tensor) and (
            module in self._activation_outputs
            if module in self._paths
            else _module_attr(module, "outputs_activations", False)
        ):
            self._weights.pop(id(output), None)  # looked-up rows of a table are activations, not the weight
        if self._stack:
            self._stack.pop()
        if self._root_by_global and module is self.model:
            self._root_post(module, args, output)

    def _root_pre(self, module, args, kwargs) -> None:
        if get_ident() != self._thread:
            return
        step = self._calls
        self._calls += 1
        self._set_step(step)
        self.classifier.begin_call()
        if step % self.sample_every == 0:
            self._steps_traced += 1
            if self._skipping:
                self._resume()
            self._note_inputs(step, args, kwargs)
        else:
            self._steps_skipped += 1
            if not self._skipping:
                self._skip()

    def _set_step(self, step: int) -> None:
        self._step = step
        self._step_text = step_text(step)

    def _root_post(self, module, args, output) -> None:
        if get_ident() != self._thread:
            return
        if self._resumed_root:
            self._resumed_root = False
            self._post_hook(module, args, output)
        if output is None:
            exc = sys.exc_info()[1]  # torch calls always_call hooks inside its `except` when forward raised
            if exc is not None:
                self._escaped(exc)
        if self._downloads:
            self._settle_downloads(output)
        if not self._skipping:
            self._sweep_weights()
            if self._writer is not None:
                self._writer.flush()

    def _note_inputs(self, step: int, args, kwargs) -> None:
        """The tensors of a traced forward call's arguments (their uploads are the run's own)
        and its token ids: `input_ids`, else the first integer tensor argument."""
        inputs: dict[int, weakref.ref] = {}
        tokens = None
        for t in _tensors_in((args, kwargs)):
            if isinstance(t, Tensor):
                inputs[id(t)] = weakref.ref(t)
                if (
                    tokens is None
                    and not t.dtype.is_floating_point
                    and not t.dtype.is_complex
                    and t.dtype != torch.bool
                ):
                    tokens = t
        ids = kwargs.get("input_ids")
        if isinstance(ids, Tensor):
            tokens = ids
        self._inputs = inputs
        n = tokens.numel() if tokens is not None else 0
        if step == 0:
            self._tokens["first"] += n
        else:
            self._tokens["later"] += n
            self._tokens["calls_later"] += 1

    def _is_input(self, t) -> bool:
        """A tensor among the forward call's arguments, or a view of one."""
        for x in (t, getattr(t, "_base", None)):
            ref = self._inputs.get(id(x)) if x is not None else None
            if ref is not None and ref() is x:
                return True
        return False

    def _escaped(self, exc: BaseException) -> None:
        """An exception that left the model's forward or the `with` block: a device error is a
        mismatch (recorded where it was raised, if not yet); any other makes the run an error."""
        if is_device_error(_error_text(exc)):
            self._raised(exc)
            return
        if self._error is not None:
            return
        if self._last_error is not None and self._last_error[0] == id(exc):
            self._error = self._last_error[1]
        else:
            self._error = self._error_record(exc, None)

    def _error_record(self, exc: BaseException, module: str | None) -> dict:
        """{"error", "module", "source"} of an error: the innermost model frame of its traceback."""
        source = None
        t = exc.__traceback__
        while t is not None:
            if _is_model_code(t.tb_frame.f_code.co_filename):
                source = _source_text(t.tb_frame.f_code, t.tb_lineno)
            t = t.tb_next
        return {"error": _error_text(exc), "module": module, "source": source}

    def _skip(self) -> None:
        # `_pre_hook` has pushed the model's path for this call; `_post_hook` will not run.
        if self._watching and self._stack and self._stack[-1][0] == "":
            self._stack.pop()
        self._unwatch_modules()
        self._skipping = True
        self._recording = False
        if self.unsampled == "skip" and _get_current_dispatch_mode() is self:
            _pop_mode()
            self._mode_popped = True

    def _resume(self) -> None:
        if self._mode_popped:
            _push_mode(self)
            self._mode_popped = False
        self._watch_modules()
        # This call began unwatched: `_root_post` does what `_post_hook` would have done (pop it).
        self._stack.append(self._paths[self.model])
        self._resumed_root = True
        self._skipping = False
        self._recording = True

    # -- the hot path --------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Everything about the op is taken before it runs; an op that raises is recorded with
        # its exception. Written for speed: this runs for every op of the model.
        if not self._recording:
            self._unrecorded += 1
            return func(*args, **kwargs) if kwargs else func(*args)
        info = _OPS.get(id(func))  # (OpOverload.__hash__ is slow Python)
        if info is None:
            info = _op_info(func)
        if info.composite and _inference_mode_enabled():
            out = self._decompose(info, func, args, kwargs)
            if out is not NotImplemented:
                return out
        seq = self._seq
        self._seq = seq + 1

        # Tensor arguments (inside lists too): device, dtype and shape of each, flat in `raw`
        # (specs are made from them only for a kind of event not seen before), and the names of
        # weights among them.
        kinds = _KINDS
        weights = self._weights
        raw: list = []
        names = None
        try:
            for a in (*args, *kwargs.values()) if kwargs else args:
                cls = a.__class__
                kind = _TENSOR if cls is Tensor else kinds[cls]
                if kind == _TENSOR:
                    raw += (a.device, a.dtype, a.shape)
                    entry = weights.get(id(a))
                    if entry is not None and entry[0]() is a:
                        names = entry[1] if names is None else names + entry[1]
                elif kind == _LIST:
                    for b in a:
                        if kinds[b.__class__] == _TENSOR:
                            raw += (b.device, b.dtype, b.shape)
                            entry = weights.get(id(b))
                            if entry is not None and entry[0]() is b:
                                names = entry[1] if names is None else names + entry[1]
        except RuntimeError:  # a lazy module's uninitialized parameter, a nested tensor
            raw = [x for t in _tensor_args(args, kwargs) for x in _raw_key(t)]
        n_in = len(raw)

        stack = self._stack
        module, expected = stack[-1] if stack else _OUTSIDE

        # The innermost frame of model code (not torch, not the tracer): id(code) -> {instruction:
        # "file:line in function"} (a code object hashes its contents, its id is cheap; f_lasti
        # is cheap, f_lineno scans the line table).
        try:
            f = _getframe(1)  # the code that called the op
        except ValueError:  # none: an op that autograd's device threads run straight from C++
            f = None
        sources = self._sources
        source = None
        while f is not None:
            code = f.f_code
            at = sources.get(id(code))
            if at is None:
                at = self._source_table(code)
            if at is not False:
                source = at.get(f.f_lasti)
                if source is None:
                    source = at[f.f_lasti] = _source_text(code, f.f_lineno)
                break
            f = f.f_back

        try:
            out = info.call(*args, **kwargs) if kwargs else info.call(*args)
        except BaseException as exc:
            inputs = self._specs.of(raw)
            if names is not None and len(names) > 1 and is_device_error(str(exc)):
                names = self._names_elsewhere(args, kwargs, inputs) or names
            ev = Event(seq, self._step, info.name, module, expected, names, source, list(inputs))
            ev.error = _error_text(exc)
            if info.copy_to:
                ev.target = _target_device(args, kwargs)
            if info.copies and module is not None:
                self._copy_roles(ev, info, args, kwargs)
            self._finish(ev)
            self._seen_errors.add(id(exc))  # recorded at its op: not again as RAISED
            if not is_device_error(ev.error):  # the run's error, if it leaves the model
                self._last_error = (id(exc), {"error": ev.error, "module": module, "source": source})
            raise

        if self._downloaded and module == "":
            self._derive(args, kwargs, out)
        alias = info.alias
        cls = out.__class__
        kind = _TENSOR if cls is Tensor else kinds[cls]
        if kind == _TENSOR:
            try:
                raw += (out.device, out.dtype, out.shape)
            except RuntimeError:  # a nested tensor has no single shape
                raw += _raw_key(out)
            if info.maybe_self and args and out is args[0]:
                alias = True
            if names is not None and info.follow:
                self._follow(info, args, out)
        elif kind == _LIST or isinstance(out, _SEQUENCES):  # (a structseq too)
            first = None
            for o in out:  # (a loop, not a comprehension: that is a function call in Python 3.11)
                if kinds[o.__class__] == _TENSOR:
                    try:
                        raw += (o.device, o.dtype, o.shape)
                    except RuntimeError:
                        raw += _raw_key(o)
                    if first is None:
                        first = o
            if names is not None and info.follow and first is not None:
                self._follow(info, args, first)

        # The common case: an op that ran here before on these tensors and was found an
        # ordinary ok event then (see `_new_seen`); its line is the same as that time's. Most
        # often it is the same as the last op of this site (op, module, source line, weights):
        # a comparison of `raw` then, not a hash of it.
        if self._fast:
            site = (info, module, source, alias, names, n_in)
            last = self._last.get(site)
            if last is not None and last[0] == raw:
                seen = last[1]
            else:
                key = (*site, *raw)
                seen = self._seen.get(key)
                if seen is None:
                    seen = self._new_seen(key, expected)
                self._last[site] = (raw, seen)
            if seen is not False:
                seen[1] += 1
                lines = self._lines
                if lines is not None:
                    lines += (LINE_OPEN, str(seq), self._step_text, seen[0])
                    if len(lines) >= BATCH:
                        self._writer.drain()
                return out

        specs = self._specs
        ev = Event(seq, self._step, info.name, module, expected, names, source, list(specs.of(raw[:n_in])))
        ev.outputs = list(specs.of(raw[n_in:]))
        ev.alias = alias
        if info.sync_unless is not None:
            ev.waits = info.sync_unless(args, kwargs)
        elif info.copy_to and _non_blocking(info, args, kwargs):
            ev.waits = False  # a non-blocking copy to the host lands in pinned memory, asynchronously
        if info.copies and module is not None:
            self._copy_roles(ev, info, args, kwargs)
        self._finish(ev, out=out if module == "" else None)
        return out

    def _source_table(self, code) -> dict[int, str] | bool:
        """The table of source texts of a code object's instructions: {} to begin with, False
        for code that is not the model's (torch's, the tracer's, the standard library's)."""
        self._codes.append(code)  # (so that its id stays its own while the tracer runs)
        at = self._sources[id(code)] = {} if _is_model_code(code.co_filename) else False
        return at

    def _names_elsewhere(self, args, kwargs, inputs) -> tuple[str, ...] | None:
        """For an op refused for devices that reads many weights (a fused op, as the encoder
        layer's fast path): the names of the weights on a device that the op's other operands
        are not on (the device fewest operands are on), so the offence names the culprits."""
        counts: dict[str, int] = {}
        for spec in inputs:
            counts[spec.device] = counts.get(spec.device, 0) + 1
        if len(counts) < 2:
            return None
        odd = min(counts, key=counts.get)
        found: list[str] = []
        for t in _tensor_args(args, kwargs):
            entry = self._weights.get(id(t)) if str(t.device) == odd else None
            if entry is not None and entry[0]() is t:
                found.extend(entry[1])
        return tuple(found) or None

    def _copy_roles(self, ev: Event, info: _OpInfo, args, kwargs) -> None:
        """For an op that may copy across devices: whether what it copies is the run's input or a
        weight (`ev.role`), and whether an offloading hook made the copy (`ev.hook`)."""
        if len({s[0] for s in (*ev.inputs, *(ev.outputs or ()))}) < 2 and not (
            info.kind == K_UPLOAD and ev.inputs
        ):
            return  # crosses no device
        kind = info.kind
        if kind in (K_INDEX_GET, K_INDEX_PUT):
            moved = [
                t
                for t in (args[1] if len(args) > 1 and isinstance(args[1], _SEQUENCES) else ())
                if isinstance(t, Tensor)
            ]
        else:
            src = args[1] if kind == K_COPY_INTO and len(args) > 1 else (args[0] if args else None)
            moved = [src] if isinstance(src, Tensor) else []
        if moved and all(self._is_input(t) for t in moved):
            ev.role = "input"
        elif moved and any(self._is_weight(t) for t in moved):
            ev.role = "weight"
        if self._hooked:
            ev.hook = _offloading_hook(_caller(2))

    def _is_weight(self, t) -> bool:
        """A parameter or buffer of the model, a view of one, or a copy the names followed."""
        entry = self._weights.get(id(t))
        if entry is not None and entry[0]() is t:
            return True
        for x in (t, getattr(t, "_base", None)):
            ref = self._params.get(id(x)) if x is not None else None
            if ref is not None and ref() is x:
                return True
        return False

    def _decompose(self, info: _OpInfo, func, args, kwargs):
        """Runs a composite op as its decomposition, whose ops the tracer then sees, as it does
        outside inference mode: one verdict in every grad mode. NotImplemented where autograd
        would not have decomposed it either (a backend kernel of its own)."""
        # Its first tensor's device decides, as in the dispatcher.
        first = args[0] if args and isinstance(args[0], Tensor) else next(_tensor_args(args, kwargs), None)
        if first is not None:
            device = first.device
            own = info.backend_kernel.get(device)
            if own is None:
                own = info.backend_kernel[device] = _backend_kernel(func, device.type)
            if own:
                return NotImplemented
        _push_on_torch_dispatch_stack(self)  # the mode is off while its __torch_dispatch__ runs
        try:
            return func._op_dk(_COMPOSITE, *args, **kwargs) if kwargs else func._op_dk(_COMPOSITE, *args)
        finally:
            _pop_torch_dispatch_stack(None)

    def _new_seen(self, key: tuple, expected: str | None) -> list | bool:
        """[line body, count, its key in `_modules`] for a kind of event that is ok without
        further ado: an op with no rule of its own (not a sync or index op; a copy that crosses no
        device is no transfer), or any op of a CPU module, with every tensor on the module's
        device; outside the model (the caller's own ops between forward calls), such an op that the
        classifier finds ok. False for any other kind (it goes to the classifier every time)."""
        if len(self._seen) >= _SEEN_LIMIT:
            self._fold_seen()
        info, module, source, alias, names, n_in, *raw = key
        inputs, outputs = self._specs.of(raw[:n_in]), self._specs.of(raw[n_in:])
        if expected is not None:
            plain = (
                (info.plain or expected == "cpu")
                and all(spec[0] == expected for spec in inputs)
                and all(spec[0] == expected for spec in outputs)
            )
        else:
            plain = (
                module is None
                and info.plain
                and self._ok_outside(info, source, names, alias, inputs, outputs)
            )
        if not plain:
            self._seen[key] = False
            return False
        body = None
        if self._writer is not None:
            body = self._writer.ok_body(info.name, module, expected, source, inputs, outputs, names, alias)
        # (keyed in `_modules` as `_record` keys an event: by its first output's device, else input's)
        device = outputs[0][0] if outputs else (inputs[0][0] if inputs else None)
        seen = self._seen[key] = [body, 0, (module, device)]
        return seen

    def _ok_outside(self, info: _OpInfo, source, names, alias, inputs, outputs) -> bool:
        """Whether an op outside the model, with no rule of its own, is ok on these tensors: the
        classifier's answer (a copy across devices is allowed there, not ok; an op CUDA refuses
        is a mismatch), which outside the model depends on the op and its tensors alone."""
        ev = Event(0, 0, info.name, None, None, names, source, list(inputs))
        ev.outputs = list(outputs)
        ev.alias = alias
        return self.classifier.classify(ev) == OK and ev.transfer is None

    def _fold_seen(self) -> None:
        """Moves the counts of the fast path's ok events into the counters."""
        for seen in self._seen.values():
            if seen is not False:
                body, n, key = seen
                self._modules[key] = self._modules.get(key, 0) + n
                self._counts[OK] += n
        self._seen = {}
        self._last = {}  # (its entries are `_seen`'s)

    def _follow(self, info: _OpInfo, args, out: torch.Tensor) -> None:
        """The weight names of an op's first input go to its output (a view or copy of it)."""
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None:
            return
        entry = self._weights.get(id(src))
        if entry is None or entry[0]() is not src:
            return
        names = entry[1]
        if len(names) > 1 and len(args) >= 3 and type(args[1]) is int and args[1] == 0:
            base = base_name(info.name)
            if base == "select" and isinstance(args[2], int) and -len(names) <= args[2] < len(names):
                names = (names[args[2]],)
            elif base == "slice":
                start = args[2] if len(args) > 2 and isinstance(args[2], int) else None
                end = args[3] if len(args) > 3 and isinstance(args[3], int) else None
                step = args[4] if len(args) > 4 and isinstance(args[4], int) else 1
                names = names[start:end:step] or names
        if out is not src:
            self._remember(out, names)

    def _raised(self, exc: BaseException, args=()) -> None:
        """A device error that no aten op raised (a check in a composite op's C++ code, or in
        Python): recorded once, as a RAISED event of the module it came out of, with the source
        line and stack from its traceback, and the devices the error names (else those of the
        module's tensor arguments, `args`)."""
        if id(exc) in self._seen_errors:
            return
        self._seen_errors.add(id(exc))
        text = _error_text(exc)
        if not is_device_error(text):
            # Not a device error: the run is an error if it leaves the model (`_escaped`).
            module = self._stack[-1][0] if self._stack else None
            self._last_error = (id(exc), self._error_record(exc, module))
            return
        frames = _live_frames(_caller(2))  # the stack above the module, then the traceback
        t = exc.__traceback__
        while t is not None:
            frames.append((t.tb_frame.f_code, t.tb_lineno))
            t = t.tb_next
        model = [(c, n) for c, n in frames if _is_model_code(c.co_filename)]
        module, expected = self._stack[-1] if self._stack else _OUTSIDE
        source = _source_text(*model[-1]) if model else None
        ev = Event(self._seq, self._step, RAISED, module, expected, None, source, [])
        self._seq += 1
        ev.error = text
        named = _DEVICE_NAME.findall(str(exc))
        if not named:
            named = [str(a.device) for a in args if isinstance(a, torch.Tensor)]
        ev.named_devices = list(dict.fromkeys(named))
        self._finish(ev, stack=_stack_text(frames))

    def _finish(self, ev: Event, stack: list[str] | None = None, out=None) -> None:
        """Classifies an event and records it (a download in the model's own forward waits for
        the call's end: `_settle_downloads`)."""
        cls = self.classifier.classify(ev)
        if isinstance(out, Tensor) and cls == ALLOWED and ev.transfer.get("why") == "output":
            self._downloaded[id(out)] = (weakref.ref(out), len(self._downloads))
            self._downloads.append((ev, _stack_text(_live_frames(_caller(1)))))
            return
        self._record(ev, cls, stack, depth=2)

    def _derive(self, args, kwargs, out) -> None:
        """Host tensors the model's own forward makes from a held download (`out.float()`, a dict
        of them) count as that download, so that returning them returns it."""
        downloaded = self._downloaded
        for t in _tensor_args(args, kwargs):
            entry = downloaded.get(id(t))
            if entry is not None and entry[0]() is t:
                for o in out if isinstance(out, _SEQUENCES) else (out,):
                    if isinstance(o, Tensor) and o.device.type == "cpu":  # (not a round trip)
                        downloaded[id(o)] = (weakref.ref(o), entry[1])
                return

    def _settle_downloads(self, output) -> None:
        """At the end of a forward call: its held downloads that it returns (anywhere in what
        `_tensors_in` walks; as numpy arrays too) are the run's edge; the others are offences."""
        returned: dict[int, Tensor] = {}
        arrays = set()  # where returned numpy arrays keep their data (`.cpu().numpy()`)
        for x in _tensors_in(output):
            if isinstance(x, Tensor):
                returned[id(x)] = x
            else:
                arrays.add(x.__array_interface__["data"][0])
        kept = set()
        for key, (ref, index) in self._downloaded.items():
            t = ref()
            if t is not None and (returned.get(key) is t or (arrays and t.data_ptr() in arrays)):
                kept.add(index)
        downloads, self._downloads, self._downloaded = self._downloads, [], {}
        for index, (ev, stack) in enumerate(downloads):
            cls = ev.cls if index in kept else self.classifier.not_returned(ev)
            self._record(ev, cls, stack)

    def _record(self, ev: Event, cls: str, stack: list[str] | None, depth: int = 1) -> None:
        self._counts[cls] += 1
        if cls in OFFENDING:
            if self._stacks_kept < self.max_stacks:
                self._stacks_kept += 1
                ev.stack = stack if stack is not None else _stack_text(_live_frames(_caller(depth)))
            if self._first is None or ev.seq < self._first["seq"]:  # (a held download comes late)
                self._first = first_offence(ev)
                if ev.source:
                    self._first["code"] = _code_line(ev.source)
        if ev.transfer is not None:
            tr = ev.transfer
            why = tr.get("why")
            key = (tr["from"], tr["to"], cls, tr["explicit"], why, ev.module)
            agg = self._transfers.get(key)
            if agg is None:
                self._transfers[key] = [1, tr["bytes"]]
            else:
                agg[0] += 1
                agg[1] += tr["bytes"]
            if ev.module is not None:  # inside the model's forward: its traffic
                moved = self._moved["first" if ev.step == 0 else "later"]
                moved[direction(tr["from"], tr["to"])] += tr["bytes"]
                if why == "offload":
                    self._offload += tr["bytes"]
        outs = ev.outputs
        device = outs[0][0] if outs else (ev.inputs[0][0] if ev.inputs else None)
        key = (ev.module, device)
        self._modules[key] = self._modules.get(key, 0) + 1
        if self._write is not None:
            self._write(self._encode(ev))
        if self.keep_events:
            self.events.append(ev)

    # -- results -------------------------------------------------------------------------

    def _make_summary(self) -> Summary:
        self._fold_seen()
        counts = self.counts
        dirty = any(counts[c] for c in OFFENDING)
        modules: dict[str, dict[str, int]] = {}
        for (module, device), n in self._modules.items():
            name = "<outside>" if module is None else (module or "<model>")
            modules.setdefault(name, {})[str(device)] = n
        transfers = [
            {
                "from": src,
                "to": dst,
                "class": cls,
                "explicit": explicit,
                "why": why,
                "module": module,
                "count": n,
                "bytes": nbytes,
            }
            for (src, dst, cls, explicit, why, module), (n, nbytes) in self._transfers.items()
        ]
        events = sum(counts.values())
        inside = sum(n for (module, _), n in self._modules.items() if module is not None)
        if dirty:
            verdict = DIRTY
        elif self._error is not None:
            verdict = ERROR
        elif (inside if self.model is not None else events) == 0:
            verdict = INCONCLUSIVE
        else:
            verdict = CLEAN
        first, later = self._moved["first"], self._moved["later"]
        traffic = {
            "calls": self._steps_traced,
            "tokens": self._tokens["first"] + self._tokens["later"],
            "bytes": {d: first[d] + later[d] for d in DIRECTIONS},
            "decode_calls": self._tokens["calls_later"],
            "decode_tokens": self._tokens["later"],
            "decode_bytes": dict(later),
            "offload": self._offload,
        }
        return Summary(
            verdict=verdict,
            inside=inside,
            traffic=traffic,
            error=self._error,
            counts=counts,
            first_offence=self._first,
            events=events,
            steps={"traced": self._steps_traced, "skipped": self._steps_skipped},
            unrecorded=self._unrecorded,
            transfers=transfers,
            modules=modules,
            seconds=round(time.perf_counter() - self._t0, 6),
            routing=self._routing_record,
        )

    @property
    def summary(self) -> Summary:
        """The run's summary: final after the block, a snapshot inside it."""
        return self._summary if self._summary is not None else self._make_summary()

    @property
    def verdict(self) -> str:
        return self.summary.verdict

    @property
    def counts(self) -> dict[str, int]:
        counts = dict(self._counts)
        counts[OK] += sum(seen[1] for seen in self._seen.values() if seen is not False)
        return counts

    @property
    def first_offence(self) -> dict | None:
        return self._first

    @property
    def events_in_memory(self) -> int:
        """Events held in memory (0 unless `keep_events`)."""
        return len(self.events)

    def flush(self) -> None:
        if self._writer is not None and not self._writer.closed:
            self._writer.flush()


_TENSOR_BASE = torch._C.TensorBase


_MODULE_GETATTR = torch.nn.Module.__getattr__


def _module_attr(module: torch.nn.Module, name: str, default=None):
    """`getattr(module, name, default)`, without `nn.Module.__getattr__` raising (and formatting)
    an AttributeError for a name the module lacks, a few microseconds a module when a tracer
    starts: an instance or class attribute, else a parameter, buffer or submodule of that name
    (a class with its own `__getattr__` is asked as usual)."""
    cls = type(module)
    d = module.__dict__
    if name in d or cls.__getattr__ is not _MODULE_GETATTR or hasattr(cls, name):
        return getattr(module, name, default)
    for store in (d.get("_parameters"), d.get("_buffers"), d.get("_modules")):
        if store and name in store:
            return store[name]
    return default


def _raw_key(t: Tensor) -> tuple:
    """(device, dtype, shape) of a tensor that refuses `.shape`: read past Python overrides (a lazy
    module's uninitialized parameter is an empty tensor); a nested tensor (nn.TransformerEncoder's
    fast path with a padding mask) has no single shape: its elements, flat."""
    device, dtype = _TENSOR_BASE.device.__get__(t), _TENSOR_BASE.dtype.__get__(t)
    if _TENSOR_BASE.is_nested.__get__(t):
        return device, dtype, torch.Size([t.numel()])
    return device, dtype, _TENSOR_BASE.shape.__get__(t)


def _tensor_args(args, kwargs):
    for a in (*args, *(kwargs or {}).values()):
        for t in a if a.__class__ in _SEQUENCES else (a,):
            if isinstance(t, Tensor):
                yield t


# Tracers watching module calls, in the order they began to, and the `nn.Module.__call__` that
# `_module_call` stands in for while there is one.
_WATCHERS: list[Tracer] = []
_REAL_CALL: list[Callable] = []


def _watch_module_calls(tracer: Tracer) -> None:
    """Module calls go through `tracer._watched_call` (as global forward hooks
    would, without taking every module call off torch's fast path: a hook costs about 2 us a
    module call there, the stand-in `nn.Module.__call__` a fifth of that)."""
    if not _WATCHERS and torch.nn.Module.__call__ is not _module_call:
        _REAL_CALL[:] = [torch.nn.Module.__call__]
        torch.nn.Module.__call__ = _module_call
    _WATCHERS.append(tracer)


def _unwatch_module_calls(tracer: Tracer) -> None:
    _WATCHERS.remove(tracer)
    if not _WATCHERS and torch.nn.Module.__call__ is _module_call:  # (not if another has put theirs)
        torch.nn.Module.__call__ = _REAL_CALL[0]  # (kept: calls under way still go through it)


# torch's `nn.Module.__call__`: it calls the module's `_compiled_call_impl` if it has one, else its
# `_call_impl`, which `_module_call` then calls itself (a Python call fewer a module call).
_WRAPPED_CALL = getattr(torch.nn.Module, "_wrapped_call_impl", None)


def _module_call(module, *args, **kwargs):
    """`nn.Module.__call__` while tracers watch module calls."""
    watchers = _WATCHERS
    if len(watchers) == 1:
        call = _REAL_CALL[0]
        if call is _WRAPPED_CALL and module._compiled_call_impl is None:
            call = type(module)._call_impl
        return watchers[0]._watched_call(call, module, args, kwargs)
    return _call_watched(tuple(watchers), module, *args, **kwargs)


def _call_watched(watchers: tuple, module, *args, **kwargs):
    """A module call through the watch of each tracer in turn (the first outermost), then the
    real `nn.Module.__call__`."""
    if not watchers:
        return _REAL_CALL[0](module, *args, **kwargs)
    return watchers[0]._watched_call(functools.partial(_call_watched, watchers[1:]), module, args, kwargs)


def _warm_constants(params: dict[int, weakref.ref]) -> None:
    """Builds the per-device constant tables (`harness.device_tables.TABLES.warm`)
    for every device the model's weights are on, before tracing starts: a weight on a device
    the placement never planned would otherwise have them built in its first forward, and the
    first offence would be that one-time upload rather than the weight's own ops."""
    devices = {
        t.device
        for ref in params.values()
        if (t := ref()) is not None and t.device.type not in ("cpu", "meta")
    }
    if not devices:
        return
    from harness.device_tables import TABLES

    for device in devices:
        TABLES.warm(device)


def _non_blocking(info: _OpInfo, args, kwargs) -> bool:
    """Whether a copy was asked to be non-blocking (by keyword or by position)."""
    if kwargs and kwargs.get("non_blocking"):
        return True
    at = info.non_blocking_at
    return at is not None and len(args) > at and args[at] is True


_INTERPOSERS = frozenset(("__torch_function__", "__torch_dispatch__"))


def _offloading_hook(frame) -> str | None:
    """ "offload" when an offloading hook (accelerate's `AlignDevicesHook`) is moving a module's
    weights in or out (`set_module_tensor_to_device`), "boundary" when it moves the module's
    inputs or outputs to its execution device; None when no such hook made the copy. A copy
    that a module's own code makes (its forward runs inside the hook's `new_forward`) is the
    module's, not the hook's: the innermost frame that is neither torch's nor the tracer's must
    be accelerate's. Frames of `__torch_function__`/`__torch_dispatch__` handlers (a mode or a
    tensor subclass of anyone's) only pass the call on, so they are skipped."""
    weights = False
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename.replace(os.sep, "/")
        if code.co_name in _INTERPOSERS:
            pass
        elif "/accelerate/" in filename:
            if code.co_name == "set_module_tensor_to_device":
                weights = True
            elif filename.endswith("/accelerate/hooks.py"):
                return "offload" if weights else "boundary"
        elif _is_model_code(code.co_filename):
            return None  # the module's own code (or a user's) made this copy
        frame = frame.f_back
    return None


def _target_device(args, kwargs) -> str | None:
    """The device a `to`/`_to_copy` asks for (when it raised before making its output)."""
    candidates = list((kwargs or {}).values()) + list(args[1:])
    for a in candidates:
        if isinstance(a, torch.device):
            return str(a)
        if isinstance(a, str):
            try:
                return str(torch.device(a))
            except RuntimeError:
                continue
        if isinstance(a, torch.Tensor):
            return str(a.device)
    return None


def _code_line(source: str) -> str | None:
    """The text of "file:line in func"."""
    try:
        where = source.split(" in ", 1)[0]
        filename, lineno = where.rsplit(":", 1)
        path = filename if os.path.isabs(filename) else os.path.join(_REPO_DIR, filename)
        if not os.path.exists(path):
            path = filename
        return linecache.getline(path, int(lineno)).strip() or None
    except (ValueError, OSError):
        return None
