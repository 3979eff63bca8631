"""Speed measurements of the harness's model, and of llama.cpp's `llama-bench` on the same file.

    result = measure("model.gguf", "cuda", n_prompt=512, n_gen=128, repetitions=3)
    llama = run_llama_bench("/path/to/llama-bench", "model.gguf")  # {"pp512":..., "tg128":..., ...}
    print(format_results([result, llama], "md"))

The tests are llama-bench's: `pp<n>` processes an n-token prompt from an empty KV cache in one
forward call; `tg<n>` generates n tokens one at a time, greedily, from an empty cache, with no
host read of a token between steps. Each repetition is timed with a device synchronization at both
ends; the first (`warmup`) runs are not counted (kernels compile, caches fill). Nothing here
asserts a speed: callers write the numbers down (benchmarks/bench_model.py, `harness bench`).
"""

from __future__ import annotations

import cProfile
import csv
import gc
import io
import json
import os
import platform
import pstats
import re
import shlex
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness.errors import UsageError

FORMATS = ("md", "json", "csv")

# Expert stacks (merged layout) and single experts (per-expert layout) of a GGUF MoE model.
_EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)(_exps|\.\d+)\.weight$")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict[str, float]:
    """mean, sd (sample; 0 for one value) and median of `values`."""
    if not values:
        return {"mean": float("nan"), "sd": float("nan"), "median": float("nan")}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "median": statistics.median(values)}


@dataclass
class BenchResult:
    """One engine's measurement of one model file on one device."""

    engine: str
    model_path: str
    file_bytes: int
    device_name: str
    n_prompt: int
    n_gen: int
    prefill_seconds: list[float] = field(default_factory=list)  # per repetition
    decode_seconds: list[float] = field(default_factory=list)  # per repetition, n_gen tokens
    load_seconds: float | None = None
    peak_gpu_memory_bytes: int | None = None
    kv_cache_bytes: int | None = None
    decode_bytes_per_token: int | None = None  # weight bytes one decoded token reads
    copy_bytes_per_second: float | None = None  # device-to-device copy rate (read + written)
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> list[float]:
        return [self.n_prompt / s for s in self.prefill_seconds if s > 0]

    @property
    def decode_tokens_per_second(self) -> list[float]:
        return [self.n_gen / s for s in self.decode_seconds if s > 0]

    @property
    def prefill_stats(self) -> dict[str, float]:
        return _stats(self.prefill_tokens_per_second)

    @property
    def decode_stats(self) -> dict[str, float]:
        return _stats(self.decode_tokens_per_second)

    @property
    def decode_bandwidth_fraction(self) -> float | None:
        """Weight bytes read per second while decoding (median), over the device's copy rate."""
        if not self.decode_bytes_per_token or not self.copy_bytes_per_second or not self.decode_seconds:
            return None
        return self.decode_bytes_per_token * self.decode_stats["median"] / self.copy_bytes_per_second

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        d["decode_tokens_per_second"] = self.decode_tokens_per_second
        d["prefill_tokens_per_second_median"] = self.prefill_stats["median"]
        d["decode_tokens_per_second_median"] = self.decode_stats["median"]
        d["decode_bandwidth_fraction_of_copy"] = self.decode_bandwidth_fraction
        return d


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repetitions: int = 10) -> float:
    """Bytes per second (read + written) of a device-to-device copy of `nbytes`, median of runs."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(repetitions):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def host_hotspots(run, repeats: int, top: int) -> list[dict]:
    """The `top` Python functions by self time (host time, where launch costs go) over `repeats`
    calls of `run` under cProfile, per call. cProfile slows what it watches: the shares are the
    point, not the times."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, calls, self s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {
            "function": f"{'/'.join(Path(file).parts[-2:])}:{line}({name})",
            "calls": calls / repeats,
            "self_ms": own * 1000 / repeats,
            "cumulative_ms": cum * 1000 / repeats,
        }
        for (file, line, name), (_, calls, own, cum, _) in rows
    ]


