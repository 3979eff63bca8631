"""Speed of the fused quantized ops (harness.quant.fused) on Mixtral-8x7B shapes, against a
device-to-device copy measured in the same run. Writes JSON; asserts nothing.

    python benchmarks/bench_fused.py --out benchmarks/results/fused.json

Rows: `harness::qmatmul` at 1 token (matrix-vector) and 512 tokens (prefill) per type, and
`harness::moe_ffn` for one layer (8 experts, 2 used) at 1 and 512 tokens. Where the fused module
has two ways to compute a row (the matrix-vector kernel's Q4_K and Q5_K reads,
`fused.MATVEC_PATHS`; the prefill paths, `fused.PREFILL_PATHS`; the first of each is the
default), both run in this one process and `comparisons` gives old_ms / new_ms and the NMSE of
the new output against the old.
A weight the kernels read repacked (`fused.packs`: Q6_K, Q8_0) is also timed in GGUF's own
layout, the old read ("packed" new, "gguf" old), with the default kernel choices.
For a memory-bound row, `fraction_of_copy` is the weight bytes it reads over the time, divided
by the copy rate.

`--moe-only` times only the `harness::moe_ffn` rows (with `--sweep-grouped`, the grouped
GEMM's settings too):

    python benchmarks/bench_fused.py --moe-only --sweep-grouped --out benchmarks/results/moe.json

`--moe-fusions` adds the decode's moe_ffn (with its residual) with `fused.MOE_FFN_CONFIG`'s
fusions on ("fused", new) and off ("unfused", old), Q4_K and packed Q6_K downs, 1 and 4 tokens:

    python benchmarks/bench_fused.py --moe-only --default-only --moe-fusions --out benchmarks/results/moe_fusions.json

`harness::attention` at decode shapes (Mixtral's 32 heads, 8 KV heads, head dim 128; 1 and 8
tokens; at device positions over 640- and 4096-position caches as the decode graph calls it,
and in the start form): its Triton kernels ("triton", new) against their form with the rope in
a launch of its own ("triton rope launch", old) and against the torch path ("torch", old), and
at device positions `harness::attention_int` ("triton int_out", new: ATTENTION_CONFIG "int_out",
the output's `_int_x` form stored by the attention launch) against attention and an `_int_x`
launch after it ("triton, then _int_x", old: what the decode graph runs without it), timed in a
CUDA graph like the rest, and also eager (`eager_ms`, host launch costs included, as
a traced decode runs); its bytes are the cache it must read.
They come last; `--attention-only` times only these (`--sweep-attention` adds the kernels'
launch settings):

    python benchmarks/bench_fused.py --attention-only --sweep-attention --out benchmarks/results/attention.json

`harness::router_topk` with Mixtral's float32 router (8 experts, 2 used, 4096 columns) at 1 and
8 tokens: its Triton kernel ("triton", new) against the torch path ("torch", old: the op under
`fused.disabled()`), in a CUDA graph and eagerly, as attention; its bytes are the router's
weight. Before attention in the default run; `--router-only` times only these
(`--sweep-router` adds the kernel's launch settings, ROUTER_SWEEP, the one-program kernel
among them). A "weight from DRAM" row times calls on weights in turn (more than twice the L2
cache in all), as a decode step's routers read theirs; the others time one weight over and
over, from L2:

    python benchmarks/bench_fused.py --router-only --sweep-router --out benchmarks/results/router.json

`harness::qkv` at Mixtral's attention shapes (q Q4_K 4096 x 4096; k and v Q8_0, or Q6_K, 1024 x
4096 each, packed into one buffer as the model does) at 1, 4 and 8 tokens, x plain and given
in `_int_x`'s form (as NORM_CONFIG "int_out" hands it over): QKV_CONFIG "one_launch" on ("one
launch", new: `_matvec_two_runs_kernel`) against off ("a launch a run", old), in a CUDA graph
and eagerly, the weights in turn from DRAM (copies of them past twice the L2 cache, as a decode
step reads each layer's); its bytes are the weights'. After moe_ffn in the default run;
`--qkv-only` times only these (`--sweep-qkv` adds how far q's and k+v's products split,
QKV_SWEEP_PER_SM, both ways):

    python benchmarks/bench_fused.py --qkv-only --sweep-qkv --out benchmarks/results/qkv_one_launch.json

The post-attention norm with the router after it (NORM_CONFIG "router") at ROUTER_CALLS' shapes,
with and without the norm's int form: `harness::add_rms_norm_route` ("one launch", new) against
`add_rms_norm` then `router_topk` ("two launches", old: what the model calls with the switch
off), in a CUDA graph and eagerly, the comparison saying whether every output has the same bits,
and both with the router's weight from DRAM. After the router's rows in the default run;
`--norm-route-only` times only these:

    python benchmarks/bench_fused.py --norm-route-only --out benchmarks/results/norm_route.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.bench import copy_bandwidth  # noqa: E402
from harness.quant import fused  # noqa: E402
from harness.quant.types import F16_FIELDS, GGMLType, block_size, type_size  # noqa: E402

T = GGMLType
MATMAT_SWEEP = [
    (32, 64, 4, 2),
    (64, 64, 4, 2),
    (64, 64, 8, 3),
    (64, 128, 8, 2),
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (16, 64, 4, 2),
]

# Mixtral-8x7B's products: (type, out, in) of a weight, the tokens of a row, and the MoE layer
# (experts, embedding, feed-forward).
SHAPES = [
    (T.Q4_K, 14336, 4096),
    (T.Q4_K, 4096, 14336),
    (T.Q6_K, 32000, 4096),
    (T.Q6_K, 4096, 14336),
    (T.Q8_0, 1024, 4096),
    (T.Q5_K, 4096, 4096),
    (T.Q4_K, 4096, 4096),
]
TOKENS = (1, 512)
MOE_SHAPE = (8, 4096, 14336)
MATVEC_SWEEP = [(16, 2), (16, 4), (32, 2), (32, 4), (64, 4), (64, 8)]
# harness::attention: Mixtral's heads, KV heads, head dim
ATTENTION_HEADS = (32, 8, 128)
# (tokens, cached positions the call attends over, the cache's length S_max at device positions
# or None for the start form over a 4096-position cache). The decode graph's form first: one
# token at device positions over the whole static cache, bench_model's (512 prompt + 128: its
# first and last steps) and a 4096-position one; short caches as a decode starts (12 in the
# start form, as session 12's eager decode profile ran it; 100 at device positions)
ATTENTION_CALLS = [
    (1, 513, 640), (1, 640, 640), (1, 512, 4096), (1, 4096, 4096), (8, 640, 640), (1, 100, 4096),
    (1, 12, None), (1, 512, None), (1, 4096, None), (8, 4096, None),
]  # fmt: skip
# --sweep-attention: (BS, num_warps, num_stages, split_min_keys, dot, fold_rope, fold_merge_rows,
# min_rows) of the kernels; fold_rope False is the rope and cache write in a launch of their own
# (`_rope_cache_kernel`); fold_merge_rows 0, the merge in a launch after
# (`_attention_merge_kernel`), min_rows 16, the query tile padded to 16 rows, split_min_keys 64:
# fused.ATTENTION_TWO_LAUNCHES; fold_merge_rows 8, min_rows 1, split_min_keys 32: the default. Mixtral's static
# 640-key cache at split_min_keys 32: 20 splits a KV
# head (160 programs, 17 with keys at 513), at 64: 10 (80 programs), at 16: 40.
ATTENTION_SWEEP = [
    (32, 4, 2, 64, "ieee", True, 0, 16),  # ATTENTION_TWO_LAUNCHES
    (32, 4, 2, 64, "ieee", True, 8, 16),
    (32, 4, 2, 64, "ieee", True, 0, 1),
    (32, 4, 2, 64, "ieee", True, 8, 1),
    (32, 4, 2, 32, "ieee", True, 8, 1),  # the default
    (32, 4, 2, 32, "ieee", True, 0, 1),
    (32, 4, 2, 32, "ieee", True, 32, 1),  # 8 tokens merged in the launch too
    (16, 4, 2, 16, "ieee", True, 8, 1),
    (16, 4, 2, 32, "ieee", True, 8, 1),
    (32, 2, 2, 32, "ieee", True, 8, 1),
    (32, 8, 2, 32, "ieee", True, 8, 1),
    (64, 4, 2, 64, "ieee", True, 8, 1),
    (32, 4, 1, 32, "ieee", True, 8, 1),  # one loop step a program at 640 keys: no pipeline
    (32, 4, 2, 4096, "ieee", True, 8, 1),  # one split: no merge
    (32, 4, 2, 32, "tf32x3", True, 8, 1),
    (32, 4, 2, 32, "ieee", False, 8, 1),
]
# harness::router_topk: (tokens, experts, experts used, columns)
ROUTER_CALLS = [(1, 8, 2, 4096), (8, 8, 2, 4096)]
# --sweep-router: ROUTER_CONFIG's (splits, tile, num_warps, num_stages) (splits: programs a token
# over the columns; tile: products a loop step); the first, one program a token, is the kernel
# before splits; (32, 1024, 4, 1) the default.
ROUTER_SWEEP = [
    (1, 16384, 8, 1),
    (8, 4096, 4, 1),
    (16, 2048, 4, 1),
    (32, 1024, 4, 1),
    (32, 1024, 2, 1),
    (32, 1024, 8, 1),
    (64, 512, 2, 1),
    (64, 512, 4, 1),
    (128, 256, 1, 1),
    (128, 256, 2, 1),
]
GROUPED_SWEEP = [  # BM, BN, BK, warps, stages
    (64, 128, 64, 4, 4),
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (32, 128, 64, 4, 4),
]
GATED_GROUPED_SWEEP = [  # the same, for gate, up and SwiGLU in one launch (two accumulators)
    (64, 128, 64, 8, 3),
    (64, 128, 64, 8, 4),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (128, 128, 64, 8, 2),
    (128, 64, 64, 8, 3),
]


def random_weight(qtype: GGMLType, *shape: int, device) -> torch.Tensor:
    """[*shape[:-1], row_bytes] random blocks with small finite f16 scales."""
    rows = 1
    for s in shape[:-1]:
        rows *= s
    nblocks = rows * shape[-1] // block_size(qtype)
    raw = torch.randint(0, 256, (nblocks, type_size(qtype)), dtype=torch.uint8, device=device)
    for off in F16_FIELDS[qtype]:
        half = (torch.randn(nblocks, device=device) * 0.01).half().view(torch.uint8).view(nblocks, 2)
        raw[:, off : off + 2] = half
    return raw.view(*shape[:-1], -1)


def time_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one `fn()` on the device: `reps` calls captured in a CUDA graph,
    the graph replayed and timed with CUDA events (host launch costs left out, as in the model's
    decode graph, and with the kernels it chooses: `fused.graph_step`); the median over 5
    replays, after warm-up."""
    with fused.graph_step():
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    graph.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    times.sort()
    return times[len(times) // 2]


def eager_time_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one `fn()` called eagerly, host launch costs included: `reps`
    calls between two CUDA events, the median over 5 such runs, after warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    times.sort()
    return times[len(times) // 2]


def try_time_ms(fn, reps: int = 20) -> float:
    """time_ms, or NaN for a configuration the device cannot launch (too much shared memory)."""
    try:
        return time_ms(fn, reps)
    except Exception as exc:  # triton's OutOfResources and the like
        print(f"    skipped: {type(exc).__name__}: {str(exc)[:100]}")
        return float("nan")


@contextlib.contextmanager
def kernel_choice(rows: int, choice: str):
    """Inside, a product of `rows` rows takes `choice`: a matrix-vector path or a prefill path."""
    attr = "matvec_path" if rows <= fused.MATVEC_MAX_ROWS else "prefill_path"
    before = getattr(fused, attr)
    setattr(fused, attr, choice)
    try:
        yield
    finally:
        setattr(fused, attr, before)


def choices(rows: int, qtypes) -> tuple[str, ...]:
    """The ways the fused module can compute a product of `rows` rows of weights of `qtypes`,
    the default first (the matrix-vector kernel has several for Q4_K, Q5_K, and Q6_K and Q8_0
    repacked: `fused.matvec_paths`)."""
    if rows > fused.MATVEC_MAX_ROWS:
        return fused.PREFILL_PATHS
    several = set(fused.MATVEC_PATH_TYPES) | set(fused.INT_READ_TYPES)
    return fused.MATVEC_PATHS if set(qtypes) & several else fused.MATVEC_PATHS[:1]


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-300))


