"""The fault catalog: named placement bugs injected into a loaded model, and taken out again.

Each `Fault` reproduces one known class of device bug in quantized MoE inference (a tensor left on
the CPU, a host read in the hot path, a lost transfer) without editing the model's code: it
replaces instance `forward` methods (`types.MethodType`), moves or replaces buffers, or patches a
module-level function, and `Injection.remove()` puts back exactly the objects it replaced.

    fault = faults.get("candle-1815")
    if fault.applies_to(model):
        with fault.inject(model):
            with Tracer(model) as tracer:
                model(tokens)  # a real device mismatch raises here; the tracer has recorded it
        first = tracer.summary.first_offence
        assert first["class"] == fault.expected(model)
        assert (first["module"], first["tensor"]) == fault.location(model)

Inject outside the tracer: the copies a fault makes as it goes in are not part of the run.

A fault only means something where the part it breaks is on an accelerator (`cuda`, or `meta`
standing in for one): `applies_to` says whether the model's placement has such a part, and
`inject` refuses a model it does not apply to. Faults that break one layer pick the first layer
the placement puts on an accelerator (layer 0 when the whole model is there). `location` is where
the tracer's first offence must point: the module path and the GGUF tensor among the offending
op's inputs (None where the op reads no GGUF weight, e.g. the KV cache or the routing logits).
Both depend only on the placement and the model's structure, so they give the same answer before,
during and after an injection.

Several injections may be active at once; remove them in reverse order (context managers do).
An injection that finds something it changed changed again by someone else (the model moved with
`.to()`, a patch of the same function made later and still active) leaves that in place and says
so with a RuntimeError after restoring the rest.
"""

from __future__ import annotations

import contextlib
import difflib
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from harness.device_tables import TABLES
from harness.errors import UsageError
from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN, Embedding, Experts, Mixtral, MoE
from harness.quant import dequant, kernels
from harness.quant.qmatmul import QMatMul
from harness.quant.types import FLOAT_TYPES
from harness.trace.placement import ModulePlacement

__all__ = ["CATALOG", "GENERIC", "Fault", "Injection", "get", "module_devices", "names"]

CPU = torch.device("cpu")
MISMATCH, SYNC, STRAY, TRANSFER = "mismatch", "sync", "stray", "transfer"

_ABSENT = object()


# ---- injections ----------------------------------------------------------------------------------


