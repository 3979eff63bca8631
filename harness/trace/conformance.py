"""The conformance table: op x placement -> does real CUDA accept it?

Each `Row` builds its inputs on the CPU (fixed values), puts each on the device its placement
names (`gpu` = cuda:0, `gpu1` = cuda:1, `cpu`), runs one op and says what real CUDA does with that
placement: `ACCEPTS` or `REFUSES` (a RuntimeError about devices), with the fact behind it
(`why`). `run_row(row, backend)` runs a row on

- `"cuda"`: the real GPU(s); rows that need two GPUs are `UNSUPPORTED` on a machine with one;
- `"emulated"`: `harness.trace.emulated.EmulatedCuda` (two emulated devices), anywhere;
- `"cpu"`: every placement on the CPU, the reference values (every row accepts there).

Every row runs in each grad mode of `GRAD_MODES` (inference mode, no_grad, grad enabled with the
floating inputs requiring grad, where an accepted row's backward pass runs too). The tests check
every row's verdict in every mode against the emulation everywhere and against real CUDA under
`pytest -m cuda` (which also compares the backward's verdict with the emulation's), so the two
agree on every row; accepted rows also give the output's device and
values equal to the CPU reference. Like llama.cpp's test-backend-ops, a row prints its own
parameters (`str(row)`), and "unsupported here" is not a failure.

Sources of the verdicts (aten, PyTorch 2.x): the generated CUDA wrappers check all positional and
out tensors against the first one (`check_and_update_common_device`, no exception for 0-dim CPU
tensors): mm, addmm, bmm, cat, index_select, index_add, index_copy, gather, scatter_add, take,
clamp(Tensor) ...; ops marked `device_check: NoCheck` do their own: TensorIterator's
`compute_types` (binary/comparison ops allow one 0-dim CPU input), `where_self_out` (moves 0-dim
operands), `masked_fill__cuda` (mask on self's device), `index` (`check_indices_on_cpu_or_selfdevice`,
CPU indices moved), `_index_put_impl_` (indices moved, 0-dim value moved), `copy_` (any devices).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.trace import emulated
from harness.trace.classify import is_device_error

ACCEPTS, REFUSES, UNSUPPORTED, ERROR = "accepts", "refuses", "unsupported", "error"
BACKENDS = ("cuda", "emulated", "cpu")
# The grad modes a row runs in: the dispatch modes see other ops in each (inference mode
# decomposes composite ops below autograd; with grad, inputs that can require grad do).
INFERENCE, NO_GRAD, GRAD = "inference_mode", "no_grad", "grad"
GRAD_MODES = (INFERENCE, NO_GRAD, GRAD)
PLACES = ("gpu", "gpu1", "cpu")


def is_refusal(exc: BaseException) -> bool:
    """Whether an exception is the backend refusing operands on different devices (the one
    recognizer of device errors, `classify.is_device_error`, on the exception types backends use)."""
    return isinstance(exc, (RuntimeError, IndexError, ValueError, NotImplementedError)) and is_device_error(
        str(exc)
    )


# ---- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """An input: where it goes (`gpu`, `gpu1`, `cpu`) and how to make its CPU values."""

    place: str
    make: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self, devices: dict[str, str]) -> str:
        dims = "x".join(map(str, self.shape)) if self.shape else "0-dim"
        dt = "" if self.dtype == torch.float32 else f" {str(self.dtype).removeprefix('torch.')}"
        return f"{devices[self.place]} [{dims}]{dt}"


@dataclass(frozen=True)
class Dev:
    """A device argument: the device a place names on the backend (`to(device)`)."""

    place: str

    def describe(self, devices: dict[str, str]) -> str:
        return devices[self.place]


def _values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def f32(place: str, *shape: int, seed: int = 0) -> Input:
    """Distinct float32 values (ties would let CUDA and the CPU order top-k/sort differently)."""
    n = 1
    for s in shape:
        n *= s

    def make():
        v = _values((n,), seed)
        return (v + torch.arange(n) * 1e-3).reshape(shape)

    return Input(place, make, tuple(shape), torch.float32)


def scalar(place: str, value: float = 2.0) -> Input:
    """A 0-dim float32 tensor."""
    return Input(place, lambda: torch.tensor(value), (), torch.float32)


def longs(place: str, values: list[int]) -> Input:
    return Input(place, lambda: torch.tensor(values, dtype=torch.long), (len(values),), torch.long)


def long_grid(place: str, values: list[list[int]]) -> Input:
    return Input(
        place, lambda: torch.tensor(values, dtype=torch.long), (len(values), len(values[0])), torch.long
    )


def mask(place: str, *shape: int, seed: int = 1) -> Input:
    def make():
        m = _values(shape, seed) > 0
        m.view(-1)[0] = True  # never empty
        return m

    return Input(place, make, tuple(shape), torch.bool)


def flag(place: str, value: bool = True) -> Input:
    """A 0-dim bool tensor."""
    return Input(place, lambda: torch.tensor(value), (), torch.bool)


# ---- rows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One op with one placement of its inputs, and what real CUDA does with it."""

    op: str
    inputs: dict[str, Input | Dev]
    call: Callable[..., object]  # called with the inputs, positionally, in order
    expect: str  # ACCEPTS or REFUSES
    why: str
    out: str | None = None  # where an accepted result lives (a place), checked when given
    note: str = ""  # what makes this row differ from its neighbours, for the id

    @property
    def gpus(self) -> int:
        return 2 if any(i.place == "gpu1" for i in self.inputs.values()) or self.out == "gpu1" else 1

    def describe(self, devices: dict[str, str] | None = None) -> str:
        devices = devices or {"gpu": "cuda:0", "gpu1": "cuda:1", "cpu": "cpu"}
        args = ", ".join(f"{k}={v.describe(devices)}" for k, v in self.inputs.items())
        note = f", {self.note}" if self.note else ""
        return f"{self.op}({args}{note})"

    @property
    def id(self) -> str:
        return self.describe()

    def __str__(self) -> str:
        return f"{self.describe()} -> {self.expect}"


