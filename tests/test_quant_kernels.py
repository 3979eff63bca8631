"""Triton dequantization kernels (harness.quant.kernels) against `gguf.quants.dequantize`, bit for bit.

The kernels run two ways:
- on the CPU through Triton's interpreter. TRITON_INTERPRET=1 has to be set before kernels.py is
  imported (Triton reads it when it decorates the kernels), so one subprocess per module runs every
  interpreter case and hands the outputs back in an .npz; the comparison happens here. Skipped
  when triton is not installed.
- compiled, on a CUDA GPU (`-m cuda`): every kernel type, 2-D and 3-D shapes, block counts that do
  not fill the last program, f16/bf16 outputs, misaligned input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants

from harness.errors import UnsupportedTypeError, UsageError
from harness.quant.types import F16_FIELDS, GGMLType, block_size, type_size

T = GGMLType
REQUIRED = (T.Q8_0, T.Q4_K, T.Q6_K)
REPO = Path(__file__).resolve().parents[1]


def _kernels():
    pytest.importorskip("triton")
    from harness.quant import kernels

    return kernels


def random_blocks(qtype: GGMLType, nblocks: int, seed: int) -> np.ndarray:
    """[nblocks, type_size] random bytes whose f16 fields are finite halves of mixed magnitude."""
    from harness.quant.types import F16_FIELDS

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(nblocks, type_size(qtype)), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        halves = rng.standard_normal(nblocks) * rng.choice([1e-6, 1e-3, 0.1, 10.0, 1000.0], nblocks)
        halves[rng.random(nblocks) < 0.05] = 0.0
        halves = halves.astype(np.float16)
        halves[rng.random(nblocks) < 0.05] = np.float16(-0.0)
        raw[:, off : off + 2] = halves.view(np.uint8).reshape(nblocks, 2)
    return raw


def reference(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf's numpy dequantization of `raw` as a float32 tensor of `shape`."""
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(raw.reshape(-1), qtype))).view(shape)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, for exact comparison (-0.0 != 0.0, NaN == same NaN)."""
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


# ---- CPU: Triton's interpreter -------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (name, logical shape in blocks-of-the-last-dim, output dtype, blocks per program or None)
INTERP_CASES = [
    ("2d", (5, 3), "float32", None),  # 15 blocks, one partly filled program
    ("2d-multi", (5, 3), "float32", 4),  # 4 programs, the last one partly filled
    ("3d", (2, 3, 2), "float32", 8),  # an expert stack: 12 blocks
    ("f16", (3, 3), "float16", 4),
    ("bf16", (3, 3), "bfloat16", None),
]

_CHILD = r"""
import json, sys
import numpy as np, torch
from harness.quant import kernels
from harness.quant.types import GGMLType
cases = json.load(open(sys.argv[1]))
inputs = np.load(sys.argv[2])
outputs = {}
for key, (qtype, shape, dtype, bpp) in cases.items():
    raw = torch.from_numpy(inputs[key].copy())
    out = kernels.dequantize(raw, GGMLType[qtype], tuple(shape), getattr(torch, dtype), blocks_per_program=bpp)
    assert out.device == raw.device and out.dtype == getattr(torch, dtype) and tuple(out.shape) == tuple(shape)
    outputs[key] = (out.view(torch.int32) if out.dtype == torch.float32 else out.view(torch.int16)).numpy()