class Injection:
    """One fault injected into one model: what it changed, and `remove()` to put it back.

    `at` is the module a generic fault went in at; `location` is `fault.location(model, at)`,
    worked out when the fault went in; `fired` counts the times a generic fault acted since (a
    fault whose module made no new tensor, say, changed nothing in that run)."""

    def __init__(self, fault: Fault, model: torch.nn.Module, at: str | None = None):
        self.fault = fault
        self.model = model
        self.at = at
        self.location = fault.location(model, at)
        self.fired = 0  # times a generic fault acted in the runs since it went in
        self._changes: list[tuple[str, Callable[[], object], Callable[[object], None], object, object]] = []
        self.active = True

    # -- what a fault may change ---------------------------------------------------------------

    def _change(
        self, what: str, get: Callable[[], object], put: Callable[[object], None], new: object
    ) -> None:
        old = get()
        put(new)
        self._changes.append((what, get, put, old, new))

    def replace_buffer(self, module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        """`module.<name>` becomes `tensor` (a registered buffer, kept registered)."""
        buffers = module._buffers
        if name not in buffers:
            raise KeyError(f"{type(module).__name__} has no buffer {name!r}")
        self._change(
            f"buffer {self._path(module)}.{name}",
            lambda: buffers[name],
            lambda v: buffers.__setitem__(name, v),
            tensor,
        )

    def replace_tensor(self, module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        """`module.<name>` (a parameter or a buffer of its own) becomes `tensor`, kept registered
        as what it was."""
        table = module._parameters if name in module._parameters else module._buffers
        if name not in table:
            raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
        self._change(
            f"{'parameter' if table is module._parameters else 'buffer'} {self._path(module)}.{name}",
            lambda: table[name],
            lambda v: table.__setitem__(name, v),
            tensor,
        )

    def replace_forward(self, module: torch.nn.Module, fn: Callable) -> None:
        """`module.forward` becomes `fn` bound to the module (an instance attribute)."""
        self.replace_method(module, "forward", fn)

    def replace_method(self, module: torch.nn.Module, name: str, fn: Callable) -> None:
        """`module.<name>` becomes `fn` bound to the module (an instance attribute)."""
        d = module.__dict__

        def put(v):
            if v is _ABSENT:
                d.pop(name, None)
            else:
                d[name] = v

        self._change(
            f"{name} of {self._path(module) or '<model>'}",
            lambda: d.get(name, _ABSENT),
            put,
            types.MethodType(fn, module),
        )

    def replace_table(self, name: str, build: Callable) -> None:
        """Device table `name` (`harness.device_tables`) is built by `build(device, ...)` on every
        use, kept nowhere."""
        self._change(
            f"device table {name!r}",
            lambda: TABLES.overridden(name),
            lambda v: TABLES.override(name, v),
            build,
        )

    def replace_attr(self, obj: object, name: str, value: object) -> None:
        """`obj.<name>` (a module-level function, say) becomes `value`."""
        owner = getattr(obj, "__name__", type(obj).__name__)
        self._change(f"{owner}.{name}", lambda: getattr(obj, name), lambda v: setattr(obj, name, v), value)

    def _path(self, module: torch.nn.Module) -> str:
        for path, m in self.model.named_modules():
            if m is module:
                return path
        return type(module).__name__

    # -- taking it out -------------------------------------------------------------------------

    def remove(self) -> None:
        """Put back every object the fault replaced, newest change first. Idempotent."""
        if not self.active:
            return
        self.active = False
        changed_since = []
        while self._changes:
            what, get, put, old, new = self._changes.pop()
            if get() is new:
                put(old)
            else:
                changed_since.append(what)
        if changed_since:
            raise RuntimeError(
                f"fault {self.fault.name}: {', '.join(changed_since)} changed again after the fault went "
                "in; left as it is now (remove injections in the reverse order of injecting them)"
            )

    def __enter__(self) -> Injection:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Injection({self.fault.name!r}, {state}, location={self.location})"


# ---- faults --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A named, documented placement bug.

    `name` ("candle-1815"), `summary` (one line, for `harness faults`), `doc` (the real bug it
    mirrors and what the tracer sees), `expected_class` (the class of the tracer's first offence
    for a model loaded with the default "quantized" strategy; `expected(model)` gives it for any
    model), `requires` (what `applies_to` checks, in words).

    A generic fault (`generic`) applies to any `nn.Module` and goes in at a module path `at`, one
    of `sites(model)` (the first when `at` is None). A Mixtral fault knows its one module; its
    `sites` is that module, or nothing where it does not apply."""

    name: str
    summary: str
    doc: str
    expected_class: str
    requires: str
    _applies: Callable[..., bool] = field(repr=False, compare=False)
    _location: Callable[..., tuple[str, str | None]] = field(repr=False, compare=False)
    _inject: Callable[..., None] = field(repr=False, compare=False)
    _expected: Callable[..., str] | None = field(default=None, repr=False, compare=False)
    _sites: Callable[[torch.nn.Module], list[str]] | None = field(default=None, repr=False, compare=False)
    _acts_at: Callable[..., set[str]] | None = field(default=None, repr=False, compare=False)

    @property
    def generic(self) -> bool:
        """Applies to any model, at a module path."""
        return self._sites is not None

    def sites(self, model: torch.nn.Module, run: Callable[[], object] | None = None) -> list[str]:
        """Module paths where this fault can go in, in module order. `run` (a call that runs
        the model once, as the traced run will, in the same grad mode) narrows them to modules
        where the fault acts in that run: modules whose forward runs (a parent's fused op may
        take their weights without calling them), and that make new tensors for
        new-tensor-without-device."""
        if not self.generic:
            return [self._location(model)[0]] if self.applies_to(model) else []
        sites = self._sites(model)
        if run is not None and self._acts_at is not None and sites:
            acting = self._acts_at(model, run)
            sites = [s for s in sites if s in acting]
        return sites

    def applies_to(self, model: torch.nn.Module, at: str | None = None) -> bool:
        """Whether the model has what this fault breaks on an accelerator (at module `at`)."""
        if self.generic:
            sites = self._sites(model)
            return bool(sites) if at is None else at in sites
        if not (hasattr(model, "placement") and hasattr(model, "layers")):
            return False  # not a loaded Mixtral
        if not self._applies(model):
            return False
        return at is None or at == self._location(model)[0]

    def location(self, model: torch.nn.Module, at: str | None = None) -> tuple[str, str | None]:
        """(module path, GGUF tensor name or None) where the tracer's first offence must point."""
        at = self._check(model, at)
        return self._location(model, at) if self.generic else self._location(model)

    def expected(self, model: torch.nn.Module, at: str | None = None) -> str:
        """The class of the first offence on this model (`expected_class` unless the model, its
        strategy or the direction of the fault changes which op offends first)."""
        at = self._check(model, at)
        if self._expected is None:
            return self.expected_class
        return self._expected(model, at) if self.generic else self._expected(model)

    def inject(self, model: torch.nn.Module, at: str | None = None) -> Injection:
        """Break `model` in place (at module `at`, for a generic fault); the returned `Injection`
        (a context manager) undoes it."""
        at = self._check(model, at)
        injection = Injection(self, model, at)
        try:
            if self.generic:
                self._inject(model, injection, at)
            else:
                self._inject(model, injection)
        except BaseException:
            injection.remove()
            raise
        return injection

    def _check(self, model: torch.nn.Module, at: str | None) -> str | None:
        """`at`, or the first site where it is None; UsageError where the fault does not apply."""
        if self.applies_to(model, at):
            return at if at is not None or not self.generic else self._sites(model)[0]
        placement = getattr(model, "placement", None)
        if at is not None:
            sites = self.sites(model)
            where = f"module {at!r} (sites here: {', '.join(sites) if sites else 'none'})"
        elif placement is not None:
            where = placement.describe()
        else:
            where = f"this {type(model).__name__}"
        raise UsageError(None, "fault", f"{self.name} does not apply to {where}: it needs {self.requires}")

    def __str__(self) -> str:
        return f"{self.name}: {self.summary}"


# ---- where things are ----------------------------------------------------------------------------


def _accel(device: torch.device) -> bool:
    """An accelerator (cuda, or meta standing in for one): anything but the CPU."""
    return device.type != "cpu"


def _first_accel_layer(model: Mixtral, moe: bool = False) -> int | None:
    for i, device in enumerate(model.placement.layers):
        if _accel(device) and (not moe or hasattr(model.layers[i], "moe")):
            return i
    return None


def _layer(model: Mixtral, moe: bool = False) -> int:
    i = _first_accel_layer(model, moe)
    assert i is not None  # applies_to checked it
    return i


def _on_accel(model: Mixtral, path: str) -> bool:
    return _accel(model.placement.device_of(path))


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU (a meta tensor has no values to copy: an uninitialised one of its shape)."""
    return torch.empty_like(t, device=CPU) if t.is_meta else t.to(CPU)


def _accel_count(device_type: str) -> int:
    if device_type == "cuda":
        return torch.cuda.device_count()
    backend = getattr(torch, device_type, None)
    count = getattr(backend, "device_count", None)
    return count() if callable(count) else 1


def _other_device(device: torch.device) -> torch.device:
    """Another device of the same kind: the next index, wrapping around."""
    index = device.index or 0
    return torch.device(device.type, (index + 1) % _accel_count(device.type))


# ---- candle-1815 ---------------------------------------------------------------------------------


def _float_qmatmuls(model: Mixtral) -> list[tuple[str, QMatMul]]:
    """QMatMuls over F32/F16/BF16 GGUF tensors on an accelerator, in forward order."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, QMatMul)
        and m.qtype in FLOAT_TYPES
        and m.weight is not None
        and _on_accel(model, path)
    ]


def _candle_location(model):
    path, m = _float_qmatmuls(model)[0]
    return path, m.gguf_name


def _candle_inject(model, inj):
    for _, m in _float_qmatmuls(model):
        inj.replace_buffer(m, "weight", _host_copy(m.weight))


# ---- router-topk-on-host -------------------------------------------------------------------------


def _moe_path(model):
    return f"layers.{_layer(model, moe=True)}.moe"


# The faulted forwards take the module's whole signature, though a replaced forward gets the
# plain calls (`runs_own_forward`: no `x_int`, no norm's `routing`), so the faulted code routes
# itself, as the bug did.
def _topk_on_host_forward(
    self: MoE, x: torch.Tensor, residual: torch.Tensor | None = None, x_int=None, routing=None
) -> torch.Tensor:
    logits = self.router(x)  # [T, E] on the device
    probs = logits.float().cpu().softmax(-1)  # FAULT: routing fetched to the host
    weights, chosen = probs.topk(self.n_used, dim=-1)  # [T, k] on the host
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=ROUTER_WEIGHT_SUM_MIN)
    return self.experts(x, weights.to(x.device), chosen.to(x.device), residual, x_int)


