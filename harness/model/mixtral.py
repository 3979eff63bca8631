"""A quantized Mixtral (and dense llama) over GGUF weights, as llama.cpp's llama graph runs it.

Weights stay quantized on their device (QMatMul "quantized": dequantized per call, on that
device). Routing stays on the device: no host reads of device data in the forward.

Shape legend: T tokens in this call, S cached positions (start_pos + T), D embedding,
H heads, K KV heads, Hd head dim, F feed-forward, E experts, k used experts, V vocab.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from harness.device_tables import TABLES
from harness.errors import UsageError
from harness.gguf_file import MixtralConfig, ModelFile, open_gguf
from harness.model.placement import Placement
from harness.quant import fused
from harness.quant.qmatmul import QMatMul
from harness.quant.qtensor import QTensor

ROUTER_WEIGHT_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the top-k weight sum at this (2^-14)


def runs_own_forward(module: nn.Module) -> bool:
    """Whether `module` runs the forward this file gave its class (or the nearest base class
    defined here), replaced neither on the class nor on the instance (a fault, a test's
    monkeypatch, a user's override). The fused decode hands such a module more than its plain
    arguments (`x_int`, `routing`, `int_form`, `route`, `k`) and routes in the router's place; a
    replaced forward may not take them, and its code must run: it gets the plain calls."""
    cls = type(module)
    own = _DEFINED_FORWARDS.get(cls)
    if own is None:
        own = next((_DEFINED_FORWARDS[c] for c in cls.__mro__ if c in _DEFINED_FORWARDS), None)
    return own is not None and cls.forward is own and "forward" not in module.__dict__


class RMSNorm(nn.Module):
    def __init__(self, weight: QTensor, eps: float):
        super().__init__()
        self.gguf_name = weight.name
        self.eps = eps
        self.register_buffer("weight", weight.dequantize(), persistent=False)  # [D] float32

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        int_form: bool = False,
        route: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor | tuple:
        """x normalized; with `residual`, (x + residual, that normalized): a residual add and the
        norm after it (one op on the fused path, `harness::add_rms_norm`). With `int_form` (where
        the op after it takes one, `fused.norm_int_out`: x and residual float32 [T, D] on a device
        the fused ops run on), the normed output's `_int_x` form after those, (x_q, x_sums,
        x_scales), from the same op (`harness::rms_norm_int`, `harness::add_rms_norm_int`). With
        `route` (with residual: the MoE router's float32 weight and k, where `MoE.norm_route`
        gives them), the router's choice for the normed output last, (weights, experts), from
        the same op too (`harness::add_rms_norm_route`, `harness::add_rms_norm_int_route`)."""
        # (nn.Module.__getattr__'s table, read directly: a tenth of the time)
        weight = self._buffers["weight"]
        if route is not None:
            args = (x, residual, weight, self.eps, *route, ROUTER_WEIGHT_SUM_MIN)
            if int_form:
                total, normed, *rest = torch.ops.harness.add_rms_norm_int_route(*args)
                return total, normed, tuple(rest[:3]), tuple(rest[3:])
            total, normed, *routing = torch.ops.harness.add_rms_norm_route(*args)
            return total, normed, tuple(routing)
        if int_form:
            if residual is None:
                normed, *x_int = torch.ops.harness.rms_norm_int(x, weight, self.eps)
                return normed, tuple(x_int)
            total, normed, *x_int = torch.ops.harness.add_rms_norm_int(x, residual, weight, self.eps)
            return total, normed, tuple(x_int)
        fast = x.dtype == torch.float32 and fused.runs_on(x.device)
        if residual is None:
            if fast:
                return torch.ops.harness.rms_norm(x, weight, self.eps)
            return self._normed(x, fast)
        if fast and residual.dtype == torch.float32:
            return torch.ops.harness.add_rms_norm(x, residual, weight, self.eps)
        x = x + residual
        return x, self._normed(x, fast)

    def _normed(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        if fast:
            return torch.ops.harness.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(x.dtype)


class Embedding(nn.Module):
    """Rows of the quantized token table, dequantized on its device: only the rows asked for."""

    outputs_activations = True  # for a tracer: the rows it returns are no longer the weight

    def __init__(self, table: QTensor):
        super().__init__()
        self.gguf_name = table.name
        self.qtype = table.qtype
        self.shape = table.shape
        self.register_buffer("qweight", table.raw, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # [T] -> [T, D]
        if tokens.dim() == 1 and fused.runs_on(self.qweight.device):
            return torch.ops.harness.embed_rows(self.qweight, tokens, int(self.qtype), self.shape[1])
        table = QTensor(self.qweight, self.qtype, self.shape, self.gguf_name)
        return table.dequantize_rows(tokens)


def _build_rope(device: torch.device, rope_dim: int, base: float, max_seq_len: int):
    inv_freq = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)  # [rope_dim/2]
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # [S_max, rope_dim/2]
    return angles.cos().float().to(device), angles.sin().float().to(device)


TABLES.define("rope", _build_rope, params=True)


def rope_tables(rope_dim: int, base: float, max_seq_len: int, device: torch.device):
    """cos and sin [max_seq_len, rope_dim/2] float32 on `device`: the registry's "rope" table
    (`harness.device_tables`), built once per device and size (at load, by `Rope`)."""
    return TABLES.get("rope", device, rope_dim, base, max_seq_len)


class Rope(nn.Module):
    """GGML rope type 0 ("normal"): rotates adjacent pairs (x[2i], x[2i+1]) of the first
    rope_dim dims by pos * base^(-2i/rope_dim). Layers on one device share the tables."""

    def __init__(self, rope_dim: int, base: float, max_seq_len: int, device: torch.device):
        super().__init__()
        self.rope_dim = rope_dim
        cos, sin = rope_tables(rope_dim, base, max_seq_len, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        # x: [T, heads, Hd]; start_pos an int, or a [1] device tensor (one token, static shapes)
        t = x.shape[0]
        if x.dtype == torch.float32 and fused.runs_on(x.device):
            if isinstance(start_pos, torch.Tensor):
                positions = start_pos
            else:
                positions = torch.arange(start_pos, start_pos + t, device=x.device)
            return torch.ops.harness.rope(x, self.cos, self.sin, positions)
        if isinstance(start_pos, torch.Tensor):
            cos = self.cos.index_select(0, start_pos)[:, None, :]  # [1, 1, rope_dim/2]
            sin = self.sin.index_select(0, start_pos)[:, None, :]
        else:
            cos = self.cos[start_pos : start_pos + t, None, :]  # [T, 1, rope_dim/2]
            sin = self.sin[start_pos : start_pos + t, None, :]
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]
        even, odd = rot[..., 0::2], rot[..., 1::2]  # [T, heads, rope_dim/2]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class KVCache(nn.Module):
    def __init__(
        self, n_kv_heads: int, max_seq_len: int, head_dim: int, device: torch.device, dtype: torch.dtype
    ):
        super().__init__()
        shape = (n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [T, K, Hd] -> cached [K, S, Hd]; for a [1] device position, the whole cache
        # [K, S_max, Hd] (static shapes; the caller masks positions past it)
        if isinstance(start_pos, torch.Tensor):
            self.k.index_copy_(1, start_pos, k.transpose(0, 1))
            self.v.index_copy_(1, start_pos, v.transpose(0, 1))
            return self.k, self.v
        end = start_pos + k.shape[0]
        self.k[:, start_pos:end] = k.transpose(0, 1)
        self.v[:, start_pos:end] = v.transpose(0, 1)
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, mf: ModelFile, i: int, strategy: str, cache: KVCache):
        super().__init__()
        c = mf.config
        self.n_heads, self.n_kv_heads, self.head_dim = c.head_count, c.head_count_kv, c.head_dim
        device = cache.k.device
        self.cache = cache
        self.wq, self.wk, self.wv = (
            QMatMul(mf.tensor(f"blk.{i}.attn_{p}.weight").to(device), strategy) for p in ("q", "k", "v")
        )
        self._pack_qkv()
        self.wo = QMatMul(mf.tensor(f"blk.{i}.attn_output.weight").to(device), strategy)
        self.rope = Rope(c.rope_dim, c.rope_freq_base, cache.k.shape[1], cache.k.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # (each weight moved on its own)
        self._pack_qkv()
        return self

    def _pack_qkv(self) -> None:
        """q, k, v of one layout in one buffer, one after another: `harness::qkv` launches once."""
        if self.fused():
            mats = (self.wq, self.wk, self.wv)
            raws = fused.pack_rows([m.qweight for m in mats], [m.kernel_qtype for m in mats])
            for m, raw in zip(mats, raws, strict=True):
                m.qweight = raw

    def fused(self) -> bool:
        """Whether this call runs as `harness::qkv` and `harness::attention` (q/k/v products;
        rope, cache write and attention): every weight kept quantized with a fused kernel, on a
        device the fused ops run on (`fused.supports_all`), and a float32 cache."""
        return self._fused(self.cache.k, (self.wq, self.wk, self.wv), None)

    @staticmethod
    def _fused(cache_k: torch.Tensor, mats: tuple[QMatMul, ...], qweights: tuple | None) -> bool:
        """`fused()` of these modules and tensors (`qweights`: each mat's, read by the caller)."""
        if cache_k.dtype != torch.float32:
            return False
        weights = []  # (a loop: a generator or comprehension is a call of its own, each call)
        for i, m in enumerate(mats):
            if m.strategy != "quantized":
                return False
            w = m._buffers["qweight"] if qweights is None else qweights[i]
            weights.append((m.qtype, w.device, m.in_features))
        return fused.supports_all(weights)

    def takes_int_x(self, x: torch.Tensor) -> bool:
        """Whether this call's `harness::qkv` would read x [T, D] in `_int_x`'s form from a launch
        (`fused.norm_int_out`): then the norm before it makes that form (`RMSNorm`'s `int_form`)."""
        if x.dtype != torch.float32 or x.dim() != 2:
            return False
        modules = self._modules  # (nn.Module.__getattr__'s table, read directly: a tenth of the time)
        mats = wq, wk, wv = modules["wq"], modules["wk"], modules["wv"]
        t, d = x.shape
        return (
            fused.norm_int_out(t, d, (wq.kernel_qtype, wk.kernel_qtype, wv.kernel_qtype))
            and fused.runs_on(x.device)
            and self._fused(modules["cache"]._buffers["k"], mats, None)
        )

    def forward(
        self, x: torch.Tensor, start_pos: int | torch.Tensor, x_int: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        """`x_int`: x's `_int_x` form from its norm (`takes_int_x`), handed to `harness::qkv`."""
        t = x.shape[0]
        # (each submodule and buffer read once, from nn.Module.__getattr__'s tables directly:
        # `_modules`, `_buffers`, a tenth of the time)
        modules = self._modules
        mats = wq, wk, wv = modules["wq"], modules["wk"], modules["wv"]
        cache = modules["cache"]._buffers
        cache_k = cache["k"]
        qweights = (wq._buffers["qweight"], wk._buffers["qweight"], wv._buffers["qweight"])
        if x.dtype == torch.float32 and self._fused(cache_k, mats, qweights):
            qkv = torch.ops.harness.qkv(
                x, *qweights, wq.kernel_qtype, wk.kernel_qtype, wv.kernel_qtype, *(x_int or ())
            )  # [T, q + k + v]
            at = start_pos if isinstance(start_pos, torch.Tensor) else None
            rope = modules["rope"]._buffers
            start = 0 if at is not None else start_pos
            args = (qkv, cache_k, cache["v"], rope["cos"], rope["sin"], at, start)
            wo = modules["wo"]
            if (
                fused.attention_int_out(t, wo.in_features, wo.kernel_qtype, self.head_dim)
                and wo.strategy == "quantized"
            ):
                # (decode: attention hands the output projection its output's `_int_x` form too)
                out, *out_int = torch.ops.harness.attention_int(*args)
                return wo(out, tuple(out_int))
            return wo(torch.ops.harness.attention(*args))
        q = self.rope(self.wq(x).view(t, self.n_heads, self.head_dim), start_pos)  # [T, H, Hd]
        k = self.rope(self.wk(x).view(t, self.n_kv_heads, self.head_dim), start_pos)  # [T, K, Hd]
        v = self.wv(x).view(t, self.n_kv_heads, self.head_dim)  # [T, K, Hd]
        keys, values = self.cache.update(k, v, start_pos)  # [K, S, Hd]
        group = self.n_heads // self.n_kv_heads
        q = q.transpose(0, 1).reshape(self.n_kv_heads, group * t, self.head_dim)  # [K, group*T, Hd]
        scores = (q @ keys.transpose(1, 2)) * self.head_dim**-0.5  # [K, group*T, S]
        scores = scores.view(self.n_kv_heads, group, t, -1)  # [K, group, T, S]
        s = keys.shape[1]
        scores = scores.masked_fill(self.causal_mask(start_pos, t, s, x.device), float("-inf"))
        probs = scores.float().softmax(-1).to(values.dtype).view(self.n_kv_heads, group * t, s)
        out = (probs @ values).view(self.n_heads, t, self.head_dim)  # [H, T, Hd]
        return self.wo(out.transpose(0, 1).reshape(t, self.n_heads * self.head_dim))

    def causal_mask(
        self, start_pos: int | torch.Tensor, t: int, s: int, device: torch.device
    ) -> torch.Tensor:
        """[T, S] True where query position start_pos + i must not see key position j, built on `device`."""
        if isinstance(start_pos, torch.Tensor):
            q_pos = start_pos.view(1, 1)  # one token at a device position
        else:
            q_pos = torch.arange(start_pos, start_pos + t, device=device)[:, None]  # [T, 1]
        k_pos = torch.arange(s, device=device)[None, :]  # [1, S]
        return k_pos > q_pos


class FeedForward(nn.Module):
    """A dense llama MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, gate: QTensor, up: QTensor, down: QTensor, strategy: str):
        super().__init__()
        self.w1, self.w3, self.w2 = QMatMul(gate, strategy), QMatMul(up, strategy), QMatMul(down, strategy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """Every expert's w1 (gate), w3 (up) and w2 (down) as stacks of raw blocks [E, rows, row_bytes].

    Two ways to apply them, both without host reads of routing data:
    - gather (few token-expert pairs, e.g. decode): the chosen experts' blocks are gathered by
      index on the device and only those are dequantized;
    - dense (many pairs, e.g. prefill): each expert runs on every token, weighted by its routing
      weight, which is zero for tokens not routed to it.
    """

    def __init__(self, gate: list[QTensor], up: list[QTensor], down: list[QTensor], device: torch.device):
        super().__init__()
        self.n_experts = len(gate)
        self.gguf_names = {
            "w1": [g.name for g in gate],
            "w3": [u.name for u in up],
            "w2": [d.name for d in down],
        }
        self.meta = {}
        self.kernel_qtypes = {}  # the `qtype` each stack goes to the fused ops with
        self.kernel_ready = {}  # whether `fused.placed_weight` prepared it for the ops
        for attr, weights in (("w1", gate), ("w3", up), ("w2", down)):
            qtypes = {w.qtype for w in weights}
            if len(qtypes) != 1:
                names = ", ".join(f"{w.name}={w.qtype.name}" for w in weights)
                raise UsageError(
                    None, weights[0].name, f"experts of one layer have different types ({names})"
                )
            self.meta[attr] = (weights[0].qtype, weights[0].shape)
            # Stacked where the blocks are (a view for a merged file), then moved in one copy; kept
            # as the fused kernels read them where they run (`fused.placed_weight`, here and after
            # every move).
            self.register_buffer(attr, _stack_raw(weights).to(device), persistent=False)
            self.kernel_qtypes[attr], self.kernel_ready[attr] = int(weights[0].qtype), False
        self._place_weights()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._place_weights()
        return self

    def _place_weights(self) -> None:
        for attr, (_, shape) in self.meta.items():
            raw, self.kernel_qtypes[attr], self.kernel_ready[attr] = fused.placed_weight(
                getattr(self, attr), self.kernel_qtypes[attr], shape[-1], self.kernel_ready[attr]
            )
            setattr(self, attr, raw)

    def weight(self, attr: str, experts: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized weights of the given experts: [n, rows, cols] for an index tensor, else [rows, cols]."""
        qtype, shape = self.meta[attr]
        raw, code = getattr(self, attr), self.kernel_qtypes[attr]
        if isinstance(experts, int):
            return QTensor(fused.gguf_blocks(raw[experts], code), qtype, shape).dequantize(dtype=dtype)
        picked = fused.gguf_blocks(raw.index_select(0, experts), code)  # [n, rows, row_bytes]
        return QTensor(picked, qtype, (experts.shape[0], *shape)).dequantize(dtype=dtype)

    def fused(self) -> bool:
        """Whether the whole expert MLP runs as one `harness::moe_ffn` (fused.supports decides)."""
        return self._fused(self.w1.device)

    def _fused(self, device: torch.device) -> bool:
        (g, (_, d)), (u, _), (w2, (_, f)) = self.meta["w1"], self.meta["w3"], self.meta["w2"]
        return g == u and fused.supports_all([(g, device, d), (w2, device, f)])

    def gate_up_code(self) -> int:
        """`harness::moe_ffn`'s gate_up_qtype: gate's kernel code, WIDE where either weight is."""
        codes = self.kernel_qtypes
        return codes["w1"] | (codes["w3"] & fused.WIDE)

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        experts: torch.Tensor,
        residual: torch.Tensor | None = None,
        x_int: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        # x: [T, D]; weights, experts: [T, k]. With `residual` [T, D]: residual + the experts' sum
        # (the layer's residual add; the fused op makes it itself, where residual and x are float32).
        # `x_int`: x's `_int_x` form from its norm (`MoE.takes_int_x`), handed to the fused op.
        buffers = self._buffers  # (nn.Module.__getattr__'s table, read directly: a tenth of the time)
        w1 = buffers["w1"]
        if self._fused(w1.device):
            qt, qt_down = self.gate_up_code(), self.kernel_qtypes["w2"]
            w3, w2 = buffers["w3"], buffers["w2"]
            if (
                residual is not None
                and x.dtype == residual.dtype == torch.float32
                and residual.shape == x.shape
            ):
                return torch.ops.harness.moe_ffn(
                    x, w1, w3, w2, weights, experts, qt, qt_down, residual, *(x_int or ())
                )
            y = torch.ops.harness.moe_ffn(x, w1, w3, w2, weights, experts, qt, qt_down, None, *(x_int or ()))
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        else:
            t, k = experts.shape
            y = (
                self._gather(x, weights, experts)
                if t * k < self.n_experts
                else self._dense(x, weights, experts)
            )
        return y if residual is None else residual + y

    def _gather(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        t, k = experts.shape
        flat = experts.reshape(-1)  # [T*k]
        xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T*k, D, 1]
        h = F.silu(self.weight("w1", flat, x.dtype) @ xs) * (
            self.weight("w3", flat, x.dtype) @ xs
        )  # [T*k, F, 1]
        y = (self.weight("w2", flat, x.dtype) @ h).view(t, k, -1)  # [T, k, D]
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)  # [T, D]
        for e in range(self.n_experts):
            coef = (weights * (experts == e)).sum(-1, keepdim=True).to(x.dtype)  # [T, 1], 0 if not routed
            w1, w3, w2 = (self.weight(a, e, x.dtype) for a in ("w1", "w3", "w2"))
            out += coef * (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
        return out

    def extra_repr(self) -> str:
        return (
            ", ".join(f"{a}={q.name}{list(s)}" for a, (q, s) in self.meta.items())
            + f", experts={self.n_experts}"
        )


def _stack_raw(weights: list[QTensor]) -> torch.Tensor:
    """[E, rows, row_bytes] raw blocks: a view when the experts are slices of one merged stack."""
    first = weights[0].raw
    base = first.untyped_storage()
    stride = first.numel()
    contiguous_stack = all(
        w.raw.untyped_storage().data_ptr() == base.data_ptr()
        and w.raw.storage_offset() == first.storage_offset() + e * stride
        for e, w in enumerate(weights)
    )
    if contiguous_stack:
        return first.as_strided((len(weights), *first.shape), (stride, *first.stride()))
    return torch.stack([w.raw for w in weights])


class Router(QMatMul):
    """The MoE router (`ffn_gate_inp`): a QMatMul whose logits [T, E] pick each token's experts.

    `router(x)` gives the logits. Where the fused ops run (`routes_in_one_op`), `router(x, k)`
    gives the routing as one op, `harness::router_topk`: softmax over all experts, the top k,
    their weights renormalized -> weights [T, k] float32, experts [T, k] int64. A float32
    weight goes into the op itself (the product inside it, the GGUF tensor among its inputs);
    a quantized router hands it its logits."""

    def routes_in_one_op(self, x: torch.Tensor) -> bool:
        return (
            x.dtype == torch.float32 and x.dim() == 2 and fused.runs_on(x.device) and runs_own_forward(self)
        )

    def forward(self, x: torch.Tensor, k: int | None = None):
        if k is None:
            return super().forward(x)
        if self.strategy == "f32":
            return torch.ops.harness.router_topk(x, self.weight, k, ROUTER_WEIGHT_SUM_MIN)
        return torch.ops.harness.router_topk(super().forward(x), None, k, ROUTER_WEIGHT_SUM_MIN)


class MoE(nn.Module):
    """Router -> softmax over all experts -> top-k -> renormalized weights -> weighted experts."""

    def __init__(self, router: Router, experts: Experts, n_used: int):
        super().__init__()
        self.router = router
        self.experts = experts
        self.n_used = n_used

    def takes_int_x(self, x: torch.Tensor) -> bool:
        """Whether this call's `harness::moe_ffn` would read x [T, D] in `_int_x`'s form from a
        launch (its gate/up product, `fused.norm_int_out`): then the norm before it makes that
        form (`RMSNorm`'s `int_form`)."""
        if x.dtype != torch.float32 or x.dim() != 2:
            return False
        experts = self._modules["experts"]  # (nn.Module.__getattr__'s table, read directly)
        t, d = x.shape
        return (
            fused.norm_int_out(t * self.n_used, d, (experts.gate_up_code(),))
            and fused.runs_on(x.device)
            and experts.fused()
        )

    def norm_route(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, int] | None:
        """(the router's float32 weight, k) where `norm` of x + residual, the norm before this
        MoE, should route its output itself (`fused.norm_routes`: NORM_CONFIG "router", a decode
        call whose tensors are all on one device the kernels run on), for `RMSNorm`'s `route`
        (the routing it gives is this module's `routing`); None otherwise."""
        router = self._modules["router"]  # (nn.Module.__getattr__'s tables, read directly)
        if router.strategy != "f32" or not runs_own_forward(router):
            return None
        weight, k = router._buffers["weight"], self.n_used
        if weight is not None and fused.norm_routes(x, residual, norm._buffers["weight"], weight, k):
            return weight, k
        return None

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        x_int: tuple[torch.Tensor, ...] | None = None,
        routing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The experts' weighted sum for x [T, D]; `residual + ` it where `residual` is given (the
        layer's residual add, made by the experts: in their fused op, where it runs). `x_int`:
        x's `_int_x` form from its norm (`takes_int_x`), for the experts' op. `routing`: x's
        (weights, experts) [T, k] from its norm (`norm_route`), in place of the router's."""
        experts = self._modules["experts"]  # (nn.Module.__getattr__'s table, read directly)
        if routing is not None:
            return experts(x, *routing, residual, x_int)
        router = self._modules["router"]
        if router.routes_in_one_op(x):
            weights, chosen = router(x, self.n_used)  # [T, k]
            return experts(x, weights, chosen, residual, x_int)
        logits = router(x)  # [T, E]
        probs = logits.float().softmax(-1)
        weights, chosen = probs.topk(self.n_used, dim=-1)  # [T, k]
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=ROUTER_WEIGHT_SUM_MIN)
        return experts(x, weights, chosen, residual, x_int)


class Block(nn.Module):
    def __init__(self, mf: ModelFile, i: int, device: torch.device, strategy: str, cache: KVCache):
        super().__init__()
        c = mf.config

        def w(name: str) -> QTensor:
            return mf.tensor(f"blk.{i}.{name}.weight").to(device)

        self.attn_norm = RMSNorm(w("attn_norm"), c.rms_eps)
        self.attn = Attention(mf, i, strategy, cache)
        self.ffn_norm = RMSNorm(w("ffn_norm"), c.rms_eps)
        if c.is_moe:
            experts = Experts(*(mf.experts(i, kind) for kind in ("gate", "up", "down")), device=device)
            self.moe = MoE(Router(w("ffn_gate_inp"), strategy), experts, c.expert_used_count)
        else:
            self.ffn = FeedForward(w("ffn_gate"), w("ffn_up"), w("ffn_down"), strategy)
        self.is_moe = c.is_moe  # (a plain attribute: `hasattr(self, "moe")` is two module lookups)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        norms = fused.NORM_CONFIG
        if norms["int_out"] or norms["router"]:  # (decode: the norms hand their ops more)
            return self._forward_fused_norms(x, start_pos)
        x, normed = self.ffn_norm(x, self.attn(self.attn_norm(x), start_pos))  # x + attention, normed
        if self.is_moe:
            return self.moe(normed, x)  # x + the experts' sum (one op on the fused path)
        return x + self.ffn(normed)

    def _forward_fused_norms(self, x: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        """`forward` where each norm whose op takes x's `_int_x` form (`takes_int_x`) makes it
        (fused.NORM_CONFIG "int_out"), and the norm before a MoE routes for it where `norm_route`
        says so ("router"): the same results, no `_int_x` launch on a norm's output, no router
        launch of its own. Only between modules that run their own forward (`runs_own_forward`):
        a replaced one gets `forward`'s plain calls."""
        modules = self._modules  # (nn.Module.__getattr__'s table, read directly: a tenth of the time)
        attn, attn_norm = modules["attn"], modules["attn_norm"]
        if runs_own_forward(attn) and runs_own_forward(attn_norm) and attn.takes_int_x(x):
            normed, x_int = attn_norm(x, int_form=True)
            h = attn(normed, start_pos, x_int)
        else:
            h = attn(attn_norm(x), start_pos)
        ffn_norm = modules["ffn_norm"]
        if not self.is_moe:
            x, normed = ffn_norm(x, h)
            return x + modules["ffn"](normed)
        moe = modules["moe"]
        if (
            h.dtype == torch.float32
            and h.shape == x.shape
            and runs_own_forward(moe)
            and runs_own_forward(ffn_norm)
        ):
            int_form = moe.takes_int_x(x)
            route = moe.norm_route(x, h, ffn_norm)
            if route is not None:
                x, normed, *made = ffn_norm(x, h, int_form, route)  # ([x_int], routing)
                return moe(normed, x, made[0] if int_form else None, routing=made[-1])
            if int_form:
                x, normed, x_int = ffn_norm(x, h, int_form=True)
                return moe(normed, x, x_int)
        x, normed = ffn_norm(x, h)
        return moe(normed, x)


class Mixtral(nn.Module):
    """The whole model. `model(tokens, start_pos)`: tokens [T] -> logits [T, V] (float32)."""

    def __init__(
        self, config: MixtralConfig, placement: Placement, mf: ModelFile, strategy: str, max_seq_len: int
    ):
        super().__init__()
        self.config = config
        self.placement = placement
        self.max_seq_len = max_seq_len
        self.dtype = torch.float32
        self.decode_graph = None  # a captured decode step (harness.model.generate.DecodeGraph)
        for device in placement.devices:
            TABLES.warm(device)  # per-device constants built at load, not in the first forward
        self.embed = Embedding(mf.tensor("token_embd.weight").to(placement.embed))
        self.layers = nn.ModuleList(
            Block(
                mf,
                i,
                d,
                strategy,
                KVCache(config.head_count_kv, max_seq_len, config.head_dim, d, self.dtype),
            )
            for i, d in enumerate(placement.layers)
        )
        self.norm = RMSNorm(mf.tensor("output_norm.weight").to(placement.head), config.rms_eps)
        head_name = "output.weight" if "output.weight" in mf else "token_embd.weight"
        self.head = QMatMul(mf.tensor(head_name).to(placement.head), strategy)

    @classmethod
    def from_gguf(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        device_map: dict[str, str] | None = None,
        n_gpu_layers: int | None = None,
        strategy: str = "quantized",
        max_seq_len: int | None = None,
    ) -> Mixtral:
        """Load a GGUF file onto the placement given by `device`, `device_map` or `n_gpu_layers`.

        `max_seq_len` sizes the KV cache (default: the file's context length, at most 4096)."""
        mf = open_gguf(path)
        c = mf.config
        placement = Placement.resolve(
            c.block_count, device=device, device_map=device_map, n_gpu_layers=n_gpu_layers
        )
        if max_seq_len is None:
            max_seq_len = min(c.context_length, 4096)
        if not 0 < max_seq_len <= c.context_length:
            raise UsageError(
                str(path), "max_seq_len", f"{max_seq_len} is outside 1..context length {c.context_length}"
            )
        model = cls(c, placement, mf, strategy, max_seq_len)
        model.gguf_path = os.fspath(path)
        return model

    def reset(self) -> None:
        """Forget the cached sequence (the cache is overwritten from position 0 next time)."""
        for layer in self.layers:
            layer.attn.cache.k.zero_()
            layer.attn.cache.v.zero_()

    def check_tokens(self, tokens: list[int] | torch.Tensor, start_pos: int = 0) -> None:
        """Host-side checks of a token sequence before it goes anywhere near a device."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if not ids:
            raise UsageError(None, "tokens", "the token sequence is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UsageError(
                None, "tokens", f"token id {bad[0]} is outside the vocabulary 0..{self.config.vocab_size - 1}"
            )
        if start_pos < 0 or start_pos + len(ids) > self.max_seq_len:
            raise UsageError(
                None,
                "tokens",
                f"positions {start_pos}..{start_pos + len(ids) - 1} exceed the context of {self.max_seq_len} tokens",
            )

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        # tokens: [T] int64 -> logits [T, V] float32. start_pos: an int, or for one token a [1]
        # int64 tensor on the layers' device (static shapes throughout: a CUDA graph can replay it)
        if isinstance(start_pos, torch.Tensor) and tokens.shape != (1,):
            raise UsageError(None, "start_pos", "a tensor position takes exactly one token")
        if tokens.device.type == "cpu" and not isinstance(start_pos, torch.Tensor):
            self.check_tokens(tokens, start_pos)  # a device tensor is not read back to check it
        x = self.embed(tokens.to(self.placement.embed))  # [T, D]
        for layer, device in zip(self.layers, self.placement.layers, strict=True):
            if x.device != device:
                x = x.to(device)  # a declared device-map boundary
                if isinstance(start_pos, torch.Tensor):
                    start_pos = start_pos.to(device)
            x = layer(x, start_pos)
        if x.device != self.placement.head:
            x = x.to(self.placement.head)
        logits = self.head(self.norm(x))
        return logits if logits.dtype == torch.float32 else logits.float()


# Each class's forward as defined above (`runs_own_forward`), taken before anything can replace it.
_DEFINED_FORWARDS = {cls: cls.forward for cls in (RMSNorm, Attention, Router, MoE)}
