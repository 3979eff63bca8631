"""`harness run`, `logits` and `tokenize`: the model as llama-cli and llama-tokenize use it."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TextIO

from harness.cli import loading, options
from harness.cli.loading import add_model_argument, add_model_options, check_tokens, enter_device
from harness.errors import UsageError
from harness.paths import check_output_file
from harness.run_checks import LogitsWatch, check_logits


class TextStream:
    """Writes generated text as the tokens come.

    A token's text depends on its neighbours (SentencePiece drops the space before the first
    piece; a character may be split over byte tokens), so each new piece of text is the
    difference between two decodes of a short window that starts one token before it, and
    text that ends in half a UTF-8 character waits for the rest."""

    def __init__(self, tokenizer, prompt: list[int], out: TextIO):
        self.tokenizer = tokenizer
        self.out = out
        self.ids = list(prompt)
        self.start = max(len(prompt) - 1, 0)  # the window's first token, already written
        self.written = len(prompt)  # tokens whose text is out

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.start : self.written])
        after = self.tokenizer.decode(self.ids[self.start :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.out.write(after[len(before) :])
            self.out.flush()
            self.start, self.written = self.written, len(self.ids)

    def finish(self) -> None:
        """Writes what is held back (an incomplete character, replaced) and ends the line."""
        before = self.tokenizer.decode(self.ids[self.start : self.written])
        after = self.tokenizer.decode(self.ids[self.start :])
        self.out.write(after[len(before) :] + "\n")
        self.out.flush()


def generated_text(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text the generated tokens add after the prompt's."""
    head = tokenizer.decode(prompt)
    whole = tokenizer.decode(prompt + tokens)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(tokens)


def cmd_run(args) -> int:
    from harness.model.generate import generate
    from harness.model.tokenizer import Tokenizer

    if not args.prompt:
        raise UsageError(None, "--prompt", "the prompt is empty")
    tokenizer = Tokenizer.from_gguf(args.model)
    prompt = tokenizer.encode(args.prompt)
    with contextlib.ExitStack() as stack:
        enter_device(args, stack)
        model = loading.load_model(args)  # through the module: tests replace it
        check_tokens(model, prompt, "--prompt")
        n = args.max_tokens if args.max_tokens >= 0 else max(model.max_seq_len - len(prompt), 0)
        stream = None
        if not args.json:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
            stream = TextStream(tokenizer, prompt, sys.stdout)
        with LogitsWatch(model) as watch:
            out = generate(
                model,
                prompt,
                n,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                eos_id=tokenizer.eos_id,
                on_token=stream.push if stream else None,
            )
        watch.check(args.model)  # tokens sampled from NaN logits are no answer
    if stream is None:
        doc = {
            "prompt_tokens": prompt,
            "tokens": out.tokens,
            "text": generated_text(tokenizer, prompt, out.tokens),
            "stopped_at_eos": out.stopped_at_eos,
            "prefill_tokens_per_second": out.prefill_tokens_per_second,
            "decode_tokens_per_second": out.decode_tokens_per_second,
            "placement": model.placement.describe(),
        }
        print(json.dumps(doc))
        return 0
    stream.finish()
    if n == 0:  # generate() returns before the prefill: there is no speed to report
        print("no token to generate: the prompt was not run", file=sys.stderr)
        return 0
    print(
        f"prefill: {len(prompt)} tokens, {out.prefill_tokens_per_second:.1f} tokens/s; "
        f"decode: {len(out.tokens)} tokens, {out.decode_tokens_per_second:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def cmd_logits(args) -> int:
    import numpy as np
    import torch

    out = check_output_file(args.out, "--out", inputs=[args.model])
    with contextlib.ExitStack() as stack:
        enter_device(args, stack)
        model = loading.load_model(args)  # through the module: tests replace it
        check_tokens(model, args.tokens, "--tokens")
        with torch.inference_mode():
            logits = model(torch.tensor(args.tokens, dtype=torch.long), 0)  # [T, V]
        check_logits(logits, args.model)  # no .npy of NaN is written as if it were a result
        array = logits.float().cpu().numpy()
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(out)
    if args.json:
        print(json.dumps({"out": str(out), "dtype": "float32", "shape": list(array.shape)}))
    else:
        print(f"wrote {out}: float32 logits {list(array.shape)}")
    return 0


def cmd_tokenize(args) -> int:
    """As llama-tokenize: one `id -> 'piece'` line per token; `--json`: the ids as a JSON list."""
    from harness.model.tokenizer import Tokenizer

    if args.text is not None and args.prompt is not None:
        raise UsageError(None, "--prompt", "the text is given twice (as an argument and with -p)")
    text = args.text if args.text is not None else args.prompt
    if text is None:
        raise UsageError(None, None, "no text given: harness tokenize MODEL.gguf TEXT (or -p TEXT)")
    tokenizer = Tokenizer.from_gguf(args.model)
    ids = tokenizer.encode(text, add_bos=not args.no_bos)
    if args.json:
        print(json.dumps(ids))
        return 0
    for i in ids:
        print(f"{i:6d} -> {tokenizer.decode([i], special=True)!r}")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser(
        "run",
        help="generate text from a prompt, streamed as it comes (llama-cli's -m, -p, -n, -ngl)",
        description="Generate text; the prompt and each token are printed as they come, the speeds "
        "of prefill and decode go to stderr.",
    )
    add_model_options(s)
    s.add_argument("-p", "--prompt", required=True, help="the prompt text")
    s.add_argument(
        "-n",
        "--max-tokens",
        "--n-predict",
        type=options.integer(-1, note="-1: until the context is full"),
        default=32,
        metavar="N",
        help="tokens to generate; -1: until EOS or the context is full (default 32)",
    )
    s.add_argument("--temperature", "--temp", type=options.real(0.0), default=0.0, help="0: greedy (default)")
    s.add_argument(
        "--top-p", type=options.real(0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling, in (0, 1]"
    )
    s.add_argument("-s", "--seed", type=options.seed, default=0, help="sampling seed, in [0, 2^64)")
    s.add_argument("--json", action="store_true", help="print one JSON document instead of streaming")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("logits", help="write float32 logits [T, vocab] of a token sequence to .npy")
    add_model_options(s)
    s.add_argument("--tokens", type=options.tokens, required=True, help="comma-separated ids, e.g. 1,2,3")
    s.add_argument(
        "-o", "--out", type=options.text, required=True, metavar="OUT.npy", help="the .npy to write"
    )
    s.add_argument("--json", action="store_true", help="print what was written as JSON")
    s.set_defaults(func=cmd_logits)

    s = sub.add_parser("tokenize", help="the token ids of a text, as llama-tokenize prints them")
    add_model_argument(s)
    s.add_argument("text", nargs="?", help="the text")
    s.add_argument("-p", "--prompt", default=None, help="the text, as llama-tokenize takes it")
    s.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    s.add_argument("--json", action="store_true", help="print the ids as a JSON list")
    s.set_defaults(func=cmd_tokenize)


__all__ = ["TextStream", "add_commands", "cmd_logits", "cmd_run", "cmd_tokenize", "generated_text"]