def _topk_inject(model, inj):
    inj.replace_forward(model.get_submodule(_moe_path(model)), _topk_on_host_forward)


# ---- item-in-routing -----------------------------------------------------------------------------


def _item_in_routing_forward(
    self: MoE, x: torch.Tensor, residual: torch.Tensor | None = None, x_int=None, routing=None
) -> torch.Tensor:
    logits = self.router(x)  # [T, E]
    probs = logits.float().softmax(-1)
    weights, chosen = probs.topk(self.n_used, dim=-1)  # [T, k]
    total = weights.sum(-1, keepdim=True)  # [T, 1]
    if total.min().item() < ROUTER_WEIGHT_SUM_MIN:  # FAULT: a host read decides whether to clamp
        total = total.clamp(min=ROUTER_WEIGHT_SUM_MIN)
    return self.experts(x, weights / total, chosen, residual, x_int)


def _item_inject(model, inj):
    inj.replace_forward(model.get_submodule(_moe_path(model)), _item_in_routing_forward)


# ---- expert-indices-on-cpu -----------------------------------------------------------------------


def _experts_path(model):
    return f"layers.{_layer(model, moe=True)}.moe.experts"


def _indices_on_host_forward(
    self: Experts, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, residual=None, x_int=None
):  # (x_int unread: the torch path below takes x itself)
    experts = experts.cpu()  # FAULT: the combine step works from host copies of the expert indices
    t, k = experts.shape
    y = self._gather(x, weights, experts) if t * k < self.n_experts else self._dense(x, weights, experts)
    return y if residual is None else residual + y


def _indices_inject(model, inj):
    inj.replace_forward(model.get_submodule(_experts_path(model)), _indices_on_host_forward)


# ---- kv-cache-on-cpu, rope-tables-on-cpu, norm-weight-on-cpu -------------------------------------


def _attn_path(model):
    return f"layers.{_layer(model)}.attn"


def _attention_fused(model) -> bool:
    """Whether the faulted layer's attention runs as the fused ops (`Attention.fused`): then a
    host cache or host rope tables go into `harness::attention`, which refuses them."""
    return model.get_submodule(_attn_path(model)).fused()


def _kv_expected(model):
    return MISMATCH if _attention_fused(model) else SYNC


def _rope_location(model):
    path = _attn_path(model)
    return (path if _attention_fused(model) else f"{path}.rope"), None


def _kv_inject(model, inj):
    cache = model.get_submodule(_attn_path(model)).cache
    for name in ("k", "v"):
        t = getattr(cache, name)
        inj.replace_buffer(cache, name, torch.zeros(t.shape, dtype=t.dtype, device=CPU))  # FAULT: no device=


def _rope_inject(model, inj):
    rope = model.get_submodule(_attn_path(model)).rope
    for name in ("cos", "sin"):
        inj.replace_buffer(rope, name, _host_copy(getattr(rope, name)))


def _norm_path(model):
    return f"layers.{_layer(model)}.attn_norm"


def _norm_location(model):
    path = _norm_path(model)
    return path, model.get_submodule(path).gguf_name


def _norm_inject(model, inj):
    norm = model.get_submodule(_norm_path(model))
    inj.replace_buffer(norm, "weight", _host_copy(norm.weight))


# ---- causal-mask-on-host -------------------------------------------------------------------------


def _mask_on_host(self, start_pos: int, t: int, s: int, device: torch.device) -> torch.Tensor:
    # Attention.causal_mask, but built on the host on every call and then uploaded.
    q_pos = torch.arange(start_pos, start_pos + t)[:, None]  # FAULT: no device=, so on the host
    k_pos = torch.arange(s)[None, :]
    return (k_pos > q_pos).to(device)  # [T, S], uploaded on every call


def _mask_inject(model, inj):
    inj.replace_method(model.get_submodule(_attn_path(model)), "causal_mask", _mask_on_host)
    # The fused attention (`harness::attention`) builds its mask on the device: the fault is in
    # the torch path's `causal_mask`, so on a real GPU take that path.
    inj.replace_attr(kernels, "supports", _no_kernels)


# ---- dequant-host-constants ----------------------------------------------------------------------


