"""Autograd through emulated CUDA devices: forward graphs are recorded by PyTorch's own autograd,
backward passes are run by a small engine here.

Recording a graph asks the CUDA device guard for each node's stream. A CPU-only build has no CUDA
guard, so `install_guard()` puts a no-op one in its place for the duration of an `EmulatedCuda`
block (PyTorch's Python device guard of `torch._C._acc`, reporting the CUDA device type, the same
kind of stand-in FakeTensorMode uses on CUDA builds without a GPU). PyTorch's C++ engine then
still cannot run those graphs: it needs a CUDA stream for every CUDA gradient and asks the CUDA
runtime, which is absent. So under the emulation `torch.autograd.backward` and
`torch.autograd.grad` of a graph that reaches an emulated device run in `run_backward` below:
the nodes are PyTorch's own (each node's C++ backward is called), in dependency order, with
PyTorch's checks on each gradient (its device, dtype and shape against the node it flows into:
"returned an invalid gradient ... expected device"), accumulation into `.grad` by the leaves'
own AccumulateGrad nodes, hooks added with `Tensor.register_hook`, `retain_grad()`,
`create_graph`, `retain_graph` (a second backward through a freed graph raises as PyTorch does),
`inputs=`, and callbacks queued during the pass. Gradients of emulated tensors are emulated
tensors, and every op of the backward passes the emulation's device rules and any tracer.

Hooks registered on the nodes of Python autograd.Functions while the emulation is active run
too, so `nn.Module` full backward (pre-)hooks, which are built from them, work (a module hook
registered before the block began raises `EmulationUnsupported` rather than being skipped).
Not run: hooks registered on PyTorch's C++ nodes themselves (`y.grad_fn.register_hook` of a
`MulBackward0`, ...), which Python cannot read back.
"""

from __future__ import annotations

import ctypes
import glob
import heapq
import os
import weakref

import torch
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.autograd.variable import Variable

from harness.errors import EmulationUnsupported

__all__ = [
    "EmulatedEngine",
    "install_engine",
    "install_guard",
    "reaches_cuda",
    "remove_engine",
    "remove_guard",
    "run_backward",
    "watch",
]


# ---- the CUDA device guard on a CPU-only build ---------------------------------------------------

_REGISTRY_SYMBOL = "_ZN3c104impl26device_guard_impl_registryE"  # c10::impl::device_guard_impl_registry
_CUDA, _PRIVATE_USE1 = 1, 20  # c10::DeviceType values
_guard_state: dict = {}  # "registry": the ctypes array; "pointer": our guard's address; "guard"


def _registry():
    if "registry" not in _guard_state:
        registry = None
        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
        for path in glob.glob(os.path.join(lib_dir, "libc10.*")):
            try:
                registry = (ctypes.c_void_p * (_PRIVATE_USE1 + 1)).in_dll(ctypes.CDLL(path), _REGISTRY_SYMBOL)
                break
            except (OSError, ValueError):
                continue
        _guard_state["registry"] = registry
    return _guard_state["registry"]


def _make_guard_pointer(registry) -> int | None:
    """Our guard's address: registered once through the PrivateUse1 slot (the only way PyTorch
    takes a Python guard), then that slot is left empty again."""
    acc = getattr(torch._C, "_acc", None)
    if acc is None or registry[_PRIVATE_USE1]:
        return None

    class CudaGuard(acc.DeviceGuard):
        def type_(self):
            return torch._C._autograd.DeviceType.CUDA

    guard = CudaGuard()
    if not acc.register_python_privateuseone_device_guard(guard):
        return None
    pointer = registry[_PRIVATE_USE1]
    registry[_PRIVATE_USE1] = None
    _guard_state["guard"] = guard  # PyTorch holds a reference too; it lives for the process
    return pointer


def install_guard() -> bool:
    """Makes autograd able to record graphs through CUDA devices. True if it can: real CUDA is
    built in, or the no-op guard is now in place (undo with `remove_guard`)."""
    if torch.backends.cuda.is_built():
        return True
    registry = _registry()
    if registry is None:
        return False
    if registry[_CUDA]:
        return registry[_CUDA] == _guard_state.get("pointer")
    if "pointer" not in _guard_state:
        _guard_state["pointer"] = _make_guard_pointer(registry)
    if _guard_state["pointer"] is None:
        return False
    registry[_CUDA] = _guard_state["pointer"]
    return True