SWEEP_NMSE_MAX = 1e-6  # a launch setting whose result is further from the default setting's is wrong


def timed_setting(fn, reference, reps: int = 20) -> tuple[float, float | None]:
    """(`try_time_ms(fn)`, the NMSE of fn's result against `reference`, the default setting's;
    NaN and None for a setting the device cannot launch):
    a sweep checks each setting as it times it, because a setting can compile to a kernel that
    computes wrong rows (Q4_K's matrix-vector kernel at BN=8 with 2 warps did on an H100). A
    tuple result (router_topk's) compares its first tensor and needs the others equal."""
    try:
        out = fn()
    except Exception as exc:  # triton's OutOfResources and the like
        print(f"    skipped: {type(exc).__name__}: {str(exc)[:100]}")
        return float("nan"), None
    ms = try_time_ms(fn, reps)
    if isinstance(reference, tuple):
        if not all(torch.equal(a, b) for a, b in zip(out[1:], reference[1:], strict=True)):
            return ms, float("inf")
        out, reference = out[0], reference[0]
    return ms, nmse(out, reference)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/fused.json")
    p.add_argument("--sweep", action="store_true", help="also try matrix-vector tile sizes")
    p.add_argument("--default-only", action="store_true", help="time only the default kernels")
    p.add_argument(
        "--sweep-grouped",
        action="store_true",
        help="also try launch configurations of the prefill's grouped float16 GEMM (one weight: the "
        "down product; gated: gate, up and SwiGLU) and of the in-register tiled16 kernel (MoE, 512 tokens)",
    )
    p.add_argument(
        "--moe-only",
        action="store_true",
        help="time only harness::moe_ffn (1 and 512 tokens; --sweep-grouped)",
    )
    p.add_argument(
        "--moe-fusions",
        action="store_true",
        help="also time the moe_ffn decode (1 and 4 tokens, with the residual) with MOE_FFN_CONFIG's "
        "fusions on ('fused', new) and off ('unfused', old): the same bits, a launch and an add fewer",
    )
    p.add_argument("--attention-only", action="store_true", help="time only harness::attention")
    p.add_argument(
        "--qkv-only",
        action="store_true",
        help="time only harness::qkv, QKV_CONFIG 'one_launch' on and off (weights from DRAM)",
    )
    p.add_argument(
        "--sweep-qkv",
        action="store_true",
        help="also time harness::qkv both ways under QKV_SWEEP_PER_SM's splits of q's and k+v's products",
    )
    p.add_argument("--router-only", action="store_true", help="time only harness::router_topk")
    p.add_argument(
        "--norm-route-only",
        action="store_true",
        help="time only the post-attention norm with the router (harness::add_rms_norm_route) against the two ops",
    )
    p.add_argument(
        "--sweep-router",
        action="store_true",
        help="also try launch settings of harness::router_topk's kernel (ROUTER_SWEEP)",
    )
    p.add_argument(
        "--sweep-attention",
        action="store_true",
        help="also try launch settings of harness::attention's kernels (ATTENTION_SWEEP)",
    )
    p.add_argument(
        "--sweep-matvec",
        action="store_true",
        help="also try launch configurations of the default Q4_K matrix-vector kernel (1 token)",
    )
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    copy = copy_bandwidth(dev)
    rows = []
    comparisons = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bytes_per_second": copy}

    def save() -> None:
        """The JSON so far (after every row: a run cut short by a time limit keeps what it measured)."""
        out.write_text(json.dumps({**info, "rows": rows, "comparisons": comparisons}, indent=1))

    def row(name: str, ms: float, nbytes: int, flops: int, off_default: float | None = None) -> None:
        """A timed row; a sweep's rows carry their NMSE against the default setting's result."""
        r = {
            "name": name,
            "median_ms": ms,
            "weight_bytes": nbytes,
            "fraction_of_copy": nbytes / (ms / 1e3) / copy,
            "tflops": flops / (ms / 1e3) / 1e12,
        }
        wrong = ""
        if off_default is not None:
            r["nmse_vs_default"] = off_default
            r["agrees_with_default"] = off_default <= SWEEP_NMSE_MAX
            wrong = (
                "" if r["agrees_with_default"] else f"  WRONG (NMSE {off_default:.1e} against the default)"
            )
        rows.append(r)
        save()
        print(
            f"{name:56s} {ms:8.3f} ms  {r['fraction_of_copy']:6.1%} of copy  {r['tflops']:7.1f} TFLOP/s{wrong}",
            flush=True,
        )

    def compared(name: str, n_rows: int, qtypes, fn, nbytes: int, flops: int) -> None:
        """Time `fn` under each kernel choice for its rows (the default only with
        --default-only); with two, add the comparison of the default (new) with the other (old)."""
        ways = choices(n_rows, qtypes)[: 1 if args.default_only else None]
        named = len(choices(n_rows, qtypes)) > 1

        def under(way):
            def run():
                with kernel_choice(n_rows, way):
                    return fn()

            return run

        compared_ways(name, {way: under(way) for way in ways}, nbytes, flops, named)

    def compared_ways(name: str, fns: dict, nbytes: int, flops: int, named: bool = True) -> None:
        """Time each of `fns` (way -> fn, the new one first); with two, add their comparison."""
        compared_paths(name, fns, nbytes, flops, row, comparisons, save, named=named)

    if args.attention_only:
        attention_rows(dev, row, comparisons, save, args.sweep_attention)
        return 0
    if args.router_only:
        router_rows(dev, row, comparisons, save, args.sweep_router)
        return 0
    if args.qkv_only:
        qkv_rows(dev, row, comparisons, save, args.sweep_qkv)
        return 0
    if args.norm_route_only:
        norm_route_rows(dev, row, comparisons, save)
        return 0

    for qtype, n, k in () if args.moe_only else SHAPES:
        w = random_weight(qtype, n, k, device=dev)
        kw, code = fused.kernel_weight(w, qtype, k)  # as the model hands it to the op
        for t in TOKENS:
            x = torch.randn(t, k, device=dev)
            name = f"qmatmul {qtype.name} {n}x{k} T={t}"

            def product(x=x, w=kw, code=code, n=n):
                return torch.ops.harness.qmatmul(x, w, code, n)

            compared(name, t, (qtype,), product, w.numel(), 2 * t * n * k)
            if code & fused.PACKED and not args.default_only:

                def gguf_layout(x=x, w=w, qtype=qtype, n=n):
                    return torch.ops.harness.qmatmul(x, w, int(qtype), n)

                ways = {"packed": product, "gguf": gguf_layout}
                compared_ways(f"{name} layout", ways, w.numel(), 2 * t * n * k)
        if args.sweep:  # the matrix-vector configurations of the layout the model uses
            matvec = fused.PACKED_MATVEC_CONFIG if code & fused.PACKED else fused.MATVEC_CONFIG
            if fused._interleaved(code):  # interleaved Q4_K or Q6_K: read "int" whatever the path
                matvec = fused.INT_MATVEC_CONFIG
            saved = dict(matvec[qtype]), dict(fused.MATMAT_CONFIG[qtype])
            x = torch.randn(1, k, device=dev)

            def vec(x=x, w=kw, code=code, n=n):
                return torch.ops.harness.qmatmul(x, w, code, n)

            reference = vec()
            for bn in (8, 16, 32, 64):
                for warps in (1, 2, 4, 8):
                    matvec[qtype].update(BN=bn, num_warps=warps)
                    ms, off = timed_setting(vec, reference)
                    row(
                        f"  sweep BN={bn} warps={warps} {qtype.name} {n}x{k} T=1",
                        ms,
                        w.numel(),
                        2 * n * k,
                        off,
                    )
            x = torch.randn(512, k, device=dev)

            def mat(x=x, w=w, qtype=qtype, n=n):
                return torch.ops.harness.qmatmul(x, w, int(qtype), n)

            reference = mat()
            for bm, bn, warps, stages in MATMAT_SWEEP:  # the in-register kernel, on float16 tiles
                fused.MATMAT_CONFIG[qtype].update(BM=bm, BN=bn, num_warps=warps, num_stages=stages)
                with kernel_choice(512, "tiled16"):
                    ms, off = timed_setting(mat, reference, 3)
                row(
                    f"  sweep tiled16 BM={bm} BN={bn} w={warps} s={stages} {qtype.name} {n}x{k} T=512",
                    ms,
                    w.numel(),
                    2 * 512 * n * k,
                    off,
                )
            matvec[qtype].update(saved[0])
            fused.MATMAT_CONFIG[qtype].update(saved[1])

    e, d, f = MOE_SHAPE
    gate, up = random_weight(T.Q4_K, e, f, d, device=dev), random_weight(T.Q4_K, e, f, d, device=dev)
    down = random_weight(T.Q4_K, e, d, f, device=dev)
    per_expert = (gate.numel() + up.numel() + down.numel()) // e
    # A layer whose down stack is Q6_K (about a third of a Q4_K_M file's layers): repacked, against
    # GGUF's layout.
    down6 = random_weight(T.Q6_K, e, d, f, device=dev)
    down6_packed, code6 = fused.kernel_weight(down6, T.Q6_K, f)
    per_expert6 = (gate.numel() + up.numel() + down6.numel()) // e
    for t in TOKENS:
        x = torch.randn(t, d, device=dev)
        experts = torch.stack([torch.randperm(e, device=dev)[:2] for _ in range(t)])
        weights = torch.rand(t, 2, device=dev).softmax(-1)
        ways = {}
        for way, w2, c2 in (("packed", down6_packed, code6), ("gguf", down6, int(T.Q6_K))):

            def moe6(x=x, experts=experts, weights=weights, w2=w2, c2=c2):
                return torch.ops.harness.moe_ffn(x, gate, up, w2, weights, experts, int(T.Q4_K), c2)

            ways[way] = moe6
        if args.default_only:
            ways.pop("gguf")
        name = f"moe_ffn Q4_K/Q6_K E={e} k=2 D={d} F={f} T={t} layout"
        compared_ways(name, ways, per_expert6 * (2 if t == 1 else e), 2 * 3 * t * 2 * d * f)
    for t in TOKENS:
        x = torch.randn(t, d, device=dev)
        experts = torch.stack([torch.randperm(e, device=dev)[:2] for _ in range(t)])
        weights = torch.rand(t, 2, device=dev).softmax(-1)
        read = per_expert * (2 if t == 1 else e)

        def moe(x=x, experts=experts, weights=weights):
            return torch.ops.harness.moe_ffn(x, gate, up, down, weights, experts, int(T.Q4_K), int(T.Q4_K))

        name = f"moe_ffn Q4_K E={e} k=2 D={d} F={f} T={t}"
        flops = 2 * 3 * t * 2 * d * f
        compared(name, 2 * t, (T.Q4_K,), moe, read, flops)
        if args.sweep_grouped and 2 * t > fused.MATVEC_MAX_ROWS:
            with kernel_choice(2 * t, "dequant"):
                reference = moe()
            for label, config, sweep in (
                ("grouped", fused.GROUPED_CONFIG, GROUPED_SWEEP),  # (the down product)
                ("gated grouped", fused.GATED_GROUPED_CONFIG, GATED_GROUPED_SWEEP),
            ):
                saved = dict(config)
                for bm, bn, bk, warps, stages in sweep:
                    config.update(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
                    with kernel_choice(2 * t, "dequant"):
                        ms, off = timed_setting(moe, reference)
                    settings = f"BM={bm} BN={bn} BK={bk} w={warps} s={stages}"
                    row(f"  sweep {label} {settings} {name}", ms, read, flops, off)
                config.update(saved)
            saved = dict(fused.MATMAT_CONFIG[T.Q4_K])
            for bm, bn, warps, stages in MATMAT_SWEEP:
                fused.MATMAT_CONFIG[T.Q4_K].update(BM=bm, BN=bn, num_warps=warps, num_stages=stages)
                with kernel_choice(2 * t, "tiled16"):
                    ms, off = timed_setting(moe, reference)
                row(f"  sweep tiled16 BM={bm} BN={bn} w={warps} s={stages} {name}", ms, read, flops, off)
            fused.MATMAT_CONFIG[T.Q4_K].update(saved)

    if args.moe_fusions:
        moe_fusion_rows(dev, (gate, up), ((int(T.Q4_K), down), (code6, down6_packed)), compared_ways)

    if args.sweep_matvec:
        _, n, k = SHAPES[0]
        w = random_weight(T.Q4_K, n, k, device=dev)
        x = torch.randn(1, k, device=dev)
        saved = dict(fused.MATVEC_CONFIG[T.Q4_K])

        def q4_k(x=x, w=w, n=n):
            return torch.ops.harness.qmatmul(x, w, int(T.Q4_K), n)

        reference = q4_k()
        for bn, warps in MATVEC_SWEEP:
            for stages in (1, 2):
                fused.MATVEC_CONFIG[T.Q4_K].update(BN=bn, num_warps=warps, stages=stages)
                ms, off = timed_setting(q4_k, reference)
                name = f"  sweep {fused.matvec_path} BN={bn} warps={warps} stages={stages} Q4_K {n}x{k} T=1"
                row(name, ms, w.numel(), 2 * n * k, off)
        fused.MATVEC_CONFIG[T.Q4_K].update(saved)
    if args.moe_only:
        return 0
    qkv_rows(dev, row, comparisons, save, args.sweep_qkv)
    router_rows(dev, row, comparisons, save, args.sweep_router)
    norm_route_rows(dev, row, comparisons, save)
    attention_rows(dev, row, comparisons, save, args.sweep_attention)
    return 0


def moe_fusion_rows(dev: torch.device, gate_up: tuple, downs: tuple, compared_ways) -> None:
    """The decode's `harness::moe_ffn` (Q4_K gate/up, each of `downs`: (code, stack)) with the
    residual, at 1 and 4 tokens, under `fused.MOE_FFN_CONFIG` all on ("fused") and all off
    ("unfused"), as the decode graph runs it (`time_ms`: `int_x_path` "auto" is "launch")."""
    gate, up = gate_up
    e, d, f = MOE_SHAPE
    for code, down in downs:
        for t in (1, 4):
            x, residual = torch.randn(t, d, device=dev), torch.randn(t, d, device=dev)
            experts = torch.stack([torch.randperm(e, device=dev)[:2] for _ in range(t)])
            weights = torch.rand(t, 2, device=dev).softmax(-1)

            def moe(on: bool, x=x, residual=residual, experts=experts, weights=weights, code=code, down=down):
                saved = dict(fused.MOE_FFN_CONFIG)
                fused.MOE_FFN_CONFIG.update(dict.fromkeys(saved, on))
                try:
                    return torch.ops.harness.moe_ffn(
                        x, gate, up, down, weights, experts, int(T.Q4_K), code, residual
                    )
                finally:
                    fused.MOE_FFN_CONFIG.update(saved)

            down_name = GGMLType(code & 0xFF).name + (" packed" if code & fused.PACKED else "")
            name = f"moe_ffn fusions Q4_K/{down_name} E={e} k=2 D={d} F={f} T={t} residual"
            nbytes = 2 * (gate.numel() + up.numel() + down.numel()) // e
            ways = {"fused": functools.partial(moe, True), "unfused": functools.partial(moe, False)}
            compared_ways(name, ways, nbytes, 2 * 3 * t * 2 * d * f)


# harness::qkv: (q's type, k's and v's type), Mixtral's rows (q, k and v each), row length, tokens
QKV_TYPES = ((T.Q4_K, T.Q8_0), (T.Q4_K, T.Q6_K))
QKV_SHAPE = (4096, 1024, 4096)
QKV_TOKENS = (1, 4, 8)
# --sweep-qkv: "dense_programs_per_sm" of q's type and of k+v's (INT_MATVEC_CONFIG; 2 for Q4_K
# and Q8_0 by default, chosen for a launch a run): how far each run splits, both ways
QKV_SWEEP_PER_SM = (1, 2, 4)


def qkv_rows(dev: torch.device, row, comparisons: list, save, sweep: bool = False) -> None:
    """`harness::qkv` per QKV_TYPES and QKV_TOKENS (QKV_SHAPE; k and v packed into one buffer
    by `fused.pack_rows`), x plain and given in `_int_x`'s form: QKV_CONFIG "one_launch" on
    ("one launch") against off ("a launch a run") (`compared_paths`, in a graph and eagerly),
    on weights in turn from DRAM (copies by `in_turn_from_dram`: each call takes the next); with
    `sweep`, x plain both ways under QKV_SWEEP_PER_SM's splits too (rows only, in a graph)."""
    q_rows, kv_rows, k = QKV_SHAPE
    for q_type, kv_type in QKV_TYPES:
        blocks = [
            fused.kernel_weight(random_weight(qtype, rows, k, device=dev), qtype, k)
            for qtype, rows in ((q_type, q_rows), (kv_type, kv_rows), (kv_type, kv_rows))
        ]
        codes = [code for _, code in blocks]
        nbytes = sum(w.numel() for w, _ in blocks)
        # the three as one buffer, copied past twice the L2 cache; each copy's q, k and v as views
        # (k's and v's blocks one after the other, as `pack_rows` lays them out: one run)
        turn, n_sets = in_turn_from_dram(torch.cat([w.reshape(-1) for w, _ in blocks]))
        sets = []
        for _ in range(n_sets):
            parts = turn().split([w.numel() for w, _ in blocks])
            sets.append([part.view(w.shape) for part, (w, _) in zip(parts, blocks, strict=True)])
        weights = itertools.cycle(sets).__next__
        kv_name = GGMLType(codes[1] & 0xFF).name + (" packed" if codes[1] & fused.PACKED else "")
        for t in QKV_TOKENS:
            x = torch.randn(t, k, device=dev)
            form = [a.clone() for a in fused._int_x(x)]
            form[0] = form[0].view(torch.int16)  # (as `rms_norm_int` hands it over)
            for given in (False, True):

                def qkv(on: bool, x=x, form=form if given else [], weights=weights, codes=codes):
                    saved = dict(fused.QKV_CONFIG)
                    fused.QKV_CONFIG.update(one_launch=on, one_launch_rows=fused.MATVEC_MAX_ROWS)
                    try:
                        return torch.ops.harness.qkv(x, *weights(), *codes, *form)
                    finally:
                        fused.QKV_CONFIG.update(saved)

                ways = {
                    "one launch": functools.partial(qkv, True),
                    "a launch a run": functools.partial(qkv, False),
                }
                name = (
                    f"qkv q {q_type.name} {q_rows}x{k}, k+v {kv_name} 2x{kv_rows}x{k} T={t} "
                    f"{'x int form given' if given else 'x'} weights from DRAM ({n_sets} sets)"
                )
                flops = 2 * t * (q_rows + 2 * kv_rows) * k
                compared_paths(name, ways, nbytes, flops, row, comparisons, save, eager=True, reps=4 * n_sets)
                if sweep and not given:
                    qkv_sweep(name, ways, (q_type, kv_type), nbytes, flops, row, 4 * n_sets)


def qkv_sweep(name: str, ways: dict, types: tuple, nbytes: int, flops: int, row, reps: int) -> None:
    """Each of `ways` (qkv calls) under each pair of QKV_SWEEP_PER_SM for the two types' products
    (their "dense_programs_per_sm"), a row each, checked against the way's default result."""
    settings = [fused.INT_MATVEC_CONFIG[qtype] for qtype in types]
    saved = [dict(s) for s in settings]

    def restore() -> None:
        for setting, before in zip(settings, saved, strict=True):
            setting.clear()
            setting.update(before)

    try:
        for way, fn in ways.items():
            restore()  # (the reference at the default settings)
            reference = fn()
            for per_sm in itertools.product(QKV_SWEEP_PER_SM, repeat=2):
                for setting, value in zip(settings, per_sm, strict=True):
                    setting["dense_programs_per_sm"] = value
                ms, off = timed_setting(fn, reference, reps)
                label = f"dense_programs_per_sm q={per_sm[0]} k+v={per_sm[1]}"
                row(f"  sweep {way} {label} {name}", ms, nbytes, flops, off)
    finally:
        restore()


def compared_paths(
    name: str, calls: dict, nbytes: int, flops: int, row, comparisons: list, save, eager=False, named=True,
    reps: int = 20,
) -> dict | None:  # fmt: skip
    """Time each of `calls` (way -> fn, the new one first) in a CUDA graph (a row each), and with
    `eager` eagerly too (`reps` calls a timing); with two, add their comparison (of their first
    outputs) and return it."""
    times, eager_ms, outs = {}, {}, {}
    for way, call in calls.items():
        times[way] = time_ms(call, reps)
        if eager:
            eager_ms[way] = eager_time_ms(call, reps)
        out = call()
        outs[way] = out[0] if isinstance(out, tuple) else out
        row(f"{name} {way}" if named else name, times[way], nbytes, flops)
    if len(calls) != 2:
        return None
    new, old = calls
    c = {"name": name, "new": new, "old": old, "old_ms_over_new_ms": times[old] / times[new]}
    if eager:
        c |= {"eager_ms": eager_ms, "eager_old_ms_over_new_ms": eager_ms[old] / eager_ms[new]}
    c |= {
        "nmse_new_vs_old": nmse(outs[new], outs[old]),
        "max_abs_new_vs_old": float((outs[new] - outs[old]).abs().max()),
    }
    comparisons.append(c)
    save()
    ways = f"{c['eager_old_ms_over_new_ms']:.2f}x eager, " if eager else ""
    print(
        f"  {new} is {c['old_ms_over_new_ms']:.2f}x {old}{' in a graph, ' if eager else ', '}{ways}"
        f"NMSE {c['nmse_new_vs_old']:.1e}",
        flush=True,
    )
    return c


def router_rows(dev: torch.device, row, comparisons: list, save, sweep: bool = False) -> None:
    """`harness::router_topk` per ROUTER_CALLS with the router's float32 weight, its kernel
    against the torch path (`compared_paths`; the comparison also says whether they chose the
    same experts), then both on weights from DRAM (`in_turn_from_dram`); with `sweep`, the
    kernel under each of ROUTER_SWEEP's launch settings too, both ways (its result checked
    against the default setting's)."""
    from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN

    for t, n_exp, k, d in ROUTER_CALLS:
        x = torch.randn(t, d, device=dev)
        weight = torch.randn(n_exp, d, device=dev) * 0.05
        name = f"router_topk E={n_exp} k={k} D={d} T={t}"
        nbytes = weight.numel() * 4
        flops = 2 * t * n_exp * d

        def kernel(x=x, weight=weight, k=k):
            return torch.ops.harness.router_topk(x, weight, k, ROUTER_WEIGHT_SUM_MIN)

        def torch_path(x=x, weight=weight, k=k):
            with fused.disabled():
                return torch.ops.harness.router_topk(x, weight, k, ROUTER_WEIGHT_SUM_MIN)

        assert fused.router_takes_kernel(x, weight, k), name
        ways = {"triton": kernel, "torch": torch_path}
        c = compared_paths(name, ways, nbytes, flops, row, comparisons, save, eager=True)
        c["same_experts"] = bool(torch.equal(kernel()[1], torch_path()[1]))
        save()
        turn, n_weights = in_turn_from_dram(weight)

        def kernel_from_dram(x=x, k=k, turn=turn):
            return torch.ops.harness.router_topk(x, turn(), k, ROUTER_WEIGHT_SUM_MIN)

        def torch_from_dram(x=x, k=k, turn=turn):
            with fused.disabled():
                return torch.ops.harness.router_topk(x, turn(), k, ROUTER_WEIGHT_SUM_MIN)

        for way, fn in (("triton", kernel_from_dram), ("torch", torch_from_dram)):
            row(f"{name} {way} weight from DRAM", try_time_ms(fn, n_weights), nbytes, flops)
        if sweep:
            saved = dict(fused.ROUTER_CONFIG)
            reference = kernel()
            for splits, tile, warps, stages in ROUTER_SWEEP:
                fused.ROUTER_CONFIG.update(splits=splits, tile=tile, num_warps=warps, num_stages=stages)
                setting = f"splits={splits} tile={tile} warps={warps} stages={stages}"
                ms, off = timed_setting(kernel, reference)
                row(f"  sweep {setting} {name}", ms, nbytes, flops, off)
                ms = try_time_ms(kernel_from_dram, n_weights)
                row(f"  sweep {setting} {name} weight from DRAM", ms, nbytes, flops)
            fused.ROUTER_CONFIG.update(saved)


def norm_route_rows(dev: torch.device, row, comparisons: list, save) -> None:
    """The post-attention norm and the router (NORM_CONFIG "router") per ROUTER_CALLS, with and
    without the norm's int form: `harness::add_rms_norm_route` (or its int form's: "one launch")
    against the norm's op then `router_topk` ("two launches"), `compared_paths` in a graph and
    eagerly (the comparison also says whether every output has the same bits), then both with
    the router's weight from DRAM (`in_turn_from_dram`), as a decode step's layers read theirs.
    Bytes: the router's weight and the norm's."""
    for t, n_exp, k, d in ROUTER_CALLS:
        x, residual = torch.randn(t, d, device=dev), torch.randn(t, d, device=dev)
        norm_weight = torch.rand(d, device=dev) + 0.5
        weight = torch.randn(n_exp, d, device=dev) * 0.05
        nbytes, flops = (weight.numel() + d) * 4, 2 * t * n_exp * d
        assert fused.norm_route_takes_kernel(x, residual, norm_weight, weight, k)
        for int_form in (False, True):
            norm = "add_rms_norm_int" if int_form else "add_rms_norm"
            name = f"{norm} + router_topk E={n_exp} k={k} D={d} T={t}"
            ways = norm_route_ways(norm, x, residual, norm_weight, k)
            c = compared_paths(
                name, {way: functools.partial(fn, weight) for way, fn in ways.items()}, nbytes, flops, row,
                comparisons, save, eager=True,
            )  # fmt: skip
            outs = [fn(weight) for fn in ways.values()]
            c["same_bits"] = all(
                torch.equal(a.view(torch.int32), b.view(torch.int32)) if a.dtype == torch.float32 else torch.equal(a, b)
                for a, b in zip(*outs, strict=True)
            )  # fmt: skip
            save()
            turn, n_weights = in_turn_from_dram(weight)
            for way, fn in ways.items():
                ms = try_time_ms(lambda fn=fn, turn=turn: fn(turn()), n_weights)
                row(f"{name} {way} router weight from DRAM", ms, nbytes, flops)


def norm_route_ways(norm: str, x, residual, norm_weight, k: int) -> dict:
    """{"one launch": `harness::<norm>_route`, "two launches": `harness::<norm>` then
    `router_topk` of its normed output}, each a function of the router's weight."""
    from harness.model.mixtral import ROUTER_WEIGHT_SUM_MIN

    ops, args = torch.ops.harness, (x, residual, norm_weight, 1e-5)

    def one(weight):
        return getattr(ops, f"{norm}_route")(*args, weight, k, ROUTER_WEIGHT_SUM_MIN)

    def two(weight):
        normed = getattr(ops, norm)(*args)
        return *normed, *ops.router_topk(normed[1], weight, k, ROUTER_WEIGHT_SUM_MIN)

    return {"one launch": one, "two launches": two}


def in_turn_from_dram(weight: torch.Tensor) -> tuple:
    """(a function giving `weight` and copies of it in turn, call after call; how many there
    are): more than twice the device's L2 cache in all, so that a CUDA graph of that many calls
    reads each from DRAM."""
    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 50 << 20)
    n = max(2, -(-2 * l2 // (weight.numel() * weight.element_size())))
    turn = itertools.cycle([weight] + [weight.clone() for _ in range(n - 1)])
    return (lambda: next(turn)), n


def attention_rows(dev: torch.device, row, comparisons: list, save, sweep: bool = False) -> None:
    """`harness::attention` per ATTENTION_CALLS: the Triton kernels (default settings, "triton")
    against their two-launch form ("triton two launches", fused.ATTENTION_TWO_LAUNCHES: the
    splits merged by a launch after, query tiles of at least 16 rows, 64-key splits), against their form with the rope in a launch of its own ("triton rope launch",
    ATTENTION_CONFIG["fold_rope"] off) and against the torch path, and at device positions (the
    decode graph's form) `harness::attention_int` (ATTENTION_CONFIG "int_out": the output's
    `_int_x` form stored by the attention launch) against attention with an `_int_x` launch
    after it ("triton, then _int_x"), each pair timed in a CUDA
    graph (a row each) and eagerly (in the comparison); with `sweep`, the kernels under each of
    ATTENTION_SWEEP's launch settings too (rows only)."""
    from harness.model.mixtral import rope_tables

    n_heads, n_kv, hd = ATTENTION_HEADS
    tables = {}
    for t, n_keys, s_max in ATTENTION_CALLS:
        at_device = s_max is not None
        s_max = s_max or 4096
        if s_max not in tables:
            cos, sin = rope_tables(hd, 1e6, s_max, dev)
            caches = torch.randn(n_kv, s_max, hd, device=dev), torch.randn(n_kv, s_max, hd, device=dev)
            tables[s_max] = cos, sin, *caches
        cos, sin, cache_k, cache_v = tables[s_max]
        qkv = torch.randn(t, (n_heads + 2 * n_kv) * hd, device=dev)  # q, k, v side by side
        start = n_keys - t
        positions = torch.arange(start, start + t, device=dev) if at_device else None
        form = f"at device positions over S_max={s_max}" if at_device else "start form"
        name = f"attention H={n_heads} K={n_kv} Hd={hd} T={t} keys={n_keys} {form}"
        nbytes = 2 * n_kv * n_keys * hd * 4  # the cached keys and values it must read
        flops = 2 * 2 * t * n_heads * n_keys * hd

        def call(path="triton", config=None, qkv=qkv, positions=positions, start=start, tables=tables[s_max]):
            before = fused.attention_path, dict(fused.ATTENTION_CONFIG)
            fused.attention_path = path
            fused.ATTENTION_CONFIG.update(config or {})
            try:
                return torch.ops.harness.attention(
                    qkv, tables[2], tables[3], tables[0], tables[1], positions, start
                )
            finally:
                fused.attention_path = before[0]
                fused.ATTENTION_CONFIG.update(before[1])

        def with_int_form(int_out: bool, qkv=qkv, positions=positions, start=start, tables=tables[s_max]):
            """The output and its `_int_x` form: from `harness::attention_int` (ATTENTION_CONFIG
            "int_out": the attention launch stores it), or an `_int_x` launch after attention."""
            args = (qkv, tables[2], tables[3], tables[0], tables[1], positions, start)
            if int_out:
                return torch.ops.harness.attention_int(*args)
            out = torch.ops.harness.attention(*args)
            return out, *fused._int_x(out)

        new = call
        old = functools.partial(call, config={"fold_rope": False})
        two_launches = functools.partial(call, config=fused.ATTENTION_TWO_LAUNCHES)
        torch_path = functools.partial(call, "torch")
        compared = [
            {"triton": new, "triton two launches": two_launches},
            {"triton": new, "triton rope launch": old},
            {"triton": new, "torch": torch_path},
        ]
        if at_device:  # the decode graph's form with and without ATTENTION_CONFIG "int_out"
            with_int = functools.partial(with_int_form, True)
            compared.append(
                {"triton int_out": with_int, "triton, then _int_x": functools.partial(with_int_form, False)}
            )
        for ways in compared:
            compared_paths(name, ways, nbytes, flops, row, comparisons, save, eager=True)
        if sweep:
            reference = new()  # the kernels at the default settings
            for bs, warps, stages, split_min, dot, fold, merge, min_rows in ATTENTION_SWEEP:
                setting = dict(
                    BS=bs,
                    num_warps=warps,
                    num_stages=stages,
                    split_min_keys=split_min,
                    dot=dot,
                    fold_rope=fold,
                    fold_merge_rows=merge,
                    min_rows=min_rows,
                )
                ms, off = timed_setting(functools.partial(call, config=setting), reference)
                label = " ".join(f"{k}={v}" for k, v in setting.items())
                row(f"  sweep {label} {name}", ms, nbytes, flops, off)


if __name__ == "__main__":
    sys.exit(main())