def _host_consts(device: torch.device) -> types.SimpleNamespace:
    # FAULT: the dequantizers' constants without the per-device table and without device=:
    # fresh host tensors on every call, whatever device the blocks are on.
    return dequant.build_constants(torch.device("cpu"))


def _dequant_sites(model: Mixtral) -> list[tuple[str, str | None, bool]]:
    """Per-call dequantizations in forward order: (module path, GGUF name, reads the constants).

    The embedding and QMatMuls kept quantized dequantize per call; an Experts module first
    dequantizes w1 (gate), then w3 and w2, with names depending on the number of tokens (None)."""
    sites = []
    for path, m in model.named_modules():
        if not _on_accel(model, path) or not path:
            continue
        if isinstance(m, Embedding) or (isinstance(m, QMatMul) and m.strategy == "quantized"):
            sites.append((path, m.gguf_name, dequant.uses_constants(m.qtype)))
        elif isinstance(m, Experts):
            uses = any(dequant.uses_constants(m.meta[a][0]) for a in ("w1", "w3", "w2"))
            sites.append((path, None, uses))
    return sites


def _first_const_site(model: Mixtral) -> tuple[str, str | None] | None:
    for path, name, uses in _dequant_sites(model):
        if uses:
            return (path, name) if name is not None else None
    return None


def _dequant_inject(model, inj):
    inj.replace_table(dequant.DEQUANT_TABLE, _host_consts)
    # On a real GPU the Triton kernels (with their own tables) would take these types: the fault
    # is in the torch path, so take that one.
    inj.replace_attr(kernels, "supports", _no_kernels)


def _no_kernels(qtype) -> bool:
    return False


# ---- embedding-output-on-cpu ---------------------------------------------------------------------


def _embed_on_host_forward(self: Embedding, tokens: torch.Tensor) -> torch.Tensor:
    rows = self.qweight.index_select(0, tokens.reshape(-1))  # [T, row_bytes], on the device
    rows = rows.cpu()  # FAULT: the rows are dequantized by a host routine and stay there
    out = dequant.dequantize(rows, self.qtype, (rows.shape[0], self.shape[1]), torch.float32)
    return out.reshape(*tokens.shape, self.shape[1])


def _embed_inject(model, inj):
    inj.replace_forward(model.embed, _embed_on_host_forward)


# ---- head-on-wrong-gpu ---------------------------------------------------------------------------


def _head_applies(model):
    head = model.placement.head
    return _accel(head) and head.type != "meta" and _accel_count(head.type) >= 2


def _head_inject(model, inj):
    head = model.head
    attr = "qweight" if head.strategy == "quantized" else "weight"
    target = _other_device(model.placement.head)
    TABLES.warm(target)  # as when the weight first went there: the head's constants are there too
    inj.replace_buffer(head, attr, getattr(head, attr).to(target))


def _head_location(model):
    return "head", model.head.gguf_name


def _head_expected(model):
    # Kept quantized, the head first dequantizes its blocks on the other GPU (stray); dequantized
    # at load, the first op is the product itself, which CUDA refuses.
    return STRAY if model.head.strategy == "quantized" else MISMATCH


# ---- lost-boundary-transfer ----------------------------------------------------------------------


def _lost_boundary(model: Mixtral) -> str:
    return model.placement.boundaries()[0][0]


def _lost_boundary_location(model):
    entered = _lost_boundary(model)
    prefix = entered + "."
    for path, m in model.named_modules():  # the first leaf module inside the module entered
        if (path == entered or path.startswith(prefix)) and not any(True for _ in m.children()):
            return path, None
    return entered, None


