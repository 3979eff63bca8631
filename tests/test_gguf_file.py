"""Reading GGUF model files: config, layouts, lazy tensors, and every kind of bad input."""

from __future__ import annotations

import os
import re
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType

import harness
from harness.errors import (
    GGUFFormatError,
    GGUFMetadataError,
    GGUFTensorError,
    HarnessError,
    UnsupportedTypeError,
)
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


# -- bounds checked before use (llama.cpp's gguf.cpp and llama-model-loader.cpp) -----------------


def _copy(files, tmp_path, layout="merged"):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(files[layout].read_bytes())
    return bad


def _key_offsets(path, key):
    """File offsets of a key's parts: "type", and for an array "items" and "length"."""
    from tests.gguf_edit import byte_offset

    reader = GGUFReader(path)
    parts = reader.fields[key].parts
    out = {"type": byte_offset(reader, parts[2])}
    if len(parts) > 4:
        out |= {"items": byte_offset(reader, parts[3]), "length": byte_offset(reader, parts[4])}
    else:
        out["value"] = byte_offset(reader, parts[3])
    return out


@pytest.mark.parametrize("key", ["tokenizer.ggml.scores", "tokenizer.ggml.tokens"])
@pytest.mark.parametrize("length", [2**40, 2**22 + 1, 2**64 - 1])
def test_huge_array_length_is_refused_at_once(files, tmp_path, key, length):
    # gguf-py's parser spins on such a length; llama.cpp reads only what the file holds.
    bad = _copy(files, tmp_path)
    patch(bad, _key_offsets(bad, key)["length"], struct.pack("<Q", length))
    tracemalloc.start()
    with pytest.raises(GGUFFormatError, match=rf"bad.gguf: {key}: an array of {length} items"):
        open_gguf(bad)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20


def test_array_longer_than_the_file_is_refused(files, tmp_path):
    bad = _copy(files, tmp_path)
    patch(bad, _key_offsets(bad, "tokenizer.ggml.scores")["length"], struct.pack("<Q", 2**21))
    with pytest.raises(
        GGUFFormatError, match="tokenizer.ggml.scores: an array of 2097152 items needs 8388608 bytes"
    ):
        open_gguf(bad)


def test_nested_arrays_and_unknown_value_types_are_refused(files, tmp_path):
    bad = _copy(files, tmp_path)
    patch(bad, _key_offsets(bad, "tokenizer.ggml.scores")["items"], struct.pack("<I", 9))
    with pytest.raises(GGUFFormatError, match="tokenizer.ggml.scores: arrays of arrays are not allowed"):
        open_gguf(bad)
    bad = _copy(files, tmp_path)
    patch(bad, _key_offsets(bad, "llama.block_count")["type"], struct.pack("<I", 13))
    with pytest.raises(GGUFFormatError, match="llama.block_count: unknown value type 13"):
        open_gguf(bad)


def test_duplicate_key_and_tensor_name(files, tmp_path):
    from tests.gguf_edit import byte_offset

    reader = GGUFReader(files["merged"])
    # Two keys of one length: the second renamed to the first.
    by_length: dict[int, list[str]] = {}
    for name in reader.fields:
        if not name.startswith("GGUF."):
            by_length.setdefault(len(name), []).append(name)
    first, second = next(names for names in by_length.values() if len(names) > 1)[:2]
    bad = _copy(files, tmp_path)
    patch(bad, byte_offset(reader, reader.fields[second].parts[1]), first.encode())
    with pytest.raises(GGUFFormatError, match=f"bad.gguf: {first}: appears twice"):
        open_gguf(bad)
    bad = _copy(files, tmp_path)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    patch(bad, byte_offset(reader, t.field.parts[1]), b"blk.0.attn_k.weight")
    with pytest.raises(
        GGUFTensorError, match="bad.gguf: blk.0.attn_k.weight: appears twice in the tensor table"
    ):
        open_gguf(bad)


def test_overlapping_and_out_of_order_data_is_refused(files, tmp_path):
    # One tensor's offset moved onto another's data: llama.cpp refuses any offset but the next.
    reader = GGUFReader(files["merged"])
    first, second = reader.tensors[0], reader.tensors[1]
    bad = _copy(files, tmp_path)
    patch(
        bad,
        tensor_info_offsets(bad, second.name)["offset"],
        struct.pack("<Q", int(first.data_offset - reader.data_offset)),
    )
    with pytest.raises(
        GGUFTensorError, match=rf"{second.name}: data offset 0, expected \d+: tensor data must follow"
    ):
        open_gguf(bad)