def remove_guard() -> None:
    registry = _guard_state.get("registry")
    if registry is not None and _guard_state.get("pointer") and registry[_CUDA] == _guard_state["pointer"]:
        registry[_CUDA] = None


# ---- hooks and retained gradients, by graph edge -------------------------------------------------

# (node, output_nr) of a tensor -> weak reference to it, for tensors with hooks or retain_grad().
_WATCHED: dict[tuple[int, int], tuple[object, weakref.ref]] = {}


def watch(tensor: torch.Tensor) -> None:
    """Remembers which graph edge `tensor` is, so the engine can run its hooks and retain its grad."""
    if not tensor.requires_grad:
        return
    edge = get_gradient_edge(tensor)
    _WATCHED[(id(edge.node), edge.output_nr)] = (edge.node, weakref.ref(tensor))
    if len(_WATCHED) > 4096:  # drop the dead
        for key in [k for k, (_, ref) in _WATCHED.items() if ref() is None]:
            del _WATCHED[key]


def _watched(node, output_nr: int) -> torch.Tensor | None:
    entry = _WATCHED.get((id(node), output_nr))
    if entry is None or entry[0] is not node:
        return None
    return entry[1]()


# ---- the engine ----------------------------------------------------------------------------------

_RELEASED = "harness.emulated_autograd.released"  # set in a node's metadata when its graph is freed
_MODULE_HOOK_NODES = ("BackwardHookFunctionBackward",)


def _edge(t, what: str, i: int) -> GradientEdge:
    if isinstance(t, GradientEdge):
        return t
    if not t.requires_grad:
        raise RuntimeError(f"element {i} of {what} does not require grad and does not have a grad_fn")
    return get_gradient_edge(t)


def _checked(grad, node, index: int, next_node, input_nr: int):
    """A gradient as PyTorch's engine passes it on (validate_outputs): reduced to the shape and
    cast to the dtype its consumer recorded, refused if on another device."""
    if grad is None or next_node is None:
        return grad
    meta = next_node._input_metadata[input_nr]
    name = node.name()
    if tuple(grad.shape) != tuple(meta.shape):
        try:
            grad = grad.sum_to_size(meta.shape)
        except RuntimeError:
            raise RuntimeError(
                f"Function {name} returned an invalid gradient at index {index} - got {list(grad.shape)} "
                f"but expected shape compatible with {list(meta.shape)}"
            ) from None
    if grad.dtype != meta.dtype:
        grad = grad.to(meta.dtype)
    if grad.device != meta.device:
        if grad.dim() == 0:
            return grad.to(meta.device)  # PyTorch moves a 0-dim gradient where its consumer is
        raise RuntimeError(
            f"Function {name} returned an invalid gradient at index {index} - expected device "
            f"{meta.device} but got {grad.device}"
        )
    return grad


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _graph(roots: list) -> dict[int, list]:
    """id(node) -> [node, number of edges into it] for every node reachable from the roots."""
    nodes: dict[int, list] = {}
    stack = [n for n in roots if n is not None]
    for n in stack:
        nodes.setdefault(id(n), [n, 0])
    seen = set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for nxt, _ in n.next_functions:
            if nxt is None:
                continue
            entry = nodes.setdefault(id(nxt), [nxt, 0])
            entry[1] += 1
            stack.append(nxt)
    return nodes


def _needed(nodes: dict[int, list], targets: set[int]) -> set[int]:
    """Nodes from which a target node can be reached (only they need to run)."""
    needed: set[int] = set()

    def visit(n) -> bool:
        key = id(n)
        if key in memo:
            return memo[key]
        memo[key] = False  # graphs are acyclic; this guards deep recursion on revisits
        hit = key in targets
        for nxt, _ in n.next_functions:
            if nxt is not None and visit(nxt):
                hit = True
        memo[key] = hit
        if hit:
            needed.add(key)
        return hit

    memo: dict[int, bool] = {}
    for entry in nodes.values():
        visit(entry[0])
    return needed


class _Pass:
    """One backward pass (the callbacks it queued run at its end)."""

    current: _Pass | None = None

    def __init__(self):
        self.callbacks: list = []


