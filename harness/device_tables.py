"""Per-device constant tables: the one registry that quant, the model and the emulation share.

A constant table (the dequantizers' shift vectors and IQ4 codebook, the RoPE cos/sin tables) is
built once per device and kept. It is built at load (`Mixtral` warms every device of its
placement) or when a tensor first moves to a device (`QTensor.to`), never inside a traced
forward: there its copy onto the device would read as the model's own traffic, and the first
offence would name the table instead of the weight whose dequantization needed it.

    from harness.device_tables import TABLES

    TABLES.define("dequant", build)               # build(device) -> the table(s) on `device`
    TABLES.get("dequant", device)                 # built on first use, then kept
    TABLES.define("rope", build, params=True)     # build(device, *params): one table per params
    TABLES.get("rope", device, dim, base, n)
    TABLES.warm(device)                           # every table without parameters, built now

For those who manage devices:
- `take(device_type)` removes and returns the entries on devices of that type, `give(entries)`
  puts entries back: the emulated accelerator keeps real CUDA entries aside while it runs, and
  its own emulated entries aside between its blocks;
- `override(name, build)` makes `get(name, ...)` call `build` on every call and keep nothing
  (None ends it; it returns the override it replaced): how a fault stands in for code that
  rebuilds its constants on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TABLES", "DeviceTables"]


class DeviceTables:
    """Named builders, and the tables they built, keyed by (name, device, *params)."""

    def __init__(self) -> None:
        self._builders: dict[str, Callable[..., Any]] = {}
        self._warmable: set[str] = set()
        self._overrides: dict[str, Callable[..., Any]] = {}
        self._tables: dict[tuple, Any] = {}

    def define(self, name: str, build: Callable[..., Any], *, params: bool = False) -> None:
        """`build(device)` makes table `name` on `device` (`build(device, *params)` with `params`:
        one table per parameter tuple, which `warm` cannot know). Defining a name again replaces
        its builder and drops the tables the old one built."""
        self._builders[name] = build
        if params:
            self._warmable.discard(name)
        else:
            self._warmable.add(name)
        for key in [k for k in self._tables if k[0] == name]:
            del self._tables[key]

    def get(self, name: str, device: torch.device | str, *params) -> Any:
        """Table `name` on `device` (for `params`), built on first use and kept."""
        device = torch.device(device)
        override = self._overrides.get(name)
        if override is not None:
            return override(device, *params)
        key = (name, device, *params)
        table = self._tables.get(key)
        if table is None:
            try:
                build = self._builders[name]
            except KeyError:
                raise KeyError(f"no device table {name!r} (defined: {', '.join(self._builders)})") from None
            table = self._tables[key] = build(device, *params)
        return table

    def warm(self, device: torch.device | str) -> None:
        """Build now every table of `device` that takes no parameters."""
        for name in self._builders:
            if name in self._warmable:
                self.get(name, device)

    def has(self, name: str, device: torch.device | str, *params) -> bool:
        """Whether table `name` is built on `device` (for `params`)."""
        return (name, torch.device(device), *params) in self._tables

    def take(self, device_type: str) -> dict[tuple, Any]:
        """Remove and return the tables on devices of `device_type` ("cuda")."""
        taken = {k: v for k, v in self._tables.items() if k[1].type == device_type}
        for key in taken:
            del self._tables[key]
        return taken

    def give(self, entries: dict[tuple, Any]) -> None:
        """Put back entries that `take` returned."""
        self._tables.update(entries)

    def override(self, name: str, build: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """While `build` is set, `get(name, device, *params)` returns `build(device, *params)` on
        every call, kept nowhere; None ends it. Returns the override it replaces (or None)."""
        previous = self._overrides.pop(name, None)
        if build is not None:
            self._overrides[name] = build
        return previous

    def overridden(self, name: str) -> Callable[..., Any] | None:
        """The override of `name` now in force, or None."""
        return self._overrides.get(name)


TABLES = DeviceTables()
