"""Properties over configs, tensor types, layouts, routers, placements, inputs and faults (hypothesis).

(a) A clean model on any placement traces clean (no mismatch, stray or sync) and its logits equal
    a plain CPU run's (NMSE <= 1e-10 on the emulated accelerator, 1e-5 on real CUDA).
(b) Any fault of the catalog that applies to the model is detected where it was injected: the
    first offence has the fault's class, module and GGUF tensor.
(c) The same case (same seed) gives the same trace: two files synthesized with one seed are the
    same bytes, and two runs of them the same event stream (timings and file paths aside).

Cases come from `harness.strategies` and run on the emulated accelerator (CUDA's device rules,
real values, on the CPU), with 1 to 3 CUDA devices; where real CUDA has every device a placement
names, it runs there. A failing example shrinks to the smallest config and prints (hypothesis
notes) a Python snippet and a `harness trace` command line that reproduce it. Synthesized files
are cached per module, keyed by what they depend on, so examples cost tenths of a second.

Profiles (of the harness pytest plugin, `pytest_harness.profiles`): `harness-ci` (derandomized,
15 examples per property, loaded here when CI is set), `harness-dev` (this repository's local
default), `harness-nightly` (500); `--hypothesis-profile NAME` picks one. The clean runs and their false positives are counted and
printed as one line when the module ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

from harness import faults as catalog
from harness.gguf_file import MixtralConfig
from harness.model.placement import Placement
from harness.strategies import (
    ModelCase,
    configs,
    device_maps,
    faults,
    model_cases,
    placement_map,
    placements,
)
from harness.synth import FILE_TYPES, MIN_VOCAB, plan, resolve_config
from harness.trace import OFFENDING, Tracer, load_trace
from harness.trace.emulated import EmulatedCuda, cpu_data, is_emulated

NMSE_EMULATED = 1e-10  # the emulated accelerator computes with the CPU's kernels
NMSE_CUDA = 1e-5  # real CUDA: other kernels, other rounding
CLASSES = ("mismatch", "sync", "stray", "transfer")
assert set(CLASSES) == set(OFFENDING)


def cases(**kwargs) -> st.SearchStrategy[ModelCase]:
    """Model cases over 1 to 3 CUDA devices (and the CPU), dense llamas included."""
    return st.integers(1, 3).flatmap(lambda n: model_cases(n_devices=n, dense=True, **kwargs))


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Files:
    """Synthesized GGUF files and CPU reference logits, cached by what they depend on."""

    def __init__(self, root):
        self.root = root
        self._paths: dict[tuple, object] = {}
        self._logits: dict[tuple, list[torch.Tensor]] = {}

    def path(self, case: ModelCase):
        key = case.synth_key
        if key not in self._paths:
            self._paths[key] = case.synthesize(self.root / f"model-{len(self._paths)}.gguf")
        return self._paths[key]

    def cpu_logits(self, case: ModelCase) -> list[torch.Tensor]:
        """The logits of each call of the case on a plain CPU model (no tracer, no emulation)."""
        key = (case.synth_key, case.tokens, case.split)
        if key not in self._logits:
            model = dataclasses.replace(case, placement={"device": "cpu"}).load(self.path(case))
            with torch.no_grad():
                self._logits[key] = [model(t, pos).clone() for t, pos in case.calls()]
        return self._logits[key]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("properties"))


@dataclass
class Tally:
    """Clean-model traced runs and the false positives among them (any mismatch, stray or sync)."""

    runs: int = 0
    false_positives: int = 0
    examples: list[str] = field(default_factory=list)

    def record(self, case: ModelCase, counts: dict[str, int]) -> dict[str, int]:
        self.runs += 1
        offences = {c: counts[c] for c in CLASSES if counts.get(c)}
        if offences:
            self.false_positives += 1
            if len(self.examples) < 5:
                self.examples.append(f"{offences} on {case.describe()}")
        return offences

    def line(self) -> str:
        return f"clean runs: {self.runs}, false positives: {self.false_positives}"


@pytest.fixture(scope="module")
def tally(request) -> Tally:
    t = Tally()
    yield t
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n[test_properties] {t.line()}")
        for example in t.examples:
            print(f"[test_properties]   false positive: {example}")


# -- helpers -----------------------------------------------------------------------------------


def _host(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values on the CPU (an emulated tensor's own CPU data; real CUDA copied back)."""
    return cpu_data(t).clone() if is_emulated(t) else t.detach().to("cpu")


def _nmse(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float(((got - want) ** 2).sum() / (want**2).sum().clamp(min=1e-300))


def _events(case: ModelCase) -> None:
    """Statistics of what was tried (`--hypothesis-show-statistics`)."""
    c = case.config
    event(f"experts: {c.expert_count}" if c.is_moe else "dense")
    event(f"file type: {case.file_type}")
    event(f"placement: {next(iter(case.placement))}, {len(case.cuda_indices)} GPU(s) used")
    event("calls: prefill + decode" if case.split else "calls: one")
    if case.uses_accelerator:
        event("accelerator: real CUDA" if case.real_cuda() else "accelerator: emulated")


# -- (a) a clean model is clean, and computes what the CPU computes ------------------------------


@given(case=cases())
def test_clean_model_is_clean_and_matches_cpu(case: ModelCase, files: Files, tally: Tally):
    note(case.reproduce())
    _events(case)
    path = files.path(case)
    want = files.cpu_logits(case)
    real = case.real_cuda()
    with case.accelerator(), torch.no_grad():
        model = case.load(path)
        with Tracer(model) as tracer:
            outs = [model(t, pos) for t, pos in case.calls()]
        got = [_host(o) for o in outs]
    summary = tracer.summary
    offences = tally.record(case, summary.counts)
    assert not offences, f"a clean model offends: {offences}; first offence {summary.first_offence}"
    assert summary.steps["traced"] == len(want)
    tolerance = NMSE_CUDA if real else NMSE_EMULATED
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape == (len(case.calls()[i][0]), case.config.vocab_size)
        assert _nmse(g, w) <= tolerance, f"call {i}: NMSE {_nmse(g, w):.3g} > {tolerance:g} against the CPU"


# -- (b) a fault is caught where it was put ----------------------------------------------------


@given(case=cases(accelerated=True), data=st.data())
def test_injected_fault_is_detected_where_injected(case: ModelCase, data, files: Files):
    note(f"case: {case.describe()}")
    path = files.path(case)
    raised = None
    with case.accelerator(), torch.no_grad():
        model = case.load(path)
        name = data.draw(faults(model), label="fault")
        fault = catalog.get(name)
        note(case.reproduce(fault=name))
        event(f"fault: {name}")
        calls = case.calls()
        prefill, traced = (calls[:1], calls[1:]) if len(calls) > 1 else ([], calls)
        for t, pos in prefill:
            model(t, pos)  # clean: the fault goes into a model with a filled cache, as in decoding
        # While the devices exist. `expected(model)` is `expected_class` but where the model's
        # strategy changes the first offending op (a float-typed head, dequantized at load).
        expected = (fault.expected(model), *fault.location(model))
        with fault.inject(model), Tracer(model) as tracer:
            try:
                for t, pos in traced:
                    model(t, pos)
            except RuntimeError as exc:  # CUDA refuses a mismatch; the tracer has recorded the op
                raised = exc
    summary = tracer.summary
    if raised is not None and summary.clean:
        raise raised  # not something the trace explains
    assert summary.verdict == "dirty", f"{name} went undetected: {summary.counts}"
    f = summary.first_offence
    assert (f["class"], f["module"], f["tensor"]) == expected, (
        f"{name}: first offence {f['class']} in {f['module']} ({f['tensor']}) by {f['op']} at {f['source']}, "
        f"expected {expected}"
    )


# -- (c) the same seed gives the same trace ----------------------------------------------------


def _traced_run(case: ModelCase, path, trace_path) -> list[torch.Tensor]:
    """Load, warm up (per-device constants and tables are built on first use, once per process
    or emulation), then trace the case's calls from position 0 into `trace_path`."""
    with case.accelerator(), torch.no_grad():
        model = case.load(path)
        for t, pos in case.calls():
            model(t, pos)
        model.reset()
        with Tracer(model, path=trace_path) as tracer:
            outs = [model(t, pos) for t, pos in case.calls()]
        return [_host(o) for o in outs], tracer.summary


def _comparable(trace_path) -> tuple[dict, list[dict], dict]:
    trace = load_trace(trace_path)
    header = {k: v for k, v in trace.header.items() if k != "model"}  # the file's path
    summary = {k: v for k, v in trace.summary.to_dict().items() if k != "seconds"}
    return header, [e.to_dict() for e in trace.events()], summary


@given(case=cases())
def test_same_seed_gives_the_same_trace(case: ModelCase, files: Files, tally: Tally):
    note(case.reproduce())
    first = files.path(case)
    again = case.synthesize(files.root / "again.gguf")
    assert filecmp.cmp(first, again, shallow=False), "the same seed wrote different files"
    logits_a, summary_a = _traced_run(case, first, files.root / "a.jsonl")
    logits_b, summary_b = _traced_run(case, again, files.root / "b.jsonl")
    for s in (summary_a, summary_b):
        assert not tally.record(case, s.counts), f"a clean model offends: {s.first_offence}"
    header_a, events_a, end_a = _comparable(files.root / "a.jsonl")
    header_b, events_b, end_b = _comparable(files.root / "b.jsonl")
    assert header_a == header_b
    assert len(events_a) == len(events_b)
    for a, b in zip(events_a, events_b, strict=True):
        assert a == b, f"the traces part at event {a['seq']}"
    assert end_a == end_b
    for a, b in zip(logits_a, logits_b, strict=True):
        # bit for bit on the emulated accelerator; real CUDA kernels may reduce in another order
        assert torch.equal(a, b) if not case.real_cuda() else _nmse(a, b) <= NMSE_EMULATED


# -- the strategies themselves -----------------------------------------------------------------


@given(config=configs(dense=True))
def test_configs_synthesize_and_fit_every_block_type(config: MixtralConfig):
    resolve_config(config)  # synth's checks
    c = config
    assert 1 <= c.block_count <= 3 and c.context_length >= 64 and c.vocab_size >= MIN_VOCAB
    assert c.head_dim in (32, 64) and c.head_count % c.head_count_kv == 0
    assert c.embedding_length % 256 == 0 and c.feed_forward_length % 256 == 0
    if c.is_moe:
        assert 2 <= c.expert_count <= 8 and 1 <= c.expert_used_count <= min(3, c.expert_count)
    # Every plain block type fits every row: no matrix falls back to another type.
    for name, ft in FILE_TYPES.items():
        if ft.mix:
            continue
        types = {t.qtype for t in plan(c, name) if len(t.shape) == 2 and "ffn_gate_inp" not in t.name}
        assert types == {ft.base}, name


@given(n_layers=st.integers(1, 6), n_devices=st.integers(0, 4), data=st.data())
def test_device_maps_and_placements_are_valid(n_layers: int, n_devices: int, data):
    devices = ["cpu", *(f"cuda:{i}" for i in range(n_devices))]
    device_map = data.draw(device_maps(n_layers, devices), label="device_map")
    placement = data.draw(placements(n_layers, n_devices), label="placement")
    keys = list(device_map)
    assert keys[0] == "embed" and keys[-1] == "head"
    with EmulatedCuda(device_count=max(1, n_devices)):
        assert Placement.from_map(device_map, n_layers).describe() == placement_map(
            {"device_map": device_map}, n_layers
        )
        assert Placement.resolve(n_layers, **placement).describe() == placement_map(placement, n_layers)


# -- the reproducers run -----------------------------------------------------------------------

SEED_CASE = ModelCase(  # candle#1815's setting: per-expert layout, F16 router, a split placement
    config=MixtralConfig(
        block_count=2,
        embedding_length=256,
        feed_forward_length=256,
        head_count=4,
        head_count_kv=2,
        vocab_size=300,
        expert_count=4,
        expert_used_count=2,
        context_length=64,
    ),
    file_type="Q4_K_M",
    layout="per-expert",
    router="f16",
    seed=3,
    tokens=(1, 5, 9, 260),
    placement={"device_map": {"embed": "cpu", "layers.0": "cuda:0", "layers.1": "cuda:1", "head": "cuda:1"}},
    n_devices=2,
    split=3,
)


def test_snippet_reproduces_a_faulted_case(tmp_path):
    code = SEED_CASE.snippet("candle-1815", gguf=str(tmp_path / "c.gguf"), trace=str(tmp_path / "c.jsonl"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<snippet>", "exec"), {})
    text = out.getvalue()
    assert "expected ('layers.0.moe.router', 'blk.0.ffn_gate_inp.weight')" in text
    assert "dirty" in text and "'class': 'mismatch', 'module': 'layers.0.moe.router'" in text
    assert load_trace(tmp_path / "c.jsonl").summary.first_offence["tensor"] == "blk.0.ffn_gate_inp.weight"


def test_command_line_reproduces_a_clean_case(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    if shutil.which("harness", path=path) is None:
        pytest.skip("the `harness` command is not installed (pip install -e .)")
    line = SEED_CASE.command_line()
    done = subprocess.run(
        line, shell=True, cwd=tmp_path, env={**os.environ, "PATH": path}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "trace: clean" in done.stdout