@pytest.mark.parametrize(
    ("value", "message"), [(0, "must be a power of 2, got 0"), (48, "must be a power of 2, got 48")]
)
def test_alignment_must_be_a_power_of_two(files, tmp_path, value, message):
    bad = rewrite(
        files["merged"], tmp_path / "bad.gguf", set_keys={"general.alignment": (value, GGUFValueType.UINT32)}
    )
    with pytest.raises(GGUFMetadataError, match=f"general.alignment: {message}"):
        open_gguf(bad)
    bad = rewrite(
        files["merged"], tmp_path / "bad2.gguf", set_keys={"general.alignment": (32, GGUFValueType.UINT64)}
    )
    with pytest.raises(GGUFMetadataError, match="general.alignment: must be a uint32"):
        open_gguf(bad)


def test_a_file_laid_out_to_another_alignment_loads(files, tmp_path):
    good = rewrite(
        files["merged"],
        tmp_path / "a64.gguf",
        set_keys={"general.alignment": (64, GGUFValueType.UINT32)},
        alignment=64,
    )
    mf = open_gguf(good)
    assert torch.equal(
        mf.tensor("blk.1.attn_q.weight").raw, open_gguf(files["merged"]).tensor("blk.1.attn_q.weight").raw
    )


@pytest.mark.parametrize("qtype", [GGMLType.Q8_1, GGMLType.Q8_K, GGMLType.I8, GGMLType.F64])
def test_a_type_that_cannot_be_computed_is_refused_at_open(files, tmp_path, qtype):
    from gguf import GGML_QUANT_SIZES

    name = "blk.1.attn_q.weight"
    rows, cols = open_gguf(files["merged"]).shape(name)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", retype={name: (int(qtype), raw)})
    with pytest.raises(UnsupportedTypeError, match=f"bad.gguf: {name}: type {qtype.name} cannot be computed"):
        open_gguf(bad)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("llama.rope.freq_base", float("nan")),
        ("llama.rope.freq_base", 0.0),
        ("llama.rope.freq_base", -10000.0),
        ("llama.rope.freq_base", float("inf")),
        ("llama.attention.layer_norm_rms_epsilon", float("inf")),
        ("llama.attention.layer_norm_rms_epsilon", 0.0),
        ("llama.attention.layer_norm_rms_epsilon", float("nan")),
    ],
)
def test_non_finite_or_non_positive_floats_are_refused(files, tmp_path, key, value):
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", set_keys={key: (value, GGUFValueType.FLOAT32)})
    with pytest.raises(GGUFMetadataError, match=f"bad.gguf: {key}: must be finite and positive, got {value}"):
        open_gguf(bad)


def test_odd_head_dim_without_rope_dimension_count(files, tmp_path):
    bad = rewrite(
        files["merged"],
        tmp_path / "bad.gguf",
        drop_keys=("llama.rope.dimension_count",),
        set_keys={"llama.attention.head_count": (256, GGUFValueType.UINT32)},
    )
    with pytest.raises(GGUFMetadataError, match="llama.attention.head_count: head_dim 1 .* is odd"):
        open_gguf(bad)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("llama.block_count", 2**31, "2147483648 layers, but the file has only 23 tensors"),
        ("llama.block_count", 2**40, "1099511627776 does not fit a uint32"),
        ("llama.context_length", 2**63, "9223372036854775808 does not fit a uint32"),
        ("llama.expert_count", 2**31 - 1, "2147483647 experts in 2 per-expert layers need"),
        ("llama.expert_used_count", 5, "5 used experts, but expert_count is 4"),
    ],
)
def test_counts_are_bounded_before_lists_are_built(files, tmp_path, key, value, message):
    vtype = GGUFValueType.UINT64 if value >= 2**32 else GGUFValueType.UINT32
    bad = rewrite(files["per-expert"], tmp_path / "bad.gguf", set_keys={key: (value, vtype)})
    if key == "llama.block_count" and value == 2**31:
        message = message.replace("23 tensors", f"{len(open_gguf(files['per-expert']).tensor_names)} tensors")
    tracemalloc.start()
    with pytest.raises(GGUFMetadataError, match=f"{key}: {message}"):
        open_gguf(bad)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20


def test_dense_model_with_used_experts(files, tmp_path):
    bad = rewrite(
        files["dense"], tmp_path / "bad.gguf", set_keys={"llama.expert_used_count": (2, GGUFValueType.UINT32)}
    )
    with pytest.raises(GGUFMetadataError, match="llama.expert_used_count: 2 used experts in a dense model"):
        open_gguf(bad)