def _setitem(x, idx, v):
    x[idx] = v
    return x


TI = "TensorIterator (compute_types): one 0-dim CPU input is taken as a scalar"
TI_STRICT = "TensorIterator (compute_types): all operands on the common device"
CODEGEN = "generated CUDA wrapper: check_and_update_common_device (no 0-dim exception)"
INDEX = "index: check_indices_on_cpu_or_selfdevice; CPU indices are copied to the device"
INDEX_PUT = "_index_put_impl_: indices moved to self's device; a 0-dim value is moved"
WHERE = "where_self_out: 0-dim operands on another device are moved to the op's device"
MASKED = "masked_fill__cuda: self and mask must be on the same device (0-dim too)"
COPY = "copy_/_to_copy cross devices by design"

A, R = ACCEPTS, REFUSES

ROWS: tuple[Row, ...] = (
    # -- matrix products
    Row("mm", {"a": f32("gpu", 4, 3), "b": f32("gpu", 3, 5, seed=1)}, torch.mm, A, "same device", out="gpu"),
    Row("mm", {"a": f32("gpu", 4, 3), "b": f32("cpu", 3, 5, seed=1)}, torch.mm, R, CODEGEN),
    Row("mm", {"a": f32("cpu", 4, 3), "b": f32("gpu", 3, 5, seed=1)}, torch.mm, R, CODEGEN),
    Row("mm", {"a": f32("gpu", 4, 3), "b": f32("gpu1", 3, 5, seed=1)}, torch.mm, R, CODEGEN),
    Row(
        "addmm",
        {"bias": f32("cpu", 5), "a": f32("gpu", 4, 3, seed=1), "b": f32("gpu", 3, 5, seed=2)},
        torch.addmm,
        R,
        CODEGEN,
    ),
    Row(
        "addmm",
        {"bias": scalar("cpu"), "a": f32("gpu", 4, 3, seed=1), "b": f32("gpu", 3, 5, seed=2)},
        torch.addmm,
        R,
        CODEGEN + ": a 0-dim CPU bias is refused too",
    ),
    Row("bmm", {"a": f32("gpu", 2, 4, 3), "b": f32("cpu", 2, 3, 5, seed=1)}, torch.bmm, R, CODEGEN),
    Row(
        "bmm",
        {"a": f32("gpu", 2, 4, 3), "b": f32("gpu", 2, 3, 5, seed=1)},
        torch.bmm,
        A,
        "same device",
        out="gpu",
    ),
    Row(
        "matmul",
        {"a": f32("gpu", 2, 4, 3), "b": f32("cpu", 3, 5, seed=1)},
        torch.matmul,
        R,
        "matmul -> mm: " + CODEGEN,
    ),
    Row(
        "matmul",
        {"a": f32("gpu", 4, 3), "b": f32("gpu1", 3, 5, seed=1)},
        torch.matmul,
        R,
        "matmul -> mm: " + CODEGEN,
    ),
    Row(
        "linear",
        {"x": f32("gpu", 4, 3), "w": f32("gpu", 5, 3, seed=1)},
        lambda x, w: F.linear(x, w),
        A,
        "same device",
        out="gpu",
    ),
    Row(
        "linear",
        {"x": f32("gpu", 4, 3), "w": f32("cpu", 5, 3, seed=1)},
        lambda x, w: F.linear(x, w),
        R,
        "linear -> mm: " + CODEGEN + " (candle#1815: the router weight left on the CPU)",
    ),
    Row(
        "linear",
        {"x": f32("gpu", 4, 3), "w": f32("gpu", 5, 3, seed=1), "b": f32("cpu", 5, seed=2)},
        F.linear,
        R,
        "linear -> addmm: " + CODEGEN,
    ),
    Row(
        "einsum",
        {"a": f32("gpu", 4, 3), "b": f32("gpu", 3, 5, seed=1)},
        lambda a, b: torch.einsum("ij,jk->ik", a, b),
        A,
        "same device",
        out="gpu",
    ),
    Row(
        "einsum",
        {"a": f32("gpu", 4, 3), "b": f32("cpu", 3, 5, seed=1)},
        lambda a, b: torch.einsum("ij,jk->ik", a, b),
        R,
        "einsum -> bmm: " + CODEGEN,
    ),
    # -- elementwise with CPU scalars
    Row("add", {"x": f32("gpu", 4, 3), "s": scalar("cpu")}, torch.add, A, TI, out="gpu"),
    Row("add", {"s": scalar("cpu"), "x": f32("gpu", 4, 3)}, torch.add, A, TI, out="gpu"),
    Row("mul", {"x": f32("gpu", 4, 3), "s": scalar("cpu")}, torch.mul, A, TI, out="gpu"),
    Row("mul", {"x": f32("gpu", 4, 3), "s": f32("cpu", 1)}, torch.mul, R, TI + "; shape [1] is not 0-dim"),
    Row("mul", {"x": f32("gpu", 4, 3), "y": f32("cpu", 4, 3, seed=1)}, torch.mul, R, TI_STRICT),
    Row("div", {"x": f32("gpu", 4, 3), "s": scalar("cpu")}, torch.div, A, TI, out="gpu"),
    Row(
        "gt",
        {"x": f32("gpu", 4, 3), "s": scalar("cpu", 0.0)},
        torch.gt,
        A,
        TI + " (comparison ops too)",
        out="gpu",
    ),
    Row(
        "add",
        {"x": f32("gpu", 4, 3), "s": scalar("gpu1")},
        torch.add,
        R,
        TI + "; a 0-dim tensor on another GPU is not a CPU scalar",
    ),
    Row(
        "add_",
        {"x": f32("gpu", 4, 3), "s": scalar("cpu")},
        lambda x, s: x.add_(s),
        A,
        TI,
        out="gpu",
        note="in place",
    ),
    Row(
        "add_",
        {"x": f32("cpu", 4, 3), "y": f32("gpu", 4, 3, seed=1)},
        lambda x, y: x.add_(y),
        R,
        TI_STRICT + "; the CPU output is never a scalar",
        note="in place",
    ),
    Row(
        "add",
        {"s": scalar("cpu"), "t": scalar("cpu", 3.0), "out": f32("gpu", 0)},
        lambda s, t, out: torch.add(s, t, out=out),
        R,
        "TensorIterator: at most one CPU scalar per CUDA kernel ('Trying to pass too many CPU scalars')",
    ),
    Row(
        "clamp",
        {"x": f32("gpu", 4, 3), "lo": scalar("cpu", 0.0)},
        lambda x, lo: torch.clamp(x, min=lo),
        R,
        "clamp.Tensor: TensorIterator without allow_cpu_scalars",
    ),
    Row(
        "fill_",
        {"x": f32("gpu", 4, 3), "v": scalar("cpu")},
        lambda x, v: x.fill_(v),
        A,
        "fill_(Tensor): a value on another device is read with item()",
        out="gpu",
    ),
    # -- where
    Row(
        "where",
        {"c": flag("cpu"), "x": f32("gpu", 4, 3), "y": f32("gpu", 4, 3, seed=1)},
        torch.where,
        A,
        WHERE,
        out="gpu",
    ),
    Row(
        "where",
        {"c": mask("cpu", 4, 3), "x": f32("gpu", 4, 3), "y": f32("gpu", 4, 3, seed=1)},
        torch.where,
        R,
        WHERE,
    ),
    Row(
        "where",
        {"c": mask("gpu", 4, 3), "x": f32("gpu", 4, 3), "y": scalar("cpu")},
        torch.where,
        A,
        WHERE,
        out="gpu",
    ),
    Row("where", {"c": mask("gpu", 4, 3), "x": f32("gpu", 4, 3), "y": f32("cpu", 1)}, torch.where, R, WHERE),
    Row(
        "where",
        {"c": mask("cpu", 4, 3), "x": scalar("gpu"), "y": scalar("gpu", 3.0)},
        torch.where,
        R,
        WHERE + "; the op's device is the first non-CPU operand's, even a 0-dim one",
    ),
    Row(
        "where",
        {"c": mask("gpu", 4, 3), "x": f32("gpu", 4, 3), "y": scalar("gpu1")},
        torch.where,
        A,
        WHERE + " (a 0-dim operand on another GPU too)",
        out="gpu",
    ),
    # -- masked_fill
    Row(
        "masked_fill",
        {"x": f32("gpu", 4, 3), "m": flag("cpu")},
        lambda x, m: x.masked_fill(m, 1.0),
        R,
        MASKED,
    ),
    Row(
        "masked_fill",
        {"x": f32("gpu", 4, 3), "m": mask("cpu", 4, 3)},
        lambda x, m: x.masked_fill(m, 1.0),
        R,
        MASKED,
    ),
    Row(
        "masked_fill",
        {"x": f32("gpu", 4, 3), "m": mask("gpu", 4, 3), "v": scalar("cpu")},
        lambda x, m, v: x.masked_fill(m, v),
        A,
        "masked_fill__cuda(Tensor value): a 0-dim value is read with item()",
        out="gpu",
    ),
    Row(
        "masked_fill",
        {"x": f32("cpu", 4, 3), "m": mask("gpu", 4, 3)},
        lambda x, m: x.masked_fill(m, 1.0),
        R,
        MASKED,
    ),
    # -- cat, stack
    Row(
        "cat",
        {"a": f32("gpu", 2, 3), "b": f32("gpu", 2, 3, seed=1)},
        lambda a, b: torch.cat([a, b]),
        A,
        "same device",
        out="gpu",
    ),
    Row(
        "cat",
        {"a": f32("gpu", 2, 3), "b": f32("cpu", 2, 3, seed=1)},
        lambda a, b: torch.cat([a, b]),
        R,
        CODEGEN,
    ),
    Row(
        "cat",
        {"a": f32("gpu", 2, 3), "b": f32("gpu1", 2, 3, seed=1)},
        lambda a, b: torch.cat([a, b]),
        R,
        CODEGEN,
    ),
    Row(
        "stack",
        {"a": f32("gpu", 2, 3), "b": f32("cpu", 2, 3, seed=1)},
        lambda a, b: torch.stack([a, b]),
        R,
        "stack -> cat: " + CODEGEN,
    ),
    # -- index ops with index tensors
    Row(
        "index_select",
        {"x": f32("gpu", 5, 3), "i": longs("cpu", [4, 0, 2])},
        lambda x, i: x.index_select(0, i),
        R,
        CODEGEN,
    ),
    Row(
        "index_select",
        {"x": f32("cpu", 5, 3), "i": longs("gpu", [4, 0, 2])},
        lambda x, i: x.index_select(0, i),
        R,
        CODEGEN,
    ),
    Row(
        "index_select",
        {"x": f32("gpu", 5, 3), "i": longs("gpu", [4, 0, 2])},
        lambda x, i: x.index_select(0, i),
        A,
        "same device",
        out="gpu",
    ),
    Row(
        "index_add_",
        {"x": f32("gpu", 5, 3), "i": longs("cpu", [4, 0]), "s": f32("gpu", 2, 3, seed=1)},
        lambda x, i, s: x.index_add_(0, i, s),
        R,
        CODEGEN + " (FakeTensor in older torch accepted this one)",
    ),
    Row(
        "index_add_",
        {"x": f32("gpu", 5, 3), "i": longs("gpu", [4, 0]), "s": f32("cpu", 2, 3, seed=1)},
        lambda x, i, s: x.index_add_(0, i, s),
        R,
        CODEGEN,
    ),
    Row(
        "index_copy_",
        {"x": f32("gpu", 5, 3), "i": longs("cpu", [4, 0]), "s": f32("gpu", 2, 3, seed=1)},
        lambda x, i, s: x.index_copy_(0, i, s),
        R,
        CODEGEN,
    ),
    Row(
        "gather",
        {"x": f32("gpu", 4, 3), "i": long_grid("cpu", [[0, 2], [1, 0], [2, 2], [0, 1]])},
        lambda x, i: x.gather(1, i),
        R,
        CODEGEN,
    ),
    Row(
        "scatter_add_",
        {
            "x": f32("gpu", 4, 3),
            "i": long_grid("cpu", [[0, 2], [1, 0], [2, 2], [0, 1]]),
            "s": f32("gpu", 4, 2, seed=1),
        },
        lambda x, i, s: x.scatter_add_(1, i, s),
        R,
        CODEGEN,
    ),
    Row(
        "scatter_add_",
        {
            "x": f32("gpu", 4, 3),
            "i": long_grid("gpu", [[0, 2], [1, 0], [2, 2], [0, 1]]),
            "s": f32("gpu", 4, 2, seed=1),
        },
        lambda x, i, s: x.scatter_add_(1, i, s),
        A,
        "same device",
        out="gpu",
    ),
    Row("take", {"x": f32("gpu", 4, 3), "i": longs("cpu", [0, 5, 11])}, torch.take, R, CODEGEN),
    Row(
        "embedding",
        {"ids": longs("cpu", [3, 0, 3]), "w": f32("gpu", 5, 4)},
        F.embedding,
        R,
        "embedding -> index_select: " + CODEGEN,
    ),
    Row(
        "embedding",
        {"ids": longs("gpu", [3, 0, 3]), "w": f32("gpu", 5, 4)},
        F.embedding,
        A,
        "same device",
        out="gpu",
    ),
    # -- advanced indexing
    Row(
        "index",
        {"x": f32("gpu", 5, 3), "i": longs("cpu", [4, 0, 2])},
        lambda x, i: x[i],
        A,
        INDEX,
        out="gpu",
        note="x[i]",
    ),
    Row(
        "index",
        {"x": f32("gpu", 5, 3), "m": mask("cpu", 5)},
        lambda x, m: x[m],
        A,
        INDEX,
        out="gpu",
        note="x[mask]",
    ),
    Row(
        "index",
        {"x": f32("gpu", 5, 3), "i": longs("gpu", [4, 0, 2])},
        lambda x, i: x[i],
        A,
        "same device",
        out="gpu",
        note="x[i]",
    ),
    Row(
        "index",
        {"x": f32("cpu", 5, 3), "i": longs("gpu", [4, 0, 2])},
        lambda x, i: x[i],
        R,
        INDEX,
        note="x[i]",
    ),
    Row(
        "index",
        {"x": f32("gpu", 5, 3), "i": longs("gpu1", [4, 0, 2])},
        lambda x, i: x[i],
        R,
        INDEX,
        note="x[i]",
    ),
    Row(
        "index_put_",
        {"x": f32("gpu", 5, 3), "i": longs("cpu", [4, 0]), "v": f32("gpu", 2, 3, seed=1)},
        _setitem,
        A,
        INDEX_PUT,
        out="gpu",
        note="x[i] = v",
    ),
    Row(
        "index_put_",
        {"x": f32("gpu", 5, 3), "i": longs("cpu", [4, 0]), "v": f32("cpu", 2, 3, seed=1)},
        _setitem,
        R,
        INDEX_PUT + "; a CPU value that is not 0-dim is refused (TensorIterator)",
        note="x[i] = v",
    ),
    Row(
        "index_put_",
        {"x": f32("gpu", 5, 3), "i": longs("cpu", [4, 0]), "v": scalar("cpu")},
        _setitem,
        A,
        INDEX_PUT,
        out="gpu",
        note="x[i] = v",
    ),
    Row(
        "index_put_",
        {"x": f32("gpu", 5, 3), "m": mask("gpu", 5, 3), "v": scalar("cpu")},
        _setitem,
        A,
        "_index_put_impl_: one mask on the device and a one-element CPU value -> masked_fill_",
        out="gpu",
        note="x[mask] = v",
    ),
    Row(
        "copy_",
        {"x": f32("gpu", 5, 3), "v": f32("cpu", 2, 3, seed=1)},
        lambda x, v: _setitem(x, slice(0, 2), v),
        A,
        "a basic-indexing setitem is a copy_ (any devices)",
        out="gpu",
        note="x[0:2] = v",
    ),
    # -- found by scripts/sweep_device_rules.py (PyTorch's OpInfo database on real CUDA)
    Row(
        "special_zeta",
        {"x": f32("gpu", 5), "q": scalar("cpu")},
        lambda x, q: torch.special.zeta(x.abs() + 1.5, q),  # x > 1: no NaN to compare
        A,
        TI,
        out="gpu",
    ),
    Row(
        "special_xlog1py",
        {"x": scalar("cpu"), "y": f32("gpu", 5)},
        lambda x, y: torch.special.xlog1py(x, y.abs()),
        A,
        TI,
        out="gpu",
    ),
    Row(
        "ldexp",
        {"x": f32("gpu", 5), "e": scalar("cpu", 3.0)},
        torch.ldexp,
        A,
        "CompositeExplicitAutograd: x * 2**e, elementwise ops that take a CPU scalar",
        out="gpu",
    ),
    Row("logical_and", {"a": f32("gpu", 5), "b": scalar("cpu")}, torch.logical_and, A, TI, out="gpu"),
    Row(
        "logical_and",
        {"a": scalar("cpu"), "b": f32("gpu", 5)},
        torch.logical_and,
        R,
        "CompositeExplicitAutograd: the result is made on self's device (the CPU) before TensorIterator",
    ),
    Row(
        "slice_scatter",
        {"x": f32("cpu", 4, 3), "src": f32("gpu", 2, 3, seed=1)},
        lambda x, src: torch.slice_scatter(x, src, 0, 0, 2),
        A,
        "CompositeExplicitAutograd: a clone of self with src copied in (any devices)",
        out="cpu",
    ),
    Row(
        "select_scatter",
        {"x": f32("gpu", 4, 3), "src": f32("cpu", 3, seed=1)},
        lambda x, src: torch.select_scatter(x, src, 0, 1),
        A,
        "CompositeExplicitAutograd: a clone of self with src copied in (any devices)",
        out="gpu",
    ),
    Row(
        "linspace",
        {"start": scalar("cpu", 0.0), "end": scalar("gpu", 1.0), "device": Dev("gpu")},
        lambda start, end, device: torch.linspace(start, end, 5, device=device),
        A,
        "tensor start and end are read as scalars; the result goes to `device`",
        out="gpu",
    ),
    Row(
        "resize_as_",
        {"x": f32("gpu", 4, 3), "t": f32("cpu", 4, 3, seed=1)},
        lambda x, t: x.resize_as_(t),
        A,
        "the template gives its sizes only",
        out="gpu",
    ),
    Row(
        "_unsafe_masked_index",
        {"x": f32("gpu", 5, 3), "m": mask("gpu", 4, 3), "i": longs("cpu", [0, 4, 2, 1])},
        lambda x, m, i: torch.ops.aten._unsafe_masked_index(x, m, [i], 0.0),
        A,
        INDEX,
        out="gpu",
    ),
    Row(
        "_unsafe_masked_index",
        {"x": f32("gpu", 5, 3), "m": mask("cpu", 4, 3), "i": longs("gpu", [0, 4, 2, 1])},
        lambda x, m, i: torch.ops.aten._unsafe_masked_index(x, m, [i], 0.0),
        R,
        "the mask is not an index: on self's device",
    ),
    # -- single-device ops of the MoE block
    Row("softmax", {"x": f32("gpu", 4, 3)}, lambda x: x.softmax(-1), A, "one device", out="gpu"),
    Row("topk", {"x": f32("gpu", 4, 6)}, lambda x: x.topk(2, dim=-1), A, "one device", out="gpu"),
    Row("argsort", {"x": f32("gpu", 4, 6)}, lambda x: x.argsort(dim=-1), A, "one device", out="gpu"),
    Row("one_hot", {"i": longs("gpu", [2, 0, 3])}, lambda i: F.one_hot(i, 4), A, "one device", out="gpu"),
    # -- transfers
    Row(
        "copy_",
        {"dst": f32("gpu", 4, 3), "src": f32("cpu", 4, 3, seed=1)},
        lambda dst, src: dst.copy_(src),
        A,
        COPY,
        out="gpu",
    ),
    Row(
        "copy_",
        {"dst": f32("cpu", 4, 3), "src": f32("gpu", 4, 3, seed=1)},
        lambda dst, src: dst.copy_(src),
        A,
        COPY,
        out="cpu",
    ),
    Row(
        "copy_",
        {"dst": f32("gpu", 4, 3), "src": f32("gpu1", 4, 3, seed=1)},
        lambda dst, src: dst.copy_(src),
        A,
        COPY,
        out="gpu",
    ),
    Row(
        "to",
        {"x": f32("cpu", 4, 3), "device": Dev("gpu")},
        lambda x, device: x.to(device),
        A,
        COPY,
        out="gpu",
    ),
    Row(
        "to",
        {"x": f32("gpu", 4, 3), "device": Dev("gpu1")},
        lambda x, device: x.to(device),
        A,
        COPY,
        out="gpu1",
    ),
    Row(
        "to",
        {"x": f32("gpu", 4, 3), "device": Dev("cpu")},
        lambda x, device: x.to(device),
        A,
        COPY,
        out="cpu",
    ),
    # -- host arguments: packed sequences read their lengths on the host (checkLongTensor)
    Row(
        "_pack_padded_sequence",
        {"x": f32("gpu", 2, 3, 4), "lengths": longs("cpu", [3, 2])},
        lambda x, lengths: torch._VF._pack_padded_sequence(x, lengths, True)[0],
        A,
        "lengths on the host, as the API wants them",
        out="gpu",
    ),
    Row(
        "_pack_padded_sequence",
        {"x": f32("gpu", 2, 3, 4), "lengths": longs("gpu", [3, 2])},
        lambda x, lengths: torch._VF._pack_padded_sequence(x, lengths, True)[0],
        R,
        "checkLongTensor: 'lengths' must be a 1D CPU int64 tensor, whatever the data's device",
    ),
    # -- ctc_loss with length tensors (LossCTC.cpp) copies them to the host and calls the int-list
    # overload, also under a tracer (harness.trace.untraced_paths); `_ctc_loss.Tensor` itself,
    # which PyTorch calls under any dispatch mode, checks them on log_probs' device
    *(
        Row(
            "ctc_loss",
            {
                "log_probs": f32(lp, 6, 2, 5),
                "targets": long_grid(tg, [[1, 2], [3, 4]]),
                "input_lengths": longs(lengths, [6, 5]),
                "target_lengths": longs(lengths, [2, 1]),
            },
            F.ctc_loss,
            A,
            why,
            out=lp,
        )
        for lp, tg, lengths, why in (
            ("gpu", "gpu", "cpu", "lengths copied to the host (no copy: there already), int-list overload"),
            ("gpu", "gpu", "gpu", "lengths copied to the host, int-list overload"),
            ("cpu", "gpu", "gpu", "lengths copied to the host, targets to log_probs' device (the CPU)"),
        )
    ),
    Row(
        "_ctc_loss.Tensor",
        {
            "log_probs": f32("gpu", 6, 2, 5),
            "targets": long_grid("gpu", [[1, 2], [3, 4]]),
            "input_lengths": longs("cpu", [6, 5]),
            "target_lengths": longs("cpu", [2, 1]),
        },
        lambda *args: torch.ops.aten._ctc_loss.Tensor(*args)[0],
        R,
        CODEGEN + ": the length tensors too",
    ),
)


