"""Where one decode step and one prefill of the full model spend their GPU time: kernel time by
kernel name under torch.profiler, beside the wall time of the same steps, and the decode step's
time op by op. Writes JSON; asserts nothing.

    python benchmarks/profile_decode.py --model /tmp/m.gguf --steps 8 --top 40 --out profile.json

A decode step runs eager here (a replayed CUDA graph shows as one event), so `wall_ms_per_step`
includes launch costs the graph removes; `kernel_ms_per_step` is what the graph cannot remove.
`decode_eager_host` says where the host time of an eager step goes (cProfile, self time by
Python function): the launch costs that an eager run, and so a traced one, pays.

`decode_ops` splits the same profiled decode steps by op call (`harness.op_profile.op_table`):
each kernel counted once, for the outermost `harness::` op that launched it (or the aten op
outside them), one row per op and signature (e.g. `harness::moe_ffn` in layers whose down
stack is Q6_K apart from those where it is Q4_K; the head's `harness::qmatmul` apart from the
attention output's), with the bytes a call reads, its effective TB/s and that as a fraction of
a device-to-device copy (`harness.bench.copy_bandwidth`, measured once in this run; read +
written bytes); inside a row, each weight product's own launch (moe_ffn's gate/up and down,
qkv's runs of one type) with its TB/s. Its `ms_per_step` is every kernel's,
`attributed_ms_per_step` those under an op (a row "(no op)" holds the rest). On the CPU (no
GPU) the profiler's CPU times stand in, and the harness:: ops appear only under Triton's
interpreter (`TRITON_INTERPRET=1`): elsewhere the model runs its torch path and the rows are
aten ops. `record_shapes` is on for the decode profile, so `wall_ms_per_step_profiled` carries
its host cost too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.bench import copy_bandwidth, host_hotspots  # noqa: E402
from harness.model.generate import greedy_decode  # noqa: E402
from harness.model.mixtral import Mixtral  # noqa: E402
from harness.op_profile import format_op_table, op_table  # noqa: E402


def kernel_table(prof, kind, steps: int, top: int) -> tuple[float, list[dict]]:
    """(GPU kernel milliseconds per step, the `top` kernels by time: name, calls and ms per step)."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == kind:
            row = by_name[ev.name[:160]]
            row[0] += 1
            row[1] += ev.device_time_total / 1000.0
    total = sum(ms for _, ms in by_name.values()) / steps
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return total, [
        {"kernel": name, "calls_per_step": n / steps, "ms_per_step": ms / steps} for name, (n, ms) in rows
    ]


def host_profile(step, sync, steps: int, top: int) -> dict:
    """Wall milliseconds of an unprofiled eager step (median of `steps`), and where its host time
    goes (`harness.bench.host_hotspots`, per step)."""
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return {"wall_ms_per_step": sorted(times)[len(times) // 2], "top_self": host_hotspots(step, steps, top)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=4, help="decode steps profiled")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--graph-tokens", type=int, default=64, help="tokens a timed graph decode makes")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the copy rate the per-op table compares with: 1 GiB on a GPU, 64 MiB on the CPU
    copy_rate = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the copy's 2 GiB back before the model loads
    model = Mixtral.from_gguf(args.model, device=device, max_seq_len=max(args.prefill, 256))
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    token = torch.tensor([5], device=device)
    prompt = torch.randint(3, model.config.vocab_size, (args.prefill,), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__}
    with torch.inference_mode():
        for pos in range(3):  # compile and warm up
            model(token, pos)
        model(prompt, 0)
        sync()

        start = time.perf_counter()
        # record_shapes: the per-op table splits each op by its arguments' shapes and type codes
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for pos in range(3, 3 + args.steps):
                model(token, pos)
            sync()
        wall = (time.perf_counter() - start) * 1000 / args.steps
        kernel_ms, rows = kernel_table(prof, kind, args.steps, args.top)
        result["decode_eager"] = {
            "wall_ms_per_step_profiled": wall,
            "kernel_ms_per_step": kernel_ms,
            "top": rows,
        }
        result["decode_ops"] = op_table(prof.events(), kind, args.steps, copy_rate)

        result["decode_eager_host"] = host_profile(lambda: model(token, 3), sync, args.steps, args.top)

        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(prompt, 0)
            sync()
        wall = (time.perf_counter() - start) * 1000
        kernel_ms, rows = kernel_table(prof, kind, 1, args.top)
        result["prefill"] = {
            "tokens": args.prefill,
            "wall_ms_profiled": wall,
            "kernel_ms": kernel_ms,
            "top": rows,
        }

        n = args.graph_tokens
        greedy_decode(model, token, 0, n)  # captures the graph
        sync()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            greedy_decode(model, token, 0, n)
            sync()
            times.append((time.perf_counter() - start) * 1000 / n)
        result["decode_graph_ms_per_token"] = sorted(times)[1]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "decode_ops"}, indent=1))
    ops = result["decode_ops"]
    print(
        f"\ndecode step by op ({ops['time_source']}; {ops['attributed_ms_per_step']:.3f} of "
        f"{ops['ms_per_step']:.3f} ms a step under an op; copy {copy_rate / 1e12:.3f} TB/s):"
    )
    print(format_op_table(ops["rows"][: args.top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
