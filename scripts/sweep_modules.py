"""Sweep PyTorch's module database: real CUDA, the emulation and the tracer on every torch.nn module.

For each module of `torch.testing._internal.common_modules.module_db` and a few of its sample
inputs, the module is built (fixed seed) and called with all its parameters, buffers and forward
inputs on the accelerator, then with each of them on the CPU in turn (as the OpInfo sweep,
`sweep_device_rules.py`, does with an op's arguments), in each grad mode (inference mode,
no_grad, grad enabled with the parameters and the first input requiring grad, the module in
training mode; with
everything on the accelerator, grad mode also runs the backward pass). Each call is run on

- real CUDA (where there is a GPU): accepts, refuses for devices, or fails otherwise;
- the emulated accelerator (`harness.trace.emulated`): it must say the same;
- the tracer (`harness.trace.Tracer` around the module, on the emulation): its own rule
  (`classify.refused`, on the recorded devices) must refuse exactly the calls CUDA refuses.

Without a GPU the emulation is compared with the tracer, and a module the emulation cannot run
with everything on the device while the CPU can is a disagreement too. The result is JSON:
modules, calls, agreements, every disagreement with the call's devices and messages, calls whose
verdict depends on the grad mode, and known differences with their reasons.

    python scripts/sweep_modules.py --out sweep_modules.json                  # on a GPU machine
    python scripts/sweep_modules.py --backend emulated --modules nn.Linear    # anywhere

The module database imports `expecttest` (pip install expecttest).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_common import (  # noqa: E402
    GRAD,
    GRAD_MODES,
    describe,
    grad_context,
    parse,
    parser,
    place,
    run_pool,
    summarize,
    traced,
    verdict,
    worker_loop,
)

# Disagreements known and left alone, by module, with the reason; the sweep lists them apart.
_COMPOSITE = (
    "in inference mode a CompositeImplicitAutograd op ({}) reaches the tracer's dispatch mode whole, "
    "and the tracer's own rule judges it as one op, where CUDA checks only the ops of its "
    "decomposition (0-dim operands are scalars there); under no_grad and grad the tracer sees those "
    "ops and agrees. Fixed on the tracer's side by decomposing such ops under its own mode"
)
KNOWN_DIFFERENCES: dict[str, str] = {
    "nn.L1Loss": _COMPOSITE.format("broadcast_tensors"),
    "nn.KLDivLoss": _COMPOSITE.format("kl_div"),
    "nn.HingeEmbeddingLoss": _COMPOSITE.format("hinge_embedding_loss"),
    # (nn.CTCLoss is no longer listed: its 9 calls on the H100 were the emulation and the tracer
    # taking ctc_loss's subclass path under their dispatch modes; `harness.trace.untraced_paths`
    # now runs it as untraced CUDA does, and the emulation accepts all 9 as CUDA did)
}
MAX_SAMPLES = 3  # sample inputs per module (environment: SWEEP_SAMPLES)
MAX_LEAVES = 6  # tensors moved to the CPU per sample, at most
SEED = 0


def _modules(names: list[str] | None):
    from torch.testing._internal.common_modules import module_db

    return [m for m in module_db if not names or m.name in names]


def _samples(info):
    import torch
    from torch.utils._pytree import tree_flatten

    out = []
    for s in info.module_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=False
    ):
        if s.forward_input is None:
            continue
        flat, spec = tree_flatten((s.forward_input.args, s.forward_input.kwargs))
        if any(isinstance(x, torch.Tensor) and x.layout != torch.strided for x in flat):
            continue  # dense tensors only
        out.append((s, flat, spec))
        if len(out) >= int(os.environ.get("SWEEP_SAMPLES", MAX_SAMPLES)):
            break
    return out


def _build(info, sample):
    """The module of a sample, on the CPU; a lazy module is materialized by one call there."""
    import torch
    from torch.nn.parameter import is_lazy

    torch.manual_seed(SEED)
    ctor = sample.constructor_input
    module = info.module_cls(*ctor.args, **ctor.kwargs)
    if any(is_lazy(p) for p in module.parameters()):
        with torch.no_grad():
            module(*sample.forward_input.args, **sample.forward_input.kwargs)
    return module


def _leaves(module, flat) -> list[tuple[str, object]]:
    """(name, tensor) of every parameter, buffer and tensor forward input, in that order."""
    import torch

    leaves = [(f"param {n}", p) for n, p in module.named_parameters()]
    leaves += [(f"buffer {n}", b) for n, b in module.named_buffers()]
    leaves += [(f"input {i}", x) for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    return leaves


def _set(module, path: str, tensor, is_param: bool) -> None:
    import torch

    owner_path, _, name = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if is_param:
        owner._parameters[name] = torch.nn.Parameter(
            tensor, requires_grad=owner._parameters[name].requires_grad
        )
    else:
        owner._buffers[name] = tensor


def _call(info, sample, places: list[str], device_of, grad_mode: str, backward: bool):
    """Builds the module, places each leaf where `places` says, calls it in `grad_mode` (and runs
    the backward pass if asked); returns (module, a thunk that runs it and returns what it raised)."""
    import torch
    from torch.utils._pytree import tree_unflatten

    s, flat, spec = sample
    module = _build(info, s)
    module.train(grad_mode == GRAD)
    leaves = _leaves(module, flat)
    moved = list(flat)

    def run():
        try:
            with grad_context(grad_mode):
                with torch.no_grad():  # placing: not part of the call
                    for (name, t), p in zip(leaves, places, strict=False):
                        kind, _, path = name.partition(" ")
                        if kind in ("param", "buffer"):
                            _set(module, path, t.detach().to(device_of(p)), kind == "param")
                inputs = iter(i for i, x in enumerate(flat) if isinstance(x, torch.Tensor))
                for (name, t), p in zip(leaves, places, strict=False):
                    if name.startswith("input "):
                        # with grad, the first input requires grad (a loss's target need not)
                        mode = grad_mode if name == "input 0" else "no_grad"
                        moved[next(inputs)] = place(t, device_of(p), mode)
                args, kwargs = tree_unflatten(moved, spec)
                out = module(*args, **kwargs)
                if backward:
                    outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
                    graded = [o for o in outs if o.requires_grad]
                    if graded:
                        total = graded[0].float().sum()
                        for o in graded[1:]:
                            total = total + o.float().sum().to(total.device)
                        total.backward()
            return None
        except Exception as exc:  # what the backend said is the result
            return exc

    return module, run, leaves


def sweep_module(info, backend: str, grad_modes=GRAD_MODES) -> dict:
    """Every variant of a few samples of one module on the backends asked for."""
    import torch

    from harness.trace.emulated import EmulatedCuda

    record = {"op": info.name}
    try:
        samples = _samples(info)
    except Exception as exc:
        record["skipped"] = f"samples: {type(exc).__name__}: {exc}"[:300]
        return record
    if not samples:
        record["skipped"] = "no dense sample inputs"
        return record
    variants = []  # (sample index, places, grad mode, backward)
    for k, (s, flat, _) in enumerate(samples):
        n = len(_leaves(_build(info, s), flat))
        placements = [["gpu"] * n] + [
            ["gpu"] * j + ["cpu"] + ["gpu"] * (n - j - 1) for j in range(min(n, MAX_LEAVES))
        ]
        for i, places in enumerate(placements):
            variants += [(k, places, mode, i == 0 and mode == GRAD) for mode in grad_modes]
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")

    def device_of(where):
        return gpu if where == "gpu" else cpu

    results: dict[int, dict] = {}
    for v, (k, places, mode, backward) in enumerate(variants):
        if places and all(p == "gpu" for p in places):  # the CPU reference of an all-device call
            _, run, _ = _call(info, samples[k], places, lambda _: cpu, mode, backward)
            results.setdefault(v, {})["cpu"] = verdict(run())
    if backend in ("cuda", "both"):
        for v, (k, places, mode, backward) in enumerate(variants):
            _, run, _ = _call(info, samples[k], places, device_of, mode, backward)
            exc = run()
            torch.cuda.synchronize()  # an asynchronous failure shows here, and ends the worker
            results.setdefault(v, {})["cuda"] = verdict(exc)
    if backend in ("emulated", "both"):
        with EmulatedCuda(device_count=1):
            for v, (k, places, mode, backward) in enumerate(variants):
                module, run, _ = _call(info, samples[k], places, device_of, mode, backward)
                results.setdefault(v, {}).update(traced(module, run))
    record["variants"] = []
    for v, (k, places, mode, backward) in enumerate(variants):
        s, flat, _ = samples[k]
        leaves = _leaves(_build(info, s), flat)
        row = {
            "sample": k,
            "desc": s.desc,
            "devices": describe([t for _, t in leaves], places),
            "on_cpu": [name for (name, _), p in zip(leaves, places, strict=True) if p == "cpu"],
            "grad_mode": mode,
            "backward": backward,
        }
        for b, (answer, text) in results[v].items():
            row[b] = answer
            if text:
                row[f"{b}_error"] = text
        record["variants"].append(row)
    return record


def _same(backend: str):
    """Whether the backends agree on one call (None: not comparable)."""

    def same(v: dict) -> bool | None:
        a, b, c = v.get("cuda"), v.get("emulated"), v.get("tracer")
        if backend == "emulated":
            if v.get("cpu") == "accepts" and b != "accepts":
                return False  # the CPU runs it with everything in one place; the emulation must too
            return None if b == "error" else b == c
        if backend != "both" or (a == "error" and b == "error"):
            return None  # one backend only, or the sample fails on both
        return a == b == c

    return same


def _worker(args) -> int:
    modules = _modules(args.modules.split(",") if args.modules else None)[args.start : args.stop]
    modes = args.grad_modes.split(",")
    return worker_loop(
        modules,
        args.start,
        args.part,
        lambda info: sweep_module(info, args.backend, modes),
        name=lambda m: m.name,
    )


def main(argv: list[str] | None = None) -> int:
    p = parser(
        __doc__,
        ("--modules", "comma-separated module names, e.g. nn.Linear (default: all)"),
        "sweep_modules.json",
    )
    args = parse(p, argv)
    if args.part:
        return _worker(args)
    import torch

    t0 = time.perf_counter()
    n = len(_modules(args.modules.split(",") if args.modules else None))

    def command(start: int, stop: int, part: Path) -> list[str]:
        cmd = [sys.executable, __file__, "--backend", args.backend, "--grad-modes", args.grad_modes]
        cmd += ["--start", str(start), "--stop", str(stop), "--part", str(part)]
        return cmd + (["--modules", args.modules] if args.modules else [])

    records, timed_out = run_pool(n, args.workers, args.deadline, command)
    summary = summarize(records, KNOWN_DIFFERENCES, _same(args.backend))
    summary["modules"] = summary.pop("ops")
    summary["calls"] = summary.pop("variants")
    result = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.backend != "emulated" else None,
        "backend": args.backend,
        "grad_modes": args.grad_modes.split(","),
        "seconds": round(time.perf_counter() - t0, 1),
        "timed_out": timed_out,
        **summary,
        "records": records if args.backend == "emulated" else None,  # a GPU run lists what differs only
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{summary['modules']} modules, {summary['calls']} calls; compared {summary['compared']}, "
        f"agree {summary['agree']}, disagree {len(summary['disagreements'])} (+{len(summary['known'])} known), "
        f"differ by grad mode {len(summary['grad_mode_differences'])}; skipped {len(summary['skipped'])}, "
        f"poisoned {len(summary['poisoned'])} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
