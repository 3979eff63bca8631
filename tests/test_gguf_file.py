"""Reading GGUF model files: config, layouts, lazy tensors, and every kind of bad input."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType

import harness
from harness.errors import GGUFFormatError, GGUFMetadataError, GGUFTensorError, HarnessError
from harness.gguf_file import PRESETS, open_gguf
from harness.quant.types import GGMLType
from harness.synth import synthesize
from tests.gguf_edit import patch, rewrite, split_experts, tensor_info_offsets

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny model per layout, written once for the module."""
    d = tmp_path_factory.mktemp("gguf")
    return {
        "merged": synthesize(d / "merged.gguf", "tiny", file_type="Q4_K_M", layout="merged", seed=1),
        "per-expert": synthesize(
            d / "per-expert.gguf", "tiny", file_type="Q4_K_M", layout="per-expert", router="f16", seed=1
        ),
        "dense": synthesize(
            d / "dense.gguf", TINY.replace(expert_count=0, expert_used_count=0), file_type="Q8_0"
        ),
    }


# -- good files ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["merged", "per-expert"])
def test_config_and_layout_from_metadata(files, layout):
    mf = open_gguf(files[layout])
    # The file stores eps as float32 and the rope dimension explicitly.
    assert mf.config.rms_eps == pytest.approx(TINY.rms_eps, rel=1e-6)
    assert mf.config.rope_dim == TINY.head_dim
    assert mf.config.replace(rms_eps=TINY.rms_eps, rope_dimension_count=None) == TINY
    assert mf.layout == layout
    assert mf.architecture == "llama"
    assert mf.version == 3


def test_router_type_follows_the_file(files):
    assert open_gguf(files["merged"]).qtype("blk.0.ffn_gate_inp.weight") == GGMLType.F32
    assert open_gguf(files["per-expert"]).qtype("blk.0.ffn_gate_inp.weight") == GGMLType.F16


def test_dense_llama_loads(files):
    mf = open_gguf(files["dense"])
    assert mf.layout == "dense"
    assert not mf.config.is_moe
    assert mf.shape("blk.1.ffn_down.weight") == (TINY.embedding_length, TINY.feed_forward_length)
    with pytest.raises(GGUFTensorError, match="dense model has no experts"):
        mf.experts(0, "gate")


def test_tensor_is_a_lazy_view_of_the_file(files):
    mf = open_gguf(files["merged"])
    qt = mf.tensor("blk.0.ffn_up_exps.weight")
    assert isinstance(qt, harness.QTensor)
    assert qt.shape == (TINY.expert_count, TINY.feed_forward_length, TINY.embedding_length)
    assert qt.qtype == mf.qtype("blk.0.ffn_up_exps.weight")
    assert qt.device == torch.device("cpu")
    # No copy: the bytes are the memory map's own.
    assert np.shares_memory(qt.raw.numpy(), mf._file.data)
    assert qt.nbytes == mf.nbytes("blk.0.ffn_up_exps.weight")


def test_experts_are_the_same_bytes_in_both_layouts(files, tmp_path):
    split = split_experts(files["merged"], tmp_path / "split.gguf")
    merged, per_expert = open_gguf(files["merged"]), open_gguf(split)
    assert per_expert.layout == "per-expert"
    for kind in ("gate", "up", "down"):
        a, b = merged.experts(1, kind), per_expert.experts(1, kind)
        assert len(a) == len(b) == TINY.expert_count
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and x.qtype == y.qtype
            assert torch.equal(x.raw, y.raw)
            assert torch.equal(x.dequantize(), y.dequantize())


def test_every_expected_tensor_is_listed(files):
    mf = open_gguf(files["per-expert"])
    expected = mf.expected_tensors()
    assert f"blk.1.ffn_down.{TINY.expert_count - 1}.weight" in expected
    assert set(expected) == set(mf.tensor_names)


# -- truncated and malformed files -------------------------------------------------------------


def _truncate(src, dst, n):
    dst.write_bytes(src.read_bytes()[:n])
    return dst


@pytest.mark.parametrize("keep", [0, 3, 10, 23, 100, 2000])
def test_truncated_header(files, tmp_path, keep):
    bad = _truncate(files["merged"], tmp_path / "cut.gguf", keep)
    with pytest.raises(GGUFFormatError) as err:
        open_gguf(bad)
    assert str(bad) in str(err.value)


def test_truncated_data_names_the_tensor(files, tmp_path):
    data = files["merged"].read_bytes()
    bad = _truncate(files["merged"], tmp_path / "cut.gguf", len(data) - 1)
    last = GGUFReader(files["merged"]).tensors[-1].name
    with pytest.raises(GGUFTensorError, match=f"{last}: data ends at byte {len(data)}, past the end"):
        open_gguf(bad)


def test_wrong_magic(files, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + files["merged"].read_bytes()[4:])
    with pytest.raises(GGUFFormatError, match="magic: not a GGUF file"):
        open_gguf(bad)


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version(files, tmp_path, version):
    bad = tmp_path / "version.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    patch(bad, 4, struct.pack("<I", version))
    with pytest.raises(GGUFFormatError, match=f"version: GGUF version {version} is not supported"):
        open_gguf(bad)


def test_big_endian_is_refused(files, tmp_path):
    bad = tmp_path / "be.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    patch(bad, 4, struct.pack(">I", 3))
    with pytest.raises(GGUFFormatError, match="big-endian"):
        open_gguf(bad)