def run_backward(
    outputs, grad_outputs, keep_graph, create_graph, inputs=(), allow_unreachable=True, accumulate_grad=True
):
    """`ImperativeEngine.run_backward`'s contract, run here in Python (see the module doc)."""
    roots = [_edge(t, "tensors", i) for i, t in enumerate(outputs)]
    grad_outputs = list(grad_outputs)
    targets = [_edge(t, "differentiated tensors", i) for i, t in enumerate(inputs or ())]
    target_of = {(id(e.node), e.output_nr): i for i, e in enumerate(targets)}
    captured: list = [None] * len(targets)
    nodes = _graph([e.node for e in roots])
    for e in roots:
        nodes.setdefault(id(e.node), [e.node, 0])
    if targets:
        needed = _needed(nodes, {id(e.node) for e in targets})
        if not accumulate_grad:
            needed -= {id(e.node) for e in targets if _is_leaf_node(e.node)}
    else:
        needed = set(nodes)
    for entry in nodes.values():
        n = entry[0]
        if n.metadata.get(_RELEASED):
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved tensors "
                "after they have already been freed). Saved intermediate values of the graph are freed "
                "when you call .backward() or autograd.grad(). Specify retain_graph=True if you need to "
                "backward through the graph a second time or if you need to access saved tensors after "
                "calling .backward() or autograd.grad()."
            )
        if n.name() in _MODULE_HOOK_NODES and id(n) in needed and _NODE_HOOKS not in n.metadata:
            raise EmulationUnsupported(  # (a hook registered before the emulation began)
                None, n.name(), "nn.Module full backward hooks are not run by the emulated backward pass"
            )

    buffers: dict[int, list] = {}

    def deliver(next_node, input_nr, grad):
        if next_node is None or grad is None:
            return
        key = (id(next_node), input_nr)
        if key in target_of:
            captured[target_of[key]] = _add(captured[target_of[key]], grad)
        if id(next_node) not in needed:
            return
        buf = buffers.setdefault(id(next_node), [None] * len(next_node._input_metadata))
        buf[input_nr] = _add(buf[input_nr], grad)

    this_pass = _Pass()
    outer, _Pass.current = _Pass.current, this_pass
    try:
        with torch.set_grad_enabled(create_graph):
            for e, g in zip(roots, grad_outputs, strict=True):
                deliver(e.node, e.output_nr, g)
            pending = {key: entry[1] for key, entry in nodes.items()}
            # PyTorch's order: among ready nodes the one made last first (AccumulateGrad first of all)
            ready = [(-n._sequence_nr(), key, n) for key, (n, count) in nodes.items() if count == 0]
            heapq.heapify(ready)
            while ready:
                _, key, node = heapq.heappop(ready)
                grads = buffers.pop(key, None)
                if key in needed and grads is not None:
                    grads = [_before(node, i, g) for i, g in enumerate(grads)]
                    for hook in _node_hooks(node, "pre"):
                        out = hook(tuple(grads))
                        grads = list(out) if out is not None else grads
                    # torch.autograd.grad leaves the leaves' .grad alone
                    results = () if _is_leaf_node(node) and not accumulate_grad else _apply(node, grads)
                    for hook in _node_hooks(node, "post"):
                        out = hook(results, tuple(grads))
                        results = tuple(out) if out is not None else results
                    for i, ((nxt, input_nr), g) in enumerate(zip(node.next_functions, results, strict=False)):
                        deliver(nxt, input_nr, _checked(g, node, i, nxt, input_nr))
                    if not keep_graph and not _is_leaf_node(node):
                        node.metadata[_RELEASED] = True
                for nxt, _ in node.next_functions:
                    if nxt is None:
                        continue
                    pending[id(nxt)] -= 1
                    if pending[id(nxt)] == 0:
                        heapq.heappush(ready, (-nxt._sequence_nr(), id(nxt), nxt))
        for callback in this_pass.callbacks:
            callback()
    finally:
        _Pass.current = outer
    if accumulate_grad:
        for g, t in zip(captured, inputs or (), strict=True):  # non-leaf inputs get a .grad too
            if g is not None and isinstance(t, torch.Tensor) and t.grad_fn is not None:
                with torch.no_grad():
                    t.grad = g.detach() if t.grad is None else t.grad + g
        return ()
    for i, (g, t) in enumerate(zip(captured, inputs, strict=True)):
        if g is None and not allow_unreachable:
            raise RuntimeError(
                f"One of the differentiated Tensors (index {i}) appears to not have been used in the graph. "
                "Set allow_unused=True if this is the desired behavior."
            )
        if g is not None and isinstance(t, torch.Tensor) and tuple(g.shape) != tuple(t.shape):
            g = g.sum_to_size(t.shape)
    return tuple(captured)


