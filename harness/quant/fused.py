"""Fused quantized products in Triton, registered as torch custom ops.

- `harness::qmatmul(x, raw, qtype, out_features)`: `x @ W.T` for a GGUF weight W kept as raw blocks.
- `harness::moe_ffn(x, gate, up, down, weights, experts, qtypes)`: a whole mixture-of-experts MLP
  (every chosen expert of a layer, gate/up/SwiGLU fused, routing weights applied) in one op.

How a product runs depends on its rows (token-expert pairs):
- up to MATVEC_MAX_ROWS (decode): a matrix-vector kernel dequantizes the blocks in registers, one
  program per (output tile, pair); Q4_K and Q5_K have reads with fewer instructions per byte
  (`matvec_path` "int", the default: integer dot products against x quantized to int16, in
  the kernel itself (`int_x_path`);
  "vec", `_q4_k_dot_vec`, float products; "words" is the older read), and so have Q6_K and Q8_0
  repacked ("int" and "vec": their blocks are 2-byte aligned, so the weight is kept as per-row
  planes that load 16 bytes at a time, see `kernel_weight`);
- more rows (prefill, `prefill_path`): "dequant" writes the weight as float16 into a bounded
  scratch (harness.quant.kernels, bandwidth-bound) and multiplies on tensor cores: torch.matmul
  for a dense weight, `_grouped_kernel` for experts; "tiled" is the older `_matmat_kernel`,
  which dequantizes in registers for every row block, and "tiled16" that kernel on float16
  tiles (the scratch path's arithmetic without the scratch). Either way the pairs are sorted
  by expert on the device and padded to whole row blocks (vLLM's moe_align_block_size), once per
  moe_ffn (one launch), each row block knows its expert: no host read of the routing, no Python
  loop over experts (the "dequant" path launches once per chunk of experts that fits the
  scratch, gate, up and SwiGLU in one launch). Its products round weights and
  activations to float16 (activation rows divided by their peak first) and accumulate in
  float32: NMSE about 1e-7 against float32. A weight with values beyond float16's range (WIDE,
  found when it is prepared) takes "tiled", whose float32 tiles do not overflow.
A dense weight is the one-expert case of the same kernels.

Each type supplies `_tile`: part `P` of super-block `sb` (256 values of each row) of `BN` rows,
dequantized as gguf does it, and the columns of x it multiplies. Values are produced in an order
that keeps the loads of one row contiguous (x is gathered to match), so the dot products are the
ones of dequantize-then-matmul summed in another order (float32; tf32 in the tensor-core `tl.dot`).

Where they run: CUDA tensors (all on one device), or CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` before the first import, as in harness.quant.kernels). A CPU tensor handed to
an op otherwise raises the device error CUDA's own ops raise. `supports` is the one place that
says whether a weight takes these kernels; QMatMul and Experts ask it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import NamedTuple, Optional

import torch

from harness.errors import UsageError
from harness.quant import dequant, kernels
from harness.quant.launch import Bound, bind, launch
from harness.quant.types import GGMLType, block_size, type_size

triton, tl = kernels.triton, kernels.tl
# Raised by a launch whose kernel needs more shared memory than the device has.
OutOfResources = triton.runtime.errors.OutOfResources if triton is not None else RuntimeError

T = GGMLType

# Types with kernels here: (parts per 256-value super-block). Rows must be whole super-blocks.
PARTS: dict[GGMLType, int] = {
    T.Q4_K: 2,
    T.Q6_K: 4,
    T.Q8_0: 1,
    T.Q5_K: 2,
    T.Q4_0: 2,
    T.Q3_K: 2,
    T.Q2_K: 2,
    T.IQ4_XS: 2,
}
FUSED_TYPES: tuple[GGMLType, ...] = tuple(PARTS)
SUPER = 256  # values per super-block (one K-quant block, eight 32-value blocks)

MATVEC_MAX_ROWS = 8  # token-expert pairs up to which the matrix-vector kernel is used
# Launch configurations per type. "programs_per_sm": split the rows' super-blocks until the
# device has that many programs a multiprocessor (4 when absent); "gated_programs_per_sm": the
# same for a gated product (gate and up in one launch, moe_ffn's), "programs_per_sm" when absent,
# 0 never splits it (the kernel before gated splits; 1 does the same at 8x7B's gate/up);
# "dense_programs_per_sm": the same for a product of one weight (not routed: attention's
# projections, the head), "programs_per_sm" when absent (`split_setting`). From
# the draft of `benchmarks/sweep_matvec.py` on an H100 (session 8, results/matvec_sweep.json:
# weights rotated past the 50 MB L2, each setting checked against the default's result):
# - Q4_K at BN=32, 4 warps: the gated expert product (2 x 14336 x 4096) 79 us against 116 at
#   BN=16, a 4096 x 4096 product 14.3 against 15.9 (BN=64 was 13.3 there but 87 gated);
# - packed Q6_K at BN=16, 1 warp, 8 programs a multiprocessor: the down product (2 x 4096 x
#   14336) 63 us against 82, the 32000-row head 55 against 79.
# Session 7's faster-looking Q4_K setting, BN=8 with 2 warps, gave every other row 0 on the H100.
# Types not swept take the first row's settings (their tiles have the same 128-value parts).
# "stages" > 1 software-pipelines the loop over super-blocks (loads go through shared memory);
# "unroll" > 1 unrolls it that many times (Triton's loop_unroll_factor; 1 when absent);
# (Session 15 removed "x_at" 1, the int reads loading x's operands where `_int_x` stored them:
# slower on an H100 at every decode shape, benchmarks/results/x_at_ab.json.)
MATVEC_CONFIG: dict[GGMLType, dict[str, int]] = {
    qtype: {"BN": 16, "num_warps": 4, "stages": 1} for qtype in PARTS
} | {
    T.Q4_K: {"BN": 32, "num_warps": 4, "stages": 1},
    T.Q6_K: {"BN": 64, "num_warps": 2, "stages": 1},
    T.Q8_0: {"BN": 8, "num_warps": 2, "stages": 1},
}
# Which weights `kernel_weight` repacks beyond Q6_K and Q8_0 (always):
# - "q4_k_interleave": Q4_K weights of out % 32 == 0 rows in tiles of 32 rows, each super-block's
#   nine 16-byte chunks of the tile's rows side by side (`pack`): a warp whose threads take 32
#   consecutive rows reads 512 contiguous bytes a load, where GGUF's 144-byte rows make its loads
#   strided. Of the decode reads only "int" knows the layout: such a weight takes it under every
#   `matvec_path`; the prefill's paths all read it (`_tile`, `_dequantize_packed`). On an H100
#   (session 18, benchmarks/probe_read_pattern.py, results/read_pattern.json) a pure read of
#   8x7B's gate/up bytes (132 MB) in the Q4_K int read's order took 65.0 us in GGUF's layout (0.69
#   of a device copy; the int read itself ~61 us) against 53.7 us interleaved at BN=128/4 warps
#   and 46.3 us at BN=32/1 warp (0.96 of copy); the down read (66 MB) 33.8 us against 24.4. The
#   same bits. On: on an H100 (session 18, `benchmarks/run_gpu.sh` with SETTINGS_FILE, one run;
#   `bench_model.py --repeats 3` a setting through with_config.py) the graph decode made 229.16
#   and 229.15 tok/s with it against 205.93 without (prefill 4,447 against 4,514: 0.985x); with
#   Q4_K's "prefetch" 2 227.71, at BN=64 with 2 warps 228.33, with "stages" 2 113.16. Beside
#   llama-bench on the same machine right after: 229.19 against 185.69 (1.234x), prefill
#   4,452 against 3,970 (1.121x); its cuda test passed there.
# - "q6_k_interleave": packed Q6_K weights (always repacked, as planes) of out % 8 == 0 rows
#   with the packed rows of each group of Q6_K_GROUP (8) rows interleaved in 16-byte chunks
#   (`pack`, `_q6_k_moved`): the packed Q6_K int read's warp takes 8 rows x (half c, h) of a
#   [BN, 2, 2, 4] tile (threads [8, 2, 2, 1] on sm_90), so each of its loads of a super-block
#   (ql even quarters, ql odd, qh) reads 512 contiguous bytes, and a warp streams its group's
#   bytes in order. As Q4_K's, only "int" knows the layout of the decode reads (taken under every
#   `matvec_path`); the prefill's paths all read it. Off until timed on a GPU: the row-major
#   packed rows already load whole 32-byte sectors (two threads a 32-byte run), so the gain
#   is in lines and DRAM pages a load touches, not sectors, and is not known.
PACK_CONFIG: dict[str, bool] = {"q4_k_interleave": True, "q6_k_interleave": False}
# Weights in `pack`'s layout.
PACKED_MATVEC_CONFIG: dict[GGMLType, dict[str, int]] = {
    T.Q6_K: {"BN": 16, "num_warps": 1, "stages": 1, "programs_per_sm": 8},
    T.Q8_0: {"BN": 16, "num_warps": 4, "stages": 1},
}
# The "int" reads (`matvec_path`; Q6_K and Q8_0 in `pack`'s layout). Not timed on a GPU yet:
# chosen by `benchmarks/sass_matvec.py` (sm_90 SASS, instructions per weight byte in the loop):
# Q4_K 4.19 at BN=64 with 4 warps against 4.97 at BN=32 (two rows a thread share their x
# loads), Q8_0 1.21 at BN=64 against 4.0 at BN=16; Q6_K keeps packed "vec"'s measured setting
# (3.01). `benchmarks/sweep_matvec.py --paths int` sweeps them. Measured on an H100 (that sweep,
# 40 settings at 8x7B's decode shapes): Q4_K at BN=128 with 4 warps, the moe_ffn of Q4_K
# gate/up/down 115 us against 148 us at BN=64; Q6_K at 2 warps, the Q6_K head 57 us against 60
# us at 1 warp, and the moe_ffn with a Q6_K down 152 us against 158 us. Those were timed with x
# quantized by a launch of its own (`int_x_path` "launch"); under "kernel" each program also
# quantizes the x of its super-blocks, once for all its BN rows (gate and up alike), which
# favours larger BN: `sweep_matvec.py --int-x kernel,launch` times both.
# Q4_K's gated product is not split ("gated_programs_per_sm" 0). On an H100 (session 12,
# .gpu/call26.sh: `sweep_matvec.py --paths int --int-x launch --grid 128x4,128x8,64x4 --per-sm 4,8
# --gated-per-sm 0,2,3,4,8`, benchmarks/results/matvec_gated_sweep.json) the Q4_K moe_ffn at
# BN=128, 4 warps took 102.2 us unsplit against 124.4 (2 splits), 109.1 (3) and 112.3 (4 and
# more), with a Q6_K down 115.2 against 138.2, 122.3 and 125.4: more programs did not make the
# 224 of the unsplit product faster, the partials' round trip only cost.
# Attention's projections (products of one weight, 4096 x 4096 and 2 x 1024 x 4096 at 8x7B) split
# their 16 super-blocks a row less ("dense_programs_per_sm" 2: 2 a program, against 1 at 4): in
# session 12's H100 sweep (not kept) Q4_K 4096 x 4096 took 9.00 us at 2 against 10.34 at 4, the qkv
# op 16.60 against 18.67 (Q5_K at BN=128: 10.61 against 11.21).
# "prefetch" (Q4_K, Q5_K, packed Q6_K; absent: 0, the plain loop): 1, each step of the loop over
# super-blocks loads the next super-block's weight words before its own arithmetic (a register
# double buffer: the loads stay outstanding while the step computes, where stages > 1 went
# through shared memory); 2, a gated product only U's words so (W's in their step: 241 registers
# a thread for the Q4_K gate/up on sm_90, where 1 spills), an ungated one as 1. The same bits.
# Timed in session 18 (below; benchmarks/moe_decode_analysis.md). On sm_90 the Q4_K down then
# takes 198 registers, 2 programs an SM (4 without), so its 8 splits make 2 waves
# ("programs_per_sm" 1: 3 splits, one wave); the packed Q6_K down 94 (64 without), 10 programs an
# SM, so its 1536 programs ("programs_per_sm" 8) make 1.2 waves ("programs_per_sm" 4: 1024, one
# wave).
# Packed Q6_K takes "prefetch" 1 with "programs_per_sm" 4 (the Q6_K downs and the output head): on
# an H100 (session 18, .gpu/s18a.sh, `bench_model.py --repeats 3` a setting through with_config.py,
# one run) the graph decode made 204.03 tok/s against 202.93 and 202.92 at the old setting
# (programs_per_sm 8, no prefetch), 206.19 against 205.03 with the norms' and attention's switches
# on; its cuda test passed there. Q4_K's "prefetch" 2 with "programs_per_sm" 1 made 192.60: slower;
# over interleaved Q4_K (PACK_CONFIG) its "prefetch" 2 made 227.71 against 229.16 without.
# In session 18's run of model_switches.json (H100, one run) Q5_K's "prefetch" 1 made 206.47
# tok/s against 205.97 and 206.01 without (noise), Q4_K at BN=64 with 2 warps 202.57 and at BN=32
# with 1 warp 184.27.
INT_MATVEC_CONFIG: dict[GGMLType, dict[str, int]] = {
    T.Q4_K: {"BN": 128, "num_warps": 4, "stages": 1, "gated_programs_per_sm": 0, "dense_programs_per_sm": 2},
    T.Q5_K: {"BN": 64, "num_warps": 4, "stages": 1, "dense_programs_per_sm": 2},
    T.Q6_K: {"BN": 16, "num_warps": 2, "stages": 1, "programs_per_sm": 4, "prefetch": 1},
    T.Q8_0: {"BN": 64, "num_warps": 4, "stages": 1, "dense_programs_per_sm": 2},
}
# (Session 15 removed the Q4_K/Q5_K "rows" read, INT_MATVEC_CONFIG "read"/"span": slower on an
# H100, 111.8 us at best against 99.9 for the Q4_K moe_ffn, results/matvec_rows_sweep.json.)
# (Session 18 removed "l2_prefetch", one-weight products' programs asking their rows' first
# super-blocks into L2 before their PDL wait: slower on an H100 at every setting, 204.76 tok/s
# with whole weights against 205.97 and 206.01 without, 205.29 with 1-2 super-blocks a row;
# benchmarks/results/model_switches.json's session18.)
# moe_ffn's decode launches (at most MATVEC_MAX_ROWS pairs), each fusion a switch so that a GPU
# can compare them (`benchmarks/bench_fused.py --moe-only --moe-fusions`):
# - "int_h": the gated product leaves h (silu(gate.x) * (up.x), [pairs, F]) as `_int_x` would
#   leave it (`_matvec_kernel`'s INT_OUT: int16 values, scales, sums, the same bits), not as
#   float32, where the down product reads it so (an "int" read, `int_x_path` not "kernel") and
#   the gated launch is not split (each program owns whole 32-value blocks of h): no `_int_x`
#   launch on h. On an H100 that launch took 10.6 us a call in session 12's profile (under PDL it
#   waits for the gated product's tail).
# - "residual": the down product adds `residual` in the program that writes each output row
#   (`_matvec_kernel`'s RESIDUAL; the same float32 add), not in a torch add after it.
# Both on: on an H100 (session 14, .gpu/call35.sh, `bench_model.py --repeats 3` through
# benchmarks/with_config.py, one run) the model's graph decode made 194.68 tok/s with both
# against 193.07 without (198.37 against 196.61 with attention's one launch too); the moe_ffn
# alone (`bench_fused.py --moe-only --default-only --moe-fusions`) 0.114 ms against 0.113 at one
# token, 0.373 against 0.379 at 4. The same bits as without them (tests, interpreter and GPU).
MOE_FFN_CONFIG: dict[str, bool] = {"int_h": True, "residual": True}
# The decode norms (`harness::rms_norm_int`, `harness::add_rms_norm_int`; the model decides per
# call with `norm_int_out`):
# - "int_out": a norm whose output a decode op reads through an "int" read (`harness::qkv` after
#   the attention norm, `harness::moe_ffn` after the feed-forward one; `int_x_path` not "kernel",
#   rows of whole super-blocks) stores that output also as `_int_x` would leave it (the norm
#   kernel's INT_OUT: `_int_x_store_tile`, the same bits), and the op takes it (its x_q, x_sums,
#   x_scales) instead of running `_int_x` on it: two launches a layer fewer in the decode graph
#   (each 1.66 us on an H100 in benchmarks/results/profile_decode.json, session 13, and a wait in
#   the chain under PDL).
# - "router": the post-attention norm and the MoE router after it as one op and one launch
#   (`harness::add_rms_norm_route`, `harness::add_rms_norm_int_route` with "int_out"; the model
#   asks `norm_routes`, `norm_route_takes_kernel` decides): `_norm_route_kernel`, the router's
#   grid (32 programs a token for Mixtral), each program taking the row's rms itself (the row
#   read again from L2), program 0 storing the norm's outputs, each making its run of normed
#   values for its partial logits, the last routing: one launch a layer fewer in decode (on an
#   H100 the router's launch took 3.8 us a layer and the norm's 3.5 us, session 13's
#   benchmarks/results/profile_decode.json), the same bits as the two ops.
#   The fused launch runs at the norm's warps (`_norm_warps`: its rms then has the norm launch's
#   bits; ROUTER_CONFIG's "num_warps" does not apply to it), the router's other settings as
#   `router_plan` gives them; each expert's partial logit is summed pairwise over a step's
#   columns (`_pairwise_cols`) and `_router_choose` sums over experts pairwise, so the routing
#   has the router launch's bits at any warps (tests/test_quant_fused.py checks the sums for
#   sm_90; a plain tl.sum split 3 experts' rows over two of the norm's 8 warps on an H100).
# Both on since session 18. On an H100 (session 17, benchmarks/results/model_switches.json, bench_model.py
# --repeats 3 a setting, one run) the graph decode made 198.52 tok/s with "int_out" (and
# attention's) and 199.85 with "router" against 198.34 without; with both and attention's
# "int_out" over qkv's one launch, 204.09 against 203.18 (a second run). The GPU tests then
# failed: the fused launch's routing weights differed from the router launch's in the last bits
# (a plain tl.sum's order at 3 experts; then, summed pairwise, at every expert count: FMAs can
# fuse a product into the first additions);
# `_router_logits` now rounds each product on its own and sums pairwise. In session 18 the GPU
# tests passed (17 of `run_gpu.sh`'s TESTS_K, .gpu/s18a.sh), and the graph decode made 205.03
# tok/s with both and attention's "int_out" against 202.68 and 202.93 without (one run).
NORM_CONFIG: dict[str, bool] = {"int_out": True, "router": True}
# `harness::qkv`'s decode (1..MATVEC_MAX_ROWS tokens):
# - "one_launch": where its weights make two runs of different types (`pack_rows`; Mixtral's
#   Q4_K_M: q Q4_K, k and v Q8_0 in one buffer) and both are "int" reads, one launch of
#   `_matvec_two_runs_kernel` makes both (programs [0, P_q) the first run's plan, q's, the rest the
#   second's, k+v's, each plan as its own launch would run it: its constexprs, tiles, splits,
#   partials and counters; the same bits), not a `_matvec_kernel` launch each.
#   Each launch alone is too small to fill the GPU: on an H100 (benchmarks/results/
#   profile_decode.json, session 13) 8.9 us and 8.1 us a layer, each at about 35% of copy
#   bandwidth. Its num_warps is the larger of the two runs' settings. One run, or three (k and v
#   of one type in two buffers), and everything else keep a launch a run.
#   On for calls of up to "one_launch_rows" tokens. On an H100 (session 17, benchmarks/results/
#   model_switches.json, one run of `bench_model.py --repeats 3` per setting) the model's graph
#   decode made 203.00 tok/s with it against 198.34 without. At op level (qkv_one_launch.json,
#   `bench_fused.py --qkv-only --sweep-qkv`, in a graph) one launch took 0.013 ms against 0.016
#   at one token with k+v Q8_0 (1.26x), 0.016 against 0.017 with k+v Q6_K; at 4 and 8 tokens it
#   won with Q8_0 (1.29x, 1.13x) but lost with Q6_K (0.89x, 0.79x), so it stays at one token.
#   (sm_90: no spills, 128 registers a thread for Q4_K with Q8_0 or Q6_K.)
QKV_CONFIG: dict[str, bool | int] = {"one_launch": True, "one_launch_rows": 1}
MATMAT_CONFIG: dict[GGMLType, dict[str, int]] = {
    qtype: {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2} for qtype in PARTS
}

# How the matrix-vector kernel reads Q4_K and Q5_K (decode): "vec", `_q4_k_dot_vec` (16-byte
# loads of weights and x, two integer ops a nibble); "words", the older `_q4_k_dot` (Q4_K) and
# `_tile_q5_k` (Q5_K); "int", integer dot products (PTX dp2a) against x quantized to int16 per
# 32 values (`_int_x_super`, see `int_x_path`), for Q4_K, Q5_K, and Q6_K and Q8_0 repacked (`_q4_k_dot_int`,
# `_q6_k_dot_int`, `_q8_0_dot_int`). HARNESS_MATVEC picks one at import, "int" by default (on an
# H100, `benchmarks/sweep_matvec.py --compare --paths vec,int`: the Q4_K/Q6_K moe_ffn 158 us
# against 173 us, the Q6_K head 59 us against 78 us); `matvec_path` may be set later
# (benchmarks compare them). Other types: one kernel for each layout (see `kernel_weight`);
# `matvec_paths` says which choices read a weight differently.
MATVEC_PATHS = ("int", "vec", "words")
MATVEC_PATH_TYPES = (T.Q4_K, T.Q5_K)  # the types "vec" and "words" choose for
INT_READ_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)  # the types "int" reads (Q6_K and Q8_0 repacked)
matvec_path = os.environ.get("HARNESS_MATVEC", "int")
# Where the "int" reads quantize x: "kernel", `_matvec_kernel` itself, each program the
# super-blocks it reads (`_int_x_super` on float32 x, a few KB a super-block from L2), with no
# launch of its own; "launch", `_int_x_kernel` first (one launch per op's x, `_int_x`), read
# back by the matrix-vector kernel. Both take one formula (`_int_x_super`): the same bits under the
# interpreter (its cuda comparison failed once on an H100 without saying how; it now does).
# "auto" (the default): "launch" inside `graph_step` (the decode graph's warm-up and capture),
# else "kernel". On an H100 (.gpu/call21.sh, bench_model on the 8x7B Q4_K_M file, one run) a
# graph's decode was 192.2
# tok/s under "launch" against 149.9 under "kernel" (the product's own quantization costs more
# instructions a weight byte than the launch does: benchmarks/results/sass_matvec.json), while an
# eager step, bound by host time, saves a launch a product under "kernel" (129 a token).
# HARNESS_INT_X picks one at import; `int_x_path` may be set later (benchmarks compare them).
INT_X_PATHS = ("auto", "kernel", "launch")
int_x_path = os.environ.get("HARNESS_INT_X", "auto")

# How a product of more than MATVEC_MAX_ROWS rows (prefill) runs:
# - "dequant": the weight is dequantized into a float16 scratch (harness.quant.kernels, a
#   bandwidth-bound kernel) and multiplied on tensor cores: torch.matmul (cuBLAS) for a dense
#   weight, a grouped float16 GEMM in Triton (`_grouped_kernel`) for experts;
# - "tiled": `_matmat_kernel`, which dequantizes in registers for every row block, in float32
#   (tf32 products);
# - "tiled16": the same kernel on float16 tiles: the weight's values rounded to float16 in
#   registers (as "dequant" rounds them into its scratch) against the activation rows divided by
#   their peak (`_scaled_half`, as "dequant"): "dequant"'s arithmetic without its scratch, whose
#   writing and reading back is most of a prefill's memory traffic (a weight is read as blocks,
#   once per row block of its pairs).
# A weight with values beyond float16's range (WIDE) takes "tiled" whichever is chosen.
# HARNESS_PREFILL picks one at import; `prefill_path` may be set later (benchmarks compare them).
PREFILL_PATHS = ("dequant", "tiled", "tiled16")
prefill_path = os.environ.get("HARNESS_PREFILL", "dequant")
# The float16 scratch of one grouped launch is at most this many bytes: experts are dequantized in
# chunks that fit (Mixtral-8x7B: the gate and up weights of 2 experts of 14336x4096, 470 MB, per
# gated launch; 4 experts' down weights per launch). A dense weight is dequantized whole (its
# largest, a 32000x4096 output head, is 262 MB). The scratch comes from torch's caching allocator
# and is freed before the next one is made, so the same block is reused.
SCRATCH_MAX_BYTES = 512 << 20
# `_grouped_kernel`'s launch settings: one weight (moe_ffn's down product), and gated (gate and
# up in one launch: two accumulators; at 4 warps its sm_90 build takes all 255 registers a
# thread, at 8 warps 128, no spills either way). Not swept on a GPU yet for the gated kernel
# (`benchmarks/bench_fused.py --sweep-grouped`).
GROUPED_CONFIG: dict[str, int] = {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4}
GATED_GROUPED_CONFIG: dict[str, int] = {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
# The prefill sorts its pairs by expert in one launch of one program (`_sort_by_expert_kernel`,
# which compares each pair with every expert: pairs x experts work, in sequence) up to this many
# pairs x experts (rounded up to a power of two): with Mixtral's 8 experts up to 65,536 pairs
# (32,768 tokens at k=2), with 128 experts up to 4,096 pairs. Past it, torch's ops (about 25
# launches, each of them parallel). Not timed on a GPU yet.
SORT_KERNEL_MAX = 1 << 19

_enabled = os.environ.get("HARNESS_FUSED", "1") != "0"

# How `harness::attention` runs (`attention_takes_kernels` decides per call): "triton", its
# kernels for decode-sized calls (flash-decoding attention over splits of the cache, with the
# rope, the cache write and the merge of the splits in one launch; in a second launch under
# ATTENTION_TWO_LAUNCHES's settings), the torch path for the
# rest; "torch", the torch path always. HARNESS_ATTENTION picks one at import; `attention_path`
# may be set later (benchmarks compare both).
ATTENTION_PATHS = ("triton", "torch")
attention_path = os.environ.get("HARNESS_ATTENTION", "triton")
ATTENTION_MAX_TOKENS = MATVEC_MAX_ROWS  # tokens of a call up to which the kernels run (decode)
ATTENTION_MAX_ROWS = 32  # queries of one KV head (group * tokens) in one program's tile
# BS keys per loop step (64 spills registers on sm_90 at 32 query rows; BS 32 with 2 stages
# does not: tests/test_quant_fused.py compiles it for sm_90); the launch has as many splits as
# give the cache's length (the whole cache in the static-shape step) at least split_min_keys
# keys a split, and the kernel spreads the keys its queries see over them in whole BS steps.
# Session 7's H100 sweep (`bench_fused.py --attention-only
# --sweep-attention`, Mixtral's 32/8 heads, T=1): 64 takes 512 cached keys in 0.019-0.021 ms
# against 256's 0.053-0.056 (more splits fill the device), and 0.064 against 0.062 at 4096.
# The default is 32 (Mixtral's static 640-key cache: 20 splits a KV head, 160 programs for an
# H100's 132 multiprocessors, one loop step each; 17 splits with keys at 513), its splits
# costing no merge launch (ATTENTION_TWO_LAUNCHES keeps 64).
# "dot": the products' tl.dot input_precision: "ieee", float32 FMAs (the torch path's
# arithmetic); "tf32x3", three TF32 tensor-core products each, near float32 (a loop of 942
# instructions for sm_90, not 1564; neither timed nor checked against ATTENTION_MAX_ABS on a GPU
# yet: `bench_fused.py --attention-only --sweep-attention` gives its time and NMSE).
# "fold_rope": the rope on q and k and the cache write run inside the attention launch (its
# programs rotate their queries, the last split the new keys; `_attention_kernel`'s ROPE), not
# in a launch of their own before it (`_rope_cache_kernel`): one launch and one wait for the
# kernel before fewer in the decode chain (session 12's profile: the rope launch took 1.7 us a
# layer, nearly all of it waiting and launching). On an H100 (session 13, .gpu/call29.sh,
# `bench_fused.py --attention-only`, one run) a decode token's call at 513 keys took 0.016 ms
# against 0.018 with the rope launch, in a graph.
# "fold_merge_rows": up to this many query rows a KV head (group * tokens), the splits' partial
# results are merged by the last of each KV head's programs to arrive (an int32 arrival counter
# per KV head, `_split_counters`; `_attention_merge`), not by `_attention_merge_kernel` in a
# launch after: one launch a layer. One program then reads a KV head's splits * rows * head dim
# partials (Mixtral's decode token: 20 * 4 * 128 floats, 40 KB), where the merge launch spreads
# them over a program a row: so not for many rows (8 tokens: 320 KB); 0: never, the merge launch.
# It loads them in steps of at most "merge_floats" a thread (64: Mixtral's decode token's 20
# splits in 2 steps; more spilled registers on sm_90 at 16 rows).
# "min_rows": the least rows of a program's query tile (a KV head's group * tokens queries,
# rounded up to a power of two): Triton (3.6, 3.9) takes a float32 tl.dot of any rows (its FMA form
# computes only those), so 1 can be taken; at 16 (Mixtral's decode token, 4 rows in a tile
# of 16) 3/4 of the FMAs are padding; sm_90 loop of 32 keys 632 instructions, 257 FFMA, against
# 1597, 1026 FFMA: benchmarks/sass_attention.py). (Broadcast products with tl.sum compiled to
# more: 2636, Triton spread the head dim over warps and shuffled for every sum.)
# The defaults are the one-launch form (the merge inside, query tiles of the group's rows,
# 32-key splits). On an H100 (session 14, .gpu/call35.sh, one run) the model's graph decode made
# 196.61 tok/s with it against 193.07 with ATTENTION_TWO_LAUNCHES (session 13's defaults: the
# merge launch, tiles of 16 rows, 64-key splits), and a decode token's call at 513 keys took
# 0.015 ms against 0.016 in a graph (`bench_fused.py --attention-only`, which times both).
# "int_out" (the model decides per call with `attention_int_out`): where the output projection
# after it (`harness::qmatmul`) reads attention's output through an "int" read (`int_x_path` not
# "kernel", a decode call, rows of whole super-blocks) and head dims are a multiple of 32, the
# program that writes each output row (unsplit, the one-launch merge, or ATTENTION_TWO_LAUNCHES's
# merge launch) stores it also as `_int_x` would leave it (INT_OUT: `_int_x_store_rows`, the
# same bits; a KV head's group of query heads is whole 32-value blocks of a row), and
# `harness::attention_int` hands it to the projection (its x_q, x_sums, x_scales) instead of an
# `_int_x` launch on it: one launch a layer fewer in the decode graph (1.66 us on an H100 in
# benchmarks/results/profile_decode.json, session 13, and a wait in the chain under PDL).
# "int_out_rows": the attention launch stores the int form from query tiles of up to this many
# rows (its merge at 16 rows spilled 16 registers on sm_90 with the store, none without; at 4
# and 8 rows none, 141 and 199 registers against 163 and 162); from a larger tile an `_int_x`
# launch after it makes the form (the merge launch, a row a program, always stores it).
# On since session 18, timed with NORM_CONFIG's (see there). On an H100 (session 17) the merge launch's form at
# T=2, group 8, head dim 64 differed from `_int_x` of the stored output in x_sums' and x_scales'
# last bits, its q the same (made from the row in registers; why those differ from the stored
# bits is not established); it now makes the form from the stored row, and the GPU tests passed
# in session 18.
ATTENTION_CONFIG: dict[str, int | str | bool] = {
    "BS": 32, "num_warps": 4, "num_stages": 2, "merge_warps": 4, "split_min_keys": 32, "dot": "ieee",
    "fold_rope": True, "fold_merge_rows": 8, "min_rows": 1, "merge_floats": 64, "int_out": True,
    "int_out_rows": 8,
}  # fmt: skip
ATTENTION_TWO_LAUNCHES = {"fold_merge_rows": 0, "min_rows": 16, "split_min_keys": 64}

# `harness::router_topk` takes its Triton kernel (`router_takes_kernel` decides per call) for
# decode-sized calls with the router's float32 weight: one launch for the logits, the softmax,
# the top k and their renormalized weights (the torch path is ~9 launches). A call is
# latency-bound: between two layers' routers the experts' weights flush L2, so each call reads
# its weight (Mixtral's 8 x 4096, 128 KB) from DRAM. One program per token reading it in 64 KB
# steps took 8.8 us a call on an H100 (session 7's decode profile), so the columns are split:
# up to "splits" programs a token (`router_plan`), each storing partial logits that the last of
# them sums and routes; each loads its weight before it waits for the kernel before (PDL: the
# weight is no kernel's output). 32 splits: Mixtral's router in runs of 128 columns, 4 KB a
# program, the whole run one loop step of "tile" 1024 products (8 floats, two 16-byte loads, a
# thread at 4 warps); 32 programs a token, 256 at 8 tokens: one wave on an H100's 132 SMs; the
# last program reads 32 partials of 32 B at once. More splits halve a program's reads but
# double the partials and the programs. Chosen by that reasoning, not yet timed:
# `benchmarks/bench_fused.py --router-only --sweep-router` times it against other settings and
# the one-program kernel ("splits" 1, "tile" 16384, 8 warps: the kernel before splits). Under
# NORM_CONFIG "router" the same programs run inside the norm's launch (`_norm_route_kernel`).
ROUTER_MAX_EXPERTS = 64
ROUTER_CONFIG: dict[str, int] = {"splits": 32, "tile": 1024, "num_warps": 4, "num_stages": 1}

# Programmatic dependent launch (Hopper and later, `pdl_options`): each decode kernel (the
# matrix-vector product, its x preparation, the norms, the attention's launches, the router) is
# launched so that it may start while the kernel before it on the stream is finishing. Its first
# act is to wait for that kernel (`_pdl_start`: griddepcontrol.wait, which returns once the
# previous grid has completed and its writes are visible) before it reads or writes anything;
# then it lets the next one start. What it saves is each launch's start-up gap, hundreds of them
# a decode step (inside a CUDA graph too: captured launches keep the attribute). HARNESS_PDL=0
# turns it off at import; `pdl` may be set later (benchmarks compare both).
pdl = os.environ.get("HARNESS_PDL", "1") != "0"


@contextlib.contextmanager
def disabled():
    """Inside the block no weight takes the fused kernels (the torch path runs): for comparisons."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def matvec_config(code: int) -> dict[str, int]:
    """The launch setting (a dict of MATVEC_CONFIG, PACKED_MATVEC_CONFIG or INT_MATVEC_CONFIG,
    which sweeps may change) of the matrix-vector kernel for a weight of `code` under the
    current `matvec_path`."""
    if _reads_int(code, _matvec_path()):
        return INT_MATVEC_CONFIG[code & 0xFF]
    return (PACKED_MATVEC_CONFIG if code & PACKED else MATVEC_CONFIG)[code & 0xFF]