# ---- running a row ---------------------------------------------------------------------------------


@dataclass
class Result:
    row: Row
    backend: str
    verdict: str  # ACCEPTS, REFUSES, UNSUPPORTED or ERROR
    error: str | None = None
    devices: tuple[str, ...] = ()  # devices of the tensor outputs, as placements name them
    values: tuple[torch.Tensor, ...] = ()  # the tensor outputs, on the CPU
    grad_mode: str = NO_GRAD
    # In GRAD mode, what a backward pass from the accepted outputs did (ACCEPTS, REFUSES, ERROR),
    # or None where nothing requires grad.
    backward: str | None = None
    backward_error: str | None = None

    def __str__(self) -> str:
        tail = f": {self.error}" if self.error else ""
        back = f"; backward {self.backward}" + (f": {self.backward_error}" if self.backward_error else "")
        back = back if self.backward else ""
        return f"{self.row.describe()} on {self.backend} ({self.grad_mode}): {self.verdict}{tail}{back}"


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def grad_context(grad_mode: str):
    """The context manager of a grad mode of `GRAD_MODES`."""
    if grad_mode == INFERENCE:
        return torch.inference_mode()
    if grad_mode == NO_GRAD:
        return torch.no_grad()
    if grad_mode == GRAD:
        return torch.enable_grad()
    raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def place_inputs(row: Row, devices: dict[str, torch.device], grad_mode: str = NO_GRAD) -> dict[str, object]:
    """The row's inputs, each on the device its place names (`Dev` inputs give the device itself);
    in GRAD mode the floating ones require grad. Call inside the grad mode's context."""
    return {
        k: devices[v.place] if isinstance(v, Dev) else _make(v, devices[v.place], grad_mode)
        for k, v in row.inputs.items()
    }