def _lost_boundary_inject(model, inj):
    skip = _lost_boundary(model)

    def forward(self: Mixtral, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        # Mixtral.forward, without the transfer at the boundary into `skip`.
        if tokens.device.type == "cpu":
            self.check_tokens(tokens, start_pos)
        x = self.embed(tokens.to(self.placement.embed))  # [T, D]
        for i, (layer, device) in enumerate(zip(self.layers, self.placement.layers, strict=True)):
            if x.device != device and f"layers.{i}" != skip:  # FAULT: this boundary lost its .to()
                x = x.to(device)
            x = layer(x, start_pos)
        if x.device != self.placement.head and skip != "norm":
            x = x.to(self.placement.head)
        return self.head(self.norm(x)).float()

    inj.replace_forward(model, forward)


# ---- generic faults: any nn.Module, at a module path ---------------------------------------------


def module_devices(model: torch.nn.Module) -> dict[str, torch.device | None]:
    """Where each module of `model` computes, by module path (None where no single device):
    what a tracer expects by default (`harness.trace.placement.ModulePlacement.of`: a Mixtral's
    own placement; else an offloading hook's execution device, or where the module's own
    parameters and buffers are, or its submodules', or its parent's)."""
    placement = ModulePlacement.of(model)
    return {
        path: torch.device(d) if (d := placement.device_of(path)) is not None else None
        for path, _ in model.named_modules()
    }


def _own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's), by attribute name."""
    own = {n: t for n, t in module._parameters.items() if t is not None}
    own.update((n, t) for n, t in module._buffers.items() if t is not None)
    return own


def _runs(module: torch.nn.Module) -> bool:
    """The module has a forward of its own (a KVCache-like holder of tensors has none: its owner
    computes with them)."""
    return type(module).forward is not torch.nn.Module.forward


def _wrong_device(device: torch.device, devices: dict) -> torch.device | None:
    """Where a tensor of a module on `device` should not be: the CPU for a module on an
    accelerator; the model's first accelerator for a module on the CPU (None if it has none)."""
    if _accel(device):
        return CPU
    return next((d for d in devices.values() if d is not None and _accel(d)), None)


def _module_sites(model, *, accel_only: bool, own_tensors: bool, wrong_device: bool) -> list[str]:
    """Modules (never the model itself: its forward is the run's edge, where inputs go up and
    outputs come down) that run, are placed somewhere known, and meet the conditions."""
    devices = module_devices(model)
    sites = []
    for path, m in model.named_modules():
        device = devices.get(path)
        if not path or device is None or not _runs(m):
            continue
        if accel_only and not _accel(device):
            continue
        if wrong_device and _wrong_device(device, devices) is None:
            continue
        if own_tensors:
            own = _own_tensors(m)
            # an offloaded module's tensors wait on the meta device: its hook brings them in
            if not own or any(t.is_meta and device.type != "meta" for t in own.values()):
                continue
        sites.append(path)
    return sites


def _site_device(model, at: str) -> torch.device:
    return module_devices(model)[at]


def _site_location(model, at: str) -> tuple[str, str | None]:
    """The module, and its GGUF tensor where it has one (a Mixtral module's `gguf_name`)."""
    name = getattr(model.get_submodule(at), "gguf_name", None)
    return at, name if isinstance(name, str) else None


def _previous_forward(module: torch.nn.Module) -> Callable:
    """The forward the module runs now: an instance attribute (another wrapper, accelerate's
    hook) or its class's."""
    return module.__dict__.get("forward") or types.MethodType(type(module).forward, module)


def _tensors_in(value) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


# -- tensor-on-wrong-device


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of `t` on `device`, a parameter again if it was one (the copy is no autograd op)."""
    with torch.no_grad():
        moved = _host_copy(t.detach()) if device == CPU else t.detach().to(device)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(moved, requires_grad=t.requires_grad)
    return moved


def _move_tensor_inject(model, inj: Injection, at: str) -> None:
    module = model.get_submodule(at)
    target = _wrong_device(_site_device(model, at), module_devices(model))
    for name, t in _own_tensors(module).items():
        inj.replace_tensor(module, name, _moved(t, target))  # FAULT: left on (or moved to) the wrong device
    inj.fired += 1


# -- output-on-wrong-device


def _move_output_inject(model, inj: Injection, at: str) -> None:
    module = model.get_submodule(at)
    target = _wrong_device(_site_device(model, at), module_devices(model))
    forward = _previous_forward(module)

    def moved_output(self, *args, **kwargs):
        out = forward(*args, **kwargs)
        if _tensors_in(out):
            inj.fired += 1
        # FAULT: the module hands its output over on the wrong device
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(target), out)

    inj.replace_forward(module, moved_output)


def _move_output_expected(model, at: str) -> str:
    # Brought to the host, the copy waits for the device (a sync); sent to an accelerator, it
    # is an undeclared transfer.
    return SYNC if _accel(_site_device(model, at)) else TRANSFER


# -- new-tensor-without-device

# Factories that take `device=` and make a tensor from nothing (or from Python data).
_FACTORIES = frozenset(
    {
        torch.zeros,
        torch.ones,
        torch.empty,
        torch.full,
        torch.arange,
        torch.linspace,
        torch.logspace,
        torch.eye,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.tensor,
        torch.as_tensor,
        torch.asarray,
        torch.empty_strided,
        torch.scalar_tensor,
        torch.tril_indices,
        torch.triu_indices,
    }
)


class _NoDevice(TorchFunctionMode):
    """Drops `device=` from the factory calls of one module's own code (not its children's)."""

    def __init__(self, injection: Injection):
        super().__init__()
        self.injection = injection
        self.depth = 0  # submodule forwards entered and not yet left

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = args or (), kwargs or {}
        device = kwargs.get("device")
        if self.depth == 0 and func in _FACTORIES and device is not None and torch.device(device) != CPU:
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}  # FAULT: no device=
            self.injection.fired += 1
        return func(*args, **kwargs)


class _FactoryCalls(TorchFunctionMode):
    """Records the modules whose own code calls a torch factory with an accelerator device=."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.paths = {m: path for path, m in model.named_modules()}
        self.stack = [""]
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = args or (), kwargs or {}
        device = kwargs.get("device")
        if func in _FACTORIES and device is not None and torch.device(device) != CPU:
            self.found.add(self.stack[-1])
        return func(*args, **kwargs)

    def enter(self, module, args) -> None:
        self.stack.append(self.paths.get(module, self.stack[-1]))

    def leave(self, module, args, out) -> None:
        self.stack.pop()


def _factory_sites(model: torch.nn.Module, run: Callable[[], object]) -> set[str]:
    probe = _FactoryCalls(model)
    hooks = (
        register_module_forward_pre_hook(probe.enter),
        register_module_forward_hook(probe.leave, always_call=True),
    )
    try:
        with probe, contextlib.suppress(Exception):  # (a run that fails: what ran until then)
            run()
    finally:
        for h in hooks:
            h.remove()
    return probe.found


def _called_sites(model: torch.nn.Module, run: Callable[[], object]) -> set[str]:
    """Modules whose own forward runs in `run` (a fused op of a parent can take a module's
    weights without calling it: nn.TransformerEncoderLayer's fast path, in inference, calls
    neither its attention nor its linear layers)."""
    paths = {m: p for p, m in model.named_modules()}
    called: set[str] = set()
    hook = register_module_forward_pre_hook(lambda m, a: called.add(paths[m]) if m in paths else None)
    try:
        with contextlib.suppress(
            Exception
        ):  # a run that fails (a bug of the model's own): what ran until then
            run()
    finally:
        hook.remove()
    return called