@pytest.mark.parametrize("where", [8, 16])  # tensor count, key count
def test_claimed_counts_checked_before_use(files, tmp_path, where):
    bad = tmp_path / "counts.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    patch(bad, where, struct.pack("<Q", 2**60))
    tracemalloc.start()
    with pytest.raises(GGUFFormatError, match="more than its .* bytes can hold"):
        open_gguf(bad)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20


def test_huge_string_length_is_not_allocated(files, tmp_path):
    bad = tmp_path / "string.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    patch(bad, 24, struct.pack("<Q", 2**62))  # length of the first key
    tracemalloc.start()
    with pytest.raises(
        GGUFFormatError,
        match=r"key #0: a key needs 4611686018427387904 bytes at offset 32, but only \d+ are left",
    ):
        open_gguf(bad)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20


def test_unknown_type_names_the_tensor(files, tmp_path):
    bad = tmp_path / "type.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    patch(bad, tensor_info_offsets(bad, "blk.1.attn_q.weight")["type"], struct.pack("<I", 250))
    with pytest.raises(GGUFTensorError, match="blk.1.attn_q.weight: unknown GGML type id 250"):
        open_gguf(bad)


def test_row_length_not_a_multiple_of_the_block(files, tmp_path):
    bad = tmp_path / "row.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    name = "blk.0.attn_k.weight"
    assert open_gguf(files["merged"]).qtype(name).name in ("Q4_K", "Q6_K", "Q8_0", "Q5_K")
    patch(bad, tensor_info_offsets(bad, name)["dims"], struct.pack("<Q", 200))
    with pytest.raises(
        GGUFTensorError, match=f"{name}: row length 200 is not a multiple of the .* block size"
    ):
        open_gguf(bad)


def test_data_offset_past_the_end(files, tmp_path):
    bad = tmp_path / "offset.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    patch(bad, tensor_info_offsets(bad, "token_embd.weight")["offset"], struct.pack("<Q", 2**40))
    with pytest.raises(GGUFTensorError, match="token_embd.weight: data offset 1099511627776, expected 0"):
        open_gguf(bad)


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFFormatError, match="no such file"):
        open_gguf(tmp_path / "absent.gguf")


# -- metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["llama.block_count", "llama.embedding_length", "llama.attention.head_count", "general.architecture"],
)
def test_missing_key(files, tmp_path, key):
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", drop_keys=(key,))
    with pytest.raises(GGUFMetadataError, match=f"bad.gguf: {key}: missing"):
        open_gguf(bad)


def test_missing_expert_used_count(files, tmp_path):
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", drop_keys=("llama.expert_used_count",))
    with pytest.raises(GGUFMetadataError, match="llama.expert_used_count: missing"):
        open_gguf(bad)


def test_key_of_the_wrong_type(files, tmp_path):
    bad = rewrite(
        files["merged"],
        tmp_path / "bad.gguf",
        set_keys={"llama.attention.head_count": ("four", GGUFValueType.STRING)},
    )
    with pytest.raises(GGUFMetadataError, match="llama.attention.head_count: expected int, got str 'four'"):
        open_gguf(bad)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("llama.attention.head_count", 3, "3 heads do not divide embedding_length 256"),
        ("llama.attention.head_count_kv", 3, "3 KV heads do not divide head_count 4"),
        ("llama.expert_used_count", 5, "5 used experts, but expert_count is 4"),
        ("llama.expert_used_count", 0, "0 used experts"),
        ("llama.block_count", 0, "must be positive"),
    ],
)
def test_inconsistent_metadata(files, tmp_path, key, value, message):
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", set_keys={key: (value, GGUFValueType.UINT32)})
    with pytest.raises(GGUFMetadataError, match=f"{key}: {message}"):
        open_gguf(bad)


def test_more_layers_claimed_than_present(files, tmp_path):
    bad = rewrite(
        files["merged"], tmp_path / "bad.gguf", set_keys={"llama.block_count": (3, GGUFValueType.UINT32)}
    )
    with pytest.raises(GGUFTensorError, match="blk.2.attn_norm.weight: missing"):
        open_gguf(bad)


@pytest.mark.parametrize("layout", ["merged", "per-expert"])
def test_missing_expert_tensor(files, tmp_path, layout):
    name = "blk.1.ffn_up_exps.weight" if layout == "merged" else "blk.1.ffn_up.3.weight"
    bad = rewrite(files[layout], tmp_path / "bad.gguf", drop_tensors=(name,))
    with pytest.raises(GGUFTensorError, match=f"{name}: missing"):
        open_gguf(bad)


def test_no_expert_tensors_at_all(files, tmp_path):
    drop = tuple(n for n in open_gguf(files["merged"]).tensor_names if "_exps" in n)
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", drop_tensors=drop)
    with pytest.raises(GGUFTensorError, match="missing expert tensors"):
        open_gguf(bad)


def test_tensor_shape_disagrees_with_config(files, tmp_path):
    bad = rewrite(
        files["merged"],
        tmp_path / "bad.gguf",
        set_keys={"llama.feed_forward_length": (256, GGUFValueType.UINT32)},
    )
    with pytest.raises(
        GGUFTensorError, match=r"blk.0.ffn_gate_exps.weight: has shape \[4, 512, 256\], expected"
    ):
        open_gguf(bad)


def test_missing_tensor_lookup(files):
    with pytest.raises(GGUFTensorError, match="blk.9.attn_q.weight: no such tensor"):
        open_gguf(files["merged"]).tensor("blk.9.attn_q.weight")


def test_every_error_is_a_harness_error():
    for cls in (GGUFFormatError, GGUFMetadataError, GGUFTensorError):
        assert issubclass(cls, HarnessError)