def _make(v: Input, device: torch.device, grad_mode: str) -> torch.Tensor:
    t = v.make()
    if grad_mode != GRAD or not (t.dtype.is_floating_point or t.dtype.is_complex):
        return t.to(device)
    # A non-leaf that requires grad (a leaf would refuse the rows' in-place ops)
    leaf = t.requires_grad_()
    return leaf.to(device) if device != leaf.device else leaf.clone()


def _error(exc: BaseException) -> tuple[str, str]:
    return (REFUSES if is_refusal(exc) else ERROR), f"{type(exc).__name__}: {exc}".splitlines()[0]


def _run(row: Row, backend: str, devices: dict[str, torch.device], grad_mode: str) -> Result:
    names = {str(d): p for p, d in devices.items()}
    with grad_context(grad_mode):
        try:
            inputs = place_inputs(row, devices, grad_mode)
        except Exception as exc:  # the placement itself failed: not what the row tests
            return Result(
                row, backend, ERROR, f"making inputs: {type(exc).__name__}: {exc}", grad_mode=grad_mode
            )
        try:
            out = row.call(*inputs.values())
            if backend == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            verdict, text = _error(exc)
            return Result(row, backend, verdict, text, grad_mode=grad_mode)
        outs = _outputs(out)
        places = tuple(names.get(str(t.device), str(t.device)) for t in outs)
        values = tuple(t.detach().to("cpu") for t in outs)
        result = Result(row, backend, ACCEPTS, devices=places, values=values, grad_mode=grad_mode)
        graded = [t for t in outs if t.requires_grad]
        if graded:
            try:
                sum(
                    t.sum() if t.device == graded[0].device else t.sum().to(graded[0].device) for t in graded
                ).backward()
                if backend == "cuda":
                    torch.cuda.synchronize()
                result.backward = ACCEPTS
            except Exception as exc:
                result.backward, result.backward_error = _error(exc)
    return result