def _reads_int(code: int, path: str) -> bool:
    """Whether `path` reads a weight of `code` with integer dot products (interleaved Q4_K under
    every path: no other read knows its layout)."""
    if _interleaved(code):
        return True
    if path != "int":
        return False
    qtype = code & 0xFF
    return qtype in INT_READ_TYPES and (qtype in MATVEC_PATH_TYPES or bool(code & PACKED))


def _interleaved(code: int) -> bool:
    """Whether a weight of `code` (`kernel_weight`'s) is in an interleaved layout (`pack`): Q4_K
    repacked, or Q6_K's packed rows interleaved (INTERLEAVED)."""
    return bool(code & PACKED) and (code & 0xFF == T.Q4_K or bool(code & INTERLEAVED))


def matvec_paths(code: int) -> tuple[str, ...]:
    """The values of `matvec_path` under which the matrix-vector kernel reads a weight of `qtype`
    code `code` (`kernel_weight`) each its own way, in MATVEC_PATHS' order (one value: the path
    does not matter)."""
    if _interleaved(code):
        return ("int",)
    qtype = GGMLType(code & 0xFF)
    reads = {
        "vec",
        *(("words",) if qtype in MATVEC_PATH_TYPES else ()),
        *(("int",) if _reads_int(code, "int") else ()),
    }
    return tuple(path for path in MATVEC_PATHS if path in reads)


def supports(qtype: GGMLType, device: torch.device, in_features: int) -> bool:
    """Whether a weight of `qtype` with rows of `in_features` on `device` takes the fused kernels."""
    return qtype in PARTS and in_features % SUPER == 0 and runs_on(device)


def supports_all(weights: list[tuple[GGMLType, torch.device, int]]) -> bool:
    """Whether every (qtype, device, in_features) of `weights` takes the fused kernels
    (`supports`), with `runs_on` asked once per run of one device."""
    last = None
    for qtype, device, in_features in weights:
        if qtype not in PARTS or in_features % SUPER:
            return False
        if last is None or device != last:
            if not runs_on(device):
                return False
            last = device
    return True


# -- the layout the kernels read ---------------------------------------------------------------
# A weight that takes the kernels is prepared once, when its module is built (`kernel_weight`):
# its blocks may be repacked (`pack`), and its values' range checked. The ops' `qtype` argument
# says what was done: the GGML type | PACKED | WIDE. This is the one place that decides.
PACKED = 1 << 8  # the blocks are in `pack`'s layout
Q4_K_TILE = 32  # rows of a tile of interleaved Q4_K (`pack`)
WIDE = 1 << 9  # some value is beyond float16's range: prefill keeps the weight in float32 (tiled)
INTERLEAVED = 1 << 10  # (with PACKED) Q6_K's packed rows interleaved in groups of rows (`pack`)
Q6_K_GROUP = 8  # rows of a group of interleaved Q6_K: the rows a warp of its int read takes
HALF_MAX = 65504.0
# Q6_K's 16 int8 scales of a block, as `pack` stores them: index 4f + 2c + h holds GGUF's
# scale 8c + 2f + h (half c of the block, quarter f of the half, sub-block h of the quarter):
# GGUF's 16 bytes as a [2, 4, 2] grid (c, f, h) with its first two axes swapped. Done with views
# and copies, no index tensor (which would be uploaded, and cannot be inside a CUDA graph).
_Q6_K_SCALE_GRID = (2, 4, 2)
# The planes of a repacked row, in order: (first byte in the block, bytes, None where the bytes
# keep their order, else the grid whose first two axes the packed plane swaps).
_PLANES: dict[GGMLType, tuple[tuple[int, int, tuple[int, int, int] | None], ...]] = {
    T.Q6_K: ((0, 128, None), (128, 64, None), (192, 16, _Q6_K_SCALE_GRID), (208, 2, None)),  # ql qh sc d
    T.Q8_0: ((2, 32, None), (0, 2, None)),  # qs d
}


def packs(qtype: GGMLType, in_features: int, out_features: int) -> bool:
    """Whether a weight of `qtype` with `out_features` rows of `in_features` is repacked for the
    kernels: Q6_K (210-byte blocks) and Q8_0 (34), whose blocks are 2-byte aligned (their bytes do
    not load as wide words), when their rows are whole multiples of 16 bytes, so that every plane
    of every row starts 16-byte aligned; Q4_K under PACK_CONFIG "q4_k_interleave" when its rows
    make whole tiles of 32 (`pack`). (Which packed Q6_K is also interleaved: `interleaves`.)"""
    if in_features % SUPER:
        return False
    if qtype == T.Q4_K:
        return PACK_CONFIG["q4_k_interleave"] and out_features % Q4_K_TILE == 0
    if qtype not in _PLANES:
        return False
    return in_features // block_size(qtype) * type_size(qtype) % 16 == 0


def interleaves(qtype: GGMLType, in_features: int, out_features: int) -> bool:
    """Whether a Q6_K weight that `packs` is also interleaved (`pack`'s interleave): under
    PACK_CONFIG "q6_k_interleave", when its rows make whole groups of Q6_K_GROUP."""
    return (
        qtype == T.Q6_K
        and PACK_CONFIG["q6_k_interleave"]
        and out_features % Q6_K_GROUP == 0
        and packs(qtype, in_features, out_features)
    )


def _planes(raw: torch.Tensor, qtype: GGMLType):
    """(leading shape, blocks per row, [(plane's bytes [..., blocks, size] in the packed row,
    the block bytes it holds [..., blocks, size] in the GGUF row's layout, grid)])"""
    if qtype not in _PLANES:
        raise ValueError(f"no packed layout for {qtype.name}")
    lead, row_bytes, size = raw.shape[:-1], raw.shape[-1], type_size(qtype)
    n = row_bytes // size
    planes, at = [], 0
    for first, nbytes, grid in _PLANES[qtype]:
        planes.append((slice(at * n, (at + nbytes) * n), slice(first, first + nbytes), grid))
        at += nbytes
    return lead, n, size, planes


def pack(raw: torch.Tensor, qtype: GGMLType, interleave: bool = False) -> torch.Tensor:
    """Blocks [..., row_bytes] of a type in `_PLANES` in the kernels' layout, the same bytes
    moved: each row becomes planes, one per field, holding that field of all its blocks in
    turn (Q6_K: ql | qh | scales as `_Q6_K_SCALE_GRID` says | d; Q8_0: qs | d). Q4_K [..., out,
    row_bytes] (out % Q4_K_TILE == 0) interleaved: 16-byte chunk c of super-block s of row r at
    byte (((r // 32) * n_super + s) * 9 + c) * 512 + (r % 32) * 16 of its matrix (leading dims
    outermost). Q6_K with `interleave` (out % Q6_K_GROUP == 0): the planes of each group of 8
    rows then interleaved (`_q6_k_moved`). A new tensor on raw's device, written field by field."""
    if qtype == T.Q4_K:
        return _q4_k_moved(raw, to_packed=True)
    if interleave and qtype != T.Q6_K:
        raise ValueError(f"only Q6_K's packed rows interleave, not {qtype.name}'s")
    lead, n, size, planes = _planes(raw, qtype)
    blocks = raw.reshape(*lead, n, size)
    out = torch.empty_like(raw)
    for packed, field, grid in planes:
        target = out[..., packed].view(*lead, n, -1)
        if grid is None:
            target.copy_(blocks[..., field])
        else:
            swapped = (grid[1], grid[0], *grid[2:])
            target.unflatten(-1, swapped).copy_(blocks[..., field].unflatten(-1, grid).transpose(-3, -2))
    return _q6_k_moved(out, to_interleaved=True) if interleave else out


def _q4_k_moved(raw: torch.Tensor, to_packed: bool) -> torch.Tensor:
    """Q4_K blocks [..., out, row_bytes] moved from GGUF's layout to `pack`'s interleaved one
    (to_packed) or back: a new tensor of raw's shape. Its 16-byte chunks, as [..., tile, row, s,
    c, byte] in GGUF's order (chunk c of super-block s of row `row` of 32-row tile `tile`), are
    [..., tile, s, c, row, byte] in `pack`'s."""
    lead, out, n = raw.shape[:-2], raw.shape[-2], raw.shape[-1] // 144
    if out % Q4_K_TILE or raw.shape[-1] % 144:
        raise ValueError(
            f"Q4_K interleaves whole tiles of {Q4_K_TILE} rows of whole blocks, not {tuple(raw.shape)}"
        )
    at, tiles = len(lead), out // Q4_K_TILE
    if to_packed:  # (tile, row, s, c, byte) -> (tile, s, c, row, byte)
        chunks, order = raw.reshape(*lead, tiles, Q4_K_TILE, n, 9, 16), (at, at + 2, at + 3, at + 1, at + 4)
    else:  # (tile, s, c, row, byte) -> (tile, row, s, c, byte)
        chunks, order = raw.reshape(*lead, tiles, n, 9, Q4_K_TILE, 16), (at, at + 3, at + 1, at + 2, at + 4)
    return chunks.permute(*range(at), *order).contiguous().view(raw.shape)


