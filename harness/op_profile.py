"""Where a profiled run's device time goes, op call by op call: each `harness::` op (and each aten
op called outside them), split by its signature (types and shapes), beside the bytes a call reads.

    with torch.profiler.profile(activities=[CPU, CUDA], record_shapes=True) as prof:
        for pos in range(steps):
            model(token, pos)
    table = op_table(prof.events(), DeviceType.CUDA, steps, copy_bytes_per_second=rate)
    print(format_op_table(table["rows"]))

How time is attributed. torch.profiler links each kernel to the CPU op that was innermost when
it was launched (a Triton launch inside a custom op's Python body: the custom op itself; an aten
op the body calls: that aten op), and an op's `device_time_total` is its own kernels plus its
children's. Here each kernel is counted once, for its op's *owner*: the outermost `harness::` op
above it, or, outside every `harness::` op, the outermost op (user annotations skipped). Owners
never nest, so no kernel is counted twice, and an owner's time is its `device_time_total`.
Kernels linked to no CPU op (none are expected in an eager run) make the row "(no op)". Without
a device (`device_type` CPU) the CPU time of each event (self time, summed into its owner the
same way) stands in: the table's shape is then right, its times are the host's.

Bytes a call reads (`bytes_per_call`, and `bytes_counted` says how), from the op's recorded input
shapes and integer arguments (`record_shapes=True`): the quantized weights' blocks (uint8, one
byte an element; repacked weights hold the same bytes); for `moe_ffn` the experts a call can
use, min(E, T*k) of E (exactly k for one token: top-k picks distinct experts); for `embed_rows`
the T rows it reads; the float32 router and norm weights; for `attention` the cached keys and
values it reads (start + T positions, or the whole cache at a device position). `tb_per_s` is
those bytes over the call's time; `fraction_of_copy` is that rate over a device-to-device copy's
(read + written, `harness.bench.copy_bandwidth`), as `BenchResult.decode_bandwidth_fraction`
compares a decoded token's weight bytes.

Inside one op: `launches` lists a call's kernels in order, and `products` its weight products in
launch order (`moe_ffn`: gate/up, then down; `qkv`: one per run of weights of one type;
`qmatmul`: one), each with its bytes and, where a call has one `PRODUCT_KERNEL` launch per
product, that launch's name, time, TB/s and fraction of the copy rate: the gated expert product
apart from the down product, q+k apart from a v of another type. A `TWO_RUNS_KERNEL` launch
makes two consecutive products, which then show as one ("q+k+v").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

NO_OP = "(no op)"
HARNESS_PREFIX = "harness::"
# The launch of one weight product inside the fused ops at decode (`harness.quant.fused`): the
# launches whose kernel name holds this are paired, in order, with a call's products.
PRODUCT_KERNEL = "_matvec_kernel"
# The launch that makes two consecutive products of a call at once (`harness::qkv`'s runs of two
# types under QKV_CONFIG "one_launch"): paired with those two as one product ("q+k+v").
TWO_RUNS_KERNEL = "_matvec_two_runs_kernel"


def _shape(shape) -> str:
    return " x ".join(str(d) for d in shape)


def _type_name(code) -> str:
    """A fused op's `qtype` argument in words: the GGML type, "packed", "interleaved" and "wide" as
    its flags say."""
    from harness.quant.fused import INTERLEAVED, PACKED, WIDE
    from harness.quant.types import GGMLType

    if not isinstance(code, int):
        return "?"
    try:
        name = GGMLType(code & 0xFF).name
    except ValueError:
        name = f"type {code & 0xFF}"
    flags = (" packed" if code & PACKED else "") + (" interleaved" if code & INTERLEAVED else "")
    return name + flags + (" wide" if code & WIDE else "")


def _in_features(row_bytes: int, code) -> int | None:
    """Values in a row of `row_bytes` bytes of the GGML type in `code` (None if unknown)."""
    from harness.quant.types import GGMLType, block_size, type_size

    try:
        qtype = GGMLType(code & 0xFF)
        return row_bytes // type_size(qtype) * block_size(qtype)
    except (TypeError, ValueError, KeyError):
        return None


def _numel(shape) -> int:
    return math.prod(shape) if shape else 0


def _weight(shape, code) -> str:
    """A weight's type and logical shape: "Q4_K [4096 x 4096]" (leading dims kept: [E x out x in])."""
    if not shape:
        return "?"
    cols = _in_features(shape[-1], code)
    return f"{_type_name(code)} [{_shape([*shape[:-1], cols if cols is not None else '?'])}]"


def _tokens(shapes) -> int:
    return shapes[0][0] if shapes and shapes[0] else 0