np.savez(sys.argv[3], **outputs)
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every INTERP_CASES x kernel type through the interpreter in one subprocess.

    Returns {(type name, case name): (raw bytes, shape, dtype, output bit patterns)}.
    """
    kernels = _kernels()
    tmp = tmp_path_factory.mktemp("interp")
    cases, inputs, meta = {}, {}, {}
    for n, qtype in enumerate(kernels.KERNEL_TYPES):
        bs = block_size(qtype)
        for m, (name, blocks_shape, dtype, bpp) in enumerate(INTERP_CASES):
            shape = (*blocks_shape[:-1], blocks_shape[-1] * bs)
            nblocks = int(np.prod(blocks_shape))
            key = f"{qtype.name}-{name}"
            inputs[key] = random_blocks(qtype, nblocks, seed=100 * n + m)
            cases[key] = (qtype.name, shape, dtype, bpp)
            meta[(qtype.name, name)] = (inputs[key], shape, DTYPES[dtype], key)
    (tmp / "cases.json").write_text(json.dumps(cases))
    np.savez(tmp / "in.npz", **inputs)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp / "cases.json"), str(tmp / "in.npz"), str(tmp / "out.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    out = np.load(tmp / "out.npz")
    return {
        k: (raw, shape, dtype, torch.from_numpy(out[key])) for k, (raw, shape, dtype, key) in meta.items()
    }


def _kernel_type_names() -> list[str]:
    try:
        from harness.quant import kernels
    except Exception:
        return [t.name for t in REQUIRED]
    return [t.name for t in kernels.KERNEL_TYPES] or [t.name for t in REQUIRED]


@pytest.mark.parametrize("case", [c[0] for c in INTERP_CASES])
@pytest.mark.parametrize("qtype_name", _kernel_type_names())
def test_interpreter_matches_gguf_bitwise(interpreted, qtype_name, case):
    raw, shape, dtype, got = interpreted[(qtype_name, case)]
    want = reference(raw, T[qtype_name], shape).to(dtype)
    assert tuple(got.shape) == shape
    mismatched = (got != bits(want)).sum().item()
    assert mismatched == 0, f"{qtype_name} {case}: {mismatched} of {got.numel()} values differ from gguf"


def test_required_types_have_kernels():
    kernels = _kernels()
    assert set(REQUIRED) <= set(kernels.KERNEL_TYPES)
    assert set(kernels.KERNEL_TYPES) <= set(F16_FIELDS)  # the low-bit types have no kernels yet


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_supports_is_false_without_a_gpu():
    kernels = _kernels()
    assert not any(kernels.supports(t) for t in kernels.KERNEL_TYPES)


def test_supports_is_false_for_types_without_a_kernel():
    from harness.quant import kernels  # works with or without triton installed

    assert not kernels.supports(T.F16)
    assert not kernels.supports(T.BF16)


def test_bad_arguments_raise_harness_errors():
    kernels = _kernels()
    raw = torch.zeros(2 * 34, dtype=torch.uint8)
    with pytest.raises(UnsupportedTypeError):
        kernels.dequantize(raw, T.F16, (34,))
    with pytest.raises(UsageError, match="not a whole number"):
        kernels.dequantize(raw[:-1], T.Q8_0, (64,))
    with pytest.raises(UsageError, match="shape"):
        kernels.dequantize(raw, T.Q8_0, (96,))
    with pytest.raises(UsageError, match="uint8"):
        kernels.dequantize(raw.view(torch.int8), T.Q8_0, (64,))
    with pytest.raises(UsageError, match="float32, float16 or bfloat16"):
        kernels.dequantize(raw, T.Q8_0, (64,), torch.float64)
    if not kernels.interpreting():
        with pytest.raises(UsageError, match="CUDA tensor"):
            kernels.dequantize(raw, T.Q8_0, (64,))


# ---- CUDA: the compiled kernels ------------------------------------------------------------------

# shapes in blocks along the last dim: one block, a partly filled program, a 3-D expert stack, and
# a tensor spanning many programs whose block count is no multiple of any program size
CUDA_SHAPES = [(1, 1), (13, 5), (4, 6, 3), (3, 257, 4)]


def _cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.device_count() - 1)


@pytest.mark.cuda(real=True)
@pytest.mark.parametrize("blocks_shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("qtype_name", _kernel_type_names())
def test_cuda_matches_gguf_bitwise(qtype_name, blocks_shape):
    kernels = _kernels()
    qtype = T[qtype_name]
    assert kernels.supports(qtype)
    shape = (*blocks_shape[:-1], blocks_shape[-1] * block_size(qtype))
    raw = random_blocks(
        qtype, int(np.prod(blocks_shape)), seed=zlib.crc32(f"{qtype_name}{blocks_shape}".encode())
    )
    dev = _cuda_device()
    got = kernels.dequantize(torch.from_numpy(raw).to(dev), qtype, shape)
    assert got.device == dev and got.dtype == torch.float32 and tuple(got.shape) == shape
    want = reference(raw, qtype, shape)
    mismatched = (bits(got.cpu()) != bits(want)).sum().item()
    assert mismatched == 0, f"{qtype_name} {shape}: {mismatched} of {want.numel()} values differ from gguf"


@pytest.mark.cuda(real=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype_name", _kernel_type_names())
def test_cuda_half_outputs_are_the_float32_result_cast(qtype_name, dtype):
    kernels = _kernels()
    qtype = T[qtype_name]
    shape = (3, 7, 9 * block_size(qtype))
    raw = torch.from_numpy(random_blocks(qtype, 3 * 7 * 9, seed=7)).to(_cuda_device())
    full = kernels.dequantize(raw, qtype, shape)
    half = kernels.dequantize(raw, qtype, shape, dtype)
    assert half.dtype == dtype and half.device == raw.device and half.shape == full.shape
    assert torch.equal(bits(half), bits(full.to(dtype)))


@pytest.mark.cuda(real=True)
@pytest.mark.parametrize("qtype_name", _kernel_type_names())
def test_cuda_misaligned_input_and_launch_overrides(qtype_name):
    """Bytes starting at an odd address (a slice of a larger buffer) and other program sizes."""
    kernels = _kernels()
    qtype = T[qtype_name]
    nblocks = 300
    shape = (nblocks * block_size(qtype),)
    raw = random_blocks(qtype, nblocks, seed=11).reshape(-1)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8, device=_cuda_device())
    buf[1:] = torch.from_numpy(raw).to(buf.device)
    want = bits(reference(raw, qtype, shape))
    assert torch.equal(bits(kernels.dequantize(buf[1:], qtype, shape).cpu()), want)
    for bpp, warps in ((1, 1), (2, 4), (64, 8)):
        got = kernels.dequantize(buf[1:], qtype, shape, blocks_per_program=bpp, num_warps=warps)
        assert torch.equal(bits(got.cpu()), want), (bpp, warps)