def _no_device_inject(model, inj: Injection, at: str) -> None:
    module = model.get_submodule(at)
    forward = _previous_forward(module)

    def without_device(self, *args, **kwargs):
        mode = _NoDevice(inj)

        def enter(m, a):
            mode.depth += 1

        def leave(m, a, out):
            mode.depth -= 1

        hooks = (
            register_module_forward_pre_hook(enter),
            register_module_forward_hook(leave, always_call=True),
        )
        try:
            with mode:
                return forward(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    inj.replace_forward(module, without_device)


# -- item-in-forward


def _item_in_forward_inject(model, inj: Injection, at: str) -> None:
    module = model.get_submodule(at)
    forward = _previous_forward(module)

    def with_item(self, *args, **kwargs):
        out = forward(*args, **kwargs)
        tensors = _tensors_in(out)
        if tensors:
            inj.fired += 1
            tensors[0].detach().sum().item()  # FAULT: a host read of device data (a NaN check, say)
        return out

    inj.replace_forward(module, with_item)


# -- weight-uploaded-per-call


def _upload_inject(model, inj: Injection, at: str) -> None:
    module = model.get_submodule(at)
    device = _site_device(model, at)
    host = {name: _moved(t, CPU) for name, t in _own_tensors(module).items()}
    for name, t in host.items():
        inj.replace_tensor(module, name, t)  # kept on the host between calls
    forward = _previous_forward(module)

    def uploading(self, *args, **kwargs):
        for name, t in host.items():
            table = self._parameters if name in self._parameters else self._buffers
            table[name] = t.to(device)  # FAULT: uploaded again on every call
        inj.fired += 1
        try:
            return forward(*args, **kwargs)
        finally:
            for name, t in host.items():
                table = self._parameters if name in self._parameters else self._buffers
                table[name] = t

    inj.replace_forward(module, uploading)


_GENERIC = [
    Fault(
        name="tensor-on-wrong-device",
        summary="a module's parameters and buffers moved to the wrong device",
        doc=(
            "The family of candle#1815 in any model: a loader, a `.to()` that misses a tensor "
            "(a buffer registered after the move, a weight kept aside), or a weight tied across "
            "devices leaves a module's own tensors on the CPU while the module runs on the "
            "accelerator (or puts them on the accelerator while it runs on the CPU). Injected at "
            "module `at` by moving every parameter and buffer of its own. The tracer's first "
            "offence is the first op of that module that meets them: a mismatch (CUDA refuses to "
            "mix the devices). Where the module's own code moves them itself (`w.to(x.device)`), "
            "the first offence is that copy (a transfer, or a sync when it comes to the host), or "
            "a stray where it computes with them alone first."
        ),
        expected_class=MISMATCH,
        requires="a module that runs, with parameters or buffers of its own on its device, in a "
        "model with an accelerator",
        _applies=None,
        _location=_site_location,
        _inject=_move_tensor_inject,
        _sites=lambda m: _module_sites(m, accel_only=False, own_tensors=True, wrong_device=True),
        _acts_at=_called_sites,
    ),
    Fault(
        name="output-on-wrong-device",
        summary="a module hands its output over on the wrong device",
        doc=(
            "A module whose result ends up elsewhere than where it ran: a `.cpu()` left in for "
            "debugging, a numpy round trip, a CPU-only kernel, or a `.to(self.device)` that names "
            "the wrong device. Injected at module `at` by moving every tensor of its output to "
            "the CPU (to the model's first accelerator where the module is on the CPU). The "
            "tracer's first offence is that copy inside the module: a sync when it comes down to "
            "the host (the host waits for the device), an undeclared transfer when it goes up. "
            "The next module then meets the tensor on the wrong device (a mismatch or a stray)."
        ),
        expected_class=SYNC,
        requires="a module that runs (not the model itself), in a model with an accelerator",
        _applies=None,
        _location=lambda m, at: (at, None),
        _inject=_move_output_inject,
        _expected=_move_output_expected,
        _sites=lambda m: _module_sites(m, accel_only=False, own_tensors=False, wrong_device=True),
        _acts_at=_called_sites,
    ),
    Fault(
        name="new-tensor-without-device",
        summary="a module builds its new tensors without device=",
        doc=(
            "`torch.zeros(shape)`, `torch.arange(n)`, `torch.tensor(data)` without device= inside a "
            "forward that runs on the GPU: the tensor is made on the CPU (a mask, position ids, "
            "an accumulator for the experts' outputs). Injected at module `at` by dropping "
            "`device=` from every torch factory call of that module's own code (not of its "
            "children) while it runs; `Injection.fired` counts them (a module that makes no "
            "tensor of its own is not broken by it: `sites(model, run)` gives the modules that make one in "
            "that run). The tracer's first offence is the factory "
            "op on the CPU in a module placed on the accelerator: a stray; then a mismatch where "
            "it meets device data, or a transfer where the code moves it."
        ),
        expected_class=STRAY,
        requires="a module that runs on an accelerator (not the model itself) and makes new "
        "tensors with device= in its own code",
        _applies=None,
        _location=lambda m, at: (at, None),
        _inject=_no_device_inject,
        _sites=lambda m: _module_sites(m, accel_only=True, own_tensors=False, wrong_device=False),
        _acts_at=_factory_sites,
    ),
    Fault(
        name="item-in-forward",
        summary="a module reads a value of its output back to the host with .item()",
        doc=(
            "A host read of device data in the hot path: a NaN or overflow check "
            "(`if out.sum().item() != out.sum().item()`), a threshold, a logging line. Each one "
            "makes the host wait for the device. Injected at module `at` by reading the sum of "
            "the first tensor of its output with `.item()` after it has computed; the values are "
            "unchanged. The tracer's first offence is that _local_scalar_dense in the module: a "
            "sync."
        ),
        expected_class=SYNC,
        requires="a module that runs on an accelerator (not the model itself)",
        _applies=None,
        _location=lambda m, at: (at, None),
        _inject=_item_in_forward_inject,
        _sites=lambda m: _module_sites(m, accel_only=True, own_tensors=False, wrong_device=False),
        _acts_at=_called_sites,
    ),
    Fault(
        name="weight-uploaded-per-call",
        summary="a module's weights kept on the host and uploaded again on every call",
        doc=(
            "Weights that live on the CPU and are copied to the GPU inside every forward: a "
            "hand-rolled offload without a declared device map, a cache of `.to(device)` copies "
            "that never hits, a dequantizer that works on host blocks. Nothing fails; every call "
            "moves the weights' bytes again. Injected at module `at`: its own parameters and "
            "buffers are moved to the host, and its forward uploads them before each call. The "
            "tracer's first offence is the upload in that module: an undeclared transfer "
            "(host to device), with the module's GGUF tensor where it has one."
        ),
        expected_class=TRANSFER,
        requires="a module that runs on an accelerator, with parameters or buffers of its own there",
        _applies=None,
        _location=_site_location,
        _inject=_upload_inject,
        _sites=lambda m: _module_sites(m, accel_only=True, own_tensors=True, wrong_device=False),
        _acts_at=_called_sites,
    ),
]


# ---- the catalog ---------------------------------------------------------------------------------


def _has_moe_on_accel(model):
    return _first_accel_layer(model, moe=True) is not None


def _has_layer_on_accel(model):
    return _first_accel_layer(model) is not None


_FAULTS = [
    Fault(
        name="candle-1815",
        summary="F16/F32 QMatMul weights (the MoE router) dequantized to the CPU",
        doc=(
            "candle#1815: candle's QMatMul turned F16/F32 GGUF tensors into dense tensors on the "
            "CPU whatever the model's device. llama.cpp never quantizes the router (ffn_gate_inp, "
            "F16 in TheBloke's Mixtral files), so in Mixtral only the routers left the GPU and the "
            "MoE forward failed with a device mismatch. Injected: every float-typed QMatMul weight "
            "on an accelerator is replaced by a CPU copy. The tracer's first offence is the "
            "router's matmul (x on the device, the weight on the CPU): a mismatch, which real CUDA "
            "(and the emulation) refuses, at the first such router and its GGUF tensor."
        ),
        expected_class=MISMATCH,
        requires="an F16/F32/BF16 QMatMul weight (the router) on an accelerator",
        _applies=lambda m: bool(_float_qmatmuls(m)),
        _location=_candle_location,
        _inject=_candle_inject,
    ),
    Fault(
        name="router-topk-on-host",
        summary="MoE routing (softmax, top-k, renormalisation) computed on the CPU",
        doc=(
            "MoE code that fetches the router logits to the host to pick the experts (the style "
            "of many early Mixtral ports) and sends weights and indices back. Nothing raises; "
            "each layer pays a device-to-host copy that waits for the device. Injected into the "
            "first MoE layer on an accelerator. The tracer's first offence is that copy inside "
            "the MoE module (a sync; the logits are no GGUF tensor), followed by strays (softmax "
            "and top-k on the host) and undeclared transfers back."
        ),
        expected_class=SYNC,
        requires="a MoE layer on an accelerator",
        _applies=_has_moe_on_accel,
        _location=lambda m: (_moe_path(m), None),
        _inject=_topk_inject,
    ),
    Fault(
        name="item-in-routing",
        summary="a .item() host read inside MoE routing",
        doc=(
            "A host read of device data in routing (`if total.min().item() < eps:` before "
            "renormalising the top-k weights), the kind of check that makes every layer wait for "
            "the GPU. The values are unchanged. Injected into the first MoE layer on an "
            "accelerator; the tracer's first offence is the _local_scalar_dense (item) in that "
            "MoE module: a sync."
        ),
        expected_class=SYNC,
        requires="a MoE layer on an accelerator",
        _applies=_has_moe_on_accel,
        _location=lambda m: (_moe_path(m), None),
        _inject=_item_inject,
    ),
    Fault(
        name="expert-indices-on-cpu",
        summary="the expert combine step works from CPU copies of the expert indices",
        doc=(
            "Expert dispatch that fetches the chosen expert indices to the host to build its "
            "batches (as in implementations that group tokens per expert on the CPU). The copy "
            "waits for the device, and the CPU indices then meet device tensors: index_select of "
            "the expert stacks with a CPU index (gather path) or a CPU routing mask times device "
            "weights (dense path), which CUDA refuses. Injected into the experts of the first MoE "
            "layer on an accelerator; the tracer's first offence is the device-to-host copy of "
            "the indices in that experts module (a sync), then mismatches."
        ),
        expected_class=SYNC,
        requires="a MoE layer on an accelerator",
        _applies=_has_moe_on_accel,
        _location=lambda m: (_experts_path(m), None),
        _inject=_indices_inject,
    ),
    Fault(
        name="kv-cache-on-cpu",
        summary="KV cache allocated on the CPU (torch.zeros without device=)",
        doc=(
            "A KV cache allocated without device= lands on the CPU while the layer runs on the "
            "GPU. Writing the new keys into it is a device-to-host copy, then attention multiplies "
            "device queries with host keys, which CUDA refuses. Injected into the first layer on "
            "an accelerator. KVCache has no forward of its own (attention calls cache.update), so "
            "the tracer's first offence, the copy into the cache (a sync), is in the attention "
            "module, with no GGUF tensor. Where the attention runs fused (`harness::attention`, "
            "on a real GPU), that op refuses the host cache: a mismatch in the same module."
        ),
        expected_class=SYNC,
        requires="a layer on an accelerator",
        _applies=_has_layer_on_accel,
        _location=lambda m: (_attn_path(m), None),
        _inject=_kv_inject,
        _expected=_kv_expected,
    ),
    Fault(
        name="rope-tables-on-cpu",
        summary="RoPE cos/sin tables left on the CPU",
        doc=(
            "RoPE tables built once on the host and never moved (a cache keyed without the device, "
            "or registered after .to()). The rotation multiplies device activations by host "
            "tables, which CUDA refuses. Injected into the first layer on an accelerator; the "
            "tracer's first offence is that multiply in the rope module: a mismatch, with no GGUF "
            "tensor (the tables are computed, not read from the file). Where the attention runs "
            "fused (`harness::attention`, on a real GPU), that op refuses the host tables: the "
            "mismatch is in the attention module."
        ),
        expected_class=MISMATCH,
        requires="a layer on an accelerator",
        _applies=_has_layer_on_accel,
        _location=_rope_location,
        _inject=_rope_inject,
    ),
    Fault(
        name="causal-mask-on-host",
        summary="causal mask built on the host on every call, then uploaded",
        doc=(
            "The causal mask built with torch.arange without device= on every call and copied to "
            "the GPU before masked_fill. Nothing raises, but each layer runs small host ops and "
            "uploads a mask per call. Injected into the first layer on an accelerator; the "
            "tracer's first offence is the host arange in the attention module: a stray (an op "
            "on the CPU in a module placed on the accelerator), then an undeclared transfer."
        ),
        expected_class=STRAY,
        requires="a layer on an accelerator",
        _applies=_has_layer_on_accel,
        _location=lambda m: (_attn_path(m), None),
        _inject=_mask_inject,
    ),
    Fault(
        name="dequant-host-constants",
        summary="dequantization builds its shift vectors and codebook on the host per call",
        doc=(
            "A dequantizer that makes its constants (nibble and bit shift vectors, the IQ4 "
            "codebook) with torch.tensor(...) on every call and without device=, instead of "
            "keeping one copy per device. Shifting device blocks by a host vector is refused by "
            'CUDA. Injected by overriding the "dequant" table of harness.device_tables (and turning off the Triton '
            "kernels, which have tables of their own, so the torch path runs on a real GPU too). "
            "The tracer's first offence is a mismatch in the first per-call dequantization on an "
            "accelerator whose type uses the constants (the embedding when it is there, else the "
            "first quantized projection), with that weight's GGUF name."
        ),
        expected_class=MISMATCH,
        requires="a per-call dequantization of a block type (not F32/F16/Q8_0) on an accelerator, "
        "in the embedding or a QMatMul kept quantized",
        _applies=lambda m: _first_const_site(m) is not None,
        _location=_first_const_site,
        _inject=_dequant_inject,
    ),
    Fault(
        name="embedding-output-on-cpu",
        summary="the token embedding is dequantized on the host and its output left there",
        doc=(
            "The embedding looks up its rows on the GPU and then dequantizes them with a host-only "
            "routine (a numpy dequantizer, a CPU-only kernel), so its output stays on the CPU and "
            "the first layer meets host activations. Injected into `embed` when it is on an "
            "accelerator; the tracer's first offence is the device-to-host copy of the looked-up "
            "rows of token_embd.weight in the embedding: a sync."
        ),
        expected_class=SYNC,
        requires="the token embedding on an accelerator",
        _applies=lambda m: _accel(m.placement.embed),
        _location=lambda m: ("embed", m.embed.gguf_name),
        _inject=_embed_inject,
    ),
    Fault(
        name="head-on-wrong-gpu",
        summary="the output head's weights on another GPU than the final norm",
        doc=(
            "A device map applied to the output norm but not to the output projection (or a "
            "weight moved with the wrong index), so the head's weights sit on another GPU. "
            "Injected by moving the head's weight to the next GPU. Kept quantized, the head first "
            "dequantizes its blocks on that GPU: the tracer's first offence is a stray in `head` "
            "naming its GGUF tensor, and the product then mixes the two GPUs (a mismatch CUDA "
            "refuses). With the weight dequantized at load the first offence is that mismatch."
        ),
        expected_class=STRAY,
        requires="the output head on an accelerator, and at least 2 accelerator devices",
        _applies=_head_applies,
        _location=_head_location,
        _inject=_head_inject,
        _expected=_head_expected,
    ),
    Fault(
        name="lost-boundary-transfer",
        summary="a device-map boundary without its explicit transfer",
        doc=(
            "A split model whose forward forgets to move the activations at one declared "
            "boundary (e.g. between the CPU layers and the offloaded ones, or between two GPUs). "
            "Injected by replacing the model's forward with one that skips the transfer at the "
            "first boundary. The module entered then gets activations on the previous device: "
            "the tracer's first offence is a stray in the first module inside it (its norm), "
            "followed by a mismatch where they meet its weight."
        ),
        expected_class=STRAY,
        requires="a placement with a device-map boundary (two devices)",
        _applies=lambda m: bool(m.placement.boundaries()),
        _location=_lost_boundary_location,
        _inject=_lost_boundary_inject,
    ),
    Fault(
        name="norm-weight-on-cpu",
        summary="an RMSNorm weight (F32 in GGUF) left on the CPU",
        doc=(
            "The same family as candle-1815 for the other F32 tensors a quantized GGUF has: the "
            "norm weights, 1-D, kept on the host by a loader that only moves quantized tensors. "
            "Injected into the attention norm of the first layer on an accelerator; the tracer's "
            "first offence is the multiply by the norm weight: a mismatch at that module and its "
            "GGUF tensor."
        ),
        expected_class=MISMATCH,
        requires="a layer on an accelerator",
        _applies=_has_layer_on_accel,
        _location=_norm_location,
        _inject=_norm_inject,
    ),
]

CATALOG: dict[str, Fault] = {f.name: f for f in (*_FAULTS, *_GENERIC)}
GENERIC: dict[str, Fault] = {f.name: f for f in _GENERIC}


def names() -> list[str]:
    """The catalog's fault names, in catalog order."""
    return list(CATALOG)


def get(name: str) -> Fault:
    """The fault called `name`; UsageError naming the known faults otherwise."""
    try:
        return CATALOG[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(CATALOG), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(
            None, "fault", f"unknown fault {name!r}; {hint}`harness faults` lists the {len(CATALOG)} known"
        ) from None