def _q6_k_moved(raw: torch.Tensor, to_interleaved: bool) -> torch.Tensor:
    """Packed Q6_K rows [..., out, row_bytes] (`pack`'s planes) moved to the interleaved layout
    (to_interleaved) or back: a new tensor of raw's shape. Each group of Q6_K_GROUP (8) rows
    (leading dims outermost) is one run of bytes, row r8 of the group in the 16-byte lane r8
    of each 128-byte run: per super-block s, 1664 bytes: its ql's words 16c + 8u + 4h + w4 (u:
    quarters f = u, u + 2) at byte 512u + 256c + 128h + 16r8 + 4w4 (two 512-byte units, u = 0,
    1), its qh's words 8c + 4h + w4 at 1024 + 256c + 128h + 16r8 + 4w4, its scale chunk at 1536
    + 16r8; then (at 1664 n_super) the d plane's chunk j (super-blocks 8j..8j+7) at 128j + 16r8.
    The int read's warp loads (8 rows x (c, h), 16 bytes a thread: `_q6_k_int_words`) are then
    512 contiguous bytes each."""
    raw = raw.contiguous()
    lead, out, row_bytes = raw.shape[:-2], raw.shape[-2], raw.shape[-1]
    n = row_bytes // 210
    if out % Q6_K_GROUP or row_bytes != 210 * n or n % 8:
        raise ValueError(
            f"Q6_K interleaves whole groups of {Q6_K_GROUP} rows of 8k blocks, not {tuple(raw.shape)}"
        )
    moved = torch.empty_like(raw)
    planes, grouped = (raw, moved) if to_interleaved else (moved, raw)
    at = len(lead) + 1  # the axis after the group's: a row's in `planes`, a super-block's in `grouped`
    rows = planes.view(*lead, out // 8, 8, row_bytes)  # (group, r8, ...)
    runs = grouped.view(*lead, out // 8, 8 * row_bytes)
    units = runs[..., : 1664 * n].view(*lead, out // 8, n, 104, 16)  # (group, s, chunk, byte)
    pairs = (  # (a plane's chunks with axes in the group's order, the group's chunks)
        # ql (r8, s, c, u, h) -> (s, u, c, h, r8)
        (rows[..., : 128 * n].unflatten(-1, (n, 2, 2, 2, 16)).permute(*range(at - 1), at - 1, at + 1, at + 3,
         at + 2, at + 4, at, at + 5), units[..., :64, :].unflatten(-2, (2, 2, 2, 8))),
        # qh (r8, s, c, h) -> (s, c, h, r8)
        (rows[..., 128 * n : 192 * n].unflatten(-1, (n, 2, 2, 16)).permute(*range(at - 1), at - 1, at + 1,
         at + 2, at + 3, at, at + 4), units[..., 64:96, :].unflatten(-2, (2, 2, 8))),
        # scales (r8, s) -> (s, r8)
        (rows[..., 192 * n : 208 * n].unflatten(-1, (n, 16)).transpose(at, at + 1), units[..., 96:, :]),
        # d (r8, j) -> (j, r8)
        (rows[..., 208 * n :].unflatten(-1, (n // 8, 16)).transpose(at, at + 1),
         runs[..., 1664 * n :].unflatten(-1, (n // 8, 8, 16))),
    )  # fmt: skip
    for plane, group in pairs:
        if to_interleaved:
            group.copy_(plane)
        else:
            plane.copy_(group)
    return moved


def unpack(raw: torch.Tensor, qtype: GGMLType, interleaved: bool = False) -> torch.Tensor:
    """GGUF blocks [..., row_bytes] from `pack`'s layout (a new tensor; bit for bit the original;
    `interleaved`: Q6_K packed with `pack`'s interleave)."""
    if qtype == T.Q4_K:
        return _q4_k_moved(raw, to_packed=False)
    if interleaved:
        raw = _q6_k_moved(raw, to_interleaved=False)
    lead, n, size, planes = _planes(raw, qtype)
    out = torch.empty_like(raw)
    blocks = out.view(*lead, n, size)
    for packed, field, grid in planes:
        plane = raw[..., packed].reshape(*lead, n, -1)
        if grid is None:
            blocks[..., field].copy_(plane)
        else:
            swapped = (grid[1], grid[0], *grid[2:])
            blocks[..., field].unflatten(-1, grid).copy_(plane.unflatten(-1, swapped).transpose(-3, -2))
    return out


def kernel_weight(raw: torch.Tensor, qtype: GGMLType, in_features: int) -> tuple[torch.Tensor, int]:
    """A weight's blocks [..., out, row_bytes] as the ops read them, and the `qtype` code to hand
    the ops with them (module construction calls this once, for a weight on a device where
    `supports` is true): repacked when `packs`; WIDE when a value's magnitude exceeds float16's
    largest, found by dequantizing (on the weight's device, a slice at a time: one host read per
    weight, at load)."""
    code = int(qtype)
    if _max_magnitude(raw, qtype, in_features) > HALF_MAX:
        code |= WIDE
    if packs(qtype, in_features, raw.shape[-2]):
        if interleaves(qtype, in_features, raw.shape[-2]):
            return pack(raw, qtype, interleave=True), code | PACKED | INTERLEAVED
        return pack(raw, qtype), code | PACKED
    return raw, code


def placed_weight(
    raw: torch.Tensor, code: int, in_features: int, ready: bool
) -> tuple[torch.Tensor, int, bool]:
    """A weight's blocks, `qtype` code and readiness as the ops want them on raw's device, at
    construction and after each move (`nn.Module._apply`): prepared by `kernel_weight` where
    `supports` holds and it is not `ready` yet; the GGUF blocks and the plain type elsewhere.
    Moving between devices where the kernels run keeps the prepared layout."""
    qtype = GGMLType(code & 0xFF)
    if supports(qtype, raw.device, in_features):
        return (raw, code, True) if ready else (*kernel_weight(raw, qtype, in_features), True)
    return gguf_blocks(raw, code), int(qtype), False


def _packed_form(code: int) -> int:
    """The kernels' PACKED constexpr for a weight of `code`: 0 GGUF's blocks, 1 `pack`'s layout
    (interleaved for Q4_K), 2 Q6_K's packed rows interleaved (INTERLEAVED)."""
    if not code & PACKED:
        return 0
    return 2 if code & INTERLEAVED else 1


def gguf_blocks(raw: torch.Tensor, code: int) -> torch.Tensor:
    """The GGUF blocks of a weight prepared by `kernel_weight` (raw itself unless repacked)."""
    return unpack(raw, GGMLType(code & 0xFF), bool(code & INTERLEAVED)) if code & PACKED else raw


def _max_magnitude(raw: torch.Tensor, qtype: GGMLType, in_features: int) -> float:
    from harness.quant import dequant  # dequant's CUDA path imports this module's sibling

    rows = raw.reshape(-1, raw.shape[-1])
    step = max(1, (64 << 20) // (4 * in_features))  # float32 slices of at most 64 MiB
    peak = torch.zeros((), device=raw.device)
    for lo in range(0, rows.shape[0], step):
        part = rows[lo : lo + step]
        low, high = dequant.dequantize(part, qtype, (part.shape[0], in_features), torch.float32).aminmax()
        peak = torch.maximum(peak, torch.maximum(-low, high))
    return float(peak)


def _device_type(device: torch.device) -> str:
    """`device.type`, kept per device: torch makes that string anew at each read (a microsecond,
    a few times an op)."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


_DEVICE_TYPES: dict[torch.device, str] = {}


def runs_on(device: torch.device) -> bool:
    """Whether the fused kernels (these, and `rms_norm` and `rope`) run on `device` now."""
    global _cuda_usable
    if not _enabled:
        return False
    kind = _device_type(device)
    if kind == "cuda":
        # "cuda" is not the CPU emulation of one (harness.trace imports the model, which imports
        # this: the emulation cannot be active before its module is imported)
        emulation = sys.modules.get("harness.trace.emulated")
        if emulation is not None and emulation.active() is not None:
            return False
        if _cuda_usable is None:  # asked once, outside the emulation (which claims a GPU)
            _cuda_usable = kernels.supports(GGMLType.Q4_K)
        return _cuda_usable
    return kind == "cpu" and kernels.interpreting()


_cuda_usable: bool | None = None  # triton imports and has a GPU (`runs_on`)


def _check_devices(op: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of `tensors`; the device error CUDA ops raise when they are not all on one
    CUDA device (a CPU pointer handed to a GPU kernel would be read as garbage)."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{device} and {t.device}! ({op})"
            )
    kind = _device_type(device)
    if kind != "cuda" and not (kind == "cpu" and kernels.interpreting()):
        raise RuntimeError(f"{op}: expected device cuda, but got tensors on {device} (a GPU-only kernel)")
    return device


_HAS_GDC = False  # Triton has grid dependency control (set below)
if triton is not None:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401  (`_pdl_capable` reads its options)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        _HAS_GDC = True
    except ImportError:  # an older Triton, or one without NVIDIA's backend: _HAS_GDC stays False
        pass

    @triton.jit
    def _pdl_start(PDL: tl.constexpr):
        """A decode kernel's first act under programmatic dependent launch (`pdl`): wait until
        the grid before it on the stream has completed (its writes visible), then let the
        next one start launching. Nothing without PDL."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _f16(ptr):
        """The little-endian f16 at byte pointer `ptr` (any alignment), as float32."""
        lo = tl.load(ptr).to(tl.uint16)
        hi = tl.load(ptr + 1).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _byte(ptr):
        return tl.load(ptr).to(tl.int32)

    @triton.jit
    def _k_scales(raw, blk, j):
        """Q4_K/Q5_K sub-block j's 6-bit (scale, min) from the 12 bytes at blk + 4, as float32."""
        k = blk + 4 + j % 4
        a = _byte(raw + k)
        b = _byte(raw + k + 4)
        c = _byte(raw + k + 8)
        first = j < 4
        sc = tl.where(first, a & 63, (c & 0xF) | ((a >> 6) << 4)).to(tl.float32)
        mn = tl.where(first, b & 63, (c >> 4) | ((b >> 6) << 4)).to(tl.float32)
        return sc, mn

    @triton.jit
    def _interleaved_rows(e, expert_bytes, n, N, row_bytes, TILE: tl.constexpr = 32):
        """The byte offset of chunk 0 of super-block 0 of rows n (< N; others row 0) of expert e
        in interleaved Q4_K (`pack`; TILE 8: interleaved Q6_K's lane of the row, `_q6_k_moved`)."""
        return e * expert_bytes + _interleaved_row(tl.where(n < N, n, 0).to(tl.int64), row_bytes, TILE)

    @triton.jit
    def _interleaved_row(m, row_bytes, TILE: tl.constexpr = 32):
        """The byte offset of chunk 0 of super-block 0 of row m of a matrix of interleaved Q4_K
        (`pack`): tiles of 32 rows, a row's chunks 16 bytes apart in its tile (TILE 8: the
        16-byte lane of row m in the runs of its group of 8 rows of interleaved Q6_K)."""
        return (m - m % TILE) * row_bytes + (m % TILE) * 16

    @triton.jit
    def _tile_q4_k(raw, rowb, sb, P: tl.constexpr, IL: tl.constexpr = False):
        """Q4_K (d | dmin | scales[12] | qs[128]): part P = nibble P of every qs byte.
        Tile [BN, 4, 32]: g, i -> value 64g + 32P + i, sub-block j = 2g + P. IL: interleaved
        (`pack`; rowb each row's chunk 0 of super-block 0, `_interleaved_rows`): block byte k at
        chunk k // 16, 512 bytes apart, and super-blocks 4608 bytes apart."""
        blk = rowb[:, None] + sb * (4608 if IL else 144)  # [BN, 1]
        g = tl.arange(0, 4)[None, :]
        i = tl.arange(0, 32)
        sc, mn = _k_scales(raw, blk, 2 * g + P)  # [BN, 4] (bytes 4..15: chunk 0)
        dl = _f16(raw + blk) * sc
        ml = _f16(raw + blk + 2) * mn
        if IL:  # qs byte 32g + i: chunk 1 + 2g + i // 16
            at = (
                blk[:, :, None]
                + (1 + 2 * g[:, :, None] + i[None, None, :] // 16) * 512
                + i[None, None, :] % 16
            )
            q = (_byte(raw + at) >> (4 * P)) & 0xF
        else:
            q = (_byte(raw + blk[:, :, None] + 16 + g[:, :, None] * 32 + i[None, None, :]) >> (4 * P)) & 0xF
        w = dl[:, :, None] * q.to(tl.float32) - ml[:, :, None]
        cols = sb * 256 + 64 * tl.arange(0, 4)[:, None] + 32 * P + i[None, :]
        return w, cols

    @triton.jit
    def _tile_q5_k(raw, rowb, sb, P: tl.constexpr):
        """Q5_K (d | dmin | scales[12] | qh[32] | qs[128]): as Q4_K (qs at 48), with bit j of
        qh[i] as bit 4 of value 32j + i."""
        blk = rowb[:, None] + sb * 176  # [BN, 1]
        g = tl.arange(0, 4)[None, :]
        i = tl.arange(0, 32)[None, None, :]
        j = 2 * g + P
        sc, mn = _k_scales(raw, blk, j)
        dl = _f16(raw + blk) * sc
        ml = _f16(raw + blk + 2) * mn
        ql = (_byte(raw + blk[:, :, None] + 48 + g[:, :, None] * 32 + i) >> (4 * P)) & 0xF
        qh = (_byte(raw + blk[:, :, None] + 16 + i) >> j[:, :, None]) & 1
        w = dl[:, :, None] * (ql | (qh << 4)).to(tl.float32) - ml[:, :, None]
        cols = sb * 256 + 64 * tl.arange(0, 4)[:, None] + 32 * P + tl.arange(0, 32)[None, :]
        return w, cols

    @triton.jit
    def _tile_q2_k(raw, rowb, sb, P: tl.constexpr):
        """Q2_K (scales[16] | qs[64] | d | dmin): tile [BN, 8, 16]: sub-block j = 8P + jj, value
        16j + i = 2 bits at 2((j%8)//2) of qs[32(j//8) + 16(j%2) + i]; y = (d*sc)*q - dmin*m."""
        blk = rowb[:, None, None] + sb * 84
        j = 8 * P + tl.arange(0, 8)[None, :, None]
        i = tl.arange(0, 16)[None, None, :]
        sc = _byte(raw + blk + j)
        dl = _f16(raw + blk + 80) * (sc & 0xF).to(tl.float32)
        ml = _f16(raw + blk + 82) * (sc >> 4).to(tl.float32)
        q = (_byte(raw + blk + 16 + 32 * (j // 8) + 16 * (j % 2) + i) >> (2 * ((j % 8) // 2))) & 3
        w = dl * q.to(tl.float32) - ml
        cols = sb * 256 + 128 * P + 16 * tl.arange(0, 8)[:, None] + tl.arange(0, 16)[None, :]
        return w, cols

    @triton.jit
    def _tile_q3_k(raw, rowb, sb, P: tl.constexpr):
        """Q3_K (hmask[32] | qs[64] | scales[12] | d): tile [BN, 8, 16]: sub-block j = 8P + jj;
        low 2 bits as Q2_K (qs at 32), minus 4 unless bit j//2 of hmask[16(j%2) + i]; y = (d*sc)*q."""
        blk = rowb[:, None, None] + sb * 110
        j = 8 * P + tl.arange(0, 8)[None, :, None]
        i = tl.arange(0, 16)[None, None, :]
        lo = (_byte(raw + blk + 96 + j % 8) >> (4 * (j // 8))) & 0xF
        hi = (_byte(raw + blk + 104 + j % 4) >> (2 * (j // 4))) & 3
        dl = _f16(raw + blk + 108) * ((lo | (hi << 4)) - 32).to(tl.float32)
        ql = (_byte(raw + blk + 32 + 32 * (j // 8) + 16 * (j % 2) + i) >> (2 * ((j % 8) // 2))) & 3
        hb = (_byte(raw + blk + 16 * (j % 2) + i) >> (j // 2)) & 1
        w = dl * (ql - 4 + 4 * hb).to(tl.float32)
        cols = sb * 256 + 128 * P + 16 * tl.arange(0, 8)[:, None] + tl.arange(0, 16)[None, :]
        return w, cols

    @triton.jit
    def _tile_q4_0(raw, rowb, sb, P: tl.constexpr):
        """Q4_0 (d | qs[16]), blocks 4P..4P+3 of the eight: tile [BN, 4, 32]: value 32b + i =
        nibble i//16 of qs[i%16], minus 8, times d."""
        b = 4 * P + tl.arange(0, 4)[None, :, None]
        i = tl.arange(0, 32)[None, None, :]
        blk = rowb[:, None, None] + (sb * 8 + b) * 18
        q = (_byte(raw + blk + 2 + i % 16) >> (4 * (i // 16))) & 0xF
        w = _f16(raw + blk) * (q - 8).to(tl.float32)
        cols = sb * 256 + 128 * P + 32 * tl.arange(0, 4)[:, None] + tl.arange(0, 32)[None, :]
        return w, cols

    @triton.jit
    def _tile_iq4_xs(raw, rowb, sb, P: tl.constexpr, lut):
        """IQ4_XS (d | scales_h u16 | scales_l[4] | qs[128]): tile [BN, 4, 32]: sub-block
        j = 4P + jj, value 32j + i = grid[nibble i//16 of qs[16j + i%16]] * d*(scale_j - 32)."""
        blk = rowb[:, None, None] + sb * 136
        j = 4 * P + tl.arange(0, 4)[None, :, None]
        i = tl.arange(0, 32)[None, None, :]
        lo = (_byte(raw + blk + 4 + j // 2) >> (4 * (j % 2))) & 0xF
        hi = (_byte(raw + blk + 2 + j // 4) >> (2 * (j % 4))) & 3
        dl = _f16(raw + blk) * ((lo | (hi << 4)) - 32).to(tl.float32)
        q = (_byte(raw + blk + 8 + 16 * j + i % 16) >> (4 * (i // 16))) & 0xF
        w = dl * tl.load(lut + q)
        cols = sb * 256 + 128 * P + 32 * tl.arange(0, 4)[:, None] + tl.arange(0, 32)[None, :]
        return w, cols

    @triton.jit
    def _tile_q6_k(raw, rowb, sb, P: tl.constexpr):
        """Q6_K (ql[128] | qh[64] | scales int8[16] | d): tile [BN, 2, 32]: c, l -> value
        128c + 32P + l; low nibble P//2 of ql[64c + 32(P%2) + l], bits 2P.. of qh[32c + l]."""
        blk = rowb[:, None, None] + sb * 210  # [BN, 1, 1]
        c = tl.arange(0, 2)[None, :, None]
        l = tl.arange(0, 32)[None, None, :]
        ql = (_byte(raw + blk + 64 * c + 32 * (P % 2) + l) >> (4 * (P // 2))) & 0xF
        qh = (_byte(raw + blk + 128 + 32 * c + l) >> (2 * P)) & 3
        sc = tl.load(raw + blk + 192 + 8 * c + 2 * P + l // 16).to(tl.int8, bitcast=True).to(tl.float32)
        d = _f16(raw + blk + 208)
        w = (d * sc) * ((ql | (qh << 4)) - 32).to(tl.float32)
        cols = sb * 256 + 128 * tl.arange(0, 2)[:, None] + 32 * P + tl.arange(0, 32)[None, :]
        return w, cols

    @triton.jit
    def _tile_q6_k_packed(raw, rowb, sb, n_super, P: tl.constexpr, IL: tl.constexpr = False):
        """Q6_K in `pack`'s layout (per row: ql planes | qh | scales | d): the tile of `_tile_q6_k`.
        IL: interleaved (`_q6_k_moved`; rowb the row's lane, `_interleaved_rows` with TILE 8)."""
        row = rowb[:, None, None]  # [BN, 1, 1]
        c = tl.arange(0, 2)[None, :, None]
        l = tl.arange(0, 32)[None, None, :]
        if IL:  # ql byte 64c + 32u + 16h + i at 512u + 256c + 128h + i of the super-block's run
            at = row + sb * 1664 + 256 * c + 128 * (l // 16) + l % 16
            ql = (_byte(raw + at + 512 * (P % 2)) >> (4 * (P // 2))) & 0xF
            qh = (_byte(raw + at + 1024) >> (2 * P)) & 3
            scale = raw + row + sb * 1664 + 1536 + 4 * P + 2 * c + l // 16
            d = _f16(raw + row + 1664 * n_super + (sb // 8) * 128 + 2 * (sb % 8))
        else:
            ql = (_byte(raw + row + sb * 128 + 64 * c + 32 * (P % 2) + l) >> (4 * (P // 2))) & 0xF
            qh = (_byte(raw + row + 128 * n_super + sb * 64 + 32 * c + l) >> (2 * P)) & 3
            scale = raw + row + 192 * n_super + sb * 16 + 4 * P + 2 * c + l // 16
            d = _f16(raw + rowb[:, None, None] + 208 * n_super + 2 * sb)
        sc = tl.load(scale).to(tl.int8, bitcast=True).to(tl.float32)
        w = (d * sc) * ((ql | (qh << 4)) - 32).to(tl.float32)
        cols = sb * 256 + 128 * tl.arange(0, 2)[:, None] + 32 * P + tl.arange(0, 32)[None, :]
        return w, cols

    @triton.jit
    def _tile_q8_0_packed(raw, rowb, sb, n_super, P: tl.constexpr):
        """Q8_0 in `pack`'s layout (per row: qs plane | d plane): the tile of `_tile_q8_0`."""
        b = tl.arange(0, 8)[None, :, None]
        i = tl.arange(0, 32)[None, None, :]
        row = rowb[:, None, None]
        q = tl.load(raw + row + sb * 256 + 32 * b + i).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * _f16(raw + row + 256 * n_super + 2 * (sb * 8 + b))
        cols = sb * 256 + 32 * tl.arange(0, 8)[:, None] + tl.arange(0, 32)[None, :]
        return w, cols

    @triton.jit
    def _tile_q8_0(raw, rowb, sb, P: tl.constexpr):
        """Q8_0 (d | qs int8[32]), eight blocks: tile [BN, 8, 32]: b, i -> value 32b + i."""
        b = tl.arange(0, 8)[None, :, None]
        i = tl.arange(0, 32)[None, None, :]
        blk = rowb[:, None, None] + (sb * 8 + b) * 34  # [BN, 8, 1]
        q = tl.load(raw + blk + 2 + i).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * _f16(raw + blk)
        cols = sb * 256 + 32 * tl.arange(0, 8)[:, None] + tl.arange(0, 32)[None, :]
        return w, cols

    @triton.jit
    def _tile(
        raw, rowb, sb, n_super, QT: tl.constexpr, PACKED: tl.constexpr, P: tl.constexpr, BN: tl.constexpr,
        NP: tl.constexpr, lut,
    ):  # fmt: skip
        """[BN, CH] dequantized values of part P of super-block sb, and their CH columns of x
        (PACKED: the rows are in `pack`'s layout, rows of n_super super-blocks; interleaved Q4_K's
        rowb from `_interleaved_rows`; PACKED 2: Q6_K's interleaved, rowb from it with TILE 8)."""
        if QT == 12 and PACKED:  # Q4_K, interleaved
            w, cols = _tile_q4_k(raw, rowb, sb, P, True)
        elif QT == 12:  # Q4_K
            w, cols = _tile_q4_k(raw, rowb, sb, P)
        elif QT == 14 and PACKED:  # Q6_K, repacked (PACKED 2: interleaved)
            w, cols = _tile_q6_k_packed(raw, rowb, sb, n_super, P, PACKED == 2)
        elif QT == 14:  # Q6_K
            w, cols = _tile_q6_k(raw, rowb, sb, P)
        elif QT == 8 and PACKED:  # Q8_0, repacked
            w, cols = _tile_q8_0_packed(raw, rowb, sb, n_super, P)
        elif QT == 8:  # Q8_0
            w, cols = _tile_q8_0(raw, rowb, sb, P)
        elif QT == 13:  # Q5_K
            w, cols = _tile_q5_k(raw, rowb, sb, P)
        elif QT == 10:  # Q2_K
            w, cols = _tile_q2_k(raw, rowb, sb, P)
        elif QT == 11:  # Q3_K
            w, cols = _tile_q3_k(raw, rowb, sb, P)
        elif QT == 2:  # Q4_0
            w, cols = _tile_q4_0(raw, rowb, sb, P)
        else:  # IQ4_XS
            w, cols = _tile_iq4_xs(raw, rowb, sb, P, lut)
        return tl.reshape(w, (BN, 256 // NP)), tl.reshape(cols, (256 // NP,))

    @triton.jit
    def _silu_mul(g, u, ROUNDED: tl.constexpr = False):
        """silu(g) * u; ROUNDED: its last product by `_mul_rn` (with PTX: where an add follows it
        in the kernel, rounded as a store would round it, not fused into an FMA)."""
        return _mul_rn(g * tl.sigmoid(g), u, ROUNDED)

    @triton.jit
    def _q4_k_word_scales(s1, s2, s3, j):
        """Q4_K sub-block j's 6-bit (scale, min) from block words 1..3 (scales[12]), as float32."""
        shift = 8 * (j % 4)
        a = (s1 >> shift) & 0xFF
        b = (s2 >> shift) & 0xFF
        c = (s3 >> shift) & 0xFF
        first = j < 4
        sc = tl.where(first, a & 63, (c & 0xF) | ((a >> 6) << 4)).to(tl.float32)
        mn = tl.where(first, b & 63, (c >> 4) | ((b >> 6) << 4)).to(tl.float32)
        return sc, mn

    @triton.jit
    def _k_block_head(wq, blk):
        """Q4_K/Q5_K block words 0..3 at blk (int32 pointer offsets): d, dmin as float32 and the
        three words of scales[12] (`_q4_k_word_scales` reads them)."""
        head = tl.load(wq + blk)
        d = (head & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((head >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return d, dmin, tl.load(wq + blk + 1), tl.load(wq + blk + 2), tl.load(wq + blk + 3)

    @triton.jit
    def _q4_k_dot(wq, roww, sb, xp, BN: tl.constexpr):
        """[BN] dot products of x with super-block sb of BN Q4_K rows, read as int32 words.

        roww: each row's first word. Block words: 0 = d | dmin << 16, 1..3 = scales[12],
        4..35 = qs; word 4 + 8g + w holds qs[32g + 4w + b] in byte b, whose low nibble is value
        64g + 4w + b (sub-block 2g) and high nibble value 64g + 32 + 4w + b (sub-block 2g + 1).
        Per sub-block: d*sc * sum(q*x) - dmin*m * sum(x), as llama.cpp's vec_dot does."""
        blk = roww[:, None] + sb * 36  # [BN, 1]
        d, dmin, s1, s2, s3 = _k_block_head(wq, blk)
        g = tl.arange(0, 4)[None, :]  # [1, 4]
        words = tl.load(wq + blk[:, :, None] + 4 + 8 * g[:, :, None] + tl.arange(0, 8)[None, None, :])
        xcol = xp + sb * 256 + 64 * g[:, :, None] + 4 * tl.arange(0, 8)[None, None, :]  # [1, 4, 8]
        acc = tl.zeros((BN,), dtype=tl.float32)
        for h in tl.static_range(2):
            j = 2 * g + h  # [1, 4] sub-blocks of this nibble
            sc, mn = _q4_k_word_scales(s1, s2, s3, j)
            qx = tl.zeros((BN, 4, 8), dtype=tl.float32)
            xs = tl.zeros((1, 4, 8), dtype=tl.float32)
            for byte in tl.static_range(4):
                # nibble -> float exactly, without an int-to-float conversion: 2^23 + q, minus 2^23
                q = ((words >> (8 * byte + 4 * h)) & 0xF) | 0x4B000000
                xv = tl.load(xcol + 32 * h + byte)
                qx += (q.to(tl.float32, bitcast=True) - 8388608.0) * xv
                xs += xv
            acc += tl.sum((d * sc) * tl.sum(qx, axis=2) - (dmin * mn) * tl.sum(xs, axis=2), axis=1)
        return acc

    @triton.jit
    def _q4_k_dot_vec(wq, roww, sb, xp, xsum_p, BN: tl.constexpr, Q5: tl.constexpr = False):
        """[BN, 4, 8] partial dot products of super-block sb of BN Q4_K (Q5: Q5_K) rows with x
        (prepared by `_vec_x`); the row's product is their sum times 2^29 times the row's x power.
        Fewer instructions per byte than `_q4_k_dot`:
        - x comes permuted: for each group g, nibble h and byte b, the values of the 8 words w
          (64g + 32h + 4w + b) are adjacent, so x loads in the words' own layout, four floats at
          a time, and nothing moves between threads until the loop ends;
        - a nibble q at bit `at` of a word is read as a float by masking alone: the bits
          q << at (at <= 16; the top three nibbles after one shift of the word by 12) are the
          subnormal float q * 2^(at - 149), exactly, and x of that nibble position comes
          multiplied by 2^(120 - at), so every product is q * x * 2^-29 (x divided by a power
          of two >= its largest magnitude, so nothing overflows);
        - the min term uses sum(x) per sub-block from xsum, in the products' units (x * 2^-29).
        - Q5_K: the fifth bit of value 64g + 32h + 4w + b (sub-block j = 2g + h) is bit j of qh
          byte 4w + b, bit 8b + j of qh word w: masked alone it is the float 2^(bt - 149) for
          its bit bt <= 24 (one shift of the word by 12 for byte 3), which one multiply takes to
          16 * 2^(at - 149), the nibble's place, before the nibble is added (all exact).
        Block words: 0 = d | dmin << 16, 1..3 = scales[12], (Q5_K: 4 + w = qh[4w .. + 3]), then
        8g + w = qs[32g + 4w .. + 3]."""
        QS: tl.constexpr = 12 if Q5 else 4  # the first qs word of a block
        blk = roww[:, None] + sb * (44 if Q5 else 36)  # [BN, 1] in words
        d, dmin, s1, s2, s3 = _k_block_head(wq, blk)
        g = tl.arange(0, 4)[None, :]  # [1, 4]
        w = tl.arange(0, 8)[None, None, :]  # [1, 1, 8]
        words = tl.load(wq + blk[:, :, None] + QS + 8 * g[:, :, None] + w)  # [BN, 4, 8]
        high = words >> 12  # nibbles at bits 20, 24, 28 now at 8, 12, 16
        if Q5:
            qh = tl.load(wq + blk[:, :, None] + 4 + 0 * g[:, :, None] + w)  # [BN, 4, 8], same for each g
            qh_high = qh >> 12
        xg = xp + sb * 256 + 64 * g[:, :, None] + w  # [1, 4, 8]
        acc = tl.zeros((BN, 4, 8), dtype=tl.float32)
        for h in tl.static_range(2):
            j = 2 * g + h  # [1, 4] sub-blocks of this nibble
            sc, mn = _q4_k_word_scales(s1, s2, s3, j)
            part = tl.zeros((BN, 4, 8), dtype=tl.float32)
            for byte in tl.static_range(4):
                at = 8 * byte + 4 * h  # the nibble's lowest bit in the word
                src = words if at <= 16 else high
                at_ = at if at <= 16 else at - 12
                f = (src & (0xF << at_)).to(tl.float32, bitcast=True)
                if Q5:
                    bt = 8 * byte + j[:, :, None] - (12 if byte == 3 else 0)  # [1, 4, 1]
                    fh = ((qh_high if byte == 3 else qh) & (1 << bt)).to(tl.float32, bitcast=True)
                    f = fh * _pow2(at_ + 4 - bt) + f
                part += f * tl.load(xg + 32 * h + 8 * byte)
            xs = tl.load(xsum_p + sb * 8 + j)[:, :, None]  # [1, 4, 1] sum(x) of sub-block j
            # d*sc*sum(q*x) - dmin*m*sum(x) per sub-block; the x-sum term goes on w = 0 only
            ms = tl.where(w == 0, (dmin * mn)[:, :, None] * xs, 0.0)
            acc += (d * sc)[:, :, None] * part - ms
        return acc

    @triton.jit
    def _vec_x_kernel(
        x_ptr,
        out_ptr,
        xsum_ptr,
        power_ptr,
        K,
        QT: tl.constexpr,
        PEAK_BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """Super-block program_id(1) of row program_id(0) of x for `_q4_k_dot_vec` (QT 12; Q8_0,
        8, shares its sums), or `_q6_k_dot_vec` (QT 14), see `_vec_x`: the row's peak (every
        program of the row reads the whole row, a few KB from L2, so that one launch with a
        program per super-block does it all), then this super-block's permuted, scaled values
        and sums."""
        _pdl_start(PDL)
        r = tl.program_id(0).to(tl.int64)
        sb = tl.program_id(1)
        row = x_ptr + r * K
        p = tl.arange(0, PEAK_BLOCK)
        peak = tl.max(tl.abs(tl.load(row + p, mask=p < K, other=0.0)), axis=0)
        for lo in range(PEAK_BLOCK, K, PEAK_BLOCK):
            part = tl.load(row + lo + p, mask=lo + p < K, other=0.0)
            peak = tl.maximum(peak, tl.max(tl.abs(part), axis=0))
        o = tl.arange(0, 256)
        # 2^e with 2^(e-1) <= peak < 2^e (at least 2^-125, at most 2^127), 1 for a zero row
        biased = (peak.to(tl.int32, bitcast=True) >> 23) & 0xFF
        power = (tl.minimum(tl.maximum(biased, 1) + 1, 254) << 23).to(tl.float32, bitcast=True)
        power = tl.where(peak > 0, power, 1.0)
        inv = 1.0 / power  # exact: a power of two
        if sb == 0:
            tl.store(power_ptr + r, power)
        # output position o reads value src, times 2^(120 - at) for the bit `at` its field has
        # in the word as the kernel reads it
        if QT == 14:  # o = (f, b, c, h, w4): value 128c + 32f + 4(4h + w4) + b, nibble f // 2
            f, b, c, h, w4 = o // 64, (o // 16) % 4, (o // 8) % 2, (o // 4) % 2, o % 4
            src = 128 * c + 32 * f + 16 * h + 4 * w4 + b
            at = 8 * b + 4 * (f // 2)
            at = tl.where(at <= 16, at, at - 12)
            # sums: position j = 4f + 2c + h has 32 x the sum of sub-block 8c + 2f + h (16 values)
            j = tl.arange(0, 16)
            first = 16 * (8 * ((j // 2) % 2) + 2 * (j // 4) + j % 2)
            unit: tl.constexpr = 5.9604644775390625e-08  # 32 * 2^-29
            SUMS: tl.constexpr = 16
        elif QT == 8:  # o = (b, block, w): value 32 block + 4w + b, byte b (after >> 16: b % 2)
            b, blk, w = o // 64, (o // 8) % 8, o % 8
            src = 32 * blk + 4 * w + b
            at = 8 * (b % 2)
            j = tl.arange(0, 8)
            first = 32 * j
            unit: tl.constexpr = 1.862645149230957e-09  # 2^-29
            SUMS: tl.constexpr = 8
        else:  # o = (g, h, b, w): value 64g + 32h + 4w + b, nibble h of byte b
            g, h, b, w = o // 64, (o // 32) % 2, (o // 8) % 4, o % 8
            src = 64 * g + 32 * h + 4 * w + b
            at = 8 * b + 4 * h
            at = tl.where(at <= 16, at, at - 12)
            j = tl.arange(0, 8)
            first = 32 * j
            unit: tl.constexpr = 1.862645149230957e-09  # 2^-29
            SUMS: tl.constexpr = 8
        place = ((247 - at) << 23).to(tl.float32, bitcast=True)  # 2^(120 - at)
        span: tl.constexpr = 256 // SUMS
        v = tl.load(row + sb * 256 + src) * inv
        tl.store(out_ptr + r * K + sb * 256 + o, v * place)
        chunk = tl.load(row + sb * 256 + first[:, None] + tl.arange(0, span)[None, :]) * inv
        tl.store(xsum_ptr + r * (K // span) + sb * SUMS + j, tl.sum(chunk, axis=1) * unit)

    @triton.jit
    def _int_x_super(row):
        """The 256 float32 values at `row` (one super-block of a row of x) as the "int" reads take
        them: per 32-value block B, int16 q = round(32767 x / max|x|) (half away from zero) at the
        positions of the int layout, q [8, 32] (position 2(8p + w) + e of block B holds value
        32B + 4w + 2p + e); its scale max|x| / 32767, scales [8] (NaN when the block holds a NaN
        or an infinity); the sums of each 16 values, sums [16] (float32, added pairwise in a
        fixed order, so that every layout the compiler picks gives the same bits). One formula
        for `_int_x_kernel`, `_matvec_kernel`'s own quantization (INT_X) and its gated product's
        h (INT_OUT): `_int_x_blocks`."""
        o = tl.arange(0, 32)[None, :]  # position in the block
        value = 4 * ((o % 16) // 2) + 2 * (o // 16) + o % 2
        return _int_x_blocks(tl.load(row + 32 * tl.arange(0, 8)[:, None] + value))  # [8, 32]

    @triton.jit
    def _int_x_blocks(v):
        """`_int_x_super` of v [NB, 32], NB 32-value blocks each in the int layout's order of
        positions: q [NB, 32], scales [NB], sums [2 NB]."""
        NB: tl.constexpr = v.shape[0]
        peak = tl.max(tl.abs(v), axis=1)[:, None]  # [NB, 1]
        # position 16a + 8t + 4m + 2n + e holds value 16t + 8m + 4n + 2a + e: as axes (block, a,
        # t, m, n, e) of two each, the sixteens are t, summed over the others pair by pair
        halves = tl.reshape(v, (NB, 2, 2, 2, 2, 2))
        sums = tl.sum(tl.sum(tl.sum(tl.sum(halves, axis=5), axis=4), axis=3), axis=1)  # [NB, 2]: t
        # 0 * (the block's sum) is NaN when the block holds a NaN or an infinity: so is the scale
        # IEEE divisions (as torch's): a test recomputes q and the scale bit for bit
        scale = (
            tl.math.div_rn(peak, tl.full(peak.shape, 32767.0, tl.float32))
            + 0.0 * tl.sum(sums, axis=1)[:, None]
        )
        q = tl.math.div_rn(v, tl.where(peak > 0, peak, 1.0)) * 32767.0
        q = tl.where(q == q, tl.minimum(tl.maximum(q, -32767.0), 32767.0), 0.0)
        q = tl.where(q >= 0, q + 0.5, q - 0.5).to(tl.int32)  # rounded half away from zero
        return q, tl.reshape(scale, (NB,)), tl.reshape(sums, (2 * NB,))

    @triton.jit
    def _int_x_store_tile(h, row, first, N, q_ptr, scale_ptr, sum_ptr, BN: tl.constexpr):
        """Values first .. first + BN of row `row` of an x [R, N] float32, h [BN] (BN and first
        multiples of 32, N of 32), stored as `_int_x` leaves x: `_int_x_store_rows` of one tile,
        q int16 [R, N], scales [R, N / 32], sums [R, N / 16]; blocks at N or past it are not."""
        one = tl.zeros((1,), tl.int32)
        width = tl.minimum(N - first, BN)
        _int_x_store_rows(
            tl.reshape(h, (1, BN)), row + one, first + one, width, one == 0, N, q_ptr, scale_ptr, sum_ptr, BN
        )

    @triton.jit
    def _int_x_store_rows(h, row, first, width, ok, N, q_ptr, scale_ptr, sum_ptr, BN: tl.constexpr):
        """R tiles at once: h [R, BN] (BN a multiple of 32), tile i the
        values first[i] .. first[i] + width - 1 (first[i] and width multiples of 32, width <= BN:
        the values past it not stored) of row row[i] of an x [R', N] float32, stored where ok[i]
        as `_int_x` leaves x (`_int_x_blocks`: the same bits)."""
        R: tl.constexpr = h.shape[0]
        NB: tl.constexpr = BN // 32
        # value 4w + 2p + e of a block goes to position 16p + 2w + e
        v = tl.reshape(tl.permute(tl.reshape(h, (R, NB, 8, 2, 2)), (0, 1, 3, 2, 4)), (R * NB, 32))
        q, scales, sums = _int_x_blocks(v)
        block = tl.arange(0, NB)[None, :]  # [1, NB]
        live = ok[:, None] & (block < width // 32)  # [R, NB]
        row = row.to(tl.int64)
        at = (row * N + first)[:, None, None] + 32 * block[:, :, None] + tl.arange(0, 32)[None, None, :]
        tl.store(q_ptr + at, tl.reshape(q, (R, NB, 32)).to(tl.int16), mask=live[:, :, None])
        tl.store(
            scale_ptr + (row * (N // 32) + first // 32)[:, None] + block,
            tl.reshape(scales, (R, NB)),
            mask=live,
        )
        sixteen = tl.arange(0, 2 * NB)[None, :]
        tl.store(
            sum_ptr + (row * (N // 16) + first // 16)[:, None] + sixteen,
            tl.reshape(sums, (R, 2 * NB)),
            mask=ok[:, None] & (sixteen < width // 16),
        )

    @triton.jit
    def _int_x_words(q):
        """q [8, 32] of `_int_x_super` as the int32 words [8, 16] of the int layout: word 8p + w
        of block B holds the int16 values 32B + 4w + 2p (low half) and + 1 (high half)."""
        lo, hi = tl.split(tl.reshape(q, (8, 16, 2)))
        return (lo & 0xFFFF) | (hi << 16)

    @triton.jit
    def _int_x_kernel(x_ptr, q_ptr, scale_ptr, sum_ptr, K, PDL: tl.constexpr = False):
        """Super-block program_id(1) of row program_id(0) of x [R, K] float32 for the "int"
        reads when x is quantized by a launch of its own (`_int_x`, INT_X_PATHS "launch"):
        `_int_x_super`'s q (int16, in the int layout), scales and sums, stored."""
        _pdl_start(PDL)
        r = tl.program_id(0).to(tl.int64)
        sb = tl.program_id(1)
        q, scale, sums = _int_x_super(x_ptr + r * K + sb * 256)
        out = q_ptr + r * K + sb * 256 + 32 * tl.arange(0, 8)[:, None] + tl.arange(0, 32)[None, :]
        tl.store(out, q.to(tl.int16))
        tl.store(scale_ptr + r * (K // 32) + sb * 8 + tl.arange(0, 8), scale)
        tl.store(sum_ptr + r * (K // 16) + sb * 16 + tl.arange(0, 16), sums)

    @triton.jit
    def _q8_0_dot_vec(wq, roww, sb, n_super, xp, xsum_p, BN: tl.constexpr):
        """[BN, 8, 8] partial dot products of super-block sb (eight blocks) of BN Q8_0 rows in
        `pack`'s layout with x (prepared by `_vec_x`, QT 8); the row's product is their sum
        times 2^29 times the row's x power. Value 32k + 4w + b of block k is byte b of qs word
        8k + w. One xor makes every byte q + 128 (unsigned), which becomes a float by masking
        alone (bytes 2 and 3 after one shift of the word by 16), as in `_q4_k_dot_vec`; the
        -128 comes back as 128 sum(x) per block, from the sums `_vec_x` gives Q4_K.
        Row words: qs plane at 0 (64 per super-block), then the d plane (halves, 8 per one)."""
        row = roww[:, None, None]  # [BN, 1, 1]
        k = tl.arange(0, 8)[None, :, None]
        w = tl.arange(0, 8)[None, None, :]
        words = tl.load(wq + row + sb * 64 + 8 * k + w) ^ -2139062144  # ^ 0x80808080: q + 128
        high = words >> 16
        xg = xp + sb * 256 + 8 * k + w  # [1, 8, 8]
        part = tl.zeros((BN, 8, 8), dtype=tl.float32)
        for b in tl.static_range(4):
            src = words if b < 2 else high
            f = (src & (0xFF << (8 * (b % 2)))).to(tl.float32, bitcast=True)  # (q + 128) 2^(at - 149)
            part += f * tl.load(xg + 64 * b)
        halves = wq.to(tl.pointer_type(tl.float16))
        d = tl.load(halves + 2 * roww[:, None] + 128 * n_super + 8 * sb + tl.arange(0, 8)[None, :])
        xs = tl.load(xsum_p + sb * 8 + k)  # [1, 8, 1] sum(x) of block k, in the products' units
        return d.to(tl.float32)[:, :, None] * (part - tl.where(w == 0, 128.0 * xs, 0.0))

    @triton.jit
    def _pow2(e):
        """2^e as float32 (e a normal exponent)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _q6_k_dot_vec(wq, roww, sb, n_super, xp, xoff_p, BN: tl.constexpr):
        """[BN, 2, 2, 4] partial dot products of super-block sb of BN Q6_K rows in `pack`'s layout
        with x (prepared by `_vec_x`, QT 14); the row's product is their sum times 2^29 times the
        row's x power. The reads are 16-byte loads of whole words, as `_q4_k_dot_vec` does:
        - value 128c + 32f + l (half c, quarter f, l = 4w + b, w = 4h + w4): its low nibble is
          nibble f // 2 of ql byte 64c + 32(f % 2) + l, i.e. at bit 8b + 4(f // 2) of ql word
          16c + 8(f % 2) + w; its two high bits are at bit 8b + 2f of qh word 8c + w; its scale
          is number 8c + 2f + h, byte 2c + h of scale word f (`_Q6_K_SCALE_GRID`);
        - each field becomes a float by masking alone (a subnormal, exactly, as in
          `_q4_k_dot_vec`; fields above bit 16 (nibbles) or 20 (pairs) after one shift of the
          word by 12), the pair scaled to the nibble's place by one multiply, and x of that
          position comes times 2^(120 - nibble's bit), so every product is q * x * 2^-29;
        - the -32 of every value: 32 * sum(x) per sub-block, from xoff, in the products' units.
        Row words: ql plane at 0 (32 per super-block), qh at 32 n_super (16), scales at 48 n_super
        (4), d at 52 n_super (halves)."""
        row = roww[:, None, None, None]  # [BN, 1, 1, 1]
        c = tl.arange(0, 2)[None, :, None, None]
        h = tl.arange(0, 2)[None, None, :, None]
        w4 = tl.arange(0, 4)[None, None, None, :]
        ql_even = tl.load(wq + row + sb * 32 + 16 * c + 4 * h + w4)  # [BN, 2, 2, 4], f = 0, 2
        ql_odd = tl.load(wq + row + sb * 32 + 16 * c + 8 + 4 * h + w4)  # f = 1, 3
        qh = tl.load(wq + row + 32 * n_super + sb * 16 + 8 * c + 4 * h + w4)
        qh_high = qh >> 12
        d_word = tl.load(wq + roww + 52 * n_super + sb // 2)  # [BN]
        d = ((d_word >> (16 * (sb % 2))) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        xg = xp + sb * 256 + 8 * c + 4 * h + w4  # [1, 2, 2, 4]
        acc = tl.zeros((BN, 2, 2, 4), dtype=tl.float32)
        for f in tl.static_range(4):
            ql = ql_even if f % 2 == 0 else ql_odd
            ql_high = ql >> 12
            part = tl.zeros((BN, 2, 2, 4), dtype=tl.float32)
            for b in tl.static_range(4):
                at = 8 * b + 4 * (f // 2)  # the nibble's bit in its word
                bt = 8 * b + 2 * f  # the pair's
                lo = ql if at <= 16 else ql_high
                hi = qh if bt <= 20 else qh_high
                at_ = at if at <= 16 else at - 12
                bt_ = bt if bt <= 20 else bt - 12
                fl = (lo & (0xF << at_)).to(tl.float32, bitcast=True)  # nibble * 2^(at_ - 149)
                fh = (hi & (3 << bt_)).to(tl.float32, bitcast=True)  # pair * 2^(bt_ - 149)
                q = fh * _pow2(at_ + 4 - bt_) + fl  # (nibble + 16 pair) * 2^(at_ - 149), exact
                part += q * tl.load(xg + (4 * f + b) * 16)
            scale_word = tl.load(wq + roww + 48 * n_super + sb * 4 + f)[:, None, None, None]
            sc = ((scale_word << (24 - 8 * (2 * c + h))) >> 24).to(tl.float32)  # int8, sign kept
            off = tl.load(xoff_p + sb * 16 + 4 * f + 2 * c + h)  # [1, 2, 2, 1]
            acc += (d[:, None, None, None] * sc) * (part - tl.where(w4 == 0, off, 0.0))
        return acc

    # -- the "int" read: integer dot products against x quantized to int16 (`_int_x_super`) ----
    # x is taken as int16 values q with a float scale s per 32-value block B (x ~ q * s, |q| <=
    # 32767), quantized super-block by super-block by the matrix-vector kernel itself from
    # float32 x (`int_x_path` "kernel"), or by `_int_x_kernel` before it ("launch"); laid out so that int32 word 16B + 8p + w holds the two values 32B + 4w + 2p and
    # 32B + 4w + 2p + 1: the pair that bytes 2p and 2p + 1 of a weight word w multiply (Q4_K's qs
    # words, Q6_K's ql/qh words and Q8_0's qs words all hold values 4w + b of a block in byte b).
    # A weight word's bytes (unsigned quants, or Q8_0's signed ones) meet x in two PTX dp2a
    # (int16x2 . int8x2 + int32, `_dp2a`); each sub-block's int32 sum becomes a float once and
    # takes its scale d*sc*s in one multiply-add; offsets (Q4_K's mins, Q6_K's -32) come from the
    # float sums of x per 16 values. int32 cannot overflow: a sub-block's sum is at most
    # 32 * 32767 * 240 = 251,658,240 < 2^31 (Q4_K's high nibbles are read in place, times 16),
    # 32 * 32767 * 31 for Q5_K, 16 * 32767 * 63 for Q6_K and 32 * 32767 * 128 for Q8_0. Against float32 x the int16 x
    # rounds each value by at most s/2: Gaussian x times random Q4_K rows (K = 4096, float64)
    # gives NMSE 4e-10; int8 x with a scale per 32 values (llama.cpp's q8_1) gives 2.9e-5,
    # above the 1e-5 the kernels must meet. A scale per 32 values (not 256) keeps an outlier's
    # coarse steps to its own block.

    @triton.jit
    def _dp2a(a, b, c, HI: tl.constexpr, SIGNED: tl.constexpr, PTX: tl.constexpr):
        """c + a0 * b[k] + a1 * b[k + 1] elementwise (int32 tensors): a0, a1 the signed low and
        high int16 of a; b[k] byte k of b (k = 2 with HI, else 0), unsigned, or signed with
        SIGNED. PTX: one `dp2a` instruction (sm_61 and later); otherwise the same integer
        arithmetic in plain Triton ops (the interpreter cannot run inline assembly)."""
        if PTX:
            op: tl.constexpr = ("dp2a.hi" if HI else "dp2a.lo") + (".s32.s32" if SIGNED else ".s32.u32")
            return tl.inline_asm_elementwise(
                op + " $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
            )
        else:
            at: tl.constexpr = 16 if HI else 0  # the first byte's bit
            if SIGNED:
                b0 = (b << (24 - at)) >> 24  # arithmetic shifts: the byte's sign kept
                b1 = (b << (16 - at)) >> 24
            else:
                b0 = (b >> at) & 0xFF
                b1 = (b >> (at + 8)) & 0xFF
            return c + ((a << 16) >> 16) * b0 + (a >> 16) * b1

    @triton.jit
    def _dp2a_kernel(
        a_ptr, b_ptr, c_ptr, out_ptr, n, HI: tl.constexpr, SIGNED: tl.constexpr, PTX: tl.constexpr
    ):
        """out = `_dp2a`(a, b, c) elementwise over n int32 values (`dp2a`)."""
        i = tl.program_id(0) * 1024 + tl.arange(0, 1024)
        m = i < n
        a = tl.load(a_ptr + i, mask=m, other=0)
        b = tl.load(b_ptr + i, mask=m, other=0)
        c = tl.load(c_ptr + i, mask=m, other=0)
        tl.store(out_ptr + i, _dp2a(a, b, c, HI, SIGNED, PTX), mask=m)

    @triton.jit
    def _dp4(x_lo, x_hi, q, SIGNED: tl.constexpr, PTX: tl.constexpr):
        """The int32 dot products of the four bytes of each word q with the x pairs x_lo (bytes
        0, 1) and x_hi (bytes 2, 3): words 8p + w of an x block, p = 0 and 1 (`_int_x_words`)."""
        lo = _dp2a(x_lo, q, tl.zeros_like(q), False, SIGNED, PTX)
        return _dp2a(x_hi, q, lo, True, SIGNED, PTX)

    @triton.jit
    def _q4_k_dot_int(
        wq,
        blk,
        g,
        w,
        xq,
        xs,
        xsum,
        PTX: tl.constexpr,
        Q5: tl.constexpr = False,
        CS: tl.constexpr = 4,
    ):
        """[..., 4, 1] partial dot products (per group g of two sub-blocks) of the Q4_K (Q5:
        Q5_K) super-blocks at word offsets blk [..., 1, 1] (words, as `_q4_k_dot_vec` reads
        them; g [..., 4, 1] and w [..., 1, 4] aranges of that rank) with a super-block of x as
        the int reads take it: xq [8, 16] words (`_int_x_words`), xs [8] scales per 32 values,
        xsum [16] sums per 16 (`_int_x_super`; rank 3 only). Word 8g + w of qs holds values
        64g + 4w + b (low nibbles, sub-block 2g: x block 2g) and 64g + 32 + 4w + b (high
        nibbles, sub-block 2g + 1; Q4_K reads them in place, 16 times the value). Q5_K: the
        fifth bit of value 32j + 4w + b (sub-block j) is bit 8b + j of qh word w, moved to bit 4
        of byte b (the high nibbles shifted down first). CS: the words from one 16-byte chunk of a
        block to the next (`_q4_k_int_words`)."""
        return _q4_k_dot_int_words(_q4_k_int_words(wq, blk, g, w, None, Q5, CS), g, w, xq, xs, xsum, PTX, Q5)

    @triton.jit
    def _load_where(ptr, left):
        """tl.load(ptr), or (left an int scalar, not None) only where left > 0, zeros elsewhere
        (the mask made a tensor of ptr's shape: the interpreter refuses a scalar comparison's)."""
        if left is None:
            return tl.load(ptr)
        else:
            return tl.load(ptr, mask=tl.zeros(ptr.shape, tl.int32) + left > 0, other=0)

    @triton.jit
    def _q4_k_int_words(wq, blk, g, w, left, Q5: tl.constexpr = False, CS: tl.constexpr = 4):
        """The words `_q4_k_dot_int` reads of the super-blocks at word offsets blk (left None: all;
        else only where the int left > 0, zeros elsewhere, not read), as the tuple
        `_q4_k_dot_int_words` takes: its head (words 0..3, the same four for each g), qs words
        0..3 and 4..7 of each group, and Q5_K's qh words (Q4_K: the head again, unused). Block
        word 4c + i (16-byte chunk c) is at blk + c * CS + i: CS 4 in GGUF's layout, 128 in
        interleaved Q4_K's (`pack`; blk then its chunk 0)."""
        QS: tl.constexpr = 12 if Q5 else 4  # the first qs word of a block
        # every operand in the [..., 4 groups, 4 words] tile's layout (the block's scales as
        # [..., 1, 1], x's as [1, ..., 4, 4]): mixing 2-D and 3-D shapes cost layout changes
        # (shared memory and barriers) every iteration
        # the block's words 0..3 loaded as a tile of the same shape (the same four for each g),
        # each taken out of it in its thread: loaded [BN, 1, 1] they came in another layout
        head = _load_where(wq + blk + 0 * g + w, left)  # [..., 4, 4]
        # words 0..3 and 4..7 of each group as two tiles of one layout: a thread holds all eight
        # words of its (row, group), so its sums need no other thread
        if CS == 4:
            first = _load_where(wq + blk + QS + 8 * g + w, left)  # [..., 4, 4]
            second = _load_where(wq + blk + QS + 4 + 8 * g + w, left)
        else:  # interleaved Q4_K: qs words 8g + w and 8g + 4 + w in chunks 1 + 2g and 2 + 2g
            first = _load_where(wq + blk + CS + 2 * CS * g + w, left)
            second = _load_where(wq + blk + 2 * CS + 2 * CS * g + w, left)
        if Q5:  # qh words 0..3 and 4..7, the same for each g
            qh_first = _load_where(wq + blk + 4 + 0 * g + w, left)
            qh_second = _load_where(wq + blk + 8 + 0 * g + w, left)
        else:
            qh_first, qh_second = head, head
        return head, first, second, qh_first, qh_second

    @triton.jit
    def _q4_k_dot_int_words(words, g, w, xq, xs, xsum, PTX: tl.constexpr, Q5: tl.constexpr = False):
        """`_q4_k_dot_int` of the words `_q4_k_int_words` loaded."""
        head, first, second, qh_first, qh_second = words
        d_word = tl.sum(tl.where(w == 0, head, 0), axis=-1, keep_dims=True)  # [..., 4, 1]
        d = (d_word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((d_word >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        s1 = tl.sum(tl.where(w == 1, head, 0), axis=-1, keep_dims=True)
        s2 = tl.sum(tl.where(w == 2, head, 0), axis=-1, keep_dims=True)
        s3 = tl.sum(tl.where(w == 3, head, 0), axis=-1, keep_dims=True)
        # x word 8p + 4s + w of block 2g + h as axes (g, w, s, p, h); the scales and the pairs of
        # sixteens (sub-block j's sum) as (g, h)
        x_h = tl.split(tl.permute(tl.reshape(xq, (4, 2, 2, 2, 4)), (0, 4, 3, 2, 1)))
        xs_h = tl.split(tl.reshape(xs, (4, 2)))
        first16, second16 = tl.split(tl.reshape(xsum, (4, 2, 2)))
        xsum_h = tl.split(first16 + second16)
        acc = tl.zeros_like(d)
        for h in tl.static_range(2):
            j = 2 * g + h  # [..., 4, 1] the sub-blocks (and x blocks) of nibble h
            if Q5:
                q1 = ((first >> (4 * h)) & 0x0F0F0F0F) | (((qh_first >> j) << 4) & 0x10101010)
                q2 = ((second >> (4 * h)) & 0x0F0F0F0F) | (((qh_second >> j) << 4) & 0x10101010)
                unit = 1.0
            else:
                mask = 0x0F0F0F0F if h == 0 else -252645136  # 0xF0F0F0F0: 16 x the high nibbles
                q1, q2 = first & mask, second & mask
                unit = 1.0 if h == 0 else 0.0625
            x_p0, x_p1 = tl.split(x_h[h])  # [4, 4, 2] each: (g, w, s)
            x1_lo, x2_lo = tl.split(x_p0)
            x1_hi, x2_hi = tl.split(x_p1)
            x1_lo, x2_lo, x1_hi, x2_hi = x1_lo[None], x2_lo[None], x1_hi[None], x2_hi[None]
            x_scale, x_sum = xs_h[h][None, :, None], xsum_h[h][None, :, None]
            dots = _dp4(x1_lo, x1_hi, q1, False, PTX) + _dp4(x2_lo, x2_hi, q2, False, PTX)
            dots = tl.sum(dots, axis=-1, keep_dims=True)  # [..., 4, 1]
            sc, mn = _q4_k_word_scales(s1, s2, s3, j)
            acc += (d * sc) * (x_scale * unit) * dots.to(tl.float32) - (dmin * mn) * x_sum
        return acc

    @triton.jit
    def _q6_k_dot_int(
        wq, roww, sb, n_super, xq, xs, xsum, BN: tl.constexpr, PTX: tl.constexpr, IL: tl.constexpr = False
    ):
        """[BN, 2, 2] partial dot products (per half c, sub-block h of a quarter) of super-block
        sb of BN Q6_K rows in `pack`'s layout (words, as `_q6_k_dot_vec` reads them) with x as
        `_q4_k_dot_int` takes it. Value 128c + 32f + 4w + b (w = 4h + w4): its 6-bit q (0..63)
        is byte b of ((ql word >> 4(f // 2)) & 0x0F0F0F0F) | (qh word's bits 2f.. moved to
        4..5), ql word 16c + 8(f % 2) + w, qh word 8c + w; sub-block 8c + 2f + h, x block 4c + f.
        The -32 of each value: 32 times the sum of x over the sub-block's 16 values. IL: the rows
        interleaved (`_q6_k_moved`; roww each row's lane, `_interleaved_rows` with TILE 8, in
        words)."""
        words = _q6_k_int_words(wq, roww, sb, n_super, None, IL)
        return _q6_k_dot_int_words(words, None, wq, roww, sb, n_super, xq, xs, xsum, BN, PTX, IL)

    @triton.jit
    def _q6_k_int_words(wq, roww, sb, n_super, left, IL: tl.constexpr = False):
        """The ql (even and odd quarters), qh and d words `_q6_k_dot_int` reads of super-block sb
        of rows roww (left None: all; else only where the int left > 0, zeros elsewhere). IL:
        interleaved, a warp's (8 rows x (c, h)) load of each 512 contiguous bytes."""
        row = roww[:, None, None, None]  # [BN, 1, 1, 1]
        c = tl.arange(0, 2)[None, :, None, None]
        h = tl.arange(0, 2)[None, None, :, None]
        w4 = tl.arange(0, 4)[None, None, None, :]
        if IL:  # per super-block 416 words: ql even | ql odd | qh as [c, h, row of 8, 4] | scales
            at = wq + row + sb * 416 + 64 * c + 32 * h + w4
            ql_even = _load_where(at, left)  # [BN, 2, 2, 4], f = 0, 2
            ql_odd = _load_where(at + 128, left)  # f = 1, 3
            qh = _load_where(at + 256, left)
            d_word = _load_where(wq + roww + 416 * n_super + (sb // 8) * 32 + (sb % 8) // 2, left)  # [BN]
        else:
            ql_even = _load_where(wq + row + sb * 32 + 16 * c + 4 * h + w4, left)  # [BN, 2, 2, 4], f = 0, 2
            ql_odd = _load_where(wq + row + sb * 32 + 16 * c + 8 + 4 * h + w4, left)  # f = 1, 3
            qh = _load_where(wq + row + 32 * n_super + sb * 16 + 8 * c + 4 * h + w4, left)
            d_word = _load_where(wq + roww + 52 * n_super + sb // 2, left)  # [BN]
        return ql_even, ql_odd, qh, d_word

    @triton.jit
    def _q6_k_scales_at(roww, sb, n_super, IL: tl.constexpr = False):
        """The word offsets [BN] of the first of the four scale words of super-block sb."""
        if IL:
            return roww + sb * 416 + 384
        else:
            return roww + 48 * n_super + sb * 4

    @triton.jit
    def _q6_k_scale_words(wq, roww, sb, n_super, left, IL: tl.constexpr = False):
        """The four scale words [BN] of super-block sb (quarters f = 0..3), as `_q6_k_int_words`."""
        at = wq + _q6_k_scales_at(roww, sb, n_super, IL)
        return (
            _load_where(at, left),
            _load_where(at + 1, left),
            _load_where(at + 2, left),
            _load_where(at + 3, left),
        )

    @triton.jit
    def _q6_k_dot_int_words(
        words, scales, wq, roww, sb, n_super, xq, xs, xsum, BN: tl.constexpr, PTX: tl.constexpr,
        IL: tl.constexpr = False,
    ):  # fmt: skip
        """`_q6_k_dot_int` of the words `_q6_k_int_words` loaded, and the scale words
        `_q6_k_scale_words` loaded (scales None: each loaded here where it is used)."""
        ql_even, ql_odd, qh, d_word = words
        c3, h3 = tl.arange(0, 2)[None, :, None], tl.arange(0, 2)[None, None, :]  # [1, 2, 1], [1, 1, 2]
        d = ((d_word >> (16 * (sb % 2))) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        d = d[:, None, None]
        # x word 8p + 4h + w4 of block 4c + f (f = 2f1 + f0) as axes (c, h, w4, f1, f0, p); the
        # scales of block 4c + f as (c, f1, f0); the sum of sub-block 8c + 2f + h as (c, h, f1, f0)
        x_lo, x_hi = tl.split(tl.permute(tl.reshape(xq, (2, 2, 2, 2, 2, 4)), (0, 4, 5, 1, 2, 3)))
        x_lo_f, x_hi_f = _by_quarter(x_lo), _by_quarter(x_hi)
        xs_f = _by_quarter(tl.reshape(xs, (2, 2, 2)))
        xsum_f = _by_quarter(tl.permute(tl.reshape(xsum, (2, 2, 2, 2)), (0, 3, 1, 2)))
        acc = tl.zeros((BN, 2, 2), dtype=tl.float32)
        for f in tl.static_range(4):
            ql = ql_even if f % 2 == 0 else ql_odd
            low = (ql if f < 2 else ql >> 4) & 0x0F0F0F0F
            high = (qh << (4 - 2 * f) if f < 2 else qh >> (2 * f - 4)) & 0x30303030
            x_lo_op, x_hi_op = x_lo_f[f][None], x_hi_f[f][None]
            x_scale, x_sum = xs_f[f][None, :, None], xsum_f[f][None]
            dots = tl.sum(_dp4(x_lo_op, x_hi_op, low | high, False, PTX), axis=3)  # [BN, 2, 2]
            if scales is None:
                scale_word = tl.load(wq + _q6_k_scales_at(roww, sb, n_super, IL) + f)[:, None, None]
            else:
                scale_word = scales[f][:, None, None]
            sc = ((scale_word << (24 - 8 * (2 * c3 + h3))) >> 24).to(tl.float32)  # int8, sign kept
            acc += (d * sc) * (x_scale * dots.to(tl.float32) - 32.0 * x_sum)
        return acc

    @triton.jit
    def _pairwise_rows(t, BN: tl.constexpr, WIDTH: tl.constexpr):
        """t's BN rows of WIDTH (4 or 8) values each summed pairwise: (a + b) + (c + d), and for 8
        values the two halves' sums so added. A sum over an axis of two is one addition, so the
        bits do not depend on which thread holds which value (a wider tl.sum's order can)."""
        if WIDTH == 8:
            quads = tl.sum(tl.sum(tl.reshape(t, (BN, 2, 2, 2)), axis=3), axis=2)
        else:
            quads = tl.sum(tl.reshape(t, (BN, 2, 2)), axis=2)
        return tl.sum(quads, axis=1)

    @triton.jit
    def _by_quarter(t):
        """t [..., 2, 2] with axes (f1, f0) last as the tuple of t[..., f // 2, f % 2], f = 0..3."""
        even, odd = tl.split(t)
        t0, t2 = tl.split(even)
        t1, t3 = tl.split(odd)
        return t0, t1, t2, t3

    @triton.jit
    def _q8_0_dot_int(wq, roww, sb, n_super, xq, xs, BN: tl.constexpr, PTX: tl.constexpr):
        """[BN, 8] partial dot products (per block k) of super-block sb (eight blocks) of BN
        Q8_0 rows in `pack`'s layout with x as `_q4_k_dot_int` takes it (no sums): value
        32k + 4w + b of block k is the signed byte b of qs word 8k + w."""
        k = tl.arange(0, 8)[None, :, None]
        w = tl.arange(0, 8)[None, None, :]
        words = tl.load(wq + roww[:, None, None] + sb * 64 + 8 * k + w)  # [BN, 8, 8]
        x_lo, x_hi = tl.split(tl.permute(tl.reshape(xq, (8, 2, 8)), (0, 2, 1)))  # [8, 8]: (k, w)
        x_lo, x_hi, x_scale = x_lo[None], x_hi[None], xs[None, :, None]
        dots = tl.sum(_dp4(x_lo, x_hi, words, True, PTX), axis=2, keep_dims=True)  # [BN, 8, 1]
        halves = wq.to(tl.pointer_type(tl.float16))
        d = tl.load(halves + 2 * roww[:, None, None] + 128 * n_super + 8 * sb + k)  # [BN, 8, 1]
        return tl.sum((d.to(tl.float32) * x_scale) * dots.to(tl.float32), axis=2)  # (one term)

    @triton.jit
    def _int_x_read(xp, xscale, xsum, sb, INT_X: tl.constexpr):
        """Super-block sb of x as the int reads take it (`_q4_k_dot_int`): quantized here from
        float32 x at xp (INT_X), or loaded as `_int_x` left it (xp: its int32 words, xscale, xsum:
        its scales and sums)."""
        if INT_X:
            q, scales, sums = _int_x_super(xp + sb * 256)
            return _int_x_words(q), scales, sums
        else:
            i = tl.arange(0, 16)
            words = tl.load(xp + sb * 128 + 16 * tl.arange(0, 8)[:, None] + i[None, :])
            return words, tl.load(xscale + sb * 8 + tl.arange(0, 8)), tl.load(xsum + sb * 16 + i)

    @triton.jit
    def _matvec_program(
        x_ptr, w_ptr, u_ptr, out_ptr, experts_ptr, scale_ptr, lut_ptr, N, n_pairs, n_super, chunk, row_bytes,
        expert_bytes, x_stride, x_div, xsum_ptr, xpow_ptr, part_ptr, counter_ptr, out_stride, out_div, res_ptr,
        res_stride, hq_ptr, hscale_ptr, hsum_ptr, QT: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr,
        GATED: tl.constexpr, SCALED: tl.constexpr, ROUTED: tl.constexpr, VEC: tl.constexpr, PACKED: tl.constexpr,
        STAGES: tl.constexpr, REDUCE: tl.constexpr, INT: tl.constexpr, INT_X: tl.constexpr, PTX: tl.constexpr,
        UNROLL: tl.constexpr, RESIDUAL: tl.constexpr, INT_OUT: tl.constexpr, PREFETCH: tl.constexpr,
        pid_n, p, split, n_tiles, splits,
    ):  # fmt: skip
        """`_matvec_kernel`'s work for one program: output tile pid_n (of n_tiles), pair p, split
        split (of splits; both None: the grid's); a function of its own so that
        `_matvec_two_runs_kernel` runs it for each of its runs. Under PDL the kernel has waited
        (`_pdl_start`) before it."""
        e = tl.load(experts_ptr + p).to(tl.int64) if ROUTED else 0
        xp = x_ptr + (p // x_div).to(tl.int64) * x_stride
        n = pid_n * BN + tl.arange(0, BN)
        # interleaved Q4_K (`pack`): rowb is the byte offset of each row's chunk 0 of super-block
        # 0, a super-block SB_WORDS words on, a chunk CS words on; interleaved Q6_K (PACKED 2,
        # `_q6_k_moved`): the row's 16-byte lane in its group's runs
        IL: tl.constexpr = (QT == 12 and PACKED) or (QT == 14 and PACKED == 2)
        CS: tl.constexpr = 128 if IL else 4
        if IL:
            rowb = _interleaved_rows(e, expert_bytes, n, N, row_bytes, 8 if QT == 14 else 32)
        else:
            rowb = e * expert_bytes + tl.where(n < N, n, 0).to(tl.int64) * row_bytes
        acc = tl.zeros((BN,), dtype=tl.float32)
        acc_u = tl.zeros((BN,), dtype=tl.float32)
        if QT == 14:
            acc3 = tl.zeros((BN, 2, 2, 4), dtype=tl.float32)
            acc3_u = tl.zeros((BN, 2, 2, 4), dtype=tl.float32)
            xsum = xsum_ptr + (p // x_div).to(tl.int64) * (x_stride // 16)
        elif QT == 8:
            acc3 = tl.zeros((BN, 8, 8), dtype=tl.float32)
            acc3_u = tl.zeros((BN, 8, 8), dtype=tl.float32)
            xsum = xsum_ptr + (p // x_div).to(tl.int64) * (x_stride // 32)
        else:
            acc3 = tl.zeros((BN, 4, 8), dtype=tl.float32)
            acc3_u = tl.zeros((BN, 4, 8), dtype=tl.float32)
            xsum = xsum_ptr + (p // x_div).to(tl.int64) * (x_stride // 32)
        if INT:  # [BN, 4] partials, or [BN, 2, 2] for Q6_K, [BN, 8] for Q8_0
            acc_i = tl.zeros((BN, 8) if QT == 8 else (BN, 2, 2) if QT == 14 else (BN, 4), dtype=tl.float32)
            acc_i_u = tl.zeros((BN, 8) if QT == 8 else (BN, 2, 2) if QT == 14 else (BN, 4), dtype=tl.float32)
            x_row = (p // x_div).to(tl.int64)
            xsum = xsum_ptr + x_row * (x_stride // 8)  # per 16 values (x_stride: K / 2 pairs)
            xscale = xpow_ptr + x_row * (x_stride // 16)  # per 32
            g3 = tl.arange(0, 4)[None, :, None]  # [1, 4, 1]: `_q4_k_dot_int`'s groups
            w3 = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]: and words
        x_power = tl.load(xpow_ptr + p // x_div) if VEC else 1.0
        first = split * chunk
        last = tl.minimum(first + chunk, n_super)
        # W's words loaded a step ahead too (PREFETCH 2, gated: only U's, W's in their step)
        W_AHEAD: tl.constexpr = PREFETCH == 1 or not GATED
        if PREFETCH and QT == 14:  # packed Q6_K int read: as below, its words and scale words
            roww = rowb // 4
            w_next = _q6_k_int_words(w_ptr, roww, first, n_super, None, IL)
            ws_next = _q6_k_scale_words(w_ptr, roww, first, n_super, None, IL)
            u_next, us_next = w_next, ws_next  # (ungated: unused)
            if GATED:
                u_next = _q6_k_int_words(u_ptr, roww, first, n_super, None, IL)
                us_next = _q6_k_scale_words(u_ptr, roww, first, n_super, None, IL)
            for sb in tl.range(first, last, 1, num_stages=STAGES, loop_unroll_factor=UNROLL):
                more = last - 1 - sb
                if W_AHEAD:
                    w_words, w_scales = w_next, ws_next
                    w_next = _q6_k_int_words(w_ptr, roww, sb + 1, n_super, more, IL)
                    ws_next = _q6_k_scale_words(w_ptr, roww, sb + 1, n_super, more, IL)
                else:
                    w_words = _q6_k_int_words(w_ptr, roww, sb, n_super, None, IL)
                    w_scales = _q6_k_scale_words(w_ptr, roww, sb, n_super, None, IL)
                u_words, u_scales = u_next, us_next
                if GATED:
                    u_next = _q6_k_int_words(u_ptr, roww, sb + 1, n_super, more, IL)
                    us_next = _q6_k_scale_words(u_ptr, roww, sb + 1, n_super, more, IL)
                xq, xs, xs16 = _int_x_read(xp, xscale, xsum, sb, INT_X)
                acc_i += _q6_k_dot_int_words(
                    w_words, w_scales, w_ptr, roww, sb, n_super, xq, xs, xs16, BN, PTX, IL
                )
                if GATED:
                    acc_i_u += _q6_k_dot_int_words(
                        u_words, u_scales, u_ptr, roww, sb, n_super, xq, xs, xs16, BN, PTX, IL
                    )
        elif PREFETCH:  # Q4_K/Q5_K int read: each step loads the next super-block's words first
            SB_WORDS: tl.constexpr = 44 if QT == 13 else 1152 if IL else 36
            at = rowb[:, None, None] // 4 + first * SB_WORDS
            w_next = _q4_k_int_words(w_ptr, at, g3, w3, None, QT == 13, CS)
            u_next = w_next  # (ungated: unused)
            if GATED:
                u_next = _q4_k_int_words(u_ptr, at, g3, w3, None, QT == 13, CS)
            for sb in tl.range(first, last, 1, num_stages=STAGES, loop_unroll_factor=UNROLL):
                more = last - 1 - sb  # (super-blocks after this one: the next loaded where > 0)
                at = rowb[:, None, None] // 4 + sb * SB_WORDS
                if W_AHEAD:
                    w_words = w_next
                    w_next = _q4_k_int_words(w_ptr, at + SB_WORDS, g3, w3, more, QT == 13, CS)
                else:
                    w_words = _q4_k_int_words(w_ptr, at, g3, w3, None, QT == 13, CS)
                u_words = u_next
                if GATED:
                    u_next = _q4_k_int_words(u_ptr, at + SB_WORDS, g3, w3, more, QT == 13, CS)
                xq, xs, xs16 = _int_x_read(xp, xscale, xsum, sb, INT_X)
                acc_i += tl.sum(_q4_k_dot_int_words(w_words, g3, w3, xq, xs, xs16, PTX, QT == 13), axis=2)
                if GATED:
                    acc_i_u += tl.sum(
                        _q4_k_dot_int_words(u_words, g3, w3, xq, xs, xs16, PTX, QT == 13), axis=2
                    )
        else:
            for sb in tl.range(first, last, 1, num_stages=STAGES, loop_unroll_factor=UNROLL):
                if INT:  # x's super-block once for w and u
                    xq, xs, xs16 = _int_x_read(xp, xscale, xsum, sb, INT_X)
                if INT and (QT == 12 or QT == 13):  # [BN, 1, 1]: the rows' super-block sb, in words
                    blk = rowb[:, None, None] // 4 + sb * (44 if QT == 13 else 1152 if IL else 36)
                if INT and (QT == 12 or QT == 13):  # Q4_K, Q5_K: integer dot products
                    acc_i += tl.sum(
                        _q4_k_dot_int(w_ptr, blk, g3, w3, xq, xs, xs16, PTX, QT == 13, CS), axis=2
                    )
                    if GATED:
                        acc_i_u += tl.sum(
                            _q4_k_dot_int(u_ptr, blk, g3, w3, xq, xs, xs16, PTX, QT == 13, CS), axis=2
                        )
                elif INT and QT == 14:  # Q6_K repacked, integer dot products
                    acc_i += _q6_k_dot_int(w_ptr, rowb // 4, sb, n_super, xq, xs, xs16, BN, PTX, IL)
                    if GATED:
                        acc_i_u += _q6_k_dot_int(u_ptr, rowb // 4, sb, n_super, xq, xs, xs16, BN, PTX, IL)
                elif INT:  # Q8_0 repacked, integer dot products
                    acc_i += _q8_0_dot_int(w_ptr, rowb // 4, sb, n_super, xq, xs, BN, PTX)
                    if GATED:
                        acc_i_u += _q8_0_dot_int(u_ptr, rowb // 4, sb, n_super, xq, xs, BN, PTX)
                elif QT == 12 and VEC:  # Q4_K, wide loads
                    acc3 += _q4_k_dot_vec(w_ptr, rowb // 4, sb, xp, xsum, BN)
                    if GATED:
                        acc3_u += _q4_k_dot_vec(u_ptr, rowb // 4, sb, xp, xsum, BN)
                elif QT == 14 and VEC:  # Q6_K repacked, wide loads
                    acc3 += _q6_k_dot_vec(w_ptr, rowb // 4, sb, n_super, xp, xsum, BN)
                    if GATED:
                        acc3_u += _q6_k_dot_vec(u_ptr, rowb // 4, sb, n_super, xp, xsum, BN)
                elif QT == 8 and VEC:  # Q8_0 repacked, wide loads
                    acc3 += _q8_0_dot_vec(w_ptr, rowb // 4, sb, n_super, xp, xsum, BN)
                    if GATED:
                        acc3_u += _q8_0_dot_vec(u_ptr, rowb // 4, sb, n_super, xp, xsum, BN)
                elif QT == 13 and VEC:  # Q5_K, wide loads (176-byte blocks are 16-byte aligned)
                    acc3 += _q4_k_dot_vec(w_ptr, rowb // 4, sb, xp, xsum, BN, True)
                    if GATED:
                        acc3_u += _q4_k_dot_vec(u_ptr, rowb // 4, sb, xp, xsum, BN, True)
                elif QT == 12:  # Q4_K
                    acc += _q4_k_dot(w_ptr, rowb // 4, sb, xp, BN)
                    if GATED:
                        acc_u += _q4_k_dot(u_ptr, rowb // 4, sb, xp, BN)
                else:
                    for part in tl.static_range(NP):
                        w, cols = _tile(w_ptr, rowb, sb, n_super, QT, PACKED, part, BN, NP, lut_ptr)
                        xv = tl.load(xp + cols)
                        acc += tl.sum(w * xv[None, :], axis=1)
                        if GATED:
                            wu, _ = _tile(u_ptr, rowb, sb, n_super, QT, PACKED, part, BN, NP, lut_ptr)
                            acc_u += tl.sum(wu * xv[None, :], axis=1)
        if INT and QT == 8:  # pairwise, in an order no layout changes: x's reads agree bit for bit
            acc, acc_u = _pairwise_rows(acc_i, BN, 8), _pairwise_rows(acc_i_u, BN, 8)
        elif INT:
            acc, acc_u = _pairwise_rows(acc_i, BN, 4), _pairwise_rows(acc_i_u, BN, 4)
        if VEC:
            width: tl.constexpr = 16 if QT == 14 else 64 if QT == 8 else 32
            acc = tl.sum(tl.reshape(acc3, (BN, width)), axis=1) * 536870912.0 * x_power  # * 2^29 * power
            acc_u = tl.sum(tl.reshape(acc3_u, (BN, width)), axis=1) * 536870912.0 * x_power
        if REDUCE:
            if splits is None:  # (read here, not held in a register through the loop)
                splits = tl.num_programs(2)
            if n_tiles is None:
                n_tiles = tl.num_programs(0)
            half = (splits * n_pairs).to(tl.int64) * N  # GATED: the U.x partials after the W.x ones
            at = part_ptr + (split * n_pairs + p).to(tl.int64) * N + n
            if GATED:  # silu and the scale once summed
                tl.store(at + half, acc_u, mask=n < N)
            elif SCALED:
                acc = acc * tl.load(scale_ptr + p)
            tl.store(at, acc, mask=n < N)
            row = p // out_div
            counter = counter_ptr + row * n_tiles + pid_n
            tl.debug_barrier()  # every thread's partial is stored before this program's arrival counts
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == out_div * splits - 1:  # the last: every partial is stored
                total = tl.zeros((BN,), dtype=tl.float32)
                for j in range(out_div):
                    q = row * out_div + j
                    pair = tl.zeros((BN,), dtype=tl.float32)
                    pair_u = tl.zeros((BN,), dtype=tl.float32)
                    for s in range(splits):
                        at = part_ptr + (s * n_pairs + q).to(tl.int64) * N + n
                        pair += tl.load(at, mask=n < N, other=0.0, cache_modifier=".cg")  # not from L1
                        if GATED:
                            pair_u += tl.load(at + half, mask=n < N, other=0.0, cache_modifier=".cg")
                    if GATED:
                        pair = _silu_mul(pair, pair_u)
                        if SCALED:
                            pair = pair * tl.load(scale_ptr + q)
                    total += pair
                if RESIDUAL:
                    total = tl.load(res_ptr + row.to(tl.int64) * res_stride + n, mask=n < N) + total
                tl.store(out_ptr + row.to(tl.int64) * out_stride + n, total, mask=n < N)
                tl.atomic_xchg(counter, 0)
        else:
            # with RESIDUAL or INT_OUT adds follow the last product: rounded on its own (mul.rn),
            # it is the value a store gives the torch add or `_int_x` (never fused into an FMA)
            if GATED:
                acc = _silu_mul(acc, acc_u, PTX and (RESIDUAL or INT_OUT) and not SCALED)
            if SCALED:
                acc = _mul_rn(acc, tl.load(scale_ptr + p), PTX and (RESIDUAL or INT_OUT))
            if INT_OUT:
                _int_x_store_tile(acc, p, pid_n * BN, N, hq_ptr, hscale_ptr, hsum_ptr, BN)
            else:
                if RESIDUAL:
                    acc = tl.load(res_ptr + p.to(tl.int64) * res_stride + n, mask=n < N) + acc
                tl.store(out_ptr + p.to(tl.int64) * out_stride + n, acc, mask=n < N)

    @triton.jit
    def _matvec_kernel(
        x_ptr,
        w_ptr,
        u_ptr,
        out_ptr,
        experts_ptr,
        scale_ptr,
        lut_ptr,
        N,
        n_pairs,
        n_super,
        chunk,
        row_bytes,
        expert_bytes,
        x_stride,
        x_div,
        xsum_ptr,
        xpow_ptr,
        part_ptr,
        counter_ptr,
        out_stride,
        out_div,
        res_ptr,
        res_stride,
        hq_ptr,
        hscale_ptr,
        hsum_ptr,
        QT: tl.constexpr,
        NP: tl.constexpr,
        BN: tl.constexpr,
        GATED: tl.constexpr,
        SCALED: tl.constexpr,
        ROUTED: tl.constexpr,
        VEC: tl.constexpr,
        PACKED: tl.constexpr,
        STAGES: tl.constexpr,
        REDUCE: tl.constexpr,
        INT: tl.constexpr,
        INT_X: tl.constexpr,
        PTX: tl.constexpr,
        PDL: tl.constexpr = False,
        UNROLL: tl.constexpr = 1,
        RESIDUAL: tl.constexpr = False,
        INT_OUT: tl.constexpr = False,
        PREFETCH: tl.constexpr = 0,
    ):
        """out[p // out_div, n] = sum over the out_div pairs q of that row and the splits s of
        x[q // x_div] . W_e[n] over super-blocks [s*chunk, (s+1)*chunk), e = experts[q] when ROUTED,
        else 0 (GATED: silu(W.x) * (U.x) of each pair's whole sums), times scale[q] when SCALED;
        out's rows out_stride apart. For Q4_K, and Q6_K with VEC, w_ptr and u_ptr are int32 views;
        with VEC, Q4_K takes `_q4_k_dot_vec` and Q6_K (PACKED) `_q6_k_dot_vec` on x from `_vec_x`
        (xsum_ptr, xpow_ptr: its sums and powers). With INT, Q4_K and Q5_K, Q6_K and Q8_0 (both
        PACKED) take `_q4_k_dot_int`, `_q6_k_dot_int`, `_q8_0_dot_int` on each super-block of x
        quantized as `_int_x_super` does it: here, from float32 x (INT_X: x_ptr is x), or by
        `_int_x` before (x_ptr: its int16 pairs as int32, x_stride in pairs; xsum_ptr: its sums,
        xpow_ptr: its scales); the dot products as PTX dp2a with PTX, else emulated (`_dp2a`).

        Without REDUCE (one split, out_div 1) each program stores its row. With it, each stores
        its partial in part [splits, pairs, N] (GATED: [2 * splits, pairs, N], W.x's then U.x's,
        unscaled), and the last program to arrive at an output tile (counter_ptr: a zeroed int32
        per tile, bumped with acq_rel) sums the tile's partials in a fixed order, pair by pair
        and split by split from 0.0 (float32: the same bits every run; GATED: W.x's and U.x's
        sums of a pair, then silu(w) * u, then its scale), writes the row and sets the counter
        back to 0.

        RESIDUAL: the program that writes an output row writes res[row] + it instead (res's rows
        res_stride apart; the float32 add torch's `res + out` makes). INT_OUT (without REDUCE,
        BN a multiple of 32): the rows are not written as float32 but as `_int_x` would leave
        them (`_int_x_store_tile`: hq_ptr int16 [pairs, N], hscale_ptr [pairs, N / 32], hsum_ptr
        [pairs, N / 16]), for a product that reads them next (moe_ffn's h)."""
        _pdl_start(PDL)
        _matvec_program(
            x_ptr, w_ptr, u_ptr, out_ptr, experts_ptr, scale_ptr, lut_ptr, N, n_pairs, n_super, chunk, row_bytes,
            expert_bytes, x_stride, x_div, xsum_ptr, xpow_ptr, part_ptr, counter_ptr, out_stride, out_div, res_ptr,
            res_stride, hq_ptr, hscale_ptr, hsum_ptr, QT, NP, BN, GATED, SCALED, ROUTED, VEC, PACKED, STAGES, REDUCE,
            INT, INT_X, PTX, UNROLL, RESIDUAL, INT_OUT, PREFETCH,
            tl.program_id(0), tl.program_id(1), tl.program_id(2), None, None,
        )  # fmt: skip

    @triton.jit
    def _matvec_two_runs_kernel(
        x_ptr, w_ptr, out_ptr, xsum_ptr, xpow_ptr, part_ptr, counter_ptr, N, chunk, row_bytes, x_stride, tiles,
        splits,
        x2_ptr, w2_ptr, out2_ptr, xsum2_ptr, xpow2_ptr, part2_ptr, counter2_ptr, N2, chunk2, row_bytes2, x2_stride,
        tiles2, splits2,
        n_pairs, n_super, out_stride, first_programs,
        QT: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr, PACKED: tl.constexpr, STAGES: tl.constexpr,
        UNROLL: tl.constexpr, REDUCE: tl.constexpr, INT_X: tl.constexpr,
        QT2: tl.constexpr, NP2: tl.constexpr, BN2: tl.constexpr, PACKED2: tl.constexpr, STAGES2: tl.constexpr,
        UNROLL2: tl.constexpr, REDUCE2: tl.constexpr, INT_X2: tl.constexpr,
        PTX: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Two "int" products of one x (n_pairs rows, dense, ungated) in one launch, as
        `_matvec_kernel` would make each in a launch of its own (the same bits): programs [0,
        first_programs) the first run's grid (tiles x n_pairs x splits, tile fastest), the rest
        the second's (the names ending in 2), each with its own constexprs, partials and
        arrival counters. `harness::qkv`'s q and k+v of different types (QKV_CONFIG)."""
        _pdl_start(PDL)
        pid = tl.program_id(0)
        if pid < first_programs:
            _matvec_program(
                x_ptr, w_ptr, w_ptr, out_ptr, out_ptr, out_ptr, out_ptr, N, n_pairs, n_super, chunk, row_bytes, 0,
                x_stride, 1, xsum_ptr, xpow_ptr, part_ptr, counter_ptr, out_stride, 1, out_ptr, 0, out_ptr, out_ptr,
                out_ptr, QT, NP, BN, False, False, False, False, PACKED, STAGES, REDUCE, True, INT_X, PTX, UNROLL,
                False, False, False,
                pid % tiles, pid // tiles % n_pairs, pid // tiles // n_pairs, tiles, splits,
            )  # fmt: skip
        else:
            at = pid - first_programs
            _matvec_program(
                x2_ptr, w2_ptr, w2_ptr, out2_ptr, out2_ptr, out2_ptr, out2_ptr, N2, n_pairs, n_super, chunk2,
                row_bytes2, 0, x2_stride, 1, xsum2_ptr, xpow2_ptr, part2_ptr, counter2_ptr, out_stride, 1, out2_ptr,
                0, out2_ptr, out2_ptr, out2_ptr, QT2, NP2, BN2, False, False, False, False, PACKED2, STAGES2,
                REDUCE2, True, INT_X2, PTX, UNROLL2, False, False, False,
                at % tiles2, at // tiles2 % n_pairs, at // tiles2 // n_pairs, tiles2, splits2,
            )  # fmt: skip

    @triton.jit
    def _matmat_kernel(
        x_ptr,
        w_ptr,
        u_ptr,
        out_ptr,
        sorted_ptr,
        block_expert_ptr,
        scale_ptr,
        xscale_ptr,
        lut_ptr,
        N,
        n_super,
        n_pairs,
        row_bytes,
        expert_bytes,
        x_stride,
        x_div,
        QT: tl.constexpr,
        NP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        GATED: tl.constexpr,
        SCALED: tl.constexpr,
        PACKED: tl.constexpr,
        HALF: tl.constexpr,
    ):
        """Row block b of the expert-sorted pairs times its expert's W (tiles of BN outputs).

        Pair ids >= n_pairs are padding; x row of pair q is q // x_div; a block whose expert is
        -1 (past the last expert's blocks) does nothing. HALF: x is float16, each row divided by
        xscale[row], and the weight's tiles are rounded to float16 (float32 sums, scaled back)."""
        b = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + b)
        live = e >= 0
        e = tl.where(live, e, 0).to(tl.int64)
        pairs = tl.load(sorted_ptr + b * BM + tl.arange(0, BM))
        valid = pairs < tl.where(live, n_pairs, 0)
        xrow = tl.where(valid, pairs // x_div, 0).to(tl.int64)
        n = pid_n * BN + tl.arange(0, BN)
        if QT == 12 and PACKED:
            rowb = _interleaved_rows(e, expert_bytes, n, N, row_bytes)
        elif QT == 14 and PACKED == 2:  # interleaved Q6_K: each row's lane
            rowb = _interleaved_rows(e, expert_bytes, n, N, row_bytes, 8)
        else:
            rowb = e * expert_bytes + tl.where(n < N, n, 0).to(tl.int64) * row_bytes
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        steps = tl.where(live, n_super, 0)
        for sb in range(0, steps):
            for part in tl.static_range(NP):
                w, cols = _tile(w_ptr, rowb, sb, n_super, QT, PACKED, part, BN, NP, lut_ptr)
                xt = tl.load(x_ptr + xrow[:, None] * x_stride + cols[None, :], mask=valid[:, None], other=0.0)
                if HALF:
                    w = w.to(tl.float16)
                acc = tl.dot(xt, tl.trans(w), acc)
                if GATED:
                    wu, _ = _tile(u_ptr, rowb, sb, n_super, QT, PACKED, part, BN, NP, lut_ptr)
                    if HALF:
                        wu = wu.to(tl.float16)
                    acc_u = tl.dot(xt, tl.trans(wu), acc_u)
        if HALF:
            peak = tl.load(xscale_ptr + xrow, mask=valid, other=0.0)[:, None]
            acc = acc * peak
            if GATED:
                acc_u = acc_u * peak
        if GATED:
            acc = _silu_mul(acc, acc_u)
        if SCALED:
            acc = acc * tl.load(scale_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0)[:, None]
        out = out_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * N + n[None, :]
        tl.store(out, acc, mask=valid[:, None] & (n < N)[None, :])

    @triton.jit
    def _grouped_kernel(
        x_ptr,
        xscale_ptr,
        w_ptr,
        u_ptr,
        scale_ptr,
        out_ptr,
        sorted_ptr,
        block_expert_ptr,
        N,
        K,
        n_pairs,
        x_div,
        e_lo,
        e_hi,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        GATED: tl.constexpr,
        SCALED: tl.constexpr,
    ):
        """Row block b of the expert-sorted pairs times its expert's float16 weight, for the blocks
        whose expert is in [e_lo, e_hi) (w_ptr: those experts' weights, [e_hi - e_lo, N, K]).
        GATED: also times u_ptr's weights of the same experts (the up projection), and the row is
        silu(x.w) * (x.u); SCALED: times scale[pair].

        x [rows, K] float16 holds each row divided by xscale[row]; the float32 products are
        multiplied back. Pair ids >= n_pairs are padding; x row of pair q is q // x_div."""
        b = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + b)
        live = (e >= e_lo) & (e < e_hi)
        pairs = tl.load(sorted_ptr + b * BM + tl.arange(0, BM))
        valid = pairs < tl.where(live, n_pairs, 0)
        xrow = tl.where(valid, pairs // x_div, 0).to(tl.int64)
        n = pid_n * BN + tl.arange(0, BN)
        wrow = tl.where(live, e - e_lo, 0).to(tl.int64) * N + tl.where(n < N, n, 0)
        kk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, tl.where(live, K, 0), BK):
            xt = tl.load(x_ptr + xrow[:, None] * K + (k0 + kk)[None, :], mask=valid[:, None], other=0.0)
            wt = tl.load(w_ptr + wrow[:, None] * K + (k0 + kk)[None, :])
            acc = tl.dot(xt, tl.trans(wt), acc)
            if GATED:
                ut = tl.load(u_ptr + wrow[:, None] * K + (k0 + kk)[None, :])
                acc_u = tl.dot(xt, tl.trans(ut), acc_u)
        peak = tl.load(xscale_ptr + xrow, mask=valid, other=0.0)[:, None]
        acc = acc * peak
        if GATED:
            acc = _silu_mul(acc, acc_u * peak)
        if SCALED:
            acc = acc * tl.load(scale_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0)[:, None]
        out = out_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * N + n[None, :]
        tl.store(out, acc, mask=valid[:, None] & (n < N)[None, :])

    @triton.jit
    def _sort_by_expert_kernel(
        experts_ptr,
        sorted_ptr,
        block_expert_ptr,
        n_pairs,
        n_experts,
        n_blocks,
        BLOCK: tl.constexpr,
        EP: tl.constexpr,
        BP: tl.constexpr,
    ):
        """`_sort_by_expert` in one program: the experts' pair counts, their padded starts, then
        each pair (in order, BP at a time) to its expert's next slot, its rank among the pairs
        before it of its expert; then the padding (slots past an expert's pairs and past the
        last expert's blocks: n_pairs) and each block's expert (-1 past the last). EP >=
        n_experts (a power of two); experts' ids outside [0, n_experts) are not sorted."""
        ex = tl.arange(0, EP)
        real = ex < n_experts
        counts = tl.zeros((EP,), tl.int32)
        for p0 in range(0, n_pairs, BP):
            p = p0 + tl.arange(0, BP)
            e = tl.load(experts_ptr + p, mask=p < n_pairs, other=-1)
            counts += tl.sum(((e[:, None] == ex[None, :]) & real[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK - 1) // BLOCK * BLOCK
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        seen = tl.zeros((EP,), tl.int32)
        for p0 in range(0, n_pairs, BP):
            p = p0 + tl.arange(0, BP)
            e = tl.load(experts_ptr + p, mask=p < n_pairs, other=-1)
            hit = ((e[:, None] == ex[None, :]) & real[None, :]).to(tl.int32)
            rank = tl.cumsum(hit, axis=0) - hit + (starts + seen)[None, :]
            slot = tl.sum(hit * rank, axis=1)
            tl.store(sorted_ptr + slot, p.to(tl.int64), mask=tl.sum(hit, axis=1) > 0)
            seen += tl.sum(hit, axis=0)
        for s0 in range(0, n_blocks * BLOCK, BP):
            s = s0 + tl.arange(0, BP)
            owner = tl.sum((s[:, None] >= ends[None, :]).to(tl.int32), axis=1)  # experts ended by s
            filled = tl.sum(tl.where(owner[:, None] == ex[None, :], starts + counts, 0), axis=1)
            pad = (owner >= n_experts) | (s >= filled)  # (filled: the owner's first padding slot)
            tl.store(sorted_ptr + s, tl.zeros((BP,), tl.int64) + n_pairs, mask=pad & (s < n_blocks * BLOCK))
        for b0 in range(0, n_blocks, BP):
            b = b0 + tl.arange(0, BP)
            owner = tl.sum(((b * BLOCK)[:, None] >= ends[None, :]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + b, tl.where(owner < n_experts, owner, -1), mask=b < n_blocks)

    @triton.jit
    def _scaled_half_kernel(x_ptr, out_ptr, peak_ptr, K, BK: tl.constexpr):
        """Row r of x [R, K] float32 in two passes: its largest magnitude (1 for zeros or a NaN)
        into peak[r], then the row divided by it (IEEE division, as torch's) as float16 into out."""
        row = x_ptr + tl.program_id(0).to(tl.int64) * K
        cols = tl.arange(0, BK)
        top = tl.zeros((BK,), tl.float32)
        nan = tl.zeros((BK,), tl.int32)
        for k0 in range(0, K, BK):
            v = tl.load(row + k0 + cols, mask=k0 + cols < K, other=0.0)
            top = tl.maximum(top, tl.abs(v))
            nan = tl.maximum(nan, (v != v).to(tl.int32))  # (the maximum above drops NaNs)
        peak = tl.max(top, axis=0)
        peak = tl.where((peak > 0) & (tl.max(nan, axis=0) == 0), peak, 1.0)
        tl.store(peak_ptr + tl.program_id(0), peak)
        out = out_ptr + tl.program_id(0).to(tl.int64) * K
        for k0 in range(0, K, BK):
            m = k0 + cols < K
            v = tl.load(row + k0 + cols, mask=m, other=0.0)
            tl.store(out + k0 + cols, tl.math.div_rn(v, peak).to(tl.float16), mask=m)

    @triton.jit
    def _dequant_packed_kernel(
        raw_ptr, out_ptr, nblocks, n, row_bytes, QT: tl.constexpr, NB: tl.constexpr, IL: tl.constexpr = False
    ):
        """Blocks pid*NB.. (of all rows in turn, n a row) of a weight in `pack`'s layout written
        as the values harness.quant.kernels writes for the GGUF blocks, in out's dtype, the same
        arithmetic (bit for bit): the prefill's dequantization without unpacking first.
        Q6_K (QT 14): tile rows (block, sub-block j of 16 values), value 16j + i: c = j // 8,
        s = j % 8, nibble s // 4 of ql[64c + 16(s % 4) + i], bits 2(s // 2).. of
        qh[32c + 16(s % 2) + i], scale j at 4f + 2c + h of the scales plane (`_Q6_K_SCALE_GRID`:
        f = s // 2, h = s % 2); y = (d * sc) * (q - 32). Q8_0 (QT 8): y = qs[i] * d. Q4_K (QT 12,
        interleaved): tile rows (block, sub-block j of 32 values), value 32j + i = nibble j % 2 of
        qs byte 32(j // 2) + i, block byte k in chunk k // 16 (`pack`); y = (d*sc)*q - dmin*m.
        IL (Q6_K): its packed rows interleaved (`_q6_k_moved`)."""
        pid = tl.program_id(0).to(tl.int64)
        SUB: tl.constexpr = 16 if QT == 14 else 32  # values of a tile row
        ROWS: tl.constexpr = NB * 16 if QT == 14 else NB * 8 if QT == 12 else NB
        r = tl.arange(0, ROWS)
        i = tl.arange(0, SUB)
        g = pid * NB + r // (ROWS // NB)  # each tile row's block
        ok = g < nblocks
        g = tl.where(ok, g, nblocks - 1)  # (a tail's rows read the last block, write nothing)
        b = g % n
        row = raw_ptr + (g // n) * row_bytes  # the block's row (16-byte aligned: `packs`)
        if QT == 12:
            m = g // n  # the block's row of the matrix; its chunk 0:
            blk = raw_ptr + _interleaved_row(m, row_bytes) + b * 4608
            j = r % 8
            sc, mn = _k_scales(blk, 0, j)
            dl = (_f16(blk) * sc)[:, None]
            ml = (_f16(blk + 2) * mn)[:, None]
            at = blk + (1 + 2 * (j // 2)) * 512  # qs byte 32(j // 2) + i: chunk 1 + 2(j // 2) + i // 16
            q = (_byte(at[:, None] + (i // 16) * 512 + i % 16) >> (4 * (j % 2))[:, None]) & 0xF
            y = dl * q.to(tl.float32) - ml
        elif QT == 14:
            j = r % 16
            c = j // 8
            s = j % 8
            if IL:  # the row's lane (`_interleaved_row`, TILE 8), a super-block's run 1664 bytes on
                lane = raw_ptr + _interleaved_row(g // n, row_bytes, 8)
                sc = tl.load(lane + 1664 * b + 1536 + 4 * (s // 2) + 2 * c + s % 2).to(tl.int8, bitcast=True)
                dl = (_f16(lane + 1664 * n + (b // 8) * 128 + 2 * (b % 8)) * sc.to(tl.float32))[:, None]
                at_l = lane + 1664 * b + 512 * ((s % 4) // 2) + 256 * c + 128 * (s % 2)
                at_h = lane + 1664 * b + 1024 + 256 * c + 128 * (s % 2)
            else:
                sc = tl.load(row + 192 * n + 16 * b + 4 * (s // 2) + 2 * c + s % 2).to(tl.int8, bitcast=True)
                dl = (_f16(row + 208 * n + 2 * b) * sc.to(tl.float32))[:, None]
                at_l = row + 128 * b + 64 * c + 16 * (s % 4)
                at_h = row + 128 * n + 64 * b + 32 * c + 16 * (s % 2)
            ql = (_byte(at_l[:, None] + i[None, :]) >> (4 * (s // 4))[:, None]) & 0xF
            qh = (_byte(at_h[:, None] + i[None, :]) >> (2 * (s // 2))[:, None]) & 3
            y = dl * ((ql | (qh << 4)) - 32).to(tl.float32)
        else:
            q = tl.load(row[:, None] + 32 * b[:, None] + i[None, :]).to(tl.int8, bitcast=True)
            y = q.to(tl.float32) * _f16(row + 32 * n + 2 * b)[:, None]
        out = out_ptr + pid * (NB * 16 * SUB if QT == 14 else NB * 8 * SUB if QT == 12 else NB * SUB)
        tl.store(out + r[:, None] * SUB + i[None, :], y.to(out_ptr.dtype.element_ty), mask=ok[:, None])


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        r_ptr,
        total_ptr,
        w_ptr,
        out_ptr,
        q_ptr,
        scale_ptr,
        sum_ptr,
        D,
        eps,
        BD: tl.constexpr,
        ADD: tl.constexpr,
        PDL: tl.constexpr = False,
        INT_OUT: tl.constexpr = False,
        PTX: tl.constexpr = False,
    ):
        """One row: x * rsqrt(mean(x^2) + eps) * w, in float32; with ADD, x is first the sum of
        the rows at x_ptr and r_ptr (one rounded add, as torch's), stored at total_ptr. INT_OUT
        (D a multiple of 32): the row also stored as `_int_x` leaves x (`_norm_row_store`)."""
        _pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        x, rms = _norm_row_rms(x_ptr, r_ptr, row, D, eps, BD, ADD)
        _norm_row_store(
            x, rms, row, D, w_ptr, total_ptr, out_ptr, q_ptr, scale_ptr, sum_ptr, BD, ADD, INT_OUT, PTX
        )

    @triton.jit
    def _norm_row_rms(x_ptr, r_ptr, row, D, eps, BD: tl.constexpr, ADD: tl.constexpr):
        """Row `row` of x [R, D] (with ADD, plus that of r: one rounded add, as torch's) as x
        [BD] float32 (zeros past D), and its rsqrt(mean(x^2) + eps). The one formula of every
        norm launch: the same bits wherever the launch has the same number of warps (the sum's
        order follows the layout)."""
        cols = tl.arange(0, BD)
        m = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        if ADD:
            x = x + tl.load(r_ptr + row * D + cols, mask=m, other=0.0)
        return x, tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)

    @triton.jit
    def _norm_row_store(
        x, rms, row, D, w_ptr, total_ptr, out_ptr, q_ptr, scale_ptr, sum_ptr,
        BD: tl.constexpr, ADD: tl.constexpr, INT_OUT: tl.constexpr, PTX: tl.constexpr,
    ):  # fmt: skip
        """`_norm_row_rms`'s row x and rms: with ADD, x stored at total_ptr; x * rms * w (the
        weight's [D]) stored at out_ptr; INT_OUT, that also as `_int_x` leaves x
        (`_int_x_store_tile`: q_ptr int16 [R, D], scale_ptr [R, D / 32], sum_ptr [R, D / 16]),
        the same bits as `_int_x` of the float row stored; its last product then rounded on its
        own (`_mul_rn` with PTX: the sums of `_int_x_blocks` never fuse it into an FMA)."""
        cols = tl.arange(0, BD)
        m = cols < D
        if ADD:
            tl.store(total_ptr + row * D + cols, x, mask=m)
        y = _mul_rn(x * rms, tl.load(w_ptr + cols, mask=m, other=0.0), PTX and INT_OUT)
        tl.store(out_ptr + row * D + cols, y, mask=m)
        if INT_OUT:
            _int_x_store_tile(y, row, 0, D, q_ptr, scale_ptr, sum_ptr, BD)

    @triton.jit
    def _rope_row(src, dst, cos_row, sin_row, HD, HALF, BH: tl.constexpr, BD: tl.constexpr):
        """One head's row of HD values: pairs (src[2i], src[2i+1]), i < HALF (BH >= HALF),
        rotated by the angles at cos_row/sin_row (GGML rope type 0) into dst; dims past 2*HALF
        copied (BD >= HD; HD 0: nothing). Products and differences rounded one by one, as eager
        torch does (the launch passes enable_fp_fusion=False)."""
        i = tl.arange(0, BH)
        m = i < HALF
        even = tl.load(src + 2 * i, mask=m, other=0.0)
        odd = tl.load(src + 2 * i + 1, mask=m, other=0.0)
        c = tl.load(cos_row + i, mask=m, other=0.0)
        s = tl.load(sin_row + i, mask=m, other=0.0)
        tl.store(dst + 2 * i, even * c - odd * s, mask=m)
        tl.store(dst + 2 * i + 1, even * s + odd * c, mask=m)
        rest = 2 * HALF + tl.arange(0, BD)
        mr = rest < HD
        tl.store(dst + rest, tl.load(src + rest, mask=mr, other=0.0), mask=mr)

    @triton.jit
    def _rope_kernel(
        x_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, H, HD, HALF, BH: tl.constexpr, BD: tl.constexpr
    ):
        """Token t, head h of x [T, H, HD]: `_rope_row` at position pos[t]."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        base = (t * H + h) * HD
        _rope_row(x_ptr + base, out_ptr + base, cos_ptr + pos * HALF, sin_ptr + pos * HALF, HD, HALF, BH, BD)

    # Positions and key counts change every decode step: not specialized on (one compilation).
    @triton.jit(do_not_specialize=["start"])
    def _rope_cache_kernel(
        qkv_ptr, W, cache_k, cache_v, cos_ptr, sin_ptr, pos_ptr, start, q_out,
        H, KV, S_MAX, HD, HALF, BH: tl.constexpr, BD: tl.constexpr, FROM_START: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """`harness::attention`'s first launch where ATTENTION_CONFIG["fold_rope"] is off (else
        `_attention_kernel` does this itself). Token t's row of qkv [T, W] holds its H query
        heads, KV key heads and KV value heads of HD values, side by side. Program (t, j), j < H:
        query head j rotated into q_out [T, H, HD]; j = H + kv: key head kv rotated into cache_k
        [KV, S_MAX, HD] at the token's position, value head kv copied into cache_v there. A
        position outside 0..S_MAX-1 writes nothing (index_copy_ would raise; this cannot without
        a host read)."""
        _pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64)
        pos = start + t if FROM_START else tl.load(pos_ptr + t).to(tl.int64)
        ok = (pos >= 0) & (pos < S_MAX)
        at = tl.where(ok, pos, 0)
        hd, half = tl.where(ok, HD, 0), tl.where(ok, HALF, 0)  # a row of no values: nothing written
        c, s = cos_ptr + at * HALF, sin_ptr + at * HALF
        row = qkv_ptr + t * W
        if j < H:
            _rope_row(row + j * HD, q_out + (t * H + j) * HD, c, s, hd, half, BH, BD)
        else:
            kv = j - H
            slot = (kv * S_MAX + at) * HD
            _rope_row(row + j * HD, cache_k + slot, c, s, hd, half, BH, BD)
            d = tl.arange(0, BD)
            m = d < hd
            v = row + (j + KV) * HD
            tl.store(cache_v + slot + d, tl.load(v + d, mask=m, other=0.0), mask=m)

    @triton.jit
    def _mul_rn(a, b, PTX: tl.constexpr):
        """a * b rounded to float32 on its own, subnormals kept (as torch's CUDA product): with
        PTX, mul.rn.f32 (an explicit rounding: never fused into an FMA, where the launch allows
        fp fusion; libdevice's mul_rn would flush subnormals, .ftz); else a plain product (the
        interpreter's numpy rounds each)."""
        if PTX:
            return tl.inline_asm_elementwise(
                "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            return a * b

    @triton.jit
    def _rope_tile(base, pos, ok, cos_ptr, sin_ptr, HD, HALF, BD: tl.constexpr, PTX: tl.constexpr):
        """Rows of HD values at pointers base [R] rotated as `_rope_row` rotates one: pairs
        (2i, 2i+1), i < HALF, by the angles at row pos [R] of the tables, dims past 2*HALF
        copied, each product and difference rounded on its own (`_mul_rn`): bit for bit the
        torch path's rope. Rows not ok read nothing (zeros). -> [R, BD]."""
        d = tl.arange(0, BD)
        x = tl.load(base[:, None] + d[None, :], mask=ok[:, None] & (d < HD)[None, :], other=0.0)
        even, odd = tl.split(tl.reshape(x, (x.shape[0], BD // 2, 2)))  # [R, BD/2] each
        i = tl.arange(0, BD // 2)
        rot = i < HALF
        at = tl.where(ok, pos, 0)[:, None] * HALF + i[None, :]
        mr = ok[:, None] & rot[None, :]
        c = tl.load(cos_ptr + at, mask=mr, other=0.0)
        s = tl.load(sin_ptr + at, mask=mr, other=0.0)
        y_even = _mul_rn(even, c, PTX) - _mul_rn(odd, s, PTX)
        y_odd = _mul_rn(even, s, PTX) + _mul_rn(odd, c, PTX)
        y_even = tl.where(rot[None, :], y_even, even)
        y_odd = tl.where(rot[None, :], y_odd, odd)
        return tl.reshape(tl.join(y_even, y_odd), (x.shape[0], BD))

    @triton.jit
    def _online_softmax(q, keys, values, seen, m_i, l_i, acc, scale, DOT: tl.constexpr):
        """One step of flash attention's online softmax: queries q [BM, BD] against keys and
        values [N, BD], `seen` [BM, N] the pairs that count; float32, the products at tl.dot's
        input precision DOT. -> the rows' running maxima, sums and unnormalized outputs."""
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT) * scale  # [BM, N]
        scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp(scores - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, values, input_precision=DOT)
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["start", "N_KEYS"])
    def _attention_kernel(
        q_ptr, W, cache_k, cache_v, cos_ptr, sin_ptr, pos_ptr, start, out_ptr, part_acc, part_m, part_l,
        counter_ptr, xq_ptr, xscale_ptr, xsum_ptr, T, G, S_MAX, N_KEYS, HD, HALF, scale,
        BM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, TT: tl.constexpr, FROM_START: tl.constexpr,
        SPLIT: tl.constexpr, ROPE: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr = False,
        DOT: tl.constexpr = "ieee", MERGE: tl.constexpr = False, MC: tl.constexpr = 1, INT_OUT: tl.constexpr = False,
    ):  # fmt: skip
        """`harness::attention`'s attention launch (flash decoding). Program (kv, split): the G*T
        queries of KV head kv (row r = g*T + t: head kv*G + g, token t) against its share of the
        keys, each query seeing positions up to its own: the keys below N_KEYS that any query
        sees (up to the last query's position, read from the device in the static-shape step)
        are spread evenly over the launch's splits in runs of whole BS steps, so that a short
        cache in a long one takes as many programs as it has steps, not the first splits (a
        program with none reads nothing). Online softmax in float32, the products at tl.dot's
        input precision DOT (BM rows: a float32 tl.dot takes any number of rows, BT >= 16 keys).
        Without SPLIT the rows are finished into out [T, H*HD]; with it, the unnormalized rows,
        their maxima and sums go to part_acc [KV, SPLITS, BM, BD], part_m, part_l [KV, SPLITS,
        BM], merged by `_attention_merge_kernel` in a launch after, or with MERGE by the last of
        the KV head's programs to arrive (counter_ptr + kv: a zeroed int32, bumped acq_rel, set
        back to 0 by that program; `_attention_merge`): one launch.

        With ROPE (the one-launch form: no `_rope_cache_kernel` before), q_ptr is qkv [T, W]
        (the call's q, k and v side by side, before rope): each program rotates its queries
        itself (`_rope_tile`), and the call's own keys and values (BT >= T rows) are taken from
        qkv, never from the cache: every program's cache reads leave out the call's positions
        (the loop's `fresh` test), and the last split alone rotates the new keys, attends to
        them in a step before its share of the cache, and writes them and the values into the
        caches (a position outside 0..S_MAX-1: nothing). So no program of the launch reads a
        slot that one writes, and the write needs no ordering inside the launch; later launches
        see it (stream order, or their PDL wait). (tests/test_quant_fused.py fills those slots
        with NaN before each call: a read of one would show.) Without ROPE, q_ptr holds the
        rotated queries [T, H, HD] and the caches are already written.

        INT_OUT (HD a multiple of 32; ATTENTION_CONFIG "int_out"): the program that writes rows of
        out (unsplit, or MERGE's last) also stores them as `_int_x` leaves out
        (`_int_x_store_rows`, the same bits): xq_ptr int16 [T, H*HD], xscale_ptr [T, H*HD / 32],
        xsum_ptr [T, H*HD / 16]; a row's heads are whole 32-value blocks of it."""
        _pdl_start(PDL)
        kv = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1).to(tl.int64)
        n_kv = tl.num_programs(0)
        r = tl.arange(0, BM)
        valid = r < G * T
        g = r // T
        t = r % T
        pos = start + t.to(tl.int64) if FROM_START else tl.load(pos_ptr + t, mask=valid, other=0).to(tl.int64)
        pos = tl.where(valid, pos, -1)  # [BM] each query's position; -1 for padding rows
        n_seen = tl.minimum(N_KEYS, tl.max(pos, 0) + 1)  # keys the queries see
        per = tl.cdiv(tl.cdiv(n_seen, tl.num_programs(1)), BS) * BS
        lo = split * per
        hi = tl.minimum(lo + per, n_seen)
        d = tl.arange(0, BD)
        dm = d < HD
        head = kv * G + g
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
        if ROPE:
            q_ok = valid & (pos >= 0) & (pos < S_MAX)
            q = _rope_tile(q_ptr + t * W + head * HD, pos, q_ok, cos_ptr, sin_ptr, HD, HALF, BD, PTX)
            if split == tl.num_programs(1) - 1:  # the call's keys and values, first
                j = tl.arange(0, BT)  # (a tile of at least 16 rows for tl.dot)
                jp = (
                    start + j.to(tl.int64)
                    if FROM_START
                    else tl.load(pos_ptr + j, mask=j < T, other=-1).to(tl.int64)
                )
                new_ok = (j < T) & (jp >= 0) & (jp < S_MAX)  # a position outside the cache: nothing
                row = q_ptr + j * W
                k_new = _rope_tile(
                    row + (G * n_kv + kv) * HD, jp, new_ok, cos_ptr, sin_ptr, HD, HALF, BD, PTX
                )
                new_m = new_ok[:, None] & dm[None, :]
                v_new = tl.load(
                    (row + (G * n_kv + n_kv + kv) * HD)[:, None] + d[None, :], mask=new_m, other=0.0
                )
                sees_new = new_ok[None, :] & (jp[None, :] <= pos[:, None])
                m_i, l_i, acc = _online_softmax(q, k_new, v_new, sees_new, m_i, l_i, acc, scale, DOT)
                new_slot = (kv * S_MAX + tl.where(new_ok, jp, 0)) * HD
                tl.store(cache_k + new_slot[:, None] + d[None, :], k_new, mask=new_m)
                tl.store(cache_v + new_slot[:, None] + d[None, :], v_new, mask=new_m)
            # the call's positions again, in a tile of TT >= T for the loop's test
            jt = tl.arange(0, TT)
            fresh = (
                start + jt.to(tl.int64)
                if FROM_START
                else tl.load(pos_ptr + jt, mask=jt < T, other=-1).to(tl.int64)
            )
            fresh = tl.where(jt < T, fresh, -1)
        else:
            q = tl.load(
                q_ptr + ((t * G * n_kv + head) * HD)[:, None] + d[None, :],
                mask=valid[:, None] & dm[None, :], other=0.0,
            )  # fmt: skip
        for s0 in range(lo, hi, BS):
            s = s0 + tl.arange(0, BS)
            sm = s < hi
            if ROPE:  # the call's positions: never read from the cache (the last split has them)
                sm = sm & (tl.max((s[:, None] == fresh[None, :]).to(tl.int32), 1) == 0)
            slot = (kv * S_MAX + s) * HD
            km = sm[:, None] & dm[None, :]
            keys = tl.load(cache_k + slot[:, None] + d[None, :], mask=km, other=0.0)  # [BS, BD]
            values = tl.load(cache_v + slot[:, None] + d[None, :], mask=km, other=0.0)  # [BS, BD]
            seen = sm[None, :] & (s[None, :] <= pos[:, None])
            m_i, l_i, acc = _online_softmax(q, keys, values, seen, m_i, l_i, acc, scale, DOT)
        if SPLIT:
            splits = tl.num_programs(1)
            at = (kv * splits + split) * BM + r
            tl.store(part_acc + at[:, None] * BD + d[None, :], acc)
            tl.store(part_m + at, m_i)
            tl.store(part_l + at, l_i)
            if MERGE:
                counter = counter_ptr + kv
                tl.debug_barrier()  # every thread's partial is stored before this program's arrival counts
                arrived = tl.atomic_add(counter, 1, sem="acq_rel")
                if arrived == splits - 1:  # the last: every partial is stored
                    _attention_merge(part_acc, part_m, part_l, out_ptr, kv, splits, r, valid, t, head, d, dm,
                        G * n_kv, HD, xq_ptr, xscale_ptr, xsum_ptr, BM, BD, MC, INT_OUT)  # fmt: skip
                    tl.atomic_xchg(counter, 0)
        else:
            out = out_ptr + ((t * G * n_kv + head) * HD)[:, None] + d[None, :]
            total = tl.where(valid, l_i, 1.0)  # (padding rows: no division by zero)
            y = acc / total[:, None]
            tl.store(out, y, mask=valid[:, None] & dm[None, :])
            if INT_OUT:
                _int_x_store_rows(y, t, head * HD, HD, valid, G * n_kv * HD, xq_ptr, xscale_ptr, xsum_ptr, BD)

    @triton.jit
    def _attention_merge(
        part_acc, part_m, part_l, out_ptr, kv, splits, r, valid, t, head, d, dm, H, HD, xq_ptr, xscale_ptr,
        xsum_ptr, BM: tl.constexpr, BD: tl.constexpr, MC: tl.constexpr, INT_OUT: tl.constexpr,
    ):  # fmt: skip
        """KV head kv's rows r [BM] (valid: a query's; token t, head `head`) merged over its
        `splits` partial results (`_attention_kernel`'s MERGE), MC splits a step (their maxima,
        sums and rows in one round of loads, past L1: other programs' stores), the steps in
        split order, each split rescaled to the largest maximum so far and the sums before it
        to the new one (with one step, as `_attention_merge_kernel` does it). The same code
        whichever program runs it: the same bits. INT_OUT: the rows in `_int_x`'s form too (as
        `_attention_kernel`'s)."""
        top = tl.full([BM], float("-inf"), tl.float32)
        num = tl.zeros([BM, BD], tl.float32)
        den = tl.zeros([BM], tl.float32)
        for c0 in range(0, splits, MC):
            sp = c0 + tl.arange(0, MC)
            spm = (sp < splits)[:, None]
            at = (kv * splits + sp)[:, None] * BM + r[None, :]  # [MC, BM]
            m = tl.load(part_m + at, mask=spm, other=float("-inf"), cache_modifier=".cg")
            part_sum = tl.load(part_l + at, mask=spm, other=0.0, cache_modifier=".cg")
            part = tl.load(
                part_acc + at[:, :, None] * BD + d[None, None, :], mask=spm[:, :, None], other=0.0,
                cache_modifier=".cg",
            )  # fmt: skip
            new_top = tl.maximum(top, tl.max(m, 0))
            use = tl.where(new_top == float("-inf"), 0.0, new_top)  # rows no split saw yet
            before = tl.exp(top - use)  # 0 at the first step (top -inf)
            w = tl.where(m == float("-inf"), 0.0, tl.exp(m - use[None, :]))  # [MC, BM]
            num = num * before[:, None] + tl.sum(part * w[:, :, None], 0)
            den = den * before + tl.sum(part_sum * w, 0)
            top = new_top
        out = out_ptr + ((t * H + head) * HD)[:, None] + d[None, :]
        y = num / tl.where(valid, den, 1.0)[:, None]
        tl.store(out, y, mask=valid[:, None] & dm[None, :])
        if INT_OUT:
            _int_x_store_rows(y, t, head * HD, HD, valid, H * HD, xq_ptr, xscale_ptr, xsum_ptr, BD)

    @triton.jit
    def _attention_merge_kernel(
        part_acc, part_m, part_l, out_ptr, xq_ptr, xscale_ptr, xsum_ptr, T, G, KV, HD, SPLITS,
        BM: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr = False,
        INT_OUT: tl.constexpr = False,
    ):  # fmt: skip
        """`harness::attention`'s last launch when the keys were split: program (kv, r) merges
        row r of KV head kv over the splits (each rescaled to the largest maximum) into out;
        INT_OUT: in `_int_x`'s form too (as `_attention_kernel`'s)."""
        _pdl_start(PDL)
        kv = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1).to(tl.int64)
        sp = tl.arange(0, BP)
        spm = sp < SPLITS
        at = (kv * SPLITS + sp) * BM + r  # [BP]
        m = tl.load(part_m + at, mask=spm, other=float("-inf"))
        l_ = tl.load(part_l + at, mask=spm, other=0.0)
        top = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
        d = tl.arange(0, BD)
        acc = tl.load(part_acc + at[:, None] * BD + d[None, :], mask=spm[:, None], other=0.0)
        total = tl.sum(acc * w[:, None], 0) / tl.sum(l_ * w, 0)
        head = kv * G + r // T
        row = out_ptr + ((r % T) * G * KV + head) * HD + d
        tl.store(row, total, mask=d < HD)
        if INT_OUT:
            # from the row as stored: on an H100 (Triton 3.6) the form made from `total` in
            # registers had x_sums and x_scales other than `_int_x` of the stored row
            tl.debug_barrier()  # every thread's store is visible to the block
            stored = tl.load(row, mask=d < HD, other=0.0)
            one = tl.full([1], 0, tl.int64)  # (a tile of one row)
            _int_x_store_rows(
                tl.reshape(stored, (1, BD)), one + r % T, one + head * HD, HD, one == 0, G * KV * HD, xq_ptr,
                xscale_ptr, xsum_ptr, BD,
            )  # fmt: skip


@functools.cache
def _ceil_div(a: int, b: int) -> int:
    """triton.cdiv on the host (Triton's is a constexpr function there: microseconds a call)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1): triton.next_power_of_2 on the host, cheaply."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def _programs_wanted(device: torch.device, per_sm: int = 4) -> int:
    """Programs that keep `device` busy in a matrix-vector launch: `per_sm` per multiprocessor
    (the device's properties read once per device)."""
    if device.type != "cuda":
        return per_sm
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _cuda_device_count() -> int:
    return torch.cuda.device_count()


def _ptx() -> bool:
    """Whether kernels may hold NVIDIA's PTX (the int reads' dp2a): compiled for an NVIDIA GPU,
    not under the interpreter nor for ROCm (whose torch also calls its devices "cuda")."""
    return not kernels.interpreting() and torch.version.hip is None


def pdl_options(device: torch.device) -> dict:
    """The launch keywords of a decode kernel on `device`: its PDL constexpr and Triton's
    `launch_pdl` where `pdl` is set and the device and Triton can (see `pdl`), else none."""
    return _PDL_ON if pdl and _pdl_capable(device) else _PDL_OFF


_PDL_ON, _PDL_OFF = {"PDL": True, "launch_pdl": True}, {}

# `bind` once per kernel and set of launch keywords, for launches whose keywords are not a plan's
# (typed: Triton tells a constexpr True, 1 and 1.0 apart).
_bound = functools.lru_cache(maxsize=None, typed=True)(bind)


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later, NVIDIA's (not ROCm), not the
    interpreter, and a Triton with grid dependency control (`gdc_wait`) and the `launch_pdl`
    launch option (asked once per device)."""
    if device.type != "cuda" or not _ptx() or not _HAS_GDC:
        return False
    options = getattr(triton.backends.nvidia.compiler, "CUDAOptions", None)
    if options is None or "launch_pdl" not in getattr(options, "__dataclass_fields__", {}):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _launch_device(device: torch.device):
    """Triton launches on the current CUDA device: switch only when the data lives elsewhere
    (with one GPU it cannot, and the current device is not asked)."""
    if (
        _device_type(device) == "cuda"
        and _cuda_device_count() > 1
        and device.index != torch.cuda.current_device()
    ):
        return torch.cuda.device(device)
    return _STAY


_STAY = contextlib.nullcontext()  # (reusable: it holds nothing)


def _sort_by_expert(experts: torch.Tensor, n_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ids (flattened [T, k] routing) grouped by expert, each group padded to whole blocks of
    `block` rows with the id n_pairs; and each row block's expert (-1 past the last). On the
    device, fixed sizes: no host read. One launch where Triton runs (`_sort_by_expert_kernel`,
    up to SORT_KERNEL_MAX), else torch's ops (`_sort_by_expert_torch`, the same result)."""
    flat = experts.reshape(-1)
    n_pairs, ep = flat.numel(), _next_pow2(n_experts)
    kernel = kernels.triton is not None and (flat.is_cuda or kernels.interpreting())
    if not kernel or n_pairs * ep > SORT_KERNEL_MAX:
        return _sort_by_expert_torch(flat, n_experts, block)
    n_blocks = _ceil_div(n_pairs, block) + n_experts
    sorted_ids = flat.new_empty(n_blocks * block, dtype=torch.int64)
    block_expert = flat.new_empty(n_blocks, dtype=torch.int32)
    with _launch_device(flat.device):
        launch(_sort_by_expert_kernel, (1,),
            flat.contiguous(), sorted_ids, block_expert, n_pairs, n_experts, n_blocks, BLOCK=block, EP=ep,
            BP=max(16, 4096 // ep), num_warps=4,
        )  # fmt: skip
    return sorted_ids, block_expert


def _sort_by_expert_torch(
    flat: torch.Tensor, n_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sort_by_expert` in torch's ops (about 25 launches on a GPU)."""
    n_pairs = flat.numel()
    n_blocks = _ceil_div(n_pairs, block) + n_experts
    device = flat.device
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block - 1) // block * block
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    chosen = flat[order]
    first = counts.cumsum(0) - counts  # first sorted position of each expert
    slot = (padded_end - padded)[chosen] + torch.arange(n_pairs, device=device) - first[chosen]
    sorted_ids = torch.full((n_blocks * block,), n_pairs, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, slot, order)
    starts = torch.arange(n_blocks, device=device) * block
    block_expert = torch.searchsorted(padded_end, starts, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


def _sorted_pairs(
    experts: torch.Tensor, n_experts: int, block: int, routing: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sort_by_expert(experts, n_experts, block)`, taken from `routing` where a product of the
    same op (the same pairs) sorted them so before, and left there (None: sorted anew)."""
    if routing is None:
        return _sort_by_expert(experts, n_experts, block)
    made = routing.get((n_experts, block))
    if made is None:
        made = routing[(n_experts, block)] = _sort_by_expert(experts, n_experts, block)
    return made


class _MatvecPlan(NamedTuple):
    """How `_matvec_kernel` runs one decode-sized product (`_matvec_plan`)."""

    grid: tuple[int, int, int]  # (output tiles, pairs, splits of the super-blocks)
    reduce: bool  # several programs make an output row (splits, or pairs summed): partials
    chunk: int  # super-blocks a split
    n_super: int
    row_bytes: int
    vec: bool  # x prepared by `_vec_x`
    int_read: bool  # integer dot products (`options["INT_X"]`: x quantized in the kernel, else by `_int_x`)
    words: bool  # the blocks read as int32 words
    qtype: GGMLType
    options: dict  # the kernel's constexprs and launch options
    # (residual, int_out, PDL) -> `_matvec_kernel` bound to `options` and those (`launch.bind`);
    # ("two runs", id of a second run's plan, PDL) -> (that plan, `_matvec_two_runs_kernel` bound)
    bound: dict


def _matvec_plan(
    code: int, in_features: int, out_features: int, n_pairs: int, out_div: int, gated: bool, scaled: bool,
    routed: bool, device: torch.device,
) -> _MatvecPlan:  # fmt: skip
    """The launch of a product of `n_pairs` <= MATVEC_MAX_ROWS rows, made once per shape, type
    code, device, `matvec_path`, `int_x_path` and launch setting (MATVEC_CONFIG may change: the
    sweeps)."""
    key = (
        code,
        in_features,
        out_features,
        n_pairs,
        out_div,
        gated,
        scaled,
        routed,
        device,
        matvec_path,
        _int_x_path(),
    )
    known = _PLANS.get(key)
    if known is not None and known[0] == known[1]:  # (the setting as it was planned with)
        return known[2]
    cfg = matvec_config(code)  # (checks matvec_path)
    plan = _planned(*key[:-2], _matvec_path(), key[-1], tuple(cfg.items()))
    if len(_PLANS) >= 4096:
        _PLANS.clear()
    _PLANS[key] = (cfg, dict(cfg), plan)
    return plan


def split_setting(gated: bool, routed: bool) -> str:
    """The key of a launch setting that says how many programs a multiprocessor a product wants
    (how far its super-blocks split): "gated_programs_per_sm" for a gated one, else
    "programs_per_sm" for a routed one (moe's down) and "dense_programs_per_sm" for one weight;
    "programs_per_sm" (4 when absent) stands in for a key the setting lacks."""
    return "gated_programs_per_sm" if gated else "programs_per_sm" if routed else "dense_programs_per_sm"


# The keys a matrix-vector launch setting may hold; `_planned` refuses others (a removed setting,
# a typo), so that a sweep or benchmarks/with_config.py never times a setting that does nothing.
MATVEC_SETTING_KEYS = (
    "BN", "num_warps", "stages", "unroll", "programs_per_sm", "gated_programs_per_sm", "dense_programs_per_sm",
    "prefetch",
)  # fmt: skip


# Each product's plan by its shape, type code, device, `matvec_path` and `int_x_path`: (the setting dict it
# was made with, a copy of it then, the plan); used while the two are equal (sweeps change
# settings in place). The only cache of plans: `_planned` makes one anew.
_PLANS: dict[tuple, tuple[dict, dict, _MatvecPlan]] = {}


def _planned(
    code, in_features, out_features, n_pairs, out_div, gated, scaled, routed, device, path, int_x, cfg_items
):
    qtype, packed = GGMLType(code & 0xFF), _packed_form(code)
    cfg = dict(cfg_items)
    unknown = sorted(set(cfg) - set(MATVEC_SETTING_KEYS))
    if unknown:
        raise ValueError(
            f"{qtype.name}'s matrix-vector launch setting has unknown keys {unknown}: {MATVEC_SETTING_KEYS}"
        )
    bn = cfg["BN"]
    n_super = in_features // SUPER
    int_read = _reads_int(code, path)
    vec = not int_read and ((path in ("vec", "int") and qtype in MATVEC_PATH_TYPES) or packed)
    tiles = _ceil_div(out_features, bn) * n_pairs
    # Split the rows' super-blocks over programs until the device has enough of them; the
    # partial sums add up in a fixed order (deterministic). A gated product's own key (0: never
    # split), else the setting's; a gated split keeps both sums' partials (`_matvec`).
    per_sm = cfg.get(split_setting(gated, routed), cfg.get("programs_per_sm", 4))
    splits = max(1, min(n_super, _ceil_div(_programs_wanted(device, per_sm), tiles)))
    chunk = _ceil_div(n_super, splits)
    splits = _ceil_div(n_super, chunk)
    options = {
        "QT": int(qtype), "NP": PARTS[qtype], "GATED": gated, "SCALED": scaled, "PACKED": packed,
        "ROUTED": routed, "VEC": vec, "STAGES": cfg.get("stages", 1), "UNROLL": cfg.get("unroll", 1), "BN": bn, "num_warps": cfg["num_warps"],
        "REDUCE": splits > 1 or out_div > 1, "INT": int_read,
        "PREFETCH": cfg.get("prefetch", 0) if int_read and qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 0,
        "INT_X": int_read and int_x == "kernel",
        "PTX": _ptx(),
    }  # fmt: skip
    return _MatvecPlan(
        grid=(_ceil_div(out_features, bn), n_pairs, splits),
        reduce=options["REDUCE"],
        chunk=chunk,
        n_super=n_super,
        row_bytes=in_features // block_size(qtype) * type_size(qtype),
        vec=vec,
        int_read=int_read,
        words=qtype == T.Q4_K or vec or int_read,
        qtype=qtype,
        options=options,
        bound={},
    )


def _product(
    x: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor | None,
    code: int,
    out_features: int,
    experts: torch.Tensor | None,
    x_div: int,
    scale: torch.Tensor | None,
    out_div: int = 1,
    out: torch.Tensor | None = None,
    prepared: dict | None = None,
    routing: dict | None = None,
    residual: torch.Tensor | None = None,
    int_out: dict | None = None,
) -> torch.Tensor:
    """[P / out_div, out] rows: pair p times expert experts[p] (None: expert 0 for every row,
    P = len(x)) of the stack w [E, out, row_bytes] or the one weight w [out, row_bytes] (gated
    by u: silu(w.x) * (u.x)), x row p // x_div, times scale[p] when given, the out_div pairs of
    each output row summed in order. `code`: the GGML type | PACKED | WIDE (`kernel_weight`).
    Written into `out` when given (rows of unit column stride, e.g. columns of a wider tensor).
    `prepared`: where several products of one op read the same x, a dict (empty at first) that
    keeps x as the decode reads took it (`_matvec`), so that it is prepared once. `routing`:
    where several products of one op route the same pairs, a dict (empty at first) that keeps
    their sorting by expert (`_sorted_pairs`), so that the prefill sorts them once.
    `residual` ([P / out_div, out] float32): `residual + ` the result, in the decode launch
    where it runs one. `int_out`: a dict where a decode product (unsplit, BN a multiple of 32:
    `_h_as_int` checks) leaves its result under "int" as `_int_x` would make it from the float
    result, which it then does not write (the float rows returned are left unset)."""
    if experts is not None and experts.dim() != 1:
        experts = experts.reshape(-1)
    n_pairs = x.shape[0] * x_div if experts is None else experts.numel()
    if n_pairs == 0:
        return x.new_empty((0, out_features), dtype=torch.float32) if out is None else out
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    if n_pairs <= MATVEC_MAX_ROWS:
        args = (x, w, u, code, out_features, experts, x_div, scale, n_pairs, out_div, out, prepared)
        return _matvec(*args, residual, int_out)
    y = _product_tiles(x, w, u, code, out_features, experts, x_div, scale, n_pairs, routing)
    if out_div > 1:
        y = y.view(n_pairs // out_div, out_div, out_features).sum(1)
    if residual is not None:
        y = residual + y
    return y if out is None else out.copy_(y)


def _product_tiles(x, w, u, code, out_features, experts, x_div, scale, n_pairs, routing) -> torch.Tensor:
    """`_product` of more than MATVEC_MAX_ROWS pairs (prefill; x float32, contiguous): the
    dequantized weight on tensor cores (`_product_dequantized`) or `_matmat_kernel`."""
    if w.dim() == 2:
        w, u = w[None], None if u is None else u[None]
    qtype, packed, wide = GGMLType(code & 0xFF), _packed_form(code), bool(code & WIDE)
    w = w.contiguous()  # a merged stack's view already is
    u = None if u is None else u.contiguous()
    n_experts = w.shape[0]
    in_features = x.shape[1]
    n_super = in_features // SUPER
    row_bytes = in_features // block_size(qtype) * type_size(qtype)
    out = x.new_empty((n_pairs, out_features))
    scaled = scale is not None
    scale = out if scale is None else scale.float().contiguous()
    gated = u is not None
    u = w if u is None else u
    lut = kernels.iq4_table(x.device) if qtype == T.IQ4_XS else out
    with _launch_device(x.device):
        path = _prefill_path()
        if path == "dequant" and not wide:
            u, scale = (u if gated else None), (scale if scaled else None)
            return _product_dequantized(x, w, u, qtype, out, experts, x_div, scale, packed, routing)
        half = path == "tiled16" and not wide
        xscale = out
        if half:
            x, xscale = _scaled_half(x)
        if experts is None:  # a dense weight: every row on "expert" 0
            experts, routing = torch.zeros(n_pairs, dtype=torch.int64, device=x.device), None
        variant = (x.device, code, gated, scaled, half, tuple(MATMAT_CONFIG[qtype].items()))

        def launch_with(cfg: dict[str, int]) -> None:
            sorted_ids, block_expert = _sorted_pairs(experts, n_experts, cfg["BM"], routing)
            grid = (block_expert.numel(), _ceil_div(out_features, cfg["BN"]))
            launch(_matmat_kernel, grid,
                x, w, u, out, sorted_ids, block_expert, scale, xscale, lut, out_features, n_super, n_pairs,
                row_bytes, out_features * row_bytes, x.stride(0), x_div, QT=int(qtype), NP=PARTS[qtype], BM=cfg["BM"],
                BN=cfg["BN"], GATED=gated, SCALED=scaled, PACKED=packed, HALF=half, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )  # fmt: skip

        _launch_fitted(launch_with, variant, MATMAT_CONFIG[qtype])
    return out


# The settings each kernel variant launched with on each device, where the configured ones asked
# for more shared memory than the device has (`_launch_fitted`).
_FITTED: dict[tuple, dict[str, int]] = {}


def fallback_settings(cfg: dict[str, int]):
    """`cfg` (a kernel's BM, BN and num_stages among its settings), then ever smaller demands on
    shared memory: one pipelining stage, then half the output tile down to 16 columns, then half
    the row block down to 16 rows (tl.dot's least)."""
    yield cfg
    if cfg.get("num_stages", 1) > 1:
        cfg = {**cfg, "num_stages": 1}
        yield cfg
    for key in ("BN", "BM"):
        while cfg[key] > 16:
            cfg = {**cfg, key: cfg[key] // 2}
            yield cfg


def _launch_fitted(launch, variant: tuple, cfg: dict[str, int]) -> None:
    """`launch(cfg)`; where the device has too little shared memory for it (a consumer GPU has 99
    KB a block, an H100 227 KB: scripts/kernel_fit.py), `launch` with the next of
    `fallback_settings`. The first that launches is kept for `variant` (the device, the kernel's
    constexprs, the configured settings)."""
    fitted = _FITTED.get(variant)
    if fitted is not None:
        launch(fitted)
        return
    *smaller, last = fallback_settings(cfg)
    for tried in smaller:
        try:
            launch(tried)
        except OutOfResources:
            continue
        _FITTED[variant] = tried
        return
    launch(last)  # the smallest: its error, if any, is the caller's
    _FITTED[variant] = last


def _matvec(
    x, w, u, code, out_features, experts, x_div, scale, n_pairs, out_div, out, prepared=None, residual=None,
    int_out=None,
) -> torch.Tensor:  # fmt: skip
    """`_product` of 1..MATVEC_MAX_ROWS pairs (x float32, contiguous): `_vec_x`, or `_int_x`
    under `int_x_path` "launch", where the type reads x prepared (taken from `prepared` when a
    product of the same op prepared this x so before, and left there), then `_matvec_kernel`
    (which quantizes x itself for the "int" reads under "kernel"), whose last program of each
    output tile sums the partials of its splits and pairs (no launch for the sums) and adds
    `residual`; under `int_out`, each program stores its rows in `_int_x`'s form instead."""
    device = x.device
    gated, scaled, routed = u is not None, scale is not None, experts is not None
    plan = _matvec_plan(code, x.shape[1], out_features, n_pairs, out_div, gated, scaled, routed, device)
    if out is None:
        out = x.new_empty((n_pairs // out_div, out_features))
    if not w.is_contiguous():
        w = w.contiguous()
    if u is None:
        u = w
    elif not u.is_contiguous():
        u = u.contiguous()
    if scale is None:
        scale = out
    elif scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.float().contiguous()
    lut = kernels.iq4_table(device) if plan.qtype == T.IQ4_XS else out
    tiles, _, splits = plan.grid
    part = counters = out
    res = out if residual is None else residual.contiguous()  # (RESIDUAL reads res[row, n])
    h_int = (out, out, out)  # (INT_OUT: h's int16 values, scales, sums)
    if int_out is not None:
        if plan.reduce or plan.options["BN"] % 32 or out_features % 32:
            raise ValueError("_matvec: int_out needs an unsplit product of whole 32-value blocks a program")
        hq, hsums, hscales = _int_x_scratch(device, n_pairs, out_features)
        h_int = (hq, hscales, hsums)
        int_out["int"] = (hq.view(torch.int32), hsums, hscales)  # as `_int_x` gives them
    if plan.reduce:
        part = _partials(x, ((2 if gated else 1) * splits, n_pairs, out_features))
        counters = _split_counters(device, tiles * (n_pairs // out_div))
    with _launch_device(device):
        if plan.words:
            w = w.view(torch.int32)
            u = w if u is w else u.view(torch.int32)
        x, xsum, xpow = _x_read(x, plan, prepared, out)
        row_bytes = plan.row_bytes
        pdl_kw = pdl_options(device)
        variant = (residual is not None, int_out is not None, pdl_kw is _PDL_ON)  # (one of two dicts)
        kernel = plan.bound.get(variant)
        if kernel is None:
            kernel = plan.bound[variant] = bind(
                _matvec_kernel, **plan.options, RESIDUAL=variant[0], INT_OUT=variant[1], **pdl_kw
            )
        # (`t.stride()[0]`: the same as `t.stride(0)`, a third faster)
        launch(kernel, plan.grid,
            x, w, u, out, out if experts is None else experts, scale, lut, out_features, n_pairs, plan.n_super,
            plan.chunk, row_bytes, out_features * row_bytes, x.stride()[0], x_div, xsum, xpow, part, counters,
            out.stride()[0], out_div, res, res.stride()[0], *h_int,
        )  # fmt: skip
    return out


def _x_read(x: torch.Tensor, plan: _MatvecPlan, prepared: dict | None, unused: torch.Tensor) -> tuple:
    """(x, its sums, its powers or scales) as `plan`'s read takes them: made by `_vec_x` or
    `_int_x` where the read takes x prepared (taken from `prepared` when a product of the same
    op prepared this x so before, and left there), else x itself and `unused` twice."""
    if not (plan.vec or (plan.int_read and not plan.options["INT_X"])):
        return x, unused, unused
    form = plan.qtype if plan.vec else "int"  # (`_vec_x`'s order depends on the type)
    made = None if prepared is None else prepared.get(form)
    if made is None:
        made = _vec_x(x, plan.qtype) if plan.vec else _int_x(x)
        if prepared is not None:
            prepared[form] = made
    return made


# A run's constexprs in `_matvec_two_runs_kernel` (the second run's names end in 2).
_RUN_OPTIONS = ("QT", "NP", "BN", "PACKED", "STAGES", "UNROLL", "REDUCE", "INT_X")


def _matvec_two_runs(x: torch.Tensor, runs: list[tuple], prepared: dict | None) -> bool:
    """`harness::qkv`'s two runs (weight, code, rows, output columns) of x [T, K] (float32,
    contiguous) in one launch of `_matvec_two_runs_kernel`, where QKV_CONFIG "one_launch" is on,
    T is at most its "one_launch_rows" (and a decode size) and both runs are "int" reads (each run's plan as `_matvec` makes it
    alone, so the same bits); False, launching nothing, otherwise."""
    n_pairs = x.shape[0]
    most = min(MATVEC_MAX_ROWS, QKV_CONFIG["one_launch_rows"])
    if not QKV_CONFIG["one_launch"] or len(runs) != 2 or not 0 < n_pairs <= most:
        return False
    device, k = x.device, x.shape[1]
    (_, code_1, rows_1, _), (_, code_2, rows_2, _) = runs
    first = _matvec_plan(code_1, k, rows_1, n_pairs, 1, False, False, False, device)
    second = _matvec_plan(code_2, k, rows_2, n_pairs, 1, False, False, False, device)
    if not (first.int_read and second.int_read):
        return False
    pdl_kw = pdl_options(device)
    # (`plan.bound`: the second run's plan and the kernel bound to both, by that plan and PDL)
    key = ("two runs", id(second), pdl_kw is _PDL_ON)
    made = first.bound.get(key)
    if made is None or made[0] is not second:
        options = {name: first.options[name] for name in _RUN_OPTIONS}
        options |= {name + "2": second.options[name] for name in _RUN_OPTIONS}
        warps = max(first.options["num_warps"], second.options["num_warps"])
        made = first.bound[key] = (
            second,
            bind(_matvec_two_runs_kernel, **options, PTX=_ptx(), num_warps=warps, **pdl_kw),
        )
    kernel = made[1]
    counted = (
        first.grid[0] * n_pairs if first.reduce else 0,
        second.grid[0] * n_pairs if second.reduce else 0,
    )
    counters = _split_counters(device, sum(counted)) if any(counted) else None
    args = []
    for i, ((w, _, rows, into), plan) in enumerate(zip(runs, (first, second), strict=True)):
        tiles, _, splits = plan.grid
        part = counter = into
        if plan.reduce:
            part = _partials(x, (splits, n_pairs, rows), i)
            counter = counters if i == 0 or not counted[0] else counters[counted[0] :]
        read, xsum, xpow = _x_read(x, plan, prepared, into)
        w = w if w.is_contiguous() else w.contiguous()
        args += (read, w.view(torch.int32), into, xsum, xpow, part, counter, rows, plan.chunk, plan.row_bytes)
        args += (read.stride()[0], tiles, splits)
    with _launch_device(device):
        programs = first.grid[0] * n_pairs * first.grid[2]
        total = programs + second.grid[0] * n_pairs * second.grid[2]
        launch(kernel, (total,), *args, n_pairs, first.n_super, runs[0][3].stride()[0], programs)
    return True


# Per device, zeroed int32 counters that `_matvec_kernel`'s programs count their arrivals at an
# output tile with (the last one sums the partials and sets its counter back to 0), never read
# on the host. Launches that use them follow each other on one stream (two streams running
# products at once on one device would share them). When a launch needs more, a larger buffer
# is made and the older ones are kept: a captured CUDA graph may still point at them.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


# Per device and shape, the decode launches' scratch: x as the matrix-vector reads take it
# (`_int_x`, `_vec_x`), the partial sums (`_partials`), the attention's rotated queries and its
# splits' partial results. A scratch never leaves its op: the launch that fills it and those
# that read it follow each other on one stream, in one op call, so every call of that shape
# reuses it instead of allocating (the same assumption as `_COUNTERS`: two streams running ops
# at once on one device would share them). Kept for good: a captured CUDA graph points at the
# buffers it was captured with. Decode shapes only (at most MATVEC_MAX_ROWS rows): few of them.
_SCRATCH: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _scratch(key: tuple, make) -> tuple[torch.Tensor, ...]:
    """The scratch of `key` (its device and shape in it), made by `make()` the first time."""
    made = _SCRATCH.get(key)
    if made is None:
        made = _SCRATCH[key] = make()
    return made


def _partials(x: torch.Tensor, shape: tuple[int, int, int], run: int = 0) -> torch.Tensor:
    """The scratch [splits, pairs, N] `_matvec_kernel` leaves its partial products in, [2 *
    splits, pairs, N] for a gated product (its W.x's, then its U.x's): keyed by that whole shape,
    so a product never gets a buffer of another size. A function of its own so that tests can
    see them: they check the order they are summed in. `run`: which run of one launch they are
    (`_matvec_two_runs`: two runs of one shape never share them)."""
    return _scratch(("partials", x.device, shape, run), lambda: (x.new_empty(shape),))[0]


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """`n` or more of the zeroed counters on `device` (`_COUNTERS`: its newest buffer)."""
    made = _COUNTERS.get(device)
    if made is None:
        made = _COUNTERS[device] = []
    if not made or made[-1].numel() < n:
        size = max(n, 2 * made[-1].numel() if made else 4096)
        made.append(torch.zeros(size, dtype=torch.int32, device=device))
    return made[-1]


def _vec_x(x: torch.Tensor, qtype: GGMLType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] as `_q4_k_dot_vec`, `_q6_k_dot_vec` or `_q8_0_dot_vec` reads it, made by one
    launch (`_vec_x_kernel`, a program per super-block of each row).

    Q6_K: per 256 values in the order of (quarter f, byte b, half c, word w) -> value
    128c + 32f + 4w + b, scaled as below for its nibble's bit; the sums are 32 times those of
    the 16 values of sub-block 8c + 2f + h, at position 4f + 2c + h [R, K / 16].

    Q8_0: in the order (byte b, block k, word w) -> value 32k + 4w + b; sums as Q4_K's.

    Q4_K: in the order
    (per 256 values) group g, nibble h, byte b, word w -> value 64g + 32h + 4w + b; each row
    divided by its power, a power of two above its largest magnitude, and times 2^(120 - at)
    for the nibble's bit position `at` in the word as the kernel reads it (all exact). Also the
    rows' sums of 32 values, divided by the power, times 2^-29 (the products' units)
    [R, K / 32], and the powers [R]. (The device's scratch for that shape: `_SCRATCH`.)"""
    r, k = x.shape
    order, sums, power = _scratch(
        ("vec x", qtype, x.device, r, k),
        lambda: (torch.empty_like(x), x.new_empty((r, k // (16 if qtype == T.Q6_K else 32))), x.new_empty(r)),
    )
    kernel = _bound(
        _vec_x_kernel, QT=int(qtype), PEAK_BLOCK=min(_next_pow2(k), 4096), num_warps=4, **pdl_options(x.device)
    )  # fmt: skip
    launch(kernel, (r, k // SUPER), x, order, sums, power, k)
    return order, sums, power


def _int_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] float32 as the "int" reads take it under `int_x_path` "launch", made by one launch
    (`_int_x_kernel`, a program per super-block of each row): its int16 values in the int layout, viewed as int32
    pairs [R, K / 2]; their float32 sums per 16 values [R, K / 16]; the scales per 32 [R, K / 32]
    (the device's scratch for that shape: `_SCRATCH`)."""
    q, sums, scales = _int_x_scratch(x.device, *x.shape)
    _int_x_into(x, q, sums, scales)
    return q.view(torch.int32), sums, scales


def _int_x_scratch(device: torch.device, r: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scratch x [R, K] takes `_int_x`'s form in: int16 values [R, K], sums [R, K / 16],
    scales [R, K / 32] (`_SCRATCH`; a gated product's INT_OUT fills the same)."""

    def make():
        return (
            torch.empty((r, k), dtype=torch.int16, device=device),
            torch.empty((r, k // 16), device=device),
            torch.empty((r, k // 32), device=device),
        )

    return _scratch(("int x", device, r, k), make)


def dp2a(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, hi: bool, signed: bool) -> torch.Tensor:
    """`_dp2a` elementwise on int32 tensors of one shape on one device, as the "int" reads
    compute it there (PTX dp2a on a GPU, its emulation under the interpreter): for checks."""
    _check_devices("dp2a", a, b, c)
    a, b, c = (t.to(torch.int32).contiguous() for t in (a, b, c))
    out = torch.empty_like(a)
    if a.numel():
        with _launch_device(a.device):
            grid = (_ceil_div(a.numel(), 1024),)
            launch(_dp2a_kernel, grid, a, b, c, out, a.numel(), HI=hi, SIGNED=signed, PTX=_ptx(), num_warps=4)
    return out


def _matvec_path() -> str:
    if matvec_path not in MATVEC_PATHS:
        raise UsageError(
            None, "HARNESS_MATVEC", f"must be one of {', '.join(MATVEC_PATHS)}, got {matvec_path!r}"
        )
    return matvec_path


_in_graph_step = False  # inside `graph_step`


@contextlib.contextmanager
def graph_step():
    """Inside the block the decode ops run as a CUDA graph's replay is best served ("auto"
    `int_x_path`: x quantized by its own launch). The decode graph wraps its warm-up step and
    its capture in it, so that the capture launches only kernels the warm-up compiled."""
    global _in_graph_step
    before, _in_graph_step = _in_graph_step, True
    try:
        yield
    finally:
        _in_graph_step = before


def _int_x_path() -> str:
    """Where the "int" reads quantize x for a product now: "kernel" or "launch"
    (`int_x_path`; "auto": "launch" inside `graph_step`, else "kernel")."""
    if int_x_path == "auto":
        return "launch" if _in_graph_step else "kernel"
    if int_x_path not in INT_X_PATHS:
        raise UsageError(
            None, "HARNESS_INT_X", f"must be one of {', '.join(INT_X_PATHS)}, got {int_x_path!r}"
        )
    return int_x_path


def _attention_path() -> str:
    if attention_path not in ATTENTION_PATHS:
        raise UsageError(
            None, "HARNESS_ATTENTION", f"must be one of {', '.join(ATTENTION_PATHS)}, got {attention_path!r}"
        )
    return attention_path


def _prefill_path() -> str:
    if prefill_path not in PREFILL_PATHS:
        raise UsageError(
            None, "HARNESS_PREFILL", f"must be one of {', '.join(PREFILL_PATHS)}, got {prefill_path!r}"
        )
    return prefill_path


def _scaled_half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] float32 (contiguous) as float16 rows divided by their largest magnitude (no
    overflow, no lost small rows), and those magnitudes [R] (1 for a row of zeros, or one with a
    NaN): one launch (`_scaled_half_kernel`), bit for bit torch's `(x / peak[:, None]).half()`."""
    r, k = x.shape
    out = x.new_empty((r, k), dtype=torch.float16)
    peak = x.new_empty(r)
    if x.numel():
        with _launch_device(x.device):
            launch(_scaled_half_kernel, (r,), x, out, peak, k, BK=1024, num_warps=4)
    return out, peak


def _product_dequantized(
    x: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor | None,
    qtype: GGMLType,
    out: torch.Tensor,
    experts: torch.Tensor | None,
    x_div: int,
    scale: torch.Tensor | None,
    packed: int,
    routing: dict | None = None,
) -> torch.Tensor:
    """`_product` for many rows, written into `out` [P, N]: weights dequantized to float16 (bounded
    scratch; a packed weight read in its layout, `_dequantize_packed`), products on tensor cores
    with float32 accumulation. A dense weight (experts None) goes to torch.matmul; routed pairs
    to `_grouped_kernel`, launched once per chunk of experts, each launch skipping the row blocks
    of other experts (no host read of the routing). Gated, a chunk's gate and up weights are
    dequantized together and one launch makes silu(gate) * up; the routing scale, where given,
    is applied there too. Results go into `out` in place (no copy of a finished product)."""
    n_pairs, n_out = out.shape
    in_features = x.shape[1]
    xh, peak = _scaled_half(x)
    mats = [w] if u is None else [w, u]

    def half(m: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if packed:  # read in place: no unpacked copy of the blocks (2: interleaved Q6_K)
            return _dequantize_packed(m, qtype, shape, packed == 2)
        return kernels.dequantize(m, qtype, shape, torch.float16)

    if experts is None:
        if x_div != 1:  # every row of x stands for x_div pairs
            xh, peak = xh.repeat_interleave(x_div, 0), peak.repeat_interleave(x_div)
        results = []
        for m in mats:
            wh = half(m[0], (n_out, in_features))
            y = out if len(mats) == 1 else torch.empty_like(out)
            torch.mul(torch.matmul(xh, wh.T), peak[:, None], out=y)  # float16 products, widened
            results.append(y)
            del wh  # the scratch goes back to the allocator before the next one is made
        if u is not None:
            torch.mul(torch.nn.functional.silu(results[0], inplace=True), results[1], out=out)
        if scale is not None:
            out.mul_(scale[:, None])
        return out
    gated, scaled = u is not None, scale is not None
    cfg = GATED_GROUPED_CONFIG if gated else GROUPED_CONFIG
    variant = (x.device, "grouped", gated, scaled, tuple(cfg.items()))
    n_experts = w.shape[0]
    routing = {} if routing is None else routing
    chunk = max(1, min(n_experts, SCRATCH_MAX_BYTES // (len(mats) * n_out * in_features * 2)))

    def launch_with(cfg: dict[str, int], wh: torch.Tensor, uh: torch.Tensor, lo: int, hi: int) -> None:
        sorted_ids, block_expert = _sorted_pairs(experts, n_experts, cfg["BM"], routing)
        grid = (block_expert.numel(), _ceil_div(n_out, cfg["BN"]))
        launch(_grouped_kernel, grid,
            xh, peak, wh, uh, peak if scale is None else scale, out, sorted_ids, block_expert, n_out, in_features,
            n_pairs, x_div, lo, hi, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GATED=gated, SCALED=scaled,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip

    for lo in range(0, n_experts, chunk):
        hi = min(lo + chunk, n_experts)
        wh = half(w[lo:hi], (hi - lo, n_out, in_features))
        uh = half(u[lo:hi], (hi - lo, n_out, in_features)) if gated else wh
        _launch_fitted(functools.partial(launch_with, wh=wh, uh=uh, lo=lo, hi=hi), variant, cfg)
        del wh, uh  # the scratch goes back to the allocator before the next one is made
    return out


def _dequantize_packed(
    raw: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...], interleaved: bool = False
) -> torch.Tensor:
    """A weight's blocks [..., rows, row_bytes] in `pack`'s layout (Q6_K, Q8_0, interleaved Q4_K;
    `interleaved`: Q6_K's interleaved) as float16 values of `shape`, bit for bit
    `kernels.dequantize(unpack(raw, qtype, interleaved), qtype, shape, torch.float16)`, in one
    launch (`_dequant_packed_kernel`) that reads the blocks where they are."""
    raw = raw.contiguous()
    out = raw.new_empty(shape, dtype=torch.float16)  # from raw: a tracer sees which weight it is for
    values = shape[-1]
    nblocks = out.numel() // block_size(qtype)
    if nblocks:
        nb = 16 if qtype in (T.Q6_K, T.Q4_K) else 128  # 4096 values a program, as harness.quant.kernels
        with _launch_device(raw.device):
            launch(_dequant_packed_kernel, (_ceil_div(nblocks, nb),),
                raw, out, nblocks, values // block_size(qtype), raw.shape[-1], QT=int(qtype), NB=nb, IL=interleaved,
                num_warps=4, enable_fp_fusion=False,
            )  # fmt: skip
    return out


# The ops are defined with torch.library.Library, not torch.library.custom_op: the same schema
# (inferred from the function as custom_op infers it) and fake implementation, with fewer Python
# layers a call (custom_op's wrappers cost microseconds per call, an eager decode step makes
# hundreds: benchmarks/bench_host.py). An op that mutates a tensor bumps its version itself.
_LIBRARY = torch.library.Library("harness", "FRAGMENT")


def _op(mutates_args: tuple[str, ...] = ()):
    """Registers the decorated function as the op harness::<its name>."""

    def define(fn):
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        _LIBRARY.define(fn.__name__ + schema, tags=(torch.Tag.pt2_compliant_tag,))
        _LIBRARY.impl(fn.__name__, fn, "CompositeExplicitAutograd")
        return fn

    return define


def _fake(name: str):
    """Registers the decorated function as harness::`name`'s fake implementation (shapes only)."""
    return torch.library.register_fake(f"harness::{name}", lib=_LIBRARY)


@_op()
def qmatmul(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: int,
    out_features: int,
    x_q: Optional[torch.Tensor] = None,  # noqa: UP045  (as moe_ffn's)
    x_sums: Optional[torch.Tensor] = None,  # noqa: UP045
    x_scales: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    """[T, in] float x times the GGUF weight `raw` ([out, row_bytes] blocks of `qtype`) -> [T, out] float32.

    `qtype`: the GGML type, with PACKED and WIDE as `kernel_weight` gives them. x_q, x_sums,
    x_scales: x's `_int_x` form, made by the op before (`attention_int`), which an "int" read
    then takes instead of running `_int_x` (all three or none)."""
    given = _given_int_x("harness::qmatmul", x, x_q, x_sums, x_scales)
    _check_devices("harness::qmatmul", x, raw)
    if raw.dim() != 2:
        raw = raw.reshape(out_features, -1)
    return _product(x, raw, None, qtype, out_features, None, 1, None, prepared=given)


@_fake("qmatmul")
def _(x, raw, qtype, out_features, x_q=None, x_sums=None, x_scales=None):
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


@_op()
def moe_ffn(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_qtype: int,
    down_qtype: int,
    residual: Optional[torch.Tensor] = None,  # noqa: UP045  (torch 2.11's schema inference reads Optional)
    x_q: Optional[torch.Tensor] = None,  # noqa: UP045
    x_sums: Optional[torch.Tensor] = None,  # noqa: UP045
    x_scales: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    """sum_s weights[t, s] * down_e(silu(gate_e x_t) * up_e x_t), e = experts[t, s], for every token
    t of x [T, D]; gate/up [E, F, bytes] and down [E, D, bytes] raw blocks -> [T, D] float32
    (the qtypes with PACKED and WIDE as `kernel_weight` gives them; gate and up share one).

    `residual` ([T, D] float32): the layer's residual add in the op, `residual + ` that sum (the
    same add the layer would make after it: one op fewer a layer). x_q, x_sums, x_scales: x's
    `_int_x` form, made by the norm before (`add_rms_norm_int`), which the gated product's "int"
    read then takes instead of running `_int_x` (all three or none)."""
    x_int = _given_int_x("harness::moe_ffn", x, x_q, x_sums, x_scales)
    _check_devices("harness::moe_ffn", x, gate, up, down, weights, experts, *_given(residual))
    t, k = experts.shape
    ffn, dim = gate.shape[1], down.shape[1]
    if residual is not None and (residual.shape != (t, dim) or residual.dtype != torch.float32):
        raise ValueError(
            f"harness::moe_ffn: residual must be float32 of shape {[t, dim]}, "
            f"got {residual.dtype} of shape {list(residual.shape)}"
        )
    routing = {}  # both products route the same pairs: the prefill sorts them once
    # h's `_int_x` form, where the gated product leaves it so (its float rows then unset)
    h_int = {} if _h_as_int(t * k, dim, ffn, gate_up_qtype, down_qtype, x.device) else None
    pairs = experts.reshape(-1)  # (once for both products)
    h = _product(
        x, gate, up, gate_up_qtype, ffn, pairs, k, None, prepared=x_int, routing=routing, int_out=h_int
    )
    added = residual is not None and MOE_FFN_CONFIG["residual"]
    y = _product(
        h, down, None, down_qtype, dim, pairs, 1, weights.reshape(-1), out_div=k, prepared=h_int,
        routing=routing, residual=residual if added else None,
    )  # [T, D]  # fmt: skip
    return y if residual is None or added else residual + y


def _h_as_int(n_pairs: int, dim: int, ffn: int, gate_up_code: int, down_code: int, device) -> bool:
    """Whether moe_ffn's gated product leaves h in `_int_x`'s form for its down product
    (MOE_FFN_CONFIG "int_h"): a decode product whose down product reads h so (an "int" read,
    `int_x_path` not "kernel") and whose gated launch is one split, BN a multiple of 32."""
    if not MOE_FFN_CONFIG["int_h"] or not 0 < n_pairs <= MATVEC_MAX_ROWS or _int_x_path() == "kernel":
        return False
    if not _reads_int(down_code, _matvec_path()):
        return False
    gated = _matvec_plan(gate_up_code, dim, ffn, n_pairs, 1, True, False, True, device)
    return not gated.reduce and gated.options["BN"] % 32 == 0 and ffn % 32 == 0


def _given(t: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(t,) for a tensor, () for None: an optional argument among the tensors `_check_devices` checks."""
    return () if t is None else (t,)


@_fake("moe_ffn")
def _(
    x,
    gate,
    up,
    down,
    weights,
    experts,
    gate_up_qtype,
    down_qtype,
    residual=None,
    x_q=None,
    x_sums=None,
    x_scales=None,
):
    return x.new_empty((x.shape[0], down.shape[1]), dtype=torch.float32)


@_op()
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] float32 normalized by its root mean square, times weight [D] float32 (one launch)."""
    _check_devices("harness::rms_norm", x, weight)
    return _normed(x, None, weight, eps)[1]


def _normed(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, int_out: bool = False
) -> tuple[torch.Tensor, ...]:
    """(x + residual, or x when residual is None; its `rms_norm`) in one launch (the devices
    checked by the caller; x and residual float32 of one shape); with `int_out` (x's rows whole
    super-blocks), then the norm's `_int_x` form: its int16 values [..., D], sums [..., D / 16],
    scales [..., D / 32], new tensors (they leave the op: not `_SCRATCH`)."""
    d = x.shape[-1]
    x = x.contiguous()
    add = residual is not None
    residual = residual.contiguous() if add else x
    total = torch.empty_like(x) if add else x
    out = torch.empty_like(x)
    int_form = (out, out, out)  # (INT_OUT: q, scales, sums as the kernel takes them)
    if int_out:
        q, sums, scales = _int_form_like(x)
        int_form = (q, scales, sums)
    if x.numel():
        with _launch_device(x.device):
            bd = _next_pow2(d)
            kernel = _bound(
                _rms_norm_kernel, BD=bd, ADD=add, INT_OUT=int_out, PTX=int_out and _ptx(), num_warps=_norm_warps(bd),
                **pdl_options(x.device),
            )  # fmt: skip
            launch(kernel, (x.numel() // d,), x, residual, total, weight, out, *int_form, d, eps)
    return (total, out, q, sums, scales) if int_out else (total, out)


def _norm_warps(bd: int) -> int:
    """The warps of a norm launch over rows of up to `bd` values (`_rms_norm_kernel`, and
    `_norm_route_kernel`: its rms has the bits of the norm's only with the same warps)."""
    return 8 if bd >= 2048 else 4


@_fake("rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x)


# The norms' `_int_x` form (NORM_CONFIG "int_out") is an op's output and the next op's input, not
# state kept between them: two ops of their own give it (`rms_norm_int`, `add_rms_norm_int`: the
# schemas of `rms_norm` and `add_rms_norm` stay as every caller knows them), and `qkv` and
# `moe_ffn` take it as three optional tensors, x_q, x_sums, x_scales (`_int_x`'s three, each with
# its own dtype and shape in the schema: a tracer sees each with its device, a wrong one is
# refused by name), in place of running `_int_x` on x.


@_op()
def rms_norm_int(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rms_norm` of x [..., D] float32 (D a multiple of 256) and, from the same launch, that
    output as the "int" reads take x (`_int_x`'s form, the same bits): (normed, x_q int16 [..., D]
    in the int layout, x_sums [..., D / 16], x_scales [..., D / 32]), for `qkv`'s or `moe_ffn`'s
    x_q, x_sums, x_scales."""
    _check_devices("harness::rms_norm_int", x, weight)
    _check_int_norm("harness::rms_norm_int", x, None)
    return _normed(x, None, weight, eps, int_out=True)[1:]


@_fake("rms_norm_int")
def _(x, weight, eps):
    return torch.empty_like(x), *_int_form_like(x)


def _int_form_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty tensors of x [..., D]'s `_int_x` form: x_q, x_sums, x_scales."""
    lead, d = x.shape[:-1], x.shape[-1]
    return (
        x.new_empty(x.shape, dtype=torch.int16),
        x.new_empty((*lead, d // 16)),
        x.new_empty((*lead, d // 32)),
    )


def _check_int_norm(op: str, x: torch.Tensor, residual: torch.Tensor | None) -> None:
    """What a norm with an int form takes: x float32 of rows of whole super-blocks, residual
    float32 of x's shape."""
    if x.dtype != torch.float32 or x.dim() == 0 or x.shape[-1] % SUPER:
        raise ValueError(
            f"{op}: x must be float32 of rows of a multiple of {SUPER} values, "
            f"got {x.dtype} of shape {list(x.shape)}"
        )
    if residual is not None and (residual.dtype != torch.float32 or residual.shape != x.shape):
        raise ValueError(
            f"{op}: residual must be float32 of x's shape {list(x.shape)}, "
            f"got {residual.dtype} of shape {list(residual.shape)}"
        )


def _given_int_x(op: str, x: torch.Tensor, x_q, x_sums, x_scales) -> dict | None:
    """An op's x_q, x_sums, x_scales (x [T, K]'s `_int_x` form, from `rms_norm_int` or
    `add_rms_norm_int`) checked against x, as `_product`'s `prepared` takes them: {"int": (x_q
    as int32 pairs, x_sums, x_scales)}; None where none is given. A device other than x's is
    refused with CUDA's device error, another dtype or shape with a ValueError, naming the
    argument."""
    if x_q is None and x_sums is None and x_scales is None:
        return None
    given = {"x_q": x_q, "x_sums": x_sums, "x_scales": x_scales}
    missing = [name for name, t in given.items() if t is None]
    if missing:
        raise ValueError(f"{op}: x_q, x_sums and x_scales are given together, got no {', '.join(missing)}")
    t, k = x.shape
    if k % SUPER:
        raise ValueError(f"{op}: x_q needs rows of x of a multiple of {SUPER} values, got {k}")
    want = {
        "x_q": (torch.int16, (t, k)), "x_sums": (torch.float32, (t, k // 16)),
        "x_scales": (torch.float32, (t, k // 32)),
    }  # fmt: skip
    for name, tensor in given.items():
        if tensor.device != x.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{x.device} and {tensor.device}! ({op}: {name})"
            )
        dtype, shape = want[name]
        if tensor.dtype != dtype or tensor.shape != shape:
            raise ValueError(
                f"{op}: {name} must be {dtype} of shape {list(shape)} (x's `_int_x` form), "
                f"got {tensor.dtype} of shape {list(tensor.shape)}"
            )
    return {"int": (x_q.contiguous().view(torch.int32), x_sums.contiguous(), x_scales.contiguous())}


def norm_int_out(n_pairs: int, in_features: int, codes: tuple[int, ...]) -> bool:
    """Whether a norm's output should come with its `_int_x` form (NORM_CONFIG "int_out") for the
    decode op after it whose products of `codes` (`kernel_weight`'s) read it in `n_pairs`
    token-expert pairs with rows of `in_features`: a decode-sized call in which one of them reads
    it through "int" with x from a launch (`int_x_path` not "kernel")."""
    return NORM_CONFIG["int_out"] and _reads_int_form(n_pairs, in_features, codes)


def _reads_int_form(n_pairs: int, in_features: int, codes: tuple[int, ...]) -> bool:
    """Whether a decode op whose products of `codes` read x in `n_pairs` pairs with rows of
    `in_features` would take x's `_int_x` form from a launch (one of them an "int" read,
    `int_x_path` not "kernel", rows of whole super-blocks): then an op before it may make it."""
    return (
        0 < n_pairs <= MATVEC_MAX_ROWS
        and in_features % SUPER == 0
        and _int_x_path() != "kernel"
        and any(_reads_int(code, _matvec_path()) for code in codes)
    )


@_op()
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Hd] float32 with pairs (2i, 2i+1), i < cos.shape[1], rotated by the angles of
    row positions[t] of the tables cos, sin [S_max, rope_dim/2] (GGML rope type 0; one launch)."""
    _check_devices("harness::rope", x, cos, sin, positions)
    return _rotated(x, cos, sin, positions)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`rope`'s launch (the devices checked by the caller)."""
    t, heads, hd = x.shape
    half = cos.shape[1]
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        with _launch_device(x.device):
            launch(_rope_kernel, (t, heads),
                x, cos, sin, positions, out, heads, hd, half, BH=_next_pow2(max(half, 1)),
                BD=_next_pow2(hd), num_warps=1, enable_fp_fusion=False,
            )  # fmt: skip
    return out


@_fake("rope")
def _(x, cos, sin, positions):
    return torch.empty_like(x)


# ---- Ops that make a decode step few ops (a tracer pays per op) ----------------------------------
# Each is one op to a dispatch mode, whatever it launches inside; each names its inputs, so a
# tracer sees which GGUF tensors it reads and on which devices, and each refuses tensors that
# are not on one CUDA device (`_check_devices`). They keep static shapes and read nothing back
# to the host: a CUDA graph can capture them.


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the blocks of `b` start where those of `a` end, in one allocation (rows of one
    buffer, as `pack_rows` lays them out)."""
    return (
        a.is_contiguous()
        and b.is_contiguous()
        and a.shape[1:] == b.shape[1:]
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.storage_offset() == a.storage_offset() + a.numel()
    )


def pack_rows(raws: list[torch.Tensor], qtypes: list[int]) -> list[torch.Tensor]:
    """`raws` ([rows, row_bytes] blocks on one device), each run of consecutive ones of one type
    (or `kernel_weight` code) and row size copied into one buffer, one after another, and returned as views of it (the
    same bytes; a run already laid out so is left as it is): `harness::qkv` multiplies such a run in one launch."""
    out = list(raws)
    i = 0
    while i < len(raws):
        j = i + 1
        while j < len(raws) and qtypes[j] == qtypes[i] and raws[j].shape[1:] == raws[i].shape[1:]:
            j += 1
        if j - i > 1 and not all(_follows(raws[n - 1], raws[n]) for n in range(i + 1, j)):
            buffer = torch.cat(raws[i:j])
            start = 0
            for n in range(i, j):
                rows = raws[n].shape[0]
                out[n] = buffer[start : start + rows]
                start += rows
        i = j
    return out


@_op()
def qkv(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    qtype_q: int,
    qtype_k: int,
    qtype_v: int,
    x_q: Optional[torch.Tensor] = None,  # noqa: UP045  (as moe_ffn's residual)
    x_sums: Optional[torch.Tensor] = None,  # noqa: UP045
    x_scales: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    """x [T, in] float times attention's three GGUF weights (blocks [out_i, row_bytes] as
    `kernel_weight` prepares them, with its codes: the GGML type | PACKED | WIDE) -> [T,
    out_q + out_k + out_v] float32, q, k and v side by side in each row (one tensor, written in
    place: `harness::attention` takes it whole). Weights of one code whose blocks follow each
    other in memory (`pack_rows`) are multiplied in one launch, and under QKV_CONFIG "one_launch"
    two such runs that decode through "int" reads both in one (`_matvec_two_runs`); x is
    prepared once for the products that read it alike where a launch prepares it (decode: one
    `_vec_x` per type under "vec", one `_int_x` for Q4_K_M's Q4_K and packed Q6_K or Q8_0 under
    `int_x_path` "launch"; none under "kernel"). x_q, x_sums, x_scales: x's `_int_x` form, made by the norm before
    (`rms_norm_int`), which the "int" reads then take instead of running `_int_x` (all three or
    none)."""
    given = _given_int_x("harness::qkv", x, x_q, x_sums, x_scales)
    _check_devices("harness::qkv", x, wq, wk, wv)
    weights, qtypes = (wq, wk, wv), (qtype_q, qtype_k, qtype_v)
    out = x.new_empty((x.shape[0], wq.shape[0] + wk.shape[0] + wv.shape[0]), dtype=torch.float32)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    prepared = {} if given is None else given
    runs = []  # (weight, code, rows, output columns)
    i = column = 0
    while i < 3:
        run = weights[i]
        rows = run.shape[0]
        j = i + 1
        while j < 3 and qtypes[j] == qtypes[i] and _follows(weights[j - 1], weights[j]):
            rows += weights[j].shape[0]
            j += 1
        if j - i > 1:
            run = torch.as_strided(run, (rows, *run.shape[1:]), run.stride())
        runs.append((run, qtypes[i], rows, out if rows == out.shape[1] else out.narrow(1, column, rows)))
        column += rows
        i = j
    if not _matvec_two_runs(x, runs, prepared):
        for run, code, rows, into in runs:
            _product(x, run, None, code, rows, None, 1, None, out=into, prepared=prepared)
    return out


@_fake("qkv")
def _(x, wq, wk, wv, qtype_q, qtype_k, qtype_v, x_q=None, x_sums=None, x_scales=None):
    return x.new_empty((x.shape[0], wq.shape[0] + wk.shape[0] + wv.shape[0]), dtype=torch.float32)


@_op(mutates_args=("cache_k", "cache_v"))
def attention(
    qkv: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],  # noqa: UP045  (torch 2.11's schema inference reads Optional)
    start: int,
) -> torch.Tensor:
    """Causal attention of one call, with its KV-cache write, in one op.

    qkv [T, H*Hd + 2*K*Hd] float32: each token's projections (before rope) q [H*Hd], k, v [K*Hd]
    side by side, as `harness::qkv` gives them; cache_k, cache_v [K, S_max, Hd] float32; cos,
    sin [S_max, rope_dim/2] rope tables (GGML rope type 0 on q and k). The tokens sit at
    `positions` ([T] int64 on the device; the static-shape decode step, attending over the
    whole cache, masked), or, when that is None, at start..start+T-1 (attending over the first
    start+T cached positions). k and v (k rotated) are written into the caches at those
    positions. -> [T, H*Hd] float32, the heads' outputs side by side. Decode-sized calls take
    Triton kernels (`attention_takes_kernels` says which), the others the torch path
    (`harness.model.mixtral.Attention`'s arithmetic, op for op); both write the caches bit for
    bit alike, their outputs agree to float32 rounding."""
    _check_attention("harness::attention", qkv, cache_k, cache_v, cos, sin, positions)
    if attention_takes_kernels(qkv, cache_k, cache_v, cos, sin, positions):
        return _attention_kernels(qkv, cache_k, cache_v, cos, sin, positions, start)
    return _attention_torch(qkv, cache_k, cache_v, cos, sin, positions, start)


def _check_attention(op: str, qkv, cache_k, cache_v, cos, sin, positions) -> None:
    """What `attention` and `attention_int` take: one device, qkv [T, H*Hd + 2*K*Hd]."""
    _check_devices(op, qkv, cache_k, cache_v, cos, sin, *_given(positions))
    n_kv, _, hd = cache_k.shape
    if qkv.dim() != 2 or qkv.shape[1] <= 2 * n_kv * hd:
        raise ValueError(
            f"{op}: qkv {list(qkv.shape)} is not [T, H*Hd + 2*K*Hd] for the cache's {n_kv} heads of {hd}"
        )


# Attention's output in `_int_x`'s form (ATTENTION_CONFIG "int_out"), as the norms' (see
# `rms_norm_int`): an output of an op of its own, `attention_int` (`attention`'s schema stays),
# which `qmatmul` (the output projection) takes as x_q, x_sums, x_scales.


@_op(mutates_args=("cache_k", "cache_v"))
def attention_int(
    qkv: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],  # noqa: UP045  (as attention's)
    start: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention` (its rows H*Hd a multiple of 256 values) and that output as the "int" reads take
    x (`_int_x`'s form, the same bits): (out [T, H*Hd], x_q int16 [T, H*Hd] in the int layout,
    x_sums [T, H*Hd / 16], x_scales [T, H*Hd / 32]), for `qmatmul`'s x_q, x_sums, x_scales. The
    kernels' launch that writes out stores it (INT_OUT: head dims a multiple of 32, the
    attention launch's tiles up to ATTENTION_CONFIG "int_out_rows"); elsewhere (larger tiles,
    other head dims, the torch path) an `_int_x` launch on out after it."""
    op = "harness::attention_int"
    _check_attention(op, qkv, cache_k, cache_v, cos, sin, positions)
    n_kv, _, hd = cache_k.shape
    width = qkv.shape[1] - 2 * n_kv * hd
    if width % SUPER:
        raise ValueError(f"{op}: the output's rows (H*Hd = {width}) must be a multiple of {SUPER} values")
    args = (qkv, cache_k, cache_v, cos, sin, positions, start)
    kernels = attention_takes_kernels(*args[:-1])
    if kernels and hd % 32 == 0:
        return _attention_kernels(*args, int_out=True)
    out = _attention_kernels(*args) if kernels else _attention_torch(*args).contiguous()
    x_q, x_sums, x_scales = _int_form_like(out)
    if out.numel():
        with _launch_device(out.device):
            _int_x_into(out, x_q, x_sums, x_scales)
    return out, x_q, x_sums, x_scales


def _int_x_into(x: torch.Tensor, x_q: torch.Tensor, x_sums: torch.Tensor, x_scales: torch.Tensor) -> None:
    """`_int_x`'s launch on x [R, K] (K a multiple of 256) into the tensors given (an op's
    outputs, not `_SCRATCH`)."""
    r, k = x.shape
    kernel = _bound(_int_x_kernel, num_warps=1, **pdl_options(x.device))
    launch(kernel, (r, k // SUPER), x, x_q, x_scales, x_sums, k)


@_fake("attention_int")
def _(qkv, cache_k, cache_v, cos, sin, positions, start):
    n_kv, _, hd = cache_k.shape
    out = qkv.new_empty((qkv.shape[0], qkv.shape[1] - 2 * n_kv * hd))
    return out, *_int_form_like(out)


def attention_int_out(n_tokens: int, in_features: int, code: int, head_dim: int) -> bool:
    """Whether attention's output should come with its `_int_x` form (ATTENTION_CONFIG "int_out",
    `attention_int`) for the output projection after it (a weight of `code`, rows of
    `in_features`) in a call of `n_tokens`: head dims a multiple of 32 (the kernels store whole
    blocks) and the projection reading it as `norm_int_out` says."""
    return (
        bool(ATTENTION_CONFIG["int_out"])
        and head_dim % 32 == 0
        and _reads_int_form(n_tokens, in_features, (code,))
    )


def attention_takes_kernels(qkv, cache_k, cache_v, cos, sin, positions) -> bool:
    """Whether `harness::attention` takes its Triton kernels: the one place that decides. Yes for
    decode-sized calls (`attention_path` "triton", 1..ATTENTION_MAX_TOKENS tokens, at most
    ATTENTION_MAX_ROWS queries per KV head, head dims 16..256, rope tables covering the cache) of
    contiguous float32 tensors and [T] int64 positions. The torch path runs everything else:
    a longer call (prefill) is compute, not launches, and its batched matmuls use the GPU better
    than one program per KV head, whose query tile (group * T rows) would outgrow its registers."""
    t, width = qkv.shape
    n_kv, _, hd = cache_k.shape
    q_width = width - 2 * n_kv * hd
    if _attention_path() != "triton" or not 1 <= t <= ATTENTION_MAX_TOKENS or not 16 <= hd <= 256:
        return False
    if q_width % (n_kv * hd) or q_width // (n_kv * hd) * t > ATTENTION_MAX_ROWS:
        return False
    if 2 * cos.shape[1] > hd or cos.shape[0] < cache_k.shape[1]:
        return False
    for x in (qkv, cache_k, cache_v, cos, sin):
        if x.dtype != torch.float32 or not x.is_contiguous():
            return False
    return positions is None or (
        positions.dtype == torch.int64 and positions.shape == (t,) and positions.is_contiguous()
    )


def attention_splits(n_keys: int, n_kv: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) of `n_keys` cached keys (flash decoding; the whole cache in the
    static-shape step): enough programs to fill the device (`_programs_wanted` over the KV
    heads), none with fewer than ATTENTION_CONFIG["split_min_keys"] keys, so a short cache is
    one split (nothing to merge). The kernel spreads the keys its queries see over that many
    splits (`_attention_kernel`), fewer a split where they are fewer than `n_keys`."""
    bs = ATTENTION_CONFIG["BS"]
    wanted = _ceil_div(_programs_wanted(device), n_kv)
    per = _ceil_div(n_keys, wanted)
    per = max(ATTENTION_CONFIG["split_min_keys"], _ceil_div(per, bs) * bs)
    return _ceil_div(n_keys, per), per


def attention_merge_splits(splits: int, rows: int, bd: int, warps: int) -> int:
    """How many splits' partial results (`rows` x `bd` floats each) the merging program of
    `_attention_kernel` (MERGE) loads at once: a power of two, at most `splits` rounded up and
    at most ATTENTION_CONFIG["merge_floats"] a thread (`warps` warps), at least one."""
    most = max(1, ATTENTION_CONFIG["merge_floats"] * 32 * warps // (rows * bd))
    return min(_next_pow2(splits), 1 << (most.bit_length() - 1))


def _attention_kernels(qkv, cache_k, cache_v, cos, sin, positions, start, int_out=False):
    """`harness::attention` in one launch: `_attention_kernel` over splits of the keys, its
    programs rotating the queries and (the last split) the new keys themselves and writing the
    caches (ATTENTION_CONFIG["fold_rope"]; else `_rope_cache_kernel` does that in a launch
    before), the last of each KV head's programs merging the splits (ATTENTION_CONFIG
    "fold_merge_rows"; else `_attention_merge_kernel` in a launch after, when there are several).
    The rope and the cache write are bit for bit the torch path's; the attention agrees with it
    to float32 rounding (its sums run in another order). With `int_out` (head dims a multiple of
    32), (out, and its `_int_x` form: x_q, x_sums, x_scales, new tensors) stored by the launch
    that writes out (INT_OUT)."""
    t, width = qkv.shape
    n_kv, s_max, hd = cache_k.shape
    n_heads = width // hd - 2 * n_kv
    group = n_heads // n_kv
    half = cos.shape[1]
    from_start = positions is None
    if from_start and not 0 <= start <= s_max - t:
        raise IndexError(
            f"harness::attention: positions {start}..{start + t - 1} outside the cache of {s_max}"
        )
    n_keys = start + t if from_start else s_max
    pos = qkv if from_start else positions  # a pointer the kernels do not read when from_start
    device = qkv.device
    out = qkv.new_empty((t, n_heads * hd))
    cfg = ATTENTION_CONFIG
    fold = bool(cfg["fold_rope"])
    rows = group * t  # the queries of one KV head: one program's rows
    bm = max(int(cfg["min_rows"]), _next_pow2(rows))
    bd = _next_pow2(hd)
    splits, _ = attention_splits(n_keys, n_kv, device)
    merge = splits > 1 and rows <= cfg["fold_merge_rows"]  # by the launch's last programs
    pdl_kw = pdl_options(device)
    x_int = (out, out, out)  # (INT_OUT: x_q, x_scales, x_sums as the kernels take them)
    if int_out:
        x_q, x_sums, x_scales = _int_form_like(out)
        x_int = (x_q, x_scales, x_sums)
    # the int form from the launch that writes out: the attention launch's tiles up to
    # "int_out_rows" (past them its registers spill), the merge launch's always
    int_in_launch = int_out and bm <= cfg["int_out_rows"]
    with _launch_device(device):
        queries = qkv
        if not fold:
            (queries,) = _scratch(
                ("rotated", device, t, n_heads * hd), lambda: (qkv.new_empty((t, n_heads * hd)),)
            )
            launch(_rope_cache_kernel, (t, n_heads + n_kv),
                qkv, width, cache_k, cache_v, cos, sin, pos, start, queries, n_heads, n_kv, s_max, hd, half,
                BH=_next_pow2(max(half, 1)), BD=bd, FROM_START=from_start, num_warps=1,
                enable_fp_fusion=False, **pdl_kw,
            )  # fmt: skip
        counters = out
        if splits == 1:
            part_acc = part_m = part_l = out
        else:
            if merge:
                counters = _split_counters(device, n_kv)  # one a KV head

            def views():
                # one buffer for every split count (they grow with the cache, up to the programs
                # wanted a KV head): the first elements, viewed as this call's shapes
                most = _ceil_div(_programs_wanted(device), n_kv)
                flat = _scratch(
                    ("attention splits", device, n_kv, bm, bd),
                    lambda: tuple(qkv.new_empty(n_kv * most * size) for size in (bm * bd, bm, bm)),
                )
                return tuple(
                    buffer[: n_kv * splits * size].view(n_kv, splits, *shape)
                    for buffer, size, shape in zip(
                        flat, (bm * bd, bm, bm), ((bm, bd), (bm,), (bm,)), strict=True
                    )
                )

            # (the views kept as well, per split count: three views are microseconds a call)
            part_acc, part_m, part_l = _scratch(
                ("attention split views", device, n_kv, bm, bd, splits), views
            )
        mc = attention_merge_splits(splits, bm, bd, cfg["num_warps"])
        int_here = int_in_launch and (splits == 1 or merge)
        kernel = _attention_bound(bm, bd, t, from_start, splits > 1, fold, merge, mc, int_here, pdl_kw)
        launch(kernel, (n_kv, splits),
            queries, width, cache_k, cache_v, cos, sin, pos, start, out, part_acc, part_m, part_l, counters,
            *x_int, t, group, s_max, n_keys, hd, half, hd**-0.5,
        )  # fmt: skip
        if splits > 1 and not merge:
            launch(_attention_merge_kernel, (n_kv, group * t),
                part_acc, part_m, part_l, out, *x_int, t, group, n_kv, hd, splits, BM=bm, BD=bd,
                BP=_next_pow2(splits), INT_OUT=int_out, num_warps=cfg["merge_warps"], **pdl_kw,
            )  # fmt: skip
        elif int_out and not int_in_launch:
            _int_x_into(out, x_q, x_sums, x_scales)
    # the kernels wrote the caches outside torch: their versions move as an in-place op's would
    torch.autograd.graph.increment_version(cache_k)
    torch.autograd.graph.increment_version(cache_v)
    return (out, x_q, x_sums, x_scales) if int_out else out


# `_attention_kernel` bound to each distinct set of its launch keywords (`_attention_bound`).
_ATTENTION_KERNELS: dict[tuple, Bound] = {}


def _attention_bound(bm, bd, t, from_start, split, fold, merge, mc, int_out, pdl_kw) -> Bound:
    """`_attention_kernel` with a launch's keywords bound (`launch.bind`), found by a tuple of
    their values (ATTENTION_CONFIG's as they are now included): one dict lookup a launch, not
    some 20 keywords passed and keyed by `launch` at each (microseconds of an eager step)."""
    cfg, ptx = ATTENTION_CONFIG, _ptx()
    warps, stages, bs, dot = cfg["num_warps"], cfg["num_stages"], cfg["BS"], cfg["dot"]
    key = (bm, bd, t, from_start, split, fold, merge, mc, int_out, ptx, warps, stages, bs, dot, pdl_kw is _PDL_ON)  # fmt: skip
    kernel = _ATTENTION_KERNELS.get(key)
    if kernel is None:
        # with the rope folded in, products rounded one by one: mul.rn in PTX (`_mul_rn`), which
        # leaves fp fusion to the rest of the kernel; elsewhere (ROCm) no fusion at all. BT, the
        # new keys' tile: at least 16, a float32 tl.dot's least depth on NVIDIA before Triton 3.9
        # (3.6: 16; 3.9: 8)
        kernel = _ATTENTION_KERNELS[key] = bind(_attention_kernel,
            BM=bm, BD=bd, BS=bs, BT=max(16, _next_pow2(t)), TT=_next_pow2(t), FROM_START=from_start,
            SPLIT=split, ROPE=fold, PTX=ptx, num_warps=warps, num_stages=stages, DOT=dot, MERGE=merge, MC=mc,
            INT_OUT=int_out, enable_fp_fusion=not fold or ptx, **pdl_kw,
        )  # fmt: skip
    return kernel


def _attention_torch(qkv, cache_k, cache_v, cos, sin, positions, start):
    """`harness::attention` in torch ops (and `_rotated`): the reference the kernels match, and
    the path for calls they do not cover."""
    t = qkv.shape[0]
    n_kv, s_max, hd = cache_k.shape
    n_heads = qkv.shape[1] // hd - 2 * n_kv
    q, k, v = qkv.split((n_heads * hd, n_kv * hd, n_kv * hd), dim=1)
    if positions is None:
        positions = torch.arange(start, start + t, device=q.device)
        n_keys = start + t
    else:
        n_keys = s_max
    q = _rotated(q.view(t, n_heads, hd), cos, sin, positions)  # [T, H, Hd]
    k = _rotated(k.view(t, n_kv, hd), cos, sin, positions)  # [T, K, Hd]
    cache_k.index_copy_(1, positions, k.transpose(0, 1))
    cache_v.index_copy_(1, positions, v.view(t, n_kv, hd).transpose(0, 1))
    keys, values = cache_k[:, :n_keys], cache_v[:, :n_keys]  # [K, S, Hd]
    group = n_heads // n_kv
    q = q.transpose(0, 1).reshape(n_kv, group * t, hd)  # [K, group*T, Hd]
    scores = (q @ keys.transpose(1, 2)) * hd**-0.5  # [K, group*T, S]
    masked = torch.arange(n_keys, device=q.device)[None, :] > positions[:, None]  # [T, S]
    scores = scores.view(n_kv, group, t, n_keys).masked_fill(masked, float("-inf"))
    probs = scores.softmax(-1).view(n_kv, group * t, n_keys)
    out = (probs @ values).view(n_heads, t, hd)  # [H, T, Hd]
    return out.transpose(0, 1).reshape(t, n_heads * hd)


@_fake("attention")
def _(qkv, cache_k, cache_v, cos, sin, positions, start):
    n_kv, _, hd = cache_k.shape
    return qkv.new_empty((qkv.shape[0], qkv.shape[1] - 2 * n_kv * hd))


@_op()
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the RMSNorm after it in one op and one launch: (x + residual, `rms_norm`
    of that), x, residual [..., D] float32, weight [D] float32."""
    _check_devices("harness::add_rms_norm", x, residual, weight)
    if x.shape == residual.shape and x.dtype == residual.dtype == torch.float32:
        return _normed(x, residual, weight, eps)
    return _normed(x + residual, None, weight, eps)  # broadcast or promoted: torch adds


@_fake("add_rms_norm")
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@_op()
def add_rms_norm_int(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`add_rms_norm` (x, residual [..., D] float32 of one shape, D a multiple of 256) and, from
    the same launch, its normed output's `_int_x` form (as `rms_norm_int`): (x + residual, normed,
    x_q, x_sums, x_scales)."""
    _check_devices("harness::add_rms_norm_int", x, residual, weight)
    _check_int_norm("harness::add_rms_norm_int", x, residual)
    return _normed(x, residual, weight, eps, int_out=True)


@_fake("add_rms_norm_int")
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x), *_int_form_like(x)


if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _router_topk_kernel(
        x_ptr, w_ptr, weights_ptr, experts_ptr, part_ptr, counter_ptr, D, E, chunk, min_sum,
        K: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr,
        CUDA_EXP: tl.constexpr, PDL: tl.constexpr = False, PTX: tl.constexpr = False,
    ):  # fmt: skip
        """`harness::router_topk` for token t (program (t, split)): the logits x[t] @ w.T of the E
        experts over the split's `chunk` columns (`_router_logits`), then `_router_partial_done`.

        The weight is no kernel's output: its first step's columns are loaded before the wait
        for the kernel before (PDL), so the read overlaps that kernel's end."""
        t = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        e, em, rows, lo, hi, w = _router_first_step(w_ptr, D, E, split, chunk, BE, BD)
        _pdl_start(PDL)
        x_row = x_ptr + t * D
        logits = _router_logits(x_row, x_row, x_row, 1.0, rows, em, w, lo, hi, BD, False, PTX)
        _router_partial_done(
            logits, t, split, e, em, part_ptr, counter_ptr, weights_ptr, experts_ptr, min_sum, K, BK, SPLITS,
            CUDA_EXP,
        )  # fmt: skip

    @triton.jit
    def _norm_route_kernel(
        x_ptr, r_ptr, total_ptr, nw_ptr, out_ptr, q_ptr, scale_ptr, sum_ptr, w_ptr, weights_ptr,
        experts_ptr, part_ptr, counter_ptr, D, E, chunk, eps, min_sum,
        BN: tl.constexpr, K: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
        SPLITS: tl.constexpr, CUDA_EXP: tl.constexpr, PDL: tl.constexpr = False,
        INT_OUT: tl.constexpr = False, PTX: tl.constexpr = False,
    ):  # fmt: skip
        """`harness::add_rms_norm_route` for token t (program (t, split), the router's grid):
        `_rms_norm_kernel`'s row with ADD and `_router_topk_kernel`'s program in one. Each
        program sums the row x + r and takes its rms (`_norm_row_rms`: every program reads the
        whole row, from L2); split 0 stores the sum, the normed row and (INT_OUT) its `_int_x`
        form (`_norm_row_store`); each makes the normed values of its run of columns from the
        inputs (`_router_logits` with NORM) for its partial logits, and the last to arrive routes
        the token (`_router_partial_done`). Launched with `_rms_norm_kernel`'s warps, so the
        rms has its bits; the router's sums do not depend on the warps."""
        t = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        e, em, rows, lo, hi, w = _router_first_step(w_ptr, D, E, split, chunk, BE, BD)
        _pdl_start(PDL)
        x, rms = _norm_row_rms(x_ptr, r_ptr, t, D, eps, BN, True)
        if split == 0:
            _norm_row_store(
                x, rms, t, D, nw_ptr, total_ptr, out_ptr, q_ptr, scale_ptr, sum_ptr, BN, True, INT_OUT, PTX
            )
        logits = _router_logits(x_ptr + t * D, r_ptr + t * D, nw_ptr, rms, rows, em, w, lo, hi, BD, True, PTX)
        _router_partial_done(
            logits, t, split, e, em, part_ptr, counter_ptr, weights_ptr, experts_ptr, min_sum, K, BK, SPLITS,
            CUDA_EXP,
        )  # fmt: skip

    @triton.jit
    def _router_first_step(w_ptr, D, E, split, chunk, BE: tl.constexpr, BD: tl.constexpr):
        """A router program's experts e [BE] (em: e < E), the weight's rows, its run of columns
        lo .. hi (split's `chunk`), and the weight's columns of its first step, w [BE, BD]
        (past L1, ".cg": read once)."""
        e = tl.arange(0, BE)
        em = e < E
        rows = w_ptr + e.to(tl.int64)[:, None] * D
        lo = split * chunk
        hi = tl.minimum(lo + chunk, D)
        d = lo + tl.arange(0, BD)
        w = tl.load(rows + d[None, :], mask=em[:, None] & (d < hi)[None, :], other=0.0, cache_modifier=".cg")
        return e, em, rows, lo, hi, w

    @triton.jit
    def _router_logits(
        x_row, r_row, nw_ptr, rms, rows, em, w, lo, hi, BD: tl.constexpr, NORM: tl.constexpr, PTX: tl.constexpr,
    ):  # fmt: skip
        """The partial logits [BE] of columns lo .. hi: x's (at x_row) float32 products with the
        weight's rows (PTX: each rounded on its own, `_mul_rn`: an FMA would fuse a product into
        the sum's first additions by layout), summed over BD columns a step (pairwise:
        `_pairwise_cols`), w (`_router_first_step`) the first step's
        columns; each step loads the next step's before it uses this one's. NORM: x is the
        norm's output, made here from its inputs as `_norm_row_store` makes it (x_row + r_row,
        times rms, times the norm's weight at nw_ptr, each rounded on its own: `_mul_rn`), the
        same bits as the stored row."""
        logits = tl.zeros([w.shape[0]], tl.float32)
        d = lo + tl.arange(0, BD)
        for d0 in range(lo, hi, BD):
            xs = tl.load(x_row + d, mask=d < hi, other=0.0)
            if NORM:
                xs = xs + tl.load(r_row + d, mask=d < hi, other=0.0)
                xs = _mul_rn(xs * rms, tl.load(nw_ptr + d, mask=d < hi, other=0.0), PTX)
            this = w
            d = d0 + BD + tl.arange(0, BD)  # the next step's (past the run: nothing read)
            w = tl.load(
                rows + d[None, :], mask=em[:, None] & (d < hi)[None, :], other=0.0, cache_modifier=".cg"
            )
            logits += _pairwise_cols(_mul_rn(this, xs[None, :], PTX))
        return logits

    @triton.jit
    def _pairwise_cols(t):
        """Each row of t [R, C] (C a power of two, up to 2^16) summed neighbour with neighbour, as
        `_pairwise_sum` sums a vector: the bits do not depend on the layout, so on which warps and
        lanes hold the columns (a tl.sum over C's order follows it: at 3 experts, 4 padded rows
        of 128 columns, 4 warps keep a row in one warp and 8 split it over two)."""
        R: tl.constexpr = t.shape[0]
        C: tl.constexpr = t.shape[1]
        for k in tl.static_range(16):
            if (C >> k) > 1:
                t = tl.sum(tl.reshape(t, (R, C >> (k + 1), 2)), axis=2)
        return tl.sum(t, 1)

    @triton.jit
    def _router_partial_done(
        logits, t, split, e, em, part_ptr, counter_ptr, weights_ptr, experts_ptr, min_sum,
        K: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr, CUDA_EXP: tl.constexpr,
    ):  # fmt: skip
        """Token t's program `split` with its partial logits [BE]: with one split, it routes the
        token (`_router_choose`). With SPLITS, each stores its partial logits in part [T, SPLITS,
        BE], and the last program to arrive for the token (counter_ptr: a zeroed int32 per
        token, bumped with acq_rel) sums the token's partials split by split from 0.0 (float32,
        unrolled: its loads go out at once; the same bits every run), routes the token and sets
        the counter back to 0."""
        BE: tl.constexpr = logits.shape[0]
        if SPLITS > 1:
            tl.store(part_ptr + (t * SPLITS + split) * BE + e, logits)
            counter = counter_ptr + t
            tl.debug_barrier()  # every thread's partial is stored before this program's arrival counts
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == SPLITS - 1:  # the last: every partial is stored
                total = tl.zeros([BE], tl.float32)
                for s in tl.static_range(SPLITS):  # (past L1: the other programs' stores)
                    total += tl.load(part_ptr + (t * SPLITS + s) * BE + e, cache_modifier=".cg")
                _router_choose(total, e, em, t, weights_ptr, experts_ptr, min_sum, K, BK, CUDA_EXP)
                tl.atomic_xchg(counter, 0)
        else:
            _router_choose(logits, e, em, t, weights_ptr, experts_ptr, min_sum, K, BK, CUDA_EXP)

    @triton.jit
    def _router_choose(
        logits, e, em, t, weights_ptr, experts_ptr, min_sum,
        K: tl.constexpr, BK: tl.constexpr, CUDA_EXP: tl.constexpr,
    ):  # fmt: skip
        """Token t's routing from its logits [BE] (experts e, em: e < E): their softmax, the K
        largest probabilities in descending order (equal ones: the lower expert first; NaN above
        all, as torch.topk ranks it), renormalized to sum 1 with the sum clamped at min_sum,
        stored at row t of weights and experts [T, K]. Each expert's rank (how many come before
        it) is counted at once, not found by K rounds of argmax. CUDA_EXP: the softmax takes
        CUDA's expf (libdevice), as torch's does (tl.exp is the approximate ex2 there); the
        interpreter has no libdevice, its tl.exp is numpy's. The sums over experts and slots are
        `_pairwise_sum`s: the same bits with any number of warps (`_norm_route_kernel` runs it
        with the norm's)."""
        top = tl.max(tl.where(em, logits, float("-inf")), 0)
        ex = tl.where(em, libdevice.exp(logits - top) if CUDA_EXP else tl.exp(logits - top), 0.0)
        probs = tl.math.div_rn(ex, _pairwise_sum(ex))  # (`/` is an approximate division on CUDA)
        key = tl.where(em, tl.where(probs != probs, 2.0, probs), -1.0)  # probabilities are <= 1
        ki, kj = key[:, None], key[None, :]  # [BE, BE]: expert i against expert j
        before = (kj > ki) | ((kj == ki) & (e[None, :] < e[:, None]))
        rank = tl.sum(before.to(tl.int32), 1)  # [BE]: padding ranks after every expert
        slot = tl.arange(0, BK)
        at = rank[None, :] == slot[:, None]  # [BK, BE]: the expert of each slot
        chosen_p = tl.sum(tl.where(at, probs[None, :], 0.0), 1)
        chosen_e = tl.sum(tl.where(at, e[None, :], 0), 1)
        total = _pairwise_sum(tl.where(slot < K, chosen_p, 0.0))
        total = tl.where(total < min_sum, min_sum, total)  # a NaN sum stays NaN, as clamp keeps it
        out = t * K + slot
        tl.store(weights_ptr + out, tl.math.div_rn(chosen_p, total), mask=slot < K)
        tl.store(experts_ptr + out, chosen_e.to(tl.int64), mask=slot < K)

    @triton.jit
    def _pairwise_sum(v):
        """The sum of v [N] (N a power of two, up to 64) neighbour with neighbour, ((v0 + v1) +
        (v2 + v3)) + ...: each step a sum over an axis of two, one addition, so the bits do not
        depend on which thread holds which value (as `_pairwise_rows`)."""
        N: tl.constexpr = v.shape[0]
        for k in tl.static_range(6):
            if (N >> k) > 1:
                v = tl.sum(tl.reshape(v, (N >> (k + 1), 2)), axis=1)
        return tl.sum(v, 0)


@_op()
def router_topk(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045  (torch 2.11's schema inference reads Optional)
    k: int,
    min_sum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing in one op, the router's product included: logits x @ weight.T (x [T, D]
    float32, weight [E, D] the router's float32 GGUF weight; with weight None, x is the logits
    [T, E]), softmax over the experts, the top k, their weights renormalized to sum 1 (the sum
    clamped at `min_sum`, as llama.cpp does) -> weights [T, k] float32, experts [T, k] int64.

    Decode-sized calls with the weight take one Triton launch (`router_takes_kernel` says
    which); the others run the torch path's ops (`harness.model.mixtral.Router`), bit for bit.
    The kernel sums the logits in another order than the torch path's product, so they differ
    by float32 rounding: its experts are the torch path's unless two probabilities are within
    that rounding of each other, and its weights agree with the torch path's to float32
    rounding. Equal probabilities (an exact tie; a row of zeros ties every expert) are listed
    lower expert first, as llama.cpp's fused MoE top-k (topk-moe.cu) takes them. torch.topk on
    CUDA chooses the same experts (its selection takes the k-th largest value's ties in index
    order) but may list equal ones in another order (it sorts the k chosen with an unstable
    bitonic network: two equal ones come out higher expert first, by a simulation of torch
    2.11's network), so the (expert, weight) pairs are the same; torch.topk on the CPU may
    choose other tied experts. A NaN logit makes every probability NaN: experts 0..k-1, as
    torch.topk on CUDA takes them (NaN above all)."""
    _check_devices("harness::router_topk", x, *_given(weight))
    if router_takes_kernel(x, weight, k):
        return _router_topk_kernel_call(x, weight, k, min_sum)
    logits = x if weight is None else x @ weight.T
    weights, experts = logits.float().softmax(-1).topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True).clamp(min=min_sum), experts


def router_takes_kernel(x: torch.Tensor, weight: Optional[torch.Tensor], k: int) -> bool:  # noqa: UP045
    """Whether `harness::router_topk` takes its Triton kernel: the one place that decides. Yes
    where the fused kernels run (`runs_on`: a CUDA device with Triton, or the CPU under
    Triton's interpreter; not the emulation, not under `disabled()` or HARNESS_FUSED=0) for
    1..MATVEC_MAX_ROWS tokens (decode) with the router's weight (not None): x [T, D] and weight
    [E, D] contiguous float32, 1 <= k <= E <= ROUTER_MAX_EXPERTS. The torch path runs the rest
    (a longer call, prefill, is one product that cuBLAS does better than a program per token)."""
    if weight is None or x.dim() != 2 or weight.dim() != 2:
        return False
    (t, d), (n_experts, d_weight) = x.shape, weight.shape
    if d != d_weight or not 1 <= t <= MATVEC_MAX_ROWS or not 1 <= k <= n_experts <= ROUTER_MAX_EXPERTS:
        return False
    # (each test written out: a generator is a call of its own, and this runs at every decode layer)
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return x.is_contiguous() and weight.is_contiguous() and runs_on(x.device)


def router_plan(n_experts: int, d: int) -> tuple[int, int, int]:
    """(splits, columns a split, columns a loop step) of `_router_topk_kernel` for a router
    weight [n_experts, d]: up to ROUTER_CONFIG["splits"] programs a token, each over a run of
    columns that is a multiple of 16 (aligned loads), the last run shorter; a loop step reads
    about ROUTER_CONFIG["tile"] products over the experts' rows (padded to a power of two), at
    least 16 columns, at most the run (a power of two)."""
    run = 16 * max(1, _ceil_div(_ceil_div(d, ROUTER_CONFIG["splits"]), 16))
    splits = max(1, _ceil_div(d, run))
    step = min(_next_pow2(run), max(16, ROUTER_CONFIG["tile"] // _next_pow2(n_experts)))
    return splits, run, step


def _router_topk_kernel_call(x: torch.Tensor, weight: torch.Tensor, k: int, min_sum: float):
    """`router_topk`'s launch (the devices checked, `router_takes_kernel` true): a program per
    token and split (`router_plan`); with several splits, the partial logits go to the device's
    scratch for the shape and the token's counter (`_split_counters`)."""
    t, d = x.shape
    n_experts = weight.shape[0]
    splits, run, step = router_plan(n_experts, d)
    be = _next_pow2(n_experts)
    weights, experts, part, counters = _routing_buffers(x, k, splits, be)
    with _launch_device(x.device):
        launch(_router_topk_kernel, (t, splits),
            x, weight, weights, experts, part, counters, d, n_experts, run, min_sum, K=k, BE=be, BD=step,
            BK=_next_pow2(k), SPLITS=splits, CUDA_EXP=not kernels.interpreting(), PTX=_ptx(),
            num_warps=ROUTER_CONFIG["num_warps"], num_stages=ROUTER_CONFIG["num_stages"], **pdl_options(x.device),
        )  # fmt: skip
    return weights, experts


def _routing_buffers(x: torch.Tensor, k: int, splits: int, be: int) -> tuple[torch.Tensor, ...]:
    """A router launch's outputs for x [T, D], weights [T, k] and experts [T, k] (new tensors),
    and its scratch: with several splits the partial logits (the device's scratch for the
    shape) and the tokens' counters (`_split_counters`), else stand-ins."""
    t = x.shape[0]
    weights = x.new_empty((t, k))
    experts = x.new_empty((t, k), dtype=torch.int64)
    part = counters = weights
    if splits > 1:
        part = _scratch(
            ("router partials", x.device, t, splits, be), lambda: (x.new_empty((t, splits, be)),)
        )[0]
        counters = _split_counters(x.device, t)
    return weights, experts, part, counters


@_fake("router_topk")
def _(x, weight, k, min_sum):
    return _routing_like(x, k)


# The post-attention norm with the router after it in one op (NORM_CONFIG "router"; the model
# asks `norm_routes`): `add_rms_norm` (or `add_rms_norm_int`) and `router_topk` on its output,
# the same bits, from one launch where `norm_route_takes_kernel` says so. The router's weight
# is an input, as it is `router_topk`'s: a tracer names it by its GGUF tensor.


@_op()
def add_rms_norm_route(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, router_weight: torch.Tensor,
    k: int, min_sum: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`add_rms_norm` of x, residual [T, D] float32 with weight [D], and `router_topk` of its
    normed output with the router's float32 weight [E, D]: (x + residual, normed, routing
    weights [T, k], experts [T, k]), the same bits as those two ops. One launch
    (`_norm_route_kernel`) where `norm_route_takes_kernel`; the two ops' code otherwise."""
    _check_devices("harness::add_rms_norm_route", x, residual, weight, router_weight)
    if norm_route_takes_kernel(x, residual, weight, router_weight, k):
        return _norm_route_call(x, residual, weight, eps, router_weight, k, min_sum, False)
    total, normed = add_rms_norm(x, residual, weight, eps)
    return total, normed, *router_topk(normed, router_weight, k, min_sum)


@_fake("add_rms_norm_route")
def _(x, residual, weight, eps, router_weight, k, min_sum):
    return torch.empty_like(x), torch.empty_like(x), *_routing_like(x, k)


@_op()
def add_rms_norm_int_route(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, router_weight: torch.Tensor,
    k: int, min_sum: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`add_rms_norm_int` and `router_topk` of its normed output, as `add_rms_norm_route`: (x +
    residual, normed, x_q, x_sums, x_scales, routing weights, experts), the same bits as those
    two ops."""
    _check_devices("harness::add_rms_norm_int_route", x, residual, weight, router_weight)
    _check_int_norm("harness::add_rms_norm_int_route", x, residual)
    if norm_route_takes_kernel(x, residual, weight, router_weight, k):
        return _norm_route_call(x, residual, weight, eps, router_weight, k, min_sum, True)
    normed_int = _normed(x, residual, weight, eps, int_out=True)
    return *normed_int, *router_topk(normed_int[1], router_weight, k, min_sum)


@_fake("add_rms_norm_int_route")
def _(x, residual, weight, eps, router_weight, k, min_sum):
    return torch.empty_like(x), torch.empty_like(x), *_int_form_like(x), *_routing_like(x, k)


def _routing_like(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty routing weights [T, k] float32 and experts [T, k] int64 for x [T, D]."""
    t = x.shape[0]
    return x.new_empty((t, k), dtype=torch.float32), x.new_empty((t, k), dtype=torch.int64)


def norm_routes(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, router_weight: torch.Tensor | None, k: int
) -> bool:
    """Whether the model's post-attention norm (weight) of x + residual and its MoE router
    (router_weight, k experts a token) go as one op, `harness::add_rms_norm_route` (or its int
    form's): NORM_CONFIG "router" on and `norm_route_takes_kernel`."""
    return NORM_CONFIG["router"] and norm_route_takes_kernel(x, residual, weight, router_weight, k)


def norm_route_takes_kernel(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, router_weight: torch.Tensor | None, k: int
) -> bool:
    """Whether a norm and its router take `_norm_route_kernel`: the one place that decides. Yes
    where the router alone takes its kernel on x's shape (`router_takes_kernel`: decode-sized,
    a float32 weight of at most ROUTER_MAX_EXPERTS experts, a device the kernels run on) and
    the norm's tensors go with it: residual float32 of x's shape and weight float32 [D], all
    contiguous, and all four on x's device (a tensor elsewhere: the two ops, each refusing it
    with the device error it gives today, where it gives it)."""
    if router_weight is None:
        return False
    shape = x.shape
    if residual.shape != shape or weight.shape != shape[-1:]:
        return False
    # (each test written out: a generator is a call of its own, and this runs at every decode layer)
    device = x.device
    if residual.device != device or weight.device != device or router_weight.device != device:
        return False
    if residual.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if not residual.is_contiguous() or not weight.is_contiguous():
        return False
    return router_takes_kernel(x, router_weight, k)


# `_norm_route_kernel` bound to each distinct set of its launch keywords (`_norm_route_call`).
_NORM_ROUTE_KERNELS: dict[tuple, Bound] = {}


def _norm_route_call(x, residual, weight, eps, router_weight, k, min_sum, int_out: bool):
    """`_norm_route_kernel`'s launch (`norm_route_takes_kernel` true): the router's grid and
    plan (`router_plan`), the norm's warps (`_norm_warps`)."""
    t, d = x.shape
    n_experts = router_weight.shape[0]
    splits, run, step = router_plan(n_experts, d)
    be, bn = _next_pow2(n_experts), _next_pow2(d)
    total, out = torch.empty_like(x), torch.empty_like(x)
    int_form = (out, out, out)  # (INT_OUT: q, scales, sums as the kernel takes them)
    if int_out:
        q, sums, scales = _int_form_like(x)
        int_form = (q, scales, sums)
    weights, experts, part, counters = _routing_buffers(x, k, splits, be)
    pdl_kw = pdl_options(x.device)
    stages = ROUTER_CONFIG["num_stages"]
    # (bound once per set of keywords, found by their values: see `_attention_bound`)
    key = (bn, k, be, step, splits, int_out, stages, pdl_kw is _PDL_ON)
    kernel = _NORM_ROUTE_KERNELS.get(key)
    if kernel is None:
        kernel = _NORM_ROUTE_KERNELS[key] = bind(_norm_route_kernel,
            BN=bn, K=k, BE=be, BD=step, BK=_next_pow2(k), SPLITS=splits, CUDA_EXP=not kernels.interpreting(),
            INT_OUT=int_out, PTX=_ptx(), num_warps=_norm_warps(bn), num_stages=stages, **pdl_kw,
        )  # fmt: skip
    with _launch_device(x.device):
        launch(kernel, (t, splits),
            x, residual, total, weight, out, *int_form, router_weight, weights, experts, part, counters, d,
            n_experts, run, eps, min_sum,
        )  # fmt: skip
    normed = (total, out, q, sums, scales) if int_out else (total, out)
    return *normed, weights, experts


@_op()
def embed_rows(table: torch.Tensor, tokens: torch.Tensor, qtype: int, row_length: int) -> torch.Tensor:
    """Rows `tokens` ([T] int64) of the GGUF table `table` ([V, row_bytes] blocks of `qtype`),
    dequantized (only those rows) -> [T, row_length] float32, bit-identical to dequantizing the table."""
    _check_devices("harness::embed_rows", table, tokens)
    rows = table.index_select(0, tokens.reshape(-1))
    return dequant.dequantize(rows, GGMLType(qtype), (rows.shape[0], row_length), torch.float32)


@_fake("embed_rows")
def _(table, tokens, qtype, row_length):
    return table.new_empty((tokens.numel(), row_length), dtype=torch.float32)
