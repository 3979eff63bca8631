"""The `harness` command line.

Exit statuses (`harness.cli.exits`): 0 clean or done; 1 the harness found a problem; 2 bad
input, said in one line on stderr naming the flag as typed, nothing run; 3 not judged (a traced
run that raised a non-device error or traced no op) or the harness failed. `--json` always
means machine-readable output on stdout; files are written with `-o/--out`. A reader that
stops reading (`harness run ... | head`) ends the command quietly.

Where each command lives: `generation` (run, logits, tokenize), `tracing` (trace, report,
cases, demo, faults), `files` (synth, inspect), `bench`; `options` reads and checks values, `loading`
holds the model options and loads the model.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

from harness.cli import bench, exits, files, generation, options, tracing
from harness.errors import DeviceError, HarnessError, NonFiniteLogitsError, UsageError

MAX_MESSAGE = 600  # characters of an error line; the rest is cut


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"harness {of('harness')} (torch {of('torch')}, gguf {of('gguf')}, python {sys.version.split()[0]})"
    )


def build_parser() -> options.Parser:
    p = options.Parser(
        prog="harness",
        description="Device-consistency harness for quantized Mixtral (MoE) inference over GGUF files.",
        epilog="Exit status: 0 clean, 1 a problem found, 2 bad input, 3 a traced run not judged.",
    )
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=options.Parser)
    tracing.add_commands(sub)
    files.add_commands(sub)
    generation.add_commands(sub)
    bench.add_commands(sub)
    p.commands = list(sub.choices)
    return p


def one_line(text: str) -> str:
    """An error message as one printable line of at most MAX_MESSAGE characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _message(exc: HarnessError, argv: Sequence[str]) -> str:
    if not isinstance(exc, (UsageError, DeviceError)):
        return str(exc)
    field = options.as_typed(exc.field, argv)
    problem = options.argparse_message(exc.problem, argv) if field is None else exc.problem
    return ": ".join(p for p in (exc.path, field, problem) if p)


def _refuse_old_spellings(argv: Sequence[str]) -> None:
    """`harness trace ... --json OUT.jsonl` wrote the trace before `--json` came to mean JSON on stdout."""
    if argv and argv[0] == "trace":
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag == "--json" and value.endswith((".jsonl", ".json")) and not value.startswith("-"):
                raise UsageError(
                    None,
                    "--json",
                    f"takes no file now (it prints the summary as JSON on stdout); write the trace with -o {value}",
                )


def _run(argv: Sequence[str]) -> int:
    parser = build_parser()
    _refuse_old_spellings(argv)
    if not argv:
        commands = ", ".join(parser.commands)
        raise UsageError(None, None, f"no command given; one of: {commands} (harness --help says more)")
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["harness", *argv])  # as typed, for headers and reports
    if hasattr(args, "model_option"):
        from harness.cli.loading import resolve_model

        args.model = resolve_model(args)
    return args.func(args)


def _quiet_stdout() -> None:
    """After a closed pipe: send what is left of stdout nowhere, so the flush at exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a file (a test's capture): nothing will flush to a pipe


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except SystemExit as exc:  # --help and --version print and exit
        return exc.code if isinstance(exc.code, int) else exits.CLEAN
    except BrokenPipeError:
        _quiet_stdout()  # the reader went away (`| head`): nothing is wrong, stop quietly
        return exits.CLEAN
    except NonFiniteLogitsError as exc:  # the input was read, the run gave no answer
        print(f"harness: error: {one_line(str(exc))}", file=sys.stderr)
        return exits.UNDECIDED
    except HarnessError as exc:
        print(f"harness: error: {one_line(_message(exc, argv))}", file=sys.stderr)
        return exits.BAD_INPUT
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"harness: error: {one_line(where + str(exc.strerror or exc))}", file=sys.stderr)
        return exits.BAD_INPUT
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RecursionError) as exc:
        print(f"harness: error: {type(exc).__name__}: the input is too large or too deep", file=sys.stderr)
        return exits.BAD_INPUT
    except Exception as exc:  # a bug of the harness: one line, never a traceback
        if os.environ.get("HARNESS_TRACEBACK"):
            raise
        text = one_line(f"{type(exc).__name__}: {exc}")
        print(f"harness: internal error: {text} (HARNESS_TRACEBACK=1 shows where)", file=sys.stderr)
        return exits.UNDECIDED


if __name__ == "__main__":
    sys.exit(main())