def decode_bytes_per_token(path: str | os.PathLike) -> int:
    """Weight bytes one decoded token reads: every tensor, the experts at n_used/n_experts of their
    bytes, the token table at one row (unless it is also the output head)."""
    from harness.gguf_file import open_gguf

    mf = open_gguf(path)
    try:
        c = mf.config
        tied = "output.weight" not in mf
        total = 0.0
        for name in mf.tensor_names:
            n = mf.nbytes(name)
            if _EXPERT_TENSOR.match(name):
                total += n * c.expert_used_count / c.expert_count  # a stack, or one expert of E
            elif name == "token_embd.weight" and not tied:
                total += n / c.vocab_size
            else:
                total += n
        return int(total)
    finally:
        mf.close()


def measure(
    model_path: str | os.PathLike,
    device: str | torch.device = "cuda",
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    warmup: int = 1,
    *,
    strategy: str = "quantized",
    fast_decode: bool = True,
    bandwidth: bool = True,
) -> BenchResult:
    """Load `model_path` onto `device` and time llama-bench's pp`n_prompt` and tg`n_gen` tests.

    `fast_decode` uses the static-cache decode step (a CUDA graph on a GPU) of
    `harness.model.generate`, else plain eager forward calls. `bandwidth` also measures the
    device-to-device copy rate (GPU only), for `BenchResult.decode_bandwidth_fraction`.
    """
    from harness.model.generate import greedy_decode
    from harness.model.mixtral import Mixtral

    if n_prompt < 1 or n_gen < 1:
        raise UsageError(None, "n_prompt/n_gen", f"must be positive, got {n_prompt} and {n_gen}")
    if repetitions < 1 or warmup < 0:
        raise UsageError(
            None, "repetitions", f"need repetitions >= 1 and warmup >= 0, got {repetitions}, {warmup}"
        )
    path = Path(model_path)
    if not path.is_file():
        raise UsageError(os.fspath(path), None, "no such model file")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(None, "device", f"{device} asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(device)
    result = BenchResult(
        engine="harness",
        model_path=os.fspath(path),
        file_bytes=path.stat().st_size,
        device_name=device_name(device),
        n_prompt=n_prompt,
        n_gen=n_gen,
        decode_bytes_per_token=decode_bytes_per_token(path),
    )
    start = time.perf_counter()
    model = Mixtral.from_gguf(path, device=device, strategy=strategy, max_seq_len=max(n_prompt, n_gen + 1))
    _sync(device)
    result.load_seconds = time.perf_counter() - start
    result.kv_cache_bytes = sum(
        layer.attn.cache.k.nbytes + layer.attn.cache.v.nbytes for layer in model.layers
    )

    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (n_prompt,), generator=torch.Generator().manual_seed(0)).to(device)
    first = prompt[:1]
    with torch.inference_mode():
        for rep in range(warmup + repetitions):
            _sync(device)
            start = time.perf_counter()
            model(prompt, 0)
            _sync(device)
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                result.prefill_seconds.append(elapsed)
        for rep in range(warmup + repetitions):
            _sync(device)
            start = time.perf_counter()
            greedy_decode(model, first, 0, n_gen, fast=fast_decode)
            _sync(device)
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                result.decode_seconds.append(elapsed)
    if device.type == "cuda":
        result.peak_gpu_memory_bytes = torch.cuda.max_memory_allocated(device)
    del model  # with its decode graph (a reference cycle: collected below)
    gc.collect()
    if bandwidth and device.type == "cuda":
        torch.cuda.empty_cache()
        result.copy_bytes_per_second = copy_bandwidth(device)
    return result


def llama_bench_command(
    binary: str | os.PathLike,
    model_path: str | os.PathLike,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    n_gpu_layers: int = 99,
    flash_attn: bool = True,
) -> list[str]:
    return [
        os.fspath(binary),
        "-m",
        os.fspath(model_path),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-ngl",
        str(n_gpu_layers),
        "-r",
        str(repetitions),
        "-fa",
        "1" if flash_attn else "0",
        "-o",
        "json",
    ]


