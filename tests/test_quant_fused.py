"""Fused quantized custom ops (harness.quant.fused) against dequantize-then-matmul in float64.

Every case draws fresh random blocks and activations, poisons nothing (the ops allocate their
outputs) but checks every element is finite and the normalized squared error
||out - ref||^2 / ||ref||^2 is at most 1e-5. Shapes cover 1, 5, 17, 129 and 512 tokens, output
row counts that do not fill the last tile, and experts that get no token or every token.

Two ways to run: compiled on a GPU (`-m cuda`, every shape), and on the CPU through Triton's
interpreter (small shapes; a subprocess, because TRITON_INTERPRET must be set before the kernels
are defined). Run this file as a script (`python tests/test_quant_fused.py SMALL|FULL DEVICE`)
to print the cases' results as JSON; `ROUTER DEVICE SEED` prints only harness::router_topk's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NMSE_MAX = 1e-5
# attention's outputs (averages of N(0, 1) values) from the kernels and from the torch path:
# the same float32 arithmetic summed in another order
ATTENTION_MAX_ABS = 1e-5


def _random_weight(qtype, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """[rows, row_bytes] random blocks whose f16 fields are finite and of moderate size."""
    from harness.quant.types import F16_FIELDS, block_size, type_size

    nblocks = rows * cols // block_size(qtype)
    raw = rng.integers(0, 256, size=(nblocks, type_size(qtype)), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        halves = (rng.standard_normal(nblocks) * 0.05).astype(np.float16)
        raw[:, off : off + 2] = halves.view(np.uint8).reshape(nblocks, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def _extreme_weight(qtype, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """[rows, row_bytes] random blocks whose f16 fields are drawn from float16's extremes (its
    largest, a subnormal, zero, both signs) and ordinary values: products near float32's and
    float16's limits, and values beyond float16's range."""
    from harness.quant.types import F16_FIELDS, block_size, type_size

    nblocks = rows * cols // block_size(qtype)
    raw = rng.integers(0, 256, size=(nblocks, type_size(qtype)), dtype=np.uint8)
    choices = np.array([65504.0, -65504.0, 6e-8, -6e-8, 0.0, 0.5, -1.0, 3.0], dtype=np.float16)
    for off in F16_FIELDS[qtype]:
        halves = choices[rng.integers(0, len(choices), nblocks)]
        raw[:, off : off + 2] = halves.view(np.uint8).reshape(nblocks, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def _dequant(raw: torch.Tensor, qtype, rows: int, cols: int) -> torch.Tensor:
    from harness.quant.dequant import dequantize

    return dequantize(raw.cpu(), qtype, (rows, cols), torch.float32).double()


def _nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-300))


def run_cases(device: str, small: bool) -> list[dict]:
    """Every case on `device`; [{"case": name, "nmse": value}]."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    tokens = (1, 5, 17) if small else (1, 5, 17, 129, 512)
    rows, cols = (19, 256) if small else (333, 1024)
    results = []
    for qtype, width, layout in _weight_cases(cols, small):
        raw = _random_weight(qtype, rows, width, rng)
        w = _dequant(raw, qtype, rows, width)
        kraw, code = _prepared(raw, qtype, width, layout)
        for t in tokens:
            x = torch.randn(t, width, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
            for path in _paths(t, code):
                with _kernels(path):
                    out = torch.ops.harness.qmatmul(x.to(device), kraw.to(device), code, rows)
                results.append(
                    {
                        "case": f"qmatmul {qtype.name} {layout} T={t} N={rows} {path}",
                        "nmse": _nmse(out, x.double() @ w.T),
                    }
                )

    # Extreme scales (values far beyond float16's range: WIDE), in each layout the kernels read.
    for qtype, cols_, layout in _extreme_cases(cols, small):
        raw = _extreme_weight(qtype, rows, cols_, rng)
        w = _dequant(raw, qtype, rows, cols_)
        kraw, code = _prepared(raw, qtype, cols_, layout)
        assert code & fused.WIDE, (qtype, cols_)
        for t in (1, 17):
            x = torch.randn(t, cols_, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
            for path in _paths(t, code):
                with _kernels(path):
                    out = torch.ops.harness.qmatmul(x.to(device), kraw.to(device), code, rows)
                name = f"qmatmul extreme {qtype.name} {layout} T={t} {path}"
                results.append({"case": name, "nmse": _nmse(out, x.double() @ w.T)})

    # RMSNorm and rope, against the model's torch path (rope bit for bit: same rounded ops).
    from harness.model.mixtral import rope_tables

    for t in tokens:
        x = torch.randn(t, 4096 if not small else 256) * 3
        w = torch.randn(x.shape[1])
        ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)) * w.double()
        out = torch.ops.harness.rms_norm(x.to(device), w.to(device), 1e-5)
        results.append({"case": f"rms_norm T={t}", "nmse": _nmse(out, ref)})
        h = torch.randn(x.shape)
        total, normed = torch.ops.harness.add_rms_norm(x.to(device), h.to(device), w.to(device), 1e-5)
        s = (x + h).double()
        ref = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)) * w.double()
        exact = torch.equal(total.cpu(), x + h)
        results.append({"case": f"add_rms_norm T={t}", "nmse": _nmse(normed, ref), "exact": exact})
        cos, sin = rope_tables(64, 10000.0, 600, torch.device("cpu"))
        q = torch.randn(t, 3, 80)  # head dim 80, rope on the first 64
        start = 7
        c, s_ = cos[start : start + t, None, :], sin[start : start + t, None, :]
        even, odd = q[..., :64:2], q[..., 1:64:2]
        rot = torch.stack((even * c - odd * s_, even * s_ + odd * c), dim=-1).flatten(-2)
        ref = torch.cat((rot, q[..., 64:]), dim=-1)
        pos = torch.arange(start, start + t)
        out = torch.ops.harness.rope(q.to(device), cos.to(device), sin.to(device), pos.to(device)).cpu()
        results.append(
            {"case": f"rope T={t}", "nmse": _nmse(out, ref.double()), "exact": bool(torch.equal(out, ref))}
        )

    results += _decode_op_cases(device, tokens, rng)
    results += _split_sum_cases(device, small, rng)
    results += _attention_cases(device, small, rng)
    results += _packed_dequant_cases(device, rng)
    results += _scaled_half_cases(device)

    # MoE: E experts, k=2; gate/up [F, D], down [D, F]. Routings: random, all tokens on experts
    # 0 and 1 (the others get none; 0 and 1 get every token).
    n_exp, k = 4, 2
    dim = 256 if small else 512
    # The second pair's float16 scratch holds one expert at a time (None): its grouped launches
    # take the experts one by one, each skipping the other experts' rows.
    for gu_type, down_type, ffn, scratch in (
        # Q6_K down rows: GGUF's layout at 512, packed at 2048 (under the interpreter a module test
        # runs a packed Q6_K down); Q8_0 gate/up: packed
        (GGMLType.Q4_K, GGMLType.Q6_K, 512 if small else 2048, fused.SCRATCH_MAX_BYTES),
        (GGMLType.Q8_0, GGMLType.Q4_K, 512 if small else 768, None),
    ):
        scratch = scratch or ffn * dim * 2
        gate = torch.stack([_random_weight(gu_type, ffn, dim, rng) for _ in range(n_exp)])
        up = torch.stack([_random_weight(gu_type, ffn, dim, rng) for _ in range(n_exp)])
        down = torch.stack([_random_weight(down_type, dim, ffn, rng) for _ in range(n_exp)])
        wg = [_dequant(gate[e], gu_type, ffn, dim) for e in range(n_exp)]
        wu = [_dequant(up[e], gu_type, ffn, dim) for e in range(n_exp)]
        wd = [_dequant(down[e], down_type, dim, ffn) for e in range(n_exp)]
        with _interleaving(False):  # GGUF's Q4_K: every path reads it its own way (interleaved:
            # tests/test_q4_k_interleave.py)
            (gate, gu_code), (up, _), (down, down_code) = (
                fused.kernel_weight(gate, gu_type, dim),
                fused.kernel_weight(up, gu_type, dim),
                fused.kernel_weight(down, down_type, ffn),
            )
        for t in tokens:
            x = torch.randn(t, dim, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
            for routing in ("random", "two experts take all"):
                experts, weights, ref = _moe_reference(x, wg, wu, wd, k, routing, (0, 1))
                for path in _paths(t * k, gu_code, down_code):
                    with _kernels(path, scratch):
                        out = torch.ops.harness.moe_ffn(
                            x.to(device),
                            gate.to(device),
                            up.to(device),
                            down.to(device),
                            weights.to(device),
                            experts.to(device),
                            gu_code,
                            down_code,
                        )
                        # the layer's residual add in the op: the same add as after it, bit for bit
                        residual = torch.randn(t, dim).to(device)
                        folded = torch.ops.harness.moe_ffn(
                            *(a.to(device) for a in (x, gate, up, down, weights, experts)),
                            gu_code,
                            down_code,
                            residual,
                        )
                    layout = "packed" if (gu_code | down_code) & fused.PACKED else "gguf"
                    name = f"moe_ffn {gu_type.name}/{down_type.name} {layout} T={t} {routing} {path}"
                    exact = torch.equal(folded, residual + out)
                    results.append({"case": name, "nmse": _nmse(out, ref), "exact": exact})
    return results


def _moe_reference(x, wg, wu, wd, k: int, routing: str, takers: tuple[int, ...]):
    """A routing of x's tokens to k of the experts (float64 weights wg, wu [F, D], wd [D, F] per
    expert): random, or every token to the experts `takers` (the others get none); its routing
    weights, and the MoE MLP's output in float64."""
    t, n_exp = x.shape[0], len(wg)
    if routing == "random":
        experts = torch.stack([torch.randperm(n_exp)[:k] for _ in range(t)])
    else:
        experts = torch.tensor([list(takers)] * t)
    weights = torch.rand(t, k).softmax(-1)
    ref = torch.zeros(t, wd[0].shape[0], dtype=torch.float64)
    for i in range(t):
        for s in range(k):
            e, xi = int(experts[i, s]), x[i].double()
            h = torch.nn.functional.silu(wg[e] @ xi) * (wu[e] @ xi)
            ref[i] += weights[i, s].double() * (wd[e] @ h)
    return experts, weights, ref


def _decode_op_cases(device: str, tokens: tuple[int, ...], rng: np.random.Generator) -> list[dict]:
    """The ops that make a decode step few ops: qkv (q, k, v of one buffer and of three; types
    mixed as in Q4_K_M), attention with its cache write (at start positions and at device
    positions), router_topk and embed_rows, each against its reference (float64, or the torch
    path's own ops, bit for bit)."""
    from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN, rope_tables
    from harness.quant import fused
    from harness.quant.types import GGMLType

    results = []
    dim, hd, n_heads, n_kv = 256, 16, 4, 2
    s_max = 8 + max(tokens)  # cached positions: the tokens go at 5.., later ones stay masked
    cos, sin = rope_tables(hd, 10000.0, s_max, torch.device("cpu"))
    for types in ((GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q8_0), (GGMLType.Q6_K,) * 3):
        rows = (n_heads * hd, n_kv * hd, n_kv * hd)
        raws = [_random_weight(q, r, dim, rng) for q, r in zip(types, rows, strict=True)]
        refs = [_dequant(w, q, r, dim) for w, q, r in zip(raws, types, rows, strict=True)]
        # GGUF's blocks apart, in one buffer, and in the kernels' layout (as the model hands them:
        # `kernel_weight`'s codes, Q8_0 repacked) in one buffer
        for layout in ("apart", "one buffer", "kernel layout"):
            on_device, codes = [w.to(device) for w in raws], list(map(int, types))
            if layout == "kernel layout":
                prepared = [fused.kernel_weight(w, q, dim) for w, q in zip(on_device, types, strict=True)]
                on_device, codes = [w for w, _ in prepared], [c for _, c in prepared]
            if layout != "apart":
                on_device = fused.pack_rows(on_device, codes)
            for t in tokens:
                x = torch.randn(t, dim, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
                outs = torch.ops.harness.qkv(x.to(device), *on_device, *codes).split(rows, dim=1)
                for part, out, ref in zip("qkv", outs, refs, strict=True):
                    name = f"qkv {part} {'/'.join(q.name for q in types)} T={t} {layout}"
                    results.append({"case": name, "nmse": _nmse(out, x.double() @ ref.T)})

    for t in tokens:
        for at_device in (False, True) if t == 1 else (False,):
            start = 5
            q = torch.randn(t, n_heads * hd)
            k, v = torch.randn(t, n_kv * hd), torch.randn(t, n_kv * hd)
            cache_k, cache_v = torch.randn(n_kv, s_max, hd), torch.randn(n_kv, s_max, hd)
            ref, ref_k, ref_v = _attention_reference(q, k, v, cache_k, cache_v, cos, sin, start)
            got_k, got_v = cache_k.to(device), cache_v.to(device)
            positions = torch.tensor([start], device=device) if at_device else None
            if at_device:  # the static-shape step attends over the whole cache: later slots masked
                got_k[:, start + 1 :] = got_v[:, start + 1 :] = 1e4
            qkv, tables = torch.cat((q, k, v), 1).to(device), (cos.to(device), sin.to(device))
            out = torch.ops.harness.attention(qkv, got_k, got_v, *tables, positions, start)
            case = f"attention T={t} {'device position' if at_device else 'start position'}"
            results.append({"case": case, "nmse": _nmse(out, ref)})
            end = start + t
            same = torch.equal(got_k[:, :end].cpu(), ref_k[:, :end]) and torch.equal(
                got_v[:, :end].cpu(), ref_v[:, :end]
            )
            results.append({"case": f"{case} cache write", "nmse": 0.0, "exact": bool(same)})

    # router_topk from a quantized router's logits (weight None) runs the torch path's ops on the
    # same device, so the same bits (with the router's weight: `_router_cases`)
    for t in tokens:
        logits = torch.randn(t, 8).to(device)
        ref_w, ref_e = logits.softmax(-1).topk(2, dim=-1)
        ref_w = ref_w / ref_w.sum(-1, keepdim=True).clamp(min=ROUTER_WEIGHT_SUM_MIN)
        weights, experts = torch.ops.harness.router_topk(logits, None, 2, ROUTER_WEIGHT_SUM_MIN)
        exact = torch.equal(experts, ref_e) and torch.equal(weights, ref_w)
        name = f"router_topk logits T={t}"
        results.append({"case": name, "nmse": _nmse(weights, ref_w.cpu().double()), "exact": exact})

    table = _random_weight(GGMLType.Q4_K, 50, dim, rng)
    full = _dequant(table, GGMLType.Q4_K, 50, dim)
    ids = torch.tensor([49, 0, 7, 7, 21])
    rows = torch.ops.harness.embed_rows(table.to(device), ids.to(device), int(GGMLType.Q4_K), dim)
    results.append(
        {
            "case": "embed_rows",
            "nmse": _nmse(rows, full[ids]),
            "exact": bool(torch.equal(rows.cpu().double(), full[ids])),
        }
    )
    return results


def _split_sum_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """Decode-sized products whose output rows several programs make (the super-blocks split,
    the k experts of a token summed by `moe_ffn`'s down product): the last program of each tile
    sums the partials the others left (`fused._partials`), pair by pair and split by split from
    0.0. Each case's output against that sum done by torch in float32, bit for bit, twice in a
    row, the counters back at zero after the launches, and the output against float64 (NMSE)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    original, captured = fused._partials, []

    def partials(x, shape):
        captured.append(original(x, shape))
        return captured[-1]

    results = []
    cols = 2048 if small else 4096  # 8 or 16 super-blocks: several splits at a few output tiles
    for qtype, rows, t, k in (
        (GGMLType.Q6_K, 19, 1, 1),
        (GGMLType.Q4_K, 40, 1, 1),
        (GGMLType.Q6_K, 19, 3, 2),
    ):
        raw = _random_weight(qtype, rows, cols, rng)
        w = _dequant(raw, qtype, rows, cols)
        kraw, code = fused.kernel_weight(raw, qtype, cols)
        x = torch.randn(t * k, cols, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        scale = torch.rand(t * k)
        experts = torch.zeros(t * k, dtype=torch.int64)  # one "expert": the weight itself
        ref = ((x.double() @ w.T) * scale.double()[:, None]).view(t, k, rows).sum(1)
        fused._partials = partials
        try:
            outs = [
                fused._product(x.to(device), kraw.to(device)[None], None, code, rows, experts.to(device), 1,
                               scale.to(device), out_div=k).cpu()
                for _ in range(2)
            ]  # fmt: skip
        finally:
            fused._partials = original
        parts = [p.cpu() for p in captured[-2:]] if len(captured) >= 2 else []
        captured.clear()
        same = len(parts) == 2
        for out, part in zip(outs, parts, strict=False):
            total = torch.zeros(t, rows)
            for j in range(k):
                pair = torch.zeros(t, rows)
                for s in range(part.shape[0]):
                    pair = pair + part[s, j::k]
                total = total + pair
            same = same and torch.equal(out, total)
        counters = fused._split_counters(torch.empty(0, device=device).device, 0)
        same = same and not bool(counters.any())  # every launch left its counters at 0
        splits = parts[0].shape[0] if parts else 0
        name = f"split sum {qtype.name} {rows}x{cols} T={t} k={k} ({splits} splits)"
        results.append({"case": name, "nmse": _nmse(outs[0], ref), "exact": same, "splits": splits, "k": k})
    return results


def _check_split_sums(results: list[dict]) -> None:
    """Split sums ran with several splits, and with the k pairs of a token summed."""
    sums = [r for r in results if r["case"].startswith("split sum")]
    assert any(r["splits"] > 1 and r["k"] == 1 for r in sums), sums
    assert any(r["k"] > 1 for r in sums), sums


# Gated products (gate and up in one launch, silu(W.x) * (U.x): moe_ffn's) split over their
# super-blocks: (type, layout, matvec_path, thorough) of each read that handles GATED (Q3_K:
# the tile path). A thorough read takes every form of GATED_SPLIT_FORMS in 2 and 3 splits,
# against the unsplit kernel too, twice, and beside a plain product; the others (interpreter
# time) the light form in 3 splits once. On a GPU, Q4_K's reads at 8x7B's gate/up shape.
GATED_SPLIT_READS_SMALL = (
    ("Q4_K", "gguf", "int", True),
    ("Q4_K", "gguf", "vec", False),
    ("Q4_K", "gguf", "words", False),
    ("Q3_K", "gguf", "int", False),
    ("Q6_K", "packed", "int", False),
    ("Q8_0", "packed", "int", False),
    ("Q8_0", "packed", "vec", False),
)
GATED_SPLIT_READS_FULL = (
    ("Q4_K", "gguf", "int", True),
    ("Q4_K", "gguf", "vec", True),
    ("Q4_K", "gguf", "words", True),
)
# (experts of the pairs, scaled, out_div), x row p // 2 for pair p: moe_ffn's one token to two
# experts; two tokens, the second's pairs on one expert, routing-scaled, summed in twos.
GATED_SPLIT_FORMS = (((0, 1), False, 1), ((1, 0, 1, 1), True, 2))
GATED_SPLIT_LIGHT = ((1, 1), True, 1)  # both pairs on one expert, routing-scaled


@contextlib.contextmanager
def _planned_splits(code: int, shape: tuple, device: torch.device, splits: int):
    """Inside, a routed product of `shape` (in, out, pairs, out_div, gated, scaled) under the
    current `matvec_path` takes `splits` splits of its super-blocks: the least value of its
    setting's "gated_programs_per_sm" (gated) or "programs_per_sm" that plans them (0 for one
    split of a gated product: the unsplit kernel)."""
    from harness.quant import fused

    cols, rows, n_pairs, out_div, gated, scaled = shape
    cfg = fused.matvec_config(code)
    key = fused.split_setting(gated, routed=True)
    saved = cfg.get(key)
    try:
        for per_sm in range(0 if gated else 1, 4096):
            cfg[key] = per_sm
            plan = fused._matvec_plan(code, cols, rows, n_pairs, out_div, gated, scaled, True, device)
            if plan.grid[2] >= splits:
                break
        assert plan.grid[2] == splits and plan.reduce == (splits > 1 or out_div > 1), (splits, plan)
        yield
    finally:
        if saved is None:
            del cfg[key]
        else:
            cfg[key] = saved


def gated_split_case_count(small: bool) -> int:
    """How many results `_gated_split_cases` gives."""
    reads = GATED_SPLIT_READS_SMALL if small else GATED_SPLIT_READS_FULL
    return sum(len(GATED_SPLIT_FORMS) * 2 + 1 if thorough else 1 for *_, thorough in reads)


def _gated_split_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """Gated decode products (`fused._product` with u) split over their super-blocks
    (GATED_SPLIT_READS) against dequantize-then-matmul in float64, at rows that are no multiple
    of BN (under the interpreter): NMSE within NMSE_MAX, and the partials ([2 * splits, pairs,
    N]: W.x's then U.x's, unscaled) summing to W.x and U.x, the counters back at 0. A thorough
    read's split products also within NMSE_MAX of the unsplit kernel and the same bits twice,
    and a gated product beside a plain one with partials of the same splits, pairs and rows:
    each gets a buffer of its own size and its own right result."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    original, captured = fused._partials, []

    def partials(x, shape):
        captured.append(original(x, shape))
        return captured[-1]

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(int(rng.integers(1 << 30)))

    dev = torch.empty(0, device=device).device
    results, before = [], fused.matvec_path
    fused._partials = partials
    try:
        for name, layout, path, thorough in GATED_SPLIT_READS_SMALL if small else GATED_SPLIT_READS_FULL:
            fused.matvec_path = path
            qtype = GGMLType[name]
            # 3 super-blocks (8 for packed Q6_K), two output tiles, the last not full; 8x7B's on a GPU
            cols = (2048 if qtype == GGMLType.Q6_K else 768) if small else 4096
            rows = fused.matvec_config(_layout_code(qtype, layout))["BN"] + 3 if small else 14336
            stacks = [[_random_weight(qtype, rows, cols, rng) for _ in range(2)] for _ in range(2)]
            gate, up = (torch.stack([_dequant(r, qtype, rows, cols) for r in stack]) for stack in stacks)
            kernel = [_prepared(torch.cat(stack), qtype, cols, layout) for stack in stacks]
            code = kernel[0][1]
            w, u = (k.view(2, rows, -1).to(device) for k, _ in kernel)
            for experts, scaled, out_div in GATED_SPLIT_FORMS if thorough else (GATED_SPLIT_LIGHT,):
                n_pairs = len(experts)
                x = torch.randn(n_pairs // 2, cols, generator=seeded())
                scale = torch.rand(n_pairs) if scaled else torch.ones(n_pairs)
                g = torch.stack([gate[e] @ x[p // 2].double() for p, e in enumerate(experts)])
                h = torch.stack([up[e] @ x[p // 2].double() for p, e in enumerate(experts)])
                ref = torch.nn.functional.silu(g) * h * scale.double()[:, None]
                ref = ref.view(-1, out_div, rows).sum(1)
                ids = torch.tensor(experts).to(device)
                args = (x.to(device), w, u, code, rows, ids, 2, scale.to(device) if scaled else None)
                shape = (cols, rows, n_pairs, out_div, True, scaled)
                if thorough:
                    with _planned_splits(code, shape, dev, 1):
                        unsplit = fused._product(*args, out_div=out_div).cpu().double()
                for splits in (2, 3) if thorough else (3,):
                    captured.clear()
                    with _planned_splits(code, shape, dev, splits):
                        outs = [
                            fused._product(*args, out_div=out_div).cpu() for _ in range(2 if thorough else 1)
                        ]
                    part = captured[0].cpu()
                    halves = len(captured) == len(outs) and part.shape == (2 * splits, n_pairs, rows)
                    off = [_nmse(outs[0], ref)]
                    if halves:  # the W.x and U.x of every pair, unscaled
                        off += [_nmse(part[:splits].sum(0), g), _nmse(part[splits:].sum(0), h)]
                    if thorough:
                        off.append(_nmse(outs[0], unsplit))
                    form = f"experts={list(experts)}{' scaled' if scaled else ''} out_div={out_div}"
                    results.append({
                        "case": f"gated split {name} {layout} {path} {rows}x{cols} {form} splits={splits}",
                        "nmse": max(off) if halves else float("inf"), "splits": splits,
                        "exact": all(torch.equal(outs[0], o) for o in outs)
                        and not bool(fused._split_counters(dev, 0).any()),
                    })  # fmt: skip
            if not thorough:
                continue
            # beside a plain product whose partials have the gated one's shape (splits, pairs, N)
            experts, splits = (0, 1), 2
            x = torch.randn(1, cols, generator=seeded())
            g = torch.stack([gate[e] @ x[0].double() for e in experts])
            refs = (g, torch.nn.functional.silu(g) * torch.stack([up[e] @ x[0].double() for e in experts]))
            ids = torch.tensor(experts).to(device)
            captured.clear()
            outs = []
            for gated in (False, True, False, True):
                with _planned_splits(code, (cols, rows, 2, 1, gated, False), dev, splits):
                    outs.append(
                        fused._product(x.to(device), w, u if gated else None, code, rows, ids, 2, None).cpu()
                    )
            shapes = [tuple(p.shape) for p in captured]
            results.append({
                "case": f"gated split {name} {layout} {path} beside a plain product: partials {shapes}",
                "nmse": max(_nmse(out, refs[i % 2]) for i, out in enumerate(outs)), "splits": splits,
                "exact": shapes == [(splits, 2, rows), (2 * splits, 2, rows)] * 2
                and torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3]),
            })  # fmt: skip
    finally:
        fused._partials = original
        fused.matvec_path = before
    return results


def _check_gated_splits(results: list[dict], small: bool) -> None:
    assert len(results) == gated_split_case_count(small)
    assert {r["splits"] for r in results} == {2, 3}
    bad = [r for r in results if not r["nmse"] <= NMSE_MAX or r["exact"] is not True]
    assert not bad, bad


# Attention at decode shapes: (tokens, heads, KV heads, head dim, rope dims, cache length, first
# position, positions form). Under the interpreter small caches (odd lengths); on a GPU Mixtral's
# heads and a 4096-position cache. Positions at 0, in a partly filled cache, and at S_max - 1;
# GQA groups 4 and 1; head dims 64 and 128; rope on part of a head; 9 tokens take the torch path.
ATTENTION_SHAPES_SMALL = [
    (1, 8, 2, 64, 64, 37, 0, False),
    (1, 8, 2, 64, 64, 37, 36, True),
    (2, 8, 2, 128, 128, 37, 13, False),
    (5, 2, 2, 64, 16, 37, 20, True),
    (8, 2, 2, 128, 128, 37, 29, False),
    (8, 8, 2, 64, 64, 37, 0, True),
    (9, 8, 2, 64, 64, 37, 3, False),
    # the static-shape step early in a long cache: one KV head takes 4 splits (the CPU's
    # programs wanted), among which the kernel spreads the 71 keys seen: 32, 32, 7 and none
    # (the new key's position in the third split, its key from the fourth: the last)
    (1, 4, 1, 64, 64, 300, 70, True),
    # 8 tokens at device positions 60..67 across two splits' keys (64 and 4 keys)
    (8, 2, 2, 64, 64, 300, 60, True),
]
ATTENTION_SHAPES_FULL = [
    (1, 32, 8, 128, 128, 4096, 0, True),
    (1, 32, 8, 128, 128, 4096, 4095, True),
    (1, 32, 8, 128, 128, 512, 300, False),
    (2, 32, 8, 128, 128, 4096, 1000, False),
    (5, 8, 8, 64, 64, 4095, 2047, True),
    (8, 32, 8, 128, 128, 4096, 4088, False),
    (8, 8, 8, 128, 32, 1001, 0, True),
    (8, 16, 8, 64, 64, 333, 100, False),
    (9, 32, 8, 128, 128, 4096, 3, False),
    # A cache no longer than any split_min_keys of ATTENTION_CONFIGS (16 to 64): one split on
    # any device (the H100's 132 multiprocessors split every longer cache above).
    (1, 32, 8, 128, 128, 16, 10, True),
    # the decode graph's form in bench_model's cache (512 prompt + 128): its first and last
    # steps, and 8 tokens
    (1, 32, 8, 128, 128, 640, 512, True),
    (1, 32, 8, 128, 128, 640, 639, True),
    (8, 32, 8, 128, 128, 640, 600, True),
]
# Launch settings tried beside the default: short splits, so that small caches take several
# splits (and the merge launch) too; the rope and the cache write in a launch of their own.
ATTENTION_SPLIT_CONFIG = {"split_min_keys": 16}
ATTENTION_ROPE_LAUNCH_CONFIG = {"fold_rope": False}
ATTENTION_CONFIGS = {
    "default": {},
    "splits": ATTENTION_SPLIT_CONFIG,
    "rope launch": ATTENTION_ROPE_LAUNCH_CONFIG,
    "two launches": {},  # fused.ATTENTION_TWO_LAUNCHES (read where fused is imported)
}

# The one-launch form (the splits merged by the last program of each KV head, query tiles of
# group * tokens rows) against the torch path and against the two-launch form (the same
# splits and tiles, `_attention_merge_kernel` after): (tokens, group, KV heads, head dim, cache
# length, first position, positions form). Key counts 1, 63, 64, 65 (around split_min_keys 16's
# boundaries; on the CPU 4 programs wanted, so 1 to 3 splits a KV head), 513 of 640 at device
# positions (the decode graph's), 640; positions at S_max - 1; groups 1, 4, 8; 1 to 8 tokens
# (up to 32 query rows).
ATTENTION_MERGE_SHAPES = [
    (1, 4, 2, 128, 64, 0, False), (1, 4, 2, 128, 64, 62, False), (1, 4, 2, 128, 64, 63, False),
    (2, 4, 2, 64, 80, 63, False), (1, 4, 2, 128, 640, 512, True), (1, 4, 2, 128, 640, 639, True),
    (3, 1, 4, 64, 100, 62, True), (5, 1, 2, 64, 65, 60, False), (2, 8, 2, 64, 66, 63, True),
    (4, 8, 1, 64, 64, 60, False), (7, 4, 1, 32, 72, 58, True), (8, 4, 1, 64, 70, 62, True),
]  # fmt: skip
ATTENTION_MERGE_CONFIGS = {
    "one launch": {"split_min_keys": 16, "fold_merge_rows": 32},  # every tile (ATTENTION_MAX_ROWS)
    "two launches": {"split_min_keys": 16, "fold_merge_rows": 0},
    # the merge a split a step (on a GPU many splits take several): rescaled step by step
    "one launch, a split a step": {"split_min_keys": 16, "fold_merge_rows": 32, "merge_floats": 1},
}


def _attention_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`harness::attention` at decode shapes (ATTENTION_SHAPES_*), under each of
    ATTENTION_CONFIGS: its output against float64 (NMSE) and against the torch path (largest
    difference), its cache writes bit for bit those of the torch path and of the reference, and
    whether the Triton kernels ran. The slots the call writes hold NaN before it: a program
    that read one before the call's own key and value were written there (rather than taking
    them from qkv, as the one-launch form must) would give NaN."""
    from harness.model.mixtral import rope_tables
    from harness.quant import fused

    results = []
    shapes = ATTENTION_SHAPES_SMALL if small else ATTENTION_SHAPES_FULL
    for t, n_heads, n_kv, hd, rope_dim, s_max, start, at_device in shapes:
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        cos, sin = rope_tables(rope_dim, 10000.0, s_max, torch.device("cpu"))
        q = torch.randn(t, n_heads * hd, generator=gen)
        k, v = torch.randn(t, n_kv * hd, generator=gen), torch.randn(t, n_kv * hd, generator=gen)
        k[0, :hd] *= 1e-38  # its rotated products subnormal: kept, not flushed to zero (CUDA's .ftz)
        cache_k, cache_v = (
            torch.randn(n_kv, s_max, hd, generator=gen),
            torch.randn(n_kv, s_max, hd, generator=gen),
        )
        if at_device:  # the static-shape step attends over the whole cache: later slots masked
            cache_k[:, start + t :] = cache_v[:, start + t :] = 1e4
        cache_k[:, start : start + t] = cache_v[:, start : start + t] = float("nan")
        ref, ref_k, ref_v = _attention_reference(q, k, v, cache_k, cache_v, cos, sin, start)
        args = [torch.cat((q, k, v), 1).to(device)]
        tables = cos.to(device), sin.to(device)
        positions = torch.arange(start, start + t, device=device) if at_device else None
        outs = {}
        for path, label in (("torch", "default"), *(("triton", label) for label in ATTENTION_CONFIGS)):
            got_k, got_v = cache_k.to(device), cache_v.to(device)
            config = fused.ATTENTION_TWO_LAUNCHES if label == "two launches" else ATTENTION_CONFIGS[label]
            with _attention_kernels(path, config):
                kernels = fused.attention_takes_kernels(*args, got_k, got_v, *tables, positions)
                splits = fused.attention_splits(start + t if positions is None else s_max, n_kv, got_k.device)
                out = torch.ops.harness.attention(*args, got_k, got_v, *tables, positions, start)
            outs[path, label] = out.cpu(), got_k.cpu(), got_v.cpu()
            if path == "torch":
                continue
            torch_out, torch_k, torch_v = outs["torch", "default"]
            form = "device positions" if at_device else "start position"
            case = (
                f"attention kernels T={t} H={n_heads} K={n_kv} Hd={hd} rope {rope_dim} S_max={s_max} at {start} {form} "
                f"{label} ({splits[0] if kernels else 'torch path'})"
            )
            caches = (out_k, out_v) = outs[path, label][1:]
            same = all(torch.equal(a, b) for a, b in zip(caches, (torch_k, torch_v), strict=True))
            results.append(
                {
                    "case": case,
                    "nmse": _nmse(out, ref),
                    "max_abs_vs_torch": float((out.cpu() - torch_out).abs().max()),
                    "exact": same and torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v),
                    "kernels": kernels,
                    "expect_kernels": t <= fused.ATTENTION_MAX_TOKENS,
                    "splits": splits[0],
                    "fold_rope": kernels and fused.ATTENTION_CONFIG["fold_rope"] and label != "rope launch",
                }
            )
    return results + _attention_past_cache_cases(device, rng)


def _attention_past_cache_cases(device: str, rng: np.random.Generator) -> list[dict]:
    """`harness::attention`'s kernels at device positions past the cache (each of
    ATTENTION_CONFIGS): 2 tokens at S_max - 1 and S_max write the first token's key and value
    and nothing else, and the first token's output is that of a call of it alone (it does not
    see the second); 1 token at S_max + 3 writes nothing. (The torch path's index_copy_ raises.)"""
    from harness.model.mixtral import rope_tables
    from harness.quant import fused

    results = []
    n_heads, n_kv, hd, s_max = 8, 2, 64, 40
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    cos, sin = rope_tables(hd, 10000.0, s_max, torch.device("cpu"))
    q = torch.randn(2, n_heads * hd, generator=gen)
    k, v = torch.randn(2, n_kv * hd, generator=gen), torch.randn(2, n_kv * hd, generator=gen)
    cache_k, cache_v = (
        torch.randn(n_kv, s_max, hd, generator=gen),
        torch.randn(n_kv, s_max, hd, generator=gen),
    )
    ref, ref_k, ref_v = _attention_reference(q[:1], k[:1], v[:1], cache_k, cache_v, cos, sin, s_max - 1)
    tables = cos.to(device), sin.to(device)
    for label, config in ATTENTION_CONFIGS.items():
        if label == "two launches":
            config = fused.ATTENTION_TWO_LAUNCHES
        for positions in ([s_max - 1, s_max], [s_max + 3]):
            t = len(positions)
            got_k, got_v = cache_k.to(device), cache_v.to(device)
            qkv = torch.cat((q, k, v), 1)[:t].to(device)
            with _attention_kernels("triton", config):
                out = torch.ops.harness.attention(
                    qkv, got_k, got_v, *tables, torch.tensor(positions, device=device), 0
                )
            want_k, want_v = (ref_k, ref_v) if t == 2 else (cache_k, cache_v)
            exact = torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)
            results.append(
                {
                    "case": f"attention past the cache at {positions} {label}",
                    "nmse": _nmse(out[:1], ref) if t == 2 else 0.0,
                    "exact": exact,
                }
            )
    return results


def _attention_merge_cases(device: str, rng: np.random.Generator) -> list[dict]:
    """`harness::attention`'s kernels at ATTENTION_MERGE_SHAPES under each of
    ATTENTION_MERGE_CONFIGS: the output against float64 (NMSE), the torch path and the other
    form (largest differences, and whether they give the same bits; a split a step against one
    launch), the caches
    against the reference bit for bit (the call's slots NaN before it, as in
    `_attention_cases`), the split count."""
    from harness.model.mixtral import rope_tables
    from harness.quant import fused

    results = []
    for t, group, n_kv, hd, s_max, start, at_device in ATTENTION_MERGE_SHAPES:
        n_heads = group * n_kv
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        cos, sin = rope_tables(hd, 10000.0, s_max, torch.device("cpu"))
        q = torch.randn(t, n_heads * hd, generator=gen)
        k, v = torch.randn(t, n_kv * hd, generator=gen), torch.randn(t, n_kv * hd, generator=gen)
        cache_k, cache_v = (
            torch.randn(n_kv, s_max, hd, generator=gen),
            torch.randn(n_kv, s_max, hd, generator=gen),
        )
        if at_device:
            cache_k[:, start + t :] = cache_v[:, start + t :] = 1e4
        cache_k[:, start : start + t] = cache_v[:, start : start + t] = float("nan")
        ref, ref_k, ref_v = _attention_reference(q, k, v, cache_k, cache_v, cos, sin, start)
        qkv = torch.cat((q, k, v), 1).to(device)
        tables = cos.to(device), sin.to(device)
        positions = torch.arange(start, start + t, device=device) if at_device else None
        outs = {}
        for label, config in (("torch", None), *ATTENTION_MERGE_CONFIGS.items()):
            got_k, got_v = cache_k.to(device), cache_v.to(device)
            with _attention_kernels("torch" if config is None else "triton", config or {}):
                kernels = fused.attention_takes_kernels(qkv, got_k, got_v, *tables, positions)
                splits = fused.attention_splits(s_max if at_device else start + t, n_kv, got_k.device)[0]
                out = torch.ops.harness.attention(qkv, got_k, got_v, *tables, positions, start).cpu()
            outs[label] = out
            if config is None:
                continue
            other = None if label == "one launch" else outs["one launch"]
            form = "device positions" if at_device else "start position"
            results.append(
                {
                    "case": f"attention {label} T={t} group {group} K={n_kv} Hd={hd} S_max={s_max} at {start} {form}",
                    "form": label,
                    "keys": start + t,
                    "nmse": _nmse(out, ref),
                    "max_abs_vs_torch": float((out - outs["torch"]).abs().max()),
                    "max_abs_vs_other": None if other is None else float((out - other).abs().max()),
                    "same_bits_as_other": None if other is None else torch.equal(out, other),
                    "exact": torch.equal(got_k.cpu(), ref_k) and torch.equal(got_v.cpu(), ref_v),
                    "kernels": kernels,
                    "splits": splits,
                }
            )
    return results


def _check_attention_merge(results: list[dict], interpreted: bool) -> None:
    """Every case took the kernels, several splits among them and one split; each form within
    ATTENTION_MAX_ABS of the torch path and NMSE_MAX of float64, its cache writes exact; the
    others within ATTENTION_MAX_ABS of one launch, and under the interpreter two launches the
    same bits (numpy adds the splits in order in both merges)."""
    assert len(results) == len(ATTENTION_MERGE_SHAPES) * len(ATTENTION_MERGE_CONFIGS)
    assert all(r["kernels"] for r in results), results
    assert {1, 2, 3} <= {r["splits"] for r in results}
    assert {1, 63, 64, 65, 513, 640} <= {r["keys"] for r in results}
    bad = [
        r for r in results
        if not (r["nmse"] <= NMSE_MAX and r["max_abs_vs_torch"] <= ATTENTION_MAX_ABS and r["exact"])
    ]  # fmt: skip
    assert not bad, bad
    pairs = [r for r in results if r["max_abs_vs_other"] is not None]
    assert len(pairs) == 2 * len(ATTENTION_MERGE_SHAPES)
    far = [r for r in pairs if not r["max_abs_vs_other"] <= ATTENTION_MAX_ABS]
    assert not far, far
    if interpreted:
        differ = [r for r in pairs if r["form"] == "two launches" and not r["same_bits_as_other"]]
        assert not differ, differ


@contextlib.contextmanager
def _attention_kernels(path: str, config: dict):
    """Inside, `harness::attention` takes `path` ("triton" or "torch") with launch settings
    `config` over the defaults."""
    from harness.quant import fused

    before = fused.attention_path, dict(fused.ATTENTION_CONFIG)
    fused.attention_path = path
    fused.ATTENTION_CONFIG.update(config)
    try:
        yield
    finally:
        fused.attention_path = before[0]
        fused.ATTENTION_CONFIG.clear()
        fused.ATTENTION_CONFIG.update(before[1])


def _attention_reference(q, k, v, cache_k, cache_v, cos, sin, start):
    """Attention of tokens at start.. over a cache, in float64 from the model's torch path's rope:
    the output [T, H*Hd] and the caches after the write (float32)."""
    t, n_kv, hd = q.shape[0], cache_k.shape[0], cache_k.shape[2]
    n_heads = q.shape[1] // hd
    c, s_ = cos[start : start + t, None, :], sin[start : start + t, None, :]

    def rope(x):  # on the first 2 * cos.shape[1] dims
        rot, rest = x[..., : 2 * cos.shape[1]], x[..., 2 * cos.shape[1] :]
        even, odd = rot[..., 0::2], rot[..., 1::2]
        return torch.cat(
            (torch.stack((even * c - odd * s_, even * s_ + odd * c), dim=-1).flatten(-2), rest), -1
        )

    qr, kr = rope(q.view(t, n_heads, hd)), rope(k.view(t, n_kv, hd))
    cache_k, cache_v = cache_k.clone(), cache_v.clone()
    cache_k[:, start : start + t] = kr.transpose(0, 1)
    cache_v[:, start : start + t] = v.view(t, n_kv, hd).transpose(0, 1)
    out = torch.zeros(t, n_heads, hd, dtype=torch.float64)
    group = n_heads // n_kv
    for i in range(t):
        for h in range(n_heads):
            keys = cache_k[h // group, : start + i + 1].double()
            p = ((keys @ qr[i, h].double()) * hd**-0.5).softmax(-1)
            out[i, h] = p @ cache_v[h // group, : start + i + 1].double()
    return out.reshape(t, n_heads * hd), cache_k, cache_v


PACKED_DEQUANT_SHAPES = ((3, 2048), (3, 5, 4096))  # a launch's last program part-filled; experts


def _packed_dequant_cases(device: str, rng: np.random.Generator) -> list[dict]:
    """The prefill's float16 dequantization of a weight in `pack`'s layout, read in place
    (no unpacked copy), against the GGUF blocks' dequantization to float16 bit for bit, and
    against float64 (random and extreme scales: values beyond float16's range become inf alike)."""
    from harness.quant import fused, kernels
    from harness.quant.types import GGMLType

    results = []
    for qtype in (GGMLType.Q6_K, GGMLType.Q8_0):
        for shape in PACKED_DEQUANT_SHAPES:
            for make in (_random_weight, _extreme_weight):
                raw = make(qtype, int(np.prod(shape[:-1])), shape[-1], rng).reshape(*shape[:-1], -1)
                out = fused._dequantize_packed(fused.pack(raw, qtype).to(device), qtype, shape).cpu()
                ref = kernels.dequantize(raw.to(device), qtype, shape, torch.float16).cpu()
                exact = torch.equal(out.view(torch.int16), ref.view(torch.int16))
                finite = make is _random_weight
                nmse = (
                    _nmse(out, _dequant(raw, qtype, int(np.prod(shape[:-1])), shape[-1]).view(shape))
                    if finite
                    else 0.0
                )
                name = f"dequant packed {qtype.name} {list(shape)} {make.__name__.strip('_')}"
                results.append({"case": name, "nmse": nmse, "exact": exact})
    return results


SCALED_HALF_SHAPES = ((5, 256), (6, 14336 + 256))  # rows of one and of several loop steps


def _scaled_half_cases(device: str) -> list[dict]:
    """The prefill's activations as float16 rows over their peak (one launch), against torch's
    ops bit for bit: rows from 1e-30 to 1e30, a row of zeros, one with an inf, one with a NaN."""
    from harness.quant import fused

    results = []
    for rows, cols in SCALED_HALF_SHAPES:
        x = torch.randn(rows, cols) * torch.logspace(-30, 30, rows)[:, None]
        x[0], x[2, 5], x[3, 7] = 0.0, float("inf"), float("nan")
        peak = x.abs().amax(1)
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        ref = (x / peak[:, None]).half()
        out, out_peak = (t.cpu() for t in fused._scaled_half(x.to(device)))
        # NaN's bits are the platform's (inf/inf is -NaN on an x86 CPU, +NaN on CUDA): NaN at the
        # same places, every other value bit for bit
        nan = ref.isnan()
        exact = (
            torch.equal(out.isnan(), nan)
            and torch.equal(out.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])
            and torch.equal(out_peak, peak)
        )
        results.append({"case": f"scaled_half {rows}x{cols}", "nmse": 0.0, "exact": exact})
    return results


# The prefill's grouped products (`fused._product` of more than MATVEC_MAX_ROWS routed pairs),
# each (pairs, x_div, gated, scaled, routing, scratch of 2 experts): pair p reads x row
# p // x_div (moe_ffn's gate/up product: x_div = k); gated and unscaled is moe_ffn's gate/up
# form, scaled with one weight its down form. The scratch holds all experts or 2 at a time
# (chunks of 2, 2, 1). The interpreter takes seconds a case: each fact is covered once or twice.
GROUPED_CASES = (
    *((n, x_div, True, False, "random", False) for n, x_div in ((9, 3), (17, 1), (129, 3), (512, 2))),
    *((n, 1, False, True, "random", False) for n in (9, 17, 129, 512)),
    (129, 3, True, False, "one expert takes all", False),
    (129, 1, False, True, "one expert takes all", False),
    (129, 3, True, False, "experts 0 and 4 take none", False),
    (17, 1, False, True, "experts 0 and 4 take none", False),
    (129, 3, True, False, "random", True),
    (129, 1, False, True, "experts 0 and 4 take none", True),
    (17, 1, True, True, "random", False),
    (17, 17, False, False, "random", True),
)
GROUPED_EXPERTS = 5


# `_sort_by_expert`'s kernel against its torch ops: (pairs, experts, block), each in three
# routings (random, every pair to the last expert, pairs on every third expert only); the last
# is past SORT_KERNEL_MAX, where torch's ops run.
SORT_CASES = (
    (1, 8, 64),
    (9, 3, 16),
    (17, 1, 16),
    (129, 60, 16),
    (1024, 8, 64),
    (300, 128, 64),
    (70000, 8, 64),
)


def grouped_case_count() -> int:
    """How many results `_grouped_cases` gives: the products, 2 moe_ffn launch counts, and
    the sorts."""
    return len(GROUPED_CASES) + 2 + 3 * len(SORT_CASES)


def _grouped_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """The "dequant" prefill of routed pairs (`_grouped_kernel`, gate and up in one launch where
    gated) against float64: GROUPED_EXPERTS experts of Q4_K gate and up weights with an odd
    row count (one full output tile and a part-filled one), experts with no pair and with every
    pair (GROUPED_CASES). Then moe_ffn's prefill: its pairs sorted once, and the grouped
    launches it makes (`_moe_launch_cases`)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    q4 = GGMLType.Q4_K
    n_exp, rows, cols = GROUPED_EXPERTS, 131, 256 if small else 1024
    gate = torch.stack([_random_weight(q4, rows, cols, rng) for _ in range(n_exp)])
    up = torch.stack([_random_weight(q4, rows, cols, rng) for _ in range(n_exp)])
    wg = torch.stack([_dequant(gate[e], q4, rows, cols) for e in range(n_exp)])
    wu = torch.stack([_dequant(up[e], q4, rows, cols) for e in range(n_exp)])
    results = []
    for n_pairs, x_div, gated, scaled, routing, chunked in GROUPED_CASES:
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        x = torch.randn(n_pairs // x_div, cols, generator=gen)
        scale = torch.rand(n_pairs, generator=gen)
        if routing == "random":
            experts = torch.randint(0, n_exp, (n_pairs,), generator=gen)
        elif routing == "one expert takes all":
            experts = torch.full((n_pairs,), 2)
        else:
            experts = torch.randint(1, n_exp - 1, (n_pairs,), generator=gen)
        xs = x.double()[torch.arange(n_pairs) // x_div]
        ref = torch.einsum("pk,pnk->pn", xs, wg[experts])
        if gated:
            ref = torch.nn.functional.silu(ref) * torch.einsum("pk,pnk->pn", xs, wu[experts])
        if scaled:
            ref = ref * scale.double()[:, None]
        scratch = 2 * (2 if gated else 1) * rows * cols * 2 if chunked else None
        with _kernels("prefill=dequant", scratch):
            out = fused._product(
                x.to(device), gate.to(device), up.to(device) if gated else None, int(q4), rows,
                experts.to(device), x_div, scale.to(device) if scaled else None,
            )  # fmt: skip
        form = ("gated" if gated else "one weight") + (" scaled" if scaled else "")
        chunks = "2 experts" if chunked else "all experts"
        name = f"grouped {form} pairs={n_pairs} x_div={x_div} {routing}, scratch of {chunks}"
        results.append({"case": name, "nmse": _nmse(out, ref)})
    results += _moe_launch_cases(device, rng)
    results += _sort_cases(device, rng)
    return results


def _sort_cases(device: str, rng: np.random.Generator) -> list[dict]:
    """The prefill's sort of pairs by expert (`_sort_by_expert`: one launch where Triton runs)
    against its torch ops (`_sort_by_expert_torch`) on the CPU, element for element (SORT_CASES);
    "launches" says whether the kernel ran."""
    from harness.quant import fused

    results, launch, launched = [], fused.launch, []

    def counted(kernel, *args, **kwargs):
        launched.append(kernel)
        return launch(kernel, *args, **kwargs)

    for n_pairs, n_exp, block in SORT_CASES:
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        for routing in ("random", "last expert takes all", "every third expert"):
            if routing == "random":
                experts = torch.randint(0, n_exp, (n_pairs,), generator=gen)
            elif routing == "last expert takes all":
                experts = torch.full((n_pairs,), n_exp - 1)
            else:
                experts = torch.randint(0, -(-n_exp // 3), (n_pairs,), generator=gen) * 3
            launched.clear()
            fused.launch = counted
            try:
                got = [t.cpu() for t in fused._sort_by_expert(experts.to(device), n_exp, block)]
            finally:
                fused.launch = launch
            want = fused._sort_by_expert_torch(experts, n_exp, block)
            exact = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            kernel = n_pairs * fused._next_pow2(n_exp) <= fused.SORT_KERNEL_MAX
            name = f"sort pairs={n_pairs} experts={n_exp} block={block} {routing}"
            results.append(
                {"case": name, "nmse": 0.0, "exact": exact, "launches": len(launched), "kernel": kernel}
            )
    return results


def _moe_launch_cases(device: str, rng: np.random.Generator) -> list[dict]:
    """moe_ffn's "dequant" prefill (17 tokens, 2 experts each, of 3) as launched: how many times
    it sorts the pairs by expert, how many `_grouped_kernel` launches it makes (one per chunk of
    experts for gate/up/SwiGLU, one per chunk for down), whether it calls a torch silu, and its
    NMSE against float64; with every expert's weights in the scratch at once, and with one."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    q4, n_exp, t, k, dim, ffn = GGMLType.Q4_K, 3, 17, 2, 256, 256
    gate, up, down = (
        torch.stack([_random_weight(q4, ffn, dim, rng) for _ in range(n_exp)]) for _ in range(3)
    )
    wg, wu, wd = ([_dequant(m[e], q4, ffn, dim) for e in range(n_exp)] for m in (gate, up, down))
    x = torch.randn(t, dim, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
    experts, weights, ref = _moe_reference(x, wg, wu, wd, k, "random", ())
    results = []
    for scratch, chunk in ((None, n_exp), (2 * ffn * dim * 2, 1)):
        counts = {"sorts": 0, "grouped": 0, "silu": 0}
        sort, launch, silu = fused._sort_by_expert, fused.launch, torch.nn.functional.silu

        def counted(name, fn, counts=counts):
            def call(*args, **kwargs):
                counts[name] += name != "grouped" or args[0] is fused._grouped_kernel
                return fn(*args, **kwargs)

            return call

        fused._sort_by_expert, fused.launch = counted("sorts", sort), counted("grouped", launch)
        torch.nn.functional.silu = counted("silu", silu)
        try:
            with _kernels("prefill=dequant", scratch):
                out = torch.ops.harness.moe_ffn(
                    x.to(device), gate.to(device), up.to(device), down.to(device), weights.to(device),
                    experts.to(device), int(q4), int(q4),
                )  # fmt: skip
        finally:
            fused._sort_by_expert, fused.launch, torch.nn.functional.silu = sort, launch, silu
        results.append(
            {
                "case": f"moe_ffn launches T={t} k={k} E={n_exp} chunks of {chunk}",
                "nmse": _nmse(out, ref),
                **counts,
                # gate/up: 2 x chunk experts' scratch; down: chunk experts' (in twice the room)
                "expect_grouped": -(-n_exp // chunk) + -(-n_exp // min(n_exp, 2 * chunk)),
            }
        )
    return results


def _check_grouped(results: list[dict]) -> None:
    assert len(results) == grouped_case_count()
    bad = [r for r in results if not r["nmse"] <= NMSE_MAX or r.get("exact") is False]
    assert not bad, bad
    sorts = [r for r in results if r["case"].startswith("sort ")]
    assert [r["launches"] for r in sorts] == [int(r["kernel"]) for r in sorts], sorts
    assert any(not r["kernel"] for r in sorts)
    launches = [r for r in results if r["case"].startswith("moe_ffn launches")]
    assert [(r["sorts"], r["silu"], r["grouped"]) for r in launches] == [
        (1, 0, r["expect_grouped"]) for r in launches
    ], launches


def int_read_case_count(small: bool) -> int:
    """How many results `_int_read_cases` gives: the products, 2 qkv cases, moe_ffn's pairs of
    types at their token counts and 2 routings, 2 layout cases and 4 dp2a forms."""
    moe = sum(len(tokens) for _, _, _, tokens in INT_MOE_SMALL if small) + sum(
        len(tokens) for _, _, _, tokens in INT_MOE_FULL if not small
    )
    return len(INT_READ_WEIGHTS) * (len(INT_READ_TOKENS) + len(INT_READ_X)) + 2 + 2 * moe + 2 + 4


# The "int" reads (`fused.INT_READ_TYPES`): (type, layout, row length small, on a GPU, rows):
# odd row counts, one part-filled tile and several tiles (Q4_K's BN is 64).
INT_READ_WEIGHTS = (
    ("Q4_K", "gguf", 512, 4096, 19),
    ("Q4_K", "gguf", 256, 4096, 131),
    ("Q5_K", "gguf", 256, 4096, 19),
    ("Q6_K", "packed", 2048, 4096, 9),
    ("Q8_0", "packed", 256, 4096, 21),
)
INT_READ_TOKENS = (1, 5, 8)  # 8: MATVEC_MAX_ROWS
INT_READ_X = ("outlier", "zero row", "nan")


def _int_read_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`matvec_path` "int": qmatmul against float64 at 1, 5 and MATVEC_MAX_ROWS rows (each case
    checks that x went through `fused._int_x` once under `int_x_path` "launch", never under
    "kernel"), x with an outlier, a row of zeros (exactly 0 out)
    and a NaN (its row all non-finite, the others finite); moe_ffn with T*k up to
    MATVEC_MAX_ROWS pairs, experts with no token and with every token; `_int_x`'s layout, scales
    and rounding recomputed by torch bit for bit; `_dp2a` (PTX on a GPU, emulated under the
    interpreter) against int64 arithmetic."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    assert INT_READ_TOKENS[-1] == fused.MATVEC_MAX_ROWS
    original, calls = fused._int_x, []

    def counted(x):
        calls.append(x.shape)
        return original(x)

    results = []
    fused._int_x = counted
    try:
        for name, layout, cols_small, cols_full, rows in INT_READ_WEIGHTS:
            qtype, cols = GGMLType[name], cols_small if small else cols_full
            raw = _random_weight(qtype, rows, cols, rng)
            w = _dequant(raw, qtype, rows, cols)
            kraw, code = _prepared(raw, qtype, cols, layout)
            kraw = kraw.to(device)
            for t in INT_READ_TOKENS:
                x = torch.randn(t, cols, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
                calls.clear()
                with _kernels("matvec=int"):
                    out = torch.ops.harness.qmatmul(x.to(device), kraw, code, rows)
                case = f"int qmatmul {name} {layout} T={t} N={rows} K={cols}"
                launches = 1 if fused.int_x_path == "launch" else 0
                results.append(
                    {"case": case, "nmse": _nmse(out, x.double() @ w.T), "exact": len(calls) == launches}
                )
            for form in INT_READ_X:
                x = torch.randn(3, cols)
                if form == "outlier":  # one activation 1e4 times the others: its block's scale is large
                    x[1, 37] = 1e4
                else:
                    x[0] = 0.0 if form == "zero row" else x[0]
                    if form == "nan":
                        x[0, 5] = float("nan")
                with _kernels("matvec=int"):
                    out = torch.ops.harness.qmatmul(x.to(device), kraw, code, rows).cpu()
                ref = x.double() @ w.T
                if form == "outlier":
                    nmse, exact = _nmse(out, ref), True
                elif form == "zero row":
                    nmse, exact = _nmse(out[1:], ref[1:]), bool((out[0] == 0).all())
                else:
                    nmse, exact = _nmse(out[1:], ref[1:]), not bool(torch.isfinite(out[0]).any())
                results.append(
                    {"case": f"int qmatmul {name} {layout} N={rows} x {form}", "nmse": nmse, "exact": exact}
                )
        results += _int_qkv_cases(device, small, rng, calls)
    finally:
        fused._int_x = original

    results += _int_moe_cases(device, small, rng)
    results += _int_x_layout_cases(device)
    results += _dp2a_cases(device)
    return results


def _int_qkv_cases(device: str, small: bool, rng: np.random.Generator, calls: list) -> list[dict]:
    """`harness::qkv` of Q4_K_M's types (q and k Q4_K in one buffer, v packed Q6_K) through the
    "int" reads at 1 and MATVEC_MAX_ROWS tokens: x quantized by one `_int_x` for both launches
    under `int_x_path` "launch", by none under "kernel" (`calls` counts `fused._int_x`), each part bit for bit `harness::qmatmul` of its weight alone, and
    a second call on other x the same bits as a first would give (it reuses the scratch of the
    calls before it, `fused._SCRATCH`, and makes none)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    q4, q6 = GGMLType.Q4_K, GGMLType.Q6_K
    cols = 2048 if small else 4096  # (Q6_K rows pack from 2048 values: whole 16 bytes)
    prepared = [
        _prepared(_random_weight(qtype, rows, cols, rng), qtype, cols, layout)
        for qtype, rows, layout in ((q4, 67, "gguf"), (q4, 19, "gguf"), (q6, 19, "packed"))
    ]
    weights = fused.pack_rows([w.to(device) for w, _ in prepared], [code for _, code in prepared])
    codes = [code for _, code in prepared]
    results = []
    for t in (1, fused.MATVEC_MAX_ROWS):
        seed = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        x = torch.randn(t, cols, generator=seed).to(device)
        with _kernels("matvec=int"):
            calls.clear()
            got = torch.ops.harness.qkv(x, *weights, *codes).split([w.shape[0] for w in weights], 1)
            once = len(calls) == (1 if fused.int_x_path == "launch" else 0)
            alone = [torch.ops.harness.qmatmul(x, w, c, len(w)) for w, c in zip(weights, codes, strict=True)]
            scratch = len(fused._SCRATCH)
            torch.ops.harness.qkv(-x, *weights, *codes)
            again = torch.ops.harness.qkv(x, *weights, *codes).split([len(w) for w in weights], 1)
            reused = len(fused._SCRATCH) == scratch
        same = all(torch.equal(a, b) for a, b in zip(got, alone, strict=True))
        same = same and reused and all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
        results.append({"case": f"int qkv Q4_K+Q4_K, Q6_K packed T={t}", "nmse": 0.0, "exact": once and same})
    return results


# moe_ffn through the "int" reads: (gate/up type, down type, ffn, tokens); k = 2 of 4 experts,
# so 4 tokens make MATVEC_MAX_ROWS pairs. Under the interpreter small sizes (run_cases' moe_ffn
# cases take the int read at 1 token; packed Q6_K is read routed by the products above); on a
# GPU Q4_K_M's pair of types with a packed Q6_K down.
INT_MOE_SMALL = (("Q4_K", "Q8_0", 256, (4,)), ("Q8_0", "Q4_K", 256, (4,)))
INT_MOE_FULL = (("Q4_K", "Q6_K", 2048, (1, 4)), ("Q8_0", "Q4_K", 512, (1, 4)), ("Q4_K", "Q8_0", 512, (4,)))


def _int_moe_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """moe_ffn through the "int" reads (INT_MOE_*) against float64; routings: random, and two
    experts taking every token (the others none)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    n_exp, k, dim = 4, 2, 256 if small else 1024
    results = []
    for gu_name, down_name, ffn, tokens in INT_MOE_SMALL if small else INT_MOE_FULL:
        gu_type, down_type = GGMLType[gu_name], GGMLType[down_name]
        stacks = [
            torch.stack([_random_weight(q, r, c, rng) for _ in range(n_exp)])
            for q, r, c in ((gu_type, ffn, dim), (gu_type, ffn, dim), (down_type, dim, ffn))
        ]
        refs = [
            [_dequant(s[e], q, r, c) for e in range(n_exp)]
            for s, q, r, c in zip(
                stacks, (gu_type, gu_type, down_type), (ffn, ffn, dim), (dim, dim, ffn), strict=True
            )
        ]
        (gate, gu_code), (up, _), (down, down_code) = (
            fused.kernel_weight(stacks[0], gu_type, dim),
            fused.kernel_weight(stacks[1], gu_type, dim),
            fused.kernel_weight(stacks[2], down_type, ffn),
        )
        for t in tokens:
            for routing in ("random", "two experts take all"):
                x = torch.randn(t, dim, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
                experts, weights, ref = _moe_reference(x, *refs, k, routing, (3, 1))
                with _kernels("matvec=int"):
                    out = torch.ops.harness.moe_ffn(
                        *(a.to(device) for a in (x, gate, up, down, weights, experts)), gu_code, down_code
                    )
                name = f"int moe_ffn {gu_type.name}/{down_type.name} T={t} {routing}"
                results.append({"case": name, "nmse": _nmse(out, ref)})
    return results


# moe_ffn's decode fusions (MOE_FFN_CONFIG) against its launches without them: (gate/up type,
# down type, dim, ffn, [(tokens, k)]), each with and without a residual. Under the interpreter
# small sizes (packed Q6_K needs rows of 2048: fewer pairs); on a GPU Mixtral's and smaller.
# The last shape's rows are of two or more super-blocks: the fallbacks split its gated product.
MOE_FUSION_SMALL = (
    ("Q4_K", "Q4_K", 256, 512, ((1, 1), (1, 2), (4, 2))),
    ("Q4_K", "Q6_K", 256, 2048, ((1, 2), (2, 1))),
    ("Q4_K", "Q4_K", 512, 256, ((3, 2), (5, 1))),
)
MOE_FUSION_FULL = (
    ("Q4_K", "Q6_K", 4096, 14336, ((1, 2), (2, 2), (4, 2))),
    ("Q4_K", "Q4_K", 1024, 2048, ((1, 1), (1, 2), (3, 2), (8, 1))),
)
# the launches of one moe_ffn: x's `_int_x`, gate/up, h's `_int_x` (unless "int_h"), down
MOE_LAUNCHES_UNFUSED = ["_int_x_kernel", "_matvec_kernel", "_int_x_kernel", "_matvec_kernel"]
MOE_LAUNCHES_FUSED = ["_int_x_kernel", "_matvec_kernel", "_matvec_kernel"]


def moe_fusion_case_count(small: bool) -> int:
    """How many results `_moe_fusion_cases` gives: 2 residuals a shape, 2 fallbacks, the int forms."""
    table = MOE_FUSION_SMALL if small else MOE_FUSION_FULL
    shapes = sum(len(tokens) for *_, tokens in table)
    return 2 * shapes + 2 + shapes


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits as integers (float32 as int32: -0.0 is not 0.0, NaNs compare)."""
    t = t.cpu().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same_bits_exactly(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _expert_weights(
    gu_type, down_type, dim: int, ffn: int, n_exp: int, rng: np.random.Generator, device: str
):
    """Random gate, up [n_exp, ffn, dim] and down [n_exp, dim, ffn] stacks as a module hands them
    to moe_ffn (`fused.kernel_weight`) on `device`, and their codes: gate, up, down, gate/up's
    code, down's code."""
    from harness.quant import fused

    stacks = [
        torch.stack([_random_weight(q, r, c, rng) for _ in range(n_exp)])
        for q, r, c in ((gu_type, ffn, dim), (gu_type, ffn, dim), (down_type, dim, ffn))
    ]
    (gate, gu_code), (up, _), (down, down_code) = (
        fused.kernel_weight(s, q, c)
        for s, q, c in zip(stacks, (gu_type, gu_type, down_type), (dim, dim, ffn), strict=True)
    )
    return gate.to(device), up.to(device), down.to(device), gu_code, down_code


def _moe_fusion_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """moe_ffn's decode (the "int" reads, `int_x_path` "launch", as in the decode graph) with
    MOE_FFN_CONFIG's fusions on against both off, at MOE_FUSION_* shapes: the same bits, with and
    without a residual, and the launches each made (the `_matvec_kernel` and `_int_x_kernel`
    launches in order, and torch adds: aten.add); on, h's `_int_x` launch and the add are gone.
    Where a fusion does not apply (x quantized in the kernel; the gated product split) the
    launches are the unfused ones. And the gated product's int form of h (INT_OUT) is `_int_x`
    of its float h, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from harness.quant import fused
    from harness.quant.launch import unbound
    from harness.quant.types import GGMLType

    class Adds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.add.Tensor
            return func(*args, **(kwargs or {}))

    def run(args, int_h: bool, residual_in: bool):
        launched, adds = [], Adds()

        def counted(kernel, *a, **kw):
            fn, _ = unbound(kernel, kw)  # (`_matvec` launches a `launch.Bound`)
            if fn in (fused._matvec_kernel, fused._int_x_kernel):
                launched.append(fn.__name__)
            with _disable_current_modes():  # (the interpreter's copies of the arguments are no adds)
                return original(kernel, *a, **kw)

        fused.launch, fused.MOE_FFN_CONFIG = counted, {"int_h": int_h, "residual": residual_in}
        try:
            with adds:
                out = fused.moe_ffn(*args)
        finally:
            fused.launch, fused.MOE_FFN_CONFIG = original, config
        return out.cpu(), launched, adds.count

    original, config = fused.launch, fused.MOE_FFN_CONFIG
    before = fused.matvec_path, fused.int_x_path
    fused.matvec_path, fused.int_x_path = "int", "launch"
    n_exp, results = 3, []
    try:
        for gu_name, down_name, dim, ffn, shapes in MOE_FUSION_SMALL if small else MOE_FUSION_FULL:
            gu_type, down_type = GGMLType[gu_name], GGMLType[down_name]
            gate, up, down, gu_code, down_code = _expert_weights(
                gu_type, down_type, dim, ffn, n_exp, rng, device
            )
            assert down_type != GGMLType.Q6_K or down_code & fused.PACKED
            for t, k in shapes:
                gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
                x = torch.randn(t, dim, generator=gen)
                x[0, int(rng.integers(dim))] = 1e4  # an outlier: a block of tiny values beside it
                experts = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(t)])
                weights = torch.rand(t, k, generator=gen).softmax(-1)
                residual = torch.randn(t, dim, generator=gen) * 100
                tensors = [a.to(device) for a in (x, gate, up, down, weights, experts)]
                name = f"moe fusions {gu_name}/{down_name} D={dim} F={ffn} T={t} k={k}"
                for res in (None, residual.to(device)):
                    args = (*tensors, gu_code, down_code, res)
                    old, old_launches, old_adds = run(args, False, False)
                    new, new_launches, new_adds = run(args, True, True)
                    want_adds = (int(res is not None), 0)
                    exact = (
                        _same_bits_exactly(old, new)
                        and (old_launches, new_launches) == (MOE_LAUNCHES_UNFUSED, MOE_LAUNCHES_FUSED)
                        and (old_adds, new_adds) == want_adds
                    )
                    results.append({
                        "case": f"{name} {'residual' if res is not None else 'no residual'}", "nmse": 0.0,
                        "exact": exact, "launches": [old_launches, new_launches], "adds": [old_adds, new_adds],
                    })  # fmt: skip
                # the gated product's int form of h against `_int_x` of its float h
                h_int = {}
                fused._product(tensors[0], gate, up, gu_code, ffn, tensors[5], k, None, int_out=h_int)
                got = [a.clone() for a in h_int["int"]]
                h = fused._product(tensors[0], gate, up, gu_code, ffn, tensors[5], k, None)
                want = fused._int_x(h)
                exact = all(_same_bits_exactly(a, b) for a, b in zip(got, want, strict=True))
                results.append({"case": f"{name} int form of h", "nmse": 0.0, "exact": exact})
        # where the fusion does not apply: the launches without it, the same bits
        cfg = fused.INT_MATVEC_CONFIG[GGMLType.Q4_K]
        args = (*tensors, gu_code, down_code, residual.to(device))
        for why in ("x quantized in the kernel", "gated product split"):
            saved = cfg.get("gated_programs_per_sm")
            if why == "gated product split":
                cfg["gated_programs_per_sm"] = 64 * fused.MATVEC_MAX_ROWS
            else:
                fused.int_x_path = "kernel"
            try:
                old, old_launches, _ = run(args, False, False)
                new, new_launches, new_adds = run(args, True, True)
                t, k = experts.shape
                gated = fused._matvec_plan(
                    gu_code, dim, ffn, t * k, 1, True, False, True, torch.device(device)
                )
            finally:
                cfg["gated_programs_per_sm"] = saved
                fused.int_x_path = "launch"
            want = ["_matvec_kernel"] * 2 if why.startswith("x") else MOE_LAUNCHES_UNFUSED
            exact = _same_bits_exactly(old, new) and old_launches == new_launches == want and new_adds == 0
            exact = exact and gated.reduce == (why == "gated product split")
            results.append({
                "case": f"moe fusions fall back: {why}", "nmse": 0.0, "exact": exact,
                "launches": [old_launches, new_launches], "gated_splits": gated.grid[2],
            })  # fmt: skip
    finally:
        fused.matvec_path, fused.int_x_path = before
    return results


# `harness::qkv` in one launch (QKV_CONFIG "one_launch"): (q, k, v types, row length, q rows, k and
# v rows each, the types whose products are left unsplit: "dense_programs_per_sm" 0). Under the
# interpreter small: q's and k+v's partials of one shape (64 rows each), rows that do not fill a
# tile, packed Q6_K (rows of 2048: whole 16 bytes), and q+k of one type in one run with v in the
# other; there a product splits as it fills _programs_wanted's 2 (8 for Q6_K): at 1 token both
# runs split, at 3 q not, Q6_K's k+v still. On a GPU Mixtral's shapes, where every run splits,
# and so with neither or one of them split. Each at QKV_TOKENS, with x as the decode graph
# takes it (`int_x_path` "launch", and given in `_int_x`'s form) and as an eager step ("kernel").
# (the second small case: q unsplit, k+v split, whatever the settings)
QKV_ONE_LAUNCH_SMALL = [
    ("Q4_K", "Q8_0", "Q8_0", 512, 64, 32, ()), ("Q4_K", "Q8_0", "Q8_0", 512, 80, 24, ("Q4_K",)),
    ("Q4_K", "Q6_K", "Q6_K", 2048, 64, 16, ()), ("Q4_K", "Q4_K", "Q8_0", 512, 64, 32, ()),
]  # fmt: skip
QKV_ONE_LAUNCH_FULL = [
    ("Q4_K", "Q8_0", "Q8_0", 4096, 4096, 1024, ()), ("Q4_K", "Q6_K", "Q6_K", 4096, 4096, 1024, ()),
    ("Q5_K", "Q8_0", "Q8_0", 4096, 4096, 1024, ()), ("Q4_K", "Q8_0", "Q8_0", 4096, 4096, 1024, ("Q4_K", "Q8_0")),
    ("Q4_K", "Q8_0", "Q8_0", 4096, 4096, 1024, ("Q4_K",)),
]  # fmt: skip
QKV_TOKENS = {True: (1, 3), False: (1, 4, 8)}
QKV_X_FORMS = (("launch", False), ("launch", True), ("kernel", False))  # (int_x_path, x's form given)
# Where the switch leaves a launch a run: k and v of one type in two buffers (three runs), one
# type (one run), the "vec" read, and more than MATVEC_MAX_ROWS tokens (the prefill's products).
QKV_FALLBACKS = ("three runs", "one type", "vec read", "prefill")


def qkv_one_launch_case_count(small: bool) -> int:
    table = QKV_ONE_LAUNCH_SMALL if small else QKV_ONE_LAUNCH_FULL
    return len(table) * len(QKV_TOKENS[small]) * len(QKV_X_FORMS) + len(QKV_FALLBACKS)


def _qkv_one_launch_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`harness::qkv` with QKV_CONFIG "one_launch" on against off, at QKV_ONE_LAUNCH_* shapes and
    QKV_X_FORMS (x with an outlier, and at a few tokens a NaN in its last row): the same bits, and
    the launches of the matrix-vector family and `_int_x` in order: on, the two `_matvec_kernel`
    launches are one `_matvec_two_runs_kernel` where the first was, the rest unchanged; each run's
    splits recorded. Then QKV_FALLBACKS: the same bits and the same launches either way."""
    from harness.quant import fused
    from harness.quant.launch import unbound
    from harness.quant.types import GGMLType

    family = {fused._matvec_kernel, fused._matvec_two_runs_kernel, fused._int_x_kernel}
    original, launched = fused.launch, []

    def counted(kernel, *a, **kw):
        fn, _ = unbound(kernel, kw)  # (`_matvec` launches a `launch.Bound`)
        if fn in family:
            launched.append(fn.__name__)
        return original(kernel, *a, **kw)

    def both(args: tuple) -> tuple:
        """(bits the same, launches off, launches on)."""
        outs, launches = [], []
        for on in (False, True):
            launched.clear()
            saved = dict(fused.QKV_CONFIG)
            fused.QKV_CONFIG.update(one_launch=on, one_launch_rows=fused.MATVEC_MAX_ROWS)
            fused.launch = counted
            try:
                outs.append(torch.ops.harness.qkv(*args).cpu())
            finally:
                fused.QKV_CONFIG.update(saved)
                fused.launch = original
            launches.append(list(launched))
        return _same_bits_exactly(*outs), *launches

    def weights_of(types, cols, rows, packed=True):
        prepared = [
            _prepared(
                _random_weight(q, r, cols, rng),
                q,
                cols,
                "packed" if q in (GGMLType.Q6_K, GGMLType.Q8_0) else "gguf",
            )
            for q, r in zip(types, rows, strict=True)
        ]
        codes = [c for _, c in prepared]
        on_device = [w.to(device) for w, _ in prepared]
        return (fused.pack_rows(on_device, codes) if packed else on_device), codes

    def x_of(t, cols):
        x = torch.randn(t, cols, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        x[0, int(rng.integers(cols))] = 1e4  # an outlier: a block of tiny values beside it
        if t > 1:
            x[-1, int(rng.integers(cols))] = float("nan")
        return x.to(device)

    def put_back(saved: dict) -> None:  # the "dense_programs_per_sm" settings `unsplit` changed
        for name, value in saved.items():
            cfg = fused.INT_MATVEC_CONFIG[GGMLType[name]]
            if value is None:
                del cfg["dense_programs_per_sm"]
            else:
                cfg["dense_programs_per_sm"] = value
        saved.clear()

    results, dev, settings = [], torch.device(device), {}
    before = fused.matvec_path, fused.int_x_path, dict(fused.QKV_CONFIG)
    fused.matvec_path = "int"
    try:
        for *names, cols, q_rows, kv_rows, unsplit in QKV_ONE_LAUNCH_SMALL if small else QKV_ONE_LAUNCH_FULL:
            types = [GGMLType[n] for n in names]
            for name in unsplit:
                settings[name] = fused.INT_MATVEC_CONFIG[GGMLType[name]].get("dense_programs_per_sm")
                fused.INT_MATVEC_CONFIG[GGMLType[name]]["dense_programs_per_sm"] = 0
            weights, codes = weights_of(types, cols, (q_rows, kv_rows, kv_rows))
            first_rows = q_rows + (kv_rows if types[1] == types[0] else 0)
            run_rows = (first_rows, q_rows + 2 * kv_rows - first_rows)
            run_codes = (codes[0], codes[2])
            for t in QKV_TOKENS[small]:
                x = x_of(t, cols)
                for int_x, given in QKV_X_FORMS:
                    fused.int_x_path = int_x
                    form = list(fused._int_x(x)) if given else []
                    if given:  # as `rms_norm_int` hands it over: int16 values, sums, scales
                        form = [form[0].view(torch.int16).clone(), form[1].clone(), form[2].clone()]
                    same, off, on = both((x, *weights, *codes, *form))
                    first = off.index("_matvec_kernel")
                    want = [*off[:first], "_matvec_two_runs_kernel", *off[first + 2 :]]
                    splits = [
                        fused._matvec_plan(c, cols, r, t, 1, False, False, False, dev).grid[2]
                        for c, r in zip(run_codes, run_rows, strict=True)
                    ]
                    name = f"qkv one launch {'/'.join(names)} D={cols} q={q_rows} kv={kv_rows} T={t} {int_x}"
                    name += f" unsplit {'/'.join(unsplit)}" if unsplit else ""
                    results.append({
                        "case": name + (" given" if given else ""), "nmse": 0.0, "splits": splits,
                        "exact": same and off.count("_matvec_kernel") == 2 and on == want,
                        "same_bits": same, "launches": [off, on],
                    })  # fmt: skip
            put_back(settings)
        # where it does not apply: the launches a run as before
        fused.int_x_path = "launch"
        q4, q8, cols = GGMLType.Q4_K, GGMLType.Q8_0, 512 if small else 4096
        for why in QKV_FALLBACKS:
            types = (q4, q4, q4) if why == "one type" else (q4, q8, q8)
            weights, codes = weights_of(types, cols, (64, 32, 32), packed=why != "three runs")
            fused.matvec_path = "vec" if why == "vec read" else "int"
            x = x_of(fused.MATVEC_MAX_ROWS + 1 if why == "prefill" else 1, cols)
            same, off, on = both((x, *weights, *codes))
            runs = {"three runs": 3, "one type": 1, "vec read": 2, "prefill": 0}[why]
            exact = same and off == on and off.count("_matvec_kernel") == runs
            results.append(
                {
                    "case": f"qkv one launch falls back: {why}",
                    "nmse": 0.0,
                    "exact": exact,
                    "launches": [off, on],
                }
            )
    finally:
        put_back(settings)
        fused.matvec_path, fused.int_x_path = before[:2]
        fused.QKV_CONFIG.update(before[2])
    return results


def _check_qkv_one_launch(results: list[dict], small: bool) -> None:
    """Every case the same bits and launches (`_qkv_one_launch_cases`), and among the one-launch
    cases both runs split, neither, and one of them."""
    assert len(results) == qkv_one_launch_case_count(small)
    bad = [r for r in results if r["exact"] is not True]
    assert not bad, bad
    splits = {tuple(s > 1 for s in r["splits"]) for r in results if "splits" in r}
    assert {(True, True), (False, False)} <= splits and splits & {(True, False), (False, True)}, splits


# The norms' int form (NORM_CONFIG "int_out"): (rows, row length) of the norm cases (under the
# interpreter small; on a GPU Mixtral's row, and rows of no power of two: a masked tail in the
# norm's tile), and the row length x has in the qkv and moe_ffn cases given that form.
NORM_INT_SMALL = ((1, 256), (5, 768))
NORM_INT_FULL = ((1, 4096), (5, 4096), (8, 5120))
NORM_INT_OPS_COLS = {True: 512, False: 4096}  # (by small)
NORM_INT_OPS_TOKENS = {"qkv": (1, 5), "moe_ffn": ((1, 2), (4, 2))}  # (T) and (T, k)


def norm_int_case_count(small: bool) -> int:
    """How many results `_norm_int_cases` gives: each norm at each shape, qkv at each T, moe_ffn
    at each (T, k) with and without its residual."""
    table = NORM_INT_SMALL if small else NORM_INT_FULL
    return 2 * len(table) + len(NORM_INT_OPS_TOKENS["qkv"]) + 2 * len(NORM_INT_OPS_TOKENS["moe_ffn"])


def _odd_norm_inputs(r: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [r, d] and a norm weight [d] with blocks of odd values: in the weight a NaN (block 0),
    an infinity (block 1), zeros (block 2), subnormal products (block 3), 1e30 (block 4); rows of
    x of tiny values (the norm's eps dominates), of 1e18 (the sum of squares overflows: a row of
    zeros out) and with a block of zeros."""
    x, w = torch.randn(r, d, generator=gen), torch.randn(d, generator=gen)
    w[3], w[40], w[64:96], w[96:128] = float("nan"), float("inf"), 0.0, 1e-40
    w[128:160] *= 1e30
    for row, scale in ((1, 1e-30), (2, 1e18)):
        if row < r:
            x[row] *= scale
    x[r - 1, 160:192] = 0.0
    return x, w


def _norm_int_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`harness::rms_norm_int` and `harness::add_rms_norm_int` (the norm kernel's INT_OUT) at
    NORM_INT_* shapes (`_odd_norm_inputs`): their float outputs the plain norms' bits, their int
    form `_int_x` of their normed output bit for bit; then `harness::qkv` (Q4_K_M's types: q and
    k Q4_K in one buffer, v packed) and `harness::moe_ffn` (with and without its residual) given
    a norm's int form against the same calls without it (`int_x_path` "launch", as in the decode
    graph): the same bits, and the same launches less x's `_int_x` (the `_matvec_kernel` and
    `_int_x_kernel` launches in order)."""
    from harness.quant import fused
    from harness.quant.launch import unbound
    from harness.quant.types import GGMLType

    ops, results = torch.ops.harness, []
    for r, d in NORM_INT_SMALL if small else NORM_INT_FULL:
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        x, w = _odd_norm_inputs(r, d, gen)
        residual = torch.randn(r, d, generator=gen)
        x, w, residual = x.to(device), w.to(device), residual.to(device)
        normed, *form = ops.rms_norm_int(x, w, 1e-5)
        plain = [ops.rms_norm(x, w, 1e-5)]
        total, added, *added_form = ops.add_rms_norm_int(x, residual, w, 1e-5)
        plain_added = list(ops.add_rms_norm(x, residual, w, 1e-5))
        for name, floats, want_floats, got in (
            ("rms_norm_int", [normed], plain, form),
            ("add_rms_norm_int", [total, added], plain_added, added_form),
        ):
            want = [t.clone() for t in fused._int_x(floats[-1])]  # (`_int_x`'s scratch: copied)
            same_floats = all(_same_bits_exactly(a, b) for a, b in zip(floats, want_floats, strict=True))
            got = [got[0].view(torch.int32), *got[1:]]
            same_form = all(_same_bits_exactly(a, b) for a, b in zip(got, want, strict=True))
            results.append({
                "case": f"{name} R={r} D={d}", "nmse": 0.0, "exact": same_floats and same_form,
                "same_floats": same_floats, "same_form": same_form,
            })  # fmt: skip

    launched, original = [], fused.launch

    def counted(kernel, *a, **kw):
        fn, _ = unbound(kernel, kw)  # (`_matvec` launches a `launch.Bound`)
        if fn in (fused._matvec_kernel, fused._int_x_kernel):
            launched.append(fn.__name__)
        return original(kernel, *a, **kw)

    def run(call):
        launched.clear()
        fused.launch = counted
        try:
            out = call()
        finally:
            fused.launch = original
        return out.cpu(), list(launched)

    def compare(name: str, op, args: tuple, given: list) -> None:
        old, old_launches = run(lambda: op(*args))
        new, new_launches = run(lambda: op(*args, *given))
        launches_ok = old_launches.count("_int_x_kernel") >= 1 and new_launches == old_launches[1:]
        exact = _same_bits_exactly(old, new) and launches_ok
        results.append({"case": name, "nmse": 0.0, "exact": exact, "launches": [old_launches, new_launches]})

    q4, cols = GGMLType.Q4_K, NORM_INT_OPS_COLS[small]
    v_type = GGMLType.Q8_0 if small else GGMLType.Q6_K
    before = fused.matvec_path, fused.int_x_path
    fused.matvec_path, fused.int_x_path = "int", "launch"
    try:
        prepared = [
            _prepared(_random_weight(qtype, rows, cols, rng), qtype, cols, layout)
            for qtype, rows, layout in ((q4, 67, "gguf"), (q4, 19, "gguf"), (v_type, 19, "packed"))
        ]
        weights = fused.pack_rows([w.to(device) for w, _ in prepared], [code for _, code in prepared])
        codes = [code for _, code in prepared]
        for t in NORM_INT_OPS_TOKENS["qkv"]:
            gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
            x, w = (
                (torch.randn(t, cols, generator=gen) * 3).to(device),
                torch.randn(cols, generator=gen).to(device),
            )
            normed, *form = ops.rms_norm_int(x, w, 1e-5)
            compare(
                f"qkv given rms_norm_int's form Q4_K+Q4_K, {v_type.name} packed T={t}",
                ops.qkv,
                (normed, *weights, *codes),
                form,
            )
        n_exp, ffn = 3, 256 if small else 2048
        down_type = GGMLType.Q4_K if small else GGMLType.Q6_K
        gate, up, down, gu_code, down_code = _expert_weights(q4, down_type, cols, ffn, n_exp, rng, device)
        for t, k in NORM_INT_OPS_TOKENS["moe_ffn"]:
            gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
            x, h = torch.randn(t, cols, generator=gen), torch.randn(t, cols, generator=gen)
            x[0, 7] = 1e4  # an outlier: a block of tiny values beside it
            w = torch.randn(cols, generator=gen)
            experts = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(t)]).to(device)
            routing = torch.rand(t, k, generator=gen).softmax(-1).to(device)
            total, normed, *form = ops.add_rms_norm_int(x.to(device), h.to(device), w.to(device), 1e-5)
            for res in (None, total):
                compare(
                    f"moe_ffn given add_rms_norm_int's form Q4_K/{down_type.name} T={t} k={k} "
                    f"{'residual' if res is not None else 'no residual'}",
                    ops.moe_ffn,
                    (normed, gate, up, down, routing, experts, gu_code, down_code, res),
                    form,
                )
    finally:
        fused.matvec_path, fused.int_x_path = before
    return results


# The norm with the router (NORM_CONFIG "router", `harness::add_rms_norm_route` and its int
# form's): (tokens, row length, experts, k) under the interpreter small; on a GPU Mixtral's
# router at 1, 4 and 8 tokens, a row of no power of two (5120: a masked tail in the norm's tile,
# runs of 160 columns: two loop steps), the largest expert count, and 3 experts. Each under
# ROUTER_CONFIG and one program a token ("splits" 1, the kernel before splits).
NORM_ROUTE_SMALL = ((1, 256, 8, 2), (3, 768, 8, 2), (8, 256, 64, 8), (2, 512, 3, 3))
NORM_ROUTE_FULL = (
    (1, 4096, 8, 2), (4, 4096, 8, 2), (8, 4096, 8, 2), (2, 5120, 8, 2), (2, 4096, 64, 8), (3, 4096, 3, 3),
)  # fmt: skip
NORM_ROUTE_CONFIGS = ({}, {"splits": 1, "tile": 16384, "num_warps": 8})


def norm_route_case_count(small: bool) -> int:
    """How many results `_norm_route_cases` gives: each shape under each setting, random inputs
    with and (rows of whole super-blocks) without the int form, ties, odd inputs."""
    table = NORM_ROUTE_SMALL if small else NORM_ROUTE_FULL
    return len(NORM_ROUTE_CONFIGS) * sum(3 + (d % 256 == 0) for _, d, _, _ in table)


def _norm_route_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`harness::add_rms_norm_route` (and `add_rms_norm_int_route` where rows are whole
    super-blocks) at NORM_ROUTE_* shapes and settings against `add_rms_norm` (or its int form's)
    and `router_topk` on its normed output: every output the same bits, from one launch of
    `_norm_route_kernel` (the two ops: two launches). Inputs random; ties (the router's weight
    with its first and last rows equal, and a row of zeros: exact ties); odd (`_odd_norm_inputs`:
    NaN, infinities, overflow in the norm: NaN logits)."""
    from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN
    from harness.quant import fused
    from harness.quant.launch import unbound

    ops, results = torch.ops.harness, []
    launched, original = [], fused.launch

    def counted(kernel, *a, **kw):
        launched.append(unbound(kernel, kw)[0].__name__)
        return original(kernel, *a, **kw)

    def run(fn, *args):
        launched.clear()
        fused.launch = counted
        try:
            return [t.cpu() for t in fn(*args)], list(launched)
        finally:
            fused.launch = original

    before = dict(fused.ROUTER_CONFIG)
    try:
        for config in NORM_ROUTE_CONFIGS:
            fused.ROUTER_CONFIG.update(config)
            for t, d, n_exp, k in NORM_ROUTE_SMALL if small else NORM_ROUTE_FULL:
                gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
                router = torch.randn(n_exp, d, generator=gen) * 0.05
                odd_router = router.clone()
                odd_router[n_exp - 1] = odd_router[0]
                odd_router[n_exp // 2] = 0.0
                plain = (torch.randn(t, d, generator=gen), torch.rand(d, generator=gen) + 0.5)
                for kind, (x, w), rw in (
                    ("random", plain, router),
                    ("ties", plain, odd_router),
                    ("odd", _odd_norm_inputs(t, d, gen), router),
                ):
                    residual = torch.randn(t, d, generator=gen)
                    args = [a.to(device) for a in (x, residual, w)]
                    rw = rw.to(device)
                    for int_form in (False, True) if kind == "random" and d % 256 == 0 else (False,):
                        norm = ops.add_rms_norm_int if int_form else ops.add_rms_norm
                        name = "add_rms_norm_int_route" if int_form else "add_rms_norm_route"
                        want, want_launches = run(_norm_then_route, norm, args, rw, k)
                        got, got_launches = run(getattr(ops, name), *args, 1e-5, rw, k, ROUTER_WEIGHT_SUM_MIN)
                        same = [_same_bits_exactly(a, b) for a, b in zip(got, want, strict=True)]
                        one_launch = got_launches == ["_norm_route_kernel"] and len(want_launches) == 2
                        results.append({
                            "case": f"{name} T={t} D={d} E={n_exp} k={k} {kind} {fused.ROUTER_CONFIG}",
                            "nmse": 0.0, "exact": all(same) and one_launch, "same": same,
                            "launches": [want_launches, got_launches],
                            "takes_kernel": fused.norm_route_takes_kernel(*args, rw, k),
                        })  # fmt: skip
            fused.ROUTER_CONFIG.clear()
            fused.ROUTER_CONFIG.update(before)
    finally:
        fused.ROUTER_CONFIG.clear()
        fused.ROUTER_CONFIG.update(before)
    return results


def _norm_then_route(norm, args: list[torch.Tensor], router_weight: torch.Tensor, k: int) -> tuple:
    """The two ops `harness::add_rms_norm_route` stands for: `norm` (`add_rms_norm` or its int
    form's) of args (x, residual, weight), then `router_topk` of its normed output."""
    from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN

    normed = norm(*args, 1e-5)
    return *normed, *torch.ops.harness.router_topk(normed[1], router_weight, k, ROUTER_WEIGHT_SUM_MIN)


def _check_norm_route(results: list[dict], small: bool) -> None:
    assert len(results) == norm_route_case_count(small)
    bad = [r for r in results if r["exact"] is not True]
    assert not bad, bad


# Attention's int form (ATTENTION_CONFIG "int_out", `harness::attention_int`): (tokens, group, KV
# heads, head dim, cache length, first position, positions form). Groups 1, 4, 8; head dims 64,
# 128 and 96 (a tile of 128 whose last block lies past the head); 11 keys (one split on any
# device) and more (several: on the CPU 4 programs wanted, on a GPU Mixtral's 640-key cache); 1
# to 8 tokens (up to 32 query rows: past "fold_merge_rows" 8 the merge launch). Head dim 48
# (blocks straddle heads: the kernels store no int form) and 9 tokens (the torch path): an
# `_int_x` launch in the op.
ATTENTION_INT_SHAPES_SMALL = [
    (1, 4, 2, 128, 64, 10, False), (1, 4, 2, 128, 640, 512, True), (3, 1, 4, 64, 100, 62, True),
    (2, 8, 1, 64, 66, 63, True), (8, 4, 1, 64, 70, 62, True), (1, 8, 1, 96, 64, 40, False),
    (5, 1, 2, 128, 65, 60, False), (1, 16, 1, 48, 40, 20, False), (9, 4, 1, 64, 40, 3, False),
]  # fmt: skip
ATTENTION_INT_SHAPES_FULL = [
    (1, 4, 8, 128, 640, 512, True), (1, 4, 8, 128, 640, 639, True), (1, 4, 8, 128, 48, 10, False),
    (4, 4, 8, 128, 640, 600, True), (8, 4, 8, 128, 640, 600, True), (2, 8, 4, 64, 4096, 1000, False),
    (3, 1, 8, 64, 333, 100, True), (1, 8, 1, 96, 512, 300, False), (1, 16, 1, 48, 100, 20, False),
    (9, 4, 8, 128, 640, 3, False),
]  # fmt: skip
# Under each: the default's splits (the GPU's) or short ones (the CPU's few programs wanted split
# small caches too), merged in the launch (every tile) or by the merge launch.
ATTENTION_INT_CONFIGS = {
    "one launch": {"split_min_keys": 16, "fold_merge_rows": 32},
    "default": {},
    "two launches": {"split_min_keys": 16},  # over fused.ATTENTION_TWO_LAUNCHES
}
ATTENTION_INT_PROJECTIONS = (("Q4_K", 0), ("Q5_K", 2))  # (type, shape index): qmatmul given the form


def attention_int_case_count(small: bool) -> int:
    shapes = ATTENTION_INT_SHAPES_SMALL if small else ATTENTION_INT_SHAPES_FULL
    return len(shapes) * len(ATTENTION_INT_CONFIGS) + len(ATTENTION_INT_PROJECTIONS)


def _attention_int_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`harness::attention_int` against `harness::attention` at ATTENTION_INT_SHAPES_* under each of
    ATTENTION_INT_CONFIGS: its output and cache writes the same bits, its int form `_int_x` of its
    output bit for bit; the kernels it launched (`INT_OUT` marked; `_int_x_kernel` none where the
    kernels store the form) and the split count. Then `harness::qmatmul` (Q4_K, Q5_K) of an
    output given its int form against the call without it (`int_x_path` "launch", as in the
    decode graph): the same bits, the same launches less x's `_int_x`."""
    from harness.model.mixtral import rope_tables
    from harness.quant import fused
    from harness.quant.launch import unbound
    from harness.quant.types import GGMLType

    launched, original = [], fused.launch

    def counted(kernel, *a, **kw):
        fn, keywords = unbound(kernel, kw)  # (`_matvec` launches a `launch.Bound`)
        launched.append(fn.__name__ + (" INT_OUT" if keywords.get("INT_OUT") else ""))
        return original(kernel, *a, **kw)

    def run(op, *args):
        launched.clear()
        fused.launch = counted
        try:
            return op(*args), list(launched)
        finally:
            fused.launch = original

    results, outputs = [], []
    for t, group, n_kv, hd, s_max, start, at_device in (
        ATTENTION_INT_SHAPES_SMALL if small else ATTENTION_INT_SHAPES_FULL
    ):
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        cos, sin = (x.to(device) for x in rope_tables(hd, 10000.0, s_max, torch.device("cpu")))
        qkv = torch.randn(t, (group + 2) * n_kv * hd, generator=gen)
        qkv[0, 5 * 32 : 6 * 32] *= 1e-30  # a block of tiny values; zeros where the queries see nothing
        cache = torch.randn(2, n_kv, s_max, hd, generator=gen)
        cache[1, :, :, 32:64] = 0.0  # (values: a block of zero outputs)
        if at_device:
            cache[:, :, start + t :] = 1e4
        qkv, cache = qkv.to(device), cache.to(device)
        positions = torch.arange(start, start + t, device=device) if at_device else None
        form = "device positions" if at_device else "start position"
        for label, config in ATTENTION_INT_CONFIGS.items():
            if label == "two launches":
                config = {**fused.ATTENTION_TWO_LAUNCHES, **config}
            with _attention_kernels("triton", config):
                plain_cache, int_cache = cache.clone(), cache.clone()
                plain = torch.ops.harness.attention(qkv, *plain_cache, cos, sin, positions, start)
                (out, *got), launches = run(
                    torch.ops.harness.attention_int, qkv, *int_cache, cos, sin, positions, start
                )
                kernels = fused.attention_takes_kernels(qkv, *cache, cos, sin, positions)
                splits = fused.attention_splits(s_max if at_device else start + t, n_kv, cache.device)[0]
                tile = max(int(fused.ATTENTION_CONFIG["min_rows"]), 1 << (group * t - 1).bit_length())
            want = [x.clone() for x in fused._int_x(out)]  # (`_int_x`'s scratch: copied)
            got = [got[0].view(torch.int32), *got[1:]]
            same = {
                "same_out": _same_bits_exactly(out, plain), "same_caches": _same_bits_exactly(int_cache, plain_cache),
                "same_form": all(_same_bits_exactly(a, b) for a, b in zip(got, want, strict=True)),
            }  # fmt: skip
            results.append({
                "case": f"attention_int {label} T={t} group {group} K={n_kv} Hd={hd} S_max={s_max} at {start} {form}",
                "nmse": 0.0, "exact": all(same.values()), **same, "hd": hd, "tile": tile, "kernels": kernels,
                "splits": splits, "launches": launches,
            })  # fmt: skip
            if label == "default":
                outputs.append((out, got))
    before = fused.matvec_path, fused.int_x_path
    fused.matvec_path, fused.int_x_path = "int", "launch"
    try:
        for name, at in ATTENTION_INT_PROJECTIONS:
            qtype = GGMLType[name]
            out, (x_q, *rest) = outputs[at]
            raw, code = _prepared(_random_weight(qtype, 40, out.shape[1], rng), qtype, out.shape[1], "gguf")
            raw = raw.to(device)
            old, old_launches = run(torch.ops.harness.qmatmul, out, raw, code, 40)
            new, new_launches = run(
                torch.ops.harness.qmatmul, out, raw, code, 40, x_q.view(torch.int16), *rest
            )
            launches_ok = old_launches[0] == "_int_x_kernel" and new_launches == old_launches[1:]
            results.append({
                "case": f"qmatmul {name} [40, {out.shape[1]}] given attention_int's form T={out.shape[0]}",
                "nmse": 0.0, "exact": _same_bits_exactly(old, new) and launches_ok,
                "launches": [old_launches, new_launches],
            })  # fmt: skip
    finally:
        fused.matvec_path, fused.int_x_path = before
    return results


def _check_attention_int(results: list[dict], small: bool) -> None:
    """Every case the same bits; the kernels' launch that writes the output (the attention launch
    unsplit or merging, else the merge launch) stores the int form (INT_OUT) with no `_int_x`
    launch, where head dims are a multiple of 32 and the attention launch's query tile is at
    most "int_out_rows" rows; elsewhere one `_int_x` launch, last; one split and several among the
    cases, each way of writing the output among them."""
    from harness.quant import fused

    most = fused.ATTENTION_CONFIG["int_out_rows"]
    assert len(results) == attention_int_case_count(small)
    bad = [r for r in results if r["exact"] is not True]
    assert not bad, bad
    ways = set()
    for r in results:
        if "kernels" not in r:
            continue
        launches = r["launches"]
        writers = [n for n in launches if n.endswith(" INT_OUT")]
        if r["kernels"] and r["hd"] % 32 == 0 and writers:
            assert "_int_x_kernel" not in launches and len(writers) == 1, r
            ways.add((writers[0], r["splits"] > 1))
        elif r["kernels"] and r["hd"] % 32 == 0:  # a tile past "int_out_rows"
            assert r["tile"] > most and launches == ["_attention_kernel", "_int_x_kernel"], r
            ways.add(("_int_x_kernel after a large tile", r["splits"] > 1))
        else:
            assert launches.count("_int_x_kernel") == 1, r
            assert not any(n.endswith(" INT_OUT") for n in launches), r
    assert {
        ("_attention_kernel INT_OUT", False),
        ("_attention_kernel INT_OUT", True),
        ("_attention_merge_kernel INT_OUT", True),
        ("_int_x_kernel after a large tile", True),
    } <= ways, ways


# `fused.int_x_path` "kernel" against "launch", bit for bit: (type, layout, row length small,
# on a GPU, rows). Row lengths of two or more super-blocks, so that products split them.
INT_X_WEIGHTS = (
    ("Q4_K", "gguf", 512, 4096, 19),
    ("Q5_K", "gguf", 512, 4096, 19),
    ("Q6_K", "packed", 2048, 4096, 9),
    ("Q8_0", "packed", 512, 4096, 21),
)
# Under the interpreter (time) the other types than Q4_K take at most 4 pairs, packed Q6_K
# (rows of eight super-blocks) 2.
INT_X_TOP_PAIRS = {"Q5_K": 4, "Q8_0": 4, "Q6_K": 2}
# (gated, routed, out_div, splits) of each product: splits "one" (the split setting 0: no split
# on any device; 1 a multiprocessor still splits 19 rows on an H100) or "many" (a split per
# super-block); a gated product takes
# out_div 1 (as moe_ffn's).
INT_X_FORMS = (
    *(
        (False, routed, out_div, splits)
        for routed in (False, True)
        for out_div in (1, 2)
        for splits in ("one", "many")
    ),
    (True, False, 1, "one"),
    (True, True, 1, "many"),
)


def int_x_case_count() -> int:
    """How many results `_int_x_path_cases` gives."""
    return len(INT_X_WEIGHTS) * len(INT_X_FORMS)


def _expert_stacks(qtype, layout: str, rows: int, cols: int, n_exp: int, rng, device: str) -> tuple:
    """Two random stacks (W and U) of n_exp experts' [rows, cols] weights of `qtype` as the kernels
    take them in `layout` ("gguf" or "packed"), on `device`: (type code, w, u)."""
    stacks = [torch.stack([_random_weight(qtype, rows, cols, rng) for _ in range(n_exp)]) for _ in range(2)]
    prepared = [_prepared(st.reshape(n_exp * rows, -1), qtype, cols, layout) for st in stacks]
    w, u = (kraw.view(n_exp, rows, -1).to(device) for kraw, _ in prepared)
    return prepared[0][1], w, u


def _int_x_path_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`fused._product` through the "int" reads with x quantized in the matrix-vector kernel
    (`int_x_path` "kernel") and by `_int_x`'s launch ("launch"): the same bits, for Q4_K, Q5_K,
    packed Q6_K and packed Q8_0, gated and not, routed (3 experts, routing weights) and dense,
    out_div 1 and 2, one split and a split per super-block, 1..MATVEC_MAX_ROWS pairs (in turn
    over the forms; INT_X_TOP_PAIRS under the interpreter). x holds an outlier, and in every other case a NaN (its output row all NaN
    on both paths) or an infinity. Each case also checks that "kernel" launched no `_int_x` and
    "launch" did."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    original, calls = fused._int_x, []

    def counted(x):
        calls.append(x.shape)
        return original(x)

    results, cycle, n_exp = [], {1: 0, 2: 0}, 3
    before = fused.matvec_path, fused.int_x_path
    fused._int_x = counted
    try:
        fused.matvec_path = "int"
        for name, layout, cols_small, cols_full, rows in INT_X_WEIGHTS:
            qtype, cols = GGMLType[name], cols_small if small else cols_full
            code, w, u = _expert_stacks(qtype, layout, rows, cols, n_exp, rng, device)
            cfg = fused.INT_MATVEC_CONFIG[qtype]
            top = INT_X_TOP_PAIRS.get(name, fused.MATVEC_MAX_ROWS) if small else fused.MATVEC_MAX_ROWS
            for gated, routed, out_div, splits in INT_X_FORMS:
                # pair counts in turn: 1..MATVEC_MAX_ROWS, even ones where two pairs make a row
                cycle[out_div] += 1
                n_pairs = out_div * (cycle[out_div] % (top // out_div) + 1)
                x, x_div, experts, scale = _pairs_inputs(n_pairs, routed, cols, n_exp, 1e4, rng)
                if x.shape[0] > 1:
                    x[-1, int(rng.integers(cols))] = float("nan") if cycle[1] % 2 else float("inf")
                args = _product_args(x, w, u if gated else None, code, rows, experts, x_div, scale, device)
                key = fused.split_setting(gated, routed)
                saved = cfg.get(key)
                cfg[key] = 0 if splits == "one" else 64 * fused.MATVEC_MAX_ROWS
                try:
                    got, launched = {}, {}
                    for path in ("kernel", "launch"):
                        fused.int_x_path = path
                        calls.clear()
                        got[path] = fused._product(*args, out_div=out_div)
                        launched[path] = len(calls)
                    plan = fused._matvec_plan(
                        code, cols, rows, n_pairs, out_div, gated, routed, routed, torch.device(device)
                    )
                finally:
                    if saved is None:
                        del cfg[key]
                    else:
                        cfg[key] = saved
                want_splits = 1 if splits == "one" else cols // fused.SUPER
                bits = _same_bits(got["kernel"], got["launch"])
                exact = bits and launched == {"kernel": 0, "launch": 1} and plan.grid[2] == want_splits
                finite = torch.isfinite(got["launch"]) & torch.isfinite(got["kernel"])
                diff = (got["kernel"] - got["launch"])[finite].double()
                power = got["launch"][finite].double().pow(2).mean()
                case = (
                    f"int x kernel = launch {name} {layout} {'gated' if gated else 'plain'} "
                    f"{'routed' if routed else 'dense'} out_div={out_div} splits={plan.grid[2]} pairs={n_pairs}"
                )
                results.append({
                    "case": case, "exact": exact, "same_bits": bits, "launched": launched,
                    "splits": plan.grid[2], "want_splits": want_splits,
                    "nmse": float(diff.pow(2).mean() / power) if diff.numel() else 0.0,
                })  # fmt: skip
    finally:
        fused._int_x = original
        fused.matvec_path, fused.int_x_path = before
    return results


# INT_MATVEC_CONFIG "prefetch" (Q4_K, Q5_K, packed Q6_K "int" reads): 1 each step loads the next
# super-block's words first, 2 only a gated product's U words so (W's and ungated products as 1)
PREFETCH_SETTINGS = (1, 2)


def prefetch_case_count() -> int:
    """How many results `_prefetch_cases` gives."""
    return 3 * len(INT_X_FORMS) * 2 * len(PREFETCH_SETTINGS)


def _prefetch_cases(device: str, small: bool, rng: np.random.Generator) -> list[dict]:
    """`fused._product` through the Q4_K, Q5_K and packed Q6_K "int" reads with INT_MATVEC_CONFIG
    "prefetch" 1 and 2 against none: the same bits, in every form of INT_X_FORMS (one split and a split per
    super-block), x quantized in the kernel and by a launch, x with an outlier and (past one
    row) a NaN or an infinity; and the plan's PREFETCH is the setting."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    results, n_exp, cycle = [], 3, 0
    before = fused.matvec_path, fused.int_x_path
    try:
        fused.matvec_path = "int"
        for name, layout, cols_small, cols_full, rows in INT_X_WEIGHTS[:3]:
            qtype, cols = GGMLType[name], cols_small if small else cols_full
            code, w, u = _expert_stacks(qtype, layout, rows, cols, n_exp, rng, device)
            cfg = fused.INT_MATVEC_CONFIG[qtype]
            saved = dict(cfg)
            for gated, routed, out_div, splits in INT_X_FORMS:
                cycle += 1
                n_pairs = out_div * (cycle % 2 + 1)
                x, x_div, experts, scale = _pairs_inputs(n_pairs, routed, cols, n_exp, 1e4, rng)
                if x.shape[0] > 1:
                    x[-1, int(rng.integers(cols))] = float("nan") if cycle % 2 else float("inf")
                args = _product_args(x, w, u if gated else None, code, rows, experts, x_div, scale, device)
                key = fused.split_setting(gated, routed)
                plan_key = (code, cols, rows, n_pairs, out_div, gated, routed, routed, torch.device(device))
                try:
                    cfg[key] = 0 if splits == "one" else 64 * fused.MATVEC_MAX_ROWS
                    for path in ("kernel", "launch"):
                        fused.int_x_path = path
                        cfg.pop("prefetch", None)
                        want = fused._product(*args, out_div=out_div)
                        for setting in PREFETCH_SETTINGS:
                            cfg["prefetch"] = setting
                            got = fused._product(*args, out_div=out_div)
                            plan = fused._matvec_plan(*plan_key)
                            results.append({
                                "case": f"prefetch {setting} {name} {'gated' if gated else 'plain'} "
                                f"{'routed' if routed else 'dense'} out_div={out_div} splits={plan.grid[2]} "
                                f"pairs={n_pairs} x {path}",
                                "same_bits": _same_bits(got, want),
                                "planned": plan.options["PREFETCH"],
                            })  # fmt: skip
                finally:
                    cfg.clear()
                    cfg.update(saved)
    finally:
        fused.matvec_path, fused.int_x_path = before
    return results


def _pairs_inputs(
    n_pairs: int, routed: bool, cols: int, n_exp: int, outlier: float, rng: np.random.Generator
):
    """A decode product's inputs for `fused._product`: x [n_pairs / x_div, cols] of N(0, 1) with
    `outlier` in its first row (routed, even: two pairs a row of x, x_div 2), and when routed
    each pair's expert of n_exp and routing scale (else None)."""
    x_div = 2 if routed and n_pairs % 2 == 0 else 1
    seed = int(rng.integers(1 << 30))
    x = torch.randn(n_pairs // x_div, cols, generator=torch.Generator().manual_seed(seed))
    x[0, int(rng.integers(cols))] = outlier
    experts = torch.from_numpy(rng.integers(0, n_exp, n_pairs)) if routed else None
    scale = torch.rand(n_pairs) if routed else None
    return x, x_div, experts, scale


def _product_args(x, w, u, code, rows, experts, x_div, scale, device) -> tuple:
    """`fused._product`'s arguments on `device`: the stacks w and u (u None: not gated) when
    routed (experts given), else their first weight."""
    routed = experts is not None
    w, u = (w, u) if routed else (w[0], None if u is None else u[0])
    experts, scale = (None if t is None else t.to(device) for t in (experts, scale))
    return x.to(device), w, u, code, rows, experts, x_div, scale


def _int_x_layout_cases(device: str) -> list[dict]:
    """`fused._int_x` against torch: each 32-value block's scale max|x| / 32767 and its values
    round(x / max|x| * 32767) (half away from zero) at the int layout's places, bit for bit;
    the sums of 16 values to float32 rounding. Rows of N(0, 1), of tiny and huge values, and a
    row of zeros."""
    from harness.quant import fused

    results = []
    x = torch.randn(4, 512)
    x[1] *= 1e-30
    x[2] *= 1e30
    x[3, 256:] = 0.0
    pairs, sums, scales = (t.cpu() for t in fused._int_x(x.to(device)))
    blocks = x.view(4, -1, 32)
    peak = blocks.abs().amax(-1, keepdim=True)
    q = torch.where(peak > 0, blocks / torch.where(peak > 0, peak, 1.0), 0.0) * 32767.0
    q = torch.where(q >= 0, q + 0.5, q - 0.5).trunc().to(torch.int16)
    o = torch.arange(32)
    place = 4 * ((o % 16) // 2) + 2 * (o // 16) + o % 2  # the value at each position of a block
    expected = q[..., place].reshape(4, -1)
    same = torch.equal(pairs.view(torch.int16), expected) and torch.equal(
        scales, (peak / 32767.0).squeeze(-1)
    )
    close = torch.allclose(sums, x.view(4, -1, 16).sum(-1), rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    results.append({"case": "int x layout", "nmse": 0.0, "exact": same and close})
    bad = torch.randn(2, 256)
    bad[0, 3], bad[1, 200] = float("nan"), float("inf")
    _, bad_sums, bad_scales = (t.cpu() for t in fused._int_x(bad.to(device)))
    flagged = bool(bad_scales[0, 0].isnan() and bad_scales[1, 6].isnan())
    clean = bool(bad_scales[0, 1:].isfinite().all() and bad_scales[1, :6].isfinite().all())
    results.append(
        {"case": "int x scale of a block with a NaN or an inf", "nmse": 0.0, "exact": flagged and clean}
    )
    return results


def _dp2a_cases(device: str) -> list[dict]:
    """`fused._dp2a` (lo and hi, unsigned and signed bytes; PTX on a GPU, plain Triton ops under
    the interpreter) against the same sums in int64, bit for bit, on random words and extremes."""
    from harness.quant import fused

    gen = torch.Generator().manual_seed(5)
    n = 1024
    a = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64)
    b = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64)
    a[:4] = torch.tensor([-(2**31), 2**31 - 1, -1, 0x80007FFF - 2**32])  # int16 extremes in both halves
    b[:4] = torch.tensor([-1, 0x7F807F80, -(2**31), 0x01FF80FF])
    c = torch.randint(-(2**30), 2**30, (n,), generator=gen, dtype=torch.int64)
    halves = [((a << 48) >> 48), (a << 32) >> 48]  # signed int16 halves
    results = []
    for hi in (False, True):
        for signed in (False, True):
            first = 16 if hi else 0
            byte = [(b >> (first + 8 * i)) & 0xFF for i in (0, 1)]
            if signed:
                byte = [torch.where(v > 127, v - 256, v) for v in byte]
            ref = (c + halves[0] * byte[0] + halves[1] * byte[1]).to(torch.int32)
            out = fused.dp2a(*(v.to(torch.int32).to(device) for v in (a, b, c)), hi=hi, signed=signed).cpu()
            name = f"dp2a {'hi' if hi else 'lo'} {'signed' if signed else 'unsigned'} bytes"
            results.append({"case": name, "nmse": 0.0, "exact": torch.equal(out, ref)})
    return results


# `harness::router_topk` with the router's weight: (tokens, experts, k, row length). Mixtral's
# E=8 k=2 at 1, 5 and 8 tokens, E=4 k=1, E=16 k=4, E=64 k=8, E=3 k=3 (not a power of two, all
# taken), rows that do not fill the last tile; 9 tokens (prefill) take the torch path. On a GPU
# Mixtral's 4096 columns.
ROUTER_SHAPES_SMALL = [
    (1, 8, 2, 256), (5, 8, 2, 200), (8, 8, 2, 256), (1, 4, 1, 256), (5, 4, 1, 100),
    (8, 16, 4, 256), (5, 64, 8, 96), (2, 3, 3, 40), (9, 8, 2, 256),
]  # fmt: skip
ROUTER_SHAPES_FULL = [
    (1, 8, 2, 4096), (5, 8, 2, 4096), (8, 8, 2, 4096), (1, 4, 1, 4096), (5, 4, 1, 1000),
    (8, 16, 4, 4096), (5, 64, 8, 4096), (2, 3, 3, 40), (9, 8, 2, 4096),
]  # fmt: skip
# Rows of each shape: random; exact ties (integer logits: the same in any summation order); x of
# zeros (every logit 0); a NaN in x (every probability NaN); a min_sum above 1 (the clamp takes
# effect on every row).
ROUTER_ROWS = ("random", "ties", "zeros", "nan", "clamped sum")
ROUTER_TIED_ROWS = ("ties", "zeros", "nan")
# The kernel's weights against the torch path's: the same float32 arithmetic, the logits summed
# in another order (logits of a few units over up to 4096 columns)
ROUTER_RTOL = 1e-5


def _router_inputs(kind: str, t: int, n_exp: int, dim: int, gen: torch.Generator):
    """x [t, dim], the router's weight [n_exp, dim] and min_sum of one `ROUTER_ROWS` kind."""
    from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN

    x = torch.randn(t, dim, generator=gen)
    weight = torch.randn(n_exp, dim, generator=gen) * 0.05  # logits of a few units, as a router's
    if kind == "ties":  # weight: the identity on the first n_exp columns; x there: the logits
        logits = torch.randint(0, 3, (t, n_exp), generator=gen).float()
        logits[0] = 0.0
        logits[0, [1 % n_exp, n_exp - 1]] = 2.0  # two experts share the largest
        if t > 1:  # the k-th largest shared beyond the k-th
            logits[1] = 1.0
            logits[1, n_exp - 1] = 2.0
        weight = torch.zeros(n_exp, dim)
        weight[:, :n_exp] = torch.eye(n_exp)
        x = torch.zeros(t, dim)
        x[:, :n_exp] = logits
    elif kind == "zeros":
        x = torch.zeros(t, dim)
    elif kind == "nan":
        x[0, dim // 2] = float("nan")
    return x, weight, 1.5 if kind == "clamped sum" else ROUTER_WEIGHT_SUM_MIN


def _router_rule(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The experts the kernel must choose: the k most probable in descending probability, equal
    ones lower expert first, NaN above all (a stable sort)."""
    probs = (x @ weight.T).softmax(-1)
    probs = torch.where(probs.isnan(), 2.0, probs)
    return probs.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def _by_expert(weights: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A routing with each row's slots in ascending expert order: the (expert, weight) pairs as a set."""
    experts, order = experts.sort(dim=-1)
    return weights.gather(-1, order), experts


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether float tensors (on any device) hold the same values, NaN where the other has NaN."""
    a, b = a.cpu(), b.cpu()
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0)))


def _router_cases(device: str, shapes: list, rng: np.random.Generator, rows=ROUTER_ROWS) -> list[dict]:
    """`harness::router_topk` with the router's weight at each of `shapes` (ROUTER_SHAPES_*) and
    `rows`: whether the kernel ran and with how many splits, its experts against the torch
    path's (in order, and as a set with their weights) and against `_router_rule`, the largest
    relative difference of its weights from the torch path's (matched by expert), and on a GPU
    whether a second call gives the same bits."""
    from harness.quant import fused

    results = []
    for t, n_exp, k, dim in shapes:
        for kind in rows:
            gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
            x, weight, min_sum = _router_inputs(kind, t, n_exp, dim, gen)
            args = x.to(device), weight.to(device), k, min_sum
            with fused.disabled():
                ref_w, ref_e = (a.cpu() for a in torch.ops.harness.router_topk(*args))
            kernel = fused.router_takes_kernel(*args[:3])
            got_w, got_e = (a.cpu() for a in torch.ops.harness.router_topk(*args))
            (got_ws, got_es), (ref_ws, ref_es) = _by_expert(got_w, got_e), _by_expert(ref_w, ref_e)
            rel = ((got_ws - ref_ws).abs() / ref_ws.abs()).nan_to_num(0.0, float("inf"), float("inf"))
            repeatable = None  # (the interpreter runs the programs one after another: always)
            if kernel and device != "cpu":
                again_w, again_e = (a.cpu() for a in torch.ops.harness.router_topk(*args))
                repeatable = torch.equal(again_e, got_e) and _same_bits(again_w, got_w)
            results.append(
                {
                    "case": f"router_topk E={n_exp} k={k} D={dim} T={t} {kind} {fused.ROUTER_CONFIG}",
                    "rows": kind,
                    "kernel": kernel,
                    "expect_kernel": t <= fused.MATVEC_MAX_ROWS,
                    "splits": fused.router_plan(n_exp, dim)[0] if kernel else None,
                    "same_experts": bool(torch.equal(got_e, ref_e)),
                    "same_routing": bool(torch.equal(got_es, ref_es))
                    and bool(torch.equal(got_ws.isnan(), ref_ws.isnan())),
                    "as_rule": bool(torch.equal(got_e, _router_rule(x, weight, k))),
                    "exact": None if kernel else bool(torch.equal(got_e, ref_e) and _same_bits(got_w, ref_w)),
                    "max_rel_vs_torch": float(rel.max()),
                    "clamped": bool((ref_w.sum(-1) < 0.99).all()),
                    "repeatable": repeatable,
                }
            )
    return results


def _check_router(results: list[dict], device: str, n_cases: int) -> None:
    """The router cases (`n_cases` of them) took the kernel where they should; its experts are
    the torch path's (ties: chosen by `_router_rule`; on CUDA the torch path chooses the same
    ones, on the CPU torch.topk may choose other tied ones) and its weights the torch path's to
    ROUTER_RTOL; on a GPU a second call gave the same bits."""
    assert len(results) == n_cases
    assert all(r["kernel"] == r["expect_kernel"] for r in results), results
    assert all(r["exact"] for r in results if not r["kernel"]), results
    taken = [r for r in results if r["kernel"]]
    assert all(r["as_rule"] for r in taken), [r for r in taken if not r["as_rule"]]
    assert all(r["clamped"] for r in results if r["rows"] == "clamped sum")
    untied = [r for r in taken if r["rows"] not in ROUTER_TIED_ROWS]
    assert all(r["same_experts"] for r in untied), [r for r in untied if not r["same_experts"]]
    compared = untied if device == "cpu" else taken
    assert all(r["same_routing"] for r in compared), [r for r in compared if not r["same_routing"]]
    far = [r for r in compared if not r["max_rel_vs_torch"] <= ROUTER_RTOL]
    assert not far, far
    assert all(r["repeatable"] is (None if device == "cpu" else True) for r in taken), taken


# Settings of the router kernel (ROUTER_CONFIG's "splits" and "tile") that `_router_split_cases`
# runs ROUTER_SPLIT_SHAPES under: one program a token (1), 2, 3 and 7 splits of the columns; at
# 200 columns, runs of 112, 80 and 32 columns (multiples of 16) with a shorter last one, read in
# loop steps of tile / experts (padded) columns: several steps a run, and one.
ROUTER_SPLIT_CONFIGS = [
    {"splits": 1, "tile": 256}, {"splits": 2, "tile": 512}, {"splits": 3, "tile": 128}, {"splits": 7, "tile": 256},
]  # fmt: skip
# (tokens, experts, k, row length): 1 to 8 tokens; k 1, 2 and 4 of 8 experts, 2 and 4 of 64;
# rows that are no multiple of 16 or of a loop step (200), and 136 (5 runs of 32 at 7 splits)
ROUTER_SPLIT_SHAPES = [
    (1, 8, 1, 200), (8, 8, 2, 200), (3, 8, 4, 200), (2, 64, 2, 200), (1, 64, 4, 200), (8, 64, 4, 136),
]  # fmt: skip
ROUTER_SPLIT_ROWS = ("random", "ties", "nan")


def _router_split_cases(device: str, rng: np.random.Generator) -> list[dict]:
    """`_router_cases` of ROUTER_SPLIT_SHAPES under each of ROUTER_SPLIT_CONFIGS, then the
    order the split kernel sums its partials in: 4 splits of 16 columns whose products for
    expert 0 are 2^24, 1, 1 and -2^24 (exact partials), expert 1's logit 0.5. Summed split by
    split from 0.0 in float32, 2^24 absorbs each 1 and expert 0's logit is 0 (expert 1 first);
    any other order (pairwise, reversed) leaves 1 or 2 (expert 0 first)."""
    from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN
    from harness.quant import fused

    saved = dict(fused.ROUTER_CONFIG)
    results = []
    try:
        for config in ROUTER_SPLIT_CONFIGS:
            fused.ROUTER_CONFIG.update(config)
            results += _router_cases(device, ROUTER_SPLIT_SHAPES, rng, ROUTER_SPLIT_ROWS)
        fused.ROUTER_CONFIG.update(splits=4, tile=256)
        x, weight = torch.zeros(1, 64), torch.zeros(2, 64)
        x[0, ::16] = 1.0
        weight[0, ::16] = torch.tensor([2.0**24, 1.0, 1.0, -(2.0**24)])
        weight[1, 0] = 0.5
        args = x.to(device), weight.to(device), 2, ROUTER_WEIGHT_SUM_MIN
        experts = torch.ops.harness.router_topk(*args)[1].cpu()
        order = {"case": "router_topk split order", "splits": fused.router_plan(2, 64)[0]}
        results.append(order | {"experts": experts.tolist(), "kernel": fused.router_takes_kernel(*args[:3])})
    finally:
        fused.ROUTER_CONFIG.update(saved)
    return results


def _check_router_splits(results: list[dict], device: str) -> None:
    """`_router_split_cases`: each setting's cases as `_check_router` wants them, under one
    program a token and 2, 3, 5 and 7 splits; the partials summed split by split."""
    *cases, order = results
    _check_router(
        cases, device, len(ROUTER_SPLIT_CONFIGS) * len(ROUTER_SPLIT_SHAPES) * len(ROUTER_SPLIT_ROWS)
    )
    assert {r["splits"] for r in cases} == {1, 2, 3, 5, 7}
    assert order == {"case": "router_topk split order", "splits": 4, "experts": [[1, 0]], "kernel": True}


def _weight_cases(cols: int, small: bool) -> list:
    """(type, row length, layout) of the qmatmul cases: every type with a kernel at `cols` in
    GGUF's layout (as a module built elsewhere and moved hands it), and each type the kernels
    read repacked (`fused.packs`) in that layout, at `cols` or at a row length it packs at."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    packed_cols = 2048 if small else 4096
    cases = [(q, cols, "gguf") for q in fused.FUSED_TYPES]
    for q in fused.FUSED_TYPES:
        if q == GGMLType.Q4_K:  # (interleaved Q4_K: tests/test_q4_k_interleave.py)
            continue
        width = cols if fused.packs(q, cols, 32) else packed_cols
        if fused.packs(q, width, 32):
            cases.append((q, width, "packed"))
    return cases


def _extreme_cases(cols: int, small: bool) -> list:
    """(type, row length, layout) of the extreme-scale cases: both layouts of Q8_0, packed Q6_K."""
    from harness.quant.types import GGMLType

    return [
        (GGMLType.Q8_0, cols, "gguf"),
        (GGMLType.Q8_0, cols, "packed"),
        (GGMLType.Q6_K, 2048 if small else 4096, "packed"),
    ]


def _prepared(raw: torch.Tensor, qtype, cols: int, layout: str) -> tuple[torch.Tensor, int]:
    """A weight as a module hands it to the ops (`fused.kernel_weight`), or in GGUF's layout."""
    from harness.quant import fused

    kraw, code = fused.kernel_weight(raw, qtype, cols)
    if layout == "gguf":
        return raw, code & ~fused.PACKED
    assert code & fused.PACKED, (qtype, cols)
    return kraw, code


def _paths(rows: int, *codes: int) -> tuple[str, ...]:
    """The kernel choices that serve a product of `rows` rows of weights of `codes`: each value
    of `matvec_path` that reads one of them its own way (`fused.matvec_paths`), or each prefill
    path."""
    from harness.quant import fused

    if rows > fused.MATVEC_MAX_ROWS:
        return tuple(f"prefill={p}" for p in fused.PREFILL_PATHS)
    reads = {p for code in codes for p in fused.matvec_paths(code)}
    return tuple(f"matvec={p}" for p in fused.MATVEC_PATHS if p in reads) if len(reads) > 1 else ("matvec",)


@contextlib.contextmanager
def _interleaving(on: bool = True, switch: str = "q4_k_interleave"):
    """`kernel_weight` interleaving Q4_K weights (PACK_CONFIG "q4_k_interleave"; `switch`: that
    PACK_CONFIG key's weights) or not, inside."""
    from harness.quant import fused

    before = fused.PACK_CONFIG[switch]
    fused.PACK_CONFIG[switch] = on
    try:
        yield
    finally:
        fused.PACK_CONFIG[switch] = before


def _layout_code(qtype, layout: str) -> int:
    """The `qtype` code `_prepared` gives a weight of `qtype` in `layout` (WIDE aside)."""
    from harness.quant import fused

    return int(qtype) | (fused.PACKED if layout == "packed" else 0)


@contextlib.contextmanager
def _kernels(path: str, scratch: int | None = None):
    """Inside, products take the kernel choice `path` (from `_paths`), and the prefill's float16
    scratch holds `scratch` bytes."""
    from harness.quant import fused

    before = fused.matvec_path, fused.prefill_path, fused.SCRATCH_MAX_BYTES
    kind, _, choice = path.partition("=")
    if kind == "matvec" and choice:
        fused.matvec_path = choice
    if kind == "prefill":
        fused.prefill_path = choice
    fused.SCRATCH_MAX_BYTES = scratch or before[2]
    try:
        yield
    finally:
        fused.matvec_path, fused.prefill_path, fused.SCRATCH_MAX_BYTES = before


def expected_case_count(small: bool) -> int:
    """How many results run_cases gives."""
    from harness.quant.types import GGMLType

    tokens = (1, 5, 17) if small else (1, 5, 17, 129, 512)
    qmatmul = sum(
        len(_paths(t, _layout_code(qtype, layout)))
        for t in tokens
        for qtype, _, layout in _weight_cases(256, small)
    )
    # both pairs of types have a Q4_K weight, which every matrix-vector path reads its own way
    moe = sum(len(_paths(2 * t, int(GGMLType.Q4_K))) for t in tokens) * 2 * 2
    decode_ops = 2 * 3 * 3 * len(tokens) + 2 * (len(tokens) + 1) + len(tokens) + 1 + 3
    extreme = sum(
        len(_paths(t, _layout_code(q, layout)))
        for t in (1, 17)
        for q, _, layout in _extreme_cases(256, small)
    )
    attention = len(ATTENTION_CONFIGS) * (len(ATTENTION_SHAPES_SMALL if small else ATTENTION_SHAPES_FULL) + 2)
    packed_dequant = 2 * len(PACKED_DEQUANT_SHAPES) * 2 + len(SCALED_HALF_SHAPES)
    return qmatmul + extreme + 3 * len(tokens) + decode_ops + attention + packed_dequant + moe


# ---- CPU: Triton's interpreter ---------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, __file__, "SMALL", "cpu"], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, (
        f"interpreter subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_interpreter_kernels_match_dequantize_then_matmul(interpreted):

    assert len(interpreted) == expected_case_count(small=True)
    assert any(" packed " in r["case"] and "matvec" in r["case"] for r in interpreted)
    assert any(r["case"].startswith("moe_ffn Q8_0/Q4_K packed") for r in interpreted)
    paths = {r["case"].split()[-1] for r in interpreted if r["case"].startswith("moe_ffn")}
    assert paths == {
        "matvec=vec", "matvec=words", "matvec=int", "prefill=dequant", "prefill=tiled", "prefill=tiled16",
    }  # fmt: skip
    bad = [r for r in interpreted if not r["nmse"] <= NMSE_MAX or r.get("exact") is False]
    assert not bad, bad
    _check_attention(interpreted)
    _check_split_sums(interpreted)


@pytest.mark.slow
def test_interpreter_attention_in_one_launch_matches_torch_and_two_launches():
    """`harness::attention`'s one-launch form (the last program of each KV head merges its
    splits) under Triton's interpreter: `_check_attention_merge` over ATTENTION_MERGE_SHAPES."""
    _check_attention_merge(_interpreted_cases("ATTENTION_MERGE"), interpreted=True)


@pytest.mark.slow
def test_interpreter_router_topk_kernel_matches_the_torch_path():
    """`harness::router_topk`'s kernel at ROUTER_CONFIG under Triton's interpreter against the
    op's torch path on the CPU (`_check_router`)."""
    _check_router(_interpreted_cases("ROUTER"), "cpu", len(ROUTER_SHAPES_SMALL) * len(ROUTER_ROWS))


@pytest.mark.slow
def test_interpreter_router_split_kernel_matches_the_torch_path():
    """`harness::router_topk`'s kernel with its columns split over programs (and one program a
    token) under Triton's interpreter: `_check_router_splits` (1 to 8 tokens, k 1 to 4 of 8
    and 64 experts, rows that are no multiple of a run or a step, NaN and tied rows; the
    partials summed split by split from 0.0)."""
    _check_router_splits(_interpreted_cases("ROUTER_SPLITS"), "cpu")


@pytest.mark.slow
def test_interpreter_int_reads_match_dequantize_then_matmul():
    """`matvec_path` "int" under Triton's interpreter (a subprocess), dp2a emulated by the same
    integer arithmetic: every case of `_int_read_cases` within NMSE_MAX of float64 and exact
    where it says so (x's layout and scales, zeros, NaN, dp2a's sums)."""
    _check_int_reads(_interpreted_cases("INT"), small=True)


def test_int_x_auto_quantizes_by_a_launch_only_in_a_graph_step(monkeypatch):
    """`int_x_path` "auto" (the default) is "launch" inside `fused.graph_step` (nested too) and
    "kernel" outside it and after it, even when the block raised; "kernel" and "launch" hold
    everywhere; a bad value is refused naming HARNESS_INT_X."""
    from harness.errors import UsageError
    from harness.quant import fused

    monkeypatch.setattr(fused, "int_x_path", "auto")
    assert fused._int_x_path() == "kernel"
    with fused.graph_step():
        assert fused._int_x_path() == "launch"
        with fused.graph_step():
            assert fused._int_x_path() == "launch"
        assert fused._int_x_path() == "launch"
    assert fused._int_x_path() == "kernel"
    with pytest.raises(RuntimeError), fused.graph_step():
        raise RuntimeError("a failed capture")
    assert fused._int_x_path() == "kernel"
    for path in ("kernel", "launch"):
        monkeypatch.setattr(fused, "int_x_path", path)
        assert fused._int_x_path() == path
        with fused.graph_step():
            assert fused._int_x_path() == path
    monkeypatch.setattr(fused, "int_x_path", "later")
    with pytest.raises(UsageError, match="HARNESS_INT_X"):
        fused._int_x_path()


@pytest.mark.cuda(real=True)
def test_cuda_int_x_auto_launches_only_in_a_graph_step(monkeypatch):
    """Under "auto", an eager int read quantizes x in the product (no `_int_x`), and the same
    product warmed up and captured into a CUDA graph inside `fused.graph_step` quantizes it with
    `_int_x`'s launch; the graph's replay gives what the eager call gave (to float32 rounding:
    the two quantize with one formula)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    monkeypatch.setattr(fused, "int_x_path", "auto")
    monkeypatch.setattr(fused, "matvec_path", "int")
    calls = []
    original = fused._int_x
    monkeypatch.setattr(fused, "_int_x", lambda x: calls.append(x.shape) or original(x))
    rng = np.random.default_rng(7)
    raw, code = _prepared(_random_weight(GGMLType.Q4_K, 256, 1024, rng), GGMLType.Q4_K, 1024, "gguf")
    raw = raw.cuda()
    x = torch.randn(1, 1024, device="cuda")
    eager = torch.ops.harness.qmatmul(x, raw, code, 256)
    assert calls == []
    graph = torch.cuda.CUDAGraph()
    with fused.graph_step():
        torch.ops.harness.qmatmul(x, raw, code, 256)  # the warm-up compiles what the capture runs
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            captured = torch.ops.harness.qmatmul(x, raw, code, 256)
    assert calls == [(1, 1024), (1, 1024)]
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_interpreter_int_x_in_kernel_matches_the_launch_bit_for_bit():
    """`int_x_path` "kernel" (x quantized in `_matvec_kernel`) against "launch" (`_int_x` first)
    under Triton's interpreter (a subprocess): `_int_x_path_cases`, every one the same bits."""
    _check_int_x_paths(_interpreted_cases("INTX"))


def _interpreted_cases(mode: str) -> list[dict]:
    """The results of this file run as a script in `mode` (see the end of the file) on the CPU
    under Triton's interpreter (a subprocess: TRITON_INTERPRET is read before the kernels are
    defined), with a fresh seed, which a failure names."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    seed = str(int.from_bytes(os.urandom(4), "little"))
    proc = subprocess.run(
        [sys.executable, __file__, mode, "cpu", seed], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, (
        f"interpreter subprocess failed (seed {seed}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_int_prefetch_matches_the_plain_loop_bit_for_bit():
    """INT_MATVEC_CONFIG "prefetch" (the next super-block's words loaded a step ahead) under
    Triton's interpreter (a subprocess): `_prefetch_cases`, every one the same bits as without it
    and planned with it."""
    _check_prefetch(_interpreted_cases("PREFETCH"))


def _check_prefetch(results: list[dict]) -> None:
    assert len(results) == prefetch_case_count()
    bad = [r["case"] for r in results if not r["same_bits"] or r["planned"] != int(r["case"].split()[1])]
    assert not bad, bad


def _check_int_x_paths(results: list[dict]) -> None:
    assert len(results) == int_x_case_count()
    bad = [r for r in results if r["exact"] is not True]
    assert not bad, "\n".join(
        f"{r['case']}: same bits {r['same_bits']}, launched {r['launched']}, splits {r['splits']} "
        f"(want {r['want_splits']}), nmse {r['nmse']:.3g}"
        for r in bad
    )


def test_planned_refuses_setting_keys_it_does_not_know():
    """`_planned` under a matrix-vector setting holding a key it does not take (settings removed
    in session 15: "x_at", the Q4_K/Q5_K "rows" read's "read" and "span"; a typo): a ValueError naming
    the key, never a launch that silently ignores it (no kernel runs)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    cpu = torch.device("cpu")
    base = {"BN": 8, "num_warps": 4}
    for extra in ({"x_at": 1}, {"read": "rows"}, {"span": 8}, {"BN_": 16}):
        with pytest.raises(ValueError, match=repr(next(iter(extra)))):
            fused._planned(
                int(GGMLType.Q4_K), 4096, 4096, 1, 1, False, False, False, cpu, "int", "launch",
                tuple((base | extra).items()),
            )  # fmt: skip
    plan = fused._planned(
        int(GGMLType.Q4_K), 4096, 4096, 1, 1, False, False, False, cpu, "int", "launch", tuple(base.items())
    )
    assert plan.int_read and plan.grid[0] == 512


@pytest.mark.slow
def test_interpreter_moe_ffn_fusions_match_the_unfused_launches_bit_for_bit():
    """moe_ffn's decode with MOE_FFN_CONFIG's fusions (h in `_int_x`'s form from the gated
    product, the residual added in the down product) under Triton's interpreter (a subprocess):
    `_moe_fusion_cases`, every one the same bits as without them, with one launch and the add
    fewer (none fewer where a fusion does not apply)."""
    _check_moe_fusions(_interpreted_cases("FUSIONS"), small=True)


@pytest.mark.slow
def test_interpreter_qkv_in_one_launch_matches_a_launch_a_run_bit_for_bit():
    """`harness::qkv` with QKV_CONFIG "one_launch" under Triton's interpreter (a subprocess):
    `_qkv_one_launch_cases`, every one the same bits as a launch a run, with one
    `_matvec_two_runs_kernel` launch for two `_matvec_kernel` ones (the fallbacks unchanged)."""
    _check_qkv_one_launch(_interpreted_cases("QKV"), small=True)


@pytest.mark.slow
def test_interpreter_norm_int_form_is_int_x_of_its_output_and_the_ops_take_it():
    """The norms' `_int_x` form (NORM_CONFIG "int_out") under Triton's interpreter (a subprocess):
    `_norm_int_cases`, every one the same bits (the norm's int form and `_int_x` of its output;
    qkv and moe_ffn given it and not), the ops given it making no `_int_x` launch on x."""
    _check_norm_int(_interpreted_cases("NORM_INT"), small=True)


@pytest.mark.slow
def test_interpreter_norm_with_router_gives_the_two_ops_bits_from_one_launch():
    """The post-attention norm with the router after it (NORM_CONFIG "router",
    `harness::add_rms_norm_route` and its int form's) under Triton's interpreter (a subprocess):
    `_norm_route_cases`, every output the bits of `add_rms_norm` (or `add_rms_norm_int`) and
    `router_topk` on its normed output, from one launch of `_norm_route_kernel`."""
    _check_norm_route(_interpreted_cases("NORM_ROUTE"), small=True)


@pytest.mark.slow
def test_interpreter_attention_int_form_is_int_x_of_its_output_and_qmatmul_takes_it():
    """Attention's `_int_x` form (ATTENTION_CONFIG "int_out", `harness::attention_int`) under
    Triton's interpreter (a subprocess): `_attention_int_cases`, every one the same bits (the
    output and caches as `harness::attention`'s, the form as `_int_x` of the output, qmatmul
    given it and not), stored by the launch that writes the output (one launch unsplit or
    merging, the merge launch), no `_int_x` launch where the kernels store it."""
    _check_attention_int(_interpreted_cases("ATTENTION_INT"), small=True)


def _check_norm_int(results: list[dict], small: bool) -> None:
    assert len(results) == norm_int_case_count(small)
    bad = [r for r in results if r["exact"] is not True]
    assert not bad, bad


def _check_moe_fusions(results: list[dict], small: bool) -> None:
    assert len(results) == moe_fusion_case_count(small)
    bad = [r for r in results if r["exact"] is not True]
    assert not bad, bad


@pytest.mark.slow
def test_interpreter_gated_splits_match_the_unsplit_product_and_float64():
    """Gated decode products (gate and up in one launch) split into 2 and 3 programs a row under
    Triton's interpreter (a subprocess), for each read that handles them: `_gated_split_cases`
    (the unsplit product and float64 within NMSE_MAX, the same bits twice, both sums' partials,
    rows that are no multiple of BN, routing scales, two pairs on one expert, the partials'
    buffer beside a plain product's)."""
    pytest.importorskip("triton")
    _check_gated_splits(_interpreted_cases("GATED"), small=True)


@pytest.mark.slow
def test_interpreter_grouped_prefill_matches_dequantize_then_matmul():
    """The "dequant" prefill's grouped products under Triton's interpreter (a subprocess): gated
    (gate, up and SwiGLU in one launch), routing-scaled, both and neither, at 9 to 512 pairs,
    x rows shared by x_div pairs, experts with no pair and with every pair, the scratch in
    chunks; and moe_ffn's prefill sorting its pairs once (`_grouped_cases`, `_check_grouped`)."""
    pytest.importorskip("triton")
    _check_grouped(_interpreted_cases("GROUPED"))


def _check_int_reads(results: list[dict], small: bool) -> None:
    assert len(results) == int_read_case_count(small)
    bad = [r for r in results if not r["nmse"] <= NMSE_MAX or r.get("exact") is False]
    assert not bad, bad


def _matvec_pointer_types(x: str) -> dict[str, str]:
    """`_matvec_kernel`'s pointer arguments and their Triton types, for compiling it without a GPU:
    x as `x` ("*i32": the int read's pairs; "*fp32": the float reads)."""
    return {
        "x_ptr": x, "w_ptr": "*i32", "u_ptr": "*i32", "out_ptr": "*fp32", "experts_ptr": "*i64",
        "scale_ptr": "*fp32", "lut_ptr": "*fp32", "xsum_ptr": "*fp32", "xpow_ptr": "*fp32",
        "part_ptr": "*fp32", "counter_ptr": "*i32", "res_ptr": "*fp32", "hq_ptr": "*i16", "hscale_ptr": "*fp32",
        "hsum_ptr": "*fp32",
    }  # fmt: skip


def _cuobjdump_tool() -> Path:
    """Triton's bundled cuobjdump (the test skips where it is absent)."""
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("Triton's bundled cuobjdump is absent")
    return tool


def _cuobjdump(cubin: bytes, flag: str = "-sass") -> str:
    """`cuobjdump flag` (-sass: the machine code; -res-usage: registers, local memory) of a
    kernel compiled for a GPU without one, from its cubin."""
    tool = _cuobjdump_tool()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kernel_{os.getpid()}.cubin"
    try:
        path.write_bytes(cubin)
        return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink(missing_ok=True)


def _check_waits_first(ptx: str, where) -> None:
    """A decode kernel compiled with PDL (`fused.pdl`): it waits for the grid before it
    (griddepcontrol.wait) before any load or store of global memory, then lets the next start."""
    wait = ptx.index("griddepcontrol.wait")
    assert "griddepcontrol.launch_dependents" in ptx[wait:], where
    first_access = min(
        (ptx.find(op) for op in ("ld.global", "st.global", "atom.global")),
        key=lambda i: i if i >= 0 else len(ptx),
    )
    assert wait < first_access, where


@pytest.mark.slow
def test_int_reads_compile_for_sm_90_with_dp2a_and_no_spills_without_a_gpu():
    """`_matvec_kernel`'s "int" reads (Q4_K, Q5_K, packed Q6_K and Q8_0; plain, gated, and routed
    with split sums, Q4_K's gated also so; x quantized in the kernel (INT_X) and read from
    `_int_x`) compile for an H100 (sm_90) at their launch settings: the PTX holds dp2a, the
    SASS of the loop over super-blocks integer dot products (IDP.2A), and no local memory
    (register spills) anywhere, Q4_K's gated product at BN=128 with 4 warps among them; and
    moe_ffn's decode forms under MOE_FFN_CONFIG (Q4_K's gated product storing h as `_int_x`
    would, its last product rounded on its own: mul.rn; each down product adding the residual).
    Also `_int_x_kernel`."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from harness.quant import fused
    from harness.quant.types import GGMLType

    _cuobjdump_tool()
    for qtype in fused.INT_READ_TYPES:
        cfg = fused.INT_MATVEC_CONFIG[qtype]
        for gated, routed, int_x in itertools.product((False, True), (False, True), (True, False)):
            if gated and routed and qtype != GGMLType.Q4_K:  # (time) Q4_K's gated split: moe_ffn's gate/up
                continue
            consts = {
                "QT": int(qtype), "NP": fused.PARTS[qtype], "BN": cfg["BN"], "GATED": gated,
                "SCALED": routed, "ROUTED": routed, "VEC": False, "PACKED": qtype in (GGMLType.Q6_K, GGMLType.Q8_0),
                "STAGES": cfg["stages"], "UNROLL": cfg.get("unroll", 1), "REDUCE": routed or not gated, "INT": True, "INT_X": int_x, "PTX": True, "PDL": True,
                "RESIDUAL": False, "INT_OUT": False,
            }  # fmt: skip
            compiled = _matvec_sm_90(consts, "*fp32" if int_x else "*i32", cfg["num_warps"])
            where = (qtype.name, gated, routed, int_x)
            _check_waits_first(compiled.asm["ptx"], where)
            assert "dp2a.lo" in compiled.asm["ptx"] and "dp2a.hi" in compiled.asm["ptx"], where
            code = _cuobjdump(compiled.asm["cubin"])
            assert not re.search(r"\b(LDL|STL)\b", code), where
            # a dp2a takes 2 of the 256 values of a row's super-block: per thread and loop step
            per_step = 128 * cfg["BN"] * (2 if gated else 1) // (32 * cfg["num_warps"])
            assert code.count("IDP.2A") >= per_step, (where, code.count("IDP.2A"), per_step)
    # moe_ffn's decode forms under MOE_FFN_CONFIG: the gated product leaving h in `_int_x`'s form
    # (INT_OUT: int16 stores), the down products adding the residual where they write a row
    for qtype, gated in ((GGMLType.Q4_K, True), *((q, False) for q in fused.INT_READ_TYPES)):
        cfg = fused.INT_MATVEC_CONFIG[qtype]
        consts = {
            "QT": int(qtype), "NP": fused.PARTS[qtype], "BN": cfg["BN"], "GATED": gated, "SCALED": not gated,
            "ROUTED": True, "VEC": False, "PACKED": qtype in (GGMLType.Q6_K, GGMLType.Q8_0), "STAGES": cfg["stages"],
            "UNROLL": cfg.get("unroll", 1), "REDUCE": not gated, "INT": True, "INT_X": False,
            "PTX": True, "PDL": True, "INT_OUT": gated,
            "RESIDUAL": not gated,
        }  # fmt: skip
        compiled = _matvec_sm_90(consts, "*i32", cfg["num_warps"])
        where = (qtype.name, "INT_OUT" if gated else "RESIDUAL")
        _check_waits_first(compiled.asm["ptx"], where)
        assert ("st.global.b16" in compiled.asm["ptx"]) == gated, where  # h's int16 values
        # h's last product rounded on its own (mul.rn), as the store before `_int_x` rounded it: no
        # FMA with the adds of its sums
        assert ("mul.rn.f32" in compiled.asm["ptx"]) == gated, where
        assert not re.search(r"\b(LDL|STL)\b", _cuobjdump(compiled.asm["cubin"])), where
    source = ASTSource(
        fn=fused._int_x_kernel,
        signature={
            "x_ptr": "*fp32",
            "q_ptr": "*i16",
            "scale_ptr": "*fp32",
            "sum_ptr": "*fp32",
            "K": "i32",
            "PDL": "constexpr",
        },
        constexprs={"PDL": True},
        attrs={(i,): [["tt.divisibility", 16]] for i in range(5)},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 1, "launch_pdl": True}
    )
    _check_waits_first(compiled.asm["ptx"], "_int_x_kernel")
    assert not re.search(r"\b(LDL|STL)\b", _cuobjdump(compiled.asm["cubin"]))


# `_matvec_two_runs_kernel`'s forms compiled for sm_90: Mixtral's (q, k+v) type pairs, both runs
# split (an H100's decode: 8 splits of q's 16 super-blocks at 1 token) and neither.
QKV_SM_90_PAIRS = (("Q4_K", "Q8_0"), ("Q4_K", "Q6_K"))


def _two_runs_sm_90(names: tuple[str, str], reduce: bool, int_x: bool):
    """`_matvec_two_runs_kernel` for the runs of types `names` (INT_MATVEC_CONFIG's settings, as
    `_matvec_two_runs` binds them) compiled for sm_90 under PDL: (compiled, num_warps)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    consts, warps = {"PTX": True, "PDL": True}, 0
    for name, end in zip(names, ("", "2"), strict=True):
        qtype = GGMLType[name]
        cfg = fused.INT_MATVEC_CONFIG[qtype]
        run = {
            "QT": int(qtype), "NP": fused.PARTS[qtype], "BN": cfg["BN"], "PACKED": qtype in (GGMLType.Q6_K, GGMLType.Q8_0),
            "STAGES": cfg["stages"], "UNROLL": cfg.get("unroll", 1), "REDUCE": reduce, "INT_X": int_x,
        }  # fmt: skip
        consts |= {key + end: value for key, value in run.items()}
        warps = max(warps, cfg["num_warps"])
    x = "*fp32" if int_x else "*i32"
    pointers = {
        f"{name}{end}_ptr": kind
        for end in ("", "2")
        for name, kind in (("x", x), ("w", "*i32"), ("out", "*fp32"), ("xsum", "*fp32"), ("xpow", "*fp32"),
                           ("part", "*fp32"), ("counter", "*i32"))
    }  # fmt: skip
    return _matvec_sm_90(consts, x, warps, fused._matvec_two_runs_kernel, pointers), warps


@pytest.mark.slow
def test_qkv_two_runs_kernel_compiles_for_sm_90_with_dp2a_and_no_spills_without_a_gpu():
    """`_matvec_two_runs_kernel` (`harness::qkv` in one launch, QKV_CONFIG "one_launch") for
    Mixtral's type pairs QKV_SM_90_PAIRS, both runs split and neither, x from `_int_x` (the decode
    graph) and quantized in the kernel: it waits for the grid before it (PDL) once, before any
    access; dp2a in both runs' loops (IDP.2A); no local memory (register spills). Each form's
    registers are printed (`-s`)."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    import re

    from harness.quant import fused
    from harness.quant.types import GGMLType

    _cuobjdump_tool()
    for names, reduce, int_x in itertools.product(QKV_SM_90_PAIRS, (True, False), (False, True)):
        compiled, warps = _two_runs_sm_90(names, reduce, int_x)
        where = (names, reduce, int_x)
        ptx = compiled.asm["ptx"]
        _check_waits_first(ptx, where)
        assert ptx.count("griddepcontrol.wait") == 1, where
        assert "dp2a.lo" in ptx and "dp2a.hi" in ptx, where
        assert (ptx.count("atom.global.gpu.acq_rel.add") == 2) == reduce, where  # a run's arrival
        code = _cuobjdump(compiled.asm["cubin"])
        assert not re.search(r"\b(LDL|STL)\b", code), where
        # a dp2a takes 2 of the 256 values of a row's super-block: per thread and loop step, each run
        bns = [fused.INT_MATVEC_CONFIG[GGMLType[n]]["BN"] for n in names]
        assert code.count("IDP.2A") >= sum(128 * bn // (32 * warps) for bn in bns), where
        usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
        print(where, f"num_warps={warps}", re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", usage)[0])


def _matvec_sm_90(consts: dict, x_type: str, num_warps: int, kernel=None, pointers: dict | None = None):
    """`_matvec_kernel` (or `kernel`, its pointers' types `pointers`) compiled for an H100
    (sm_90) under PDL at `consts`, x of `x_type` ("*i32": from `_int_x`; "*fp32"), pointers and
    row strides 16-byte aligned."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from harness.quant import fused

    kernel = fused._matvec_kernel if kernel is None else kernel
    # constexprs `consts` leaves out take their defaults (else they would compile as arguments)
    consts = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default} | consts
    pointers = _matvec_pointer_types(x=x_type) if pointers is None else pointers
    aligned = (*pointers, "row_bytes", "row_bytes2", "expert_bytes", "x_stride", "x2_stride")
    names = kernel.arg_names
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 64), options={"num_warps": num_warps, "launch_pdl": True}
    )


def _check_attention(results: list[dict]) -> None:
    """The attention cases took the kernels where they should (several splits among them), and
    agree with the torch path to float32 rounding."""
    attention = [r for r in results if r["case"].startswith("attention kernels")]
    assert attention
    assert all(r["kernels"] == r["expect_kernels"] for r in attention), attention
    for fold in (True, False):  # the one-launch form and the rope's own launch, split and not
        assert any(r["kernels"] and r["fold_rope"] == fold and r["splits"] > 1 for r in attention)
        assert any(r["kernels"] and r["fold_rope"] == fold and r["splits"] == 1 for r in attention)
    far = [r for r in attention if not r["max_abs_vs_torch"] <= ATTENTION_MAX_ABS]
    assert not far, far


@pytest.mark.slow
def test_decode_kernels_compile_for_sm_90_without_a_gpu():
    """The attention kernels, `_vec_x_kernel` (one program per super-block) and the RMSNorm
    kernel (with its residual add, and with the int form of NORM_CONFIG "int_out") compile for an H100 (sm_90) with Triton's own compiler and
    ptxas, as a GPU run would compile them (pointers and the cache's strides 16-byte aligned): the
    interpreter accepts things the compiler refuses (a tl.dot under 16 rows, for one). With the
    rope folded into the attention launch, its products are mul.rn (never fused into an FMA),
    and the decode graph's form (16 query rows) spills no registers."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from harness.quant import fused

    _cuobjdump_tool()
    cfg = fused.ATTENTION_CONFIG
    scalars = {"start": "i64", "scale": "fp32", "eps": "fp32"}
    aligned = ("S_MAX", "HD", "N_KEYS", "W")
    launches = [  # (kernel, constexprs, launch options): the decode step's and a start form's
        (
            fused._rope_cache_kernel,
            {"BH": 64, "BD": 128, "FROM_START": False},
            {"num_warps": 1, "enable_fp_fusion": False},
        ),
        (
            fused._rope_cache_kernel,
            {"BH": 64, "BD": 128, "FROM_START": True},
            {"num_warps": 1, "enable_fp_fusion": False},
        ),
        *(
            (
                fused._attention_kernel,
                {
                    "BT": 16,
                    "MERGE": False,
                    "MC": 1,
                    **form,
                    "BS": cfg["BS"],
                    "ROPE": rope,
                    "PTX": True,
                    "DOT": cfg["dot"],
                },  # fmt: skip
                {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
            )
            for form in (
                # the decode graph's (1 token of a group of 4, split keys: by default merged by
                # the last program, its tile of 4 rows; under ATTENTION_TWO_LAUNCHES a tile of 16
                # rows and a merge launch) and a start form's
                {
                    "BM": 4,
                    "BD": 128,
                    "TT": 1,
                    "FROM_START": False,
                    "SPLIT": True,
                    "MERGE": True,
                    "MC": 16,
                },
                {"BM": 16, "BD": 128, "TT": 1, "FROM_START": False, "SPLIT": True},
                {"BM": fused.ATTENTION_MAX_ROWS, "BD": 64, "TT": 8, "FROM_START": True, "SPLIT": False},
            )
            for rope in (True, False)
        ),
        (fused._attention_merge_kernel, {"BM": 16, "BD": 128, "BP": 16}, {"num_warps": cfg["merge_warps"]}),
        # ATTENTION_CONFIG "int_out": the program that writes the rows stores them in `_int_x`'s
        # form too: the one-launch merge at the rows it takes ("fold_merge_rows" 8: a token's 4, 2
        # tokens' 8, loading 20 splits as the decode graph does), unsplit, and the merge launch
        *(
            (
                fused._attention_kernel,
                {
                    "BT": 16,
                    "BD": 128,
                    "BS": cfg["BS"],
                    "ROPE": True,
                    "PTX": True,
                    "DOT": cfg["dot"],
                    "FROM_START": False,
                    "INT_OUT": True,
                    **form,
                },
                {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
            )
            for form in (
                *(
                    {
                        "BM": bm,
                        "TT": bm // 4,
                        "SPLIT": True,
                        "MERGE": True,
                        "MC": fused.attention_merge_splits(20, bm, 128, cfg["num_warps"]),
                    }
                    for bm in (4, 8)
                ),
                {"BM": 4, "TT": 1, "SPLIT": False},
            )
        ),
        (
            fused._attention_merge_kernel,
            {"BM": 16, "BD": 128, "BP": 16, "INT_OUT": True},
            {"num_warps": cfg["merge_warps"]},
        ),
        *((fused._vec_x_kernel, {"QT": qt, "PEAK_BLOCK": 4096}, {"num_warps": 4}) for qt in (8, 12, 14)),
        *((fused._rms_norm_kernel, {"BD": 4096, "ADD": add}, {"num_warps": 8}) for add in (False, True)),
        # NORM_CONFIG "int_out": the row also in `_int_x`'s form (Mixtral's 4096, and 5120: a tail)
        *(
            (fused._rms_norm_kernel, {"BD": bd, "ADD": add, "INT_OUT": True, "PTX": True}, {"num_warps": 8})
            for bd in (4096, 8192)
            for add in (False, True)
        ),
    ]
    for kernel, consts, options in launches:
        consts, options = {**consts, "PDL": True}, {**options, "launch_pdl": True}  # as on an H100
        # constexprs left out take their defaults (else they would compile as arguments)
        consts = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default} | consts
        names = kernel.arg_names
        pointers = [n for n in names if n.endswith("_ptr") or n.startswith(("cache_", "part_", "q_out"))]
        signature = {
            n: "constexpr" if n in consts else "*i64" if n == "pos_ptr" else "*i32" if n == "counter_ptr"
            else "*i16" if (kernel, n) == (fused._rms_norm_kernel, "q_ptr") or n == "xq_ptr"
            else "*fp32" if n in pointers
            else scalars.get(n, "i32")
            for n in names
        }  # fmt: skip
        attrs = {
            (i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in aligned
        }
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)
        assert compiled.asm["cubin"], (kernel.__name__, consts)
        _check_waits_first(compiled.asm["ptx"], (kernel.__name__, consts))
        if consts.get("INT_OUT"):
            # the normed row's last product rounded on its own (`_int_x_blocks`' sums never fuse
            # it into an FMA: the int form is `_int_x` of the float row; attention's rows are
            # divisions, never fused), no register spills
            if kernel is fused._rms_norm_kernel:
                assert "mul.rn.f32" in compiled.asm["ptx"], consts
            assert not re.search(r"\b(LDL|STL)\b", _cuobjdump(compiled.asm["cubin"])), (
                kernel.__name__,
                consts,
            )
        if consts.get("ROPE"):
            # the rope's products rounded one by one (never fused into an FMA: the cache write
            # is the torch path's bit for bit) in a launch that leaves fp fusion on
            assert "mul.rn.f32" in compiled.asm["ptx"], consts
            if consts["BM"] <= 16:  # the decode graph's forms: no register spills
                assert not re.search(r"\b(LDL|STL)\b", _cuobjdump(compiled.asm["cubin"])), consts


@pytest.mark.slow
def test_matvec_split_sums_compile_for_sm_90_without_a_gpu():
    """`_matvec_kernel` with its in-kernel split sum (Q4_K's read; packed Q6_K routed and scaled,
    with the residual added, as `moe_ffn`'s down product) compiles for an H100 (sm_90): each program's arrival is one
    acq_rel atomic at GPU scope after a barrier, the last program reads the others' partials
    past L1 (ld.global.cg) and sets its counter back with an atomic exchange. (The interpreter
    runs programs one after another: it checks the sums' order, not the synchronization.)"""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from harness.quant import fused

    kernel = fused._matvec_kernel
    pointers = _matvec_pointer_types(x="*fp32")
    common = {
        "GATED": False,
        "VEC": True,
        "STAGES": 1,
        "UNROLL": 1,
        "REDUCE": True,
        "INT": False,
        "INT_X": False,
        "PTX": True,
        "PDL": False,
        "INT_OUT": False,
        "PREFETCH": 0,
    }
    for consts in (
        {
            "QT": 12,
            "NP": 2,
            "BN": 16,
            "SCALED": False,
            "ROUTED": False,
            "PACKED": False,
            "RESIDUAL": False,
            **common,
        },
        {
            "QT": 14,
            "NP": 4,
            "BN": 32,
            "SCALED": True,
            "ROUTED": True,
            "PACKED": True,
            "RESIDUAL": True,
            **common,
        },
    ):
        names = kernel.arg_names
        signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers}
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        arrive = ptx.index("atom.global.gpu.acq_rel.add")
        assert "bar.sync" in ptx[:arrive], consts
        assert "ld.global.cg" in ptx[arrive:] and "atom.global.gpu.acq_rel.exch" in ptx[arrive:], consts


@pytest.mark.slow
def test_prefill_kernels_compile_for_sm_90_with_wide_loads_without_a_gpu():
    """The prefill's packed dequantization and activation scaling compile for an H100 (sm_90)
    with Triton's compiler and ptxas, as a launch on 16-byte aligned tensors compiles them; the
    packed planes' quants load 16 bytes at a time (the reason for the layout), the float16
    stores are 16-byte vectors, and the scaling divides as IEEE does (div.rn, as torch)."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from harness.quant import fused

    aligned = [["tt.divisibility", 16]]
    dequant = {"raw_ptr": "*u8", "out_ptr": "*fp16", "nblocks": "i64", "n": "i32", "row_bytes": "i32"}
    scaled = {"x_ptr": "*fp32", "out_ptr": "*fp16", "peak_ptr": "*fp32", "K": "i32"}
    launches = [  # (kernel, signature, constexprs, aligned arguments, what the PTX must hold)
        (
            fused._dequant_packed_kernel,
            dequant,
            {"QT": 14, "NB": 16, "IL": False},
            (0, 1, 4),
            ("ld.global.v4", "st.global.v4"),
        ),
        (  # the packed rows interleaved (PACK_CONFIG "q6_k_interleave")
            fused._dequant_packed_kernel,
            dequant,
            {"QT": 14, "NB": 16, "IL": True},
            (0, 1, 4),
            ("ld.global.v4", "st.global.v4"),
        ),
        (
            fused._dequant_packed_kernel,
            dequant,
            {"QT": 8, "NB": 128, "IL": False},
            (0, 1, 4),
            ("ld.global.v4", "st.global.v4"),
        ),
        (fused._scaled_half_kernel, scaled, {"BK": 1024}, (0, 1, 3), ("div.rn.f32", "st.global.v4")),
    ]
    for kernel, signature, consts, at, wanted in launches:
        source = ASTSource(
            fn=kernel,
            signature={**signature, **dict.fromkeys(consts, "constexpr")},
            constexprs=consts,
            attrs={(i,): aligned for i in at},
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
        assert compiled.asm["cubin"], (kernel.__name__, consts)
        missing = [w for w in wanted if w not in compiled.asm["ptx"]]
        assert not missing, (kernel.__name__, consts, missing)


@pytest.mark.slow
def test_grouped_kernel_compiles_for_sm_90_on_tensor_cores_without_spills():
    """The prefill's grouped float16 GEMM compiles for an H100 (sm_90) at its launch settings,
    one weight (plain and routing-scaled: moe_ffn's down product) and gated (gate, up and
    SwiGLU: two accumulators): Hopper's tensor-core instructions (wgmma; HGMMA in the SASS,
    gated twice as many as one weight's at its settings), no local memory (register spills), and
    shared memory within the H100's 227 KB a block. The sort of pairs by expert before it
    compiles without spills too (8 and 128 experts)."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from harness.quant import fused

    _cuobjdump_tool()
    kernel = fused._grouped_kernel
    pointers = {
        "x_ptr": "*fp16", "xscale_ptr": "*fp32", "w_ptr": "*fp16", "u_ptr": "*fp16", "scale_ptr": "*fp32",
        "out_ptr": "*fp32", "sorted_ptr": "*i64", "block_expert_ptr": "*i32",
    }  # fmt: skip
    aligned = (*pointers, "N", "K")  # Mixtral's rows and row lengths are multiples of 16
    hgmma = {}
    one, two = fused.GROUPED_CONFIG, fused.GATED_GROUPED_CONFIG
    # (and one weight at the gated settings: the same tiles, to count its products against)
    for gated, scaled, cfg in (
        (False, False, one),
        (False, True, one),
        (True, False, two),
        (False, False, two),
    ):
        consts = {"BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"], "GATED": gated, "SCALED": scaled}
        names = kernel.arg_names
        source = ASTSource(
            fn=kernel,
            signature={n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names},
            constexprs=consts,
            attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned},
        )
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", 90, 64),
            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
        )
        where = (gated, scaled, cfg)
        assert "wgmma.mma_async" in compiled.asm["ptx"], where
        assert compiled.metadata.shared <= 232_448, (where, compiled.metadata.shared)
        code = _cuobjdump(compiled.asm["cubin"])
        assert not re.search(r"\b(LDL|STL)\b", code), where
        hgmma[gated, scaled, cfg is two] = code.count("HGMMA")
    sort = fused._sort_by_expert_kernel
    for ep in (8, 128):  # Mixtral's experts, and many
        consts = {"BLOCK": 64, "EP": ep, "BP": max(16, 4096 // ep)}
        source = ASTSource(
            fn=sort,
            signature={n: "constexpr" if n in consts else "i32" for n in sort.arg_names}
            | {"experts_ptr": "*i64", "sorted_ptr": "*i64", "block_expert_ptr": "*i32"},
            constexprs=consts,
            attrs={(i,): [["tt.divisibility", 16]] for i in range(3)},
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
        code = _cuobjdump(compiled.asm["cubin"])
        assert not re.search(r"\b(LDL|STL)\b", code), ("sort", ep)
    assert hgmma[False, False, False] == hgmma[False, True, False] > 0, hgmma
    assert hgmma[True, False, True] == 2 * hgmma[False, False, True] > 0, hgmma


@pytest.mark.slow
def test_router_kernel_compiles_for_sm_90_without_spills_without_a_gpu(monkeypatch):
    """`harness::router_topk`'s kernel compiles for an H100 (sm_90) with CUDA's expf linked from
    libdevice, at the splits and steps `router_plan` picks (ROUTER_CONFIG's, and one program a
    token: "splits" 1) for Mixtral's router, the largest expert count, one expert and counts
    that are not powers of two, with no local memory (register spills). Split, each program's
    arrival is one acq_rel atomic at GPU scope after a barrier, the last reads the partials past
    L1 (ld.global.cg) and sets its counter back with an atomic exchange; Mixtral's weight loads
    are 16-byte vectors. With PDL, only the weight (ld.global.cg) is read before the wait for the
    kernel before (griddepcontrol.wait): no store, no atomic, x after it."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from harness.quant import fused

    _cuobjdump_tool()
    kernel = fused._router_topk_kernel
    pointers = {
        "x_ptr": "*fp32", "w_ptr": "*fp32", "weights_ptr": "*fp32", "experts_ptr": "*i64", "part_ptr": "*fp32",
        "counter_ptr": "*i32",
    }  # fmt: skip
    for config in (
        dict(fused.ROUTER_CONFIG),
        {"splits": 1, "tile": 16384, "num_warps": 8, "num_stages": 1},
    ):
        monkeypatch.setattr(fused, "ROUTER_CONFIG", config)
        for n_exp, k, dim in (
            (8, 2, 4096),
            (fused.ROUTER_MAX_EXPERTS, 8, 4096),
            (1, 1, 4096),
            (3, 3, 40),
        ):
            splits, _, step = fused.router_plan(n_exp, dim)
            consts = {
                "K": k, "BE": triton.next_power_of_2(n_exp), "BD": step, "BK": triton.next_power_of_2(k),
                "SPLITS": splits, "CUDA_EXP": True, "PDL": True,
            }  # fmt: skip
            names = kernel.arg_names
            signature = {
                n: "constexpr" if n in consts else pointers.get(n, "fp32" if n == "min_sum" else "i32")
                for n in names
            }  # fmt: skip
            aligned = (*pointers, "chunk", *(("D",) if dim % 16 == 0 else ()))
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
            source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
            options = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
            options["launch_pdl"] = True
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)
            usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
            where = (config, n_exp, k, dim, splits)
            assert re.search(r"\bLOCAL:0\b", usage) and not re.search(r"\bLOCAL:[1-9]", usage), (
                where,
                usage,
            )
            ptx = compiled.asm["ptx"]
            # the weight's first step (ld.global.cg) before the wait, nothing else
            before, after = ptx.split("griddepcontrol.wait", 1)
            assert "griddepcontrol.launch_dependents" in after, where
            assert "st.global" not in before and "atom." not in before, where
            assert re.search(r"ld\.global\.cg", before), where
            assert not re.search(r"ld\.global(?!\.cg)", before), where
            assert re.search(r"ld\.global(?!\.cg)", after), where  # x, after the wait
            if splits > 1:
                arrive = ptx.index("atom.global.gpu.acq_rel.add")
                assert "bar.sync" in ptx[:arrive], where
                assert "ld.global.cg" in ptx[arrive:] and "atom.global.gpu.acq_rel.exch" in ptx[arrive:], (
                    where
                )
            else:
                assert "atom." not in ptx, where
            if (n_exp, dim) == (8, 4096):
                assert re.search(r"ld\.global\.cg\.v4", ptx), where


def _sm90_compile(kernel, consts: dict, pointers: dict, num_warps: int, floats=("eps", "min_sum")):
    """`kernel` compiled for an H100 (sm_90) with PDL, its pointers (name: type) and its ints
    "chunk" and "D" 16-aligned (Mixtral's rows), other arguments int32 or (`floats`) float32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {
        n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in floats else "i32") for n in names
    }
    aligned = (*pointers, "chunk", "D")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": 1, "launch_pdl": True}
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)


def _float_reduce_operands(ttgir: str):
    """Each float32 `tt.reduce` of a compiled kernel's TTGIR (an integer's sum is exact):
    ((operand shape), axis) and its operand's layout name."""
    import re

    for chunk in ttgir.split('"tt.reduce"(')[1:]:  # each reduce, up to the next
        axis = re.match(r"%\w+\) <\{axis = (\d+) : i32\}>", chunk)
        operand = re.search(r"\}\) : \(tensor<([\dx]+)x(\w+), ([^)]*)>\)", chunk)  # (its body's end)
        if axis is not None and operand is not None and operand[2] == "f32":
            yield (tuple(int(n) for n in operand[1].split("x")), int(axis[1])), operand[3]


def _float_reduces(ttgir: str) -> set[tuple]:
    """The float32 `tt.reduce`s of a compiled kernel's TTGIR as (operand shape, axis), whatever
    the operand's layout."""
    return {key for key, _ in _float_reduce_operands(ttgir)}


def _reduce_layouts(ttgir: str) -> dict[tuple, dict]:
    """The float32 `tt.reduce`s of a compiled kernel's TTGIR: (operand shape, axis) -> its
    operand's blocked layout ({"sizePerThread": [...], "threadsPerWarp": [...], "warpsPerCTA":
    [...]}; the first such reduce of each shape and axis)."""
    import re

    aliases = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{(.*)\}>$", ttgir, re.M))
    found = {}
    for key, layout in _float_reduce_operands(ttgir):
        if layout not in aliases:
            continue  # (a sliced layout's operand: a reduce of a reduce)
        fields = dict(re.findall(r"(\w+) = \[([\d, ]*)\]", aliases[layout]))
        found.setdefault(key, {k: [int(n) for n in v.split(",")] for k, v in fields.items()})
    return found


def test_norm_route_kernel_compiles_for_sm_90_without_spills_and_sums_as_the_two_kernels(monkeypatch):
    """`harness::add_rms_norm_route`'s kernel (NORM_CONFIG "router"; with and without the int
    form) compiles for an H100 (sm_90) at Mixtral's router and row, the largest expert count, a
    row of no power of two and 3 experts, with no local memory (register spills); with PDL only the router's
    weight (ld.global.cg) is read before the wait; each program's arrival is one acq_rel atomic
    after a barrier. Its sums are laid out as the two kernels' (the bits on a GPU, where the
    order of a sum follows the layout): the row's sum of squares exactly as `_rms_norm_kernel`'s
    (the same warps), and each expert's partial logit summed pairwise over a step's columns as
    `_router_topk_kernel`'s, so with any warps (at 3 experts, padded to 4 rows, a tl.sum's order
    differed between the router's 4 warps and the norm's 8 on an H100); its other sums over
    experts are pairwise or exact."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    import re

    from harness.quant import fused

    _cuobjdump_tool()
    f32 = "*fp32"
    router_ptrs = {"x_ptr": f32, "w_ptr": f32, "weights_ptr": f32, "experts_ptr": "*i64", "part_ptr": f32}
    router_ptrs["counter_ptr"] = "*i32"
    norm_ptrs = {n: f32 for n in ("x_ptr", "r_ptr", "total_ptr", "w_ptr", "out_ptr", "scale_ptr", "sum_ptr")}
    norm_ptrs["q_ptr"] = "*i16"
    fused_ptrs = {**router_ptrs, **norm_ptrs, "nw_ptr": f32}
    for n_exp, k, dim in ((8, 2, 4096), (fused.ROUTER_MAX_EXPERTS, 8, 4096), (8, 2, 5120), (3, 3, 4096)):
        splits, _, step = fused.router_plan(n_exp, dim)
        be, bn = triton.next_power_of_2(n_exp), triton.next_power_of_2(dim)
        routing = {"K": k, "BE": be, "BD": step, "BK": triton.next_power_of_2(k), "SPLITS": splits}
        routing.update(CUDA_EXP=True, PDL=True)
        router = _sm90_compile(
            fused._router_topk_kernel, {**routing, "PTX": True}, router_ptrs, fused.ROUTER_CONFIG["num_warps"]
        )
        norm = _sm90_compile(
            fused._rms_norm_kernel,
            {"BD": bn, "ADD": True, "PDL": True, "INT_OUT": False, "PTX": False},
            norm_ptrs,
            fused._norm_warps(bn),
        )
        norm_sums = _reduce_layouts(norm.asm["ttgir"])
        for int_out in (False, True) if dim % 256 == 0 else (False,):
            consts = {**routing, "BN": bn, "INT_OUT": int_out, "PTX": True}
            compiled = _sm90_compile(fused._norm_route_kernel, consts, fused_ptrs, fused._norm_warps(bn))
            where = (n_exp, k, dim, int_out)
            usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
            assert re.search(r"\bLOCAL:0\b", usage) and not re.search(r"\bLOCAL:[1-9]", usage), (where, usage)
            ptx = compiled.asm["ptx"]
            before, after = ptx.split("griddepcontrol.wait", 1)
            assert "griddepcontrol.launch_dependents" in after, where
            assert "st.global" not in before and "atom." not in before, where
            assert re.search(r"ld\.global\.cg", before) and not re.search(r"ld\.global(?!\.cg)", before), (
                where
            )
            arrive = ptx.index("atom.global.gpu.acq_rel.add")
            assert "bar.sync" in ptx[:arrive] and "atom.global.gpu.acq_rel.exch" in ptx[arrive:], where
            sums = _reduce_layouts(compiled.asm["ttgir"])
            assert sums[(bn,), 0] == norm_sums[(bn,), 0], where  # the row's sum of squares
            # an expert's partial logit over a step's columns: summed pairwise in both kernels
            # (whatever their warps), never by one reduce over the step
            pairwise = {((be, step >> (i + 1), 2), 2) for i in range(step.bit_length() - 1)}
            for kernel in (compiled, router):
                reduces = _float_reduces(kernel.asm["ttgir"])
                assert pairwise <= reduces and ((be, step), 1) not in reduces, (where, reduces)
                assert "mul.rn.f32" in kernel.asm["ptx"], where  # (products no FMA takes into the sums)


@pytest.mark.parametrize(
    "qtype, planes",
    [
        ("Q6_K", ((0, 128), (128, 64), (192, 16), (208, 2))),  # ql | qh | scales (reordered) | d
        ("Q8_0", ((2, 32), (0, 2))),  # qs | d
    ],
)
def test_packed_layout_moves_the_gguf_bytes_and_dequantizes_bit_for_bit(qtype, planes):
    """`fused.pack` (rows as planes of one block field each) moves bytes only: each plane holds
    its field of every block, `unpack` gives the GGUF bytes back, and gguf-py dequantizes them
    to the same bits, for odd row counts, expert stacks and extreme scales."""
    gguf = pytest.importorskip("gguf")
    from harness.quant import fused
    from harness.quant.dequant import dequantize
    from harness.quant.types import GGMLType, block_size, type_size

    qtype = GGMLType[qtype]
    rng = np.random.default_rng(7)
    for shape in ((1, 2048), (7, 2048), (33, 4096), (3, 5, 2048)):
        for make in (_random_weight, _extreme_weight):
            raw = make(qtype, int(np.prod(shape[:-1])), shape[-1], rng).reshape(*shape[:-1], -1)
            packed = fused.pack(raw, qtype)
            assert packed.shape == raw.shape and packed.dtype == torch.uint8 and not torch.equal(packed, raw)
            n = shape[-1] // block_size(qtype)
            blocks = raw.reshape(-1, n, type_size(qtype))
            rows = packed.reshape(-1, n * type_size(qtype))
            at = 0
            for first, size in planes:
                plane = rows[:, at * n : (at + size) * n].reshape(-1, n, size)
                field = blocks[..., first : first + size]
                if size == 16:  # Q6_K's scales: plane byte 4f + 2c + h is scale 8c + 2f + h
                    plane = plane.reshape(-1, n, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, n, 16)
                assert torch.equal(plane, field), (first, size)
                at += size
            back = fused.unpack(packed, qtype)
            assert torch.equal(back, raw)
            ours = dequantize(back, qtype, shape, torch.float32).numpy()
            theirs = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(int(qtype))).reshape(shape)
            assert np.array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


def test_kernel_weight_packs_where_rows_align_and_marks_values_beyond_float16():
    from harness.quant import fused
    from harness.quant.types import GGMLType

    rng = np.random.default_rng(3)
    q6 = GGMLType.Q6_K
    raw = _random_weight(q6, 5, 2048, rng)
    packed, code = fused.kernel_weight(raw, q6, 2048)
    assert code == int(q6) | fused.PACKED and torch.equal(fused.gguf_blocks(packed, code), raw)
    odd = _random_weight(q6, 5, 768, rng)  # 3 super-blocks: 630-byte rows, not 16-byte aligned
    same, code = fused.kernel_weight(odd, q6, 768)
    assert same is odd and code == int(q6) and fused.gguf_blocks(same, code) is odd
    assert fused.packs(q6, 4096, 5) and not fused.packs(q6, 256, 5)
    # Q4_K: interleaved where its rows make whole 32-row tiles, under PACK_CONFIG
    assert fused.packs(GGMLType.Q4_K, 4096, 32) == fused.PACK_CONFIG["q4_k_interleave"]
    assert not fused.packs(GGMLType.Q4_K, 4096, 33)
    huge = _extreme_weight(GGMLType.Q4_K, 5, 256, rng)
    assert fused.kernel_weight(huge, GGMLType.Q4_K, 256)[1] == int(GGMLType.Q4_K) | fused.WIDE
    # largest value 65504 * 127 / 127: exactly float16's largest, not beyond it
    edge = torch.zeros(1, 34, dtype=torch.uint8)
    edge[0, :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    edge[0, 2] = 0x7F
    assert fused.kernel_weight(edge, GGMLType.Q8_0, 32)[1] == int(GGMLType.Q8_0)


def test_modules_lay_their_weights_out_again_when_moved(monkeypatch):
    """A module built where the kernels do not run keeps the GGUF blocks; moved to a device where
    they run (`runs_on` made true for the CPU here: no kernel runs), its weights are prepared as
    if built there (Q6_K repacked, a weight beyond float16's range marked WIDE, q/k/v in one
    buffer); moved back, the GGUF bytes come back bit for bit. Moves between such devices keep
    the layout (no second range scan)."""
    from harness.model.mixtral import Experts
    from harness.quant import fused
    from harness.quant.qmatmul import QMatMul
    from harness.quant.qtensor import QTensor
    from harness.quant.types import GGMLType

    rng = np.random.default_rng(5)
    q6, q4 = GGMLType.Q6_K, GGMLType.Q4_K
    raw, huge = _random_weight(q6, 5, 2048, rng), _extreme_weight(q6, 5, 2048, rng)
    head, wide = (
        QMatMul(QTensor(raw, q6, (5, 2048), "output.weight")),
        QMatMul(QTensor(huge, q6, (5, 2048), "w")),
    )
    gate = [QTensor(_random_weight(q4, 2048, 256, rng), q4, (2048, 256), f"g{e}") for e in range(2)]
    down = [QTensor(_random_weight(q6, 256, 2048, rng), q6, (256, 2048), f"d{e}") for e in range(2)]
    experts = Experts(gate, gate, down, torch.device("cpu"))
    assert (head.kernel_qtype, head.kernel_ready) == (int(q6), False) and torch.equal(head.qweight, raw)
    assert experts.kernel_qtypes == {"w1": int(q4), "w3": int(q4), "w2": int(q6)}

    monkeypatch.setattr(fused, "runs_on", lambda device: True)
    for m in (head, wide, experts):
        m.to("cpu")
    assert head.kernel_qtype == int(q6) | fused.PACKED and head.kernel_ready
    assert not torch.equal(head.qweight, raw) and torch.equal(head.qtensor.raw, raw)
    assert wide.kernel_qtype == int(q6) | fused.PACKED | fused.WIDE
    q4_code = int(q4) | (
        fused.PACKED if fused.PACK_CONFIG["q4_k_interleave"] else 0
    )  # (2048 rows: whole tiles)
    assert experts.kernel_qtypes == {"w1": q4_code, "w3": q4_code, "w2": int(q6) | fused.PACKED}
    assert all(experts.kernel_ready.values())
    scans = []
    monkeypatch.setattr(fused, "_max_magnitude", lambda *a: scans.append(a) or 0.0)
    packed = head.qweight
    head.float()
    assert head.qweight is packed and not scans

    monkeypatch.setattr(fused, "runs_on", lambda device: False)
    for m in (head, wide, experts):
        m.cpu()
    assert (head.kernel_qtype, head.kernel_ready) == (int(q6), False) and torch.equal(head.qweight, raw)
    assert torch.equal(wide.qweight, huge) and wide.kernel_qtype == int(q6)
    assert experts.kernel_qtypes["w2"] == int(q6) and torch.equal(experts.w2[1], down[1].raw)


def test_attention_puts_q_k_v_in_one_buffer_again_after_a_move(monkeypatch, tiny_mixtral):
    """A model loaded where the fused ops do not run, then moved where they run: each layer's
    q and k blocks (both Q4_K in a Q4_K_M file; v is Q6_K) follow each other in one buffer
    (`harness::qkv` multiplies them in one launch), as in a model loaded there."""
    from harness.quant import fused

    model = tiny_mixtral(on="cpu", file_type="Q4_K_M")
    attention = model.layers[1].attn
    assert not attention.fused()
    monkeypatch.setattr(fused, "runs_on", lambda device: True)
    model.to("cpu")
    wq, wk, wv = (m.qweight for m in (attention.wq, attention.wk, attention.wv))
    assert attention.fused() and attention.wv.kernel_qtype != attention.wq.kernel_qtype
    assert wq.untyped_storage().data_ptr() == wk.untyped_storage().data_ptr()
    assert wk.storage_offset() == wq.storage_offset() + wq.numel()
    assert wv.untyped_storage().data_ptr() != wq.untyped_storage().data_ptr()


_INTERPRETED_PACKED_MODULES = """
import json, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_quant_fused import _extreme_weight, _random_weight
from harness.model.mixtral import Experts
from harness.quant import fused
from harness.quant.qmatmul import QMatMul
from harness.quant.qtensor import QTensor
from harness.quant.types import GGMLType
from harness.trace.tracer import Tracer

rng = np.random.default_rng(11)
q6, q4 = GGMLType.Q6_K, GGMLType.Q4_K
nmse = lambda a, b: float(((a.double() - b.double()) ** 2).sum() / (b.double() ** 2).sum())
raw = _random_weight(q6, 5, 2048, rng)
head = QMatMul(QTensor(raw, q6, (5, 2048), "output.weight"))
x = torch.randn(3, 2048)
with Tracer(head, keep_events=True) as tracer:
    y = head(x[:1])
ops = [[e.op, list(e.tensors or ())] for e in tracer.events if not e.alias]
with fused.disabled():
    y_torch = head(x[:1])
wide = QMatMul(QTensor(_extreme_weight(q6, 5, 2048, rng), q6, (5, 2048), "wide"))
x9 = torch.randn(9, 2048)
with fused.disabled():
    wide_torch = wide(x9)
gate = [QTensor(_random_weight(q4, 2048, 256, rng), q4, (2048, 256), f"g{e}") for e in range(3)]
up = [QTensor(_random_weight(q4, 2048, 256, rng), q4, (2048, 256), f"u{e}") for e in range(3)]
down = [QTensor(_random_weight(q6, 256, 2048, rng), q6, (256, 2048), f"d{e}") for e in range(3)]
experts = Experts(gate, up, down, torch.device("cpu"))
xe, chosen, weights = torch.randn(1, 256), torch.tensor([[2, 0]]), torch.tensor([[0.75, 0.25]])
with Tracer(experts, keep_events=True) as tracer:
    ye = experts(xe, weights, chosen)
moe_ops = [[e.op, sorted(e.tensors or ())] for e in tracer.events if not e.alias]
with fused.disabled():
    ye_torch = experts(xe, weights, chosen)
print(json.dumps({
    "code": head.kernel_qtype,
    "gguf_bytes": torch.equal(head.qtensor.raw, raw),
    "buffer_packed": not torch.equal(head.qweight, raw),
    "ops": ops,
    "nmse": nmse(y, y_torch),
    "wide_code": wide.kernel_qtype,
    "wide_nmse": nmse(wide(x9), wide_torch),
    "experts_codes": experts.kernel_qtypes,
    "moe_ops": moe_ops,
    "moe_nmse": nmse(ye, ye_torch),
}))
"""


@pytest.mark.slow
def test_modules_hand_the_ops_packed_weights_and_keep_the_gguf_bytes_for_the_torch_path():
    """Under the interpreter (the kernels run on the CPU), QMatMul and Experts keep a Q6_K weight
    of 2048-value rows packed: the op reads it and the trace names the GGUF tensor, the torch
    path (kernels disabled) gets the GGUF bytes back and agrees; a weight beyond float16's range
    is marked WIDE and its prefill is right."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_PACKED_MODULES, str(REPO / "tests")],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    q6 = int(GGMLType.Q6_K)
    assert seen["code"] == q6 | fused.PACKED and seen["gguf_bytes"] and seen["buffer_packed"]
    assert seen["ops"] == [["harness.qmatmul.default", ["output.weight"]]]
    assert seen["nmse"] <= NMSE_MAX
    assert seen["wide_code"] == q6 | fused.PACKED | fused.WIDE and seen["wide_nmse"] <= NMSE_MAX
    q4 = int(GGMLType.Q4_K) | (fused.PACKED if fused.PACK_CONFIG["q4_k_interleave"] else 0)  # (whole tiles)
    assert seen["experts_codes"] == {"w1": q4, "w3": q4, "w2": q6 | fused.PACKED}
    [op] = [o for o in seen["moe_ops"] if "moe_ffn" in o[0]]
    assert sorted(op[1]) == sorted(f"{k}{e}" for k in "gud" for e in range(3))
    assert seen["moe_nmse"] <= NMSE_MAX


def test_cpu_tensors_raise_a_device_error_without_the_interpreter():
    from harness.quant import fused, kernels
    from harness.quant.types import GGMLType
    from harness.trace.classify import is_device_error

    if kernels.interpreting():
        pytest.skip("the interpreter runs CPU tensors")
    raw = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(RuntimeError) as info:
        torch.ops.harness.qmatmul(torch.ones(1, 256), raw, int(GGMLType.Q4_K), 4)
    assert is_device_error(str(info.value)) and "cpu" in str(info.value)
    assert not fused.supports(GGMLType.Q4_K, torch.device("cpu"), 256)


def _decode_op_calls(device: str, cpu_arg: int | None = None):
    """(name, number of tensor arguments, call) of each decode-path op on small `device` tensors;
    argument `cpu_arg` of each (counted among its tensor arguments) on the CPU instead."""
    from harness.quant.types import GGMLType

    def tensors(*ts):
        return [t.to("cpu" if i == cpu_arg else device) for i, t in enumerate(ts)]

    q4, q8 = int(GGMLType.Q4_K), int(GGMLType.Q8_0)
    wq, wk = torch.zeros(8, 144, dtype=torch.uint8), torch.zeros(4, 272, dtype=torch.uint8)
    cache = torch.zeros(2, 6, 4)
    int_form = (torch.zeros(1, 256, dtype=torch.int16), torch.zeros(1, 16), torch.zeros(1, 8))
    return [
        (
            "qkv",
            4,
            lambda: torch.ops.harness.qkv(*tensors(torch.ones(1, 256), wq, wk, wk.clone()), q4, q8, q8),
        ),
        (
            "qkv",
            7,
            lambda: _qkv_given_int_form(tensors(torch.ones(1, 256), wq, wk, wk.clone(), *int_form), q4, q8),
        ),
        (
            "attention",
            6,
            lambda: torch.ops.harness.attention(
                *tensors(
                    torch.ones(1, 16 + 8 + 8),  # q, k, v side by side
                    cache,
                    cache.clone(),
                    torch.ones(6, 2),
                    torch.ones(6, 2),
                    torch.tensor([2]),
                ),
                0,
            ),  # fmt: skip
        ),
        (
            "router_topk",
            2,
            lambda: torch.ops.harness.router_topk(*tensors(torch.ones(1, 16), torch.ones(8, 16)), 2, 1e-4),
        ),
        (
            "add_rms_norm",
            3,
            lambda: torch.ops.harness.add_rms_norm(
                *tensors(torch.ones(1, 8), torch.ones(1, 8), torch.ones(8)), 1e-5
            ),
        ),
        (
            "rms_norm_int",
            2,
            lambda: torch.ops.harness.rms_norm_int(*tensors(torch.ones(1, 256), torch.ones(256)), 1e-5),
        ),
        # NORM_CONFIG "router": the norm with the router's float32 weight (and its int form)
        *(
            (
                name,
                4,
                lambda name=name: _norm_route(
                    name, tensors(torch.ones(1, 256), torch.ones(1, 256), torch.ones(256), torch.ones(8, 256))
                ),
            )
            for name in ("add_rms_norm_route", "add_rms_norm_int_route")
        ),
        (
            "add_rms_norm_int",
            3,
            lambda: torch.ops.harness.add_rms_norm_int(
                *tensors(torch.ones(1, 256), torch.ones(1, 256), torch.ones(256)), 1e-5
            ),
        ),
        ("embed_rows", 2, lambda: torch.ops.harness.embed_rows(*tensors(wq, torch.tensor([1])), q4, 256)),
        ("moe_ffn", 7, lambda: _moe_ffn_with_residual(tensors, q4)),
        # ATTENTION_CONFIG "int_out": attention's output in `_int_x`'s form (8 heads of 32: a row
        # of 256), and the output projection given it
        (
            "attention_int",
            6,
            lambda: torch.ops.harness.attention_int(
                *tensors(
                    torch.ones(1, 256 + 64),
                    torch.zeros(1, 6, 32),
                    torch.zeros(1, 6, 32),
                    torch.ones(6, 16),
                    torch.ones(6, 16),
                    torch.tensor([2]),
                ),
                0,
            ),
        ),  # fmt: skip
        (
            "qmatmul",
            5,
            lambda: _qmatmul_given_int_form(tensors(torch.ones(1, 256), wq, *int_form), q4),
        ),
    ]


def _qmatmul_given_int_form(tensors: list[torch.Tensor], q4: int):
    """`harness::qmatmul` of x, a Q4_K weight of 8 rows and x's int form (`tensors`)."""
    x, w, *int_form = tensors
    return torch.ops.harness.qmatmul(x, w, q4, 8, *int_form)


def _qkv_given_int_form(tensors: list[torch.Tensor], q4: int, q8: int):
    """`harness::qkv` of x, wq, wk, wv and x's int form x_q, x_sums, x_scales (`tensors`)."""
    x, wq, wk, wv, *int_form = tensors
    return torch.ops.harness.qkv(x, wq, wk, wv, q4, q8, q8, *int_form)


def _norm_route(name: str, tensors: list[torch.Tensor]):
    """`harness::<name>` (`add_rms_norm_route` or its int form's) of x, residual, the norm's
    weight and the router's (`tensors`), k 2."""
    x, residual, weight, router_weight = tensors
    return getattr(torch.ops.harness, name)(x, residual, weight, 1e-5, router_weight, 2, 1e-4)


def _moe_ffn_with_residual(tensors, q4: int):
    """`harness::moe_ffn` with its residual given, its tensors (`_moe_ffn_args`) through `tensors`."""
    x, gate, up, down, weights, experts, residual = tensors(*_moe_ffn_args())
    return torch.ops.harness.moe_ffn(x, gate, up, down, weights, experts, q4, q4, residual)


def test_decode_ops_refuse_cpu_tensors_without_the_interpreter():
    from harness.quant import fused, kernels  # noqa: F401  (registers the ops)
    from harness.trace.classify import is_device_error

    if kernels.interpreting():
        pytest.skip("the interpreter runs CPU tensors")
    for name, _, call in _decode_op_calls("cpu"):
        with pytest.raises(RuntimeError) as info:
            call()
        assert is_device_error(str(info.value)) and f"harness::{name}" in str(info.value), name


def test_moe_ffn_checks_its_residual_like_its_other_tensors(monkeypatch):
    """The residual `harness::moe_ffn` adds is one of its tensors: on another device than the
    others it is refused with a device error that names it (under the emulated CUDA, which
    applies CUDA's rule to the op's schema) before anything runs; of another shape or type, the
    op refuses it by name."""
    from harness.quant import fused, kernels  # noqa: F401  (registers the ops)
    from harness.trace.classify import is_device_error
    from harness.trace.emulated import EmulatedCuda

    with EmulatedCuda():
        x, gate, up, down, weights, experts, _ = (t.to("cuda") for t in _moe_ffn_args())
        with pytest.raises(RuntimeError) as info:
            torch.ops.harness.moe_ffn(x, gate, up, down, weights, experts, 12, 12, torch.ones(1, 256))
    assert is_device_error(str(info.value)) and "residual" in str(info.value)
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # the op takes CPU tensors
    for residual in (torch.ones(1, 256, dtype=torch.float64), torch.ones(2, 256), torch.ones(256)):
        with pytest.raises(
            ValueError, match=r"harness::moe_ffn: residual must be float32 of shape \[1, 256\]"
        ):
            torch.ops.harness.moe_ffn(*_moe_ffn_args()[:6], 12, 12, residual)


def test_ops_check_the_int_form_of_x_they_are_given(monkeypatch):
    """qkv, moe_ffn and qmatmul take x's int form (x_q, x_sums, x_scales: NORM_CONFIG's and
    ATTENTION_CONFIG's "int_out") all three or none; one of another dtype or shape is refused by
    name, one on another device with CUDA's device error naming it (under the emulated CUDA,
    which applies CUDA's rule to the op's schema), before anything runs. The norms that make it
    refuse x whose rows are no whole super-blocks, x that is not float32, and a residual of
    another shape; attention_int an output whose rows are no whole super-blocks."""
    from harness.quant import fused, kernels  # noqa: F401  (registers the ops)
    from harness.quant.types import GGMLType
    from harness.trace.classify import is_device_error
    from harness.trace.emulated import EmulatedCuda

    q4, q8 = int(GGMLType.Q4_K), int(GGMLType.Q8_0)
    form = [torch.zeros(1, 256, dtype=torch.int16), torch.zeros(1, 16), torch.zeros(1, 8)]
    wq, wk = torch.zeros(8, 144, dtype=torch.uint8), torch.zeros(4, 272, dtype=torch.uint8)
    calls = {
        "harness::qkv": lambda *f: _qkv_given_int_form([torch.ones(1, 256), wq, wk, wk.clone(), *f], q4, q8),
        "harness::moe_ffn": lambda *f: torch.ops.harness.moe_ffn(*_moe_ffn_args()[:6], q4, q4, None, *f),
        "harness::qmatmul": lambda *f: _qmatmul_given_int_form([torch.ones(1, 256), wq, *f], q4),
    }
    names = ("x_q", "x_sums", "x_scales")
    with EmulatedCuda():  # (CUDA's device rule applied to the op's schema, as the tracer records it)
        on_gpu = [t.to("cuda") for t in form]
        for i, name in enumerate(names):
            for call in (
                lambda *f: _qkv_given_int_form(
                    [t.to("cuda") for t in (torch.ones(1, 256), wq, wk, wk)] + [*f], q4, q8
                ),
                lambda *f: torch.ops.harness.moe_ffn(
                    *(t.to("cuda") for t in _moe_ffn_args()[:6]), q4, q4, None, *f
                ),
                lambda *f: _qmatmul_given_int_form([torch.ones(1, 256).cuda(), wq.cuda(), *f], q4),
            ):
                with pytest.raises(RuntimeError) as info:
                    call(*on_gpu[:i], form[i], *on_gpu[i + 1 :])
                assert is_device_error(str(info.value)) and name in str(info.value), str(info.value)
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # the ops take CPU tensors
    for op, call in calls.items():
        for i, name in enumerate(names):
            for bad in (form[i].to(torch.float64), form[i][:, :-1], torch.cat([form[i]] * 2)):
                given = [*form[:i], bad, *form[i + 1 :]]
                with pytest.raises(ValueError, match=rf"{op}: {name} must be torch\.\w+ of shape \["):
                    call(*given)
            with pytest.raises(
                ValueError, match=rf"{op}: x_q, x_sums and x_scales are given together, got no {name}"
            ):
                call(*form[:i], None, *form[i + 1 :])
    with pytest.raises(
        ValueError, match=r"harness::rms_norm_int: x must be float32 of rows of a multiple of 256"
    ):
        torch.ops.harness.rms_norm_int(torch.ones(1, 128), torch.ones(128), 1e-5)
    with pytest.raises(ValueError, match=r"harness::rms_norm_int: x must be float32"):
        torch.ops.harness.rms_norm_int(torch.ones(1, 256, dtype=torch.float64), torch.ones(256), 1e-5)
    with pytest.raises(ValueError, match=r"harness::add_rms_norm_int: residual must be float32 of x's shape"):
        torch.ops.harness.add_rms_norm_int(torch.ones(2, 256), torch.ones(256), torch.ones(256), 1e-5)
    cache = torch.zeros(1, 6, 32)  # (4 heads of 32: rows of 128)
    with pytest.raises(
        ValueError,
        match=r"harness::attention_int: the output's rows \(H\*Hd = 128\) must be a multiple of 256",
    ):
        torch.ops.harness.attention_int(
            torch.ones(1, 128 + 64), cache, cache.clone(), *[torch.ones(6, 16)] * 2, None, 0
        )


def _moe_ffn_args() -> list[torch.Tensor]:
    """x, gate, up, down, weights, experts and residual of one token over 2 of 4 zero Q4_K experts."""
    stack = torch.zeros(4, 256, 144, dtype=torch.uint8)  # [E, 256 rows, one Q4_K block a row]
    return [
        torch.ones(1, 256), stack, stack.clone(), stack.clone(), torch.ones(1, 2), torch.tensor([[0, 1]]),
        torch.ones(1, 256),
    ]  # fmt: skip


def test_fake_implementations_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from harness.quant import fused  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        x = torch.empty(5, 512)
        out = torch.ops.harness.qmatmul(x, torch.empty(7, 288, dtype=torch.uint8), 12, 7)
        assert out.shape == (5, 7) and out.dtype == torch.float32
        y = torch.ops.harness.moe_ffn(
            x,
            torch.empty(4, 64, 288, dtype=torch.uint8),
            torch.empty(4, 64, 288, dtype=torch.uint8),
            torch.empty(4, 512, 36, dtype=torch.uint8),
            torch.empty(5, 2),
            torch.empty(5, 2, dtype=torch.int64),
            12,
            12,
        )
        assert y.shape == (5, 512)
        with_residual = torch.ops.harness.moe_ffn(
            x, *[torch.empty(4, 64, 288, dtype=torch.uint8)] * 2, torch.empty(4, 512, 36, dtype=torch.uint8),
            torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int64), 12, 12, torch.empty(5, 512),
        )  # fmt: skip
        assert with_residual.shape == (5, 512) and with_residual.dtype == torch.float32
        qkv = torch.ops.harness.qkv(
            x,
            torch.empty(64, 288, dtype=torch.uint8),
            *[torch.empty(16, 544, dtype=torch.uint8)] * 2,
            12,
            8,
            8,
        )
        assert qkv.shape == (5, 64 + 16 + 16) and qkv.dtype == torch.float32
        cache = torch.empty(2, 32, 8)
        out = torch.ops.harness.attention(
            qkv, cache, torch.empty_like(cache), torch.empty(32, 4), torch.empty(32, 4), None, 3
        )
        assert out.shape == (5, 64) and out.dtype == torch.float32
        wide_cache = torch.empty(2, 32, 64)  # (x as qkv: 4 heads of 64, 2 KV heads)
        out, *form = torch.ops.harness.attention_int(
            x, wide_cache, torch.empty_like(wide_cache), torch.empty(32, 32), torch.empty(32, 32), None, 3
        )
        assert (out.shape, out.dtype) == ((5, 256), torch.float32)
        assert [(t.shape, t.dtype) for t in form] == [
            ((5, 256), torch.int16), ((5, 16), torch.float32), ((5, 8), torch.float32)
        ]  # fmt: skip
        given = torch.ops.harness.qmatmul(out, torch.empty(7, 144, dtype=torch.uint8), 12, 7, *form)
        assert given.shape == (5, 7) and given.dtype == torch.float32
        total, normed = torch.ops.harness.add_rms_norm(x, x, torch.empty(512), 1e-5)
        assert total.shape == normed.shape == (5, 512)
        normed, *form = torch.ops.harness.rms_norm_int(x, torch.empty(512), 1e-5)
        total, normed_too, *form_too = torch.ops.harness.add_rms_norm_int(x, x, torch.empty(512), 1e-5)
        assert total.shape == normed.shape == normed_too.shape == (5, 512)
        for got in (form, form_too):
            assert [(t.shape, t.dtype) for t in got] == [
                ((5, 512), torch.int16), ((5, 32), torch.float32), ((5, 16), torch.float32)
            ]  # fmt: skip
        given = torch.ops.harness.qkv(
            x, torch.empty(64, 288, dtype=torch.uint8), *[torch.empty(16, 544, dtype=torch.uint8)] * 2, 12, 8, 8,
            *form,
        )  # fmt: skip
        assert given.shape == (5, 96) and given.dtype == torch.float32
        given = torch.ops.harness.moe_ffn(
            x, *[torch.empty(4, 64, 288, dtype=torch.uint8)] * 2, torch.empty(4, 512, 36, dtype=torch.uint8),
            torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int64), 12, 12, None, *form,
        )  # fmt: skip
        assert given.shape == (5, 512) and given.dtype == torch.float32
        for args in ((torch.empty(5, 8), None), (x, torch.empty(8, 512))):
            w, e = torch.ops.harness.router_topk(*args, 2, 1e-4)
            assert (w.shape, w.dtype, e.shape, e.dtype) == ((5, 2), torch.float32, (5, 2), torch.int64)
        rows = torch.ops.harness.embed_rows(
            torch.empty(50, 144, dtype=torch.uint8), torch.empty(3, dtype=torch.int64), 12, 256
        )
        assert rows.shape == (3, 256)


@pytest.mark.parametrize(
    "tokens, used, n_experts, block",
    [(1, 2, 8, 64), (17, 2, 4, 16), (512, 2, 8, 64), (300, 8, 128, 64)],
)
def test_pairs_sorted_by_expert_fill_padded_blocks_in_their_order(tokens, used, n_experts, block):
    """The prefill's grouping of token-expert pairs: every pair once, in its expert's blocks
    (experts in order, each group padded with the id n_pairs to whole blocks), the pairs of one
    expert in their own order; each block names its expert, -1 for the blocks past the last."""
    from harness.quant import fused

    gen = torch.Generator().manual_seed(tokens)
    routings = [torch.stack([torch.randperm(n_experts, generator=gen)[:used] for _ in range(tokens)])]
    routings.append(torch.tensor([[0, n_experts - 1]] * tokens).view(tokens, 2))  # two experts take all
    for experts in routings:
        flat = experts.reshape(-1)
        n_pairs = flat.numel()
        sorted_ids, block_expert = fused._sort_by_expert(experts, n_experts, block)
        assert sorted_ids.numel() == block_expert.numel() * block
        assert block_expert.dtype == torch.int32
        expected_ids, expected_blocks = [], []
        for e in range(n_experts):
            mine = [p for p in range(n_pairs) if flat[p] == e]
            n_blocks = -(-len(mine) // block)
            expected_ids += mine + [n_pairs] * (n_blocks * block - len(mine))
            expected_blocks += [e] * n_blocks
        expected_blocks += [-1] * (block_expert.numel() - len(expected_blocks))
        expected_ids += [n_pairs] * (sorted_ids.numel() - len(expected_ids))
        assert sorted_ids.tolist() == expected_ids
        assert block_expert.tolist() == expected_blocks


def test_router_takes_the_kernel_only_for_the_calls_it_covers(monkeypatch):
    """`router_takes_kernel`: decode-sized calls with the router's contiguous float32 weight and
    up to ROUTER_MAX_EXPERTS experts, where the fused kernels run; not on the plain CPU, not
    under `fused.disabled()` (HARNESS_FUSED=0)."""
    from harness.quant import fused, kernels

    x, w = torch.zeros(1, 64), torch.zeros(8, 64)
    if not kernels.interpreting():
        assert not fused.router_takes_kernel(x, w, 2)  # the CPU without the interpreter
    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # runs_on: the CPU takes kernels
    assert fused.router_takes_kernel(x, w, 2)
    with fused.disabled():
        assert not fused.router_takes_kernel(x, w, 2)
    assert fused.router_takes_kernel(torch.zeros(fused.MATVEC_MAX_ROWS, 64), w, 8)
    assert fused.router_takes_kernel(x, torch.zeros(fused.ROUTER_MAX_EXPERTS, 64), 8)
    assert fused.router_takes_kernel(x, torch.zeros(3, 64), 3)
    for args in (
        (x, None, 2),  # a quantized router's logits
        (torch.zeros(fused.MATVEC_MAX_ROWS + 1, 64), w, 2),  # prefill
        (torch.zeros(0, 64), w, 2),
        (x, torch.zeros(fused.ROUTER_MAX_EXPERTS + 1, 64), 2),
        (x, w, 9),
        (x, w, 0),
        (x.double(), w.double(), 2),
        (x.half(), w, 2),
        (torch.zeros(1, 128)[:, ::2], w, 2),  # not contiguous
        (x, torch.zeros(8, 32), 2),  # rows of another length: the torch path raises torch's error
        (x[0], w, 2),
    ):
        assert not fused.router_takes_kernel(*args), args


def test_norm_takes_the_router_only_where_the_router_kernel_runs_on_one_device(monkeypatch):
    """`norm_route_takes_kernel`: where `router_takes_kernel` says yes and the norm's residual
    (float32 of x's shape) and weight (float32 [D]) go with it, all contiguous and on x's device;
    a router weight or norm weight elsewhere (here the meta device) leaves the two ops, which
    refuse it with their device errors. `norm_routes` adds NORM_CONFIG "router"."""
    from harness.quant import fused, kernels

    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # runs_on: the CPU takes kernels
    x, r, w, rw = torch.zeros(1, 64), torch.zeros(1, 64), torch.zeros(64), torch.zeros(8, 64)
    assert fused.norm_route_takes_kernel(x, r, w, rw, 2)
    assert fused.norm_route_takes_kernel(torch.zeros(8, 64), torch.zeros(8, 64), w, rw, 8)
    monkeypatch.setitem(fused.NORM_CONFIG, "router", False)
    assert not fused.norm_routes(x, r, w, rw, 2)
    monkeypatch.setitem(fused.NORM_CONFIG, "router", True)
    assert fused.norm_routes(x, r, w, rw, 2)
    with fused.disabled():
        assert not fused.norm_routes(x, r, w, rw, 2)
    for args in (
        (x, r, w, None, 2),  # a quantized router's logits
        (x, r, w, rw.to("meta"), 2),  # the router's weight on another device
        (x, r, w.to("meta"), rw, 2),
        (x, r.to("meta"), w, rw, 2),
        (torch.zeros(9, 64), torch.zeros(9, 64), w, rw, 2),  # prefill
        (x, r, w, torch.zeros(fused.ROUTER_MAX_EXPERTS + 1, 64), 2),
        (x, r, w, rw.half(), 2),
        (x, r, w, rw, 9),
        (x, r.double(), w, rw, 2),
        (x, r, w.double(), rw, 2),
        (x, torch.zeros(1, 128)[:, ::2], w, rw, 2),  # not contiguous
        (x, r, torch.zeros(128)[::2], rw, 2),
        (x, torch.zeros(2, 64), w, rw, 2),  # broadcast: add_rms_norm adds with torch
        (x, r, torch.zeros(32), rw, 2),
    ):
        assert not fused.norm_route_takes_kernel(*args), args
        assert not fused.norm_routes(*args), args


def test_matvec_plans_are_kept_and_follow_a_setting_changed_in_place(monkeypatch):
    """A decode product's plan is made once per shape and path (`fused._PLANS`), and made again
    when a sweep changes its launch setting in place (as benchmarks/sweep_matvec.py does)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    monkeypatch.setattr(fused, "matvec_path", "int")
    cfg = fused.INT_MATVEC_CONFIG[GGMLType.Q4_K]
    shape = (int(GGMLType.Q4_K), 4096, 4096, 1, 1, False, False, False, torch.device("cpu"))
    plan = fused._matvec_plan(*shape)
    assert fused._matvec_plan(*shape) is plan and plan.options["BN"] == cfg["BN"]
    monkeypatch.setitem(cfg, "BN", cfg["BN"] // 2)
    again = fused._matvec_plan(*shape)
    assert again.options["BN"] == cfg["BN"] and again.grid[0] == 2 * plan.grid[0]
    monkeypatch.setattr(fused, "matvec_path", "vec")
    assert not fused._matvec_plan(*shape).int_read


def test_matvec_launches_its_kernel_bound_to_the_plan_and_the_call_s_variant(monkeypatch):
    """`_matvec` launches `_matvec_kernel` bound (`launch.bind`) to its plan's options and to
    the call's residual, int_out and PDL keywords, one bound kernel a variant, kept in the plan:
    a call of another variant never gets another's keywords."""
    from harness.quant import fused
    from harness.quant import launch as launch_module
    from harness.quant.types import GGMLType

    launched = []

    def noted(kernel, grid, *args, **kwargs):
        if isinstance(kernel, launch_module.Bound) and kernel.kernel is fused._matvec_kernel:
            launched.append(kernel)  # (not `_int_x`'s launch, bound too)

    monkeypatch.setattr(fused, "launch", noted)  # (nothing runs: the arguments are noted)
    monkeypatch.setattr(fused, "matvec_path", "int")
    monkeypatch.setattr(fused, "int_x_path", "launch")
    code, d, n = int(GGMLType.Q4_K), 256, 64
    x, w = torch.randn(1, d), torch.zeros(n, d // 256 * 144, dtype=torch.uint8)
    residual = torch.zeros(1, n)
    for use_residual, use_pdl in (
        (False, False),
        (True, False),
        (False, True),
        (False, False),
        (True, False),
    ):
        monkeypatch.setattr(
            fused, "pdl_options", lambda device, on=use_pdl: fused._PDL_ON if on else fused._PDL_OFF
        )
        fused._product(x, w, None, code, n, None, 1, None, residual=residual if use_residual else None)
        kwargs = launched[-1].kwargs
        assert kwargs["RESIDUAL"] is use_residual and kwargs.get("PDL", False) is use_pdl
        assert ("launch_pdl" in kwargs) is use_pdl and kwargs["INT_OUT"] is False
        plan = fused._matvec_plan(code, d, n, 1, 1, False, False, False, x.device)
        assert {k: kwargs[k] for k in plan.options} == plan.options
    assert len({id(b) for b in launched}) == 3 and launched[3] is launched[0] and launched[4] is launched[1]


def test_attention_and_norm_route_launch_their_kernels_bound_once_a_set_of_keywords(monkeypatch):
    """`_attention_kernels` and `_norm_route_call` launch their kernels bound (`launch.bind`) to
    the launch's keywords, one bound kernel for each distinct set: the same call again takes the
    same one, a call of more splits, of the int form or after a change of ATTENTION_CONFIG or
    ROUTER_CONFIG another, with the new values (no keyword passed at the launch itself)."""
    from harness.quant import fused
    from harness.quant import launch as launch_module

    launched = []

    def noted(kernel, grid, *args, **kwargs):
        assert isinstance(kernel, launch_module.Bound) and not kwargs
        launched.append(kernel)

    monkeypatch.setattr(fused, "launch", noted)  # (nothing runs: the kernels are noted)
    monkeypatch.setattr(fused, "_programs_wanted", lambda device, per_sm=4: 4)
    monkeypatch.setattr(fused, "ATTENTION_CONFIG", dict(fused.ATTENTION_CONFIG))
    monkeypatch.setattr(fused, "ROUTER_CONFIG", dict(fused.ROUTER_CONFIG))
    monkeypatch.setattr(fused, "_ATTENTION_KERNELS", {})
    monkeypatch.setattr(fused, "_NORM_ROUTE_KERNELS", {})
    n_kv, s_max, hd = 2, 64, 16
    qkv = torch.randn(1, (4 + 2 * n_kv) * hd)
    cache_k, cache_v = torch.zeros(n_kv, s_max, hd), torch.zeros(n_kv, s_max, hd)
    cos, sin = torch.ones(s_max, hd // 2), torch.zeros(s_max, hd // 2)

    def attend(start: int) -> launch_module.Bound:
        fused._attention_kernels(qkv, cache_k, cache_v, cos, sin, None, start)
        return launched[-1]

    one = attend(5)  # 6 keys: one split; 64 keys: two of 32 (split_min_keys)
    assert one.kernel is fused._attention_kernel and one.kwargs["SPLIT"] is False
    assert attend(6) is one
    split = attend(63)
    assert split is not one and split.kwargs["SPLIT"] is True and split.kwargs["MERGE"] is True
    fused.ATTENTION_CONFIG["num_warps"] = 8
    assert attend(5) is not one and launched[-1].kwargs["num_warps"] == 8

    x, weight, router = torch.randn(1, 256), torch.ones(256), torch.randn(8, 256)

    def route(int_out: bool) -> launch_module.Bound:
        fused._norm_route_call(x, x, weight, 1e-5, router, 2, 1e-6, int_out)
        return launched[-1]

    plain = route(False)
    assert plain.kernel is fused._norm_route_kernel and plain.kwargs["INT_OUT"] is False
    assert route(False) is plain
    assert route(True) is not plain and launched[-1].kwargs["INT_OUT"] is True
    fused.ROUTER_CONFIG["num_stages"] = 3
    assert route(False) is not plain and launched[-1].kwargs["num_stages"] == 3


def test_matvec_splits_follow_the_setting_key_of_the_product_kind(monkeypatch):
    """A product of one weight splits its super-blocks by the setting's "dense_programs_per_sm",
    a routed one by "programs_per_sm", a gated one by "gated_programs_per_sm"
    (`fused.split_setting`), on a device of 132 multiprocessors (an H100's)."""
    from harness.quant import fused
    from harness.quant.types import GGMLType

    monkeypatch.setattr(fused, "matvec_path", "int")
    monkeypatch.setattr(fused, "_programs_wanted", lambda device, per_sm=4: 132 * per_sm)
    monkeypatch.setattr(fused, "_PLANS", {})
    cfg = fused.INT_MATVEC_CONFIG[GGMLType.Q4_K]
    for key, value in (
        ("BN", 128),
        ("dense_programs_per_sm", 1),
        ("programs_per_sm", 8),
        ("gated_programs_per_sm", 2),
    ):
        monkeypatch.setitem(cfg, key, value)
    q4, cpu = int(GGMLType.Q4_K), torch.device("cpu")

    def splits(gated: bool, routed: bool) -> int:  # 4096 x 4096: 32 row tiles, 16 super-blocks
        return fused._matvec_plan(q4, 4096, 4096, 1, 1, gated, False, routed, cpu).grid[2]

    assert splits(False, False) == 4  # 132 wanted: 5 splits, 4 super-blocks each: 4
    assert splits(False, True) == 16  # 1056 wanted: one super-block a program
    assert splits(True, True) == 8  # 264 wanted: 9 splits, 2 super-blocks each: 8
    del cfg["dense_programs_per_sm"]  # (monkeypatch restores it)
    assert splits(False, False) == 16  # "programs_per_sm" stands in


def test_split_counters_grow_and_keep_the_buffers_a_graph_may_hold():
    """The split sums' counters: zeroed int32, one buffer while it is large enough; a larger
    need makes a larger one and keeps the older (a captured CUDA graph may point at it)."""
    from harness.quant import fused

    device = torch.device("cpu")
    first = fused._split_counters(device, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and not first.any()
    assert fused._split_counters(device, first.numel()) is first
    bigger = fused._split_counters(device, first.numel() + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    older, newest = fused._COUNTERS[device][-2:]
    assert older is first and newest is bigger


def test_pack_rows_puts_runs_of_one_type_in_one_buffer():
    from harness.quant import fused
    from harness.quant.types import GGMLType

    raws = [torch.randint(0, 256, (r, 144), dtype=torch.uint8) for r in (8, 4, 4)]
    for types, joined in (
        ((GGMLType.Q4_K,) * 3, [(0, 1), (1, 2)]),
        ((GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q4_K), [(1, 2)]),
        ((GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q4_K), []),
    ):
        packed = fused.pack_rows(raws, list(types))
        assert all(torch.equal(p, r) for p, r in zip(packed, raws, strict=True))
        follows = [
            (i, i + 1)
            for i in range(2)
            if packed[i].untyped_storage().data_ptr() == packed[i + 1].untyped_storage().data_ptr()
            and packed[i + 1].storage_offset() == packed[i].storage_offset() + packed[i].numel()
        ]
        assert follows == joined, types


def test_supports_is_false_for_types_and_rows_without_kernels():
    from harness.quant import fused
    from harness.quant.types import GGMLType

    dev = torch.device("cuda")
    assert not fused.supports(GGMLType.IQ4_NL, dev, 4096)
    assert not fused.supports(GGMLType.Q8_0, dev, 4096 + 32)  # rows must be whole 256-value spans
    with fused.disabled():
        assert not fused.supports(GGMLType.Q4_K, dev, 4096)


def test_supports_all_is_supports_of_each_weight_with_runs_on_asked_once_per_device(monkeypatch):
    from harness.quant import fused
    from harness.quant.types import GGMLType as G

    asked = []
    monkeypatch.setattr(fused, "runs_on", lambda device: asked.append(str(device)) or device.type == "cuda")
    a, b, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    cases = [
        [(G.Q4_K, a, 4096), (G.Q4_K, a, 4096), (G.Q6_K, a, 4096)],
        [(G.Q4_K, a, 4096), (G.Q6_K, b, 4096)],
        [(G.Q4_K, a, 4096), (G.Q4_K, cpu, 4096)],
        [(G.Q4_K, a, 4096), (G.IQ4_NL, a, 4096)],
        [(G.Q4_K, a, 4096 + 32)],
        [],
    ]
    for weights in cases:
        asked.clear()
        assert fused.supports_all(weights) == all(fused.supports(*w) for w in weights)
    asked.clear()
    assert fused.supports_all(cases[0]) and asked == ["cuda:0"]  # one device: asked once
    asked.clear()
    assert not fused.supports_all(cases[2]) and asked == ["cuda:0", "cpu"]


# ---- GPU -------------------------------------------------------------------------------------


@pytest.mark.cuda(real=True)
def test_cuda_kernels_match_dequantize_then_matmul():
    from harness.quant import fused  # noqa: F401

    results = run_cases("cuda", small=False)
    assert len(results) == expected_case_count(small=False)
    bad = [r for r in results if not r["nmse"] <= NMSE_MAX or r.get("exact") is False]
    assert not bad, bad
    _check_attention(results)
    _check_split_sums(results)


@pytest.mark.cuda(real=True)
def test_cuda_attention_in_one_launch_matches_torch_and_two_launches():
    """The one-launch attention on the GPU: `_check_attention_merge` (the two forms' merges add
    the splits in different orders there: within ATTENTION_MAX_ABS, not the same bits)."""
    from harness.quant import fused  # noqa: F401

    _check_attention_merge(_attention_merge_cases("cuda", np.random.default_rng()), interpreted=False)


@pytest.mark.cuda(real=True)
def test_cuda_int_reads_match_dequantize_then_matmul():
    """`matvec_path` "int" on the GPU (PTX dp2a) at Mixtral-sized rows: `_int_read_cases`."""
    from harness.quant import fused  # noqa: F401

    _check_int_reads(_int_read_cases("cuda", False, np.random.default_rng()), small=False)


@pytest.mark.cuda(real=True)
def test_cuda_gated_splits_match_the_unsplit_product_and_float64():
    """Gated decode products split into 2 and 3 programs a row on the GPU at 8x7B's gate/up
    shape (2 pairs of 14336 x 4096 Q4_K, each of Q4_K's reads): `_gated_split_cases`."""
    _check_gated_splits(_gated_split_cases("cuda", False, np.random.default_rng()), small=False)


@pytest.mark.cuda(real=True)
def test_cuda_moe_ffn_fusions_match_the_unfused_launches_bit_for_bit():
    _check_moe_fusions(_moe_fusion_cases("cuda", False, np.random.default_rng(17)), small=False)


@pytest.mark.cuda(real=True)
def test_cuda_norm_int_form_is_int_x_of_its_output_and_the_ops_take_it():
    """The norms' `_int_x` form on the GPU (the compiler's layouts, mul.rn, PTX dp2a) at Mixtral's
    rows: `_norm_int_cases`, every one the same bits."""
    from harness.quant import fused  # noqa: F401

    _check_norm_int(_norm_int_cases("cuda", False, np.random.default_rng(23)), small=False)


@pytest.mark.cuda(real=True)
def test_cuda_norm_with_router_gives_the_two_ops_bits_from_one_launch():
    """The norm with the router (NORM_CONFIG "router") on the GPU (the compiler's layouts: the
    fused launch has the norm's warps, the router's has ROUTER_CONFIG's; CUDA's expf, PDL) at
    Mixtral's shapes: `_norm_route_cases`, every output the two ops' bits, one launch."""
    from harness.quant import fused  # noqa: F401

    _check_norm_route(_norm_route_cases("cuda", False, np.random.default_rng(29)), small=False)


@pytest.mark.cuda(real=True)
def test_cuda_attention_int_form_is_int_x_of_its_output_and_qmatmul_takes_it():
    """Attention's `_int_x` form on the GPU (the compiler's layouts and divisions, PTX dp2a) at
    Mixtral's heads (32 of 128, 8 KV heads) and others: `_attention_int_cases`, every one the
    same bits."""
    from harness.quant import fused  # noqa: F401

    _check_attention_int(_attention_int_cases("cuda", False, np.random.default_rng(29)), small=False)


@pytest.mark.cuda(real=True)
def test_cuda_grouped_prefill_matches_dequantize_then_matmul():
    """The grouped prefill products on the GPU (rows of 1024 values): `_grouped_cases`."""
    _check_grouped(_grouped_cases("cuda", False, np.random.default_rng()))


@pytest.mark.cuda(real=True)
def test_cuda_qkv_in_one_launch_matches_a_launch_a_run_bit_for_bit():
    """`harness::qkv` with QKV_CONFIG "one_launch" on the GPU (PTX dp2a, the compiler's layouts,
    programs of both runs at once: their partials and arrival counters apart) at Mixtral's shapes:
    `_qkv_one_launch_cases`, every one the same bits as a launch a run, one
    `_matvec_two_runs_kernel` launch for two `_matvec_kernel` ones."""
    from harness.quant import fused  # noqa: F401

    _check_qkv_one_launch(_qkv_one_launch_cases("cuda", False, np.random.default_rng()), small=False)


@pytest.mark.cuda(real=True)
def test_cuda_int_x_in_kernel_matches_the_launch_bit_for_bit():
    """`int_x_path` "kernel" against "launch" on the GPU (PTX dp2a, the compiler's own layouts)
    at Mixtral-sized rows: `_int_x_path_cases`, every one the same bits."""
    from harness.quant import fused  # noqa: F401

    _check_int_x_paths(_int_x_path_cases("cuda", False, np.random.default_rng()))


@pytest.mark.cuda(real=True)
def test_cuda_int_prefetch_matches_the_plain_loop_bit_for_bit():
    """INT_MATVEC_CONFIG "prefetch" on the GPU (PTX dp2a, the compiler's own layouts) at
    Mixtral-sized rows: `_prefetch_cases`, every one the same bits as without it."""
    _check_prefetch(_prefetch_cases("cuda", False, np.random.default_rng()))


@pytest.mark.cuda(real=True)
def test_cuda_router_topk_kernel_matches_the_torch_path():
    """`harness::router_topk`'s kernel against the op's torch path on the GPU at Mixtral's
    shapes (`_check_router`: tied rows too, where torch.topk on CUDA chooses the same experts)."""
    from harness.quant import fused  # noqa: F401

    results = _router_cases("cuda", ROUTER_SHAPES_FULL, np.random.default_rng())
    _check_router(results, "cuda", len(ROUTER_SHAPES_FULL) * len(ROUTER_ROWS))
    _check_router_splits(_router_split_cases("cuda", np.random.default_rng()), "cuda")


@pytest.mark.cuda(real=True)
def test_cuda_module_built_on_the_cpu_and_moved_is_prepared_for_the_kernels():
    """QMatMul built on the CPU, then `.to("cuda")`: repacked and range-checked as if loaded
    there, its products agree with the torch path; back on the CPU, the GGUF bytes are intact."""
    from harness.quant import fused
    from harness.quant.qmatmul import QMatMul
    from harness.quant.qtensor import QTensor
    from harness.quant.types import GGMLType

    rng = np.random.default_rng(9)
    q6 = GGMLType.Q6_K
    raw, huge = _random_weight(q6, 37, 2048, rng), _extreme_weight(q6, 37, 2048, rng)
    for weight, code in ((raw, int(q6) | fused.PACKED), (huge, int(q6) | fused.PACKED | fused.WIDE)):
        m = QMatMul(QTensor(weight, q6, (37, 2048), "w"))
        m.to("cuda")
        assert m.kernel_qtype == code
        ref = _dequant(weight, q6, 37, 2048)
        for tokens in (1, 17):
            x = torch.randn(tokens, 2048, device="cuda")
            assert _nmse(m(x), x.double().cpu() @ ref.T) <= NMSE_MAX
        m.cpu()
        assert torch.equal(m.qweight, weight) and m.kernel_qtype == int(q6)


@pytest.mark.cuda(real=True)
def test_cuda_op_refuses_a_cpu_weight_with_a_device_error():
    from harness.quant import fused  # noqa: F401
    from harness.trace.classify import is_device_error

    with pytest.raises(RuntimeError) as info:
        torch.ops.harness.qmatmul(
            torch.ones(1, 256, device="cuda"), torch.zeros(4, 144, dtype=torch.uint8), 12, 4
        )
    assert is_device_error(str(info.value)) and "cpu" in str(info.value)


@pytest.mark.cuda(real=True)
def test_cuda_decode_ops_refuse_a_cpu_tensor_with_a_device_error():
    from harness.quant import fused  # noqa: F401
    from harness.trace.classify import is_device_error

    for cpu_arg in range(8):  # each tensor argument of each op in turn
        for name, n_tensors, call in _decode_op_calls("cuda", cpu_arg):
            if cpu_arg >= n_tensors:
                continue
            with pytest.raises(RuntimeError) as info:
                call()
            assert is_device_error(str(info.value)) and "cpu" in str(info.value), (name, cpu_arg)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from harness.quant import fused  # noqa: F401

    if sys.argv[1] == "ROUTER":  # only harness::router_topk's cases, small shapes
        print(
            json.dumps(
                _router_cases(sys.argv[2], ROUTER_SHAPES_SMALL, np.random.default_rng(int(sys.argv[3])))
            )
        )
    elif sys.argv[1] == "ROUTER_SPLITS":  # harness::router_topk's kernel under several split settings
        print(json.dumps(_router_split_cases(sys.argv[2], np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "INTX":  # only the "int" reads' x paths compared, small shapes
        print(json.dumps(_int_x_path_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "PREFETCH":  # only the Q4_K/Q5_K int reads' prefetch against none, small shapes
        print(json.dumps(_prefetch_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "INT":  # only the "int" reads' cases, small shapes
        print(json.dumps(_int_read_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "FUSIONS":  # only moe_ffn's decode fusions against their absence, small shapes
        print(json.dumps(_moe_fusion_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "QKV":  # only harness::qkv in one launch against a launch a run, small shapes
        print(json.dumps(_qkv_one_launch_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "NORM_ROUTE":  # only the norm with the router against the two ops, small shapes
        print(json.dumps(_norm_route_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "NORM_INT":  # only the norms' int form and the ops given it, small shapes
        print(json.dumps(_norm_int_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "ATTENTION_INT":  # only attention's int form and qmatmul given it, small shapes
        print(json.dumps(_attention_int_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "GATED":  # only the gated products split over their super-blocks, small shapes
        print(json.dumps(_gated_split_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "ATTENTION_MERGE":  # only the one-launch attention against two launches
        print(json.dumps(_attention_merge_cases(sys.argv[2], np.random.default_rng(int(sys.argv[3])))))
    elif sys.argv[1] == "GROUPED":  # only the grouped prefill products' cases, small shapes
        print(json.dumps(_grouped_cases(sys.argv[2], True, np.random.default_rng(int(sys.argv[3])))))
    else:
        print(json.dumps(run_cases(sys.argv[2], small=sys.argv[1] == "SMALL")))