class Call(NamedTuple):
    """One op call in words: its signature, the bytes it reads and how they were counted, and its
    weight products in launch order [(what, bytes)] (`PRODUCT_KERNEL` launches, one each)."""

    signature: str
    nbytes: int | None
    counted: str
    products: tuple[tuple[str, int], ...] = ()


def _runs(codes: list, labels: list[str], nbytes: list[int]) -> tuple[tuple[str, int], ...]:
    """Consecutive weights of one type code, each run one product (as `harness::qkv` launches
    weights that `pack_rows` laid out one after another)."""
    out: list[tuple[str, int]] = []
    for i, code in enumerate(codes):
        if i and code == codes[i - 1]:
            out[-1] = (f"{out[-1][0]}+{labels[i]}", out[-1][1] + nbytes[i])
        else:
            out.append((labels[i], nbytes[i]))
    return tuple(out)


def _describe(name: str, shapes: list, values: list) -> Call:
    """One op call from its recorded input shapes and values."""
    n = len(shapes)

    def arg(i):
        return values[i] if i < len(values) else None

    def shape(i):
        return list(shapes[i]) if i < n and shapes[i] is not None else []

    if name == "harness::qmatmul" and n >= 4:
        raw, code, out = shape(1), arg(2), arg(3)
        rows = [out, _numel(raw) // out] if isinstance(out, int) and out else raw
        sig = f"{_weight(rows, code)}, T={_tokens(shapes)}"
        return Call(sig, _numel(raw), "weight blocks", (("weight", _numel(raw)),))
    if name == "harness::qkv" and n >= 7:
        parts = [f"{p} {_weight(shape(i), arg(i + 3))}" for i, p in ((1, "q"), (2, "k"), (3, "v"))]
        sig = ", ".join(parts) + f", T={_tokens(shapes)}"
        sizes = [_numel(shape(i)) for i in (1, 2, 3)]
        products = _runs([arg(4), arg(5), arg(6)], ["q", "k", "v"], sizes)
        return Call(sig, sum(sizes), "q, k and v weight blocks", products)
    if name == "harness::moe_ffn" and n >= 8:
        gate, up, down, experts = shape(1), shape(2), shape(3), shape(5)
        n_experts = gate[0] if gate else 0
        t, k = (experts + [0, 0])[:2]
        used = min(n_experts, t * k)
        sig = f"gate/up {_weight(gate, arg(6))}, down {_weight(down, arg(7))}, k={k} of {n_experts}, T={t}"
        if not n_experts:
            return Call(sig, None, "")
        gate_up = (_numel(gate) + _numel(up)) * used // n_experts
        down_bytes = _numel(down) * used // n_experts
        counted = f"gate, up and down blocks of min(E, T*k) = {used} of {n_experts} experts"
        return Call(sig, gate_up + down_bytes, counted, (("gate/up", gate_up), ("down", down_bytes)))
    if name == "harness::embed_rows" and n >= 4:
        table, t = shape(0), _numel(shape(1))
        row_bytes = table[-1] if table else 0
        sig = f"table {_weight(table, arg(2))}, T={t}"
        return Call(sig, t * row_bytes, f"{t} rows of the table")
    if name == "harness::router_topk" and n >= 4:
        weight, k = shape(1), arg(2)
        if weight:
            sig = f"F32 router [{_shape(weight)}], k={k}, T={_tokens(shapes)}"
            return Call(sig, 4 * _numel(weight), "router weight (float32)")
        return Call(f"logits [{_shape(shape(0))}] in, k={k}", 0, "no weight (logits given)")
    if name in ("harness::add_rms_norm_route", "harness::add_rms_norm_int_route") and n >= 5:
        norm, router = _numel(shape(2)), _numel(shape(4))
        sig = f"[{_shape(shape(0))}], F32 router [{_shape(shape(4))}], k={arg(5)}"
        return Call(sig, 4 * (norm + router), "norm and router weights (float32)")
    if name in (
        "harness::rms_norm",
        "harness::add_rms_norm",
        "harness::rms_norm_int",
        "harness::add_rms_norm_int",
    ):
        at = 1 if name.startswith("harness::rms_norm") else 2
        return Call(f"[{_shape(shape(0))}]", 4 * _numel(shape(at)), "norm weight (float32)")
    if name in ("harness::attention", "harness::attention_int") and n >= 7:
        qkv, cache = shape(0), shape(1)
        if len(cache) == 3 and len(qkv) == 2:
            n_kv, s_max, hd = cache
            t = qkv[0]
            heads = (qkv[1] - 2 * n_kv * hd) // hd
            positions = shape(5)
            start = arg(6)
            keys = s_max if positions else (start + t if isinstance(start, int) else s_max)
            sig = f"H={heads} K={n_kv} Hd={hd}, T={t}" + (", at device positions" if positions else "")
            return Call(sig, 2 * 4 * n_kv * keys * hd, "KV cache read: 2 x K x positions x Hd float32")
    return Call(", ".join(f"[{_shape(s)}]" for s in shapes if s), None, "")


def _owner(ev, memo: dict):
    """The event `ev`'s time is counted for: the outermost harness:: op above it (or itself), else
    its outermost ancestor that is not a user annotation."""
    key = id(ev)
    if key not in memo:
        chain = []
        at = ev
        while at is not None:
            chain.append(at)
            at = at.cpu_parent
        harness = [e for e in chain if e.name.startswith(HARNESS_PREFIX)]
        ops = [e for e in chain if not getattr(e, "is_user_annotation", False)] or chain
        memo[key] = harness[-1] if harness else ops[-1]
    return memo[key]


def _launches(owner) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of an owner's call: its own launches in the order the profiler
    lists them, then those of the ops inside it, depth first in the order they started."""
    out = [(k.name, k.duration) for k in owner.kernels]
    for child in getattr(owner, "cpu_children", None) or ():
        out += _launches(child)
    return out


def _rate(nbytes, us, copy_bytes_per_second):
    """(TB/s, fraction of the copy rate) of `nbytes` read in `us` microseconds (None, None if unknown)."""
    if not nbytes or not us:
        return None, None
    rate = nbytes / (us * 1e-6)
    return rate / 1e12, (rate / copy_bytes_per_second if copy_bytes_per_second else None)


def op_table(
    events: Iterable,
    device_type: torch.autograd.DeviceType,
    steps: int,
    copy_bytes_per_second: float | None = None,
) -> dict:
    """The per-op table of profiler `events` (`prof.events()`, recorded with `record_shapes=True`)
    over `steps` repetitions of what was profiled: {"time_source", "ms_per_step" (every kernel),
    "attributed_ms_per_step" (those under an op), "owners_device_time_total_ms_per_step" (torch's
    device_time_total of the owners, a check of the former; None on the CPU),
    "copy_bytes_per_second", "rows"}, rows sorted by time: op, signature, calls_per_step,
    ms_per_step, us_per_call, bytes_per_call, bytes_counted, tb_per_s, fraction_of_copy (None
    where nothing is counted); launches (a call's kernels in order, name and us_per_call, where
    every call of the row launched the same ones; else None); products (the weight products of a
    call, e.g. moe_ffn's gate/up and down, each with its bytes, and where a call has one
    `PRODUCT_KERNEL` launch per product, that launch's us_per_call, tb_per_s and fraction_of_copy)."""
    on_cpu = device_type == torch.autograd.DeviceType.CPU
    memo: dict = {}
    owners: dict[int, list] = {}  # id(owner) -> [owner, microseconds]
    total = 0.0
    for ev in events:
        if ev.device_type == device_type and not on_cpu:
            total += ev.device_time_total
        if ev.device_type != torch.autograd.DeviceType.CPU or getattr(ev, "is_async", False):
            continue
        own = ev.self_cpu_time_total if on_cpu else sum(k.duration for k in ev.kernels)
        owner = _owner(ev, memo)
        owners.setdefault(id(owner), [owner, 0.0])[1] += own
    rows: dict[tuple[str, str], dict] = {}
    for owner, us in owners.values():
        if "::" not in owner.name and us <= 0:
            continue  # e.g. a top-level device synchronization: no op, no kernel
        shapes = list(getattr(owner, "input_shapes", None) or [])
        call = _describe(owner.name, shapes, list(getattr(owner, "concrete_inputs", None) or []))
        row = rows.setdefault(
            (owner.name, call.signature), {"call": call, "us": [], "bytes": [], "launches": []}
        )
        row["us"].append(us)
        row["bytes"].append(call.nbytes)
        row["launches"].append([] if on_cpu else _launches(owner))
    attributed = sum(sum(r["us"]) for r in rows.values())
    # torch's own sum of the same kernels (an op's and its children's): equal to `attributed` when
    # the profiler's nesting and its kernel links agree with the walk above
    nested = None if on_cpu else sum(o.device_time_total for o, _ in owners.values()) / 1000 / steps
    if on_cpu:
        total = attributed
    out = [_row(name, r, steps, copy_bytes_per_second) for (name, _), r in rows.items()]
    if not on_cpu and total - attributed > 1e-3 * max(total, 1.0):
        out.append(
            _row(NO_OP, {"call": Call("", None, ""), "us": [], "bytes": [], "launches": []}, steps, None)
        )
        out[-1]["ms_per_step"] = (total - attributed) / 1000 / steps
    out.sort(key=lambda row: (-row["ms_per_step"], row["op"], row["signature"]))
    return {
        "time_source": "cpu op time (no device)" if on_cpu else f"{device_type.name.lower()} kernels",
        "ms_per_step": total / 1000 / steps,
        "attributed_ms_per_step": attributed / 1000 / steps,
        "owners_device_time_total_ms_per_step": nested,
        "copy_bytes_per_second": copy_bytes_per_second,
        "rows": out,
    }


def _products_made(products: tuple[tuple[str, int], ...], timed: list[dict]) -> tuple[tuple[str, int], ...]:
    """A call's products as its product launches `timed` made them: two consecutive products
    as one where a `TWO_RUNS_KERNEL` launch made both (their names joined by "+", their bytes
    summed); `products` unchanged where the launches do not account for them exactly."""
    out, i = [], 0
    for launch in timed:
        take = 2 if TWO_RUNS_KERNEL in launch["kernel"] else 1
        if i + take > len(products):
            return products
        run = products[i : i + take]
        out.append(("+".join(what for what, _ in run), sum(nbytes for _, nbytes in run)))
        i += take
    return tuple(out) if i == len(products) else products


def _row(name: str, r: dict, steps: int, copy_bytes_per_second: float | None) -> dict:
    """One row of `op_table` from its calls' times, bytes and launches."""
    calls, call = len(r["us"]), r["call"]
    us_per_call = sum(r["us"]) / calls if calls else None
    known = calls and all(b is not None for b in r["bytes"])
    per_call = sum(r["bytes"]) / calls if known else None
    tb_per_s, fraction = _rate(per_call, us_per_call, copy_bytes_per_second)
    launches = None
    if calls and all([n for n, _ in seq] == [n for n, _ in r["launches"][0]] for seq in r["launches"]):
        launches = [
            {"kernel": kernel[:120], "us_per_call": sum(seq[i][1] for seq in r["launches"]) / calls}
            for i, (kernel, _) in enumerate(r["launches"][0])
        ]
    products = []
    timed = [x for x in launches or () if PRODUCT_KERNEL in x["kernel"] or TWO_RUNS_KERNEL in x["kernel"]]
    made = _products_made(call.products, timed)
    for i, (what, nbytes) in enumerate(made):
        launch = timed[i] if len(timed) == len(made) else None
        us = launch["us_per_call"] if launch else None
        tb, frac = _rate(nbytes, us, copy_bytes_per_second)
        products.append(
            {
                "product": what,
                "kernel": launch["kernel"] if launch else None,
                "bytes_per_call": nbytes,
                "us_per_call": us,
                "tb_per_s": tb,
                "fraction_of_copy": frac,
            }
        )
    return {
        "op": name,
        "signature": call.signature,
        "calls_per_step": calls / steps,
        "ms_per_step": sum(r["us"]) / 1000 / steps,
        "us_per_call": us_per_call,
        "bytes_per_call": per_call,
        "bytes_counted": call.counted if per_call is not None else "",
        "tb_per_s": tb_per_s,
        "fraction_of_copy": fraction,
        "launches": launches,
        "products": products,
    }


def format_op_table(rows: list[dict]) -> str:
    """`op_table`'s rows as a fixed-width text table; under a row, its products that have a time."""

    def num(v, spec: str, width: int) -> str:
        return ("-" if v is None else format(v, spec)).rjust(width)

    def cells(us, nbytes, tb, fraction) -> str:
        mb = None if nbytes is None else nbytes / 1e6
        return f"{num(us, '.1f', 9)} {num(mb, '.3f', 9)} {num(tb, '.3f', 6)} {num(fraction, '.1%', 7)}"

    lines = [
        f"{'ms/step':>8} {'calls':>6} {'us/call':>9} {'MB/call':>9} {'TB/s':>6} {'of copy':>7}  op  signature"
    ]
    for r in rows:
        lines.append(
            f"{r['ms_per_step']:8.3f} {r['calls_per_step']:6.2f} "
            f"{cells(r['us_per_call'], r['bytes_per_call'], r['tb_per_s'], r['fraction_of_copy'])}  "
            f"{r['op']}  {r['signature']}"
        )
        for x in r["products"]:
            if x["us_per_call"] is not None:
                numbers = cells(x["us_per_call"], x["bytes_per_call"], x["tb_per_s"], x["fraction_of_copy"])
                lines.append(f"{'':15} {numbers}    {x['product']} ({x['kernel']})")
    return "\n".join(lines)