def parse_llama_bench_json(text: str, command: str = "") -> dict:
    """llama-bench's `-o json` output -> {"pp<n>": tok/s, "tg<n>": tok/s, "command", "tests"}.

    Each test keeps llama-bench's own fields (avg_ts, stddev_ts, samples_ts, ...)."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(None, "llama-bench output", f"not JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(records, list) or not records:
        raise UsageError(None, "llama-bench output", f"expected a non-empty JSON list, got {text[:200]!r}")
    out: dict = {"command": command, "tests": {}}
    for rec in records:
        try:
            n_prompt, n_gen, avg = int(rec["n_prompt"]), int(rec["n_gen"]), float(rec["avg_ts"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(None, "llama-bench output", f"a test record lacks {exc}: {rec!r}") from None
        name = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        out[name] = avg
        out["tests"][name] = rec
    return out


def run_llama_bench(
    binary: str | os.PathLike,
    model_path: str | os.PathLike,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    *,
    n_gpu_layers: int = 99,
    flash_attn: bool = True,
    timeout: float = 1800,
) -> dict:
    """Run llama.cpp's `llama-bench -o json` on `model_path`; {"pp512": tok/s, "tg128": tok/s,
    "command": the command line, "tests": llama-bench's records}."""
    if not Path(binary).is_file() or not os.access(binary, os.X_OK):
        raise UsageError(os.fspath(binary), None, "llama-bench: no such executable")
    if not Path(model_path).is_file():
        raise UsageError(os.fspath(model_path), None, "no such model file")
    cmd = llama_bench_command(binary, model_path, n_prompt, n_gen, repetitions, n_gpu_layers, flash_attn)
    command = shlex.join(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise UsageError(
            os.fspath(binary), None, f"llama-bench ran past {timeout:.0f} s: {command}"
        ) from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise UsageError(os.fspath(binary), None, f"llama-bench exited {proc.returncode}: {tail}")
    return parse_llama_bench_json(proc.stdout, command)


def _rows(result: BenchResult | dict) -> list[dict]:
    """llama-bench-style rows: engine, model, size, test, t/s mean and sd, median."""
    if isinstance(result, BenchResult):
        name = Path(result.model_path).name
        rows = []
        for test, stats in (
            (f"pp{result.n_prompt}", result.prefill_stats),
            (f"tg{result.n_gen}", result.decode_stats),
        ):
            rows.append(
                {
                    "engine": result.engine,
                    "model": name,
                    "size_gib": result.file_bytes / 2**30,
                    "device": result.device_name,
                    "test": test,
                    "ts_mean": stats["mean"],
                    "ts_sd": stats["sd"],
                    "ts_median": stats["median"],
                }
            )
        return rows
    rows = []
    for test, rec in result.get("tests", {}).items():
        samples = [float(s) for s in rec.get("samples_ts", [])]
        rows.append(
            {
                "engine": "llama.cpp",
                "model": Path(str(rec.get("model_filename", ""))).name,
                "size_gib": float(rec.get("model_size", 0)) / 2**30,
                "device": str(rec.get("gpu_info", "")),
                "test": test,
                "ts_mean": float(rec["avg_ts"]),
                "ts_sd": float(rec.get("stddev_ts", 0.0)),
                "ts_median": statistics.median(samples) if samples else float(rec["avg_ts"]),
            }
        )
    return rows


def format_results(results: list[BenchResult | dict], fmt: str = "md") -> str:
    """A table of `results` (BenchResults and `run_llama_bench` dicts) as llama-bench prints it:
    "md" (a markdown table, t/s as mean ± sd), "json" (the rows as a list) or "csv"."""
    if fmt not in FORMATS:
        raise UsageError(None, "format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = [row for r in results for row in _rows(r)]
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["engine"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    header = ["engine", "model", "size", "device", "test", "t/s"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 4 + ["---:"] * 2) + " |"]
    for r in rows:
        cells = [
            r["engine"],
            r["model"],
            f"{r['size_gib']:.2f} GiB",
            r["device"],
            r["test"],
            f"{r['ts_mean']:.2f} ± {r['ts_sd']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