@pytest.mark.parametrize(
    "key", ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"]
)
def test_vocabulary_arrays_have_the_embedding_length(files, tmp_path, key):
    reader = GGUFReader(files["merged"])
    from tests.gguf_edit import _field_value

    values = _field_value(reader.fields[key])
    sub = reader.fields[key].types[-1]
    bad = rewrite(
        files["merged"], tmp_path / "bad.gguf", set_keys={key: ((values[:100], sub), GGUFValueType.ARRAY)}
    )
    with pytest.raises(GGUFMetadataError, match=f"{key}: has 100 entries, but the vocabulary has 384 tokens"):
        open_gguf(bad)
    with pytest.raises(GGUFMetadataError, match=f"bad.gguf: {key}: has 100 entries"):  # `harness tokenize`
        harness.Tokenizer.from_gguf(bad)


def test_experts_of_mixed_types_name_the_file(files, tmp_path):
    import gguf.quants

    mf = open_gguf(files["per-expert"])
    name = "blk.1.ffn_up.2.weight"
    assert mf.qtype(name) != GGMLType.Q8_0
    raw = gguf.quants.quantize(mf.tensor(name).dequantize().numpy(), GGMLType.Q8_0)
    bad = rewrite(files["per-expert"], tmp_path / "bad.gguf", retype={name: (int(GGMLType.Q8_0), raw)})
    with pytest.raises(
        GGUFTensorError,
        match=r"bad.gguf: blk.1.ffn_up.0.weight: experts of one layer have different types \(.*blk.1.ffn_up.2.weight=Q8_0",
    ):
        open_gguf(bad)


def test_unused_tensor_is_refused(files, tmp_path):
    # One layer claimed, two in the file: llama.cpp's "wrong number of tensors".
    bad = rewrite(
        files["merged"], tmp_path / "bad.gguf", set_keys={"llama.block_count": (1, GGUFValueType.UINT32)}
    )
    with pytest.raises(
        GGUFTensorError, match="blk.1.attn_norm.weight: not used by a merged llama of 1 layers and 4 experts"
    ):
        open_gguf(bad)


@pytest.mark.parametrize(
    ("key", "value"), [("llama.rope.scaling.type", "yarn"), ("llama.attention.key_length", 128)]
)
def test_llama_variants_this_harness_does_not_compute(files, tmp_path, key, value):
    vtype = GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.UINT32
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", set_keys={key: (value, vtype)})
    with pytest.raises(GGUFMetadataError, match=key):
        open_gguf(bad)


def test_other_architectures_are_refused(files, tmp_path):
    bad = rewrite(
        files["merged"],
        tmp_path / "bad.gguf",
        set_keys={"general.architecture": ("qwen2", GGUFValueType.STRING)},
    )
    with pytest.raises(
        GGUFMetadataError, match="general.architecture: 'qwen2' is not an architecture this harness computes"
    ):
        open_gguf(bad)


def test_a_name_holding_a_newline_stays_on_one_line(files, tmp_path):
    forged = "blk.0.attn_q.weight\nharness: clean"
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", rename={"blk.0.attn_q.weight": forged})
    with pytest.raises(GGUFTensorError) as err:
        open_gguf(bad)
    text = str(err.value)
    assert "\n" not in text
    assert f"bad.gguf: {forged!r}: not used by" in text


