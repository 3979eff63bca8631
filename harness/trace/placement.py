"""Where the tracer expects each module of any model to compute: `ModulePlacement`.

A placement is a map from module-path prefixes to devices (the longest prefix of a module's path
wins; "" is the whole model). `ModulePlacement.of(model, placement)` makes one from what a user
gives:

- a device ("cuda:0"): every module there;
- a dict {module-path prefix: device}, e.g. {"": "cuda:0", "lm_head": "cpu"}; a key
  `prefix.A-B` stands for `prefix.A` ... `prefix.B` (`"model.layers.0-15": "cuda:0"`);
- a harness `Placement` (a Mixtral's own, device map included): each module where it says;
- nothing: the model's own `placement` where it has one (a `Mixtral`), else where each module's
  own parameters and buffers are when tracing starts. A module with none of its own is expected
  where all of its submodules' are, or else where its parent is expected; a module under an
  offloading hook (accelerate's `dispatch_model` / `device_map="auto"`: its weights wait on the
  CPU, on disk or on `meta` and are moved in for each call) is expected on the hook's execution
  device. An inferred placement declares a split one way only: where nothing else declares it
  (no `placement=`, no model placement, no offloading hook making the copy), an activation
  copied back to a device it left in the same forward call is a `transfer` (a router left on
  the CPU whose code moves activations to it and back, say);
- `{}`: no expectations (no op is stray).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from harness.errors import UsageError
from harness.model.placement import parse_device

_RANGE = re.compile(r"^(.*?)(\d+)-(\d+)$")


def _device(spec, what: str) -> str:
    return str(parse_device(spec, what))


def is_lazy(t: torch.Tensor) -> bool:
    """An uninitialized parameter or buffer of a lazy module (`nn.LazyLinear`, ...)."""
    return isinstance(t, torch.nn.parameter.UninitializedTensorMixin)


def own_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of a module's own parameters, then its own buffers (None ones left out):
    what `named_parameters(recurse=False)` and `named_buffers(recurse=False)` give, read from
    the module's tables (their generators take about 10 times as long: tracing a model starts
    with this for every module)."""
    params, buffers = getattr(module, "_parameters", None), getattr(module, "_buffers", None)
    if isinstance(params, dict) and isinstance(buffers, dict):
        return [(name, t) for name, t in (*params.items(), *buffers.items()) if t is not None]
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def execution_device(module: torch.nn.Module) -> str | None:
    """The device an offloading hook (accelerate's `AlignDevicesHook`, alone or inside a
    `SequentialHook`) runs `module` on, else None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))
    for h in hooks:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return _device(device if not isinstance(device, int) else f"cuda:{device}", "execution_device")
    return None


class ModulePlacement:
    """Module-path prefix -> expected device (a str), for any `nn.Module`."""

    def __init__(self, prefixes: Mapping[str, str], modules: list[str] | None = None, declared: bool = True):
        self.prefixes = dict(prefixes)
        # Given by the user or the model (a device map), not inferred from where weights are:
        # an inferred split is a boundary one way only (see `Classifier._at_boundary`).
        self.declared = declared
        self._cache: dict[str, str | None] = {}
        self._under: dict[str, frozenset[str]] = {}
        self._modules = modules  # every module path of the model, when known

    @classmethod
    def of(cls, model: torch.nn.Module | None, placement=None) -> ModulePlacement | None:
        """The placement to trace `model` against (see the module doc); None for none."""
        if isinstance(placement, ModulePlacement):
            return placement
        if placement is None and model is not None:
            placement = getattr(model, "placement", None)
            if placement is None or not hasattr(placement, "device_of"):
                return cls.inferred(model)
        if placement is None:
            return None
        modules = [path for path, _ in model.named_modules()] if model is not None else None
        if isinstance(placement, (str, torch.device)):
            return cls({"": _device(placement, "placement")}, modules)
        if isinstance(placement, Mapping):
            return cls(_expand(placement, modules), modules)
        if hasattr(placement, "device_of") and model is not None:
            # a harness Placement (a Mixtral's): ask it for each module of the model
            return cls({path: str(placement.device_of(path)) for path in modules}, modules)
        raise UsageError(
            None, "placement", f"a device, a dict of module prefixes to devices, or None; got {placement!r}"
        )

    @classmethod
    def inferred(cls, model: torch.nn.Module) -> ModulePlacement:
        """Where each module's own parameters and buffers are now (see the module doc)."""
        named = dict(model.named_modules())
        hooked = {path: d for path, m in named.items() if (d := execution_device(m)) is not None}
        own: dict[str, set[str]] = {}
        for path, module in named.items():
            if path in hooked:  # its weights wait elsewhere (host, disk, meta); it runs here
                own[path] = {hooked[path]}
                continue
            # a lazy module's uninitialized parameters have no place yet
            own[path] = {str(t.device) for _, t in own_tensors(module) if not is_lazy(t)}
        under: dict[str, set[str]] = {path: set(devices) for path, devices in own.items()}
        for path in sorted(named, key=lambda p: -p.count(".") if p else 1):
            if path:
                parent = path.rsplit(".", 1)[0] if "." in path else ""
                under.setdefault(parent, set()).update(under[path])
        prefixes: dict[str, str] = {}
        for path in named:  # parents before children (named_modules' order)
            hook = next((hooked[p] for p in _ancestors(path) if p in hooked), None)
            if hook is not None:
                prefixes[path] = hook
            elif len(own[path]) == 1:
                prefixes[path] = next(iter(own[path]))
            elif not own[path] and len(under[path]) == 1:
                prefixes[path] = next(iter(under[path]))
            elif not own[path] and not under[path]:
                continue  # no tensors at all: where its parent is (the longest prefix)
            else:
                prefixes[path] = ""  # several devices: no single expectation
        return cls(prefixes, list(named), declared=False)

    def device_of(self, path: str | None) -> str | None:
        """The device a module is expected on, by its path; None where there is no single one."""
        if path is None:
            return None
        device = self._cache.get(path, False)
        if device is False:
            device = None
            for p in _ancestors(path):
                if p in self.prefixes:
                    device = self.prefixes[p] or None
                    break
            self._cache[path] = device
        return device

    def devices_under(self, path: str) -> frozenset[str]:
        """The devices a module and its submodules are expected on."""
        devices = self._under.get(path)
        if devices is None:
            paths = self._modules if self._modules is not None else list(self.prefixes)
            inside = [p for p in paths if p == path or not path or p.startswith(path + ".")]
            devices = frozenset(d for p in inside if (d := self.device_of(p)) is not None)
            self._under[path] = devices
        return devices

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for d in self.prefixes.values() if d))

    def describe(self) -> dict[str, str]:
        """The placement as a compact map: each prefix whose device differs from its parent's."""
        out: dict[str, str] = {}
        for path in sorted(self.prefixes, key=_path_key):
            device = self.prefixes[path] or None
            parent = (
                self.device_of(path.rsplit(".", 1)[0])
                if "." in path
                else (self.device_of("") if path else None)
            )
            if path == "" or device != parent:
                out[path] = device if device is not None else "(several)"
        return out

    def __repr__(self) -> str:
        return f"ModulePlacement({self.describe()})"


def _ancestors(path: str):
    """`a.b.c`, `a.b`, `a`, `` (the longest prefix first)."""
    while True:
        yield path
        if not path:
            return
        path = path.rsplit(".", 1)[0] if "." in path else ""


def _path_key(path: str):
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.split(".")] if path else []


def _expand(placement: Mapping, modules: list[str] | None) -> dict[str, str]:
    """A user's {prefix: device} with `prefix.A-B` ranges expanded; every prefix must name a module."""
    out: dict[str, str] = {}
    for key, spec in placement.items():
        if not isinstance(key, str):
            raise UsageError(None, "placement", f"keys are module-path prefixes (str), got {key!r}")
        device = _device(spec, f"placement[{key!r}]")
        m = _RANGE.match(key)
        keys = [key]
        if m and (modules is None or key not in modules):
            first, last = int(m[2]), int(m[3])
            if first > last:
                raise UsageError(None, f"placement[{key!r}]", f"the range {first}-{last} is empty")
            keys = [f"{m[1]}{i}" for i in range(first, last + 1)]
        for k in keys:
            if modules is not None and k not in modules:
                raise UsageError(None, f"placement[{key!r}]", f"the model has no module {k!r}")
            out[k] = device
    return out
