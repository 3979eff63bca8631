"""Where each part of the model lives: the embedding, each layer, and the head.

A placement comes from one device for everything, a device map
(`{"embed": "cpu", "layers.0-15": "cuda:0", "layers.16-31": "cuda:1", "head": "cuda:1"}`), or
llama.cpp-style partial offload (`n_gpu_layers=N`: the last N layers on the GPU, and the output
head too once N exceeds the layer count; the token embedding stays on the CPU, as in llama.cpp).
Activations cross devices only at the boundaries a placement declares.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from harness.errors import DeviceError, UsageError

_LAYER_KEY = re.compile(r"^layers\.(\d+)(?:-(\d+))?$")


def device_available(device: torch.device) -> bool:
    """Whether torch can put tensors on `device` here."""
    if device.type in ("cpu", "meta"):
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return False


def parse_device(spec: str | torch.device, what: str = "device") -> torch.device:
    """A device name -> torch.device ("cuda" becomes "cuda:0"); DeviceError if it is not here."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(None, what, f"{spec!r} is not a device name") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if not device_available(device):
        raise DeviceError(None, what, f"device {device} does not exist here")
    return device


@dataclass(frozen=True)
class Placement:
    embed: torch.device
    layers: tuple[torch.device, ...]
    head: torch.device  # the output norm and the output head

    @classmethod
    def single(cls, device: str | torch.device, n_layers: int) -> Placement:
        d = parse_device(device)
        return cls(d, (d,) * n_layers, d)

    @classmethod
    def from_map(cls, device_map: dict[str, str], n_layers: int) -> Placement:
        embed = head = None
        layers: list[torch.device | None] = [None] * n_layers
        for key, spec in device_map.items():
            device = parse_device(spec, f"device_map[{key!r}]")
            if key == "embed":
                embed = device
            elif key == "head":
                head = device
            elif m := _LAYER_KEY.match(key):
                first, last = int(m[1]), int(m[2] if m[2] is not None else m[1])
                if not first <= last < n_layers:
                    raise UsageError(
                        None, f"device_map[{key!r}]", f"layers {first}-{last} are outside 0-{n_layers - 1}"
                    )
                for i in range(first, last + 1):
                    if layers[i] is not None:
                        raise UsageError(None, f"device_map[{key!r}]", f"layer {i} is placed twice")
                    layers[i] = device
            else:
                raise UsageError(
                    None, f"device_map[{key!r}]", "keys are 'embed', 'head', 'layers.N' or 'layers.A-B'"
                )
        missing = [i for i, d in enumerate(layers) if d is None]
        if missing:
            raise UsageError(None, "device_map", f"layers {_ranges(missing)} are not placed")
        if embed is None:
            raise UsageError(None, "device_map", "'embed' is not placed")
        if head is None:
            raise UsageError(None, "device_map", "'head' is not placed")
        return cls(embed, tuple(layers), head)

    @classmethod
    def offload(cls, n_gpu_layers: int, n_layers: int, gpu: str | torch.device = "cuda") -> Placement:
        """llama.cpp's partial offload: layers i >= n_layers - N on the GPU, the head when N > n_layers."""
        if n_gpu_layers < 0:
            raise UsageError(None, "n_gpu_layers", f"must not be negative, got {n_gpu_layers}")
        cpu = torch.device("cpu")
        g = parse_device(gpu) if n_gpu_layers > 0 else cpu
        first_gpu = max(n_layers - n_gpu_layers, 0)
        layers = tuple(g if i >= first_gpu else cpu for i in range(n_layers))
        return cls(cpu, layers, g if n_gpu_layers > n_layers else cpu)

    @classmethod
    def resolve(
        cls,
        n_layers: int,
        device: str | torch.device | None = None,
        device_map: dict[str, str] | None = None,
        n_gpu_layers: int | None = None,
    ) -> Placement:
        """Exactly one of `device_map` and `n_gpu_layers` may be given; `device` alone places
        everything (default "cpu"), and with `n_gpu_layers` names the GPU."""
        if device_map is not None and n_gpu_layers is not None:
            raise UsageError(None, "device_map", "give a device map or n_gpu_layers, not both")
        if device_map is not None:
            if device is not None:
                raise UsageError(None, "device_map", "give a device map or a device, not both")
            return cls.from_map(device_map, n_layers)
        if n_gpu_layers is not None:
            return cls.offload(n_gpu_layers, n_layers, device or "cuda")
        return cls.single(device or "cpu", n_layers)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every device used, in order of first use."""
        return tuple(dict.fromkeys((self.embed, *self.layers, self.head)))

    def boundaries(self) -> list[tuple[str, torch.device, torch.device]]:
        """The declared transfers, in forward order: (module entered, from device, to device)."""
        out = []
        prev = self.embed
        for i, d in enumerate(self.layers):
            if d != prev:
                out.append((f"layers.{i}", prev, d))
            prev = d
        if self.head != prev:
            out.append(("norm", prev, self.head))
        return out

    def device_of(self, module_path: str) -> torch.device:
        """The device a module of the model is placed on, by its path (`layers.3.moe.router`)."""
        if module_path in ("", "embed") or module_path.startswith("embed."):
            return self.embed
        m = re.match(r"^layers\.(\d+)(\.|$)", module_path)
        if m:
            return self.layers[int(m[1])]
        return self.head

    def describe(self) -> dict[str, str]:
        """The placement as a compact device map."""
        out = {"embed": str(self.embed)}
        start = 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i] != self.layers[start]:
                key = f"layers.{start}" if i - 1 == start else f"layers.{start}-{i - 1}"
                out[key] = str(self.layers[start])
                start = i
        out["head"] = str(self.head)
        return out


def _ranges(xs: list[int]) -> str:
    parts, start = [], xs[0]
    for a, b in zip(xs, [*xs[1:], None], strict=True):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)