def run_row(row: Row, backend: str = "emulated", grad_mode: str = NO_GRAD) -> Result:
    """Run `row` on `backend` ("cuda", "emulated" or "cpu") in `grad_mode` (one of `GRAD_MODES`)
    and say what happened."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu":
        cpu = torch.device("cpu")
        return _run(row, backend, dict.fromkeys(PLACES, cpu), grad_mode)
    gpu, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    devices = {"gpu": gpu, "gpu1": gpu1, "cpu": torch.device("cpu")}
    if backend == "emulated":
        ctx = emulated.active()
        if ctx is not None and ctx.device_count >= 2:
            return _run(row, backend, devices, grad_mode)
        if ctx is not None:
            return Result(
                row,
                backend,
                UNSUPPORTED,
                f"the active emulation has {ctx.device_count} device(s)",
                grad_mode=grad_mode,
            )
        with emulated.EmulatedCuda(device_count=2):
            return _run(row, backend, devices, grad_mode)
    if emulated.active() is not None:
        raise RuntimeError("run_row(..., 'cuda') inside an EmulatedCuda block would not reach real CUDA")
    if not torch.cuda.is_available():
        return Result(row, backend, UNSUPPORTED, "no CUDA GPU here", grad_mode=grad_mode)
    if row.gpus > torch.cuda.device_count():
        return Result(
            row,
            backend,
            UNSUPPORTED,
            f"needs {row.gpus} GPUs, {torch.cuda.device_count()} here",
            grad_mode=grad_mode,
        )
    return _run(row, backend, devices, grad_mode)


def run_table(
    backend: str = "emulated", rows: tuple[Row, ...] = ROWS, grad_mode: str = NO_GRAD
) -> list[Result]:
    """Every row on one backend in one grad mode (one emulation for them all)."""
    if backend == "emulated" and emulated.active() is None:
        with emulated.EmulatedCuda(device_count=2):
            return [run_row(r, backend, grad_mode) for r in rows]
    return [run_row(r, backend, grad_mode) for r in rows]


def format_table(results: list[Result]) -> str:
    """Plain lines: row, expected verdict, what the backend did."""
    lines = []
    for r in results:
        mark = "ok  " if r.verdict in (r.row.expect, UNSUPPORTED) else "FAIL"
        lines.append(f"{mark} {r.row.describe():<90} expect {r.row.expect:<8} {r.backend}: {r.verdict}")
    return "\n".join(lines)


# ---- the sync table --------------------------------------------------------------------------------
#
# Which ops make the host wait for the GPU (a "sync": the op needs device data on the host, for a
# value or for the size of its output). Every input lives on the GPU. On real CUDA a row is
# checked by what the host does: a kernel that keeps the GPU busy for a while (`torch.cuda._sleep`)
# is queued first, and an op that syncs cannot return before it is done; one that does not returns
# at once. The tests check the tracer's `sync` class against the same table.

SYNCS, NO_SYNC = True, False


@dataclass(frozen=True)
class SyncRow:
    """One op on GPU tensors, and whether real CUDA makes the host wait for it."""

    op: str
    inputs: dict[str, Input]
    call: Callable[..., object]
    syncs: bool
    why: str
    note: str = ""

    describe = Row.describe
    id = Row.id

    def __str__(self) -> str:
        return f"{self.describe()} -> {'syncs' if self.syncs else 'no sync'}"


_COUNTS = [1, 2, 0, 3, 1, 1]  # repeats; they sum to 8
VALUE = "the op returns a Python value: the host must read it"
SHAPE = "the output's shape depends on the data: the host reads a count first"
STAYS = "computed on the GPU into an output of known shape"

SYNC_ROWS: tuple[SyncRow, ...] = (
    SyncRow("item", {"x": f32("gpu", 8)}, lambda x: x.sum().item(), SYNCS, VALUE),
    SyncRow(
        "bool", {"x": f32("gpu", 8)}, lambda x: bool(x.sum() > 0), SYNCS, VALUE, note="if on a device scalar"
    ),
    SyncRow("tolist", {"x": f32("gpu", 8)}, lambda x: x.tolist(), SYNCS, VALUE),
    SyncRow("equal", {"a": f32("gpu", 8), "b": f32("gpu", 8, seed=1)}, torch.equal, SYNCS, VALUE),
    SyncRow("cpu", {"x": f32("gpu", 8)}, lambda x: x.cpu(), SYNCS, "a blocking device-to-host copy"),
    SyncRow(
        "to",
        {"x": f32("gpu", 8)},
        lambda x: x.to("cpu", non_blocking=True),
        NO_SYNC,
        "a non-blocking copy to the host lands in pinned memory, asynchronously",
        note="cpu, non_blocking=True",
    ),
    SyncRow("allclose", {"a": f32("gpu", 8), "b": f32("gpu", 8, seed=1)}, torch.allclose, SYNCS, VALUE),
    SyncRow(
        "equal",
        {"a": f32("gpu", 8), "b": f32("gpu", 4, seed=1)},
        torch.equal,
        NO_SYNC,
        "tensors of different shapes are unequal without reading them",
        note="different shapes",
    ),
    SyncRow(
        "linalg.inv",
        {"x": f32("gpu", 4, 4)},
        lambda x: torch.linalg.inv(x + 4 * torch.eye(4, device=x.device)),
        SYNCS,
        "the solver's error code is read on the host (_linalg_check_errors)",
    ),
    SyncRow(
        "normal",
        {"m": f32("gpu", 8), "s": f32("gpu", 8, seed=1)},
        lambda m, s: torch.normal(m, s.abs()),
        SYNCS,
        "a tensor std is checked (>= 0) on the host",
    ),
    SyncRow(
        "masked_fill",
        {"x": f32("gpu", 8), "m": mask("gpu", 8), "v": scalar("gpu")},
        lambda x, m, v: x.masked_fill(m, v),
        SYNCS,
        VALUE + " (a 0-dim value tensor on the device is read with item())",
        note="value on the device",
    ),
    SyncRow(
        "linspace",
        {"a": scalar("gpu", 0.0), "b": scalar("gpu", 1.0)},
        lambda a, b: torch.linspace(a, b, 5, device=a.device),
        SYNCS,
        "tensor ends are read on the host",
    ),
    SyncRow("nonzero", {"x": f32("gpu", 8)}, torch.nonzero, SYNCS, SHAPE),
    SyncRow("where", {"x": f32("gpu", 8)}, lambda x: torch.where(x > 0), SYNCS, SHAPE, note="condition only"),
    SyncRow(
        "index", {"x": f32("gpu", 8), "m": mask("gpu", 8)}, lambda x, m: x[m], SYNCS, SHAPE, note="bool mask"
    ),
    SyncRow("masked_select", {"x": f32("gpu", 8), "m": mask("gpu", 8)}, torch.masked_select, SYNCS, SHAPE),
    SyncRow("unique", {"i": longs("gpu", _COUNTS)}, torch.unique, SYNCS, SHAPE),
    SyncRow("bincount", {"i": longs("gpu", _COUNTS)}, torch.bincount, SYNCS, SHAPE + " (its largest value)"),
    SyncRow(
        "repeat_interleave",
        {"r": longs("gpu", _COUNTS)},
        torch.repeat_interleave,
        SYNCS,
        SHAPE + " (the sum of the repeats)",
    ),
    SyncRow(
        "repeat_interleave",
        {"r": longs("gpu", _COUNTS)},
        lambda r: torch.repeat_interleave(r, output_size=8),
        NO_SYNC,
        "output_size given: " + STAYS,
        note="output_size=8",
    ),
    SyncRow(
        "repeat_interleave",
        {"x": f32("gpu", 6), "r": longs("gpu", _COUNTS)},
        lambda x, r: x.repeat_interleave(r, dim=0),
        SYNCS,
        SHAPE,
        note="dim=0",
    ),
    SyncRow(
        "one_hot", {"i": longs("gpu", _COUNTS)}, F.one_hot, SYNCS, SHAPE + " (num_classes from the data)"
    ),
    SyncRow(
        "one_hot",
        {"i": longs("gpu", _COUNTS)},
        lambda i: F.one_hot(i, num_classes=4),
        NO_SYNC,
        STAYS,
        note="num_classes=4",
    ),
    SyncRow(
        "histc",
        {"x": f32("gpu", 8)},
        lambda x: torch.histc(x, bins=4),
        SYNCS,
        "min == max: the data's range first",
    ),
    SyncRow(
        "histc",
        {"x": f32("gpu", 8)},
        lambda x: torch.histc(x, bins=4, min=-3.0, max=3.0),
        NO_SYNC,
        STAYS,
        note="min=-3, max=3",
    ),
    SyncRow(
        "nonzero_static", {"x": f32("gpu", 8)}, lambda x: torch.nonzero_static(x, size=4), NO_SYNC, STAYS
    ),
    SyncRow("topk", {"x": f32("gpu", 4, 8)}, lambda x: x.topk(2, dim=-1), NO_SYNC, STAYS),
    SyncRow("argsort", {"x": f32("gpu", 8)}, torch.argsort, NO_SYNC, STAYS),
    SyncRow("max", {"x": f32("gpu", 8)}, torch.max, NO_SYNC, STAYS + " (a 0-dim tensor)"),
    SyncRow(
        "index_select",
        {"x": f32("gpu", 8, 3), "i": longs("gpu", _COUNTS)},
        lambda x, i: x.index_select(0, i),
        NO_SYNC,
        STAYS,
    ),
    SyncRow(
        "index",
        {"x": f32("gpu", 8, 3), "i": longs("gpu", _COUNTS)},
        lambda x, i: x[i],
        NO_SYNC,
        STAYS,
        note="long index",
    ),
    SyncRow(
        "masked_fill",
        {"x": f32("gpu", 8), "m": mask("gpu", 8)},
        lambda x, m: x.masked_fill(m, 0.0),
        NO_SYNC,
        STAYS,
    ),
    SyncRow(
        "where",
        {"c": mask("gpu", 8), "a": f32("gpu", 8), "b": f32("gpu", 8, seed=1)},
        torch.where,
        NO_SYNC,
        STAYS,
        note="three arguments",
    ),
    SyncRow("cumsum", {"i": longs("gpu", _COUNTS)}, lambda i: i.cumsum(0), NO_SYNC, STAYS),
    SyncRow(
        "index_put_",
        {"x": f32("gpu", 8), "m": mask("gpu", 8)},
        lambda x, m: x.clone().__setitem__(m, 0.0),
        NO_SYNC,
        "x[mask] = scalar runs as masked_fill_ (canDispatchToMaskedFill): " + STAYS,
        note="bool mask, a scalar",
    ),
    SyncRow(
        "index_put_",
        {"x": f32("gpu", 8), "m": mask("gpu", 8), "v": f32("gpu", 8, seed=1)},
        lambda x, m, v: x.clone().__setitem__(m, v[m]),
        SYNCS,
        SHAPE + " (the mask's count, for the values)",
        note="bool mask, a tensor",
    ),
)


@dataclass
class SyncResult:
    row: SyncRow
    waited: bool  # the host waited for the GPU to finish the work queued before the op
    seconds: float  # how long the op took on the host
    busy_seconds: float  # how long the work queued before it kept the GPU busy

    def __str__(self) -> str:
        what = "waited" if self.waited else "did not wait"
        return f"{self.row.describe()}: the host {what} ({self.seconds * 1e3:.1f} ms; GPU busy {self.busy_seconds * 1e3:.0f} ms)"


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles that `torch.cuda._sleep` spins for about `seconds` (measured)."""
    cycles = 10_000_000
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    return max(1, int(cycles * seconds / max(took, 1e-6)))


def run_sync_row(row: SyncRow, busy_seconds: float = 0.2) -> SyncResult:
    """Run `row` on real CUDA (cuda:0) behind `busy_seconds` of queued GPU work, and see whether
    the host waited for it. The row runs once before, so that first-call costs (kernel loading,
    allocation) do not look like waiting."""
    if emulated.active() is not None:
        raise RuntimeError("run_sync_row inside an EmulatedCuda block would not reach real CUDA")
    gpu = torch.device("cuda", 0)
    inputs = [v.make().to(gpu) for v in row.inputs.values()]
    row.call(*inputs)
    cycles = _sleep_cycles(busy_seconds)
    torch.cuda.synchronize()
    t_busy = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    busy = time.perf_counter() - t_busy
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    row.call(*inputs)
    took = time.perf_counter() - t0
    torch.cuda.synchronize()
    return SyncResult(row, waited=took > busy / 2, seconds=took, busy_seconds=busy)