def _apply(node, grads: list) -> tuple:
    """Runs one node's backward. C++ nodes are called; an autograd.Function's node runs its
    backward with missing gradients as zeros (PyTorch's materialize_grads default)."""
    if callable(node):
        results = node(*grads)
    else:
        grads = [
            torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
            for g, m in zip(grads, node._input_metadata, strict=True)
        ]
        results = node.apply(*grads)
    return results if isinstance(results, tuple) else (results,)


def _is_leaf_node(node) -> bool:
    return hasattr(node, "variable")  # AccumulateGrad


def _before(node, input_nr: int, grad):
    """A gradient about to enter `node`: the hooks of the tensor it is the gradient of, then
    `.grad` kept for a tensor that retains its grad."""
    if grad is None:
        return grad
    tensor = _watched(node, input_nr)
    if tensor is None:
        return grad
    for hook in list((tensor._backward_hooks or {}).values()):
        result = hook(grad)
        if result is not None:
            _check_hook_result(grad, result, hook)
            grad = result
    if tensor.retains_grad:
        with torch.no_grad():
            tensor.grad = grad.detach() if tensor.grad is None else tensor.grad + grad
    return grad


def _check_hook_result(grad, result, hook) -> None:
    """PyTorch's check of what a tensor hook returns (check_variable_result): the same tensor
    type (backend and dtype: a CUDA gradient may not come back on the host) and size."""
    name = getattr(hook, "__name__", None) or type(hook).__name__
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"expected Variable, but hook returned '{type(result).__name__}'")
    if grad.type() != result.type():
        raise RuntimeError(
            f"hook '{name}' has changed the type of value (was {grad.type()} got {result.type()})"
        )
    if grad.shape != result.shape:
        raise RuntimeError(f"hook '{name}' has changed the size of value")


def reaches_cuda(outputs) -> bool:
    """Whether the graph behind these tensors (or gradient edges) has a node on a CUDA device.
    The nodes seen are held: torch makes a node's Python object afresh on each access and frees
    it when unused, so a later node's object can take a freed one's id()."""
    stack, seen = [], {}
    for t in outputs:
        if isinstance(t, GradientEdge):
            stack.append(t.node)
        elif isinstance(t, torch.Tensor):
            if t.is_cuda:
                return True
            stack.append(t.grad_fn)
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen[id(n)] = n
        if any(m.device.type == "cuda" for m in n._input_metadata):
            return True
        stack.extend(nxt for nxt, _ in n.next_functions)
    return False


class EmulatedEngine:
    """Stands in for `Variable._execution_engine` inside an `EmulatedCuda` block: graphs that
    reach a CUDA device go to `run_backward`, all others to PyTorch's engine."""

    def __init__(self, real):
        self.real = real

    def run_backward(self, outputs, *args, **kwargs):
        if reaches_cuda(outputs):
            return run_backward(outputs, *args, **kwargs)
        return self.real.run_backward(outputs, *args, **kwargs)

    def queue_callback(self, callback) -> None:
        if _Pass.current is not None:
            _Pass.current.callbacks.append(callback)
        else:
            self.real.queue_callback(callback)

    def __getattr__(self, name):
        return getattr(self.real, name)


# Hooks on the nodes of Python autograd.Functions (nn.Module full backward hooks are made of
# them) live in C++; while the emulated engine is in place, registering one also notes, in the
# node's metadata, the dict that holds them (so a removed hook is gone there too).
_NODE_HOOKS = "harness.node_hooks"  # metadata key: {"post": dict ref, "pre": dict ref}
_REGISTER = {"post": "register_hook", "pre": "register_prehook"}


def _noting(kind: str, real):
    def register(node, fn):
        handle = real(node, fn)
        node.metadata.setdefault(_NODE_HOOKS, {})[kind] = handle.hooks_dict_ref
        return handle

    return register


def _node_hooks(node, kind: str) -> list:
    ref = node.metadata.get(_NODE_HOOKS, {}).get(kind) if not callable(node) else None
    hooks = ref() if ref is not None else None
    return list(hooks.values()) if hooks else []


def install_engine() -> object:
    """Puts an `EmulatedEngine` in place; returns the engine it replaced (for `remove_engine`)."""
    real = Variable._execution_engine
    Variable._execution_engine = EmulatedEngine(real)
    for kind, name in _REGISTER.items():
        setattr(BackwardCFunction, name, _noting(kind, getattr(BackwardCFunction, name)))
    return real


def remove_engine(real) -> None:
    Variable._execution_engine = real
    for name in _REGISTER.values():
        if name in vars(BackwardCFunction):
            delattr(BackwardCFunction, name)  # (the C++ methods it inherits come back)
