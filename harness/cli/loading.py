"""The model options every model command shares, and loading the model they describe.

`MODEL.gguf` may be given as the first argument or with `-m/--model` (llama.cpp's spelling).
`--device` takes `cpu`, `cuda`, `cuda:N` or `emulated`: CUDA devices emulated on the CPU
(`harness.trace.emulated`), with as many devices as the device map names.
"""

from __future__ import annotations

import argparse
import contextlib
import re

from harness.cli import options
from harness.errors import UsageError
from harness.paths import check_input_file


def add_model_argument(s: argparse.ArgumentParser) -> None:
    """`MODEL.gguf` as the first argument, or `-m/--model MODEL.gguf`."""
    s.add_argument("model", nargs="?", type=options.text, metavar="MODEL.gguf", help="GGUF model file")
    s.add_argument(
        "-m",
        "--model",
        dest="model_option",
        type=options.text,
        metavar="MODEL.gguf",
        help="the same, as a flag",
    )


def add_model_options(s: argparse.ArgumentParser) -> None:
    add_model_argument(s)
    s.add_argument(
        "--device",
        type=options.device,
        default=None,
        help="cpu, cuda, cuda:N, or emulated: CUDA devices emulated on the CPU (default cpu)",
    )
    s.add_argument(
        "--device-map",
        type=options.device_map,
        default=None,
        help='JSON, e.g. \'{"embed": "cpu", "layers.0-15": "cuda:0", "layers.16-31": "cuda:1", "head": "cuda:1"}\'',
    )
    s.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=options.integer(0),
        default=None,
        metavar="N",
        help="llama.cpp-style partial offload: the last N layers on the GPU",
    )
    s.add_argument(
        "--strategy", default="quantized", choices=["quantized", "f32", "f16"], help="QMatMul strategy"
    )


def resolve_model(args: argparse.Namespace) -> str:
    """The model path from `MODEL.gguf` or `-m`, checked to be a regular file."""
    if getattr(args, "text", "") is None and args.model_option is not None and args.model is not None:
        args.text, args.model = args.model, None  # `tokenize -m MODEL TEXT`: the one positional is the text
    given = [m for m in (args.model, args.model_option) if m is not None]
    if not given:
        raise UsageError(
            None, None, f"no model given: harness {args.command} MODEL.gguf ... (or -m MODEL.gguf)"
        )
    if len(given) == 2 and given[0] != given[1]:
        raise UsageError(None, "--model", f"the model is given twice ({given[0]!r} and {given[1]!r})")
    check_input_file(given[0])
    return given[0]


def enter_device(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """`--device emulated`: enters the emulated accelerator on `stack` for the command's whole
    run, with as many CUDA devices as the device map names; the model then goes on `cuda`."""
    if args.device != "emulated":
        return
    from harness.trace.emulated import EmulatedCuda

    indices = [
        int(m[1]) for v in (args.device_map or {}).values() if (m := re.fullmatch(r"cuda:(\d+)", v.strip()))
    ]
    stack.enter_context(EmulatedCuda(device_count=max(indices, default=0) + 1))
    args.device = None if args.device_map else "cuda"


def load_model(args: argparse.Namespace):
    """The `Mixtral` the model options describe (after `enter_device`)."""
    from harness.errors import DeviceError
    from harness.model.mixtral import Mixtral

    device = args.device if (args.device or args.device_map is None) else None
    try:
        return Mixtral.from_gguf(
            args.model,
            device=device,
            device_map=args.device_map,
            n_gpu_layers=args.n_gpu_layers,
            strategy=args.strategy,
        )
    except DeviceError as exc:  # name the flag that asked for the device, and the way out
        raise DeviceError(None, placing_flag(args, exc.field), with_emulation_hint(exc.problem)) from None


def placing_flag(args: argparse.Namespace, field: str | None) -> str | None:
    """The flag that placed the model on a device the library refused (`field` as it named it)."""
    if field and field.startswith("device_map"):
        return field
    if args.device is None and args.device_map is None and args.n_gpu_layers is not None:
        return "--n-gpu-layers"
    return "--device" if field == "device" else field


def with_emulation_hint(problem: str) -> str:
    """`problem`, plus how to run anyway where a CUDA device was asked for and there is no GPU."""
    import torch

    if "cuda" in problem and not torch.cuda.is_available():
        return f"{problem} (no CUDA GPU here; --device emulated runs on the emulated one)"
    return problem


def check_tokens(model, ids: list[int], flag: str) -> None:
    """The model's own checks of a token list (ids in the vocabulary, the context), naming `flag`."""
    try:
        model.check_tokens(ids)
    except UsageError as exc:
        raise UsageError(None, flag, exc.problem) from None
