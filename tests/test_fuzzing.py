"""The fuzzing campaign, short and seeded: bad input never hangs, crashes or runs silently wrong.

`scripts/fuzz.py` runs the long campaign; here a few hundred GGUF files and YAML cases, split in
chunks so xdist spreads them, and hypothesis over YAML text and CLI arguments. The classifier's
own tests show each failure class can be seen (a campaign that cannot fail proves nothing).
"""

from __future__ import annotations

import contextlib
import io
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import fuzzing
from harness.fuzzing import CLEAN, FAILURES, HANG, OK, OOM, REFUSE, SILENT_WRONG, TRACEBACK

GGUF_CHUNKS = 4
GGUF_PER_CHUNK = 50  # 200 files
SEED = 20251205


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzzing.make_seeds(tmp_path_factory.mktemp("seeds"))


# -- the classifier sees every kind of failure --------------------------------------------------


def _sleep():
    time.sleep(30)
    return OK, ""


def _allocate():
    blocks = [bytearray(64 << 20) for _ in range(64)]  # 4 GiB, past the cap
    return OK, str(len(blocks))


def _raise():
    raise ValueError("a bug")


def test_run_isolated_classifies_hangs_memory_and_tracebacks():
    assert fuzzing.run_isolated(_sleep, timeout=1, memory_bytes=1 << 30)[0] == HANG
    assert fuzzing.run_isolated(_allocate, timeout=30, memory_bytes=256 << 20)[0] == OOM
    outcome, message = fuzzing.run_isolated(_raise, timeout=30, memory_bytes=1 << 30)
    assert outcome == TRACEBACK and "ValueError: a bug" in message
    assert fuzzing.run_isolated(lambda: (OK, "fine"), timeout=30, memory_bytes=1 << 30) == (OK, "fine")


def test_exercise_of_a_seed_and_what_counts_as_silent_wrong(seeds):
    for seed in seeds:
        assert fuzzing.exercise_gguf(str(seed.path), fuzzing.ACCEPT) == (OK, "")
        # the same valid file, where a refusal was due: finite logits are silent wrong
        outcome, message = fuzzing.exercise_gguf(str(seed.path), REFUSE)
        assert outcome == SILENT_WRONG and "must be refused" in message


def test_classify_error_wants_file_field_and_one_line(tmp_path):
    from harness.errors import GGUFTensorError, HarnessError

    path = str(tmp_path / "m.gguf")
    assert fuzzing.classify_error(GGUFTensorError(path, "blk.0.x", "bad"), path)[0] == CLEAN
    assert fuzzing.classify_error(GGUFTensorError(None, "blk.0.x", "bad"), path)[0] == fuzzing.UNCLEAR
    assert fuzzing.classify_error(HarnessError(path, None, "bad"), path)[0] == fuzzing.UNCLEAR
    assert fuzzing.classify_error(KeyError("layers"), path)[0] == TRACEBACK
    assert fuzzing.classify_error(MemoryError(), path)[0] == OOM


# -- the short campaigns ---------------------------------------------------------------------------


def _no_failures(campaign) -> None:
    table = campaign.to_dict()
    failures = [f"{f['kind']} {f['detail']}: {f['outcome']}: {f['message'][:300]}" for f in table["failures"]]
    assert not failures, "\n".join(failures)
    assert sum(table["outcomes"][o] for o in FAILURES) == 0


@pytest.mark.parametrize("chunk", range(GGUF_CHUNKS))
def test_short_gguf_campaign(tmp_path, chunk):
    campaign = fuzzing.run_gguf_campaign(
        GGUF_PER_CHUNK, SEED, tmp_path, timeout=60, memory_bytes=2 << 30, start=chunk * GGUF_PER_CHUNK
    )
    _no_failures(campaign)
    assert campaign.n == GGUF_PER_CHUNK
    # Both answers occur: the campaign neither refuses everything nor accepts everything.
    assert campaign.counts[OK] > 0 and campaign.counts[CLEAN] > 0


def test_the_campaign_covers_the_issues_mutation_kinds(seeds, tmp_path):
    import random

    kinds = {c.kind.split(":")[0] for c in fuzzing.gguf_cases(seeds, 300, SEED, tmp_path)}
    assert {"truncate", "flip", "patch", "shift", "name", "config", "vocab", "tensor", "weights"} <= kinds
    details = " ".join(fuzzing.structural(seeds[0], random.Random(i))[1] for i in range(1500))
    for field in ("array length", "data offset", "tensor count", "key count", "dimension count", ": type"):
        assert field in details


@pytest.mark.parametrize("chunk", range(2))
def test_short_yaml_campaign(tmp_path, chunk):
    campaign = fuzzing.run_yaml_campaign(30, SEED + chunk, tmp_path)
    _no_failures(campaign)
    assert campaign.counts[CLEAN] > 0


# -- hypothesis over the YAML and CLI surfaces -----------------------------------------------------

CASE_KEYS = ["description", "model", "device", "tokens", "decode", "fault", "expect", "seed", "schema"]
YAML_SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["null", "~", ".nan", "-.inf", "yes", "''", "!!set {1}", "2024-01-01", "*a", "&a x"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8).map(lambda t: '"' + t.replace('"', "") + '"'),
)


@st.composite
def case_documents(draw):
    lines = []
    for key in draw(st.lists(st.sampled_from(CASE_KEYS), max_size=6)):
        if draw(st.booleans()):
            lines.append(f"{key}: {draw(YAML_SCALARS)}")
        else:
            items = draw(st.lists(YAML_SCALARS, max_size=4))
            lines.append(f"{key}: [{', '.join(items)}]")
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(case_documents())
def test_any_case_document_loads_or_is_a_case_error(tmp_path_factory, text):
    from harness.cases import CaseError, load_case

    path = tmp_path_factory.mktemp("h") / "case.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_case(path)
    except CaseError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)


CLI_VALUES = st.sampled_from(
    ["", "0", "-1", "nan", "inf", "1e309", str(2**64), "meta", "cpu", "1,2", "/dev/zero", "x"]
)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["logits", "run", "trace", "tokenize", "inspect"]),
    st.sampled_from(["--device", "--tokens", "--temperature", "--top-p", "--seed", "-n", "--decode", "-o"]),
    CLI_VALUES,
)
def test_cli_arguments_exit_cleanly(tmp_path_factory, seeds, command, flag, value):
    from harness.cli import main

    model = str(seeds[0].path)
    out = str(tmp_path_factory.mktemp("cli") / "out.bin")
    base = {
        "logits": ["logits", model, "--tokens", "1,2", "-o", out],
        "run": ["run", model, "-p", "hi", "-n", "1"],
        "trace": ["trace", model, "--device", "cpu", "--tokens", "1", "-o", out],
        "tokenize": ["tokenize", "-m", model, "hi"],
        "inspect": ["inspect", model],
    }[command]
    argv = [*base, flag, value]
    err = io.StringIO()
    here = tmp_path_factory.mktemp("cwd")  # a relative path from the draw lands here
    with contextlib.chdir(here), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    assert code in (0, 1, 2, 3), argv
    text = err.getvalue()
    assert "internal error" not in text and "Traceback" not in text, (argv, text)
    if code == 2:
        assert len([ln for ln in text.splitlines() if ln.strip()]) == 1, (argv, text)