def test_long_values_are_cut_in_messages(files, tmp_path):
    bad = rewrite(
        files["merged"],
        tmp_path / "bad.gguf",
        set_keys={"general.architecture": ("x" * 10000, GGUFValueType.STRING)},
    )
    with pytest.raises(GGUFMetadataError) as err:
        open_gguf(bad)
    assert len(str(err.value)) < 400 + len(str(bad))


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 16])  # the check goes a slice at a time
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "scale"])
def test_non_finite_weights_are_refused_naming_the_tensor(files, tmp_path, poison, chunk_bytes, monkeypatch):
    from harness import gguf_file

    monkeypatch.setattr(gguf_file, "CHECK_CHUNK_BYTES", chunk_bytes)
    from harness.quant.types import F16_FIELDS, type_size

    mf = open_gguf(files["merged"])
    if poison == "scale":
        name = "blk.0.attn_q.weight"
        qtype = mf.qtype(name)

        def spoil(raw):
            flat = raw.reshape(-1)
            at = 3 * type_size(qtype) + F16_FIELDS[qtype][0]
            flat[at : at + 2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
            return raw

        message = "the f16 scale of block 3 is NaN or inf"
    else:
        name = "blk.1.ffn_norm.weight"

        def spoil(raw):
            raw[7] = float(poison)
            return raw

        message = f"value 7 is {float(poison):g}: not finite (a corrupt file?)"
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", edit={name: spoil})
    with pytest.raises(GGUFTensorError, match=re.escape(f"bad.gguf: {name}: {message}")):
        open_gguf(bad).tensor(name)


@pytest.mark.parametrize("value", [3.0e38, -1e20, 65505.0])
def test_finite_weights_of_any_size_are_accepted(files, tmp_path, value):
    """llama.cpp loads finite F32 weights of any size: so does the loader (a forward they
    overflow reports its NaN logits as an error, tests/test_cli.py)."""
    name = "blk.1.ffn_norm.weight"

    def spoil(raw):
        raw[7] = value
        return raw

    big = rewrite(files["merged"], tmp_path / "big.gguf", edit={name: spoil})
    assert open_gguf(big).tensor(name).dequantize()[7] == np.float32(value)


def _blocks_of(qtype: GGMLType, rows: int, cols: int, fill) -> np.ndarray:
    from harness.quant.types import block_size, type_size

    raw = np.zeros((rows, cols // block_size(qtype) * type_size(qtype)), dtype=np.uint8)
    fill(raw.reshape(-1, type_size(qtype)))
    return raw


def test_a_ggml_type_newer_than_gguf_is_named(files, tmp_path):
    """Q2_0 (GGML type id 42) is one llama.cpp writes and gguf 0.19 does not know: the refusal
    names the file, the tensor and the type, in one line."""
    name = "blk.1.attn_q.weight"
    bad = tmp_path / "q2_0.gguf"
    bad.write_bytes(files["merged"].read_bytes())
    patch(bad, tensor_info_offsets(bad, name)["type"], struct.pack("<I", 42))
    with pytest.raises(UnsupportedTypeError) as raised:
        open_gguf(bad)
    assert str(raised.value) == (
        f"{bad}: {name}: type Q2_0 (GGML type id 42) cannot be computed by this harness: the installed "
        "gguf package does not know it"
    )


def test_iq1_m_scale_spread_over_nibbles_is_checked(files, tmp_path):
    """IQ1_M's f16 scale lives in the top nibbles of bytes 49, 51, 53, 55: inf there is refused."""
    name = "blk.0.attn_q.weight"
    rows, cols = open_gguf(files["merged"]).shape(name)
    inf = 0x7C00  # f16 +inf: nibbles 0, 0, C, 7

    def fill(blocks):
        blocks[5, 53], blocks[5, 55] = 0xC0, 0x70

    raw = _blocks_of(GGMLType.IQ1_M, rows, cols, fill)
    assert np.float16(np.array([inf], np.uint16).view(np.float16)[0]) == np.inf
    bad = rewrite(files["merged"], tmp_path / "bad.gguf", retype={name: (int(GGMLType.IQ1_M), raw)})
    with pytest.raises(
        GGUFTensorError, match=re.escape(f"bad.gguf: {name}: the f16 scale of block 5 is NaN or inf")
    ):
        open_gguf(bad).tensor(name)


@pytest.mark.skipif("MXFP4" not in GGMLType.__members__, reason="this gguf does not name MXFP4")
@pytest.mark.parametrize(
    ("exponent", "code", "refused"),
    [(252, 7, False), (253, 5, False), (253, 6, True), (255, 1, False), (255, 2, True)],
)
def test_mxfp4_exponents_that_overflow_are_refused(files, tmp_path, exponent, code, refused):
    """2^(e - 128) * |value| must stay finite: code 7 is 12, 5 is 6, 6 is 8, 1 is 1, 2 is 2."""
    name = "blk.0.attn_q.weight"
    rows, cols = open_gguf(files["merged"]).shape(name)
    qtype = GGMLType.MXFP4

    def fill(blocks):
        blocks[:, 0] = 127
        blocks[3, 0], blocks[3, 1] = exponent, code

    raw = _blocks_of(qtype, rows, cols, fill)
    path = rewrite(files["merged"], tmp_path / "mx.gguf", retype={name: (int(qtype), raw)})
    if refused:
        with pytest.raises(
            GGUFTensorError, match=re.escape(f"{name}: block 3: exponent {exponent} makes its")
        ):
            open_gguf(path).tensor(name)
    else:
        assert torch.isfinite(open_gguf(path).tensor(name).dequantize()).all()


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        with pytest.raises(GGUFFormatError, match="not a regular file"):
            open_gguf(path)
