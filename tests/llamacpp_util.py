"""llama.cpp through llama-cpp-python's low-level bindings: quantize a GGUF, run it, tokenize.

Only imported by tests that have already done `pytest.importorskip("llama_cpp")`.

Notes for these machines and this llama.cpp:
- The CPU "extra buffer types" (AMX / repacked weights) crash here, so models load with
  `use_extra_bufts = False`.
- The KV cache is kept in F32 and flash attention off, so llama.cpp's attention is as exact as
  it can be; what remains is its own quantization of activations for quantized matmuls
  (Q8_0 / Q8_K `vec_dot_type`), which is why quantized types are compared with a loose NMSE.
"""

from __future__ import annotations

import collections
import ctypes
import os
from pathlib import Path

import llama_cpp as L
import numpy as np

GGML_TYPE_F32 = 0
N_THREADS = 2

# llama-quantize's names for the ftypes the tests use.
FTYPES: dict[str, int] = {
    "Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": L.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": L.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": L.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q2_K": L.LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q3_K_M": L.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q4_K_M": L.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": L.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": L.LLAMA_FTYPE_MOSTLY_Q6_K,
    "IQ4_NL": L.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "IQ4_XS": L.LLAMA_FTYPE_MOSTLY_IQ4_XS,
}

# The low-bit ftypes llama-quantize makes without an importance matrix (IQ2_*, IQ1_* and IQ3_XXS
# need one; NVFP4 it does not write: "invalid output file type 39").
LOW_BIT_FTYPES: dict[str, int] = {
    "IQ3_S": L.LLAMA_FTYPE_MOSTLY_IQ3_S,
    "TQ1_0": L.LLAMA_FTYPE_MOSTLY_TQ1_0,
    "TQ2_0": L.LLAMA_FTYPE_MOSTLY_TQ2_0,
    "MXFP4_MOE": L.LLAMA_FTYPE_MOSTLY_MXFP4_MOE,
    "Q1_0": L.LLAMA_FTYPE_MOSTLY_Q1_0,
}

_LOG: collections.deque[str] = collections.deque(maxlen=200)  # llama.cpp's latest log lines


@L.llama_log_callback
def _log_callback(level, text, user_data):  # keep llama.cpp's chatter out of test output
    _LOG.append(text.decode("utf-8", errors="replace") if text else "")


_initialized = False


def init() -> None:
    global _initialized
    if not _initialized:
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        _initialized = True


def log_tail(n: int = 20) -> str:
    return "".join(list(_LOG)[-n:])


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str) -> Path:
    """llama.cpp's own quantizer (llama-quantize without an imatrix) from `src` to `dst`."""
    init()
    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype] if ftype in FTYPES else LOW_BIT_FTYPES[ftype]
    params.nthread = N_THREADS
    rc = L.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}:\n{log_tail()}")
    return Path(dst)


class LlamaCpp:
    """One model and one context; `logits(tokens)` runs a fresh sequence from position 0."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 64):
        init()
        self.path = os.fspath(path)
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = False
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(os.fsencode(path), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}:\n{log_tail()}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = N_THREADS
        cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.n_ctx = n_ctx
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context for {path}:\n{log_tail()}")

    def logits(self, tokens) -> np.ndarray:
        """[T, V] float32 logits, one row per position, of `tokens` from position 0."""
        tokens = [int(t) for t in tokens]
        T = len(tokens)
        assert 0 < T <= self.n_ctx
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        batch = L.llama_batch_init(T, 0, 1)
        try:
            batch.n_tokens = T
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}:\n{log_tail()}")
            rows = [
                np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                for i in range(T)
            ]
        finally:
            L.llama_batch_free(batch)
        return np.stack(rows)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens, gave room for {n_max}")
        return list(buf[:n])

    def close(self) -> None:
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# ggml's own row (de)quantizers, from the libggml-base that llama-cpp-python ships
# --------------------------------------------------------------------------------------------

_GGML: ctypes.CDLL | None = None


def ggml() -> ctypes.CDLL:
    global _GGML
    if _GGML is None:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(L.__file__), "lib", "libggml-base.so"))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _GGML = lib
    return _GGML


def ggml_dequantize(blocks: np.ndarray, type_name: str, n_values: int) -> np.ndarray:
    """llama.cpp's dequantize_row_<type> over whole blocks: float32 [n_values]."""
    symbol = "dequantize_row_" + (
        type_name[:-1].lower() + "K" if type_name.endswith("_K") else type_name.lower()
    )
    fn = getattr(ggml(), symbol)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    src = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.empty(n_values, dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, n_values)
    return out


def ggml_quantize(values: np.ndarray, type_id: int, type_bytes: int, block: int) -> np.ndarray:
    """llama.cpp's quantizer (ggml_quantize_chunk) over rows of float32 `values` [rows, cols]:
    uint8 [rows, cols // block * type_bytes]. Types that need an importance matrix get one of
    ones (every column weighted alike)."""
    rows, cols = values.shape
    src = np.ascontiguousarray(values, dtype=np.float32)
    dst = np.zeros((rows, cols // block * type_bytes), dtype=np.uint8)
    weights = np.ones(cols, dtype=np.float32)
    imatrix = weights.ctypes.data if ggml().ggml_quantize_requires_imatrix(type_id) else None
    written = ggml().ggml_quantize_chunk(type_id, src.ctypes.data, dst.ctypes.data, 0, rows, cols, imatrix)
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst
